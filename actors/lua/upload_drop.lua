-- Forget upload records the supervisor aborted, while their task is still ended: a task an
-- operator retried meanwhile keeps its records, and a record a new run wrote since (another
-- value under the same file) is kept too.
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix uploads:$id
-- KEYS[3]  $prefix uploading
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3..] file index, record (JSON) pairs: the records whose uploads were aborted
-- Returns 1, or 0 when the task is live again (nothing forgotten).
local state = redis.call('HGET', KEYS[1], 'state')
if state and not is_final(state) then
  return 0
end
for i = 3, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[2])
end
return 1
