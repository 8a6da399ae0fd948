-- The top of the library every Spillway quota function lives in. Mirrors
-- spillway-core's Ledger and Adaptive exactly, on the Redis server's clock.
--
-- Time is microseconds since the Unix epoch from TIME (exact in a double
-- until the year 2255). Limits are {requests, tokens, input, output} with
-- -1 for "not enforced".
--
-- Loaded once as a Redis function library (FUNCTION LOAD): this file,
-- then every script below wrapped as a registered function. The constants
-- are this deployment's settings, written into the code when it is built
-- (`store.rs`), so a call carries only its own arguments; the library's
-- name is a hash of its code, so deployments with other settings (or
-- another Spillway version) load their own beside it.
--
-- A budget is two keys, so that a decision reads each with one command:
-- `entries`, a sorted set of its entries scored by stamp, each member
-- packing (id, stamp, requests, input, output, settled), so reading one
-- needs no `WITHSCORES` (formatting a score costs more than unpacking
-- it); and `state`, one packed
-- string with the running sums and the log's index (the "use" part, valid
-- until `ex`, when the entries expire) and the adaptive state (configured,
-- learned, cooldown, probing). Packed with `struct` (doubles): one C call
-- reads or writes all of it, where a field per number cost a `tonumber` or
-- `string.format` each (BENCHMARKS.md, "Admission latency").

local W = {{window_us}}
local LOG_TTL = {{log_ttl_ms}}
local HEADROOM = {{headroom}}
local CD_BASE = {{cooldown_base_us}}
local CD_MAX = {{cooldown_max_us}}
local PROBE = {{probe_period_us}}
local HUGE = 2 ^ 53
-- The most of a budget's room left after a request that one lease may take.
local LEASE_SHARE = 0.25
local NEVER_FIT_RETRY = 60000000

local function I(x) return string.format('%d', x) end

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function limits_at(a, i)
  return { tonumber(a[i]), tonumber(a[i + 1]), tonumber(a[i + 2]), tonumber(a[i + 3]) }
end

-- (No closures inside helpers: Lua allocates one per call, and these run
-- on every decision.)
local function scaled(v, f)
  if v < 0 then return v end
  return math.max(math.floor(v * f), 1)
end

local function scale(l, f)
  return { math.min(scaled(l[1], f), 4294967295), scaled(l[2], f), scaled(l[3], f), scaled(l[4], f) }
end

local function same(a, b)
  return a[1] == b[1] and a[2] == b[2] and a[3] == b[3] and a[4] == b[4]
end

local function token_capacity(l)
  local split = nil
  if l[3] >= 0 and l[4] >= 0 then split = l[3] + l[4] end
  if l[2] >= 0 and split then return math.min(l[2], split) end
  if l[2] >= 0 then return l[2] end
  if split then return split end
  return HUGE
end

-- Adaptive -----------------------------------------------------------------

local function reset_steps(a)
  local c = scale(a.conf, HEADROOM)
  a.rs = math.max(math.floor(c[1] / 50), 1)
  a.ts = math.max(math.floor(math.min(token_capacity(c), HUGE / 4) / 50), 1)
end

local function new_ada(conf)
  local a = { conf = conf, learned = scale(conf, HEADROOM), cu = 0, sk = 0, lc = 0, pm = 1, pr = 0 }
  reset_steps(a)
  return a
end

-- Extends the cooldown: max(), so a shorter signal never shortens one in force.
local function cool_down(a, now, jitter)
  a.sk = a.sk + 1
  local growth = 2 ^ math.min(math.max(a.sk - 1, 0), 16)
  local base = math.min(CD_BASE * growth, CD_MAX)
  local j = math.min(math.max(jitter, 0), 1)
  a.cu = math.max(a.cu, now + math.floor(base * (0.8 + 0.4 * j)))
end

local function clamp(x, lo, hi) return math.min(math.max(x, lo), hi) end

