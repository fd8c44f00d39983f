-- Set a field of a staging hash unless it is set, (re)set the hash's TTL, and return the field's
-- value: the first of several concurrent writers wins, and every one of them reads what won.
-- KEYS[1] the hash; ARGV: TTL (s), field, value.
redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return redis.call('HGET', KEYS[1], ARGV[2])
