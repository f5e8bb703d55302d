-- A try failed: record when the next one is due, if the notice is still owed and the try is
-- still the chain's latest (a re-sent message may have begun a newer one).
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix notify
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  sequence number of the try that failed (from notify_begin.lua)
-- ARGV[4]  due (seconds): when the next try is due
-- Returns 1 when recorded (send the next message), 0 when the chain moved on or ended.
local id = ARGV[2]
if redis.call('HGET', KEYS[1], 'notify_seq') ~= ARGV[3] or not redis.call('ZSCORE', KEYS[2], id) then
  return 0
end
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), id)
return 1