local function on_rate_limited(a, now, obs, which, jitter)
  cool_down(a, now, jitter)
  local failed = a.pr == 1
  a.pr = 0
  local l = a.learned
  if which == 0 or which == 2 then
    local floor = math.max(math.floor(l[1] / 2), 1)
    l[1] = clamp(obs[1], floor, math.max(l[1], floor))
  end
  -- which: 0 requests, 1 every token limit, 2 both, 3 input, 4 output.
  local function lower(limit, used)
    if limit < 0 then return limit end
    return clamp(used, math.max(math.floor(limit / 2), 1), math.max(limit, 1))
  end
  -- A named split metric on a budget without that split limit: the
  -- combined limit is what binds, learn it there.
  local all_tokens = which == 1 or which == 2
    or (which == 3 and l[3] < 0) or (which == 4 and l[4] < 0)
  if all_tokens then l[2] = lower(l[2], obs[2] + obs[3]) end
  if all_tokens or which == 3 then l[3] = lower(l[3], obs[2]) end
  if all_tokens or which == 4 then l[4] = lower(l[4], obs[3]) end
  if failed then a.pm = math.min(a.pm * 2, 8) end
  reset_steps(a)
  a.lc = now
end

local function on_success(a, now)
  a.sk = 0
  local c = scale(a.conf, HEADROOM)
  if same(a.learned, c) then
    a.pr = 0
    a.pm = 1
    return
  end
  if math.max(now - a.lc, 0) < PROBE * a.pm then return end
  if a.pr == 1 then a.pm = 1 end
  local l = a.learned
  l[1] = math.min(l[1] + a.rs, c[1])
  for k = 2, 4 do
    if l[k] >= 0 and c[k] >= 0 then l[k] = math.min(l[k] + a.ts, c[k]) end
  end
  a.rs = a.rs * 2
  a.ts = a.ts * 2
  a.pr = 1
  a.lc = now
end

-- Ledger -------------------------------------------------------------------

-- 28 doubles (a library's top level may not call `string` in Redis 7.0).
local ST = '<dddddddddddddddddddddddddddd'
local ENT = '<dddddd'
-- Numbers passed to `redis.call` are formatted as floats (slow, and
-- printed as `6e+04`-style text past 14 digits): constant arguments go as
-- text, and stamps through `I`.
local LOG_TTL_TEXT = '{{log_ttl_ms}}'
local STATE_TTL_TEXT = '{{state_ttl_ms}}'

-- A budget's state is the array `v` of the 28 numbers it is stored as, read
-- and written in place: a table per part (sums, limits, adaptive) cost an
-- allocation each on every decision. Positions:
--   1 the use part is valid        2 the adaptive part is valid
--   3-5 usage requests, input, output (every entry in the window)
--   6-8 the same for entries not yet settled (in flight)
--   9 the last entry id            10 `ex`: when the entries expire
--   11 oldest stamp (0: none)      12 newest stamp (0: none)
--   13 the last id when 11-12 were right (11-12 are trusted when 13 == 9)
--   14-17 configured limits        18-21 learned limits
--   22 cooldown until  23 strikes  24 last change  25 probe multiplier
--   26 requests step   27 tokens step   28 probing (0/1)
-- Limits are requests, tokens, input, output; -1 is "not enforced".
local FRESH = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }

local function entry(id, at, r, i, o, s) return struct.pack(ENT, id, at, r, i, o, s) end

-- An entry's requests, input, output, settled flag and stamp.
local function parse(m)
  local _, at, r, i, o, s = struct.unpack(ENT, m)
  return r, i, o, s, at
end

-- Loads a budget's state into `b.v` (b names its `log` and `st` keys).
-- Without a saved adaptive part, decisions use the configured limits
-- given at `args[ai..ai+3]` (none given: the caller sets them itself).
-- The use part counts only before `ex`: after it the entries have
-- expired, so the sums start over (ids never do).
local function load_state(b, now, args, ai)
  local s = redis.call('GET', b.st)
  local v
  if s then
    v = { struct.unpack(ST, s) }
    v[29] = nil
  else
    v = { unpack(FRESH) }
  end
  if v[2] ~= 1 and args then
    for k = 0, 3 do
      local c = tonumber(args[ai + k])
      v[14 + k] = c
      v[18 + k] = scaled(c, HEADROOM)
    end
    v[18] = math.min(v[18], 4294967295)
    v[22] = 0
  end
  b.existed = v[1] == 1 and now < v[10]
  if not b.existed then
    v[3], v[4], v[5], v[6], v[7], v[8] = 0, 0, 0, 0, 0, 0
    v[10], v[11], v[12], v[13] = 0, 0, 0, v[9]
  end
  b.v = v
  b.dirty = false
