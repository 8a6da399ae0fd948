//! Anthropic's rate limits: continuously refilling token buckets, and a log
//! that lets a test prove they were never exceeded.
//!
//! Anthropic's own API (reference §3) limits each model by **requests per
//! minute** (RPM), **input tokens per minute** (ITPM) and **output tokens
//! per minute** (OTPM), each enforced by a *token bucket that refills
//! continuously*, not by a fixed or sliding window. That difference is the
//! point of simulating it: after a full burst, half the capacity is back
//! half a minute later (a window would give nothing back until the burst
//! ages out, then everything at once).
//!
//! ## One bucket
//!
//! A [`TokenBucket`] has `capacity = limit` and refills at `limit` per
//! `period` (the simulator's `window`, 60 s unless a test compresses it),
//! capped at capacity. It starts full. To stay exact over millions of
//! operations the level is kept as an integer **scaled by the period in
//! nanoseconds** (`level × period_ns`, in a `u128`): refilling for `dt` ns
//! adds exactly `capacity × dt`, debiting `n` tokens removes `n × period_ns`.
//! No float, no drift, and refilling in many small steps gives exactly the
//! same level as one big step. Levels shown to clients are floors.
//!
//! ## A request
//!
//! On arrival (read on tokio's clock, `tokio::time::Instant`, so paused-clock
//! tests are deterministic) each bucket is refilled to now. The request
//! needs **1** request, its **counted input** (`input_tokens +
//! cache_creation_input_tokens`, plus `cache_read_input_tokens` only for
//! models whose cache reads count, see [`crate::config`]) and
//! **`max_tokens`** output tokens (Anthropic estimates OTPM from
//! `max_tokens` up front). If any configured bucket lacks its share, the
//! request is refused (429) and **nothing** is debited; the refusal names
//! the first short dimension in the order requests, input, output, and
//! `retry-after` is the time until the request would fit in *every*
//! bucket. A request that can never fit (it needs more than a bucket's
//! capacity) gets one whole period instead (retrying sooner cannot help,
//! and `0` would invite a hot loop). Otherwise all
//! three are debited at once. When the answer ends, the unused part of the
//! reservation (`max_tokens - actual output tokens`) is credited back to
//! OTPM, capped at capacity.
//!
//! Changing a limit at run time ([`crate::SimHandle::set_anthropic_limits`])
//! keeps the bucket's level, clamped to the new capacity; a limit that was
//! not enforced before starts full; removing one drops its bucket.
//!
//! ## The log, and checking it
//!
//! Every `/v1/messages` request is logged ([`AnthropicLogEntry`]: time
//! offset, model, status, what it was charged, the bucket levels right after
//! the decision, and, once the answer ended, its actual output tokens), as
//! is every limit change ([`LimitChange`]), each with a sequence number
//! that orders it among the others. [`replay_admissions`] rebuilds every
//! model's buckets from that log alone, with its own arithmetic (signed, so
//! an over-admission shows up as a negative level instead of being
//! impossible by construction), and reports the lowest level each bucket
//! reached and whether the levels it finds agree with the recorded ones
//! ([`AdmissionsReport`]). The log holds the first [`ANTHROPIC_LOG_LEN`]
//! requests since start or reset (then stops, and says so: a prefix of
//! the run still replays exactly).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How many requests the Anthropic log keeps (the first ones since start
/// or reset; later ones are counted but not logged).
pub const ANTHROPIC_LOG_LEN: usize = 262_144;

/// The limits of one first-party model. `None` is not enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnthropicLimits {
    /// Requests per period (RPM).
    #[serde(default)]
    pub requests_per_min: Option<u64>,
    /// Counted input tokens per period (ITPM).
    #[serde(default)]
    pub input_tokens_per_min: Option<u64>,
    /// Output tokens per period (OTPM).
    #[serde(default)]
    pub output_tokens_per_min: Option<u64>,
}

impl AnthropicLimits {
    /// All three limits.
    pub fn new(rpm: u64, itpm: u64, otpm: u64) -> Self {
        AnthropicLimits {
            requests_per_min: Some(rpm),
            input_tokens_per_min: Some(itpm),
            output_tokens_per_min: Some(otpm),
        }
    }

