-- One publication of a channel, as one step: the idempotency key, the next offset in the
-- channel's epoch, the append to the bounded stream, and the PUBLISH to every node.
-- KEYS: meta, stream, seen. ARGV: data, history_size, history_ttl_ms, meta_ttl_ms,
-- fresh_epoch, window_ms, topic, has_history ('1'/'0'), keyed ('1'/'0'), the envelope's
-- head ('p', or 'r<deadline_ms>,' for a publication whose receipts are tallied; either after
-- 't<traceparent>,' for a traced one), '1' on a Redis Cluster (the position remembers the
-- primary it was written on, see below).
-- Returns 'n<offset>:<epoch>' (offset 0 and no epoch without history), or 's' and the first
-- result for a key seen within the window (nothing published).
local meta, stream, seen = KEYS[1], KEYS[2], KEYS[3]
local keyed = ARGV[9] == '1'
if keyed then
  local first = redis.call('GET', seen)
  if first then return 's' .. first end
end
local offset, epoch = 0, ''
if ARGV[8] == '1' then
  epoch = redis.call('HGET', meta, 'e')
  local primary = nil
  if ARGV[11] == '1' then
    -- The cluster node this runs on: a promoted replica (which may lack the last
    -- publications its predecessor acknowledged, replication being asynchronous), or a
    -- slot moved here, is another one. Offsets written on another could be given twice,
    -- so the position starts again and subscribers are told.
    primary = redis.call('CLUSTER', 'MYID')
    if redis.call('HGET', meta, 'r') ~= primary then
      epoch = nil
    end
  end
  if not epoch then
    -- The position is lost (expired, or Redis lost it): a new epoch, nothing kept.
    epoch = ARGV[5]
    redis.call('HSET', meta, 'e', epoch, 'o', 0)
    redis.call('DEL', stream)
    if primary then
      redis.call('HSET', meta, 'r', primary)
    end
  end
  offset = redis.call('HINCRBY', meta, 'o', 1)
  redis.call('PEXPIRE', meta, ARGV[4])
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('XADD', stream, 'MAXLEN', ARGV[2], offset .. '-0', 'd', ARGV[1], 't', ms)
  redis.call('PEXPIRE', stream, ARGV[3])
end
local result = offset .. ':' .. epoch
redis.call('PUBLISH', ARGV[7], ARGV[10] .. result .. ':' .. ARGV[1])
if keyed and tonumber(ARGV[6]) > 0 then
  redis.call('SET', seen, result, 'PX', ARGV[6])
end
return 'n' .. result
