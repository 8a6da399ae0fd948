-- Operators set a budget's configured limits: start adaptation over from
-- them (Adaptive::set_configured). KEYS: entries, state. ARGV:
-- configured x4.
local now = now_us()
local b = { log = KEYS[1], st = KEYS[2] }
load_state(b, now)
store_adaptive(b, new_ada(limits_at(ARGV, 1)))
save_state(b, now)
return now
