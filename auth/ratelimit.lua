-- Admit one request against every window that applies to it, atomically, in one round trip.
--
-- KEYS[i]  a sorted set per window; beside each, KEYS[i] .. ":sum" holds the sum of its costs.
-- ARGV[1]  the request id; then four values per key: kind, limit, window (ms), cost.
--   kind "n": sliding log of requests (cost 1 each), scored by arrival time;
--   kind "c": concurrency leases, scored by expiry (the backstop if a process dies holding one).
-- Members are "<request id>:<cost>". Time is Redis's own clock, so several machines agree.
-- Returns {allowed, retry_ms, used_1, reset_ms_1, used_2, reset_ms_2, ...}; nothing is
-- recorded unless every window has room (no window is charged for a refused request).

local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local allowed, retry = 1, 0
local used, resets = {}, {}

local function cost_of(member)
  return tonumber(string.match(member, ":(%d+)$"))
end

local function expire_old(key, kind, window)
  local horizon = now - window
  if kind == "c" then horizon = now end
  local old = redis.call("ZRANGEBYSCORE", key, "-inf", horizon)
  if #old > 0 then
    local freed = 0
    for _, member in ipairs(old) do freed = freed + cost_of(member) end
    redis.call("ZREMRANGEBYSCORE", key, "-inf", horizon)
    redis.call("DECRBY", key .. ":sum", freed)
  end
end

local function leaves_at(kind, score, window)
  if kind == "c" then return score - now end
  return score + window - now
end

for i, key in ipairs(KEYS) do
  local base = 1 + (i - 1) * 4
  local kind = ARGV[base + 1]
  local limit, window, cost = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]),
    tonumber(ARGV[base + 4])
  expire_old(key, kind, window)
  local total = tonumber(redis.call("GET", key .. ":sum") or "0")
  used[i] = total
  resets[i] = 0
  local oldest = redis.call("ZRANGE", key, 0, 0, "WITHSCORES")
  if #oldest > 0 then resets[i] = leaves_at(kind, tonumber(oldest[2]), window) end
  if total + cost > limit then
    allowed = 0
    -- When will enough of the window have left for this request to fit? (A lease is usually
    -- released long before it expires, so a refused concurrent request retries in a second.)
    local need, freed, wait = total + cost - limit, 0, window
    local start = 0
    if kind == "c" then wait, freed = 1000, need end
    while freed < need do
      local batch = redis.call("ZRANGE", key, start, start + 63, "WITHSCORES")
      if #batch == 0 then break end
      for j = 1, #batch, 2 do
        freed = freed + cost_of(batch[j])
        if freed >= need then
          wait = leaves_at(kind, tonumber(batch[j + 1]), window)
          break
        end
      end
      start = start + 64
    end
    if wait > retry then retry = wait end
  end
end

if allowed == 1 then
  for i, key in ipairs(KEYS) do
    local base = 1 + (i - 1) * 4
    local kind, window, cost = ARGV[base + 1], tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
    local score = now
    if kind == "c" then score = now + window end
    redis.call("ZADD", key, score, id .. ":" .. cost)
    redis.call("INCRBY", key .. ":sum", cost)
    redis.call("PEXPIRE", key, window + 1000)
    redis.call("PEXPIRE", key .. ":sum", window + 1000)
    used[i] = used[i] + cost
  end
end

local out = {allowed, retry}
for i = 1, #KEYS do
  out[#out + 1] = used[i]
  out[#out + 1] = resets[i]
end
return out
