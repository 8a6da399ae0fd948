-- Changes a lease's entry by what its requests really used, and learns
-- from how one ended (the lease side of settle; see `lease.rs`).
-- KEYS: entries, state. ARGV: configured x4, entry id, stamp, change in
-- requests, input, output, settled (0/1: no request of it in flight),
-- outcome (0 used, 1 rate limited, 2 unavailable, 3 nothing to learn),
-- exhausted (0 requests, 1 tokens, 2 unknown), jitter in [0, 1).
-- Returns now.
local now = now_us()
local b = { log = KEYS[1], st = KEYS[2] }
load_state(b, now, ARGV, 1)
evict(b, now)
local id, at = tonumber(ARGV[5]), ARGV[6]
local dr, di, dout = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local settled = tonumber(ARGV[10])
local outcome = tonumber(ARGV[11])
-- Nothing to change once the entry has left the window.
for _, m in ipairs(redis.call('ZRANGE', b.log, at, at, 'BYSCORE')) do
  local eid, _, r, i, o, s = struct.unpack(ENT, m)
  if eid == id then
    local nr, ni, no = math.max(r + dr, 0), math.max(i + di, 0), math.max(o + dout, 0)
    redis.call('ZREM', b.log, m)
    account(b, -1, r, i, o, s)
    account(b, 1, nr, ni, no, settled)
    redis.call('ZADD', b.log, at, entry(id, tonumber(at), nr, ni, no, settled))
    break
  end
end
learn(b, now, outcome, tonumber(ARGV[12]), tonumber(ARGV[13]))
save_state(b, now)
return now
