//! The token bucket: one budget on Anthropic's first-party API, modelled
//! exactly as Anthropic enforces it.
//!
//! ## Why a bucket, not a window
//!
//! Vertex does not say how it counts, so the [`Ledger`](crate::ledger::Ledger)
//! assumes the strictest reading, a sliding window. Anthropic does say: its
//! requests (RPM), input tokens (ITPM) and output tokens (OTPM) per minute
//! are **continuously refilling buckets** of capacity `limit` that regain
//! `limit` per minute. After a full burst a window keeps a budget closed for
//! a whole minute; the bucket has half of it back after thirty seconds. A
//! window would be safe but would waste that half, so this meter models the
//! bucket itself: whatever a window admits, the bucket admits too (it is
//! never stricter than needed), and it never admits what Anthropic's bucket
//! would refuse (it is never looser either), which the tests check against
//! an independent model of Anthropic's bucket.
//!
//! Each level is kept exactly, as units × period-nanoseconds in an `i128`:
//! over `dt` a bucket of `limit` regains `dt_nanos × limit`, so no float
//! ever drifts and "full again at" is an exact nanosecond.
//!
//! ## Reservations and settlement
//!
//! A reservation debits every dimension at once (1 request; input + output
//! on `tokens`; input on `input_tokens`; output on `output_tokens`). What
//! happens at settlement depends on how Anthropic counts each part:
//!
//! - **Output** is debited `max_tokens` by Anthropic too, and adjusted to
//!   the actual count when the request ends. So is it here: a plain credit
//!   now, capped at capacity.
//! - **Input** Anthropic counts when it admits the request; the gateway only
//!   had an estimate. A plain credit of `reserved − actual` at the end would
//!   be too generous: while the reservation held the level down, refill that
//!   Anthropic's (fuller, capped) bucket could not use went into ours, and a
//!   later credit would count it twice. So input is credited
//!   *retroactively*: as if the actual count had been debited at admission.
//!   For that each unsettled reservation keeps its *gap*: how far a bucket
//!   started full right after its admission, seeing everything since, is
//!   above the real level. The credit is `min(reserved − actual, gap)`,
//!   which is exactly the level the bucket would have had.
//! - **Cancel** (never sent) is retroactive for every dimension, the
//!   request included: Anthropic never saw it.
//! - An **under-estimate** (actual above reserved) is a debit now: the level
//!   goes negative if need be (debt), and later admissions wait for it.
//!
//! ## Learning from headers
//!
//! Every Anthropic response says, per bucket, its limit and what remained
//! right after admitting that request ([`RateLimitReport`]). Two lessons:
//!
//! - **Limits.** A limit lower than ours is the truth (the organisation's
//!   tier, not the config); it lowers ours, never above the configured
//!   ceiling.
//! - **Level, by discrepancy.** Comparing `remaining` with our level *now*
//!   would be wrong: requests admitted since (in flight on either side)
//!   make the two differ without either being wrong. Instead each
//!   reservation remembers the level right after its own debit, the same
//!   moment Anthropic's `remaining` describes. If Anthropic had less (beyond
//!   its rounding to the nearest thousand), this model was optimistic by
//!   the difference then, and is still: the difference is debited now, once
//!   (corrections made since are subtracted from the other remembered
//!   levels, so two reports of one discrepancy do not debit it twice). If
//!   Anthropic had more, the model stays conservative.
//!
//! ## Share
//!
//! Several gateway replicas may draw on one Anthropic organisation, each
//! configured with its slice of the limits. Headers describe the whole
//! bucket, so `limit` and `remaining` are divided by `share` (the number of
//! replicas splitting it) before they are compared with this replica's
//! slice; the rounding tolerance divides with them.
//!
//! Time is a [`Duration`] since an arbitrary epoch, passed in by the
//! caller; header times are read against the Unix time the caller passes.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::adaptive::Exhausted;
use crate::ledger::{Charge, EntryId, Limits, Usage};

/// Anthropic rounds token `remaining` to the nearest thousand: a difference
/// up to this much is rounding, not news.
pub const TOKEN_ROUNDING: u64 = 500;

