--[[
Take up to N ready items of one queue under a lease (mailyard.hub.queues.claim).

KEYS: 1 queue hash, 2 ready list, 3 conns zset, 4 inflight zset
ARGV: 1 now ms, 2 N, 3 lease ms, 4 token, 5 hub, 6 connection cap (0: none), 7 item key prefix
A suspended queue, or one in Retry before its next retry time, gives nothing. A new
token (a new "connection" to the next hop) is admitted only while fewer than the cap hold
one; a token already admitted keeps taking batches. Items removed meanwhile are skipped.
Reply: the item ids taken (possibly none), or {'!'} when the queue may not be taken from now
(suspended, waiting for its retry time, or every connection slot in use).
]]
local now = tonumber(ARGV[1])
local q = redis.call('HMGET', KEYS[1], 'suspended', 'next_retry')
if q[1] == '1' then return {'!'} end
if tonumber(q[2] or '0') > now then return {'!'} end
local lease_until = now + tonumber(ARGV[3])
local token = ARGV[4]
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local cap = tonumber(ARGV[6])
if cap > 0 and not redis.call('ZSCORE', KEYS[3], token) then
  if redis.call('ZCARD', KEYS[3]) >= cap then return {'!'} end
end
local ids = redis.call('LPOP', KEYS[2], tonumber(ARGV[2]))
if not ids then return {} end
redis.call('ZADD', KEYS[3], lease_until, token)
local out = {}
for _, id in ipairs(ids) do
  local key = ARGV[7] .. id
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'status', 'Active', 'lease', token, 'hub', ARGV[5], 'leased', now)
    redis.call('ZADD', KEYS[4], lease_until, id)
    out[#out + 1] = id
  end
end
return out
