-- Make a kept version live again, keeping the one it replaces; refuse and change nothing if the
-- kept version is gone or incomplete. Atomic, like the switch.
-- KEYS[1..4]  live user_recs, similar_products, top_buys, meta
-- KEYS[5]     list of kept versions, newest first
-- ARGV: key tag, version to make live, seconds a kept version stays
local tag, target, kept_ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local structures = {'user_recs', 'similar_products', 'top_buys', 'meta'}
local count_fields = {'users', 'products_with_similar', 'top_buys_lists'}
local function kept_key(kept_version, i)
  return tag .. ':v:' .. kept_version .. ':' .. structures[i]
end

local kept_counts = redis.call('HGET', kept_key(target, 4), 'counts')
if not kept_counts then
  return redis.error_reply('GONE')
end
local counts = cjson.decode(kept_counts)
local fold_ins = tonumber(redis.call('HGET', kept_key(target, 4), 'fold_in_users') or '0')
for i = 1, 3 do
  local expected = counts[count_fields[i]]
  if i == 1 then
    expected = expected + fold_ins
  end
  local found = redis.call('HLEN', kept_key(target, i))
  if found ~= expected then
    return redis.error_reply('INCOMPLETE ' .. structures[i] .. ' ' .. found .. ' ' .. tostring(expected))
  end
end

local live_version = redis.call('HGET', KEYS[4], 'version')
redis.call('LREM', KEYS[5], 0, target)
if live_version and live_version ~= target then
  for i = 1, 4 do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('RENAME', KEYS[i], kept_key(live_version, i))
      redis.call('EXPIRE', kept_key(live_version, i), kept_ttl)
    end
  end
  redis.call('LPUSH', KEYS[5], live_version)
else
  for i = 1, 4 do
    redis.call('DEL', KEYS[i])
  end
end
for i = 1, 4 do
  if redis.call('EXISTS', kept_key(target, i)) == 1 then
    redis.call('RENAME', kept_key(target, i), KEYS[i])
    redis.call('PERSIST', KEYS[i])
  end
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('EXPIRE', KEYS[5], kept_ttl)
end
return 'OK'
