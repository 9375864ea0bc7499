--[[
Queue shape by recipient domain or by sender domain, counted where the items are
(mailyard.hub.queue_shape): one chunk of a queue's members by rank, so no call holds Redis long.
KEYS: 1 the queue's members (my:qm:<queue>).
ARGV: 1 "domain" or "sender", 2 first rank, 3 last rank, 4 the item key prefix (my:item:),
      5 the message key prefix (my:msg:), 6... the age columns' edges: scores (ms), newest first.
Reply: flat {destination, column (0-based), count, ...}.
An item counts once for each of its recipients' domains; a domain is the address after its
last "@" (the whole address without one), lower-cased; "(none)" without any, "(unreadable)"
if its recipients are not JSON; the null sender is "<>".
]]
local by, first, last = ARGV[1], ARGV[2], ARGV[3]
local item_prefix, msg_prefix = ARGV[4], ARGV[5]
local edges = {}
for i = 6, #ARGV do edges[#edges + 1] = tonumber(ARGV[i]) end

local function column(score)
  for i = 1, #edges do
    if score >= edges[i] then return i - 1 end
  end
  return #edges
end

local function domain_of(address)
  local d = string.lower(string.match(address, "@([^@]*)$") or address)
  if d == "" then return "(none)" end
  return d
end

local counts = {}
local function add(destination, col)
  local key = destination .. "\0" .. col
  counts[key] = (counts[key] or 0) + 1
end

local members = redis.call('ZRANGE', KEYS[1], first, last, 'WITHSCORES')
for i = 1, #members, 2 do
  local col = column(tonumber(members[i + 1]))
  local item = item_prefix .. members[i]
  if by == 'sender' then
    local msg = redis.call('HGET', item, 'msg')
    local sender = msg and redis.call('HGET', msg_prefix .. msg, 'sender') or false
    if sender and sender ~= '' then add(domain_of(sender), col) else add('<>', col) end
  else
    local ok, rcpts = pcall(cjson.decode, redis.call('HGET', item, 'rcpts') or '[]')
    if not ok or type(rcpts) ~= 'table' then
      add('(unreadable)', col)
    else
      local seen, any = {}, false
      for _, r in ipairs(rcpts) do
        local address = type(r) == 'table' and r.address or nil
        local d = domain_of(type(address) == 'string' and address or '')
        if not seen[d] then seen[d] = true; any = true; add(d, col) end
      end
      if not any then add('(none)', col) end
    end
  end
end

local out = {}
for key, n in pairs(counts) do
  local destination, col = string.match(key, "^(.*)%z(%d+)$")
  out[#out + 1] = destination
  out[#out + 1] = tonumber(col)
  out[#out + 1] = n
end
return out
