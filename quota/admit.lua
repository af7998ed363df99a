-- Admit one request against every window that applies to it, atomically, in one round trip.
--
-- KEYS[i]  a sorted set per window; ARGV[1] the request id; then per key: kind, limit,
-- window (ms), cost. Members are "<request id>:<cost>". Kinds:
--   "r" requests: one entry each, scored by arrival; counted with ZCARD;
--   "c" concurrency leases: one entry each, scored by expiry (the backstop if a process dies);
--   "t" tokens: weighted entries scored by arrival, with their running sum in KEYS[i] .. ":sum".
-- Time is Redis's own clock, so several machines agree. Nothing is recorded unless every window
-- has room. Returns {allowed, retry_ms, used_1, reset_ms_1, used_2, reset_ms_2, ...}.

local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local allowed, retry = 1, 0
local out = {0, 0}

local function cost_of(member)
  return tonumber(string.match(member, ":(%d+)$"))
end

-- When the entry with this score stops counting.
local function leaves_at(kind, score, window)
  if kind == "c" then return score - now end
  return score + window - now
end

for i, key in ipairs(KEYS) do
  local base = 1 + (i - 1) * 4
  local kind = ARGV[base + 1]
  local limit, window, cost = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]),
    tonumber(ARGV[base + 4])
  local horizon = now - window
  if kind == "c" then horizon = now end
  local used
  if kind == "t" then
    local old = redis.call("ZRANGEBYSCORE", key, "-inf", horizon)
    if #old > 0 then
      local freed = 0
      for _, member in ipairs(old) do freed = freed + cost_of(member) end
      redis.call("ZREMRANGEBYSCORE", key, "-inf", horizon)
      redis.call("DECRBY", key .. ":sum", freed)
    end
    used = tonumber(redis.call("GET", key .. ":sum") or "0")
    if used < 0 then  -- below zero by an entry that outlived its sum (settle.lua once let one)
      redis.call("SET", key .. ":sum", 0, "PX", window + 1000)
      used = 0
    end
  else
    redis.call("ZREMRANGEBYSCORE", key, "-inf", horizon)
    used = redis.call("ZCARD", key)
  end
  local reset = 0
  if used > 0 then
    local oldest = redis.call("ZRANGE", key, 0, 0, "WITHSCORES")
    reset = leaves_at(kind, tonumber(oldest[2]), window)
  end
  out[#out + 1] = used
  out[#out + 1] = reset
  if used + cost > limit then
    allowed = 0
    local wait = window
    if kind == "c" then
      wait = 1000  -- a lease is usually released long before it expires: retry in a second
    elseif kind == "r" then
      -- The request that must leave for this one to fit, by rank.
      local nth = redis.call("ZRANGE", key, used + cost - limit - 1, used + cost - limit - 1,
        "WITHSCORES")
      if #nth > 0 then wait = leaves_at(kind, tonumber(nth[2]), window) end
    else
      local need, freed, start = used + cost - limit, 0, 0
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
    redis.call("PEXPIRE", key, window + 1000)
    if kind == "t" then
      redis.call("INCRBY", key .. ":sum", cost)
      redis.call("PEXPIRE", key .. ":sum", window + 1000)
    end
    out[2 + i * 2 - 1] = out[2 + i * 2 - 1] + cost
  end
end

out[1], out[2] = allowed, retry
return out