    fn get(&self, d: RateLimitDimension) -> Option<u64> {
        match d {
            RateLimitDimension::Requests => self.requests_per_min,
            RateLimitDimension::InputTokens => self.input_tokens_per_min,
            RateLimitDimension::OutputTokens => self.output_tokens_per_min,
        }
    }
}

/// One of the three limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitDimension {
    /// RPM.
    Requests,
    /// ITPM.
    InputTokens,
    /// OTPM.
    OutputTokens,
}

impl RateLimitDimension {
    /// The three, in the order a refusal checks them.
    pub const ALL: [RateLimitDimension; 3] = [
        RateLimitDimension::Requests,
        RateLimitDimension::InputTokens,
        RateLimitDimension::OutputTokens,
    ];

    /// The `{dim}` of the `anthropic-ratelimit-{dim}-*` headers.
    pub fn header_name(self) -> &'static str {
        match self {
            RateLimitDimension::Requests => "requests",
            RateLimitDimension::InputTokens => "input-tokens",
            RateLimitDimension::OutputTokens => "output-tokens",
        }
    }

    /// The `rate_limit_error` message Anthropic sends for this dimension.
    pub fn message(self) -> &'static str {
        match self {
            RateLimitDimension::Requests => "Number of requests has exceeded your per-minute rate limit (https://docs.anthropic.com/en/api/rate-limits); see the response headers for current usage. Please reduce the number of requests or try again later. You may also contact sales at https://www.anthropic.com/contact-sales to discuss your options for a rate limit increase.",
            RateLimitDimension::InputTokens => "Number of request tokens has exceeded your per-minute rate limit (https://docs.anthropic.com/en/api/rate-limits); see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or try again later. You may also contact sales at https://www.anthropic.com/contact-sales to discuss your options for a rate limit increase.",
            RateLimitDimension::OutputTokens => "Number of output tokens has exceeded your per-minute rate limit (https://docs.anthropic.com/en/api/rate-limits); see the response headers for current usage. Please reduce the maximum tokens requested or try again later. You may also contact sales at https://www.anthropic.com/contact-sales to discuss your options for a rate limit increase.",
        }
    }
}

/// The period in nanoseconds, as the buckets use it: at least 1 (a zero
/// period means "always full"), at most `u64::MAX` (so `capacity ×
/// period` always fits a `u128`).
pub fn period_nanos(period: Duration) -> u64 {
    u64::try_from(period.as_nanos()).unwrap_or(u64::MAX).max(1)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A continuously refilling token bucket with exact integer arithmetic
/// (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    capacity: u64,
    period_ns: u64,
    /// Level × `period_ns`.
    scaled: u128,
    /// When `scaled` was last brought up to date.
    at: Instant,
}

impl TokenBucket {
    /// A full bucket of `capacity` refilling at `capacity` per `period`.
    pub fn new(capacity: u64, period: Duration, now: Instant) -> Self {
        let period_ns = period_nanos(period);
        TokenBucket {
            capacity,
            period_ns,
            scaled: u128::from(capacity) * u128::from(period_ns),
            at: now,
        }
    }

    fn full(&self) -> u128 {
        u128::from(self.capacity) * u128::from(self.period_ns)
    }

    /// Brings the level up to `now` (an earlier `now` changes nothing).
    pub fn refill(&mut self, now: Instant) {
        if now <= self.at {
            return;
        }
        // More than a period refills any level to full: clamping `dt` keeps
        // the product inside u128.
        let dt = nanos(now - self.at).min(self.period_ns);
        let add = u128::from(self.capacity) * u128::from(dt);
        self.scaled = self.scaled.saturating_add(add).min(self.full());
        self.at = now;
    }

    /// The capacity (= the limit).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The level as of the last refill, rounded down.
    pub fn level(&self) -> u64 {
        // scaled <= capacity × period_ns, so the quotient fits a u64.
        u64::try_from(self.scaled / u128::from(self.period_ns)).unwrap_or(u64::MAX)
    }

    /// The level × the period in nanoseconds (exact).
    pub fn scaled_level(&self) -> u128 {
        self.scaled
    }

    fn need(&self, n: u64) -> Option<u128> {
        (n <= self.capacity).then(|| u128::from(n) * u128::from(self.period_ns))
    }

    /// Whether `n` tokens are there now (as of the last refill).
    pub fn has(&self, n: u64) -> bool {
        self.need(n).is_some_and(|need| self.scaled >= need)
    }

