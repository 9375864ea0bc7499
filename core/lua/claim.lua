--[[
Take up to N ready items of one queue under a lease (mailyard.hub.queues.claim), and hand
back everything the worker needs in the same round trip.

KEYS: 1 queue hash, 2 ready list, 3 conns zset, 4 inflight zset, 5 the queue's kick marker
ARGV: 1 now ms, 2 N, 3 lease ms, 4 token, 5 hub, 6 connection cap (0: none),
      7 item key prefix, 8 message key prefix, 9 kick marker ttl ms, 10 the worker's pid
A suspended queue, or one in Retry before its next retry time, gives nothing. A new
token (a new "connection" to the next hop) is admitted only while fewer than the cap hold
one; a token already admitted keeps taking batches. Items removed meanwhile are skipped.
The kick marker is renewed: a drain is at work on the queue.
Reply: {'!'} when the queue may not be taken from now (suspended, waiting for its retry
time, or every connection slot in use); else {ready items left, {id, item fields as
HGETALL, ...}, {message id, message fields, ...}} (possibly no items).
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
redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[9]))
-- A "suspect" item was in a batch whose worker crashed: it is taken alone, so that if it
-- crashes its worker again the crash is its own (poison detection counts per message).
local ids = {}
local want = tonumber(ARGV[2])
while #ids < want do
  local id = redis.call('LPOP', KEYS[2])
  if not id then break end
  if redis.call('HGET', ARGV[7] .. id, 'suspect') == '1' then
    if #ids == 0 then
      ids[1] = id
    else
      redis.call('LPUSH', KEYS[2], id)
    end
    break
  end
  ids[#ids + 1] = id
end
local items, messages, seen = {}, {}, {}
if #ids > 0 then
  redis.call('ZADD', KEYS[3], lease_until, token)
  for _, id in ipairs(ids) do
    local key = ARGV[7] .. id
    if redis.call('EXISTS', key) == 1 then
      redis.call('HSET', key, 'status', 'Active', 'lease', token, 'hub', ARGV[5], 'leased', now,
                 'pid', ARGV[10])
      redis.call('ZADD', KEYS[4], lease_until, id)
      items[#items + 1] = id
      items[#items + 1] = redis.call('HGETALL', key)
      local msg = redis.call('HGET', key, 'msg')
      if msg and not seen[msg] then
        seen[msg] = true
        messages[#messages + 1] = msg
        messages[#messages + 1] = redis.call('HGETALL', ARGV[8] .. msg)
      end
    end
  end
end
return {redis.call('LLEN', KEYS[2]), items, messages}
