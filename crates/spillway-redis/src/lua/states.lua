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
  load_state(b, limits_at(ARGV, a0 + 2), now)
  local a = b.a
  evict(b, now)
  save_state(b, now)
  local drained = redis.call('SISMEMBER', KEYS[kb + 1], ARGV[a0 + 1])
  for _, v in ipairs(a.conf) do out[#out + 1] = v end
  for _, v in ipairs(a.learned) do out[#out + 1] = v end
  for j = 1, 6 do out[#out + 1] = b.u[j] end
  out[#out + 1] = math.max(a.cu - now, 0)
  out[#out + 1] = drained
end
return out
