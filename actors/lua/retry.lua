-- An operator gives a failed, dead or canceled task a fresh set of attempts.
-- KEYS[1]  $prefix task:$id
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  now (seconds)
-- Returns {'ok', run} | {'missing'} | {'not_ended', state}
local id, now = ARGV[2], tonumber(ARGV[3])
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return {'missing'}
end
if state ~= 'failed' and state ~= 'dead' and state ~= 'canceled' then
  return {'not_ended', state}
end
redis.call('HINCRBY', KEYS[1], 'token', 1)
local run = redis.call('HINCRBY', KEYS[1], 'run', 1)
set_state(KEYS[1], id, state, 'queued', now)
redis.call('HSET', KEYS[1], 'attempts', 0, 'error', '', 'not_before', 0, 'lease_until', 0)
redis.call('ZREM', prefix .. 'notify', id)
return {'ok', run}
