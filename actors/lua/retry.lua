-- An operator gives a failed, dead or canceled task a fresh set of attempts.
-- The new run has its own webhook ids (<task id>.<type>.<run>): nothing of it is announced yet
-- ('announcing' is cleared), and the notice the old run still owed is dropped (its chain of
-- notify messages finds nothing owed and stops); 'notify_tries' counts the next notice afresh.
-- KEYS[1]  $prefix task:$id
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  now (seconds)
-- ARGV[4]  who (a token's name, "cli"): on the task.retried event as 'by'
-- Returns {'ok', run} | {'missing'} | {'not_ended', state} | {'replaced', the task its key names}
-- A task whose idempotency key was given to a corrected request (create.lua, replace) stays
-- ended: retrying it would put two live tasks, old and new request, under one key.
local id, now = ARGV[2], tonumber(ARGV[3])
local t = redis.call('HMGET', KEYS[1], 'state', 'key')
local state = t[1]
if not state then
  return {'missing'}
end
if not is_retryable(state) then
  return {'not_ended', state}
end
if t[2] and t[2] ~= '' then
  local holder = redis.call('GET', prefix .. 'key:' .. t[2])
  if holder and holder ~= id then
    return {'replaced', holder}
  end
end
next_token(KEYS[1])
local run = redis.call('HINCRBY', KEYS[1], 'run', 1)
-- A canceled run's holder may write until its old lease deadline (cancel.lua): start after it.
local fenced_until = tonumber(redis.call('HGET', KEYS[1], 'fenced_until') or '0')
redis.call('HSET', KEYS[1], 'attempts', 0, 'error', '', 'error_code', '', 'error_file', '', 'lease_until', 0,
  'not_before', (fenced_until > now) and fenced_until or 0)
redis.call('HDEL', KEYS[1], 'announcing', 'announced_at', 'notify_tries', 'fenced_until', 'ev_at', 'ev_bytes', 'ev_files',
  'finished')
set_state(KEYS[1], id, state, 'queued', now, ARGV[4])
redis.call('ZREM', prefix .. 'notify', id)
return {'ok', run}