end

-- The adaptive part as `Adaptive`'s fields, for the functions above; a
-- budget without one starts from its configured limits.
local function adaptive_of(v)
  local conf = { v[14], v[15], v[16], v[17] }
  if v[2] ~= 1 then return new_ada(conf) end
  return {
    conf = conf, learned = { v[18], v[19], v[20], v[21] },
    cu = v[22], sk = v[23], lc = v[24], pm = v[25], rs = v[26], ts = v[27], pr = v[28],
  }
end

local function store_adaptive(b, a)
  local v = b.v
  v[14], v[15], v[16], v[17] = a.conf[1], a.conf[2], a.conf[3], a.conf[4]
  v[18], v[19], v[20], v[21] = a.learned[1], a.learned[2], a.learned[3], a.learned[4]
  v[22], v[23], v[24], v[25], v[26], v[27], v[28] = a.cu, a.sk, a.lc, a.pm, a.rs, a.ts, a.pr
  v[2] = 1
  b.dirty = true
end

-- Writes the whole state in one SET, living as long as adaptive state
-- does. The entries' TTL (ZADD and ZREM keep it) is set only when they may
-- lack one (no use part before, or `created`: the log was empty before an
-- entry was added), or when an entry added at `at` could outlive it:
-- refreshed once less than half the slack past the window is left.
local function save_state(b, now, created, at)
  if not b.dirty then return end
  local v = b.v
  if not b.existed or created
    or (at and v[10] < at + W + (LOG_TTL * 1000 - W) / 2) then
    redis.call('PEXPIRE', b.log, LOG_TTL_TEXT)
    v[10] = now + LOG_TTL * 1000
  end
  v[1] = 1
  redis.call('SET', b.st, struct.pack(ST, unpack(v, 1, 28)), 'PX', STATE_TTL_TEXT)
  b.existed = true
  b.dirty = false
end

local function account(b, sign, r, i, o, s)
  local v = b.v
  v[3] = v[3] + sign * r
  v[4] = v[4] + sign * i
  v[5] = v[5] + sign * o
  if s == 0 then
    v[6] = v[6] + sign * r
    v[7] = v[7] + sign * i
    v[8] = v[8] + sign * o
  end
  b.dirty = true
end

-- Finds the entries strictly older than the window (one exactly W old
-- still counts) and takes them out of b's sums, in memory only: no command
-- while the oldest stamp is in the window. `drop_old` then deletes them. A
-- budget a decision only looks at is never written: its old entries stay
-- until a write to it drops them, and every reader skips them (the stored
-- sums always equal the entries stored). Only a few, though: a budget with
-- more than the head to drop is written anyway (`tidy`), so no reader ever
-- rescans a long tail of old entries.
local function scan_old(b, now)
  b.old, b.nxt = 0, 0
  local v = b.v
  local cut = now - W
  if v[13] == v[9] and (v[11] == 0 or v[11] >= cut) then return end
  local head = redis.call('ZRANGE', b.log, '0', '3')
  local old, nxt = 0, 0
  for k = 1, #head do
    local r, i, o, s, at = parse(head[k])
    if at < cut then
      account(b, -1, r, i, o, s)
      old = old + 1
    else
      nxt = at
      break
    end
  end
  if old == 0 then
    v[11] = nxt
    return
  end
  if nxt == 0 and #head == 4 then
    -- More than the head may be old: the rest of them, then the new oldest.
    local rest = redis.call('ZRANGEBYSCORE', b.log, '-inf', '(' .. I(cut), 'LIMIT', '4', '-1')
    for k = 1, #rest do
      local r, i, o, s = parse(rest[k])
      account(b, -1, r, i, o, s)
    end
    old = old + #rest
    local n = redis.call('ZRANGE', b.log, I(old), I(old))
    if n[1] then
      local _, _, _, _, at = parse(n[1])
      nxt = at
    end
  end
  b.old, b.nxt = old, nxt
