-- Take a finalize slot for the holder of the current token, or say the stage is full.
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix leases
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  fencing token
-- ARGV[4]  now (seconds)
-- ARGV[5]  lease length (seconds)
-- ARGV[6]  finalize slots (0: no limit)
-- Returns {'ok', new token} | {'full'} | {'stale', state}. The lease is renewed either way, so
-- a task waiting for a slot keeps its place (and its files) without holding a worker thread.
-- The run that enters gets a token of its own: a duplicate of the same finalize message (Dramatiq
-- delivers at least once) carries the old one and is refused, so two runs never share a token.
local id, now, lease, limit = ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('HMGET', KEYS[1], 'state', 'token')
if t[2] ~= ARGV[3] or t[1] ~= 'finalizing' then
  return {'stale', t[1] or ''}
end
redis.call('HSET', KEYS[1], 'lease_until', now + lease)
redis.call('ZADD', KEYS[2], now + lease, id)
if not take_finalize_slot(KEYS[1], id, limit, now, now + lease) then
  return {'full'}
end
return {'ok', next_token(KEYS[1])}
