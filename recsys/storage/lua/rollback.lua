-- Make a kept build live again, keeping the one it replaces; refuse and change nothing if the kept
-- build is gone. Like the switch: the caller holds the switch lock, has checked every bucket of
-- the target against its info and removed the TTLs of its bucket keys.
-- KEYS: the switch lock, the live pointer, the history of kept builds, the target's meta, its top buys
-- ARGV: switch lock token, target build, seconds a kept build stays, the {p} tag
local switch_lock, pointer, history, meta, top_buys = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local token, target, kept_ttl, tag = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

if redis.call('GET', switch_lock) ~= token then
  return redis.error_reply('SWITCHLOCK')
end
local counts_json = redis.call('HGET', meta, 'counts')
if not counts_json or redis.call('LREM', history, 0, target) == 0 then
  return redis.error_reply('GONE')
end
local counts = cjson.decode(counts_json)
local top_found = redis.call('HLEN', top_buys)
if top_found ~= counts['top_buys_lists'] then
  redis.call('LPUSH', history, target)  -- as it was
  return redis.error_reply('INCOMPLETE top_buys ' .. top_found .. ' ' .. tostring(counts['top_buys_lists']))
end

local demote = cjson.decode(redis.call('HGET', pointer, 'demote') or '{}')
local live_build = redis.call('HGET', pointer, 'build')
if live_build and live_build ~= target then
  redis.call('LPUSH', history, live_build)
  redis.call('EXPIRE', tag .. ':meta:' .. live_build, kept_ttl)
  redis.call('EXPIRE', tag .. ':' .. live_build .. ':top_buys', kept_ttl)
  demote[live_build] = {kept_ttl, tonumber(redis.call('HGET', pointer, 'buckets'))}
end
redis.call('EXPIRE', history, kept_ttl)
demote[target] = nil
redis.call('PERSIST', meta)
redis.call('PERSIST', top_buys)
redis.call('DEL', pointer)
redis.call('HSET', pointer, 'build', target, 'version', redis.call('HGET', meta, 'version'),
           'data_end_ts', redis.call('HGET', meta, 'data_end_ts'), 'buckets', redis.call('HGET', meta, 'buckets'))
if next(demote) then
  redis.call('HSET', pointer, 'demote', cjson.encode(demote))
end
return 'OK'
