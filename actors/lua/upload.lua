-- Keep, or forget, how far a file's multipart upload got, for the run holding the task only:
-- a stale holder (taken over, canceled) records nothing, so a successor never resumes an upload
-- whose parts it cannot trust. Finished parts are not kept here: the service lists them
-- (ListParts) and each is checked against the staged bytes before it is reused.
-- KEYS[1]  $prefix task:$id
-- KEYS[2]  $prefix uploads:$id
-- KEYS[3]  $prefix uploading (the ids of tasks with a record: the supervisor aborts the uploads
--          of those that ended without finishing them)
-- ARGV[1]  prefix
-- ARGV[2]  fencing token
-- ARGV[3]  the file's index in the task
-- ARGV[4]  the record (JSON: key, upload id, part size), or '' to forget it
-- Returns 1, or 0 when the token is not the task's or the task is not finalizing.
local t = redis.call('HMGET', KEYS[1], 'state', 'token')
if t[2] ~= ARGV[2] or t[1] ~= 'finalizing' then
  return 0
end
local id = string.sub(KEYS[1], string.len(ARGV[1]) + 6)  -- after '$prefix task:'
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[2], ARGV[3])
  if redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('SREM', KEYS[3], id)
  end
else
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
  redis.call('SADD', KEYS[3], id)
end
return 1
