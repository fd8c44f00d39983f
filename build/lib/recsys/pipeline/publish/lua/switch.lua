-- Make one publish attempt's staged version live, or refuse and change nothing.
-- Runs atomically: readers see the old live version or the new one, never a mix.
-- KEYS[1]     owner lock of the version (must hold ARGV[1], the attempt)
-- KEYS[2..5]  live user_recs, similar_products, top_buys, meta
-- KEYS[6..9]  the attempt's staged ones, in the same order
-- KEYS[10]    list of kept (replaced) versions, newest first
-- ARGV: attempt, key tag, version, data end (epoch s), latest allowed data end, versions to keep,
--       seconds a kept version stays
local attempt, tag, version = ARGV[1], ARGV[2], ARGV[3]
local data_end, latest_end = tonumber(ARGV[4]), tonumber(ARGV[5])
local keep, kept_ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local structures = {'user_recs', 'similar_products', 'top_buys', 'meta'}
local count_fields = {'users', 'products_with_similar', 'top_buys_lists'}

local owner = redis.call('GET', KEYS[1])
if owner ~= attempt then
  return redis.error_reply('OWNER ' .. (owner or 'none'))
end
if data_end > latest_end then
  return redis.error_reply('FUTURE')
end
local staged_counts = redis.call('HGET', KEYS[9], 'counts')
if not staged_counts then
  return redis.error_reply('INCOMPLETE meta 0 1')
end
local counts = cjson.decode(staged_counts)
for i = 1, 3 do
  local found, expected = redis.call('HLEN', KEYS[5 + i]), counts[count_fields[i]]
  if found ~= expected then
    return redis.error_reply('INCOMPLETE ' .. structures[i] .. ' ' .. found .. ' ' .. tostring(expected))
  end
end
local live_version = redis.call('HGET', KEYS[5], 'version')
local live_end = redis.call('HGET', KEYS[5], 'data_end_ts')
if live_end and tonumber(live_end) > data_end then
  return redis.error_reply('STALE ' .. (live_version or '?') .. ' ' .. live_end)
end

local function kept_key(kept_version, i)
  return tag .. ':v:' .. kept_version .. ':' .. structures[i]
end
local function drop_kept(kept_version)
  for i = 1, 4 do
    redis.call('DEL', kept_key(kept_version, i))
  end
  redis.call('LREM', KEYS[10], 0, kept_version)
end

-- republishing a kept version: the new copy replaces the kept one
drop_kept(version)
if live_version and live_version ~= version and keep > 0 then
  for i = 1, 4 do
    if redis.call('EXISTS', KEYS[1 + i]) == 1 then
      redis.call('RENAME', KEYS[1 + i], kept_key(live_version, i))
      redis.call('EXPIRE', kept_key(live_version, i), kept_ttl)
    end
  end
  redis.call('LPUSH', KEYS[10], live_version)
  while redis.call('LLEN', KEYS[10]) > keep do
    drop_kept(redis.call('RPOP', KEYS[10]))
  end
else
  for i = 1, 4 do
    redis.call('DEL', KEYS[1 + i])
  end
end
if redis.call('EXISTS', KEYS[10]) == 1 then
  redis.call('EXPIRE', KEYS[10], kept_ttl)
end
for i = 1, 4 do
  if redis.call('EXISTS', KEYS[5 + i]) == 1 then
    redis.call('RENAME', KEYS[5 + i], KEYS[1 + i])
    redis.call('PERSIST', KEYS[1 + i])
  end
end
redis.call('DEL', KEYS[1])
return 'OK'
