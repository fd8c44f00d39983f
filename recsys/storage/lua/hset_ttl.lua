-- HSET fields into a staging hash and (re)set its TTL in the same step, so the hash never exists
-- without one, even if it expired between two writes of a slow writer.
-- KEYS[1] the hash; ARGV[1] TTL (s); ARGV[2..] field, value, field, value, ...
local n = #ARGV
local step = 7000  -- arguments per HSET: Lua's unpack() stops at about 8,000 values
for first = 2, n, step do
  redis.call('HSET', KEYS[1], unpack(ARGV, first, math.min(first + step - 1, n)))
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return (n - 1) / 2
