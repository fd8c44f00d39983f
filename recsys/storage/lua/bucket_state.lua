-- One bucket of a build, read atomically: whether its info exists, each hash's entry count, what
-- the info records for it, each key's TTL (-2 missing, -1 none), and the fold-ins the API added.
-- KEYS: the bucket's hashes, then its info; ARGV: the hashes' structure names (the info's fields).
local info = KEYS[#KEYS]
local found, recorded, ttls = {}, {}, {}
for i = 1, #KEYS - 1 do
  found[i] = redis.call('HLEN', KEYS[i])
  recorded[i] = tonumber(redis.call('HGET', info, ARGV[i]) or '-1')
  ttls[i] = redis.call('TTL', KEYS[i])
end
ttls[#KEYS] = redis.call('TTL', info)
local fold_ins = tonumber(redis.call('HGET', info, 'fold_ins') or '0')
return {redis.call('EXISTS', info), found, recorded, ttls, fold_ins}
