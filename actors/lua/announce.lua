-- Mark the start of the task.completed announcement, for the holder of the current token only.
-- Called right before the first delivery attempt of task.completed, after storage committed.
-- From here on the completion wins over a cancel (cancel.lua refuses while 'announcing' equals
-- the current run), and an expired lease sends the task back to queued however many attempts
-- it used (requeue.lua, claim.lua), so a successor re-delivers the same webhook-id and marks it
-- done: the backend never hears task.completed and then task.failed or task.canceled for one run.
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix leases
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  fencing token
-- ARGV[4]  now (seconds)
-- ARGV[5]  lease length (seconds): the delivery gets a whole lease
-- Returns {'ok', first announcement time of this run} | {'stale', current state or ''} (token
-- moved on: canceled, or taken over). The event's timestamp is that time on every delivery,
-- so a webhook-id always comes with the same body.
local id, now, lease = ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('HMGET', KEYS[1], 'state', 'token', 'run')
if t[2] ~= ARGV[3] or t[1] ~= 'finalizing' then
  return {'stale', t[1] or ''}
end
local run = t[3] or '0'
if not announcing(KEYS[1]) then
  redis.call('HSET', KEYS[1], 'announcing', run)
  redis.call('HDEL', KEYS[1], 'announced_at')
end
redis.call('HSETNX', KEYS[1], 'announced_at', ARGV[4])  -- (also for a run announced without one)
redis.call('HSET', KEYS[1], 'lease_until', now + lease)
redis.call('ZADD', KEYS[2], now + lease, id)
renew_slots(KEYS[1], id, now + lease)
return {'ok', redis.call('HGET', KEYS[1], 'announced_at')}
