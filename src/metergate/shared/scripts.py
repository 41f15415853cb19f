"""The Lua scripts that keep budgets and rate limits exact across a fleet.

Each script runs atomically inside Redis, so "check every limit, then hold" needs no
lock and one round trip. Times come from Redis's own clock (`TIME`), so replicas with
skewed clocks still share one timeline. Integers are exact in Lua's doubles up to 2^53:
nano-USD up to $9M per budget period and microseconds since 1970 both fit.

Key layout (prefix `mg:` by default):
  rate:{key|model}:{name}:{rpm|tpm}   GCRA theoretical arrival time, microseconds (PX TTL)
  budget:{name}:{scope}={target}:{period start}:spent   nano-USD settled in the period
  budget:...:held    hash: holder id -> nano-USD held by that process's requests in flight
  budget:...:alerts  hash: threshold percent -> the limit (nano-USD) at which some process
                     announced it (1: by an older release, at the limit then); a raised
                     limit announces it again when reached, as a process alone does
  budget:...:seed    hash: cut -> when the counter was seeded, seen -> ledger spend before it
  live:{holder id}   exists while that process is alive (short TTL, refreshed)
  fence:{holder id}  the sequence number of that process's last settle Redis ran, or
                     after an outage the fence below which its late calls are not run
Budget keys expire a day after their period ends; a fence a day after its last use.

Scripts must touch only the keys they are given, except `live:*`, which the admit
script checks for each holder in a hash, and the caller's own `fence:*`, named in its
arguments: so Redis Cluster is not supported (one primary, with replicas or Sentinel, is).

Why the fence: a call Redis did not answer in time may still run. A stalled Redis (a
paused process, a partition) runs what it received once it resumes, after the caller
has counted that spend to add in the recovery: without the fence it would count twice.
Each process numbers its settles and admissions in the order it sends them, on one
connection, so Redis runs them in that order; a settle records its number. The
recovery (`FENCE`) reads the last number Redis ran, which says which unanswered
settles ran, and raises the fence to the last number sent, so that none runs later.
"""

from __future__ import annotations

# The fence check that starts ADMIT and SETTLE: ARGV[fence_at] names this process's
# fence key, ARGV[fence_at + 1] is the call's number. A call at or below the fence is a
# late one from before an outage's recovery: it does nothing.
_FENCED = """
local fence_key, number = ARGV[%d], tonumber(ARGV[%d])
local fenced = tonumber(redis.call('GET', fence_key) or '0') >= number
"""

# Reply codes of ADMIT.
ADMITTED, RATE_LIMITED, OVER_BUDGET, NEEDS_SEED, FENCED = 1, 0, -1, -2, -3

