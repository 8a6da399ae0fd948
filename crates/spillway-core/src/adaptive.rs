//! Learning what upstream really allows, from its 429s.
//!
//! Config says a region-model may spend 60 requests a minute; Vertex may
//! disagree — another consumer shares the project, or the quota was never
//! what the config claims. An unexpected upstream 429 is a fact about the
//! real budget, and this module turns it into two responses:
//!
//! - **Cooldown.** The region-model takes no new requests for a while:
//!   jittered, growing with consecutive 429s, and never shortened by a later,
//!   shorter signal (peers that overwrite it flap).
//! - **A lower learned limit.** At the moment of the 429 the ledger knows
//!   how much was in flight in the window; upstream refused one more, so the
//!   real limit (what is left of it for us) is what we had without this
//!   request. The 429's text names the exhausted metric (requests or
//!   tokens), so only that dimension is lowered.
//!
//! Then it probes back up: after a quiet probe period the limit grows by a
//! step that doubles with each quiet period (additive increase that speeds
//! up, so a restored quota is reached in a few windows). A probe that
//! draws a 429 drops back to the observed level and doubles the time before
//! the next probe (up to 8 periods), which keeps steady-state 429s rare.

use std::time::Duration;

use crate::ledger::{Limits, Usage};

/// Tuning for adaptation. Defaults suit Vertex's one-minute quotas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    /// Plan to this fraction of the configured quota (0 < h <= 1).
    pub headroom: f64,
    pub cooldown_base: Duration,
    pub cooldown_max: Duration,
    /// Quiet time before a probe raises the limit (one window).
    pub probe_period: Duration,
}

impl AdaptiveConfig {
    /// The most admission will ever allow under `configured`: headroom applied.
    pub fn ceiling(&self, configured: Limits) -> Limits {
        scale(configured, self.headroom.clamp(0.01, 1.0))
    }
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            headroom: 1.0,
            cooldown_base: Duration::from_secs(1),
            cooldown_max: Duration::from_secs(60),
            probe_period: Duration::from_secs(60),
        }
    }
}

/// Which quota a 429 says was exhausted: the dimension it names, and only
/// that one is learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    Requests,
    /// Tokens, without saying which kind: every token limit is lowered.
    Tokens,
    /// Both requests and tokens (kept for stores that learned it before).
    Unknown,
    InputTokens,
    OutputTokens,
}

impl Exhausted {
    /// Reads Vertex's quota 429 message, e.g. "Quota exceeded for
    /// aiplatform.googleapis.com/online_prediction_input_tokens_per_minute_per_base_model"
    /// (or its `global_` / `{location}_multi_region_` forms). `None` when it
    /// names no quota metric: Google's own capacity ran short ("Resource
    /// exhausted. Please try again later."), which says nothing about this
    /// project's budget and must not lower it.
    pub fn from_message(message: &str) -> Option<Self> {
        if !message.contains("online_prediction_") && !message.contains("Quota exceeded") {
            return None;
        }
        if message.contains("input_tokens_per_minute") {
            Some(Exhausted::InputTokens)
        } else if message.contains("output_tokens_per_minute") {
            Some(Exhausted::OutputTokens)
        } else if message.contains("tokens_per_minute") || message.contains("tokens per minute") {
            Some(Exhausted::Tokens)
        } else if message.contains("requests_per_base_model")
            || message.contains("requests per minute")
        {
            Some(Exhausted::Requests)
        } else {
            None
        }
    }
}

/// The adapted state of one region-model budget.
#[derive(Debug, Clone)]
pub struct Adaptive {
    config: AdaptiveConfig,
    configured: Limits,
    /// Configured × headroom: the ceiling probing returns to.
    ceiling: Limits,
    learned: Limits,
    cooldown_until: Duration,
    strikes: u32,
    /// The last 429 or increase.
    last_change: Duration,
    probe_multiplier: u32,
    request_step: u32,
    token_step: u64,
    /// Whether the last change was an increase (so a 429 now is a failed probe).
    probing: bool,
}

