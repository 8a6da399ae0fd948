-- Operators set a budget's configured limits: start adaptation over from
-- them (Adaptive::set_configured). KEYS: ada. ARGV 8..: configured x4.
save_ada(KEYS[1], new_ada(limits_at(ARGV, 8)))
return now_us()
