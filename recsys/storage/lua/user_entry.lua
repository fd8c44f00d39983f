-- A user's published list and the products the user gave negative feedback on since, in one
-- step on the user's bucket. KEYS: the build's user_recs of the bucket, the user's negative set.
-- ARGV[1] the user id. Without negative feedback (most users) the list alone, as HGET answers it:
-- a flat reply costs the API less to parse than a nested one.
local negative = redis.call('SMEMBERS', KEYS[2])
if #negative == 0 then
  return redis.call('HGET', KEYS[1], ARGV[1])
end
return {redis.call('HGET', KEYS[1], ARGV[1]), negative}
