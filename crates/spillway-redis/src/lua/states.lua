-- The live state of budgets (for metrics and the admin API).
-- KEYS: per budget: drained set, entries, state. ARGV: budget
-- count, then per budget: region, configured x4.
-- Returns now, then per budget: configured x4, effective x4, usage x3,
-- in flight x3, cooldown remaining (us), drained (0/1).
local now = now_us()
local n = tonumber(ARGV[1])
local out = { now }
for k = 1, n do
  local kb = (k - 1) * 3
  local a0 = 1 + (k - 1) * 5
  local b = { log = KEYS[kb + 2], st = KEYS[kb + 3] }
  load_state(b, now, ARGV, a0 + 2)
  evict(b, now)
  save_state(b, now)
  local v = b.v
  local drained = redis.call('SISMEMBER', KEYS[kb + 1], ARGV[a0 + 1])
  for j = 14, 21 do out[#out + 1] = v[j] end
  for j = 3, 8 do out[#out + 1] = v[j] end
  out[#out + 1] = math.max(v[22] - now, 0)
  out[#out + 1] = drained
end
return out
