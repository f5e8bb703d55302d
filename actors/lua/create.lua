-- Create a task once per idempotency key. The same key with the same request (the sha256 of its
-- canonical JSON, kept in the task hash as 'request_hash') returns the first task; a different
-- request is answered 'different' (the caller names the differing field from the stored spec).
-- With replace, a key whose task ended failed, dead or canceled moves to a new task (the old
-- record stays; prune.lua deletes a key only while it still names the pruned task).
-- A new task enters the search indexes (actors/store_index.py) in the same step.
-- KEYS[1]  $prefix task:$id       the task hash
-- KEYS[2]  $prefix spec:$id       what the task asks for (JSON)
-- KEYS[3]  $prefix index:name     sorted set: '<casefolded name>\0<id>', all scores 0
-- KEYS[4]  $prefix index:names    hash: task id -> its member of index:name (read by prune.lua)
-- KEYS[5..4+h]  $prefix index:host:$host  sorted sets: task ids by created_at, one per host
--                                  indexed (h: ARGV[10])
-- KEYS[5+h]  the claim queue       (with a message, ARGV[7]) Dramatiq's list of message ids
-- KEYS[6+h]  its message bodies    (with a message) Dramatiq's hash: message id -> body
-- KEYS[n]  $prefix key:$key       (last, optional) idempotency index: key -> task id
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  now (seconds)
-- ARGV[4]  the spec JSON
-- ARGV[5]  the request hash
-- ARGV[6]  '1' to replace an ended (failed, dead, canceled) task under the key, else '0'
-- ARGV[7]  the claim message's id in the queue ('' when the caller sends the message apart)
-- ARGV[8]  the claim message's body
-- ARGV[9]  the task's member of index:name ('' when its name is not indexed)
-- ARGV[10] h, how many host index keys follow KEYS[4]
-- ARGV[11..] field, value, ... of the new task hash
-- Returns {id, 'created'} (its claim message queued when one was given) | {existing id, 'same'}
--       | {existing id, 'different'}
--       | {existing id, 'not_replaceable', its state} (replace asked for a task not failed/dead/canceled)
local id = ARGV[2]
-- The same call again (a client library resending it after a lost reply) must not reset a task
-- a worker may already be running: the id is new to every call but a resent one.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {id, 'created'}
end
local hosts = tonumber(ARGV[10])
local with_message = ARGV[7] ~= ''
local queue, bodies = KEYS[5 + hosts], KEYS[6 + hosts]
local key_index = KEYS[(with_message and 7 or 5) + hosts]
if key_index then
  local existing = redis.call('GET', key_index)
  if existing then
    local t = redis.call('HMGET', prefix .. 'task:' .. existing, 'state', 'request_hash')
    if t[1] then  -- a key naming a record that is gone is free again
      -- The same request again is answered with its task, replace or not: a backend retrying
      -- a replace whose answer it lost gets the task that replace made, not a third one.
      if t[2] == ARGV[5] then
        return {existing, 'same'}
      end
      if ARGV[6] ~= '1' then
        return {existing, 'different'}
      end
      if not is_retryable(t[1]) then
        return {existing, 'not_replaceable', t[1]}
      end
    end
  end
  redis.call('SET', key_index, id)
end
redis.call('SET', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 11))
set_state(KEYS[1], id, false, 'queued', ARGV[3])
if ARGV[9] ~= '' then
  redis.call('ZADD', KEYS[3], 0, ARGV[9])
  redis.call('HSET', KEYS[4], id, ARGV[9])
end
for i = 5, 4 + hosts do
  redis.call('ZADD', KEYS[i], ARGV[3], id)
end
if with_message then  -- as Dramatiq's RedisBroker enqueues: body first, then the id on the list
  redis.call('HSET', bodies, ARGV[7], ARGV[8])
  redis.call('RPUSH', queue, ARGV[7])
end
return {id, 'created'}
