-- Take, or give back, one more connection to an origin host for the run holding the token: a
-- member of the host's slot set beside the one the claim took for the task, held until the
-- deadline of the run's lease and renewed, freed and expired with it (see _lib.lua).
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix slots:host:$host
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  fencing token
-- ARGV[4]  now (seconds)
-- ARGV[5]  the member: the task id, '#', the run's connection number
-- ARGV[6]  the per-host limit
-- ARGV[7]  'take' or 'give'
-- Returns 1 when taken (or given back), 0 when the host is at its limit, -1 for a stale token.
local t = redis.call('HMGET', KEYS[1], 'state', 'token', 'lease_until', 'conns')
if t[2] ~= ARGV[3] or t[1] ~= 'downloading' then
  return -1
end
local entry = KEYS[2] .. '|' .. ARGV[5]
local held = {}
for item in string.gmatch(t[4] or '', '[^ ]+') do
  if item ~= entry then
    table.insert(held, item)
  end
end
if ARGV[7] == 'take' then
  if not slot_free(KEYS[2], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[4])) then
    return 0
  end
  redis.call('ZADD', KEYS[2], tonumber(t[3]), ARGV[5])
  redis.call('SADD', prefix .. 'slotkeys', KEYS[2])
  table.insert(held, entry)
else
  free_slot(KEYS[2], ARGV[5])
end
redis.call('HSET', KEYS[1], 'conns', table.concat(held, ' '))
return 1
