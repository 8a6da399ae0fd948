//! Strict sliding-window quotas, one window per *bucket*.
//!
//! Vertex enforces per-project, per-location, per-base-model budgets
//! (reference §5): **requests per minute**, **input tokens per minute** and
//! **output tokens per minute**, three separate metrics (input and output
//! are *not* summed). The simulator also keeps an optional combined
//! input + output budget (`tokens_per_min`), which older configurations use;
//! any of the three token limits may be absent (not enforced).
//!
//! ## Buckets: which requests share a window
//!
//! A [`BucketId`] is a location plus a [`BucketKey`]. Which key a model uses
//! depends on the kind of location ([`LocationKind`]):
//!
//! * on **`global`** and the **multi-regions** (`us`, `eu`), every model that
//!   names the same `quota_group` (a "lineage", e.g.
//!   `anthropic-claude-sonnet`) draws on **one** shared window there: Google
//!   moved models launched after 2026-05-26 to such lineage buckets;
//! * on **regional** locations (`us-east5`, `europe-west4`, ...) every model
//!   keeps its own window, group or not, and so does a model with no group
//!   anywhere.
//!
//! Global and each multi-region are independent of each other and of the
//! regions: the same group has one bucket on `global` and another on `eu`.
//! The bucket's `base_model` (the dimension a 429 names) is the group name
//! for a lineage bucket, else [`crate::errors::base_model`] of the model id.
//!
//! ## The window
//!
//! Google does not document whether its window is fixed or sliding, so the
//! simulator picks the *strictest* reading, which is the one a gateway must
//! survive:
//!
//! * Each admitted request is recorded at its **arrival** time with the
//!   input tokens that count against the quota (see the cache rule in
//!   [`crate::message`]) and its output tokens (known up front, see
//!   `SIM_OUTPUT_TOKENS` in the crate docs).
//! * On arrival, entries older than `window` are evicted (an entry exactly
//!   `window` old still counts: the window is the closed interval
//!   `[now - window, now]`). The request is rejected if
//!   `requests_in_window + 1 > requests_per_min`, or, for each token limit
//!   that is set, if what is in the window plus this request exceeds it
//!   (input, then output, then combined).
//! * A rejected request is **not** recorded (it does not eat budget); an
//!   admitted one is recorded in full at once.
//!
//! ## The admission log
//!
//! Besides the window (which forgets), each bucket keeps a log of the last
//! [`ADMISSION_LOG_LEN`] admissions ([`Admission`]). A test can take it
//! ([`crate::SimHandle::admissions`]) and check *every* window of a run with
//! [`peak_usage`], rather than trusting the simulator's own verdicts.
//!
//! Time is `tokio::time::Instant`, taken under the bucket's lock (so the
//! log is in order), and tests on tokio's paused clock are deterministic.
//! The window is a `VecDeque` with running sums: admission is O(evicted) and
//! allocation-free once the deque has grown.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::errors::QuotaMetric;
use crate::faults::lock;

/// How many admissions each bucket's log keeps (oldest dropped first).
pub const ADMISSION_LOG_LEN: usize = 65_536;

/// The limits of one bucket. `None` token limits are not enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuotaLimits {
    /// Requests per window.
    pub requests_per_min: u32,
    /// Input + output tokens per window, if enforced (Vertex itself has no
    /// combined metric; kept for older configurations).
    pub tokens_per_min: Option<u64>,
    /// Input tokens per window, if enforced.
    pub input_tokens_per_min: Option<u64>,
    /// Output tokens per window, if enforced.
    pub output_tokens_per_min: Option<u64>,
}

impl QuotaLimits {
    /// `rpm` requests and `tpm` input + output tokens per window.
    pub fn combined(rpm: u32, tpm: u64) -> Self {
        QuotaLimits {
            requests_per_min: rpm,
            tokens_per_min: Some(tpm),
            input_tokens_per_min: None,
            output_tokens_per_min: None,
        }
    }

    /// Vertex's three metrics: `rpm` requests, `itpm` input tokens and
    /// `otpm` output tokens per window, no combined limit.
    pub fn split(rpm: u32, itpm: u64, otpm: u64) -> Self {
        QuotaLimits {
            requests_per_min: rpm,
            tokens_per_min: None,
            input_tokens_per_min: Some(itpm),
            output_tokens_per_min: Some(otpm),
        }
    }

