-- Write a user's refreshed list into a build's bucket, counted in the bucket's info in the same
-- step (HLEN(user_recs) = info count + fold_ins always). Nothing happens if the build's bucket
-- is gone (the build expired): -1. The hash takes the info's TTL, so a fold-in into a kept build
-- creates nothing that lives forever.
-- KEYS: the bucket's user_recs, its info; ARGV: user id, entry.
if redis.call('EXISTS', KEYS[2]) == 0 then
  return -1
end
local added = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if added == 1 then
  redis.call('HINCRBY', KEYS[2], 'fold_ins', 1)
end
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return added
