-- The cluster's event groups (events.rs): each group's stream holds its unacknowledged
-- events, with ids `<seq>-0` numbered by the group's counter, at most `max` of them. An
-- event that does not fit is dropped, and so is every later one until there is room for a
-- `lost` entry naming the range (after acknowledgements), exactly as one node's groups do.
-- KEYS: the registry (group -> kinds). ARGV: mode, prefix, max, now_ms, then
--   'append': the node and its batch's number (each node numbers its batches 1, 2...
--     and sends them in order; a number already applied is skipped: the retry of a call that
--     timed out but ran), five counts of events the node dropped before Redis
--     (connect, disconnect, subscribe, unsubscribe, publish), then per event: its kind bit,
--     its field count, its fields and values. Groups whose `alive` key expired are
--     forgotten first.
--   'ack': a group, then the acknowledged sequence numbers.
local mode, prefix, max, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

local function key(g, part)
  return prefix .. ':events:' .. g .. ':' .. part
end

-- `n` numbers are dropped: they join the pending range.
local function lose(g, n)
  local last = redis.call('INCRBY', key(g, 'seq'), n)
  local first = redis.call('HGET', key(g, 'lost'), 'first') or (last - n + 1)
  redis.call('HSET', key(g, 'lost'), 'first', first, 'last', last)
end

-- Appends the pending range's `lost` entry if it fits with `extra` more entries; false
-- when a range is pending and does not fit.
local function report(g, extra)
  local lost = redis.call('HMGET', key(g, 'lost'), 'first', 'last')
  if not lost[1] then
    return true
  end
  if redis.call('XLEN', key(g, 'stream')) + 1 + extra > max then
    return false
  end
  local seq = redis.call('INCR', key(g, 'seq'))
  redis.call('XADD', key(g, 'stream'), seq .. '-0', 'k', 'lost', 't', now, 'first', lost[1], 'last', lost[2])
  redis.call('DEL', key(g, 'lost'))
  return true
end

if mode == 'ack' then
  local g = ARGV[5]
  for i = 6, #ARGV do
    redis.call('XDEL', key(g, 'stream'), ARGV[i] .. '-0')
  end
  report(g, 0)
  return 0
end

local applied = prefix .. ':events-applied'
if tonumber(ARGV[6]) <= tonumber(redis.call('HGET', applied, ARGV[5]) or '0') then
  return -1
end
redis.call('HSET', applied, ARGV[5], ARGV[6])
redis.call('PEXPIRE', applied, 86400000)

local groups = {}
local listed = redis.call('HGETALL', KEYS[1])
for i = 1, #listed, 2 do
  local g = listed[i]
  if redis.call('EXISTS', key(g, 'alive')) == 1 then
    groups[#groups + 1] = { g, tonumber(listed[i + 1]) }
  else
    redis.call('HDEL', KEYS[1], g)
    redis.call('DEL', key(g, 'stream'), key(g, 'seq'), key(g, 'lost'), key(g, 'cursor'))
  end
end

for _, group in ipairs(groups) do
  local dropped = 0
  for k = 0, 4 do
    if bit.band(group[2], bit.lshift(1, k)) ~= 0 then
      dropped = dropped + tonumber(ARGV[7 + k])
    end
  end
  if dropped > 0 then
    lose(group[1], dropped)
  end
end

local i = 12
while i <= #ARGV do
  local kind, count = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local fields = {}
  for j = 1, count * 2 do
    fields[j] = ARGV[i + 1 + j]
  end
  i = i + 2 + count * 2
  for _, group in ipairs(groups) do
    local g = group[1]
    if bit.band(group[2], kind) ~= 0 then
      if report(g, 1) and redis.call('XLEN', key(g, 'stream')) < max then
        local seq = redis.call('INCR', key(g, 'seq'))
        redis.call('XADD', key(g, 'stream'), seq .. '-0', unpack(fields))
      else
        lose(g, 1)
      end
    end
  end
end
return #groups
