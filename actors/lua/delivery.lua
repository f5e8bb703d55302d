-- Record one webhook try on its task's list, if the task is still stored (a try that ends after
-- prune removed the task must not leave a list that nothing deletes).
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix deliveries:$id   list: the latest tries, newest first
-- ARGV[1]  prefix
-- ARGV[2]  the try, as compact JSON
-- ARGV[3]  how many tries the list keeps
-- Returns 1 when recorded, 0 when the task is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
return 1
