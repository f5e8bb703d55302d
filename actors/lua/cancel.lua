-- An operator stops a task; the token moves on so its worker's later writes are refused.
-- A cancel wins until the first delivery attempt of task.completed starts (announce.lua sets
-- 'announcing' to the current run): from then on the backend may already hold task.completed,
-- so the cancel is refused and the task ends done. A canceled task owes task.canceled
-- (set_state adds it to $prefix notify); the caller sends the notify message.
-- The holder of a canceled run learns of it only at its next renewal, and its own fence trips
-- no later than its lease deadline: that deadline is kept as 'fenced_until', and a retry
-- (retry.lua) starts no new run before it, so the old holder never writes beside a new one.
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix leases
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  now (seconds)
-- ARGV[4]  who (a token's name, "cli"): on the task.canceled event as 'by'
-- Returns {'ok'} | {'missing'} | {'final', state} | {'announcing', state}
local id, now = ARGV[2], tonumber(ARGV[3])
local state = redis.call('HGET', KEYS[1], 'state')
local ended = not_live(state)
if ended then
  return ended
end
if announcing(KEYS[1]) then
  return {'announcing', state}
end
next_token(KEYS[1])
free_slots(KEYS[1], id)
-- A queued task may still wait for the fence of an earlier canceled run (not_before, set by a
-- retry): the fence is the latest of all of them.
local f = redis.call('HMGET', KEYS[1], 'lease_until', 'not_before', 'fenced_until')
local fenced_until = math.max(now, tonumber(f[1] or '0'), tonumber(f[2] or '0'), tonumber(f[3] or '0'))
redis.call('HSET', KEYS[1], 'lease_until', 0, 'error', 'canceled by an operator', 'error_code', 'canceled', 'error_file', '',
  'fenced_until', fenced_until)
set_state(KEYS[1], id, state, 'canceled', now, ARGV[4])
redis.call('ZREM', KEYS[2], id)
return {'ok'}
