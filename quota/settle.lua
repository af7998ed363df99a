-- Settle an admitted request once it has ended, in one round trip.
-- KEYS: token windows ("t" kind) whose charge changes, then concurrency lease sets ("c" kind).
-- ARGV[1] the request id, ARGV[2] the number of token keys; then per token key: reserved, actual.
-- A reservation becomes the real usage at its original time; leases are released. The new
-- entry goes in before the old one goes out: removing a window's only entry first would delete
-- the key and the ZADD would make it again without its expiry, an entry that outlives its sum
-- and, once the sum has expired, makes it negative (twice the limit admitted).

local id = ARGV[1]
local charged = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  if i <= charged then
    local reserved, actual = ARGV[1 + i * 2], tonumber(ARGV[2 + i * 2])
    local member = id .. ":" .. reserved
    local score = redis.call("ZSCORE", key, member)
    if score and actual ~= tonumber(reserved) then
      redis.call("ZADD", key, score, id .. ":" .. actual)
      redis.call("ZREM", key, member)
      redis.call("INCRBY", key .. ":sum", actual - tonumber(reserved))
    end
  else
    redis.call("ZREM", key, id .. ":1")
  end
end
return 1
