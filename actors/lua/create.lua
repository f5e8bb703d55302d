-- Create a task once per idempotency key.
-- KEYS[1]  $prefix task:$id       the task hash
-- KEYS[2]  $prefix spec:$id       what the task asks for (JSON)
-- KEYS[3]  $prefix key:$key       (optional) idempotency index: key -> task id
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  now (seconds)
-- ARGV[4]  the spec JSON
-- ARGV[5..] field, value, ... of the new task hash
-- Returns {id, 1} when created, {existing id, 0} when the key was seen before.
local id = ARGV[2]
if KEYS[3] then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    return {existing, 0}
  end
  redis.call('SET', KEYS[3], id)
end
redis.call('SET', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
set_state(KEYS[1], id, false, 'queued', ARGV[3])
return {id, 1}