/// Unsettled reservations older than this many periods are forgotten (a
/// lost request): their debit stays, they no longer count as in flight.
const FORGET_AFTER_PERIODS: u32 = 10;

/// The four dimensions, in the order levels are stored.
const REQUESTS: usize = 0;
const TOKENS: usize = 1;
const INPUT: usize = 2;
const OUTPUT: usize = 3;
const DIMS: [usize; 4] = [REQUESTS, TOKENS, INPUT, OUTPUT];

fn limit_of(limits: &Limits, dim: usize) -> Option<u64> {
    match dim {
        REQUESTS => Some(u64::from(limits.requests)),
        TOKENS => limits.tokens,
        INPUT => limits.input_tokens,
        _ => limits.output_tokens,
    }
}

/// What a request of `requests` (0 or 1) and `charge` takes from `dim`.
fn amount(dim: usize, requests: u64, charge: Charge) -> u64 {
    match dim {
        REQUESTS => requests,
        TOKENS => charge.total(),
        INPUT => charge.input,
        _ => charge.output,
    }
}

fn to_i128(v: u128) -> i128 {
    i128::try_from(v).unwrap_or(i128::MAX)
}

/// One unsettled or unreported reservation.
#[derive(Debug, Clone)]
struct Entry {
    at: Duration,
    charge: Charge,
    /// Settled, cancelled or refused: no longer in flight.
    settled: bool,
    /// Its report was used (each is used once).
    reported: bool,
    /// Per dimension: a bucket started full right after this admission,
    /// seeing every operation since, minus the real level (≥ 0, never
    /// growing). Bounds the retroactive credit at settlement.
    gap: [i128; 4],
    /// Per dimension: the level right after this debit, lowered by every
    /// correction made since; what Anthropic's `remaining` is compared with.
    snapshot: [i128; 4],
    /// When a 429 report said to come back (store time).
    retry_at: Option<Duration>,
}

/// One budget as Anthropic's token buckets: requests, and whichever of
/// `tokens`, `input_tokens`, `output_tokens` are set.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// The refill period in nanoseconds (a full bucket refills in one).
    period: i128,
    limits: Limits,
    /// Levels in units × period-nanos; may be negative (debt).
    level: [i128; 4],
    /// The time `level` is current at (never moves back).
    at: Duration,
    entries: BTreeMap<u64, Entry>,
    next_id: u64,
}

impl TokenBucket {
    /// A full bucket refilling `limits` per `period` (60 s for Anthropic).
    pub fn new(period: Duration, limits: Limits) -> Self {
        let period = to_i128(period.as_nanos()).max(1);
        let mut bucket = Self {
            period,
            limits,
            level: [0; 4],
            at: Duration::ZERO,
            entries: BTreeMap::new(),
            next_id: 0,
        };
        for dim in DIMS {
            bucket.level[dim] = bucket.capacity(dim).unwrap_or(0);
        }
        bucket
    }

