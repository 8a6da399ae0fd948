-- Resynchronisation after an outage: records usage admitted locally while
-- Redis was unreachable, as one settled entry stamped with the last local
-- admission, so the shared ledger counts it until it leaves the window.
-- KEYS: entries, state. ARGV: stamp (us), requests, input, output.
local now = now_us()
local b = { log = KEYS[1], st = KEYS[2] }
load_state(b, nil, now)
evict(b, now)
local at = tonumber(ARGV[1])
if at >= now - W then
  local r, i, o = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local id = math.max(b.last_id + 1, now * 4)
  b.last_id = id
  redis.call('ZADD', b.log, I(at), entry(id, at, r, i, o, 1))
  account(b, 1, r, i, o, 1)
  if b.ol == 0 then b.ol = at else b.ol = math.min(b.ol, at) end
  if b.la then b.la = math.max(b.la, at) elseif b.known then b.la = at end
end
b.dirty = true
-- The log may have been empty (its key gone): always set its TTL here.
save_state(b, now, true)
return now
