-- Make a kept version live again, keeping the one it replaces; refuse and change nothing if the
-- kept version is gone or incomplete. Atomic, like the switch.
-- With n structures (ARGV[4], meta last):
-- KEYS[1..n]  the live structures
-- KEYS[n+1]   list of kept versions, newest first
-- ARGV: key tag, version to make live, seconds a kept version stays, structures (JSON list, meta
--       last), the meta count field of each counted structure (JSON object), structures added to
--       the layout later (JSON list: a version whose meta records no count for one holds none of it)
local tag, target, kept_ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local structures, count_fields = cjson.decode(ARGV[4]), cjson.decode(ARGV[5])
local added_later = {}
for _, structure in ipairs(cjson.decode(ARGV[6])) do
  added_later[structure] = true
end
local n = #structures
local live_meta, history = KEYS[n], KEYS[n + 1]
local function kept_key(kept_version, i)
  return tag .. ':v:' .. kept_version .. ':' .. structures[i]
end

local kept_counts = redis.call('HGET', kept_key(target, n), 'counts')
if not kept_counts then
  return redis.error_reply('GONE')
end
local counts = cjson.decode(kept_counts)
-- users the API added to user_recs after that version's publish
local fold_ins = tonumber(redis.call('HGET', kept_key(target, n), 'fold_in_users') or '0')
for i = 1, n do
  local field = count_fields[structures[i]]
  if field then
    local expected = counts[field]
    if expected == nil and added_later[structures[i]] then
      expected = 0
    end
    if structures[i] == 'user_recs' and expected ~= nil then
      expected = expected + fold_ins
    end
    local found = redis.call('HLEN', kept_key(target, i))
    if found ~= expected then
      return redis.error_reply('INCOMPLETE ' .. structures[i] .. ' ' .. found .. ' ' .. tostring(expected))
    end
  end
end

local live_version = redis.call('HGET', live_meta, 'version')
redis.call('LREM', history, 0, target)
if live_version and live_version ~= target then
  for i = 1, n do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('RENAME', KEYS[i], kept_key(live_version, i))
      redis.call('EXPIRE', kept_key(live_version, i), kept_ttl)
    end
  end
  redis.call('LPUSH', history, live_version)
else
  for i = 1, n do
    redis.call('DEL', KEYS[i])
  end
end
for i = 1, n do
  if redis.call('EXISTS', kept_key(target, i)) == 1 then
    redis.call('RENAME', kept_key(target, i), KEYS[i])
    redis.call('PERSIST', KEYS[i])
  end
end
if redis.call('EXISTS', history) == 1 then
  redis.call('EXPIRE', history, kept_ttl)
end
return 'OK'
