-- Resynchronisation after an outage: records usage admitted locally while
-- Redis was unreachable, as one settled entry stamped with the last local
-- admission, so the shared ledger counts it until it leaves the window.
-- KEYS: entries, state. ARGV: stamp (us), requests, input, output.
local now = now_us()
local b = { log = KEYS[1], st = KEYS[2] }
load_state(b, now)
local v = b.v
evict(b, now)
local at = tonumber(ARGV[1])
if at >= now - W then
  local r, i, o = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local known = v[13] == v[9]
  local id = math.max(v[9] + 1, now * 4)
  v[9] = id
  redis.call('ZADD', b.log, I(at), entry(id, at, r, i, o, 1))
  account(b, 1, r, i, o, 1)
  if v[11] == 0 then v[11] = at else v[11] = math.min(v[11], at) end
  if v[12] ~= 0 then v[12] = math.max(v[12], at) elseif known then v[12] = at end
  -- 11 and 12 stay trusted only if they were.
  if known then v[13] = id end
end
b.dirty = true
-- The log may have been empty (its key gone): always set its TTL here.
save_state(b, now, true)
return now
