-- Publish the supervisor's report for the operator dashboard, by the leader lock's holder only
-- (a replica that lost the lock mid-sweep must not overwrite the new leader's report).
-- KEYS[1]  $prefix supervisor:leader   string: the holder's id, with a TTL
-- KEYS[2]  $prefix supervisor:report   hash: node, last_sweep, checked_at, problems (JSON); with a TTL
-- ARGV[1]  prefix
-- ARGV[2]  the node id that must hold the lock
-- ARGV[3]  the report's TTL (milliseconds)
-- ARGV[4..] field, value pairs: what this node knows (a field it does not know is left out)
-- Returns 1 when written, 0 when another replica (or nobody) holds the lock.
-- The report is replaced whole: it always describes one node, never a mix of two leaders'.
if redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'node', ARGV[2], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