    /// Takes `n` tokens if they are there; says whether it did.
    pub fn try_debit(&mut self, n: u64) -> bool {
        match self.need(n) {
            Some(need) if self.scaled >= need => {
                self.scaled -= need;
                true
            }
            _ => false,
        }
    }

    /// Gives `n` tokens back, capped at capacity.
    pub fn credit(&mut self, n: u64) {
        let add = u128::from(n).saturating_mul(u128::from(self.period_ns));
        self.scaled = self.scaled.saturating_add(add).min(self.full());
    }

    /// How long until `n` tokens are there (zero if they are), or `None`
    /// if they never will be (`n` > capacity).
    pub fn time_until(&self, n: u64) -> Option<Duration> {
        let need = self.need(n)?;
        Some(self.time_to_scaled(need))
    }

    /// How long until the bucket is full again.
    pub fn time_to_full(&self) -> Duration {
        self.time_to_scaled(self.full())
    }

    fn time_to_scaled(&self, target: u128) -> Duration {
        let deficit = target.saturating_sub(self.scaled);
        if deficit == 0 || self.capacity == 0 {
            return Duration::ZERO;
        }
        let ns = deficit.div_ceil(u128::from(self.capacity));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Changes the capacity (refilling to `now` first); the level is
    /// kept, clamped to the new capacity.
    pub fn set_capacity(&mut self, capacity: u64, now: Instant) {
        self.refill(now);
        self.capacity = capacity;
        self.scaled = self.scaled.min(self.full());
    }
}

/// The floor levels of a model's buckets (`None`: limit not enforced).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketLevels {
    /// RPM bucket.
    pub requests: Option<u64>,
    /// ITPM bucket.
    pub input_tokens: Option<u64>,
    /// OTPM bucket.
    pub output_tokens: Option<u64>,
}

impl BucketLevels {
    fn set(&mut self, d: RateLimitDimension, v: Option<u64>) {
        match d {
            RateLimitDimension::Requests => self.requests = v,
            RateLimitDimension::InputTokens => self.input_tokens = v,
            RateLimitDimension::OutputTokens => self.output_tokens = v,
        }
    }

    /// The level of one dimension.
    pub fn get(&self, d: RateLimitDimension) -> Option<u64> {
        match d {
            RateLimitDimension::Requests => self.requests,
            RateLimitDimension::InputTokens => self.input_tokens,
            RateLimitDimension::OutputTokens => self.output_tokens,
        }
    }
}

/// One dimension's state, as the `anthropic-ratelimit-*` headers show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DimensionState {
    /// The limit (capacity).
    pub limit: u64,
    /// The level, rounded down.
    pub remaining: u64,
    /// Time until the bucket is full.
    #[serde(serialize_with = "ser_ms")]
    pub time_to_full: Duration,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A model's three buckets at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LimiterSnapshot {
    /// RPM.
    pub requests: Option<DimensionState>,
    /// ITPM.
    pub input_tokens: Option<DimensionState>,
    /// OTPM.
    pub output_tokens: Option<DimensionState>,
}

impl LimiterSnapshot {
    /// One dimension.
    pub fn get(&self, d: RateLimitDimension) -> Option<DimensionState> {
        match d {
            RateLimitDimension::Requests => self.requests,
            RateLimitDimension::InputTokens => self.input_tokens,
            RateLimitDimension::OutputTokens => self.output_tokens,
        }
    }