    /// Whether a window holding `peak` respects every limit (for checking a
    /// run with [`peak_usage`]).
    pub fn allows(&self, peak: &PeakUsage) -> bool {
        peak.requests <= u64::from(self.requests_per_min)
            && self.tokens_per_min.is_none_or(|m| peak.tokens <= m)
            && self
                .input_tokens_per_min
                .is_none_or(|m| peak.input_tokens <= m)
            && self
                .output_tokens_per_min
                .is_none_or(|m| peak.output_tokens <= m)
    }
}

/// What kind of location a `{location}` path segment is; it decides the
/// metric names in 429s and whether lineage groups share a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LocationKind {
    /// A single region such as `us-east5` or `europe-west4`: per-model
    /// quotas, metric `online_prediction_*`.
    Regional,
    /// `global`: lineage buckets, metric `global_online_prediction_*`.
    Global,
    /// A multi-region such as `us` or `eu`: lineage buckets, metric
    /// `{location}_multi_region_online_prediction_*`.
    MultiRegion,
}

impl LocationKind {
    /// `global` is global; a name made of ASCII letters only (`us`, `eu`:
    /// no dash, no digit, unlike every region) is a multi-region; anything
    /// else is regional.
    pub fn of(location: &str) -> Self {
        if location == "global" {
            LocationKind::Global
        } else if !location.is_empty() && location.bytes().all(|b| b.is_ascii_alphabetic()) {
            LocationKind::MultiRegion
        } else {
            LocationKind::Regional
        }
    }

    /// Whether models of one lineage group share a bucket here.
    pub fn shares_lineage(self) -> bool {
        self != LocationKind::Regional
    }
}

/// Which window a request draws on, inside its location.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum BucketKey {
    /// The model's own window (regional locations, or no group).
    Model(String),
    /// A lineage group's shared window (global and multi-regions).
    Group(String),
}

/// A quota bucket: one location and one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct BucketId {
    /// The `{location}` path segment.
    pub location: String,
    /// The model or group whose window it is.
    pub key: BucketKey,
}

impl BucketId {
    /// The bucket of `model` (in `group`, if any) at `location`.
    pub fn for_model(location: &str, model: &str, group: Option<&str>) -> Self {
        let key = match group {
            Some(g) if LocationKind::of(location).shares_lineage() => {
                BucketKey::Group(g.to_owned())
            }
            _ => BucketKey::Model(model.to_owned()),
        };
        BucketId {
            location: location.to_owned(),
            key,
        }
    }

    /// The `base_model` dimension a 429 names: the group, or the model id
    /// mapped by [`crate::errors::base_model`].
    pub fn base_model(&self) -> String {
        match &self.key {
            BucketKey::Model(m) => crate::errors::base_model(m),
            BucketKey::Group(g) => g.clone(),
        }
    }

    /// The kind of the bucket's location.
    pub fn location_kind(&self) -> LocationKind {
        LocationKind::of(&self.location)
    }
}

/// One admitted request, as a bucket's log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Arrival (= admission) time.
    pub at: Instant,
    /// The Vertex model id the request named.
    pub model: Arc<str>,
    /// Input tokens counted against the quota (cache reads included only if
    /// the model counts them).
    pub input_tokens: u64,
    /// Output tokens counted against the quota.
    pub output_tokens: u64,
}

/// The most a window of some length ever held, each figure maximised on
/// its own (the busiest window for requests need not be the busiest for
/// tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PeakUsage {
    /// Most requests in one window.
    pub requests: u64,
    /// Most counted input tokens in one window.
    pub input_tokens: u64,
    /// Most output tokens in one window.
    pub output_tokens: u64,
    /// Most input + output tokens in one window.
    pub tokens: u64,
}

/// The peak of every closed window `[t - window, t]` over `log`, which the
/// simulator's own check uses: the rule "nothing over the limit in any
/// window" holds for the run iff `limits.allows(&peak_usage(log, window))`.
///
/// A window's contents only change at entries, so only windows ending at an
/// entry need checking: two pointers, O(n). `log` may be in any order.
pub fn peak_usage(log: &[Admission], window: Duration) -> PeakUsage {
    let sorted;
    let log = if log.is_sorted_by_key(|a| a.at) {
        log
    } else {
        let mut v = log.to_vec();
        v.sort_by_key(|a| a.at);
        sorted = v;
        &sorted[..]
    };
    let mut peak = PeakUsage::default();
    let (mut start, mut input, mut output) = (0usize, 0u64, 0u64);
    for (end, e) in log.iter().enumerate() {
        input = input.saturating_add(e.input_tokens);
        output = output.saturating_add(e.output_tokens);
        while e.at.saturating_duration_since(log[start].at) > window {
            input = input.saturating_sub(log[start].input_tokens);
            output = output.saturating_sub(log[start].output_tokens);
            start += 1;
        }
        peak.requests = peak.requests.max((end + 1 - start) as u64);
        peak.input_tokens = peak.input_tokens.max(input);
        peak.output_tokens = peak.output_tokens.max(output);
        peak.tokens = peak.tokens.max(input.saturating_add(output));
    }
    peak
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    at: Instant,
    input: u64,
    output: u64,
}

