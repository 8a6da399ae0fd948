-- Ends one reservation: MemoryStore::settle_now.
-- KEYS: log, ent, use, ada. ARGV 8..: configured x4, entry id, outcome (0
-- used, 1 rate limited, 2 unavailable, 3 not sent), actual input, actual
-- output, exhausted (0 requests, 1 tokens, 2 unknown), jitter in [0, 1).
-- Returns now.
local now = now_us()
local b = { log = KEYS[1], ent = KEYS[2], use = KEYS[3], ada = KEYS[4] }
local a = load_ada(b.ada, limits_at(ARGV, 8))
load_use(b)
evict(b, now)
local id = ARGV[12]
local outcome = tonumber(ARGV[13])
local ai, ao = tonumber(ARGV[14]), tonumber(ARGV[15])
local which = tonumber(ARGV[16])
local jitter = tonumber(ARGV[17])
local v = redis.call('HGET', b.ent, id)
local function settle_to(i, o)
  if not v then return end
  local r, ei, eo, s = parse(v)
  account(b, -1, r, ei, eo, s)
  account(b, 1, r, i, o, 1)
  redis.call('HSET', b.ent, id, entry(r, i, o, 1))
end
if outcome == 0 then
  settle_to(ai, ao)
  on_success(a, now)
elseif outcome == 1 then
  settle_to(0, 0)
  local obs = { math.max(b.u[1] - 1, 0), b.u[2], b.u[3] }
  on_rate_limited(a, now, obs, which, jitter)
elseif outcome == 2 then
  settle_to(0, 0)
  cool_down(a, now, jitter)
else
  if v then
    local r, ei, eo, s = parse(v)
    account(b, -1, r, ei, eo, s)
    redis.call('HSET', b.ent, id, entry(0, 0, 0, 1))
  end
end
save_use(b, now)
if outcome ~= 3 then save_ada(b.ada, a) end
return now
