-- Find resting finalizing tasks whose finalize message is overdue (lost: a Redis that lost it,
-- a worker killed while holding it in its delay queue) and mark them as re-sent, so each is
-- re-sent at most once per grace period.
-- KEYS[1]  $prefix resting
-- ARGV[1]  prefix
-- ARGV[2]  now (seconds)
-- ARGV[3]  grace (seconds): how long past its due time a message may be late
-- ARGV[4]  most tasks to return
-- Returns a flat list: task id, token, failing since, ... for each message to send again.
local now, grace = tonumber(ARGV[2]), tonumber(ARGV[3])
local found = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - grace, 'LIMIT', 0, tonumber(ARGV[4]))) do
  local t = redis.call('HMGET', prefix .. 'task:' .. id, 'state', 'token', 'failing_since', 'resting')
  if t[1] == 'finalizing' and t[4] then
    table.insert(found, id)
    table.insert(found, t[2])
    table.insert(found, t[3] or '0')
    redis.call('ZADD', KEYS[1], now, id)
    if t[4] == 'outage' then
      redis.call('ZADD', prefix .. 'parked', now, id)
    end
  else
    redis.call('ZREM', KEYS[1], id)  -- a leftover: the task is no longer resting
    redis.call('ZREM', prefix .. 'parked', id)
  end
end
return found