/// A strict sliding window for one bucket.
#[derive(Debug)]
pub struct QuotaWindow {
    limits: QuotaLimits,
    entries: VecDeque<Entry>,
    input_sum: u64,
    output_sum: u64,
}

/// What is currently inside a window (after eviction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WindowUsage {
    /// Requests in the window.
    pub requests: u64,
    /// Input tokens in the window.
    pub input_tokens: u64,
    /// Output tokens in the window.
    pub output_tokens: u64,
}

impl QuotaWindow {
    /// An empty window with the given limits.
    pub fn new(limits: QuotaLimits) -> Self {
        QuotaWindow {
            limits,
            entries: VecDeque::new(),
            input_sum: 0,
            output_sum: 0,
        }
    }

    /// The current limits.
    pub fn limits(&self) -> QuotaLimits {
        self.limits
    }

    /// Replaces the limits (Google raised the quota). Usage is kept.
    pub fn set_limits(&mut self, limits: QuotaLimits) {
        self.limits = limits;
    }

    /// Forgets all usage.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.input_sum = 0;
        self.output_sum = 0;
    }

    fn evict(&mut self, now: Instant, window: Duration) {
        while let Some(front) = self.entries.front() {
            // Strictly older than `window` goes: an entry exactly `window` old still counts.
            if now.saturating_duration_since(front.at) > window {
                // Sums saturate on absurd inputs, so subtract saturating too.
                self.input_sum = self.input_sum.saturating_sub(front.input);
                self.output_sum = self.output_sum.saturating_sub(front.output);
                self.entries.pop_front();
                if self.entries.is_empty() {
                    self.input_sum = 0;
                    self.output_sum = 0;
                }
            } else {
                break;
            }
        }
    }

    /// Usage inside the window ending at `now`.
    pub fn usage(&mut self, now: Instant, window: Duration) -> WindowUsage {
        self.evict(now, window);
        WindowUsage {
            requests: self.entries.len() as u64,
            input_tokens: self.input_sum,
            output_tokens: self.output_sum,
        }
    }

    /// Admits (and records) a request of `input` + `output` tokens arriving
    /// at `now`, or says which metric it would exceed (and records nothing).
    pub fn try_admit(
        &mut self,
        now: Instant,
        window: Duration,
        input: u64,
        output: u64,
    ) -> Result<(), QuotaMetric> {
        self.evict(now, window);
        let l = self.limits;
        if self.entries.len() as u64 + 1 > u64::from(l.requests_per_min) {
            return Err(QuotaMetric::Requests);
        }
        let in_after = self.input_sum.saturating_add(input);
        let out_after = self.output_sum.saturating_add(output);
        if let Some(max) = l.input_tokens_per_min {
            if in_after > max {
                return Err(QuotaMetric::InputTokens);
            }
        }
        if let Some(max) = l.output_tokens_per_min {
            if out_after > max {
                return Err(QuotaMetric::OutputTokens);
            }
        }
        if let Some(max) = l.tokens_per_min {
            if in_after.saturating_add(out_after) > max {
                // The combined budget is reported under the input metric,
                // which is the one Vertex names most often in practice.
                return Err(QuotaMetric::InputTokens);
            }
        }
        self.input_sum = in_after;
        self.output_sum = out_after;
        self.entries.push_back(Entry {
            at: now,
            input,
            output,
        });
        Ok(())
    }
}

/// A bucket as the server uses it: the window and the admission log behind
/// one lock, so the log is in admission order and agrees with the window.
#[derive(Debug)]
pub(crate) struct Bucket {
    pub(crate) id: BucketId,
    inner: Mutex<BucketInner>,
}

#[derive(Debug)]
struct BucketInner {
    window: QuotaWindow,
    log: VecDeque<Admission>,
    /// Admissions dropped from the front of a full log.
    dropped: u64,
}

