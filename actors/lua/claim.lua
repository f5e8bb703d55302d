-- Take a task for one run: the gate every duplicate message passes through.
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix leases
-- KEYS[3]  $prefix spec:$id
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  now (seconds)
-- ARGV[4]  lease length (seconds)
-- ARGV[5]  worker id
-- ARGV[6]  max attempts
-- ARGV[7]  download slots in all (0: no limit)
-- ARGV[8]  download slots per origin host (0: no limit)
-- ARGV[9]  staging byte budget (0: none): past it, only tasks with bytes staged already start
-- ARGV[10] finalize backlog (0: none): with this many tasks finalizing, claims pause
-- ARGV[11] state to enter at once ('claimed' or 'downloading': a worker that starts the
--          download in the same thread saves a round trip)
-- ARGV[12] longest pause (seconds) before a message chain told 'full' asks again
-- Returns {'ok', token, attempts, spec JSON, HGETALL of the task} | {'missing'} | {'final', state}
--       | {'busy', lease_until or when a resting task's message is due} | {'wait', not_before}
--       | {'dead', attempts} | {'full', reason, what is full, waiting since}
-- A 'full' claim leaves the task queued, to be offered again by the message chain that asked:
-- it records that the chain is alive (the queued score becomes the latest time its next claim
-- is due, so the supervisor's orphan rescue sends no second one), since when the task waits,
-- and why (stats:refused).
local id, now, lease, worker, max_attempts = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local t = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'not_before', 'attempts')
local state = t[1]
local ended = not_live(state)
if ended then
  return ended
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
  if redis.call('HGET', KEYS[1], 'resting') then  -- a stray duplicate: its finalize message holds it
    return {'busy', redis.call('ZSCORE', prefix .. 'resting', id) or '0'}
  end
  -- The lease ran out: the run that held it is over and already counted. It ends dead once
  -- its attempts are used, unless its completion is being announced ('announcing' equals the
  -- current run, see announce.lua): the receiver may hold task.completed already, so this
  -- claim goes on and re-delivers it under the same webhook-id instead of sending task.failed.
  if attempts >= max_attempts and not announcing(KEYS[1]) then
    redis.call('HSET', KEYS[1], 'lease_until', 0,
      'error', 'lease expired during ' .. state .. ' (worker stopped or hung) and all ' .. max_attempts .. ' attempts are used',
      'error_code', 'lease_expired', 'error_file', '')
    set_state(KEYS[1], id, state, 'dead', now)
    redis.call('ZREM', KEYS[2], id)
    return {'dead', attempts}
  end
end
local download_limit, host_limit = tonumber(ARGV[7]), tonumber(ARGV[8])
local staging_max, backlog = tonumber(ARGV[9]), tonumber(ARGV[10])
local wanted = {}
if download_limit > 0 then
  table.insert(wanted, {prefix .. 'slots:download', download_limit, 'download'})
end
if host_limit > 0 then
  for host in string.gmatch(redis.call('HGET', KEYS[1], 'hosts') or '', '[^ ]+') do
    table.insert(wanted, {prefix .. 'slots:host:' .. host, host_limit, 'download_per_host', host})
  end
end
local function full(reason, what, host)
  redis.call('HINCRBY', prefix .. 'stats:refused', reason, 1)
  if state ~= 'queued' then  -- a duplicate claim of a run whose lease ran out: the sweep requeues it
    return {'full', reason, what, now}
  end
  redis.call('HSETNX', KEYS[1], 'waiting_since', now)
  -- The limit it waits behind, for haul status: the reason, and the host for a per-host slot.
  redis.call('HSET', KEYS[1], 'waiting_on', reason, 'waiting_host', host or '')
  redis.call('ZADD', prefix .. 'state:queued', 'XX', now + tonumber(ARGV[12]), id)
  return {'full', reason, what, redis.call('HGET', KEYS[1], 'waiting_since')}
end
for _, slot in ipairs(wanted) do
  if not slot_free(slot[1], id, slot[2], now) then
    return full(slot[3], slot[1]:sub(#prefix + 1), slot[4])
  end
end
if staging_max > 0 and not redis.call('HGET', prefix .. 'staged', id)
    and tonumber(redis.call('GET', prefix .. 'staged:total') or '0') >= staging_max then
  return full('staging_bytes', 'staging byte budget')
end
-- Tasks parked while their storage or receiver is down use no finalize capacity: not counted.
if backlog > 0 and redis.call('ZCARD', prefix .. 'state:finalizing') - redis.call('ZCARD', prefix .. 'parked') >= backlog then
  return full('finalize_backlog', 'finalize backlog')
end
local held = {}
for _, slot in ipairs(wanted) do
  redis.call('ZADD', slot[1], now + lease, id)
  redis.call('SADD', prefix .. 'slotkeys', slot[1])
  table.insert(held, slot[1])
end
redis.call('HSET', KEYS[1], 'slots', table.concat(held, ' '))
local token = next_token(KEYS[1])
attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'lease_until', now + lease, 'worker', worker, 'not_before', 0)
redis.call('HDEL', KEYS[1], 'waiting_since', 'waiting_on', 'waiting_host')
set_state(KEYS[1], id, state, ARGV[11], now)
redis.call('ZADD', KEYS[2], now + lease, id)
return {'ok', token, attempts, redis.call('GET', KEYS[3]) or '', redis.call('HGETALL', KEYS[1])}
