-- The lease of an event group: the node holding it delivers the group's stream (events.rs).
-- KEYS: the lease. ARGV: 'hold' or 'release', node, ttl_ms.
-- 'hold' returns 2 when the lease was free and is this node's now, 1 when this node held
-- it (renewed), 0 when another node holds it. 'release' gives it up if this node holds it.
local holder = redis.call('GET', KEYS[1])
if ARGV[1] == 'release' then
  if holder == ARGV[2] then
    redis.call('DEL', KEYS[1])
  end
  return 0
end
if holder == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 2
end
return 0