end

local function drop_old(b, now)
  if not b.old or b.old == 0 then return end
  redis.call('ZREMRANGEBYSCORE', b.log, '-inf', '(' .. I(now - W))
  b.v[11] = b.nxt
  b.old = 0
  b.dirty = true
end

local function evict(b, now)
  scan_old(b, now)
  drop_old(b, now)
end

-- For a budget a decision looked at but did not write.
local function tidy(b, now)
  if b.old and b.old > 4 then
    drop_old(b, now)
    save_state(b, now)
  end
end

local function last_at(b)
  local last = redis.call('ZRANGE', b.log, '-1', '-1')
  if #last == 0 then return nil end
  local _, _, _, _, at = parse(last[1])
  return at
end

-- What a budget learns from how a request ended (after its charge is
-- settled): outcome 0 used, 1 rate limited (the usage it saw, less that
-- request, is what the limit held), 2 unavailable, 3 nothing to learn.
local function learn(b, now, outcome, which, jitter)
  if outcome == 3 then return end
  local v = b.v
  local a = adaptive_of(v)
  if outcome == 0 then
    on_success(a, now)
  elseif outcome == 1 then
    on_rate_limited(a, now, { math.max(v[3] - 1, 0), v[4], v[5] }, which, jitter)
  else
    cool_down(a, now, jitter)
  end
  store_adaptive(b, a)
end

-- Whether a charge fits under the limits at v[l..l+3] on top of usage.
local function fits_at(v, l, ur, ui, uo, ci, co)
  local input = ui + ci
  local output = uo + co
  local tokens, inl, outl = v[l + 1], v[l + 2], v[l + 3]
  return ur < v[l]
    and (tokens < 0 or input + output <= tokens)
    and (inl < 0 or input <= inl)
    and (outl < 0 or output <= outl)
end

-- The fraction of the tightest dimension left after the charge, or nil.
local function fraction(used, max)
  if max < 0 then return 1.0 end
  if max == 0 then return 0.0 end
  return clamp(math.max(max - used, 0) / max, 0.0, 1.0)
end

-- Against the learned limits (v[18..21]).
local function headroom_after(v, ci, co)
  if not fits_at(v, 18, v[3], v[4], v[5], ci, co) then return nil end
  local input = v[4] + ci
  local output = v[5] + co
  return math.min(fraction(v[3] + 1, v[18]), fraction(input + output, v[19]),
    fraction(input, v[20]), fraction(output, v[21]))
end

-- The earliest time >= now when the charge fits the learned limits as
-- entries age out; nil if never.
local function earliest_fit(b, ci, co, now)
  local v = b.v
  if not fits_at(v, 18, 0, 0, 0, ci, co) then return nil end
  if fits_at(v, 18, v[3], v[4], v[5], ci, co) then return now end
  local r, i, o = v[3], v[4], v[5]
  local cut = now - W
  local log = redis.call('ZRANGE', b.log, '0', '-1')
  for k = 1, #log do
    local er, ei, eo, _, at = parse(log[k])
    -- Entries scan_old found old are out of the sums already.
    if at >= cut then
      r, i, o = r - er, i - ei, o - eo
      if fits_at(v, 18, r, i, o, ci, co) then return math.max(at + W + 1, now) end
    end
  end
  return now
end

-- How many more requests of this charge a lease may hold on top of it:
-- at most `want`, and at most LEASE_SHARE of what the learned limits leave
-- after it in every dimension, so a busy replica never holds the room the
-- others need (near the limit, leases shrink to nothing).
local function lease_cap(x, limit, used, per)
  if limit < 0 or per <= 0 then return x end
  return math.min(x, math.floor((limit - used - per) * LEASE_SHARE / per))
end

local function lease_extra(v, ci, co, want)
  local x = math.min(want, math.floor((v[18] - v[3] - 1) * LEASE_SHARE))
  x = lease_cap(x, v[19], v[4] + v[5], ci + co)
  x = lease_cap(x, v[20], v[4], ci)
  x = lease_cap(x, v[21], v[5], co)
  return math.max(x, 0)
end