fn scale(limits: Limits, factor: f64) -> Limits {
    let f = |v: u64| ((v as f64 * factor).floor() as u64).max(1);
    Limits {
        requests: f(u64::from(limits.requests)).min(u64::from(u32::MAX)) as u32,
        tokens: limits.tokens.map(f),
        input_tokens: limits.input_tokens.map(f),
        output_tokens: limits.output_tokens.map(f),
    }
}

impl Adaptive {
    pub fn new(configured: Limits, config: AdaptiveConfig) -> Self {
        let ceiling = config.ceiling(configured);
        let mut adaptive = Self {
            config,
            configured,
            ceiling,
            learned: ceiling,
            cooldown_until: Duration::ZERO,
            strikes: 0,
            last_change: Duration::ZERO,
            probe_multiplier: 1,
            request_step: 1,
            token_step: 1,
            probing: false,
        };
        adaptive.reset_steps();
        adaptive
    }

    fn reset_steps(&mut self) {
        self.request_step = (self.ceiling.requests / 50).max(1);
        self.token_step = (self.ceiling.token_capacity().min(u64::MAX / 4) / 50).max(1);
    }

    /// The limits admission should use now.
    pub fn limits(&self) -> Limits {
        self.learned
    }

    pub fn configured(&self) -> Limits {
        self.configured
    }

    /// Configured × headroom: the most learning may ever set.
    pub fn ceiling(&self) -> Limits {
        self.ceiling
    }

    /// Operators changed the quota (Google raised it): start over from it.
    pub fn set_configured(&mut self, configured: Limits) {
        *self = Self::new(configured, self.config);
    }

    pub fn cooldown_until(&self) -> Duration {
        self.cooldown_until
    }

    pub fn in_cooldown(&self, now: Duration) -> bool {
        now < self.cooldown_until
    }