    /// The floor levels.
    pub fn levels(&self) -> BucketLevels {
        BucketLevels {
            requests: self.requests.map(|s| s.remaining),
            input_tokens: self.input_tokens.map(|s| s.remaining),
            output_tokens: self.output_tokens.map(|s| s.remaining),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The first short dimension (requests, then input, then output).
    pub dimension: RateLimitDimension,
    /// Until the request would fit in every bucket (see the module docs).
    pub retry_after: Duration,
}

/// The three buckets of one model.
#[derive(Debug, Clone)]
pub struct ModelLimiter {
    period: Duration,
    buckets: [Option<TokenBucket>; 3],
}

fn idx(d: RateLimitDimension) -> usize {
    match d {
        RateLimitDimension::Requests => 0,
        RateLimitDimension::InputTokens => 1,
        RateLimitDimension::OutputTokens => 2,
    }
}

impl ModelLimiter {
    /// Full buckets for `limits`.
    pub fn new(limits: AnthropicLimits, period: Duration, now: Instant) -> Self {
        let b = |d| limits.get(d).map(|c| TokenBucket::new(c, period, now));
        ModelLimiter {
            period,
            buckets: RateLimitDimension::ALL.map(b),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> AnthropicLimits {
        let c = |d| self.buckets[idx(d)].as_ref().map(TokenBucket::capacity);
        AnthropicLimits {
            requests_per_min: c(RateLimitDimension::Requests),
            input_tokens_per_min: c(RateLimitDimension::InputTokens),
            output_tokens_per_min: c(RateLimitDimension::OutputTokens),
        }
    }

    fn refill(&mut self, now: Instant) {
        for b in self.buckets.iter_mut().flatten() {
            b.refill(now);
        }
    }

    /// Refills to `now`, then admits a request of 1 request, `input`
    /// counted input tokens and `max_tokens` output tokens (debiting all
    /// three), or refuses it (debiting nothing).
    pub fn try_admit(&mut self, now: Instant, input: u64, max_tokens: u64) -> Result<(), Refusal> {
        self.refill(now);
        let needs = [1, input, max_tokens];
        let mut short = None;
        let mut wait = Duration::ZERO;
        for d in RateLimitDimension::ALL {
            let Some(b) = &self.buckets[idx(d)] else {
                continue;
            };
            let n = needs[idx(d)];
            if !b.has(n) {
                short.get_or_insert(d);
            }
            let w = b.time_until(n).unwrap_or(self.period);
            wait = wait.max(w);
        }
        if let Some(dimension) = short {
            return Err(Refusal {
                dimension,
                retry_after: wait,
            });
        }
        for d in RateLimitDimension::ALL {
            if let Some(b) = &mut self.buckets[idx(d)] {
                b.try_debit(needs[idx(d)]);
            }
        }
        Ok(())
    }

    /// Refills to `now` and gives `n` output tokens back.
    pub fn credit_output(&mut self, now: Instant, n: u64) {
        self.refill(now);
        if let Some(b) = &mut self.buckets[idx(RateLimitDimension::OutputTokens)] {
            b.credit(n);
        }
    }

    /// Refills to `now` and applies new limits (see the module docs).
    pub fn set_limits(&mut self, limits: AnthropicLimits, now: Instant) {
        self.refill(now);
        for d in RateLimitDimension::ALL {
            let slot = &mut self.buckets[idx(d)];
            match (limits.get(d), slot.as_mut()) {
                (None, _) => *slot = None,
                (Some(c), Some(b)) => b.set_capacity(c, now),
                (Some(c), None) => *slot = Some(TokenBucket::new(c, self.period, now)),
            }
        }
    }

    /// Makes every bucket full as of `now`.
    pub fn refill_completely(&mut self, now: Instant) {
        *self = ModelLimiter::new(self.limits(), self.period, now);
    }

    /// The state as of `now` (refilling first).
    pub fn snapshot(&mut self, now: Instant) -> LimiterSnapshot {
        self.refill(now);
        let s = |d: RateLimitDimension| {
            self.buckets[idx(d)].as_ref().map(|b| DimensionState {
                limit: b.capacity(),
                remaining: b.level(),
                time_to_full: b.time_to_full(),
            })
        };
        LimiterSnapshot {
            requests: s(RateLimitDimension::Requests),
            input_tokens: s(RateLimitDimension::InputTokens),
            output_tokens: s(RateLimitDimension::OutputTokens),
        }
    }
}

/// One `/v1/messages` request in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnthropicLogEntry {
    /// Orders this entry's decision among all logged events (requests and
    /// limit changes); per model it is also time order.
    pub seq: u64,
    /// When it was decided, in nanoseconds since start or the last reset
    /// (tokio's clock).
    pub at_ns: u64,
    /// The `request-id` it was answered with.
    pub request_id: String,
    /// The body's `model`, if the request got that far and named one.
    pub model: Option<String>,
    /// Whether the body asked for a stream.
    pub stream: bool,
    /// The HTTP status answered (0: connection reset by a fault; 499: the
    /// client left before an answer).
    pub status: u16,
    /// Whether the buckets were debited (the request passed the limits).
    pub admitted: bool,
    /// For a rate-limit 429: the dimension it named.
    pub rejected: Option<RateLimitDimension>,
    /// Input tokens debited from ITPM (0 unless admitted).
    pub input_tokens: u64,
    /// Output tokens reserved from OTPM (`max_tokens`; 0 unless admitted).
    pub output_reserved: u64,
    /// Output tokens actually produced, once the answer ended.
    pub output_actual: Option<u64>,
    /// The sequence number of the credit-back (when the answer ended).
    pub finished_seq: Option<u64>,
    /// When the answer ended (`at_ns` clock).
    pub finished_ns: Option<u64>,
    /// The model's bucket levels right after the decision (after the debit
    /// if admitted, unchanged if refused); `None` for unknown models.
    pub levels: Option<BucketLevels>,
}

/// A change of a model's limits (also logged at start and reset, with the
/// limits then in force).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitChange {
    /// Sequence number (see [`AnthropicLogEntry::seq`]).
    pub seq: u64,
    /// When (see [`AnthropicLogEntry::at_ns`]).
    pub at_ns: u64,
    /// The model.
    pub model: String,
    /// Its new limits.
    pub limits: AnthropicLimits,
}

/// The whole log of a run (since start or reset).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnthropicLog {
    /// The bucket period the run used, in nanoseconds.
    pub period_ns: u64,
    /// False when more than [`ANTHROPIC_LOG_LEN`] requests came: the
    /// entries are then the first ones.
    pub complete: bool,
    /// Requests not logged because the log was full.
    pub dropped: u64,
    /// Limit changes, in `seq` order.
    pub limit_changes: Vec<LimitChange>,
    /// Requests, in `seq` order.
    pub entries: Vec<AnthropicLogEntry>,
}

/// The lowest level each bucket of a model reached right after a debit, as
/// a replay of the log computes it (negative: the bucket was overdrawn).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MinimumLevels {
    /// RPM bucket.
    pub requests: Option<i64>,
    /// ITPM bucket.
    pub input_tokens: Option<i64>,
    /// OTPM bucket.
    pub output_tokens: Option<i64>,
}

