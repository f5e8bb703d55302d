-- Record what a page file of the run holding the token resolved to (never the media URL: its
-- host, the extractor, the format chosen, the title and duration), and tell it (file.resolved).
-- KEYS[1]  $prefix task:$id
-- ARGV[1]  prefix
-- ARGV[2]  task id
-- ARGV[3]  fencing token
-- ARGV[4]  now (seconds)
-- ARGV[5]  the file's index
-- ARGV[6]  what it resolved to (JSON object)
-- Returns 1 when recorded, -1 for a stale token.
local t = redis.call('HMGET', KEYS[1], 'state', 'token', 'resolved')
if t[2] ~= ARGV[3] or t[1] ~= 'downloading' then
  return -1
end
local all = {}
if t[3] then
  all = cjson.decode(t[3])
end
local record = cjson.decode(ARGV[6])
all[ARGV[5]] = record
redis.call('HSET', KEYS[1], 'resolved', cjson.encode(all))
local fields = {'index', ARGV[5]}
for _, name in ipairs({'extractor', 'format_id', 'title', 'host'}) do
  table.insert(fields, name)
  table.insert(fields, tostring(record[name]))
end
if type(record['duration']) == 'number' then
  table.insert(fields, 'duration')
  table.insert(fields, tostring(record['duration']))
end
emit(KEYS[1], ARGV[2], tonumber(ARGV[4]), 'file.resolved', fields)
return 1
