-- End an owed notice: delivered (any try of the same run), or given up (the chain's latest try).
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix notify
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  the run the notice is for (an operator retry since then owes nothing of it)
-- ARGV[4]  sequence number of the try ('' for a delivery: whichever try got through ends it)
-- Returns 1 when the notice was owed and is now ended, else 0.
local id = ARGV[2]
local t = redis.call('HMGET', KEYS[1], 'run', 'notify_seq')
if (t[1] or '0') ~= ARGV[3] or (ARGV[4] ~= '' and t[2] ~= ARGV[4]) then
  return 0
end
return redis.call('ZREM', KEYS[2], id)
