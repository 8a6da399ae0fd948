-- Operators set a budget's configured limits: start adaptation over from
-- them (Adaptive::set_configured). KEYS: entries, state. ARGV:
-- configured x4.
local now = now_us()
local b = { log = KEYS[1], st = KEYS[2] }
load_state(b, nil, now)
b.a = new_ada(limits_at(ARGV, 1))
b.has_ada = true
b.dirty = true
save_state(b, now)
return now
