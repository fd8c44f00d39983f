-- A user's published list and the products the user gave negative feedback on since, in one
-- step on the user's bucket. KEYS: the build's user_recs of the bucket, the user's negative set.
-- ARGV[1] the user id.
return {redis.call('HGET', KEYS[1], ARGV[1]), redis.call('SMEMBERS', KEYS[2])}
