-- Make one publish attempt's build live, or refuse and change nothing. Runs on the {p} slot only:
-- the caller has checked every bucket of the build against its info and removed the TTLs of the
-- bucket keys first (under the switch lock, so nothing else touched them since).
-- KEYS: the version's owner lock, the switch lock, the live pointer, the build's meta, the
--       build's top buys, the history of kept builds
-- ARGV: attempt, switch lock token, build, version, data end (epoch s), latest allowed data end,
--       builds to keep, seconds a kept build stays, seconds a dropped build stays readable (for
--       readers that cached the pointer), the {p} tag
local owner_lock, switch_lock, pointer, meta, top_buys, history = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local attempt, token, build, version = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local data_end, latest_end = tonumber(ARGV[5]), tonumber(ARGV[6])
local keep, kept_ttl, grace, tag = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10]

if redis.call('GET', switch_lock) ~= token then
  return redis.error_reply('SWITCHLOCK')
end
local live_build = redis.call('HGET', pointer, 'build')
if live_build == build then
  return 'LIVE'  -- a retry after a lost reply: the first call switched
end
local owner = redis.call('GET', owner_lock)
if owner ~= attempt then
  return redis.error_reply('OWNER ' .. (owner or 'none'))
end
if data_end > latest_end then
  return redis.error_reply('FUTURE')
end
local counts_json = redis.call('HGET', meta, 'counts')
if not counts_json then
  return redis.error_reply('INCOMPLETE meta 0 1')
end
local counts = cjson.decode(counts_json)
local top_found = redis.call('HLEN', top_buys)
if top_found ~= counts['top_buys_lists'] then
  return redis.error_reply('INCOMPLETE top_buys ' .. top_found .. ' ' .. tostring(counts['top_buys_lists']))
end
local live_end = redis.call('HGET', pointer, 'data_end_ts')
if live_end and tonumber(live_end) > data_end then
  return redis.error_reply('STALE ' .. (redis.call('HGET', pointer, 'version') or '?') .. ' ' .. live_end)
end

-- builds leaving the live set: their {p} keys get their TTL here, their bucket keys when the
-- caller settles the pending demotions (``demote``: build -> {ttl, buckets})
local demote = cjson.decode(redis.call('HGET', pointer, 'demote') or '{}')
local function retire(old, ttl)
  redis.call('EXPIRE', tag .. ':meta:' .. old, ttl)
  redis.call('EXPIRE', tag .. ':' .. old .. ':top_buys', ttl)
  local buckets = tonumber(redis.call('HGET', tag .. ':meta:' .. old, 'buckets') or '0')
  if demote[old] then
    buckets = demote[old][2]
  end
  demote[old] = {ttl, buckets}
end
-- a kept copy of the same version (an earlier attempt) is replaced by this one
for _, kept in ipairs(redis.call('LRANGE', history, 0, -1)) do
  if string.sub(kept, 1, #version + 1) == version .. '.' then
    redis.call('LREM', history, 0, kept)
    retire(kept, grace)
  end
end
if live_build then
  if keep > 0 then
    redis.call('LPUSH', history, live_build)
    retire(live_build, kept_ttl)
  else
    retire(live_build, grace)
  end
end
while redis.call('LLEN', history) > keep do
  retire(redis.call('RPOP', history), grace)
end
if redis.call('EXISTS', history) == 1 then
  redis.call('EXPIRE', history, kept_ttl)
end
demote[build] = nil
redis.call('PERSIST', meta)
redis.call('PERSIST', top_buys)
redis.call('DEL', pointer)
redis.call('HSET', pointer, 'build', build, 'version', version, 'data_end_ts', ARGV[5],
           'buckets', redis.call('HGET', meta, 'buckets'))
if next(demote) then
  redis.call('HSET', pointer, 'demote', cjson.encode(demote))
end
redis.call('DEL', owner_lock)
return 'OK'
