-- Find owed notices whose next try is overdue by more than the grace period: their message is
-- lost (a worker killed mid-try, Redis restarted without persistence). Each is marked due now,
-- so it is returned at most once per grace period. A chain that is alive is never returned:
-- its notice is due in the future, or held by a try in flight (notify_begin.lua).
-- KEYS[1]  $prefix notify
-- ARGV[1]  prefix
-- ARGV[2]  now (seconds)
-- ARGV[3]  grace (seconds)
-- ARGV[4]  most notices to return
-- Returns a flat list: task id, the sequence number to send ('' when no try was made yet), ...
-- A notice whose task is gone or no longer ended is dropped.
local now, grace = tonumber(ARGV[2]), tonumber(ARGV[3])
local found = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - grace, 'LIMIT', 0, tonumber(ARGV[4]))) do
  local t = redis.call('HMGET', prefix .. 'task:' .. id, 'state', 'notify_seq', 'notify_tries')
  if not t[1] or not is_retryable(t[1]) then
    redis.call('ZREM', KEYS[1], id)
  else
    redis.call('ZADD', KEYS[1], now, id)
    table.insert(found, id)
    table.insert(found, (tonumber(t[3] or '0') > 0) and (t[2] or '0') or '')
  end
end
return found
