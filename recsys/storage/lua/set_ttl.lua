-- Give one bucket's keys of a build a TTL (ARGV[1] seconds; -1 removes it: the build goes live),
-- all at once, so a fold-in (fold_in.lua) never sees them half-changed.
-- KEYS: the bucket's keys (its hashes and its info). Keys that do not exist are skipped.
local ttl = tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
  if ttl < 0 then
    redis.call('PERSIST', key)
  else
    redis.call('EXPIRE', key, ttl)
  end
end
return 1
