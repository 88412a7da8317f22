-- Claims a node whose heartbeat expired: removes it from the live nodes and returns (and
-- deletes) its connections, so that exactly one surviving node reports them ended.
-- KEYS: nodes zset, the node's connections hash. ARGV: node, now_ms.
-- Returns {} when the node is alive or already claimed, else HGETALL of its connections.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then
  return {}
end
redis.call('ZREM', KEYS[1], ARGV[1])
local connections = redis.call('HGETALL', KEYS[2])
redis.call('DEL', KEYS[2])
return connections
