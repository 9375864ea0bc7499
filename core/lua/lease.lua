--[[
Take or keep a named lease (the sweeper's): granted when free or already ours.
KEYS: 1 lease key. ARGV: 1 holder, 2 ttl ms. Reply: 1 if we hold it now, else 0.
]]
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
