-- Shared helpers, prepended to every script by actors/store.py.
--
-- Keys built here from ARGV[1] (the prefix, "haul:" by default):
--   $prefix state:$state   sorted set, task id scored by the time it entered $state
--   $prefix leases         sorted set, task id scored by its lease deadline (seconds)
--   $prefix notify         sorted set, task id of a failed/dead task whose task.failed is owed

local prefix = ARGV[1]

local function is_final(state)
  return state == 'done' or state == 'failed' or state == 'dead' or state == 'canceled'
end

local function is_active(state)
  return state == 'claimed' or state == 'downloading' or state == 'finalizing'
end

-- Move task `id` from state `old` (false for a new task) to `new` at time `now`.
local function set_state(task_key, id, old, new, now)
  redis.call('HSET', task_key, 'state', new, 'updated_at', now)
  if old then
    redis.call('ZREM', prefix .. 'state:' .. old, id)
  end
  redis.call('ZADD', prefix .. 'state:' .. new, now, id)
  if new == 'failed' or new == 'dead' then
    redis.call('ZADD', prefix .. 'notify', now, id)
  end
end
