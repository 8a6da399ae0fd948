-- Choose a region and reserve there, atomically, across all candidates:
-- the same decision as MemoryStore::decide.
-- KEYS: drained set of the model, then entries and state per candidate.
-- ARGV 1..5: reserve (1) or probe (0), strategy (0 most headroom, 1
-- ordered), charge input, charge output, candidate count; then per
-- candidate: region, configured requests, tokens, input, output.
-- Returns {1, index, id, limits x4, usage x3, empty_at, now} for a grant
-- (empty_at is the entry's stamp + W + 1: settle names the entry by it),
-- {0, now} for a successful probe, {2, retry_at, now} or {3, now} refused.
local now = now_us()
local reserve = ARGV[1] == '1'
local ordered = ARGV[2] == '1'
local ci, co = tonumber(ARGV[3]), tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local drained = {}
for _, region in ipairs(redis.call('SMEMBERS', KEYS[1])) do drained[region] = true end
local cands = {}
local best, best_h = nil, nil
for k = 1, n do
  local a0 = 5 + (k - 1) * 5
  local kb = 1 + (k - 1) * 2
  local b = { log = KEYS[kb + 1], st = KEYS[kb + 2] }
  b.drained = drained[ARGV[a0 + 1]] == true
  load_state(b, limits_at(ARGV, a0 + 2), now)
  cands[k] = b
  if not b.drained and not (now < b.a.cu) then
    scan_old(b, now)
    local h = headroom_after(b, b.a.learned, ci, co)
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
  drop_old(b, now)
  local last
  if b.known and b.ol == 0 then
    last = nil
  elseif b.known and b.la then
    last = b.la
  else
    last = last_at(b)
  end
  local at = math.max(last or now, now)
  local id = math.max(b.last_id + 1, now * 4)
  b.last_id = id
  redis.call('ZADD', b.log, I(at), entry(id, at, 1, ci, co, 0))
  account(b, 1, 1, ci, co, 0)
  -- scan_old() has just found the oldest stamp (0 when the log is empty).
  if b.ol == 0 then b.ol = at end
  b.la = at
  b.known = true
  save_state(b, now, last == nil, at)
  local l = b.a.learned
  return { 1, best, id, l[1], l[2], l[3], l[4], b.u[1], b.u[2], b.u[3], at + W + 1, now }
end
local retry = nil
for k = 1, #cands do
  local b = cands[k]
  if not b.drained then
    if not b.old then scan_old(b, now) end
    tidy(b, now)
    local t = earliest_fit(b, b.a.learned, ci, co, now)
    if t then
      t = math.max(t, b.a.cu)
    elseif fits(b.a.conf, 0, 0, 0, ci, co) then
      t = now + NEVER_FIT_RETRY
    end
    if t and (retry == nil or t < retry) then retry = t end
  end
end
if retry then return { 2, retry, now } end
return { 3, now }
