--[[
A guarded transaction (mailyard.txn): check every guard, then run every operation, all in
one atomic step, so a crash between two writes cannot leave a message in two queues or none.

ARGV is binary-safe (message bodies travel in it): a count, then that many items.
  ARGV = G, guard_1, ..., guard_G, O, op_1, ..., op_O
  where each guard and op is written as n, word_1, ..., word_n.

Guards
  eq KEY FIELD VALUE      HGET KEY FIELD must equal VALUE
  absent KEY              KEY must not exist (the failure carries GET KEY for strings)
  exists KEY              KEY must exist
  hnx KEY FIELD           the hash field must not exist
Operations: any Redis command, or
  @decref MSGKEY BODYKEY ITEMSKEY DELAYKEY MSGID
                          one queue item fewer holds the message; at zero the message,
                          its body, its item set and its delay-DSN schedule are deleted
  @kick KICKKEY TTLMS     SET KICKKEY NX PX TTLMS; the reply (1 or 0) is returned
  @hset_if KEY F V ...    HSET only if KEY exists (an item may have been removed meanwhile)
Reply: {1, kick replies in order...} or {0, failed guard number, current value or false}.
]]
local pos = 1
local function take()
  local n = tonumber(ARGV[pos]); pos = pos + 1
  local words = {}
  for i = 1, n do words[i] = ARGV[pos]; pos = pos + 1 end
  return words
end

local guards = tonumber(ARGV[pos]); pos = pos + 1
for g = 1, guards do
  local w = take()
  if w[1] == 'eq' then
    local v = redis.call('HGET', w[2], w[3])
    if v ~= w[4] then return {0, g, v} end
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
  else
    return redis.error_reply('unknown guard ' .. tostring(w[1]))
  end
end

local out = {1}
local ops = tonumber(ARGV[pos]); pos = pos + 1
for o = 1, ops do
  local w = take()
  local name = w[1]
  if name == '@decref' then
    local left = redis.call('HINCRBY', w[2], 'refs', -1)
    if left <= 0 then
      redis.call('DEL', w[2], w[3], w[4])
      redis.call('ZREM', w[5], w[6])
    end
  elseif name == '@kick' then
    local ok = redis.call('SET', w[2], '1', 'NX', 'PX', w[3])
    out[#out + 1] = ok and 1 or 0
  elseif name == '@hset_if' then
    if redis.call('EXISTS', w[2]) == 1 then
      redis.call('HSET', unpack(w, 2))
    end
  else
    redis.call(unpack(w))
  end
end
return out
