-- Renew the lease (and record progress), for the holder of the current token only.
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix leases
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  fencing token
-- ARGV[4]  now (seconds)
-- ARGV[5]  lease length (seconds)
-- ARGV[6..8] (optional, '' for none) bytes done, bytes total (known so far), files done
-- ARGV[9]  (optional, '' for none) bytes a finalize has put in storage so far
-- ARGV[10..12] (optional) a download's files: the indexes finished in the order they finished,
--          the ones downloading ([[index, bytes done, bytes total, connections], ...] JSON),
--          and the connections open
-- Returns 1 when renewed, 0 when the token is stale or the task is no longer active.
-- A renewal never shortens a lease (one that lands after a longer grant must not cut it short).
local now, lease = tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('HMGET', KEYS[1], 'state', 'token', 'lease_until')
if t[2] ~= ARGV[3] or not is_active(t[1]) then
  return 0
end
local deadline = math.max(now + lease, tonumber(t[3] or '0'))
redis.call('HSET', KEYS[1], 'lease_until', deadline)
-- A download's figures only while it downloads: a tick read before the download ended may land
-- after advance.lua wrote its final figures, and must not write older ones over them.
local downloading = t[1] ~= 'finalizing'  -- claimed or downloading
if downloading and ARGV[8] and ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], 'bytes_done', ARGV[6], 'bytes_total', ARGV[7], 'files_done', ARGV[8], 'updated_at', now)
  set_staged(ARGV[2], tonumber(ARGV[6]))
end
if ARGV[9] and ARGV[9] ~= '' then
  redis.call('HSET', KEYS[1], 'bytes_stored', ARGV[9])
end
if downloading and ARGV[12] then
  redis.call('HSET', KEYS[1], 'finished', ARGV[10], 'active', ARGV[11], 'connections', ARGV[12])
end
redis.call('ZADD', KEYS[2], deadline, ARGV[2])
renew_slots(KEYS[1], ARGV[2], deadline)
if (downloading and ARGV[8] and ARGV[8] ~= '') or (ARGV[9] and ARGV[9] ~= '') then
  progress_event(KEYS[1], ARGV[2], now, false)
end
return 1
