-- keygate's fleet quota check: GCRA over every quota of one request, in one atomic call.
--
-- KEYS[i]        the state of quota i for this key: its theoretical arrival time (TAT), in
--                microseconds of Redis's clock
-- ARGV[2i-1]     quota i's emission interval T (microseconds per request)
-- ARGV[2i]       quota i's burst tolerance tau = T * (burst - 1) (microseconds)
--
-- Returns two integers per quota, in KEYS order:
--   1, remaining   admitted; `remaining` requests could be admitted at once after this one
--   0, wait        refused; the next admission is `wait` microseconds away
--
-- Governor's GCRA, exactly: a missing TAT is "now"; a request is admitted when
-- now >= TAT - tau, and then TAT becomes max(TAT, now) + T. Both verdicts are computed before
-- anything is written, and the TATs are written only when every quota admits: a refusal (by
-- any of them) spends nothing. Each TAT expires when it is back in the past (the bucket is
-- full again), so idle keys leave nothing behind.
--
-- TIME is Redis's own clock, the same for every instance of the fleet. Redis 7 replicates a
-- script's effects, not the script, so reading the clock in it is allowed.

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local out = {}
local next_tat = {}
local admitted = true
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tau = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key)) or now
  local earliest = tat - tau
  if now < earliest then
    admitted = false
    out[#out + 1] = 0
    out[#out + 1] = earliest - now
  else
    local tat_after = math.max(tat, now) + interval
    next_tat[i] = tat_after
    out[#out + 1] = 1
    out[#out + 1] = math.floor(math.min(now + tau + interval - tat_after, tau + interval) / interval)
  end
end
if admitted then
  for i, key in ipairs(KEYS) do
    local ttl_ms = math.ceil((next_tat[i] - now) / 1000)
    redis.call('SET', key, string.format('%.0f', next_tat[i]), 'PX', string.format('%.0f', ttl_ms))
  end
end
return out
