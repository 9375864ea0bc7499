--[[
Take the due members of a schedule zset, pushing each one's score to now + hold so that no
other sweeper or notifier takes the same member meanwhile (mailyard.hub.sweeper,
mailyard.submission.service).

KEYS: 1 zset
ARGV: 1 now ms, 2 limit, 3 hold ms
Reply: the members taken.
]]
local now = tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), m)
end
return due
