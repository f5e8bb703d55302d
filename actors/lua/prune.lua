-- Delete a batch of ended tasks of one final state once their retention period is over: the
-- record, its spec, its record of unfinished uploads, its event stream, where its files were
-- stored, its list of webhook tries, its idempotency key while the key still names this task,
-- its staged bytes, its state entry and its entries in the search indexes
-- (actors/store_index.py). One call serves a batch, so a sweep removes thousands a second.
-- KEYS[1]  $prefix state:$state (a final state)
-- ARGV[1]  prefix
-- ARGV[2]  cutoff (seconds): a task must have ended before it
-- ARGV[3]  most records to delete
-- ARGV[4]  most entries to look at, kept ones included: a long run of them is crossed in
--          bounded steps (a call costs O(ARGV[4]) at most)
-- ARGV[5]  entries ended before the cutoff to pass over first: those the sweep's previous
--          batches kept (a hint only: each record is checked here whatever it says)
-- ARGV[6]  most hosts of a task in the host index: the first of its 'hosts' field, as create
--          indexed them (actors/store_index.py's MAX_INDEXED_HOSTS)
-- The index keys, built from the prefix: index:name, index:names (task id -> its member of
-- index:name) and index:host:$host.
-- Returns {entries passed over in all (ARGV[5] for the next batch), 1 when a bound was reached
-- and more may be left or 0, id, state, id, state, ...} of the deleted records.
-- A task whose task.failed or task.canceled is still owed is kept, whatever its age: the notice
-- needs the record, and is delivered or given up (actors/notify.py) before it goes. Kept
-- records gather at the head of the set (they outlive those that ended after them); passing
-- over them lets the records behind them go. An entry whose record is missing is dropped from
-- the final states' sets. Only final states go, whichever set lists the task.
local cutoff, limit, scan, skip = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local indexed_hosts = tonumber(ARGV[6])
local notify, staged = prefix .. 'notify', prefix .. 'staged'
local name_index, name_members = prefix .. 'index:name', prefix .. 'index:names'
local reply, looked, more = {0, 0}, 0, 0  -- reply[1], reply[2]: filled in at the end

-- Whether a record may go (every rule allows), and the keys to delete with it; false when it
-- is kept. The deletes of a chunk are then one DEL and one ZREM (one command each in the
-- append-only file, not one per record), and one ZREM per index set (see unindex).
local function prunable(id, keys, hosts)
  local task_key = prefix .. 'task:' .. id
  local t = redis.call('HMGET', task_key, 'state', 'updated_at', 'key', 'hosts')
  local state = t[1]
  if not state then
    for _, s in ipairs(FINAL_STATES) do
      redis.call('ZREM', prefix .. 'state:' .. s, id)
    end
    -- Its hosts are gone with the record: its host index entries stay until a backfill drops them
    local member = redis.call('HGET', name_members, id)
    if member then
      redis.call('ZREM', name_index, member)
      redis.call('HDEL', name_members, id)
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
  table.insert(keys, prefix .. 'deliveries:' .. id)
  table.insert(hosts, t[4] or '')
  redis.call('SREM', prefix .. 'uploading', id)
  if redis.call('HEXISTS', staged, id) == 1 then  -- done tasks' were dropped as they ended
    set_staged(id, 0)
  end
  if prefix .. 'state:' .. state ~= KEYS[1] then  -- a stray entry: the record says another state
    redis.call('ZREM', prefix .. 'state:' .. state, id)
  end
  return state
end

-- Take a chunk's records out of the search indexes: one ZREM and one HDEL for the names, one
-- ZREM per host set (`hosts`: each record's 'hosts' field, in the order of `gone`).
local function unindex(gone, hosts)
  local members = {}
  for _, member in ipairs(redis.call('HMGET', name_members, unpack(gone))) do
    if member then
      table.insert(members, member)
    end
  end
  if #members > 0 then
    redis.call('ZREM', name_index, unpack(members))
    redis.call('HDEL', name_members, unpack(gone))
  end
  local sets, by_set = {}, {}
  for i, id in ipairs(gone) do
    local n = 0
    for host in string.gmatch(hosts[i], '[^ ]+') do
      if n == indexed_hosts then
        break
      end
      n = n + 1
      local key = prefix .. 'index:host:' .. host
      if not by_set[key] then
        by_set[key] = {}
        table.insert(sets, key)
      end
      table.insert(by_set[key], id)
    end
  end
  for _, key in ipairs(sets) do
    redis.call('ZREM', key, unpack(by_set[key]))
  end
end

while more == 0 do
  local want = math.min(limit, scan - looked, 1000)  -- a chunk's DEL: 7 keys a record at most, within unpack()'s 8000
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', skip, want)
  local keys, gone, hosts = {}, {}, {}
  for _, id in ipairs(ids) do
    looked = looked + 1
    local state = prunable(id, keys, hosts)
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
    unindex(gone, hosts)
  end
  if #ids < want then
    break
  end
end
reply[1], reply[2] = skip, more
return reply
