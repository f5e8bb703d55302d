-- Shared helpers, prepended to every script by actors/store.py.
--
-- Keys built here from ARGV[1] (the prefix, "haul:" by default):
--   $prefix state:$state   sorted set, task id scored by the time it entered $state
--   $prefix leases         sorted set, task id scored by its lease deadline (seconds)
--   $prefix notify         sorted set, task id of a failed/dead/canceled task whose notice is owed,
--                          scored by when its next try is due (actors/notify.py)
--   $prefix slots:download, $prefix slots:host:$host, $prefix slots:finalize
--                          sorted sets, task id scored by the lease deadline of the task holding
--                          a slot: a slot whose lease ran out is free again (a dead worker's too)
--   $prefix staged         hash, task id -> bytes its sandbox holds; $prefix staged:total their sum
--   $prefix slotkeys       set: the name of every slot sorted set in use (read by /metrics, no scan)
--   $prefix resting        sorted set: 'finalizing' tasks between runs (waiting for a finalize slot
--                          or parked while storage or their receiver is down), scored by when their
--                          finalize message is due; they hold no lease (see rest())
--   $prefix parked         sorted set: those of them parked for an outage, which do not count
--                          toward the finalize backlog that pauses claims
--   $prefix outbox:claim   sorted set: tasks the supervisor queued again whose claim message may not
--                          be sent yet, by when they were queued (supervisor/sweeps.py)
--   $prefix stats:dead     counter: transitions into 'dead' ever (haul_dead_tasks_total)
--   $prefix stats:refused  hash: claims answered 'full', by reason (haul_claims_refused_total)
--   $prefix stats:minute:$minute  hash: tasks that became done, failed or dead in that minute
--                          (since the epoch), by state; the lease keepers add '<stage>:bytes' to it
--                          (actors/store_figures.py); it expires MINUTE_TTL seconds after its last write
--   $prefix events         stream: every task's events, trimmed to about events_retain entries
--   $prefix events:$id     stream: one task's events, never trimmed (its latest task.progress
--                          replaces the one before it); pruned with the task (actors/events.py)
--   $prefix deliveries:$id list: one task's latest webhook tries, newest first, written through
--                          delivery.lua while the task is stored (actors/store_deliveries.py);
--                          pruned with the task
--   $prefix index:name, index:names, index:host:$host  the search indexes (actors/store_index.py):
--                          written by create.lua, removed by prune.lua
--   $prefix config         hash: events_retain (written by the supervisor at start from
--                          HAUL_EVENTS_RETAIN)

local prefix = ARGV[1]

-- The state sets of actors/states.py (tests/test_states.py checks they are the same).
local FINAL_STATES = {'done', 'failed', 'dead', 'canceled'}
local ACTIVE_STATES = {'claimed', 'downloading', 'finalizing'}
local RETRYABLE_STATES = {'failed', 'dead', 'canceled'}

local function member(list, value)
  for _, item in ipairs(list) do
    if item == value then
      return true
    end
  end
  return false
end

local function is_final(state)
  return member(FINAL_STATES, state)
end

local function is_active(state)
  return member(ACTIVE_STATES, state)
end

-- The reply of a script that acts on live tasks only: {'missing'} when the record is gone,
-- {'final', state} when the task ended, nil when it is live.
local function not_live(state)
  if not state then
    return {'missing'}
  end
  if is_final(state) then
    return {'final', state}
  end
  return nil
end

-- Ended other than done: owes task.failed or task.canceled, an operator may retry it, and a new
-- request may replace it under its key.
local function is_retryable(state)
  return member(RETRYABLE_STATES, state)
end

-- Whether the current run's task.completed is being delivered (announce.lua): from then on the
-- receiver may hold it, so the task ends done, never dead, failed by a lost lease, or canceled.
local function announcing(task_key)
  local t = redis.call('HMGET', task_key, 'announcing', 'run')
  return t[1] ~= false and t[1] == (t[2] or '0')
end

-- Move the task's fencing token on and return the new one. Tokens are the Redis server's clock
-- in microseconds (or the last token + 1, if that is larger), not a bare counter: a counter in
-- Redis goes back with the data when Redis restarts from an older append-only file or snapshot,
-- or a replica that had not caught up is promoted, and would hand a live holder's token to a
-- second worker. The clock has moved past every token issued before the restart, so a token
-- never repeats unless the server's clock steps back by more than the restart took.
local function next_token(task_key)
  local clock = redis.call('TIME')
  local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
  local token = math.max(tonumber(redis.call('HGET', task_key, 'token') or '0') + 1, now_us)
  local text = string.format('%d', token)
  redis.call('HSET', task_key, 'token', text)
  return text
