-- A channel's position and a range of what it keeps, read at one instant. Makes the
-- position (a new epoch at offset 0) when there is none, so that a subscriber's epoch is
-- the one the next publication gets. Drops publications older than history_ttl first.
-- KEYS: meta, stream. ARGV: fresh_epoch, meta_ttl_ms, history_ttl_ms, direction
-- ('f': after ARGV[5], oldest first; 'r': before ARGV[5], newest first, -1 for the top),
-- from, count, '1' on a Redis Cluster.
-- Returns {epoch, top, id1, data1, id2, data2, ...}.
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
local primary = nil
if ARGV[7] == '1' then
  -- On a Redis Cluster, a position written on another primary is not trusted (publish.lua
  -- says why): it starts again.
  primary = redis.call('CLUSTER', 'MYID')
  if redis.call('HGET', meta, 'r') ~= primary then
    epoch = nil
  end
end
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', meta, 'e', epoch, 'o', 0)
  redis.call('PEXPIRE', meta, ARGV[2])
  redis.call('DEL', stream)
  if primary then
    redis.call('HSET', meta, 'r', primary)
  end
end
local top = tonumber(redis.call('HGET', meta, 'o') or '0')
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[3])
while true do
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #first == 0 or tonumber(first[1][2][4]) + ttl > ms then break end
  redis.call('XDEL', stream, first[1][1])
end
local from, count = tonumber(ARGV[5]), tonumber(ARGV[6])
local entries = {}
if count > 0 then
  if ARGV[4] == 'f' then
    entries = redis.call('XRANGE', stream, (from + 1) .. '-0', '+', 'COUNT', count)
  elseif from < 0 then
    entries = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', count)
  elseif from > 1 then
    entries = redis.call('XREVRANGE', stream, (from - 1) .. '-0', '-', 'COUNT', count)
  end
end
local out = {epoch, top}
for _, e in ipairs(entries) do
  out[#out + 1] = e[1]
  out[#out + 1] = e[2][2]
end
return out