    pub fn period(&self) -> Duration {
        Duration::from_nanos(u64::try_from(self.period).unwrap_or(u64::MAX))
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// `units` in level scale.
    fn scaled(&self, units: u64) -> i128 {
        i128::from(units).saturating_mul(self.period)
    }

    /// Capacity of `dim` in level scale, `None` when it has no limit.
    fn capacity(&self, dim: usize) -> Option<i128> {
        limit_of(&self.limits, dim).map(|l| self.scaled(l))
    }

    /// After the level of `dim` rose to `level`: no gap can exceed the room
    /// left above it (a bucket started full is capped there too).
    fn clamp_gaps(&mut self, dim: usize, cap: i128) {
        let room = cap - self.level[dim];
        for e in self.entries.values_mut().filter(|e| !e.settled) {
            e.gap[dim] = e.gap[dim].min(room);
        }
    }

    /// Refills up to `now` and forgets what no longer matters.
    fn advance(&mut self, now: Duration) {
        if now > self.at {
            let dt = to_i128((now - self.at).as_nanos());
            for dim in DIMS {
                let (Some(cap), Some(limit)) = (self.capacity(dim), limit_of(&self.limits, dim))
                else {
                    continue;
                };
                let refill = dt.saturating_mul(i128::from(limit));
                self.level[dim] = self.level[dim].saturating_add(refill).min(cap);
                self.clamp_gaps(dim, cap);
            }
            self.at = now;
        }
        let horizon = self.period().saturating_mul(FORGET_AFTER_PERIODS);
        let period = self.period();
        self.entries.retain(|_, e| {
            let age = now.saturating_sub(e.at);
            let done = e.settled && (e.reported || age > period);
            !done && age <= horizon
        });
    }

    fn fits_now(&self, charge: Charge) -> bool {
        DIMS.iter().all(|&dim| {
            self.capacity(dim).is_none() || self.level[dim] >= self.scaled(amount(dim, 1, charge))
        })
    }

    /// Changes the limits: capacity and refill rate become the new limit;
    /// a level above the new capacity is cut to it, one below stays (room
    /// is never created by a change). A dimension newly limited starts full.
    pub fn set_limits(&mut self, limits: Limits, now: Duration) {
        self.advance(now);
        let before = self.limits;
        self.limits = limits;
        for dim in DIMS {
            match (limit_of(&before, dim), self.capacity(dim)) {
                (None, Some(cap)) => self.level[dim] = cap,
                (Some(_), Some(cap)) => {
                    self.level[dim] = self.level[dim].min(cap);
                    self.clamp_gaps(dim, cap);
                }
                (_, None) => self.level[dim] = 0,
            }
        }
    }

    /// Whether `charge` (and one request) fits right now.
    pub fn fits(&mut self, charge: Charge, now: Duration) -> bool {
        self.advance(now);
        self.fits_now(charge)
    }

    /// Debits `charge` and one request at `now` if they fit.
    pub fn reserve(&mut self, charge: Charge, now: Duration) -> Option<EntryId> {
        if !self.fits(charge, now) {
            return None;
        }
        let mut gap = [0; 4];
        let mut snapshot = [0; 4];
        for dim in DIMS {
            let Some(cap) = self.capacity(dim) else {
                continue;
            };
            self.level[dim] -= self.scaled(amount(dim, 1, charge));
            snapshot[dim] = self.level[dim];
            gap[dim] = cap - self.level[dim];
        }
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(
            id,
            Entry {
                at: now.max(self.at),
                charge,
                settled: false,
                reported: false,
                gap,
                snapshot,
                retry_at: None,
            },
        );
        Some(EntryId::from_raw(id))
    }

    /// Credits `credit` units to `dim` as if entry `id` had been debited
    /// that much less at its admission.
    fn credit_retroactively(&mut self, id: u64, dim: usize, credit: u64) {
        let Some(gap_k) = self.entries.get(&id).map(|e| e.gap[dim]) else {
            return;
        };
        if self.capacity(dim).is_none() || credit == 0 {
            return;
        }
        let d = self.scaled(credit);
        let c = d.min(gap_k).max(0);
        self.level[dim] += c;
        for (&j, e) in self.entries.iter_mut() {
            if e.settled || j == id {
                continue;
            }
            // A bucket started before `id` sees the credit too, capped by
            // the bucket started at `id`; one started after does not.
            e.gap[dim] = if j < id {
                (e.gap[dim].saturating_add(d)).min(gap_k) - c
            } else {
                e.gap[dim] - c
            }
            .max(0);
        }
    }

    /// A credit (positive) or debit (negative) of `delta` units now.
    fn adjust_now(&mut self, dim: usize, delta: i128) {
        let Some(cap) = self.capacity(dim) else {
            return;
        };
        let d = delta.saturating_mul(self.period);
        if d >= 0 {
            self.level[dim] = self.level[dim].saturating_add(d).min(cap);
            self.clamp_gaps(dim, cap);
        } else {
            self.level[dim] = self.level[dim].saturating_add(d);
        }
    }

    /// A correction of the model to reality: `by` (level scale) debited
    /// now; remembered levels of unreported entries accepted by `affects`
    /// were as optimistic, so they are lowered too.
    fn correct(&mut self, dim: usize, by: i128, affects: impl Fn(u64) -> bool) {
        if by <= 0 {
            return;
        }
        self.level[dim] = self.level[dim].saturating_sub(by);
        for (&j, e) in self.entries.iter_mut() {
            if !e.reported && affects(j) {
                e.snapshot[dim] = e.snapshot[dim].saturating_sub(by);
            }
        }
    }

    /// Marks `id` settled, dropping it if its report was used too.
    fn finish(&mut self, id: u64) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.settled = true;
            if e.reported {
                self.entries.remove(&id);
            }
        }
    }

    fn unsettled(&self, id: EntryId) -> Option<Entry> {
        self.entries.get(&id.raw()).filter(|e| !e.settled).cloned()
    }

    /// The request used `actual`: input reserved beyond it is credited as
    /// if never debited, output beyond it is credited now (capped at
    /// capacity); usage beyond the reservation is debited now, into debt
    /// if need be. Unknown, forgotten or already settled entries are
    /// ignored.
    pub fn settle(&mut self, id: EntryId, actual: Charge, now: Duration) {
        self.advance(now);
        let Some(entry) = self.unsettled(id) else {
            return;
        };
        let k = id.raw();
        let reserved = entry.charge;
        let d_in = i128::from(reserved.input) - i128::from(actual.input);
        let d_out = i128::from(reserved.output) - i128::from(actual.output);
        for dim in [TOKENS, INPUT] {
            if d_in >= 0 {
                self.credit_retroactively(k, dim, d_in as u64);
            } else if self.capacity(dim).is_some() {
                // Anthropic counted the real input at admission: every
                // level remembered since was optimistic by the excess.
                let excess = self.scaled((-d_in) as u64);
                self.correct(dim, excess, |j| j > k);
            }
        }
        for dim in [TOKENS, OUTPUT] {
            self.adjust_now(dim, d_out);
        }
        self.finish(k);
    }

    /// The request was never sent: all of it is refunded, as if never
    /// admitted.
    pub fn cancel(&mut self, id: EntryId, now: Duration) {
        self.advance(now);
        let Some(entry) = self.unsettled(id) else {
            return;
        };
        for dim in DIMS {
            self.credit_retroactively(id.raw(), dim, amount(dim, 1, entry.charge));
        }
        if let Some(e) = self.entries.get_mut(&id.raw()) {
            // No report will come for a request never sent.
            e.reported = true;
        }
        self.finish(id.raw());
    }

    /// Upstream refused the request with a 429 naming `which`: its tokens
    /// are refunded (never spent) but the request counts, and the named
    /// dimensions are empty now (Anthropic says so). Returns when a report
    /// for it said to come back, if one did ([`TokenBucket::learn`]).
    pub fn rate_limited(
        &mut self,
        id: EntryId,
        which: Exhausted,
        now: Duration,
    ) -> Option<Duration> {
        self.advance(now);
        let entry = self.entries.get(&id.raw()).cloned();
        if let Some(entry) = entry.as_ref().filter(|e| !e.settled) {
            for dim in [TOKENS, INPUT, OUTPUT] {
                self.credit_retroactively(id.raw(), dim, amount(dim, 1, entry.charge));
            }
            self.finish(id.raw());
        }
        let l = self.limits;
        let dims: &[usize] = match which {
            Exhausted::Requests => &[REQUESTS],
            Exhausted::Tokens => &[TOKENS, INPUT, OUTPUT],
            Exhausted::InputTokens if l.input_tokens.is_some() => &[INPUT],
            Exhausted::OutputTokens if l.output_tokens.is_some() => &[OUTPUT],
            Exhausted::InputTokens | Exhausted::OutputTokens => &[TOKENS],
            Exhausted::Unknown => &DIMS,
        };
        for &dim in dims {
            if self.capacity(dim).is_some() {
                let by = self.level[dim].max(0);
                self.correct(dim, by, |_| true);
            }
        }
        entry.and_then(|e| e.retry_at)
    }

    /// Debits usage admitted elsewhere (another store's, when this one takes
    /// over from it), now: whatever refill happened since it was admitted
    /// is not counted, the safe direction.
    pub fn import(&mut self, usage: Usage, now: Duration) {
        self.advance(now);
        let charge = Charge {
            input: usage.input,
            output: usage.output,
        };
        for dim in DIMS {
            let units = amount(dim, u64::from(usage.requests), charge);
            self.adjust_now(dim, -i128::from(units));
        }
    }

    /// The earliest time at or after `now` when `charge` fits, exact to the
    /// nanosecond; `None` if it exceeds a capacity (or a dimension with a
    /// zero limit is short), so never fits.
    pub fn earliest_fit(&mut self, charge: Charge, now: Duration) -> Option<Duration> {
        self.advance(now);
        let mut wait: i128 = 0;
        for dim in DIMS {
            let (Some(cap), Some(limit)) = (self.capacity(dim), limit_of(&self.limits, dim)) else {
                continue;
            };
            let need = self.scaled(amount(dim, 1, charge));
            if need > cap {
                return None;
            }
            let deficit = need - self.level[dim];
            if deficit > 0 {
                if limit == 0 {
                    return None;
                }
                let limit = i128::from(limit);
                wait = wait.max((deficit + limit - 1) / limit);
            }
        }
        let wait = Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX));
        Some(now.max(self.at).saturating_add(wait))
    }

    /// When every limited dimension is full again (for `*-reset` headers,
    /// the analogue of the ledger's `empty_at`).
    pub fn full_at(&mut self, now: Duration) -> Duration {
        self.advance(now);
        let mut wait: i128 = 0;
        for dim in DIMS {
            let (Some(cap), Some(limit)) = (self.capacity(dim), limit_of(&self.limits, dim)) else {
                continue;
            };
            let missing = cap - self.level[dim];
            if missing > 0 && limit > 0 {
                let limit = i128::from(limit);
                wait = wait.max((missing + limit - 1) / limit);
            }
        }
        let wait = Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX));
        now.max(self.at).saturating_add(wait)
    }

    /// The fraction of the tightest dimension left after `charge`, in
    /// `[0, 1]`, or `None` if it does not fit now: the ledger's scale, so
    /// routing by headroom compares the two alike.
    pub fn headroom_after(&mut self, charge: Charge, now: Duration) -> Option<f64> {
        if !self.fits(charge, now) {
            return None;
        }
        let mut headroom: f64 = 1.0;
        for dim in DIMS {
            let Some(cap) = self.capacity(dim) else {
                continue;
            };
            let left = self.level[dim] - self.scaled(amount(dim, 1, charge));
            let fraction = if cap == 0 {
                0.0
            } else {
                (left as f64 / cap as f64).clamp(0.0, 1.0)
            };
            headroom = headroom.min(fraction);
        }
        Some(headroom)
    }

    /// Units used of `dim` (capacity − level, rounded up, never negative).
    fn used(&self, dim: usize) -> Option<u64> {
        let cap = self.capacity(dim)?;
        let missing = (cap - self.level[dim]).max(0);
        let units = (missing + self.period - 1) / self.period;
        Some(u64::try_from(units).unwrap_or(u64::MAX))
    }

    /// What is missing from each bucket (capacity − level, rounded up): the
    /// analogue of a window's usage. `input` and `output` are their own
    /// buckets' when limited; when only one is, or neither, the combined
    /// bucket's use is given to the unlimited side(s) so that
    /// [`Usage::tokens`] reads the combined bucket (exactly so unless both
    /// split limits are set, when it is their sum).
    pub fn usage(&mut self, now: Duration) -> Usage {
        self.advance(now);
        let requests = self.used(REQUESTS).unwrap_or(0);
        let tokens = self.used(TOKENS);
        let (input, output) = match (self.used(INPUT), self.used(OUTPUT)) {
            (Some(i), Some(o)) => (i, o),
            (Some(i), None) => (i, tokens.map_or(0, |t| t.saturating_sub(i))),
            (None, Some(o)) => (tokens.map_or(0, |t| t.saturating_sub(o)), o),
            (None, None) => (tokens.unwrap_or(0), 0),
        };
        Usage {
            requests: u32::try_from(requests).unwrap_or(u32::MAX),
            input,
            output,
        }
    }

    /// The reservations of requests not yet settled.
    pub fn in_flight(&mut self, now: Duration) -> Usage {
        self.advance(now);
        let mut usage = Usage::default();
        for e in self.entries.values().filter(|e| !e.settled) {
            usage.requests = usage.requests.saturating_add(1);
            usage.input = usage.input.saturating_add(e.charge.input);
            usage.output = usage.output.saturating_add(e.charge.output);
        }
        usage
    }

    /// Applies what Anthropic said in answer to reservation `id`.
    ///
    /// Limits: each header limit divided by `share` (≥ 1, the replicas
    /// splitting the real bucket) becomes this bucket's limit, never above
    /// `ceiling` (the configured limits) and only for dimensions both have.
    /// Level: if `remaining / share` is below the level remembered right
    /// after `id`'s debit by more than the rounding (500 tokens / `share`,
    /// 0 requests), the difference is debited now; each entry's report is
    /// used once. Returns the store time to keep the budget closed until
    /// when the report carries `retry-after`.
    pub fn learn(
        &mut self,
        id: EntryId,
        report: &RateLimitReport,
        now: Duration,
        ceiling: Limits,
        share: u32,
    ) -> Option<Duration> {
        self.advance(now);
        let share = u64::from(share.max(1));
        let dims = report.dimensions();
        let mut limits = self.limits;
        for (dim, seen) in DIMS.iter().zip(dims) {
            let (Some(seen), Some(ceiling)) = (seen, limit_of(&ceiling, *dim)) else {
                continue;
            };
            if limit_of(&limits, *dim).is_none() {
                continue;
            }
            let learned = (seen.limit / share).max(1).min(ceiling);
            match *dim {
                REQUESTS => limits.requests = u32::try_from(learned).unwrap_or(u32::MAX),
                TOKENS => limits.tokens = Some(learned),
                INPUT => limits.input_tokens = Some(learned),
                _ => limits.output_tokens = Some(learned),
            }
        }
        if limits != self.limits {
            self.set_limits(limits, now);
        }
        let k = id.raw();
        if let Some(entry) = self.entries.get(&k).filter(|e| !e.reported).cloned() {
            for (dim, seen) in DIMS.iter().zip(dims) {
                let (Some(seen), true) = (seen, self.capacity(*dim).is_some()) else {
                    continue;
                };
                let tolerance = if *dim == REQUESTS { 0 } else { TOKEN_ROUNDING };
                // Compared in share-scaled units: snapshot × share against
                // remaining (both × period), so nothing is rounded yet.
                let share = i128::from(share);
                let optimism =
                    entry.snapshot[*dim].saturating_mul(share) - self.scaled(seen.remaining);
                if optimism > self.scaled(tolerance) {
                    let by = (optimism + share - 1) / share;
                    self.correct(*dim, by, |j| j != k);
                }
            }
            if let Some(e) = self.entries.get_mut(&k) {
                e.reported = true;
            }
        }
        let retry_at = report.retry_after.map(|r| now.saturating_add(r));
        if let Some(e) = self.entries.get_mut(&k) {
            if retry_at.is_some() {
                e.retry_at = retry_at;
            }
            if e.settled {
                self.entries.remove(&k);
            }
        }
        retry_at
    }
}

