-- Reserve the next turn to ask a host for a page: turns are at least an interval apart across
-- every worker, handed out in the order they are asked for. A turn nobody uses just passes.
-- KEYS[1]  $prefix pace:$host
-- ARGV[1]  prefix
-- ARGV[2]  now (seconds)
-- ARGV[3]  the interval (seconds)
-- Returns the seconds to wait for the turn (0: now), as text.
local now = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local free_at = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local turn = math.max(now, free_at)
local after = turn + interval
redis.call('SET', KEYS[1], string.format('%.3f', after), 'PX', math.ceil((after - now) * 1000) + 1000)
return string.format('%.3f', turn - now)
