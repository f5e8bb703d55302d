-- Park a finalizing task while its storage or its webhook receiver is down, for the holder of
-- the current token only: no lease while it waits (rest() in _lib.lua), so a pause of an hour,
-- or a message that waits behind long downloads, never expires it and never uses up a download
-- attempt; and it does not count toward the finalize backlog that pauses claims.
-- KEYS[1]  $prefix task:$id
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  fencing token
-- ARGV[4]  now (seconds)
-- ARGV[5]  when the next try is due (seconds)
-- ARGV[6]  since when storage or the receiver has been failing (seconds)
-- ARGV[7]  the error, for `haul status`
-- Returns {'ok', new token for the next finalize message} | {'stale', state}
local id, now = ARGV[2], tonumber(ARGV[4])
local t = redis.call('HMGET', KEYS[1], 'state', 'token')
if t[2] ~= ARGV[3] or t[1] ~= 'finalizing' then
  return {'stale', t[1] or ''}
end
redis.call('HSET', KEYS[1], 'error', ARGV[7])
return {'ok', rest(KEYS[1], id, now, tonumber(ARGV[5]), 'outage', ARGV[6])}
