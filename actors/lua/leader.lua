-- Hold or take the supervisor's leader lock.
-- KEYS[1]  $prefix supervisor:leader   string: the holder's id, with a TTL
-- ARGV[1]  prefix
-- ARGV[2]  candidate id
-- ARGV[3]  lock TTL (milliseconds)
-- Returns 1 when the candidate holds the lock now (renewed or newly taken), else 0.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
