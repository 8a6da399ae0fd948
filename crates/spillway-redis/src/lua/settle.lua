-- Ends one reservation: MemoryStore::settle_now.
-- KEYS: entries, state. ARGV: configured x4, entry id, outcome (0
-- used, 1 rate limited, 2 unavailable, 3 not sent, 4 broken: used, then
-- unavailable), actual input, actual
-- output, exhausted (0 requests, 1 tokens, 2 unknown), jitter in [0, 1),
-- then the reserved input and output and the entry's stamp (with the id,
-- they name the entry).
-- Returns now.
local now = now_us()
local b = { log = KEYS[1], st = KEYS[2] }
load_state(b, now, ARGV, 1)
evict(b, now)
local id = tonumber(ARGV[5])
local outcome = tonumber(ARGV[6])
local ai, ao = tonumber(ARGV[7]), tonumber(ARGV[8])
local which = tonumber(ARGV[9])
local jitter = tonumber(ARGV[10])
local ci, co = tonumber(ARGV[11]), tonumber(ARGV[12])
local at = tonumber(ARGV[13])
local reserved = entry(id, at, 1, ci, co, 0)
local function settle_to(r, i, o)
  -- Nothing once the entry has left the window (or was settled already).
  if redis.call('ZREM', b.log, reserved) == 0 then return end
  account(b, -1, 1, ci, co, 0)
  account(b, 1, r, i, o, 1)
  redis.call('ZADD', b.log, I(at), entry(id, at, r, i, o, 1))
end
if outcome == 3 then
  settle_to(0, 0, 0)
elseif outcome == 0 or outcome == 4 then
  settle_to(1, ai, ao)
else
  settle_to(1, 0, 0)
end
if outcome == 4 then outcome = 2 end
learn(b, now, outcome, which, jitter)
save_state(b, now)
return now
