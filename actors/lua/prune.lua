-- Delete a batch of ended tasks of one final state once their retention period is over: the
-- record, its spec, its record of unfinished uploads, its event stream, its idempotency key while the key still
-- names this task, its staged bytes and its state entry. One call serves a batch, so a sweep
-- removes thousands a second.
-- KEYS[1]  $prefix state:$state (a final state)
-- ARGV[1]  prefix
-- ARGV[2]  cutoff (seconds): a task must have ended before it
-- ARGV[3]  most records to delete
-- ARGV[4]  most entries to look at, kept ones included: a long run of them is crossed in
--          bounded steps (a call costs O(ARGV[4]) at most)
-- ARGV[5]  entries ended before the cutoff to pass over first: those the sweep's previous
--          batches kept (a hint only: each record is checked here whatever it says)
-- Returns {entries passed over in all (ARGV[5] for the next batch), 1 when a bound was reached
-- and more may be left or 0, id, state, id, state, ...} of the deleted records.
-- A task whose task.failed or task.canceled is still owed is kept, whatever its age: the notice
-- needs the record, and is delivered or given up (actors/notify.py) before it goes. Kept
-- records gather at the head of the set (they outlive those that ended after them); passing
-- over them lets the records behind them go. An entry whose record is missing is dropped from
-- the final states' sets. Only final states go, whichever set lists the task.
local cutoff, limit, scan, skip = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local notify, staged = prefix .. 'notify', prefix .. 'staged'
local reply, looked, more = {0, 0}, 0, 0  -- reply[1], reply[2]: filled in at the end

-- Whether a record may go (every rule allows), and the keys to delete with it; false when it
-- is kept. The deletes of a chunk are then one DEL and one ZREM (one command each in the
-- append-only file, not one per record).
local function prunable(id, keys)
  local task_key = prefix .. 'task:' .. id
  local t = redis.call('HMGET', task_key, 'state', 'updated_at', 'key')
  local state = t[1]
  if not state then
    for _, s in ipairs(FINAL_STATES) do
      redis.call('ZREM', prefix .. 'state:' .. s, id)
    end
    return false
  end
  if not is_final(state) or tonumber(t[2] or '0') >= cutoff or redis.call('ZSCORE', notify, id) then
    skip = skip + 1
    return false
  end
  if t[3] and t[3] ~= '' and redis.call('GET', prefix .. 'key:' .. t[3]) == id then
    table.insert(keys, prefix .. 'key:' .. t[3])
  end
  table.insert(keys, task_key)
  table.insert(keys, prefix .. 'spec:' .. id)
  table.insert(keys, prefix .. 'uploads:' .. id)
  table.insert(keys, prefix .. 'events:' .. id)
  table.insert(keys, prefix .. 'stored:' .. id)
  redis.call('SREM', prefix .. 'uploading', id)
  if redis.call('HEXISTS', staged, id) == 1 then  -- done tasks' were dropped as they ended
    set_staged(id, 0)
  end
  if prefix .. 'state:' .. state ~= KEYS[1] then  -- a stray entry: the record says another state
    redis.call('ZREM', prefix .. 'state:' .. state, id)
  end
  return state
end

while more == 0 do
  local want = math.min(limit, scan - looked, 1000)  -- a chunk's DEL stays well within unpack()'s reach
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', skip, want)
  local keys, gone = {}, {}
  for _, id in ipairs(ids) do
    looked = looked + 1
    local state = prunable(id, keys)
    if state then
      table.insert(gone, id)
      table.insert(reply, id)
      table.insert(reply, state)
    end
    if #reply - 2 >= 2 * limit or looked >= scan then
      more = 1
      break
    end
  end
  if #gone > 0 then  -- before the next chunk is read: its offset counts kept entries only
    redis.call('DEL', unpack(keys))
    redis.call('ZREM', KEYS[1], unpack(gone))
  end
  if #ids < want then
    break
  end
end
reply[1], reply[2] = skip, more
return reply