# KEYS: one per rate-limit bucket, then (spent, held) per budget.
# ARGV: holder, live prefix, worst (nano-USD),
#       "kind interval_us window_us ..." per bucket (kind r = requests, t = tokens),
#       "limit hard expire_at ..." per budget (hard 1|0), fence key, call number.
# Reply: "code index a b remaining_1 reset_1 ... remaining_n reset_n" (integers)
#   ADMITTED: index 0;  RATE_LIMITED: bucket index, a = retry_us;
#   OVER_BUDGET: budget index, a = spent, b = held;  NEEDS_SEED: the budgets' indexes;
#   FENCED: nothing done (a late call; its caller has long given up on it).
ADMIT = (
    (_FENCED % (6, 7))
    + """
if fenced then return '-3 0 0 0' end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local holder, live, worst = ARGV[1], ARGV[2], tonumber(ARGV[3])
local rate, budget = {}, {}
for v in string.gmatch(ARGV[4], '%S+') do rate[#rate + 1] = v end
for v in string.gmatch(ARGV[5], '%S+') do budget[#budget + 1] = v end
local n_rate = #rate / 3
local states, commit, refusal = {}, {}, nil
for i = 1, n_rate do
  local a = (i - 1) * 3
  local kind, interval, window = rate[a + 1], tonumber(rate[a + 2]), tonumber(rate[a + 3])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  if kind == 'r' then
    local after = tat + interval
    if after - now > window then
      refusal = refusal or {i, after - window - now}
      states[#states + 1] = 0; states[#states + 1] = tat - now
    else
      commit[i] = after
      states[#states + 1] = math.floor((window - (after - now)) / interval)
      states[#states + 1] = after - now
    end
  elseif tat - now >= window then
    refusal = refusal or {i, tat - now - window + 1}
    states[#states + 1] = 0; states[#states + 1] = tat - now
  else
    states[#states + 1] = math.floor((window - (tat - now)) / interval)
    states[#states + 1] = tat - now
  end
end
local function reply(code, index, a, b)  -- one string: far cheaper to parse in redis-py
  local out = {code, index, a, b}
  for k = 1, #states do out[#out + 1] = states[k] end
  for k = 1, #out do out[k] = string.format('%d', out[k]) end
  return table.concat(out, ' ')
end
if refusal then return reply(0, refusal[1], refusal[2], 0) end
local n_budget = (#KEYS - n_rate) / 2
local spent, missing = {}, {}
for j = 1, n_budget do
  local value = redis.call('GET', KEYS[n_rate + 2 * j - 1])
  if value then spent[j] = tonumber(value) else missing[#missing + 1] = j end
end
if #missing > 0 then return '-2 0 0 0 ' .. table.concat(missing, ' ') end
for j = 1, n_budget do
  local a = (j - 1) * 3
  if budget[a + 2] == '1' then
    local held_key, held = KEYS[n_rate + 2 * j], 0
    local fields = redis.call('HGETALL', held_key)
    for f = 1, #fields, 2 do
      if redis.call('EXISTS', live .. fields[f]) == 1 then
        held = held + tonumber(fields[f + 1])
      else
        redis.call('HDEL', held_key, fields[f])  -- a dead process's holds stop counting
      end
    end
    if spent[j] + held + worst > tonumber(budget[a + 1]) then
      return reply(-1, j, spent[j], held)
    end
  end
end
for i, tat in pairs(commit) do
  redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
for j = 1, worst > 0 and n_budget or 0 do
  local held_key = KEYS[n_rate + 2 * j]
  redis.call('HINCRBY', held_key, holder, worst)
  redis.call('EXPIREAT', held_key, budget[(j - 1) * 3 + 3])
end
return reply(1, 0, 0, 0)
"""
)

# KEYS: one per token bucket, then (spent, held, alerts) per budget.
# ARGV: holder, tokens, "interval_us ..." per token bucket,
#       "amount cost expire_at limit percents ..." per budget: the hold to release, the
#       real cost, and the alert thresholds as "50,80,100" ("-" for none); fence key,
#       call number (recorded as the last one run).
# Reply: {spent_1, claimed_1, ...}: spent -1 when the counter is missing (evicted: the
#   next admission re-seeds it from the ledger); claimed: bit k-1 set when this caller
#   is the one process that announces threshold k. Empty when fenced (nothing done).
SETTLE = (
    (_FENCED % (5, 6))
    + """
if fenced then return {} end
redis.call('SET', fence_key, ARGV[6], 'EX', 86400)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local holder, tokens = ARGV[1], tonumber(ARGV[2])
local intervals, budget = {}, {}
for v in string.gmatch(ARGV[3], '%S+') do intervals[#intervals + 1] = tonumber(v) end
for v in string.gmatch(ARGV[4], '%S+') do budget[#budget + 1] = v end
local n_tok = #intervals
if tokens > 0 then
  for i = 1, n_tok do
    local tat = tonumber(redis.call('GET', KEYS[i]) or now)
    if tat < now then tat = now end
    tat = tat + math.ceil(tokens * intervals[i])
    redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
end
local out = {}
local n_budget = (#KEYS - n_tok) / 3
for j = 1, n_budget do
  local spent_key, held_key = KEYS[n_tok + 3*j - 2], KEYS[n_tok + 3*j - 1]
  local alerts_key = KEYS[n_tok + 3*j]
  local a = (j - 1) * 5
  local amount, actual = tonumber(budget[a + 1]), tonumber(budget[a + 2])
  local expire_at, limit = budget[a + 3], tonumber(budget[a + 4])
  if amount > 0 and redis.call('HINCRBY', held_key, holder, -amount) <= 0 then
    redis.call('HDEL', held_key, holder)
  end
  local spent, claimed = -1, 0
  if redis.call('EXISTS', spent_key) == 1 then
    spent = redis.call('INCRBY', spent_key, actual)
    local bit = 1
    for percent in string.gmatch(budget[a + 5], '%d+') do
      if spent * 100 >= limit * tonumber(percent) then
        local at = tonumber(redis.call('HGET', alerts_key, percent) or '0')
        if at == 1 then at = limit end  -- claimed by an older release at this limit
        if at ~= limit then redis.call('HSET', alerts_key, percent, limit) end
        if at < limit then  -- never announced, or below a limit raised since
          claimed = claimed + bit
        end
      end
      bit = bit * 2
    end
    redis.call('EXPIREAT', alerts_key, expire_at)
  end
  out[#out + 1] = spent; out[#out + 1] = claimed
end
return out
"""
)

