-- Give up the leader lock, only if the caller holds it.
-- KEYS[1]  $prefix supervisor:leader
-- ARGV[1]  prefix
-- ARGV[2]  holder id
if redis.call('GET', KEYS[1]) == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
