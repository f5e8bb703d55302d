-- Take a task for one run: the gate every duplicate message passes through.
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix leases
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  now (seconds)
-- ARGV[4]  lease length (seconds)
-- ARGV[5]  worker id
-- ARGV[6]  max attempts
-- Returns {'ok', token, attempts} | {'missing'} | {'final', state} | {'busy', lease_until}
--       | {'wait', not_before} | {'dead', attempts}
local id, now, lease, worker, max_attempts = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local t = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'not_before', 'attempts')
local state = t[1]
if not state then
  return {'missing'}
end
if is_final(state) then
  return {'final', state}
end
local attempts = tonumber(t[4] or '0')
if state == 'queued' then
  if tonumber(t[3] or '0') > now then
    return {'wait', t[3]}
  end
elseif is_active(state) then
  if tonumber(t[2] or '0') > now then
    return {'busy', t[2]}
  end
  -- The lease ran out: the run that held it is over and already counted.
  if attempts >= max_attempts then
    set_state(KEYS[1], id, state, 'dead', now)
    redis.call('HSET', KEYS[1], 'lease_until', 0,
      'error', 'lease expired during ' .. state .. ' (worker stopped or hung) and all ' .. max_attempts .. ' attempts are used')
    redis.call('ZREM', KEYS[2], id)
    return {'dead', attempts}
  end
end
local token = redis.call('HINCRBY', KEYS[1], 'token', 1)
attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
set_state(KEYS[1], id, state, 'claimed', now)
redis.call('HSET', KEYS[1], 'lease_until', now + lease, 'worker', worker, 'not_before', 0)
redis.call('ZADD', KEYS[2], now + lease, id)
return {'ok', token, attempts}