# Seed budgets from the ledger, count spend Redis missed, and re-assert this process's
# holds (at start, after an outage, and when a counter went missing).
# A counter counts the ledger's rows dated before its cut (a time, chosen by the process
# that seeds it) and, added by the process that settled it, every spend dated from the
# cut on. Each process reads the rows before the cut after flushing its own: the counter
# takes the largest sum read (`seen`), so rows still being written when it was seeded
# are counted once, when a later read sees them.
# KEYS: (spent, held, alerts, seed) per budget.
# ARGV: holder; per budget: cut (proposed: used when the counter is missing), the
#       ledger's spend before it, spend settled here from it on that Redis lacks, what
#       this process holds now (-1: leave its holds alone), expire_at, limit, "50,80,100".
# Reply: {spent_1, cut_1, ...}: when cut_n is not the caller's, nothing was counted for
#   budget n (its holds were set): read the ledger before cut_n and call again.
SYNC = """
local out = {}
for j = 1, #KEYS / 4 do
  local spent_key, held_key = KEYS[4*j - 3], KEYS[4*j - 2]
  local alerts_key, seed_key = KEYS[4*j - 1], KEYS[4*j]
  local a = 1 + (j - 1) * 7
  local cut, ledger, unsynced = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local holding, expire_at, limit = tonumber(ARGV[a + 4]), ARGV[a + 5], tonumber(ARGV[a + 6])
  local total = ledger + unsynced
  if redis.call('SET', spent_key, string.format('%d', total), 'NX') then
    redis.call('EXPIREAT', spent_key, expire_at)
    redis.call('HSET', seed_key, 'cut', cut, 'seen', ARGV[a + 2])
    redis.call('EXPIREAT', seed_key, expire_at)
    for percent in string.gmatch(ARGV[a + 7], '%d+') do
      if total * 100 >= limit * tonumber(percent) then
        redis.call('HSETNX', alerts_key, percent, limit)
      end
    end
    redis.call('EXPIREAT', alerts_key, expire_at)
  else
    local have = redis.call('HGET', seed_key, 'cut') or '0'  -- 0: all spend is added
    if tonumber(have) == tonumber(cut) then
      local seen = tonumber(redis.call('HGET', seed_key, 'seen') or '0')
      if ledger > seen then  -- rows before the cut written since it was seeded
        redis.call('INCRBY', spent_key, string.format('%d', ledger - seen))
        redis.call('HSET', seed_key, 'seen', ARGV[a + 2])
      end
      if unsynced > 0 then
        redis.call('INCRBY', spent_key, ARGV[a + 3])
      end
    end
    cut = have
  end
  if holding > 0 then
    redis.call('HSET', held_key, ARGV[1], ARGV[a + 4])
    redis.call('EXPIREAT', held_key, expire_at)
  elseif holding == 0 then
    redis.call('HDEL', held_key, ARGV[1])
  end
  out[#out + 1] = tonumber(redis.call('GET', spent_key)); out[#out + 1] = cut
end
return out
"""

# After an outage, before anything else: KEYS: this process's fence key. ARGV: the
# number of the last call this process sent. Reply: the number of the last settle
# Redis ran (0: none, or Redis lost its data), which the caller compares with those it
# had no answer for; no call numbered up to ARGV[1] runs from now on.
FENCE = """
local ran = tonumber(redis.call('GET', KEYS[1]) or '0')
redis.call('SET', KEYS[1], ARGV[1], 'EX', 86400)
return ran
"""

# KEYS: this process's liveness key. ARGV: TTL in ms. Reply: 1 when it still existed
# (0 means it lapsed, and other processes may have dropped this process's holds).
HEARTBEAT = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return existed
"""

# KEYS: budgets' held hashes. ARGV: live prefix. Reply: per hash, what its live holders
# hold (a dead process's holds left in it, which the next admission drops, are skipped).
HELD = """
local out = {}
for k = 1, #KEYS do
  local held, fields = 0, redis.call('HGETALL', KEYS[k])
  for f = 1, #fields, 2 do
    if redis.call('EXISTS', ARGV[1] .. fields[f]) == 1 then
      held = held + tonumber(fields[f + 1])
    end
  end
  out[k] = held
end
return out
"""