end

-- Drop one slot member; the set leaves slotkeys once empty (as small as the hosts in use).
local function free_slot(key, member)
  redis.call('ZREM', key, member)
  if redis.call('ZCARD', key) == 0 then
    redis.call('SREM', prefix .. 'slotkeys', key)
  end
end

-- Drop the slots a task holds (listed in its 'slots' field: one per set, named by the task)
-- and the connections its run took beside them ('conns': 'set|member' entries, connection.lua).
local function free_slots(task_key, id)
  local held = redis.call('HMGET', task_key, 'slots', 'conns')
  for key in string.gmatch(held[1] or '', '[^ ]+') do
    free_slot(key, id)
  end
  for key, member in string.gmatch(held[2] or '', '([^ |]+)|([^ ]+)') do
    free_slot(key, member)
  end
  redis.call('HSET', task_key, 'slots', '', 'conns', '')
end

-- Move every slot the task holds, and every connection beside them, to the new lease deadline.
local function renew_slots(task_key, id, deadline)
  local held = redis.call('HMGET', task_key, 'slots', 'conns')
  for key in string.gmatch(held[1] or '', '[^ ]+') do
    redis.call('ZADD', key, 'XX', deadline, id)
  end
  for key, member in string.gmatch(held[2] or '', '([^ |]+)|([^ ]+)') do
    redis.call('ZADD', key, 'XX', deadline, member)
  end
end

-- A 'finalizing' task stops resting (its message arrived, or it left the state).
local function stop_resting(task_key, id)
  redis.call('ZREM', prefix .. 'resting', id)
  redis.call('ZREM', prefix .. 'parked', id)
  redis.call('HDEL', task_key, 'resting')
end

-- Take one slot in `key` unless `limit` (0: none) slots are held by live leases.
local function slot_free(key, id, limit, now)
  if limit <= 0 then
    return true
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZSCORE', key, id) or redis.call('ZCARD', key) < limit
end

-- Take the finalize slot (limit 0: none) for a task in 'finalizing'; false when the stage is full.
local function take_finalize_slot(task_key, id, limit, now, deadline)
  local key = prefix .. 'slots:finalize'
  if limit <= 0 then
    return true
  end
  if not slot_free(key, id, limit, now) then
    return false
  end
  redis.call('ZADD', key, deadline, id)
  redis.call('SADD', prefix .. 'slotkeys', key)
  redis.call('HSET', task_key, 'slots', key)
  return true
end

-- Record how many bytes a task's sandbox holds, keeping the running total.
local function set_staged(id, bytes)
  local old = tonumber(redis.call('HGET', prefix .. 'staged', id) or '0')
  if bytes > 0 then
    redis.call('HSET', prefix .. 'staged', id, bytes)
  else
    redis.call('HDEL', prefix .. 'staged', id)
  end
  redis.call('INCRBY', prefix .. 'staged:total', bytes - old)
end

-- The event each state is entered with (actors/events.py: EVENT_OF_STATE, checked by tests).
local EVENT_OF_STATE = {
  queued = 'task.queued', claimed = 'task.claimed', downloading = 'task.started',
  finalizing = 'task.finalizing', done = 'task.completed', failed = 'task.failed', dead = 'task.failed',
  canceled = 'task.canceled',
}