impl Bucket {
    pub(crate) fn new(id: BucketId, limits: QuotaLimits) -> Self {
        Bucket {
            id,
            inner: Mutex::new(BucketInner {
                window: QuotaWindow::new(limits),
                log: VecDeque::new(),
                dropped: 0,
            }),
        }
    }

    /// Admits a request of `model` arriving now (the clock is read under the
    /// lock, so concurrent admissions are logged in time order).
    pub(crate) fn try_admit(
        &self,
        window: Duration,
        model: &Arc<str>,
        input: u64,
        output: u64,
    ) -> Result<(), QuotaMetric> {
        let mut b = lock(&self.inner);
        let now = Instant::now();
        b.window.try_admit(now, window, input, output)?;
        if b.log.len() >= ADMISSION_LOG_LEN {
            b.log.pop_front();
            b.dropped += 1;
        }
        b.log.push_back(Admission {
            at: now,
            model: model.clone(),
            input_tokens: input,
            output_tokens: output,
        });
        Ok(())
    }

    pub(crate) fn usage(&self, window: Duration) -> WindowUsage {
        lock(&self.inner).window.usage(Instant::now(), window)
    }

    pub(crate) fn limits(&self) -> QuotaLimits {
        lock(&self.inner).window.limits()
    }

    pub(crate) fn set_limits(&self, limits: QuotaLimits) {
        lock(&self.inner).window.set_limits(limits);
    }

    /// The log, oldest first, and how many older admissions it dropped.
    pub(crate) fn log(&self) -> (Vec<Admission>, u64) {
        let b = lock(&self.inner);
        (b.log.iter().cloned().collect(), b.dropped)
    }

