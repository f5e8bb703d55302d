-- Move a task between active states, for the holder of its current token only.
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix leases
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  fencing token
-- ARGV[4]  expected current state
-- ARGV[5]  new state (active)
-- ARGV[6]  now (seconds)
-- ARGV[7]  lease length (seconds)
-- ARGV[8]  finalize slots (0: no limit), when the new state is 'finalizing'
-- ARGV[9..11] (optional) bytes done, bytes total, files done: progress written in the same step
-- ARGV[12] (optional, with them) the indexes of the files finished, in the order they finished
-- Returns {'ok'} | {'full', new token} (now finalizing, resting until a finalize slot is free:
-- see rest() in _lib.lua; the next finalize message carries the new token)
--       | {'stale', current state or ''}
local id, now, lease = ARGV[2], tonumber(ARGV[6]), tonumber(ARGV[7])
if not ((ARGV[4] == 'claimed' and ARGV[5] == 'downloading') or (ARGV[4] == 'downloading' and ARGV[5] == 'finalizing')) then
  return redis.error_reply('advance: ' .. ARGV[4] .. ' -> ' .. ARGV[5] .. ' is not a step of a run')
end
local t = redis.call('HMGET', KEYS[1], 'state', 'token')
if t[2] ~= ARGV[3] or t[1] ~= ARGV[4] then
  return {'stale', t[1] or ''}
end
if ARGV[5] == 'finalizing' then
  free_slots(KEYS[1], id)  -- the download stage is over
end
redis.call('HSET', KEYS[1], 'lease_until', now + lease)
if ARGV[11] then
  redis.call('HSET', KEYS[1], 'bytes_done', ARGV[9], 'bytes_total', ARGV[10], 'files_done', ARGV[11])
  if ARGV[12] then
    redis.call('HSET', KEYS[1], 'finished', ARGV[12])
  end
  set_staged(id, tonumber(ARGV[9]))
  progress_event(KEYS[1], id, now, true)  -- the last file's, and the figures the download ended with
end
set_state(KEYS[1], id, t[1], ARGV[5], now)
renew_slots(KEYS[1], id, now + lease)
redis.call('ZADD', KEYS[2], now + lease, id)
if ARGV[5] == 'finalizing' and not take_finalize_slot(KEYS[1], id, tonumber(ARGV[8]), now, now + lease) then
  return {'full', rest(KEYS[1], id, now, now, 'slot', 0)}
end
return {'ok'}