-- Append an event to the task's stream and to the stream of all tasks, in the step that makes
-- it: no state change without its event, no event without its change. `fields` is a flat list
-- of names and values; the entry of all tasks also names the task stream's entry id ('tid'),
-- so a reader of the one stream can tell where the other stands. A task's stream is never
-- trimmed (a replay from its start must hold every state change): a task.progress there
-- replaces the one before it when nothing came between (task_key's 'ev_progress'), so the
-- stream grows with files and state changes, not with time. The stream of all tasks keeps
-- every event, trimmed to about events_retain entries.
local function emit(task_key, id, now, kind, fields)
  local entry = {'type', kind, 'at', string.format('%d', math.floor(now * 1000))}
  for _, value in ipairs(fields) do
    table.insert(entry, value)
  end
  local stream = prefix .. 'events:' .. id
  local superseded = redis.call('HGET', task_key, 'ev_progress')
  if kind == 'task.progress' and superseded then
    redis.call('XDEL', stream, superseded)
    redis.call('HSET', task_key, 'ev_replaced', 1)  -- compact_events has something to drop
  end
  local tid = redis.call('XADD', stream, '*', unpack(entry))
  if kind == 'task.progress' then
    redis.call('HSET', task_key, 'ev_progress', tid)
  else
    redis.call('HDEL', task_key, 'ev_progress')
  end
  table.insert(entry, 'task')  -- the stream of all tasks says whose; a task's own needs not
  table.insert(entry, id)
  table.insert(entry, 'tid')
  table.insert(entry, tid)
  local retain = tonumber(redis.call('HGET', prefix .. 'config', 'events_retain') or '') or 100000
  redis.call('XADD', prefix .. 'events', 'MAXLEN', '~', retain, '*', unpack(entry))
end

-- A task's stream once the task ended, rewritten at the same ids without the task.progress
-- entries replaced in it (XDEL leaves them in the stream's nodes until a whole node goes), then
-- dumped and restored: a stream's last node is allocated 4 KiB ahead for appends, which an
-- ended task will rarely make, and a restored node is as large as what it holds (measured: 8
-- entries, 4.7 KiB -> 1.1 KiB). An operator's retry appends to it as to any stream.
local function compact_events(task_key, id)
  if not redis.call('HGET', task_key, 'ev_replaced') then
    return  -- nothing was replaced: nothing to drop (and a short stream stays as it is)
  end
  redis.call('HDEL', task_key, 'ev_replaced')
  local key = prefix .. 'events:' .. id
  local entries = redis.call('XRANGE', key, '-', '+')
  redis.call('DEL', key)
  for _, entry in ipairs(entries) do
    redis.call('XADD', key, entry[1], unpack(entry[2]))
  end
  -- A server that refuses DUMP or RESTORE (renamed, or an ACL) keeps the stream as re-added
  local blob = redis.pcall('DUMP', key)
  if type(blob) == 'string' then
    redis.pcall('RESTORE', key, 0, blob, 'REPLACE')
  end
end

-- After progress was written: a file.completed for each file finished since the last event,
-- and a task.progress at most once a second (`force`: now, as the stage ends), with the speed
-- since the previous one (bytes downloaded and stored).
local function progress_event(task_key, id, now, force)
  local t = redis.call('HMGET', task_key, 'bytes_done', 'bytes_total', 'files_done', 'bytes_stored', 'ev_at',
    'ev_bytes', 'ev_files', 'state', 'finished', 'active', 'connections')
  local done, stored, files = tonumber(t[1] or '0'), tonumber(t[4] or '0'), tonumber(t[3] or '0')
  local told = tonumber(t[7] or '0')
  if files > told then
    local spec = cjson.decode(redis.call('GET', prefix .. 'spec:' .. id) or '{"files":[]}')
    -- Files finish out of order side by side: 'finished' says which (a worker that does not
    -- write it downloads in order)
    local order = {}
    for index in string.gmatch(t[9] or '', '%d+') do
      table.insert(order, tonumber(index))
    end
    for n = told + 1, files do
      local index = order[n] or (n - 1)
      local file = spec.files[index + 1] or {}
      emit(task_key, id, now, 'file.completed', {'state', t[8], 'index', index, 'path', file.path or '',
        'size', file.size or '', 'bytes_done', t[1] or '0'})
    end
    redis.call('HSET', task_key, 'ev_files', files)
  end
  local last, moved = tonumber(t[5] or '0'), done + stored
  if not force and (now - last < 1 or moved == tonumber(t[6] or '-1')) then
    return  -- at most one a second, and none while nothing moves (a stall, a slow receiver)
  end
  local speed = 0
  if last > 0 and now > last then
    speed = math.max(0, math.floor((moved - tonumber(t[6] or '0')) / (now - last)))
  end
  local fields = {'state', t[8], 'bytes_done', t[1] or '0', 'bytes_total', t[2] or '0',
    'files_done', files, 'bytes_stored', stored, 'speed', speed}
  if t[10] and t[10] ~= '' and t[8] == 'downloading' then
    for _, item in ipairs({'active', t[10], 'connections', t[11] or '0'}) do
      table.insert(fields, item)
    end
  end
  emit(task_key, id, now, 'task.progress', fields)
  redis.call('HSET', task_key, 'ev_at', now, 'ev_bytes', moved)
end

-- How long a minute's figures are kept after their last write (seconds): actors/store_figures.py's
-- MINUTE_TTL_SECONDS, which the lease keepers use for the bytes (tests/test_figures.py checks).
local MINUTE_TTL = 900

-- Add `n` to `field` of the figures of the minute `now` falls in (read by the operator dashboard).
local function count_minute(now, field, n)
  local key = prefix .. 'stats:minute:' .. string.format('%d', math.floor(tonumber(now) / 60))
  redis.call('HINCRBY', key, field, n)
  redis.call('EXPIRE', key, MINUTE_TTL)
end

-- Move task `id` from state `old` (false for a new task) to `new` at time `now`, with its event
-- (call it after the fields the event reports, the error among them, are written).
local function set_state(task_key, id, old, new, now, by)
  redis.call('HSET', task_key, 'state', new, 'updated_at', now)
  if old then
    redis.call('ZREM', prefix .. 'state:' .. old, id)
  end
  if old == 'finalizing' and new ~= 'finalizing' then
    stop_resting(task_key, id)
  end
  if old == 'queued' then
    redis.call('HDEL', task_key, 'waiting_since', 'waiting_on', 'waiting_host')
  end
  if old == 'downloading' then  -- nothing downloads now; 'finished' stays for the next run's events
    redis.call('HDEL', task_key, 'active', 'connections')
  end
  redis.call('ZADD', prefix .. 'state:' .. new, now, id)
  if new == 'dead' then
    redis.call('INCR', prefix .. 'stats:dead')
  end
  if is_retryable(new) then  -- owes task.failed or task.canceled
    redis.call('ZADD', prefix .. 'notify', now, id)
  end
  if old == new then
    return
  end
  if new == 'done' or new == 'failed' or new == 'dead' then  -- the dashboard's tasks per minute
    count_minute(now, new, 1)
  end
  local t = redis.call('HMGET', task_key, 'attempts', 'error', 'error_code', 'error_file', 'not_before', 'state',
    'run', 'worker')
  local fields = {'state', new, 'attempt', t[1] or '0', 'run', t[7] or '0'}
  local kind = EVENT_OF_STATE[new]
  if new == 'queued' and old and is_retryable(old) then
    kind = 'task.retried'  -- an operator's retry
  end
  if new == 'queued' or is_retryable(new) then
    for i, name in ipairs({'error', 'error_code', 'error_file'}) do
      if t[i + 1] and t[i + 1] ~= '' then
        table.insert(fields, name)
        table.insert(fields, t[i + 1])
      end
    end
    if new == 'queued' and tonumber(t[5] or '0') > 0 then
      table.insert(fields, 'not_before')
      table.insert(fields, t[5])
    end
  elseif is_active(new) and t[8] then
    table.insert(fields, 'worker')
    table.insert(fields, t[8])
  elseif new == 'done' then
    local stored = redis.call('GET', prefix .. 'stored:' .. id)
    if stored then
      table.insert(fields, 'files')
      table.insert(fields, stored)
    end
  end
  if by and by ~= '' then  -- an operator's action (retry.lua, cancel.lua): who
    table.insert(fields, 'by')
    table.insert(fields, by)
  end
  emit(task_key, id, now, kind, fields)
  if is_final(new) then
    compact_events(task_key, id)
  end
end

-- Let a 'finalizing' task wait between runs without a lease: the time its finalize message then
-- spends in a queue behind busy threads must not expire it (an expired lease would queue it
-- again and use up a download attempt). Its slots are freed; `why` is 'slot' (waiting for a
-- finalize slot, which counts toward the backlog) or 'outage' (storage or its receiver is
-- down: parked, not counted, so one tenant's dead receiver cannot pause every claim). The
-- message is the holder now: it carries the new token returned here, and the run that rested
-- the task is fenced off. The supervisor re-sends a message that is overdue (finalize_resend.lua).
local function rest(task_key, id, now, due, why, failing_since)
  free_slots(task_key, id)
  redis.call('ZREM', prefix .. 'leases', id)
  redis.call('HSET', task_key, 'lease_until', 0, 'resting', why, 'failing_since', failing_since, 'updated_at', now)
  redis.call('ZADD', prefix .. 'resting', due, id)
  if why == 'outage' then
    redis.call('ZADD', prefix .. 'parked', due, id)
  else
    redis.call('ZREM', prefix .. 'parked', id)
  end
  return next_token(task_key)
end