    pub(crate) fn clear(&self) {
        let mut b = lock(&self.inner);
        b.window.clear();
        b.log.clear();
        b.dropped = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(60);

    fn limits(rpm: u32, tpm: u64) -> QuotaLimits {
        QuotaLimits::combined(rpm, tpm)
    }

    #[tokio::test(start_paused = true)]
    async fn requests_slide_not_reset() {
        let mut q = QuotaWindow::new(limits(2, 1_000_000));
        let t0 = Instant::now();
        assert!(q.try_admit(t0, W, 1, 1).is_ok());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(q.try_admit(Instant::now(), W, 1, 1).is_ok());
        assert_eq!(
            q.try_admit(Instant::now(), W, 1, 1),
            Err(QuotaMetric::Requests)
        );
        // At t0 + 60 s the first entry is exactly `window` old: still counted.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            q.try_admit(Instant::now(), W, 1, 1),
            Err(QuotaMetric::Requests)
        );
        // Just past it, one slot frees up, but only one (the t0+30 entry remains).
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(q.try_admit(Instant::now(), W, 1, 1).is_ok());
        assert_eq!(
            q.try_admit(Instant::now(), W, 1, 1),
            Err(QuotaMetric::Requests)
        );
        assert_eq!(q.usage(Instant::now(), W).requests, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_count_input_plus_output_and_rejections_are_free() {
        let mut q = QuotaWindow::new(limits(100, 100));
        let now = Instant::now();
        assert!(q.try_admit(now, W, 50, 30).is_ok());
        assert_eq!(q.try_admit(now, W, 15, 6), Err(QuotaMetric::InputTokens));
        assert!(q.try_admit(now, W, 15, 5).is_ok());
        assert_eq!(
            q.usage(now, W),
            WindowUsage {
                requests: 2,
                input_tokens: 65,
                output_tokens: 35
            }
        );
        tokio::time::advance(W + Duration::from_millis(1)).await;
        assert_eq!(q.usage(Instant::now(), W).requests, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn split_limits_name_their_metric() {
        let mut q = QuotaWindow::new(QuotaLimits {
            input_tokens_per_min: Some(10),
            output_tokens_per_min: Some(5),
            ..limits(100, 1_000)
        });
        let now = Instant::now();
        assert_eq!(q.try_admit(now, W, 11, 1), Err(QuotaMetric::InputTokens));
        assert_eq!(q.try_admit(now, W, 1, 6), Err(QuotaMetric::OutputTokens));
        assert!(q.try_admit(now, W, 10, 5).is_ok());
    }

    #[test]
    fn zero_quota_rejects_everything_and_huge_numbers_saturate() {
        let mut q = QuotaWindow::new(limits(0, 0));
        assert_eq!(
            q.try_admit(Instant::now(), W, 0, 0),
            Err(QuotaMetric::Requests)
        );
        let mut q = QuotaWindow::new(limits(10, u64::MAX));
        assert!(q.try_admit(Instant::now(), W, u64::MAX, 0).is_ok());
        assert!(q.try_admit(Instant::now(), W, 1, 0).is_ok());
    }

    #[test]
    fn location_kinds() {
        assert_eq!(LocationKind::of("global"), LocationKind::Global);
        assert_eq!(LocationKind::of("us"), LocationKind::MultiRegion);
        assert_eq!(LocationKind::of("eu"), LocationKind::MultiRegion);
        assert_eq!(LocationKind::of("us-east5"), LocationKind::Regional);
        assert_eq!(LocationKind::of("europe-west4"), LocationKind::Regional);
        assert_eq!(LocationKind::of(""), LocationKind::Regional);
        let g = Some("anthropic-claude-sonnet");
        assert_eq!(
            BucketId::for_model("global", "claude-sonnet-4-6", g).key,
            BucketKey::Group("anthropic-claude-sonnet".into())
        );
        assert_eq!(
            BucketId::for_model("us-east5", "claude-sonnet-4-6", g).key,
            BucketKey::Model("claude-sonnet-4-6".into())
        );
        assert_eq!(
            BucketId::for_model("eu", "claude-sonnet-4-6", None).base_model(),
            "anthropic-claude-sonnet-4-6"
        );
        assert_eq!(
            BucketId::for_model("eu", "claude-sonnet-4-6", g).base_model(),
            "anthropic-claude-sonnet"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn split_only_limits_have_no_combined_budget() {
        let mut q = QuotaWindow::new(QuotaLimits::split(100, 10, 5));
        let now = Instant::now();
        // 10 + 5 = 15 tokens: fine, there is no combined limit.
        assert!(q.try_admit(now, W, 10, 5).is_ok());
        assert_eq!(q.try_admit(now, W, 1, 0), Err(QuotaMetric::InputTokens));
        assert_eq!(q.try_admit(now, W, 0, 1), Err(QuotaMetric::OutputTokens));
        assert!(q.try_admit(now, W, 0, 0).is_ok());
    }

    fn adm(at: Instant, input: u64, output: u64) -> Admission {
        Admission {
            at,
            model: Arc::from("m"),
            input_tokens: input,
            output_tokens: output,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn peak_usage_checks_every_closed_window() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let log = vec![
            adm(t0, 10, 1),
            adm(t0 + s(30), 20, 2),
            adm(t0 + s(60), 30, 3), // exactly W after t0: same window as t0
            adm(t0 + s(61), 40, 4),
            adm(t0 + s(200), 1, 100),
        ];
        let p = peak_usage(&log, W);
        assert_eq!(
            p,
            PeakUsage {
                requests: 3,
                input_tokens: 20 + 30 + 40,
                output_tokens: 100,
                // The lone last entry (1 + 100) beats t0+30..t0+61 (90 + 9).
                tokens: 101,
            }
        );
        // Order does not matter.
        let mut rev = log.clone();
        rev.reverse();
        assert_eq!(peak_usage(&rev, W), p);
        assert!(QuotaLimits::split(3, 90, 100).allows(&p));
        assert!(!QuotaLimits::split(2, 90, 100).allows(&p));
        assert!(!QuotaLimits::split(3, 89, 100).allows(&p));
        assert!(QuotaLimits::combined(3, 101).allows(&p));
        assert!(!QuotaLimits::combined(3, 100).allows(&p));
        assert_eq!(peak_usage(&[], W), PeakUsage::default());
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_logs_what_it_admits_and_only_that() {
        let b = Bucket::new(
            BucketId::for_model("global", "m", Some("g")),
            QuotaLimits::split(2, 100, 100),
        );
        let m: Arc<str> = Arc::from("m");
        assert!(b.try_admit(W, &m, 5, 1).is_ok());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_admit(W, &m, 6, 2).is_ok());
        assert_eq!(b.try_admit(W, &m, 1, 1), Err(QuotaMetric::Requests));
        let (log, dropped) = b.log();
        assert_eq!(dropped, 0);
        assert_eq!(log.len(), 2);
        assert_eq!(log[1].at - log[0].at, Duration::from_secs(1));
        assert_eq!((log[1].input_tokens, log[1].output_tokens), (6, 2));
        b.clear();
        assert!(b.log().0.is_empty());
        assert_eq!(b.usage(W).requests, 0);
    }
}