/// What a replay of the log says about one model ([`replay_admissions`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdmissionsReport {
    /// The model.
    pub model: String,
    /// Its limits at the end of the log.
    pub limits: AnthropicLimits,
    /// Admitted requests.
    pub admitted: u64,
    /// Requests refused with a rate-limit 429.
    pub rate_limited: u64,
    /// Lowest floor level of each bucket right after a debit (`None` for
    /// a dimension never enforced, or never debited).
    pub min_level: MinimumLevels,
    /// Debits that left a bucket below zero (each dimension counted).
    pub violations: u64,
    /// Whether every recorded level equals the replayed one.
    pub levels_consistent: bool,
    /// The sequence number of the first violation, if any.
    pub first_violation_seq: Option<u64>,
    /// Whether the log covered the whole run.
    pub complete: bool,
}

impl AdmissionsReport {
    /// Whether no admission overdrew any bucket.
    pub fn within_limits(&self) -> bool {
        self.violations == 0
    }
}

/// A replayed bucket: signed, so an overdraft is visible.
#[derive(Debug, Clone, Copy)]
struct ReplayBucket {
    capacity: u64,
    /// Level × period_ns; may be negative.
    scaled: i128,
    at_ns: u64,
}

impl ReplayBucket {
    fn full(capacity: u64, p: u64) -> i128 {
        i128::from(capacity).saturating_mul(i128::from(p))
    }

    fn advance(&mut self, at_ns: u64, p: u64) {
        let dt = at_ns.saturating_sub(self.at_ns);
        if dt > 0 {
            let add = i128::from(self.capacity).saturating_mul(i128::from(dt));
            self.scaled = self
                .scaled
                .saturating_add(add)
                .min(Self::full(self.capacity, p));
            self.at_ns = at_ns;
        }
    }

    fn floor(&self, p: u64) -> i64 {
        let l = self.scaled.div_euclid(i128::from(p));
        i64::try_from(l).unwrap_or(if l < 0 { i64::MIN } else { i64::MAX })
    }
}

