-- End the current run of a task, for the holder of its current token only.
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix leases
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  fencing token
-- ARGV[4]  target: queued (retry later) | done | failed | dead
-- ARGV[5]  now (seconds)
-- ARGV[6]  error text ('' for none)
-- ARGV[7]  not before (seconds; for queued)
-- ARGV[8]  max attempts (queued becomes dead once they are used)
-- ARGV[9]  '1' to give the attempt back (a graceful stop handed the task over; not its fault)
-- ARGV[10] (optional) error code, machine-readable ('' for none): see actors/errors.py
-- ARGV[11] (optional) the path of the file the error is about ('' for none)
-- ARGV[12] (optional) appended to the error when a run ending 'queued' stays queued
-- ARGV[13] (optional) appended to the error when it turns 'dead' instead (attempts used)
-- ARGV[14] (optional, for done) where each file was stored, JSON (status's files show it)
-- Returns {'ok', state reached} | {'stale', current state or ''}
-- A run whose completion is being announced (announcing(), see announce.lua) that ends in
-- 'queued' stays queued whatever its attempts: dead would send task.failed for a run whose
-- task.completed the receiver may hold.
local id, target, now = ARGV[2], ARGV[4], tonumber(ARGV[5])
if target ~= 'queued' and target ~= 'done' and target ~= 'failed' and target ~= 'dead' then
  return redis.error_reply('release: a run cannot end ' .. target)
end
local t = redis.call('HMGET', KEYS[1], 'state', 'token', 'attempts')
if t[2] ~= ARGV[3] or not is_active(t[1]) then
  return {'stale', t[1] or ''}
end
if target == 'done' and t[1] ~= 'finalizing' then
  return redis.error_reply('release: a ' .. t[1] .. ' task cannot be done before it is finalized')
end
if target == 'queued' and ARGV[9] == '1' then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
elseif target == 'queued' and tonumber(t[3] or '0') >= tonumber(ARGV[8]) and not announcing(KEYS[1]) then
  target = 'dead'
end
free_slots(KEYS[1], id)
if target == 'done' then
  set_staged(id, 0)  -- the sandbox is removed right after
  redis.call('HSET', KEYS[1], 'bytes_stored', redis.call('HGET', KEYS[1], 'bytes_done') or 0)  -- all of it
  if ARGV[14] and ARGV[14] ~= '' then  -- a key of its own: a long value would unpack the hash
    redis.call('SET', prefix .. 'stored:' .. id, ARGV[14])
  end
end
local error = ARGV[6]
if ARGV[4] == 'queued' then  -- the note follows what happened, not what the caller guessed
  error = error .. (((target == 'dead') and ARGV[13] or ARGV[12]) or '')
end
redis.call('HSET', KEYS[1], 'lease_until', 0, 'error', error, 'not_before', (target == 'queued') and ARGV[7] or 0,
  'error_code', ARGV[10] or '', 'error_file', ARGV[11] or '')
set_state(KEYS[1], id, t[1], target, now)
redis.call('ZREM', KEYS[2], id)
return {'ok', target}
