--[[
Find queues that have ready items but no drain pending or running, and claim a kick for
each (the sweeper then sends the drain task). This is the safety net for every lost Celery
message and for queues whose Retry time has come.

KEYS: 1 the queue index zset (my:queues)
ARGV: 1 now ms, 2 kick ttl ms, 3 key prefix ("my:")
Reply: a flat list queue, route, queue, route, ...
]]
local now = tonumber(ARGV[1])
local p = ARGV[3]
local out = {}
for _, q in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('LLEN', p .. 'ready:' .. q) > 0 then
    local h = redis.call('HMGET', p .. 'queue:' .. q, 'suspended', 'next_retry', 'route', 'type', 'next_hop')
    if h[1] ~= '1' and tonumber(h[2] or '0') <= now and h[4] ~= 'Unreachable' and h[5] ~= 'Poison' then
      if redis.call('ZCOUNT', p .. 'conns:' .. q, now, '+inf') == 0 then
        if redis.call('SET', p .. 'kick:' .. q, '1', 'NX', 'PX', ARGV[2]) then
          out[#out + 1] = q
          out[#out + 1] = h[3]
        end
      end
    end
  end
end
return out
