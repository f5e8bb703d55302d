-- Take one try at delivering the notice a task owes (task.failed or task.canceled), for the
-- message the notice's chain is waiting for only: one chain of messages per notice.
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix notify     sorted set: owed notices, scored by when their next try is due
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  the chain's sequence number the message carries, or '' for the notice's first try
--          (sent as the task ended: a duplicate of it finds a try made and does nothing)
-- ARGV[4]  busy until (seconds): the due time while this try may be running, so the
--          supervisor does not take its message for lost meanwhile
-- Returns {'go', sequence number of this try, tries of this notice so far, run}
--       | {'skip', why}: not owed (delivered, given up, retried), not this chain's message, or
--         no task; a notice of a task that is gone or no longer ended is dropped.
-- Fields: notify_seq (grows across the task's life, so a message of an older chain or run
-- never matches again), notify_tries (tries of the current notice; retry.lua clears it).
local id = ARGV[2]
if not redis.call('ZSCORE', KEYS[2], id) then
  return {'skip', 'nothing owed'}
end
local t = redis.call('HMGET', KEYS[1], 'state', 'notify_seq', 'notify_tries', 'run')
if not t[1] or not is_retryable(t[1]) then
  redis.call('ZREM', KEYS[2], id)
  return {'skip', 'task ' .. (t[1] or 'missing')}
end
local seq, tries = tonumber(t[2] or '0'), tonumber(t[3] or '0')
if ARGV[3] == '' then
  if tries > 0 then
    return {'skip', 'first try already made'}
  end
elseif tonumber(ARGV[3]) ~= seq then
  return {'skip', 'message ' .. ARGV[3] .. ' of an old chain (now at ' .. seq .. ')'}
end
seq, tries = seq + 1, tries + 1
redis.call('HSET', KEYS[1], 'notify_seq', seq, 'notify_tries', tries)
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), id)
return {'go', seq, tries, t[4] or '0'}
