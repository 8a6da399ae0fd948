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
local STATE_TTL = {{state_ttl_ms}}
local HEADROOM = {{headroom}}
local CD_BASE = {{cooldown_base_us}}
local CD_MAX = {{cooldown_max_us}}
local PROBE = {{probe_period_us}}
local HUGE = 2 ^ 53
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

local function fits(l, ur, ui, uo, ci, co)
  local input = ui + ci
  local output = uo + co
  return ur < l[1]
    and (l[2] < 0 or input + output <= l[2])
    and (l[3] < 0 or input <= l[3])
    and (l[4] < 0 or output <= l[4])
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
  if which == 1 or which == 2 then
    local function lower(limit, used)
      if limit < 0 then return limit end
      return clamp(used, math.max(math.floor(limit / 2), 1), math.max(limit, 1))
    end
    l[2] = lower(l[2], obs[2] + obs[3])
    l[3] = lower(l[3], obs[2])
    l[4] = lower(l[4], obs[3])
  end
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

local function entry(id, at, r, i, o, s) return struct.pack(ENT, id, at, r, i, o, s) end

-- An entry's requests, input, output, settled flag and stamp.
local function parse(m)
  local _, at, r, i, o, s = struct.unpack(ENT, m)
  return r, i, o, s, at
end

-- Loads a budget's state into b (which names its `log` and `st` keys). The
-- adaptive part comes from `conf` when none was saved (or `conf` is nil
-- and nothing will read it): only what a decision reads (configured,
-- learned, cooldown); a caller that will change it starts a full one
-- with `new_ada`. The use part counts only before `ex`: after
-- it the entries have expired, so the sums start over (ids never do).
-- `known`: the stored oldest (`ol`, 0 when empty) and newest (`la`) stamps
-- are valid (`lv` equals the last id; a write that could not maintain them
-- leaves `lv` behind).
local function load_state(b, conf, now)
  local s = redis.call('GET', b.st)
  local v = s and { struct.unpack(ST, s) } or nil
  if v and v[2] == 1 then
    b.a = {
      conf = { v[14], v[15], v[16], v[17] }, learned = { v[18], v[19], v[20], v[21] },
      cu = v[22], sk = v[23], lc = v[24], pm = v[25], rs = v[26], ts = v[27], pr = v[28],
    }
    b.has_ada = true
  else
    b.a = conf and { conf = conf, learned = scale(conf, HEADROOM), cu = 0 } or nil
    b.has_ada = false
  end
  b.last_id = v and v[9] or 0
  if v and v[1] == 1 and now < v[10] then
    b.u = { v[3], v[4], v[5], v[6], v[7], v[8] }
    b.ex = v[10]
    b.existed = true
    b.known = v[13] == v[9]
    b.ol = v[11]
    b.la = v[12] ~= 0 and v[12] or nil
  else
    b.u = { 0, 0, 0, 0, 0, 0 }
    b.ex = nil
    b.existed = false
    b.known, b.ol, b.la = true, 0, nil
  end
  b.dirty = false
end

-- Writes the whole state in one SET, living as long as adaptive state
-- does. The entries' TTL (ZADD and ZREM keep it) is set only when they may
-- lack one (no use part before, or `created`: the log was empty before an
-- entry was added), or when an entry added at `at` could outlive it:
-- refreshed once less than half the slack past the window is left.
local function save_state(b, now, created, at)
  if not b.dirty then return end
  if not b.existed or created
    or (at and (not b.ex or b.ex < at + W + (LOG_TTL * 1000 - W) / 2)) then
    redis.call('PEXPIRE', b.log, LOG_TTL)
    b.ex = now + LOG_TTL * 1000
  end
  local u, a = b.u, b.a
  local lv = b.known and b.last_id or -1
  if b.has_ada then
    redis.call('SET', b.st, struct.pack(ST, 1, 1, u[1], u[2], u[3], u[4], u[5], u[6],
      b.last_id, b.ex, b.ol, b.la or 0, lv,
      a.conf[1], a.conf[2], a.conf[3], a.conf[4],
      a.learned[1], a.learned[2], a.learned[3], a.learned[4],
      a.cu, a.sk, a.lc, a.pm, a.rs, a.ts, a.pr), 'PX', STATE_TTL)
  else
    redis.call('SET', b.st, struct.pack(ST, 1, 0, u[1], u[2], u[3], u[4], u[5], u[6],
      b.last_id, b.ex, b.ol, b.la or 0, lv,
      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), 'PX', STATE_TTL)
  end
  b.existed = true
  b.dirty = false
end

local function account(b, sign, r, i, o, s)
  local u = b.u
  u[1] = u[1] + sign * r
  u[2] = u[2] + sign * i
  u[3] = u[3] + sign * o
  if s == 0 then
    u[4] = u[4] + sign * r
    u[5] = u[5] + sign * i
    u[6] = u[6] + sign * o
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
  local cut = now - W
  if b.known and (b.ol == 0 or b.ol >= cut) then return end
  local head = redis.call('ZRANGE', b.log, 0, 3)
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
    b.ol = nxt
    return
  end
  if nxt == 0 and #head == 4 then
    -- More than the head may be old: the rest of them, then the new oldest.
    local rest = redis.call('ZRANGEBYSCORE', b.log, '-inf', '(' .. I(cut), 'LIMIT', 4, -1)
    for k = 1, #rest do
      local r, i, o, s = parse(rest[k])
      account(b, -1, r, i, o, s)
    end
    old = old + #rest
    local n = redis.call('ZRANGE', b.log, old, old)
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
  b.ol = b.nxt
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
  local last = redis.call('ZRANGE', b.log, -1, -1)
  if #last == 0 then return nil end
  local _, _, _, _, at = parse(last[1])
  return at
end

-- The fraction of the tightest dimension left after the charge, or nil.
local function fraction(used, max)
  if max < 0 then return 1.0 end
  if max == 0 then return 0.0 end
  return clamp(math.max(max - used, 0) / max, 0.0, 1.0)
end

local function headroom_after(b, l, ci, co)
  local u = b.u
  if not fits(l, u[1], u[2], u[3], ci, co) then return nil end
  local input = u[2] + ci
  local output = u[3] + co
  return math.min(fraction(u[1] + 1, l[1]), fraction(input + output, l[2]),
    fraction(input, l[3]), fraction(output, l[4]))
end

-- The earliest time >= now when the charge fits as entries age out; nil if never.
local function earliest_fit(b, l, ci, co, now)
  local u = b.u
  if not fits(l, 0, 0, 0, ci, co) then return nil end
  if fits(l, u[1], u[2], u[3], ci, co) then return now end
  local r, i, o = u[1], u[2], u[3]
  local cut = now - W
  local log = redis.call('ZRANGE', b.log, 0, -1)
  for k = 1, #log do
    local er, ei, eo, _, at = parse(log[k])
    -- Entries scan_old found old are out of the sums already.
    if at >= cut then
      r, i, o = r - er, i - ei, o - eo
      if fits(l, r, i, o, ci, co) then return math.max(at + W + 1, now) end
    end
  end
  return now
end
