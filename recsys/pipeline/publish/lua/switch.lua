-- Make one publish attempt's staged version live, or refuse and change nothing.
-- Runs atomically: readers see the old live version or the new one, never a mix.
-- With n structures (ARGV[8], meta last):
-- KEYS[1]              owner lock of the version (must hold ARGV[1], the attempt)
-- KEYS[2..n+1]         the live structures
-- KEYS[n+2..2n+1]      the attempt's staged ones, in the same order
-- KEYS[2n+2]           list of kept (replaced) versions, newest first
-- ARGV: attempt, key tag, version, data end (epoch s), latest allowed data end, versions to keep,
--       seconds a kept version stays, structures (JSON list, meta last), the meta count field of
--       each counted structure (JSON object), structures added to the layout later (JSON list: a
--       version whose meta records no count for one holds none of it)
local attempt, tag, version = ARGV[1], ARGV[2], ARGV[3]
local data_end, latest_end = tonumber(ARGV[4]), tonumber(ARGV[5])
local keep, kept_ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local structures, count_fields = cjson.decode(ARGV[8]), cjson.decode(ARGV[9])
local added_later = {}
for _, structure in ipairs(cjson.decode(ARGV[10])) do
  added_later[structure] = true
end
local n = #structures
local live_meta, staged_meta, history = KEYS[n + 1], KEYS[2 * n + 1], KEYS[2 * n + 2]

local owner = redis.call('GET', KEYS[1])
if owner ~= attempt then
  return redis.error_reply('OWNER ' .. (owner or 'none'))
end
if data_end > latest_end then
  return redis.error_reply('FUTURE')
end
local staged_counts = redis.call('HGET', staged_meta, 'counts')
if not staged_counts then
  return redis.error_reply('INCOMPLETE meta 0 1')
end
local counts = cjson.decode(staged_counts)
for i = 1, n do
  local field = count_fields[structures[i]]
  if field then
    local found, expected = redis.call('HLEN', KEYS[n + 1 + i]), counts[field]
    if expected == nil and added_later[structures[i]] then
      expected = 0
    end
    if found ~= expected then
      return redis.error_reply('INCOMPLETE ' .. structures[i] .. ' ' .. found .. ' ' .. tostring(expected))
    end
  end
end
local live_version = redis.call('HGET', live_meta, 'version')
local live_end = redis.call('HGET', live_meta, 'data_end_ts')
if live_end and tonumber(live_end) > data_end then
  return redis.error_reply('STALE ' .. (live_version or '?') .. ' ' .. live_end)
end

local function kept_key(kept_version, i)
  return tag .. ':v:' .. kept_version .. ':' .. structures[i]
end
local function drop_kept(kept_version)
  for i = 1, n do
    redis.call('DEL', kept_key(kept_version, i))
  end
  redis.call('LREM', history, 0, kept_version)
end

-- republishing a kept version: the new copy replaces the kept one
drop_kept(version)
if live_version and live_version ~= version and keep > 0 then
  for i = 1, n do
    if redis.call('EXISTS', KEYS[1 + i]) == 1 then
      redis.call('RENAME', KEYS[1 + i], kept_key(live_version, i))
      redis.call('EXPIRE', kept_key(live_version, i), kept_ttl)
    end
  end
  redis.call('LPUSH', history, live_version)
  while redis.call('LLEN', history) > keep do
    drop_kept(redis.call('RPOP', history))
  end
else
  for i = 1, n do
    redis.call('DEL', KEYS[1 + i])
  end
end
if redis.call('EXISTS', history) == 1 then
  redis.call('EXPIRE', history, kept_ttl)
end
for i = 1, n do
  if redis.call('EXISTS', KEYS[n + 1 + i]) == 1 then
    redis.call('RENAME', KEYS[n + 1 + i], KEYS[1 + i])
    redis.call('PERSIST', KEYS[1 + i])
  end
end
redis.call('DEL', KEYS[1])
return 'OK'
