--[[
A guarded transaction (mailyard.txn): check every guard, then run every operation, all in
one atomic step, so a crash between two writes cannot leave a message in two queues or none.

ARGV[1] is a MessagePack array {guards, ops} (binary-safe: message bodies travel in it),
each guard and op itself an array of words.

Guards
  eq KEY FIELD VALUE      the hash KEY exists and HGET KEY FIELD equals VALUE (a missing field
                          reads as "", a missing hash fails: a guard never passes on a deleted
                          item, so no effect can re-create it)
  absent KEY              KEY must not exist (the failure carries GET KEY for strings)
  exists KEY              KEY must exist
  hnx KEY FIELD           the hash field must not exist
  zle KEY MEMBER SCORE    MEMBER is in the sorted set KEY with a score of at most SCORE (a
                          lease still expired: its holder did not renew it meanwhile)
Operations: any Redis command, or
  @decref MSGKEY BODYKEY ITEMSKEY DELAYKEY MSGID
                          one queue item fewer holds the message; at zero the message,
                          its body, its item set and its delay-DSN schedule are deleted
  @kick KICKKEY TTLMS LIST MESSAGE FORCE
                          SET KICKKEY NX PX TTLMS: if it was set (or FORCE is 1), LPUSH the
                          Celery drain MESSAGE onto LIST (reply 1); 0 when a drain was pending
  @zrem_unless KEY FIELD VALUE ZSET MEMBER
                          ZREM ZSET MEMBER unless HGET KEY FIELD equals VALUE (drop a schedule
                          entry of an item that is gone or no longer in that state)
  @hset_if KEY F V ...    HSET only if KEY exists (an item may have been removed meanwhile)
  @queue KEY INDEX IDENTITY SITE KIND TYPE NEXTHOP ROUTE CONNECTOR NOW
                          create a queue (its hash and its place in the index) unless it exists
Reply: {1, kick replies in order...} or {0, failed guard number, current value or false}.
]]
local spec = cmsgpack.unpack(ARGV[1])

for g, w in ipairs(spec[1]) do
  if w[1] == 'eq' then
    local v = redis.call('HGET', w[2], w[3])
    if not v and redis.call('EXISTS', w[2]) == 0 then return {0, g, false} end
    if (v or '') ~= w[4] then return {0, g, v} end
  elseif w[1] == 'absent' then
    if redis.call('EXISTS', w[2]) == 1 then
      local t = redis.call('TYPE', w[2])['ok']
      if t == 'string' then return {0, g, redis.call('GET', w[2])} end
      return {0, g, false}
    end
  elseif w[1] == 'exists' then
    if redis.call('EXISTS', w[2]) == 0 then return {0, g, false} end
  elseif w[1] == 'hnx' then
    if redis.call('HEXISTS', w[2], w[3]) == 1 then return {0, g, false} end
  elseif w[1] == 'zle' then
    local score = redis.call('ZSCORE', w[2], w[3])
    if not score or tonumber(score) > tonumber(w[4]) then return {0, g, score or false} end
  else
    return redis.error_reply('unknown guard ' .. tostring(w[1]))
  end
end

local out = {1}
for _, w in ipairs(spec[2]) do
  local name = w[1]
  if name == '@decref' then
    local left = redis.call('HINCRBY', w[2], 'refs', -1)
    if left <= 0 then
      redis.call('DEL', w[2], w[3], w[4])
      redis.call('ZREM', w[5], w[6])
    end
  elseif name == '@kick' then
    local ok = redis.call('SET', w[2], '1', 'NX', 'PX', w[3])
    if ok or w[6] == 1 then
      redis.call('PEXPIRE', w[2], w[3])
      redis.call('LPUSH', w[4], w[5])
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  elseif name == '@zrem_unless' then
    if redis.call('HGET', w[2], w[3]) ~= w[4] then
      redis.call('ZREM', w[5], w[6])
    end
  elseif name == '@queue' then
    if redis.call('EXISTS', w[2]) == 0 then
      redis.call('HSET', w[2], 'identity', w[4], 'site', w[5], 'kind', w[6], 'type', w[7],
                 'next_hop', w[8], 'route', w[9], 'connector', w[10], 'created', w[11])
      redis.call('ZADD', w[3], 'NX', w[11], w[4])
    end
  elseif name == '@hset_if' then
    if redis.call('EXISTS', w[2]) == 1 then
      redis.call('HSET', unpack(w, 2))
    end
  else
    redis.call(unpack(w))
  end
end
return out
