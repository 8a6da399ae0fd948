-- What each budget's window holds, and when it leaves: what a replica
-- starts its local share from if Redis fails (`resilient.rs`). Reads only.
-- KEYS: per budget: entries, state. ARGV: budget count, slices.
-- The window [now - W, now] is cut into `slices` equal parts by stamp
-- (lease entries, stamped at their lease's end, fall in the last); each
-- non-empty part is summed and stamped with its newest entry, so it leaves
-- the window no earlier than any entry in it.
-- Returns now, then per budget: the count of parts, then per part: stamp,
-- requests, input, output (oldest first).
local now = now_us()
local n = tonumber(ARGV[1])
local slices = math.max(tonumber(ARGV[2]), 1)
local cut = now - W
local out = { now }
for k = 1, n do
  local b = { log = KEYS[(k - 1) * 2 + 1], st = KEYS[(k - 1) * 2 + 2] }
  load_state(b, now)
  local parts = {}
  if b.existed then
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', b.log, I(cut), '+inf')) do
      local r, i, o, _, at = parse(m)
      local p = math.min(math.floor((at - cut) * slices / (W + 1)), slices - 1) + 1
      local part = parts[p]
      if part then
        part[1] = math.max(part[1], at)
        part[2], part[3], part[4] = part[2] + r, part[3] + i, part[4] + o
      else
        parts[p] = { at, r, i, o }
      end
    end
  end
  local count_at = #out + 1
  out[count_at] = 0
  for p = 1, slices do
    local part = parts[p]
    if part then
      out[count_at] = out[count_at] + 1
      for j = 1, 4 do out[#out + 1] = part[j] end
    end
  end
end
return out
