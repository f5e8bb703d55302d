-- Take back a task whose lease ran out (worker killed, host gone, thread hung).
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix leases
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  now (seconds)
-- ARGV[4]  max attempts
-- Returns {'queued', attempts} | {'dead', attempts} | {'skip', state}
-- The token moves on either way, so the old holder's late writes are refused.
-- A task whose completion is being announced ('announcing' equals the current run, see
-- announce.lua) always goes back to queued, never dead, whatever its attempts: the receiver
-- may already hold task.completed, and dead would send task.failed for the same run. The
-- successor finds its files staged, re-delivers task.completed under the same webhook-id and
-- marks it done.
local id, now, max_attempts = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'attempts', 'worker')
local state = t[1]
if not state or not is_active(state) then
  redis.call('ZREM', KEYS[2], id)  -- a leftover entry: nothing holds a lease
  return {'skip', state or ''}
end
if tonumber(t[2] or '0') > now then
  return {'skip', state}  -- renewed since it was listed
end
if redis.call('HGET', KEYS[1], 'resting') then
  redis.call('ZREM', KEYS[2], id)  -- resting: its message holds it, not a lease
  return {'skip', state}
end
local attempts = tonumber(t[3] or '0')
local reason = 'lease expired during ' .. state .. ' on worker ' .. (t[4] or '?') .. ' (stopped, killed or hung)'
next_token(KEYS[1])
redis.call('ZREM', KEYS[2], id)
free_slots(KEYS[1], id)
if attempts >= max_attempts and not announcing(KEYS[1]) then
  redis.call('HSET', KEYS[1], 'lease_until', 0, 'error', reason .. '; all ' .. max_attempts .. ' attempts are used',
    'error_code', 'lease_expired', 'error_file', '')
  set_state(KEYS[1], id, state, 'dead', now)
  return {'dead', attempts}
end
if announcing(KEYS[1]) then
  reason = reason .. ' while task.completed was being announced; queued to announce it again'
end
redis.call('HSET', KEYS[1], 'lease_until', 0, 'not_before', 0, 'error', reason, 'error_code', 'lease_expired',
  'error_file', '')
set_state(KEYS[1], id, state, 'queued', now)
-- Until the supervisor confirms its claim message went out (a lost connection in between
-- would leave the task without one until the orphan rescue, minutes later).
redis.call('ZADD', prefix .. 'outbox:claim', now, id)
return {'queued', attempts}