    /// Extends the cooldown; a shorter one never replaces a longer one.
    fn cool_down(&mut self, now: Duration, jitter: f64) {
        self.strikes = self.strikes.saturating_add(1);
        let growth = 2u32.saturating_pow(self.strikes.saturating_sub(1).min(16));
        let base = self
            .config
            .cooldown_base
            .saturating_mul(growth)
            .min(self.config.cooldown_max);
        let jittered = base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0));
        self.cooldown_until = self.cooldown_until.max(now + jittered);
    }

    /// Upstream said when to come back (a 429's `retry-after`): closed until
    /// `until` exactly, unless a longer cooldown is already in force. A
    /// strike like any 429, so later guessed cooldowns still grow.
    pub fn hold_until(&mut self, until: Duration) {
        self.strikes = self.strikes.saturating_add(1);
        self.cooldown_until = self.cooldown_until.max(until);
    }

    /// Upstream answered 429 although the ledger had room. `observed` is the
    /// window's usage *without* the refused request; `jitter` is in [0, 1).
    pub fn on_rate_limited(
        &mut self,
        now: Duration,
        observed: Usage,
        which: Exhausted,
        jitter: f64,
    ) {
        self.cool_down(now, jitter);
        let failed_probe = self.probing;
        self.probing = false;
        let lower_requests = matches!(which, Exhausted::Requests | Exhausted::Unknown);
        // A named input or output metric lowers that split limit; a budget
        // configured with a combined limit only learns it there instead.
        let split_named = match which {
            Exhausted::InputTokens => self.learned.input_tokens.is_some(),
            Exhausted::OutputTokens => self.learned.output_tokens.is_some(),
            _ => false,
        };
        let all_tokens = matches!(which, Exhausted::Tokens | Exhausted::Unknown)
            || (matches!(which, Exhausted::InputTokens | Exhausted::OutputTokens) && !split_named);
        let lower_input = all_tokens || which == Exhausted::InputTokens;
        let lower_output = all_tokens || which == Exhausted::OutputTokens;
        // Never below half the current limit in one step: one odd 429 must
        // not collapse a budget.
        if lower_requests {
            let floor = (self.learned.requests / 2).max(1);
            self.learned.requests = observed
                .requests
                .clamp(floor, self.learned.requests.max(floor));
        }
        let lower =
            |limit: Option<u64>, used: u64| limit.map(|l| used.clamp((l / 2).max(1), l.max(1)));
        if all_tokens {
            self.learned.tokens = lower(self.learned.tokens, observed.tokens());
        }
        if lower_input {
            self.learned.input_tokens = lower(self.learned.input_tokens, observed.input);
        }
        if lower_output {
            self.learned.output_tokens = lower(self.learned.output_tokens, observed.output);
        }
        if failed_probe {
            self.probe_multiplier = (self.probe_multiplier * 2).min(8);
        }
        self.reset_steps();
        self.last_change = now;
    }

    /// Upstream was unavailable or overloaded (503, 529, connect failure,
    /// timeout): cool down, but the budget says nothing new.
    pub fn on_unavailable(&mut self, now: Duration, jitter: f64) {
        self.cool_down(now, jitter);
    }

    /// A request succeeded. After a quiet probe period, raise the limits.
    /// Returns whether they changed.
    pub fn on_success(&mut self, now: Duration) -> bool {
        self.strikes = 0;
        if self.learned == self.ceiling {
            self.probing = false;
            self.probe_multiplier = 1;
            return false;
        }
        let quiet = self
            .config
            .probe_period
            .saturating_mul(self.probe_multiplier);
        if now.saturating_sub(self.last_change) < quiet {
            return false;
        }
        if self.probing {
            // The previous probe survived a whole period.
            self.probe_multiplier = 1;
        }
        let c = self.ceiling;
        let l = &mut self.learned;
        l.requests = l.requests.saturating_add(self.request_step).min(c.requests);
        let raise = |v: Option<u64>, ceiling: Option<u64>, step: u64| match (v, ceiling) {
            (Some(v), Some(c)) => Some(v.saturating_add(step).min(c)),
            (v, _) => v,
        };
        l.tokens = raise(l.tokens, c.tokens, self.token_step);
        l.input_tokens = raise(l.input_tokens, c.input_tokens, self.token_step);
        l.output_tokens = raise(l.output_tokens, c.output_tokens, self.token_step);
        self.request_step = self.request_step.saturating_mul(2);
        self.token_step = self.token_step.saturating_mul(2);
        self.probing = true;
        self.last_change = now;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn usage(requests: u32, tokens: u64) -> Usage {
        Usage {
            requests,
            input: tokens,
            output: 0,
        }
    }

    #[test]
    fn a_named_split_metric_lowers_only_that_limit() {
        let split = Limits {
            requests: 60,
            tokens: None,
            input_tokens: Some(10_000),
            output_tokens: Some(2_000),
        };
        let mut a = Adaptive::new(split, AdaptiveConfig::default());
        let observed = Usage {
            requests: 10,
            input: 6_000,
            output: 1_000,
        };
        a.on_rate_limited(secs(0), observed, Exhausted::InputTokens, 0.5);
        assert_eq!(a.limits().input_tokens, Some(6_000));
        assert_eq!(a.limits().output_tokens, Some(2_000));
        assert_eq!(a.limits().requests, 60);
        // A combined-only budget learns a named input metric on its one limit.
        let mut b = Adaptive::new(Limits::new(60, 50_000), AdaptiveConfig::default());
        b.on_rate_limited(secs(0), usage(10, 30_000), Exhausted::InputTokens, 0.5);
        assert_eq!(b.limits().tokens, Some(30_000));
        assert_eq!(b.limits().requests, 60);
    }

    #[test]
    fn reads_the_exhausted_metric_from_vertex_messages() {
        let m = "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model with base model: anthropic-claude-3-haiku.";
        assert_eq!(Exhausted::from_message(m), Some(Exhausted::Requests));
        let m = "Quota exceeded for aiplatform.googleapis.com/online_prediction_input_tokens_per_minute_per_base_model";
        assert_eq!(Exhausted::from_message(m), Some(Exhausted::InputTokens));
        assert_eq!(
            Exhausted::from_message("Resource exhausted. Please try again later."),
            None
        );
        let m = "Quota exceeded for aiplatform.googleapis.com/global_online_prediction_output_tokens_per_minute_per_base_model with base model: anthropic-claude-sonnet.";
        assert_eq!(Exhausted::from_message(m), Some(Exhausted::OutputTokens));
    }

    #[test]
    fn headroom_scales_the_ceiling() {
        let a = Adaptive::new(
            Limits::new(60, 50_000),
            AdaptiveConfig {
                headroom: 0.9,
                ..Default::default()
            },
        );
        assert_eq!(a.limits(), Limits::new(54, 45_000));
    }

    #[test]
    fn a_429_lowers_only_the_named_dimension_and_cools_down() {
        let mut a = Adaptive::new(Limits::new(60, 50_000), AdaptiveConfig::default());
        a.on_rate_limited(secs(10), usage(40, 1_000), Exhausted::Requests, 0.5);
        assert_eq!(a.limits().requests, 40);
        assert_eq!(a.limits().tokens, Some(50_000));
        assert!(a.in_cooldown(secs(10)));
        assert!(!a.in_cooldown(secs(12)));
    }

    #[test]
    fn cooldowns_grow_and_are_never_shortened() {
        let mut a = Adaptive::new(Limits::new(60, 50_000), AdaptiveConfig::default());
        a.on_rate_limited(secs(0), usage(40, 0), Exhausted::Requests, 0.5);
        let first = a.cooldown_until();
        a.on_rate_limited(secs(0), usage(40, 0), Exhausted::Requests, 0.5);
        let second = a.cooldown_until();
        assert!(second > first, "{second:?} > {first:?}");
        // A success resets growth, but a later short signal cannot shorten
        // the cooldown already in force.
        a.on_success(secs(0));
        a.on_unavailable(secs(0), 0.0);
        assert_eq!(a.cooldown_until(), second);
    }

    #[test]
    fn one_odd_429_does_not_collapse_the_budget() {
        let mut a = Adaptive::new(Limits::new(60, 50_000), AdaptiveConfig::default());
        a.on_rate_limited(secs(0), usage(0, 0), Exhausted::Unknown, 0.5);
        assert_eq!(a.limits(), Limits::new(30, 25_000));
    }

    #[test]
    fn probes_back_up_with_growing_steps_and_backs_off_failed_probes() {
        let mut a = Adaptive::new(Limits::new(60, 50_000), AdaptiveConfig::default());
        a.on_rate_limited(secs(0), usage(40, 0), Exhausted::Requests, 0.5);
        assert!(!a.on_success(secs(30)), "not before a quiet period");
        assert!(a.on_success(secs(60)));
        assert_eq!(a.limits().requests, 41);
        assert!(a.on_success(secs(120)));
        assert_eq!(a.limits().requests, 43);
        // The probe fails: back to what was observed, next probe later.
        a.on_rate_limited(secs(130), usage(40, 0), Exhausted::Requests, 0.5);
        assert_eq!(a.limits().requests, 40);
        assert!(!a.on_success(secs(190)));
        assert!(a.on_success(secs(250)), "two periods after a failed probe");
    }

    #[test]
    fn a_restored_quota_is_reached_in_a_few_periods() {
        let mut a = Adaptive::new(Limits::new(60, 50_000), AdaptiveConfig::default());
        a.on_rate_limited(secs(0), usage(40, 0), Exhausted::Requests, 0.5);
        let mut periods = 0;
        let mut t = 0;
        while a.limits().requests < 60 {
            t += 60;
            a.on_success(secs(t));
            periods += 1;
            assert!(periods < 10);
        }
        assert!(periods <= 5, "{periods} periods");
    }
}
