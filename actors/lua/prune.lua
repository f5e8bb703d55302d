-- Delete one ended task's record once its retention period is over.
-- KEYS[1]  $prefix task:$id
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  cutoff (seconds): the task must have ended before it
-- Returns the state of the deleted task, or '' when it was kept.
-- A task whose task.failed or task.canceled is still owed is kept, whatever its age: the notice
-- needs the record, and is delivered or given up (actors/notify.py) before it goes.
local id, cutoff = ARGV[2], tonumber(ARGV[3])
local t = redis.call('HMGET', KEYS[1], 'state', 'updated_at', 'key')
local state = t[1]
if not state then
  for _, s in ipairs({'done', 'failed', 'dead', 'canceled'}) do
    redis.call('ZREM', prefix .. 'state:' .. s, id)
  end
  return ''
end
if not is_final(state) or tonumber(t[2] or '0') >= cutoff or redis.call('ZSCORE', prefix .. 'notify', id) then
  return ''
end
if t[3] and t[3] ~= '' and redis.call('GET', prefix .. 'key:' .. t[3]) == id then
  redis.call('DEL', prefix .. 'key:' .. t[3])
end
redis.call('DEL', KEYS[1], prefix .. 'spec:' .. id)
set_staged(id, 0)
redis.call('ZREM', prefix .. 'state:' .. state, id)
return state
