-- Take a finalize slot for the holder of the current token, or rest until one is free.
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix leases
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  fencing token (the one the finalize message carries)
-- ARGV[4]  now (seconds)
-- ARGV[5]  lease length (seconds)
-- ARGV[6]  finalize slots (0: no limit)
-- ARGV[7]  when the next message is due if the stage is full (seconds)
-- ARGV[8]  since when storage or the receiver has been failing (0: it is not)
-- Returns {'ok', new token} | {'full', new token} | {'stale', state}.
-- Either way the message's token is used up, so a duplicate of the same message (Dramatiq
-- delivers at least once) is refused: one run, or one chain of messages, per token. 'full'
-- leaves the task resting (rest() in _lib.lua: no lease, no thread held) for the next message.
local id, now, lease, limit = ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('HMGET', KEYS[1], 'state', 'token')
if t[2] ~= ARGV[3] or t[1] ~= 'finalizing' then
  return {'stale', t[1] or ''}
end
stop_resting(KEYS[1], id)
if not take_finalize_slot(KEYS[1], id, limit, now, now + lease) then
  -- A task parked for an outage stays parked (out of the backlog) while it waits for a slot.
  local why = (tonumber(ARGV[8]) > 0) and 'outage' or 'slot'
  return {'full', rest(KEYS[1], id, now, tonumber(ARGV[7]), why, ARGV[8])}
end
redis.call('HSET', KEYS[1], 'lease_until', now + lease)
redis.call('ZADD', KEYS[2], now + lease, id)
return {'ok', next_token(KEYS[1])}
