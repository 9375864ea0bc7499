--[[
Extend a worker's leases (mailyard.hub.queues.renew): those of the given items that are
still held under its token (Active, leased by it, expired or not: until the sweeper takes
an item back, it is still the worker's), and its connection slot on the queue with them.
A stale holder (its items reclaimed, taken by another worker, or finished) extends nothing
and keeps no slot.

KEYS: 1 conns zset, 2 inflight zset
ARGV: 1 lease until ms, 2 token, 3 item key prefix, 4... item ids
Reply: the ids renewed.
]]
local untilms = tonumber(ARGV[1])
local token = ARGV[2]
local renewed = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local held = redis.call('HMGET', ARGV[3] .. id, 'status', 'lease')
  if held[1] == 'Active' and held[2] == token then
    redis.call('ZADD', KEYS[2], untilms, id)
    renewed[#renewed + 1] = id
  end
end
if #renewed > 0 or #ARGV == 3 then
  redis.call('ZADD', KEYS[1], 'XX', untilms, token)
end
return renewed