/// One bucket as a response's headers describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketReport {
    /// The bucket's capacity (and refill per minute).
    pub limit: u64,
    /// What was left right after admitting this request (tokens rounded to
    /// the nearest thousand).
    pub remaining: u64,
    /// How long until the bucket is full again (0 if the stated time has
    /// passed).
    pub reset_in: Duration,
}

/// What an Anthropic response said about its rate limits: the
/// `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`
/// headers and `retry-after`. A dimension is present only when its limit,
/// remaining and reset all parse; anything unparsable is ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitReport {
    pub requests: Option<BucketReport>,
    /// The most restrictive token limit in force (input + output when no
    /// other applies).
    pub tokens: Option<BucketReport>,
    pub input_tokens: Option<BucketReport>,
    pub output_tokens: Option<BucketReport>,
    /// `retry-after`, in integer or fractional seconds.
    pub retry_after: Option<Duration>,
}

impl RateLimitReport {
    /// Reads the headers of one response (names case-insensitive), with
    /// `now_unix` the current Unix time (turning `*-reset` into a delay).
    pub fn from_headers<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        now_unix: Duration,
    ) -> RateLimitReport {
        // Per dimension: limit, remaining, reset (as Unix time).
        let mut parts: [(Option<u64>, Option<u64>, Option<Duration>); 4] = [(None, None, None); 4];
        let mut retry_after = None;
        for (name, value) in headers {
            let name = name.trim();
            let value = value.trim();
            if name.eq_ignore_ascii_case("retry-after") {
                retry_after = parse_seconds(value).or(retry_after);
                continue;
            }
            let Some(rest) = strip_prefix_ignore_case(name, "anthropic-ratelimit-") else {
                continue;
            };
            let dims = [
                (REQUESTS, "requests-"),
                (TOKENS, "tokens-"),
                (INPUT, "input-tokens-"),
                (OUTPUT, "output-tokens-"),
            ];
            for (dim, prefix) in dims {
                let Some(field) = strip_prefix_ignore_case(rest, prefix) else {
                    continue;
                };
                let part = &mut parts[dim];
                if field.eq_ignore_ascii_case("limit") {
                    part.0 = parse_u64(value).or(part.0);
                } else if field.eq_ignore_ascii_case("remaining") {
                    part.1 = parse_u64(value).or(part.1);
                } else if field.eq_ignore_ascii_case("reset") {
                    part.2 = parse_rfc3339(value).or(part.2);
                }
            }
        }
        let report = |(limit, remaining, reset): (Option<u64>, Option<u64>, Option<Duration>)| {
            Some(BucketReport {
                limit: limit?,
                remaining: remaining?,
                reset_in: reset?.saturating_sub(now_unix),
            })
        };
        RateLimitReport {
            requests: report(parts[REQUESTS]),
            tokens: report(parts[TOKENS]),
            input_tokens: report(parts[INPUT]),
            output_tokens: report(parts[OUTPUT]),
            retry_after,
        }
    }

    /// In the order levels are stored.
    fn dimensions(&self) -> [Option<BucketReport>; 4] {
        [
            self.requests,
            self.tokens,
            self.input_tokens,
            self.output_tokens,
        ]
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `12` or `1.5` seconds; nothing else (no sign, no exponent, no date).
fn parse_seconds(s: &str) -> Option<Duration> {
    let (whole, fraction) = match s.split_once('.') {
        Some((w, f)) => (w, f),
        None => (s, ""),
    };
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs = if whole.is_empty() {
        0
    } else {
        parse_u64(whole)?
    };
    Some(Duration::new(secs, fraction_nanos(fraction)))
}

/// Up to nine digits of a decimal fraction, as nanoseconds (the rest dropped).
fn fraction_nanos(digits: &str) -> u32 {
    let mut nanos = 0u32;
    for i in 0..9 {
        let digit = digits.as_bytes().get(i).map_or(0, |b| u32::from(b - b'0'));
        nanos = nanos * 10 + digit;
    }
    nanos
}

/// Days from 1970-01-01 to the proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// An RFC 3339 timestamp (`2026-11-27T10:15:30Z`, `…30.25+01:00`) as Unix
/// time; `None` if malformed or before 1970.
pub fn parse_rfc3339(s: &str) -> Option<Duration> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let digits = b.get(from..from + len)?;
        digits.iter().all(u8::is_ascii_digit).then(|| {
            digits
                .iter()
                .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'))
        })
    };
    let sep = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0;
    if sep(i, b".") {
        let start = i + 1;
        let mut end = start;
        while b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        if end == start {
            return None;
        }
        nanos = fraction_nanos(&s[start..end]);
        i = end;
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && sep(i + 3, b":") => {
            let (h, m) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let offset = h * 3600 + m * 60;
            if *sign == b'+' {
                offset
            } else {
                -offset
            }
        }
        _ => return None,
    };
    let secs =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(Duration::new(u64::try_from(secs).ok()?, nanos))
}
