-- Take or renew a version's owner lock for one publish attempt.
-- KEYS[1] the lock; ARGV: attempt, lock TTL (ms).
-- Returns {1} when the attempt holds the lock now, else {0, holder, holder's remaining ms}.
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1}
end
return {0, holder, redis.call('PTTL', KEYS[1])}
