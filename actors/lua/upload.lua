-- Keep, or forget, how far a file's multipart upload got, for the run holding the task only:
-- a stale holder (taken over, canceled) records nothing, so a successor never resumes an upload
-- whose parts it cannot trust. Finished parts are not kept here: the service lists them
-- (ListParts) and each is checked against the staged bytes before it is reused.
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix uploads:$id
-- ARGV[1]  prefix
-- ARGV[2]  fencing token
-- ARGV[3]  the file's index in the task
-- ARGV[4]  the record (JSON: key, upload id, part size), or '' to forget it
-- Returns 1, or 0 when the token is not the task's or the task is not finalizing.
local t = redis.call('HMGET', KEYS[1], 'state', 'token')
if t[2] ~= ARGV[2] or t[1] ~= 'finalizing' then
  return 0
end
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[2], ARGV[3])
else
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
end
return 1
