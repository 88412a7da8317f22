-- A channel's presence, without the entries whose node stopped refreshing them. Whoever
-- removes an expired entry publishes its `leave` (node ''), so each is announced once.
-- KEYS: presence hash, expiry zset. ARGV: now_ms, topic, announce ('1'/'0').
-- Returns HGETALL of what remains.
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for i = 1, #gone, 500 do
  local batch = {}
  for j = i, math.min(i + 499, #gone) do batch[#batch + 1] = gone[j] end
  if ARGV[3] == '1' then
    local values = redis.call('HMGET', KEYS[1], unpack(batch))
    for k, client in ipairs(batch) do
      if values[k] then
        -- A value is the JSON object {"u":...,"i":...}: the member is it with n, j and c.
        local member = '{"n":"","j":false,"c":' .. cjson.encode(client) .. ',' .. string.sub(values[k], 2)
        redis.call('PUBLISH', ARGV[2], 'm' .. member)
      end
    end
  end
  redis.call('HDEL', KEYS[1], unpack(batch))
  redis.call('ZREM', KEYS[2], unpack(batch))
end
return redis.call('HGETALL', KEYS[1])
