-- Choose a region and reserve there, atomically, across all candidates:
-- the same decision as MemoryStore::decide.
-- KEYS: drained set of the model, then entries and state per candidate.
-- ARGV 1..7: reserve (1) or probe (0), strategy (0 most headroom, 1
-- ordered), charge input, charge output, candidate count, lease wanted
-- (requests beyond this one; 0: none), lease length (us); then per
-- candidate: region, configured requests, tokens, input, output.
-- Returns {1, index, id, limits x4, usage x3, empty_at, now, requests}
-- for a grant (empty_at is the entry's stamp + W + 1: settle names the
-- entry by it; requests > 1 is a lease of that many, each of this charge,
-- stamped at the end of its length), {0, now} for a successful probe,
-- {2, retry_at, now} or {3, now} refused.
local now = now_us()
local reserve = ARGV[1] == '1'
local ordered = ARGV[2] == '1'
local ci, co = tonumber(ARGV[3]), tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local want, lease_us = tonumber(ARGV[6]), tonumber(ARGV[7])
local drained = {}
for _, region in ipairs(redis.call('SMEMBERS', KEYS[1])) do drained[region] = true end
local cands = {}
local best, best_h = nil, nil
for k = 1, n do
  local a0 = 7 + (k - 1) * 5
  local kb = 1 + (k - 1) * 2
  local b = { log = KEYS[kb + 1], st = KEYS[kb + 2], drained = drained[ARGV[a0 + 1]] == true }
  load_state(b, now, ARGV, a0 + 2)
  cands[k] = b
  local v = b.v
  if not b.drained and not (now < v[22]) then
    scan_old(b, now)
    local h = headroom_after(v, ci, co)
    if h then
      if best == nil or h > best_h then best, best_h = k, h end
      if ordered then break end
    end
  end
end
if best then
  -- The chosen budget is written once, below; the others keep a few old
  -- entries for a later write to drop.
  for k = 1, #cands do
    if k ~= best or not reserve then tidy(cands[k], now) end
  end
  if not reserve then return { 0, now } end
  local b = cands[best]
  local v = b.v
  drop_old(b, now)
  local last
  -- When 11 and 12 are right (scan_old() has just found the oldest stamp),
  -- no entry means an empty log.
  if v[13] == v[9] and v[11] == 0 then
    last = nil
  elseif v[13] == v[9] and v[12] ~= 0 then
    last = v[12]
  else
    last = last_at(b)
  end
  local at = math.max(last or now, now)
  local r = 1
  if want > 0 then
    r = 1 + lease_extra(v, ci, co, want)
    -- Its requests go out until the lease ends: counting them from then
    -- keeps the ledger's window over every one of them.
    if r > 1 then at = at + lease_us end
  end
  local id = math.max(v[9] + 1, now * 4)
  v[9] = id
  redis.call('ZADD', b.log, I(at), entry(id, at, r, ci * r, co * r, 0))
  account(b, 1, r, ci * r, co * r, 0)
  if v[11] == 0 then v[11] = at end
  v[12] = at
  v[13] = id
  save_state(b, now, last == nil, at)
  return { 1, best, id, v[18], v[19], v[20], v[21], v[3], v[4], v[5], at + W + 1, now, r }
end
local retry = nil
for k = 1, #cands do
  local b = cands[k]
  if not b.drained then
    if not b.old then scan_old(b, now) end
    tidy(b, now)
    local v = b.v
    local t = earliest_fit(b, ci, co, now)
    if t then
      t = math.max(t, v[22])
    elseif fits_at(v, 14, 0, 0, 0, ci, co) then
      t = now + NEVER_FIT_RETRY
    end
    if t and (retry == nil or t < retry) then retry = t end
  end
end
if retry then return { 2, retry, now } end
return { 3, now }