enum Event<'a> {
    Limits(&'a LimitChange),
    Decide(&'a AnthropicLogEntry),
    Credit(&'a AnthropicLogEntry),
}

/// Replays `log` per model against buckets rebuilt from its limit changes
/// (full when a limit first appears, refilled continuously at `capacity`
/// per `log.period_ns`, clamped when a limit changes) and reports, for
/// every model with a limit change or an admission, the lowest level each
/// bucket reached and every overdraft. Independent of the simulator's own
/// buckets: a log in which some admission did not fit yields
/// `within_limits() == false`.
pub fn replay_admissions(log: &AnthropicLog) -> Vec<AdmissionsReport> {
    let p = log.period_ns.max(1);
    let mut events: Vec<(u64, &str, Event<'_>)> = Vec::new();
    for c in &log.limit_changes {
        events.push((c.seq, &c.model, Event::Limits(c)));
    }
    for e in &log.entries {
        let Some(model) = e.model.as_deref() else {
            continue;
        };
        events.push((e.seq, model, Event::Decide(e)));
        if let (Some(seq), true) = (e.finished_seq, e.admitted) {
            events.push((seq, model, Event::Credit(e)));
        }
    }
    events.sort_by_key(|(seq, model, _)| (*model, *seq));

    let mut out = Vec::new();
    let mut i = 0;
    while i < events.len() {
        let model = events[i].1;
        let mut buckets: [Option<ReplayBucket>; 3] = [None, None, None];
        let mut limits = AnthropicLimits::default();
        let mut r = AdmissionsReport {
            model: model.to_owned(),
            limits,
            admitted: 0,
            rate_limited: 0,
            min_level: MinimumLevels::default(),
            violations: 0,
            levels_consistent: true,
            first_violation_seq: None,
            complete: log.complete,
        };
        let mut relevant = false;
        while i < events.len() && events[i].1 == model {
            match &events[i].2 {
                Event::Limits(c) => {
                    relevant = true;
                    limits = c.limits;
                    for d in RateLimitDimension::ALL {
                        let slot = &mut buckets[idx(d)];
                        match (c.limits.get(d), slot.as_mut()) {
                            (None, _) => *slot = None,
                            (Some(cap), Some(b)) => {
                                b.advance(c.at_ns, p);
                                b.capacity = cap;
                                b.scaled = b.scaled.min(ReplayBucket::full(cap, p));
                            }
                            (Some(cap), None) => {
                                *slot = Some(ReplayBucket {
                                    capacity: cap,
                                    scaled: ReplayBucket::full(cap, p),
                                    at_ns: c.at_ns,
                                })
                            }
                        }
                    }
                }
                Event::Decide(e) => {
                    if e.rejected.is_some() {
                        r.rate_limited += 1;
                    }
                    let needs = [1, e.input_tokens, e.output_reserved];
                    let mut levels = BucketLevels::default();
                    for d in RateLimitDimension::ALL {
                        let Some(b) = buckets[idx(d)].as_mut() else {
                            continue;
                        };
                        b.advance(e.at_ns, p);
                        if e.admitted {
                            let need = i128::from(needs[idx(d)]).saturating_mul(i128::from(p));
                            b.scaled = b.scaled.saturating_sub(need);
                            let floor = b.floor(p);
                            let min = match d {
                                RateLimitDimension::Requests => &mut r.min_level.requests,
                                RateLimitDimension::InputTokens => &mut r.min_level.input_tokens,
                                RateLimitDimension::OutputTokens => &mut r.min_level.output_tokens,
                            };
                            *min = Some(min.map_or(floor, |m| m.min(floor)));
                            if b.scaled < 0 {
                                r.violations += 1;
                                r.first_violation_seq.get_or_insert(e.seq);
                            }
                        }
                        levels.set(d, Some(u64::try_from(b.floor(p)).unwrap_or(0)));
                    }
                    if e.admitted {
                        relevant = true;
                        r.admitted += 1;
                    }
                    if let Some(recorded) = e.levels {
                        if recorded != levels {
                            r.levels_consistent = false;
                        }
                    }
                }
                Event::Credit(e) => {
                    let back = e
                        .output_reserved
                        .saturating_sub(e.output_actual.unwrap_or(e.output_reserved));
                    if let Some(b) = buckets[idx(RateLimitDimension::OutputTokens)].as_mut() {
                        b.advance(e.finished_ns.unwrap_or(e.at_ns), p);
                        let add = i128::from(back).saturating_mul(i128::from(p));
                        b.scaled = b
                            .scaled
                            .saturating_add(add)
                            .min(ReplayBucket::full(b.capacity, p));
                    }
                }
            }
            i += 1;
        }
        r.limits = limits;
        if relevant {
            out.push(r);
        }
    }
    out
}

/// Formats a wall-clock time as RFC 3339 UTC with seconds precision,
/// rounding *up* to the next whole second (so a reset time is never
/// earlier than the real one): `2026-12-04T01:02:03Z`.
pub fn rfc3339_ceil(t: std::time::SystemTime) -> String {
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm, unsigned form).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// A token count as Anthropic's headers show it: rounded to the nearest
/// thousand (half up).
pub fn round_thousands(n: u64) -> u64 {
    n.saturating_add(500) / 1000 * 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn refill_is_continuous_exact_and_path_independent() {
        let t0 = Instant::now();
        let mut a = TokenBucket::new(7, P, t0);
        let mut b = a.clone();
        assert!(a.try_debit(7) && b.try_debit(7));
        assert!(!a.has(1));
        // Many small steps equal one big step, to the nanosecond.
        for i in 1..=1000u64 {
            a.refill(t0 + Duration::from_nanos(i * 17_000_003));
        }
        b.refill(t0 + Duration::from_nanos(1000 * 17_000_003));
        assert_eq!(a, b);
        // Half a period: half the capacity back (3.5 → floor 3).
        let mut c = TokenBucket::new(7, P, t0);
        c.try_debit(7);
        c.refill(t0 + P / 2);
        assert_eq!(c.level(), 3);
        assert_eq!(c.scaled_level(), 7 * u128::from(period_nanos(P)) / 2);
        assert_eq!(c.time_to_full(), P / 2);
        // One token takes period / capacity.
        let mut d = TokenBucket::new(60, P, t0);
        d.try_debit(60);
        assert_eq!(d.time_until(1), Some(Duration::from_secs(1)));
        assert_eq!(d.time_until(61), None);
        d.credit(1000);
        assert_eq!(d.level(), 60);
    }

    #[test]
    fn degenerate_buckets_never_panic() {
        let now = Instant::now();
        let mut z = TokenBucket::new(0, P, now);
        assert!(!z.try_debit(1) && z.try_debit(0));
        assert_eq!(z.time_until(1), None);
        assert_eq!(z.time_to_full(), Duration::ZERO);
        let mut huge = TokenBucket::new(u64::MAX, Duration::MAX, now);
        assert!(huge.try_debit(u64::MAX));
        huge.credit(u64::MAX);
        huge.refill(now + Duration::from_secs(1));
        assert_eq!(huge.level(), u64::MAX);
        let mut instant = TokenBucket::new(5, Duration::ZERO, now);
        assert!(instant.try_debit(5));
        instant.refill(now + Duration::from_nanos(1));
        assert_eq!(instant.level(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_debits_all_or_nothing_and_waits_for_the_slowest() {
        let t0 = Instant::now();
        let mut l = ModelLimiter::new(AnthropicLimits::new(10, 600, 6000), P, t0);
        assert!(l.try_admit(t0, 600, 100).is_ok());
        // Input is empty: refused, with the time until 300 input tokens are back.
        let r = l.try_admit(t0, 300, 100).unwrap_err();
        assert_eq!(r.dimension, RateLimitDimension::InputTokens);
        assert_eq!(r.retry_after, Duration::from_secs(30));
        // Nothing was debited by the refusal.
        let s = l.snapshot(t0);
        assert_eq!(
            s.levels(),
            BucketLevels {
                requests: Some(9),
                input_tokens: Some(0),
                output_tokens: Some(5900),
            }
        );
        l.credit_output(t0, 90);
        assert_eq!(l.snapshot(t0).output_tokens.unwrap().remaining, 5990);
        // More than capacity never fits: the wait is the time to full.
        let r = l.try_admit(t0, 601, 1).unwrap_err();
        assert_eq!(r.retry_after, P);
        // Lowering clamps, raising keeps the level, a new limit starts full.
        l.set_limits(
            AnthropicLimits {
                requests_per_min: Some(5),
                input_tokens_per_min: Some(1200),
                output_tokens_per_min: None,
            },
            t0,
        );
        let s = l.snapshot(t0);
        assert_eq!(s.requests.unwrap().remaining, 5);
        assert_eq!(s.input_tokens.unwrap().remaining, 0);
        assert!(s.output_tokens.is_none());
        l.set_limits(AnthropicLimits::new(5, 1200, 10), t0);
        assert_eq!(l.snapshot(t0).output_tokens.unwrap().remaining, 10);
    }

    #[test]
    fn rfc3339_and_rounding() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_796_346_123);
        assert_eq!(rfc3339_ceil(t), "2026-12-04T01:02:03Z");
        assert_eq!(
            rfc3339_ceil(t + Duration::from_millis(1)),
            "2026-12-04T01:02:04Z"
        );
        assert_eq!(rfc3339_ceil(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap = std::time::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_ceil(leap), "2000-02-29T00:00:00Z");
        assert_eq!(round_thousands(0), 0);
        assert_eq!(round_thousands(499), 0);
        assert_eq!(round_thousands(500), 1000);
        assert_eq!(round_thousands(29_400), 29_000);
        assert_eq!(round_thousands(u64::MAX), u64::MAX / 1000 * 1000);
    }

    fn entry(seq: u64, at_ns: u64, input: u64, out: u64) -> AnthropicLogEntry {
        AnthropicLogEntry {
            seq,
            at_ns,
            request_id: format!("req_{seq}"),
            model: Some("m".into()),
            stream: false,
            status: 200,
            admitted: true,
            rejected: None,
            input_tokens: input,
            output_reserved: out,
            output_actual: None,
            finished_seq: None,
            finished_ns: None,
            levels: None,
        }
    }

    #[test]
    fn replay_finds_overdrafts_in_a_crafted_log() {
        let p = period_nanos(P);
        let change = LimitChange {
            seq: 0,
            at_ns: 0,
            model: "m".into(),
            limits: AnthropicLimits::new(2, 100, 100),
        };
        let good = AnthropicLog {
            period_ns: p,
            complete: true,
            dropped: 0,
            limit_changes: vec![change.clone()],
            entries: vec![
                entry(1, 0, 100, 50),
                // Half a period later half the input (50) is back.
                entry(2, p / 2, 50, 50),
            ],
        };
        let r = &replay_admissions(&good)[0];
        assert!(r.within_limits(), "{r:?}");
        assert_eq!(r.admitted, 2);
        assert_eq!(r.min_level.input_tokens, Some(0));
        // 2 - 1, then + 1 refilled - 1.
        assert_eq!(r.min_level.requests, Some(1));
        // One nanosecond earlier the second request did not fit.
        let mut bad = good.clone();
        bad.entries[1].at_ns = p / 2 - 1;
        let r = &replay_admissions(&bad)[0];
        assert!(!r.within_limits());
        assert_eq!(r.first_violation_seq, Some(2));
        assert_eq!(r.min_level.input_tokens, Some(-1));
        // One more request at once empties the RPM bucket; two overdraw it.
        let mut bad = good.clone();
        bad.entries.push(entry(3, p / 2, 0, 0));
        assert!(replay_admissions(&bad)[0].within_limits());
        bad.entries.push(entry(4, p / 2, 0, 0));
        let r = &replay_admissions(&bad)[0];
        assert!(!r.within_limits());
        assert_eq!((r.violations, r.min_level.requests), (1, Some(-1)));
        // A credit-back makes room; without it the same log is a violation.
        let mut credited = good.clone();
        credited.entries[0].output_actual = Some(10);
        credited.entries[0].finished_seq = Some(2);
        credited.entries[0].finished_ns = Some(0);
        credited.entries[1].seq = 3;
        credited.entries[1].at_ns = 0;
        credited.entries[1].input_tokens = 0;
        credited.entries[1].output_reserved = 90;
        assert!(replay_admissions(&credited)[0].within_limits());
        credited.entries[0].finished_seq = None;
        assert!(!replay_admissions(&credited)[0].within_limits());
        // Recorded levels that disagree with the replay are flagged.
        let mut lying = good.clone();
        lying.entries[0].levels = Some(BucketLevels {
            requests: Some(1),
            input_tokens: Some(5),
            output_tokens: Some(50),
        });
        assert!(!replay_admissions(&lying)[0].levels_consistent);
        lying.entries[0].levels = Some(BucketLevels {
            requests: Some(1),
            input_tokens: Some(0),
            output_tokens: Some(50),
        });
        assert!(replay_admissions(&lying)[0].levels_consistent);
    }
}
