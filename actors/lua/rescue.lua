-- Find queued tasks that have waited suspiciously long (their message may be lost) and mark
-- them as re-sent, so each is re-sent at most once per grace period.
-- KEYS[1]  $prefix state:queued
-- ARGV[1]  prefix
-- ARGV[2]  now (seconds)
-- ARGV[3]  grace (seconds): how long a queued task may wait past its not-before time
-- ARGV[4]  most tasks to return
-- Returns the ids to send a claim message for.
local now, grace = tonumber(ARGV[2]), tonumber(ARGV[3])
local found = {}
local candidates = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - grace, 'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(candidates) do
  local not_before = tonumber(redis.call('HGET', prefix .. 'task:' .. id, 'not_before') or '0')
  if not_before + grace <= now then
    table.insert(found, id)
  end
  -- Either way, look again only after another grace period.
  redis.call('ZADD', KEYS[1], now, id)
end
return found
