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
//!   moment Anthropic's `remaining` describes. The most Anthropic can have
//!   had then is the lower of `remaining` plus its rounding (to the nearest
//!   thousand) and what its `reset` implies (a bucket `reset_in` from full
//!   lacks `reset_in × limit / period`: to the second, the sharper bound
//!   near empty). If this model held more, it was optimistic by at least
//!   the excess then, and still is: the excess is debited now, once
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

    /// The most a reported bucket can have held, in level scale: no more
    /// than `remaining` plus its rounding, and no more than its `reset`
    /// allows — a bucket `reset_in` from full, refilling at `limit` a
    /// period, lacks `reset_in × limit / period`. The reset, to the second,
    /// is the sharper bound near empty, where rounding to thousands says
    /// little (a level of 483 reads as 0).
    fn most_left(&self, seen: &BucketReport, rounding: u64) -> i128 {
        let by_remaining = self.scaled(seen.remaining.saturating_add(rounding));
        let reset_in = i128::try_from(seen.reset_in.as_nanos()).unwrap_or(i128::MAX);
        let by_reset = self
            .scaled(seen.limit)
            .saturating_sub(reset_in.saturating_mul(i128::from(seen.limit)))
            .max(0);
        by_remaining.min(by_reset)
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
                    // No level was ever above the capacity: a remembered
                    // one above it would read the cut as a discrepancy.
                    for e in self.entries.values_mut() {
                        e.snapshot[dim] = e.snapshot[dim].min(cap);
                    }
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
                let rounding = if *dim == REQUESTS { 0 } else { TOKEN_ROUNDING };
                // Compared in share-scaled units: snapshot × share against
                // the most Anthropic can have had (both × period), so
                // nothing is rounded yet.
                let share = i128::from(share);
                let optimism =
                    entry.snapshot[*dim].saturating_mul(share) - self.most_left(&seen, rounding);
                if optimism > 0 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Ledger;
    use proptest::prelude::*;

    const P: Duration = Duration::from_secs(60);
    const NS: Duration = Duration::from_nanos(1);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    fn input(n: u64) -> Charge {
        Charge {
            input: n,
            output: 0,
        }
    }

    fn output(n: u64) -> Charge {
        Charge {
            input: 0,
            output: n,
        }
    }

    #[test]
    fn half_a_period_after_a_full_burst_exactly_half_is_back() {
        let limits = Limits::new(60, 60_000);
        let mut b = TokenBucket::new(P, limits);
        let mut window = Ledger::new(P, limits);
        for _ in 0..60 {
            assert!(b.reserve(input(1_000), Duration::ZERO).is_some());
            assert!(window.reserve(input(1_000), Duration::ZERO).is_some());
        }
        assert!(b.reserve(input(0), Duration::ZERO).is_none(), "drained");
        // One nanosecond early, 30 requests are not quite back.
        let mut early = b.clone();
        for _ in 0..29 {
            assert!(early.reserve(input(1_000), secs(30) - NS).is_some());
        }
        assert!(early.reserve(input(1_000), secs(30) - NS).is_none());
        // At 30 s exactly: 30 requests and 30,000 tokens, not one more.
        for _ in 0..30 {
            assert!(b.reserve(input(1_000), secs(30)).is_some());
        }
        assert!(b.reserve(input(0), secs(30)).is_none());
        assert_eq!(b.usage(secs(30)).requests, 60);
        // The window would still be closed for another 30 s.
        assert!(!window.fits(input(1_000), secs(30)));
    }

    #[test]
    fn debt_from_an_under_estimate_delays_the_next_admission_exactly() {
        // 1,000 tokens a minute: 1 token per 60 ms.
        let mut b = TokenBucket::new(P, Limits::new(100, 1_000));
        let a = b.reserve(input(1_000), Duration::ZERO).unwrap();
        b.settle(a, input(1_500), Duration::ZERO);
        assert_eq!(b.usage(Duration::ZERO).tokens(), 1_500, "500 in debt");
        // 600 tokens to regain before 100 fit: 36 s.
        assert_eq!(b.earliest_fit(input(100), Duration::ZERO), Some(secs(36)));
        assert!(b.reserve(input(100), secs(36) - NS).is_none());
        assert!(b.reserve(input(100), secs(36)).is_some());
    }

    #[test]
    fn settle_credit_is_capped_at_capacity() {
        let mut b = TokenBucket::new(P, Limits::new(10, 1_000));
        let a = b.reserve(output(800), Duration::ZERO).unwrap();
        // Full again after a period; the unused 800 cannot overfill it.
        b.settle(a, output(0), secs(60));
        assert_eq!(b.usage(secs(60)).tokens(), 0);
        assert!(b.reserve(output(1_000), secs(60)).is_some());
        assert!(b.reserve(output(1), secs(60)).is_none());
    }

    #[test]
    fn an_input_over_estimate_is_credited_as_if_never_debited() {
        // 1,000 tokens a minute; Anthropic counts the real input (0) at
        // admission, so its bucket stays full while ours refills.
        let mut b = TokenBucket::new(P, Limits::new(10, 1_000));
        let a = b.reserve(input(500), Duration::ZERO).unwrap();
        // 18 s: 300 back, 800 here; Anthropic's was full and gained nothing.
        assert!(b.reserve(input(800), secs(18)).is_some());
        // Anthropic has 200 left. A plain credit of 500 would claim 500.
        b.settle(a, input(0), secs(18));
        assert!(b.fits(input(200), secs(18)));
        assert!(!b.fits(input(201), secs(18)));
    }

    #[test]
    fn cancel_refunds_everything() {
        let mut b = TokenBucket::new(P, Limits::new(1, 1_000));
        let a = b.reserve(input(600), secs(1)).unwrap();
        assert!(!b.fits(input(1), secs(2)));
        assert_eq!(b.in_flight(secs(2)).requests, 1);
        b.cancel(a, secs(2));
        assert_eq!(b.usage(secs(2)), Usage::default());
        assert_eq!(b.in_flight(secs(2)), Usage::default());
        assert!(b.reserve(input(1_000), secs(2)).is_some());
        // Cancelling twice (or settling after) changes nothing.
        b.cancel(a, secs(2));
        b.settle(a, input(0), secs(2));
        assert!(!b.fits(input(0), secs(2)));
    }

    #[test]
    fn earliest_fit_is_exact_per_dimension() {
        // 6,000 tokens a minute: 100 a second; 2 requests: one per 30 s.
        let mut b = TokenBucket::new(P, Limits::new(2, 6_000));
        b.reserve(input(6_000), Duration::ZERO).unwrap();
        assert_eq!(b.earliest_fit(input(150), Duration::ZERO), Some(ms(1_500)));
        assert!(!b.fits(input(150), ms(1_500) - NS));
        assert!(b.fits(input(150), ms(1_500)));
        assert_eq!(b.earliest_fit(input(6_001), secs(1)), None);
        b.reserve(input(0), ms(1_500)).unwrap();
        // Requests bind now: the second request spent what 1.5 s had
        // brought back (0.05 of one), so a whole one is back at 30 s.
        assert_eq!(b.earliest_fit(input(0), ms(1_500)), Some(secs(30)));
        assert!(!b.fits(input(0), secs(30) - NS));
        // Both buckets were drained at 0 (less what 1.5 s refilled, spent
        // again): full a period after the drain.
        assert_eq!(b.full_at(ms(1_500)), secs(60));
    }

    #[test]
    fn full_at_and_headroom_match_the_ledger_on_a_fresh_budget() {
        let limits = Limits::new(10, 1_000);
        let mut b = TokenBucket::new(P, limits);
        let mut l = Ledger::new(P, limits);
        assert_eq!(b.full_at(secs(5)), secs(5));
        assert_eq!(
            b.headroom_after(input(100), Duration::ZERO),
            l.headroom_after(input(100), Duration::ZERO)
        );
        assert_eq!(b.headroom_after(input(1_001), secs(5)), None);
        b.reserve(input(600), secs(5)).unwrap();
        // 600 tokens at 1,000 a minute: 36 s.
        assert_eq!(b.full_at(secs(5)), secs(41));
    }

    #[test]
    fn set_limits_clamps_levels_and_never_creates_room() {
        let mut b = TokenBucket::new(P, Limits::new(10, 1_000));
        b.set_limits(Limits::new(10, 400), Duration::ZERO);
        assert!(b.fits(input(400), Duration::ZERO));
        assert!(!b.fits(input(401), Duration::ZERO));
        b.set_limits(Limits::new(10, 1_000), Duration::ZERO);
        assert_eq!(
            b.usage(Duration::ZERO).tokens(),
            600,
            "raising adds no room"
        );
        b.reserve(input(300), Duration::ZERO).unwrap();
        b.set_limits(Limits::new(10, 50), Duration::ZERO);
        assert_eq!(b.usage(Duration::ZERO).tokens(), 0, "cut to the capacity");
        assert!(b.fits(input(50), Duration::ZERO));
        // A dimension newly limited starts full.
        b.set_limits(Limits::split(10, 500, 100), Duration::ZERO);
        assert_eq!(
            b.usage(Duration::ZERO),
            Usage {
                requests: 1,
                input: 0,
                output: 0
            }
        );
        assert!(!b.fits(output(101), Duration::ZERO));
    }

    #[test]
    fn split_buckets_bind_separately_and_usage_reads_each() {
        let mut b = TokenBucket::new(P, Limits::split(10, 1_000, 100));
        b.reserve(
            Charge {
                input: 900,
                output: 100,
            },
            Duration::ZERO,
        )
        .unwrap();
        assert!(!b.fits(output(1), Duration::ZERO));
        assert!(b.fits(input(100), Duration::ZERO));
        assert_eq!(
            b.usage(Duration::ZERO),
            Usage {
                requests: 1,
                input: 900,
                output: 100
            }
        );
        assert_eq!(
            b.in_flight(Duration::ZERO),
            Usage {
                requests: 1,
                input: 900,
                output: 100
            }
        );
    }

    #[test]
    fn a_429_refunds_tokens_keeps_the_request_and_empties_the_named_bucket() {
        let mut b = TokenBucket::new(P, Limits::new(10, 1_000));
        let a = b.reserve(input(300), Duration::ZERO).unwrap();
        assert_eq!(b.rate_limited(a, Exhausted::Tokens, Duration::ZERO), None);
        assert_eq!(
            b.usage(Duration::ZERO),
            Usage {
                requests: 1,
                input: 1_000,
                output: 0
            }
        );
        assert_eq!(b.in_flight(Duration::ZERO), Usage::default());
        assert_eq!(b.earliest_fit(input(100), Duration::ZERO), Some(secs(6)));
    }

    const NOW_UNIX: Duration = Duration::from_secs(1_795_774_530); // 2026-11-27T10:15:30Z

    fn headers(pairs: &[(&str, &str)]) -> RateLimitReport {
        RateLimitReport::from_headers(pairs.iter().copied(), NOW_UNIX)
    }

    #[test]
    fn reads_a_real_looking_header_set() {
        let r = headers(&[
            ("Anthropic-RateLimit-Requests-Limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2026-11-27T10:15:31Z"),
            ("anthropic-ratelimit-input-tokens-limit", "30000"),
            ("anthropic-ratelimit-input-tokens-remaining", "27000"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2026-11-27T10:15:36.5Z",
            ),
            ("anthropic-ratelimit-output-tokens-limit", "8000"),
            ("anthropic-ratelimit-output-tokens-remaining", "7000"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2026-11-27T11:15:38+01:00",
            ),
            ("anthropic-ratelimit-tokens-limit", " 38000 "),
            ("anthropic-ratelimit-tokens-remaining", "34000"),
            (
                "anthropic-ratelimit-tokens-reset",
                "2026-11-27T05:15:37-05:00",
            ),
            ("request-id", "req_011"),
            ("content-type", "application/json"),
        ]);
        assert_eq!(
            r.requests,
            Some(BucketReport {
                limit: 50,
                remaining: 49,
                reset_in: secs(1)
            })
        );
        assert_eq!(
            r.input_tokens,
            Some(BucketReport {
                limit: 30_000,
                remaining: 27_000,
                reset_in: ms(6_500)
            })
        );
        assert_eq!(r.output_tokens.unwrap().reset_in, secs(8));
        assert_eq!(
            r.tokens,
            Some(BucketReport {
                limit: 38_000,
                remaining: 34_000,
                reset_in: secs(7)
            })
        );
        assert_eq!(r.retry_after, None);
    }

    #[test]
    fn retry_after_in_whole_or_fractional_seconds_garbage_ignored() {
        assert_eq!(
            headers(&[("Retry-After", "12")]).retry_after,
            Some(secs(12))
        );
        assert_eq!(
            headers(&[("retry-after", "1.25")]).retry_after,
            Some(ms(1_250))
        );
        assert_eq!(headers(&[("retry-after", ".5")]).retry_after, Some(ms(500)));
        for garbage in [
            "soon",
            "-3",
            "1e3",
            "",
            ".",
            "1.2.3",
            "+4",
            "Wed, 21 Oct 2015 07:28:00 GMT",
        ] {
            assert_eq!(
                headers(&[("retry-after", garbage)]).retry_after,
                None,
                "{garbage:?}"
            );
        }
        // Garbage after a good value does not erase it.
        let r = headers(&[("retry-after", "3"), ("retry-after", "x")]);
        assert_eq!(r.retry_after, Some(secs(3)));
    }

    #[test]
    fn a_dimension_needs_limit_remaining_and_reset() {
        let r = headers(&[
            ("anthropic-ratelimit-requests-limit", "abc"),
            ("anthropic-ratelimit-requests-remaining", "4"),
            ("anthropic-ratelimit-requests-reset", "2026-11-27T10:15:31Z"),
            ("anthropic-ratelimit-tokens-limit", "1000"),
            ("anthropic-ratelimit-tokens-remaining", "1000"),
            ("anthropic-ratelimit-tokens-reset", "2026-13-27T10:15:31Z"),
            ("anthropic-ratelimit-output-tokens-limit", "1000"),
            ("anthropic-ratelimit-output-tokens-remaining", "-1"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2026-11-27T10:15:31Z",
            ),
            ("anthropic-ratelimit-input-tokens-limit", "1000"),
            ("anthropic-ratelimit-input-tokens-remaining", "0"),
            // A reset already past is 0, not an error.
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2020-01-01T00:00:00Z",
            ),
        ]);
        assert_eq!((r.requests, r.tokens, r.output_tokens), (None, None, None));
        assert_eq!(r.input_tokens.unwrap().reset_in, Duration::ZERO);
    }

    #[test]
    fn rfc3339_by_hand() {
        let t = |s: &str| parse_rfc3339(s);
        assert_eq!(t("1970-01-01T00:00:00Z"), Some(Duration::ZERO));
        assert_eq!(t("2000-02-29T00:00:00Z"), Some(secs(951_782_400)));
        assert_eq!(t("2026-11-27T10:15:30Z"), Some(NOW_UNIX));
        assert_eq!(t("2026-11-27t10:15:30z"), Some(NOW_UNIX));
        assert_eq!(t("2026-11-27 10:15:30Z"), Some(NOW_UNIX));
        assert_eq!(t("2026-11-27T12:45:30+02:30"), Some(NOW_UNIX));
        assert_eq!(t("2026-11-27T00:15:30-10:00"), Some(NOW_UNIX));
        assert_eq!(
            t("2026-11-27T10:15:30.123456789123Z"),
            Some(NOW_UNIX + Duration::from_nanos(123_456_789))
        );
        assert_eq!(t("2026-12-31T23:59:59Z"), Some(secs(1_798_761_599)));
        for bad in [
            "2023-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "2026-11-27T10:15:30",
            "2026-11-27T10:15:30.Z",
            "2026-11-27T10:15:30+0100",
            "2026-11-27T10:15:30+01:00x",
            "2026-11-27T10:15:30Zx",
            "1969-12-31T23:59:59Z",
            "2026-1-27T10:15:30Z",
            "２026-11-27T10:15:30Z",
            "",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    /// A report whose reset says nothing (full now): only `remaining`
    /// bounds the level.
    fn report_tokens(limit: u64, remaining: u64) -> RateLimitReport {
        RateLimitReport {
            tokens: Some(BucketReport {
                limit,
                remaining,
                reset_in: Duration::ZERO,
            }),
            ..RateLimitReport::default()
        }
    }

    #[test]
    fn learn_lowers_limits_raises_back_to_the_ceiling_and_never_above() {
        let ceiling = Limits::split(50, 40_000, 8_000);
        let mut b = TokenBucket::new(P, ceiling);
        let a = b.reserve(input(1), Duration::ZERO).unwrap();
        let lower = RateLimitReport {
            requests: Some(BucketReport {
                limit: 40,
                remaining: 39,
                reset_in: secs(1),
            }),
            input_tokens: Some(BucketReport {
                limit: 30_000,
                remaining: 30_000,
                reset_in: secs(1),
            }),
            // No combined limit here: a header for it teaches nothing.
            tokens: Some(BucketReport {
                limit: 10,
                remaining: 10,
                reset_in: secs(1),
            }),
            ..RateLimitReport::default()
        };
        assert_eq!(b.learn(a, &lower, Duration::ZERO, ceiling, 1), None);
        assert_eq!(b.limits(), Limits::split(40, 30_000, 8_000));
        // Lowered capacity clamps the level too.
        assert!(!b.fits(input(30_001), Duration::ZERO));
        let higher = RateLimitReport {
            requests: Some(BucketReport {
                limit: 4_000,
                remaining: 3_999,
                reset_in: secs(1),
            }),
            input_tokens: Some(BucketReport {
                limit: 35_000,
                remaining: 35_000,
                reset_in: secs(1),
            }),
            ..RateLimitReport::default()
        };
        let b2 = b.reserve(input(1), Duration::ZERO).unwrap();
        b.learn(b2, &higher, Duration::ZERO, ceiling, 1);
        assert_eq!(
            b.limits(),
            Limits::split(50, 35_000, 8_000),
            "ceiling bounds it"
        );
    }

    /// Near empty, rounding to thousands says little (483 reads as 0); the
    /// reset, to the second, says how much is missing.
    #[test]
    fn the_reset_bounds_the_level_where_rounding_cannot() {
        let ceiling = Limits::split(1_000, 100_000, 1_000);
        let mut b = TokenBucket::new(P, ceiling);
        let a = b.reserve(output(400), Duration::ZERO).unwrap(); // remembered 600
                                                                 // Anthropic had 483 left: "0" (rounded), full again in 31 s
                                                                 // (517 missing at 1,000 a minute is 31.02 s: rounded up).
        let report = RateLimitReport {
            output_tokens: Some(BucketReport {
                limit: 1_000,
                remaining: 0,
                reset_in: secs(32),
            }),
            ..RateLimitReport::default()
        };
        b.learn(a, &report, Duration::ZERO, ceiling, 1);
        // At most 1,000 − 32 s × 1,000 / 60 s = 466.7 was left: 134 of
        // our 600 were not there.
        let used = b.usage(Duration::ZERO).output;
        assert!((533..=534).contains(&used), "{used}");
        // Rounding alone would have allowed up to 500: no correction.
        let mut b = TokenBucket::new(P, ceiling);
        let a = b.reserve(output(400), Duration::ZERO).unwrap();
        let mut rounded_only = report;
        rounded_only.output_tokens.as_mut().unwrap().reset_in = Duration::ZERO;
        rounded_only.output_tokens.as_mut().unwrap().remaining = 1_000;
        b.learn(a, &rounded_only, Duration::ZERO, ceiling, 1);
        assert_eq!(b.usage(Duration::ZERO).output, 400);
    }

    #[test]
    fn learn_divides_by_share() {
        let ceiling = Limits::new(100, 100_000);
        let mut b = TokenBucket::new(P, ceiling);
        let a = b.reserve(input(1_000), Duration::ZERO).unwrap();
        // Four replicas split 200,000: ours is 50,000.
        b.learn(
            a,
            &report_tokens(200_000, 196_000),
            Duration::ZERO,
            ceiling,
            4,
        );
        assert_eq!(b.limits().tokens, Some(50_000));
        // The level (99,000) is cut to the new capacity, and so is the one
        // remembered; at most (196,000 + 500) / 4 = 49,125 was left of our
        // slice: the other replicas spent 875 of ours.
        assert_eq!(b.usage(Duration::ZERO).tokens(), 875);
    }

    #[test]
    fn discrepancy_sync_with_requests_in_flight_debits_once() {
        let ceiling = Limits::new(100, 100_000);
        let mut b = TokenBucket::new(P, ceiling);
        let t = Duration::ZERO;
        let a = b.reserve(input(10_000), t).unwrap(); // remembered 90,000
        let c = b.reserve(input(10_000), t).unwrap(); // remembered 80,000
        let late = b.reserve(input(10_000), t).unwrap(); // remembered 70,000
                                                         // A's report: Anthropic had 90,000 too. That our level is 70,000
                                                         // now (two more in flight) is no discrepancy.
        b.learn(a, &report_tokens(100_000, 90_000), t, ceiling, 1);
        assert_eq!(b.usage(t).tokens(), 30_000);
        // C's: at least 2,500 less than we thought then (77,000 is at
        // most 77,500 before rounding); still true now.
        b.learn(c, &report_tokens(100_000, 77_000), t, ceiling, 1);
        assert_eq!(b.usage(t).tokens(), 32_500);
        // The late one shows the same gap: already corrected.
        b.learn(late, &report_tokens(100_000, 67_000), t, ceiling, 1);
        assert_eq!(b.usage(t).tokens(), 32_500);
        // Each report is used once.
        b.learn(c, &report_tokens(100_000, 0), t, ceiling, 1);
        assert_eq!(b.usage(t).tokens(), 32_500);
        // Higher than ours: stay conservative.
        let d = b.reserve(input(1_000), t).unwrap();
        b.learn(d, &report_tokens(100_000, 99_000), t, ceiling, 1);
        assert_eq!(b.usage(t).tokens(), 33_500);
    }

    #[test]
    fn discrepancy_within_rounding_is_ignored() {
        let ceiling = Limits::new(100, 100_000);
        let fresh = || {
            let mut b = TokenBucket::new(P, ceiling);
            let a = b.reserve(input(10_000), Duration::ZERO).unwrap();
            (b, a)
        };
        let (mut b, a) = fresh();
        b.learn(
            a,
            &report_tokens(100_000, 89_500),
            Duration::ZERO,
            ceiling,
            1,
        );
        assert_eq!(b.usage(Duration::ZERO).tokens(), 10_000);
        let (mut b, a) = fresh();
        b.learn(
            a,
            &report_tokens(100_000, 89_499),
            Duration::ZERO,
            ceiling,
            1,
        );
        assert_eq!(b.usage(Duration::ZERO).tokens(), 10_001);
        // With two replicas the rounding halves with the numbers: 89,750
        // each is within 250 of 90,000; 89,700 is not.
        let (mut b, a) = fresh();
        b.learn(
            a,
            &report_tokens(200_000, 179_500),
            Duration::ZERO,
            ceiling,
            2,
        );
        assert_eq!(b.usage(Duration::ZERO).tokens(), 10_000);
        let (mut b, a) = fresh();
        b.learn(
            a,
            &report_tokens(200_000, 179_400),
            Duration::ZERO,
            ceiling,
            2,
        );
        assert_eq!(b.usage(Duration::ZERO).tokens(), 10_050);
        // Requests are exact: one missing request is news.
        let (mut b, a) = fresh();
        let report = RateLimitReport {
            requests: Some(BucketReport {
                limit: 100,
                remaining: 98,
                reset_in: secs(1),
            }),
            ..RateLimitReport::default()
        };
        b.learn(a, &report, Duration::ZERO, ceiling, 1);
        assert_eq!(b.usage(Duration::ZERO).requests, 2);
    }

    #[test]
    fn learn_returns_the_retry_after_and_a_429_recalls_it() {
        let ceiling = Limits::new(10, 1_000);
        let mut b = TokenBucket::new(P, ceiling);
        let a = b.reserve(input(100), secs(5)).unwrap();
        let report = headers(&[("retry-after", "7")]);
        assert_eq!(b.learn(a, &report, secs(5), ceiling, 1), Some(secs(12)));
        assert_eq!(
            b.rate_limited(a, Exhausted::Requests, secs(5)),
            Some(secs(12))
        );
        assert_eq!(
            b.usage(secs(5)).requests,
            10,
            "the requests bucket is empty"
        );
    }

    // ---- Property tests -------------------------------------------------

    /// Anthropic's bucket as documented, written independently: a level per
    /// limited dimension that refills continuously and is capped; at
    /// admission it debits the real input and `max_tokens` of output; at
    /// the end it adjusts output to the real count. Levels × period nanos.
    struct Anthropic {
        period: i128,
        limits: [Option<i128>; 4],
        level: [i128; 4],
        at: Duration,
    }

    impl Anthropic {
        fn new(limits: Limits) -> Self {
            let period = P.as_nanos() as i128;
            let l = [
                Some(i128::from(limits.requests)),
                limits.tokens.map(i128::from),
                limits.input_tokens.map(i128::from),
                limits.output_tokens.map(i128::from),
            ];
            Self {
                period,
                limits: l,
                level: l.map(|x| x.unwrap_or(0) * period),
                at: Duration::ZERO,
            }
        }

        fn refill(&mut self, now: Duration) {
            let dt = (now - self.at).as_nanos() as i128;
            self.at = now;
            for (level, limit) in self.level.iter_mut().zip(self.limits) {
                if let Some(limit) = limit {
                    *level = (*level + dt * limit).min(limit * self.period);
                }
            }
        }

        /// Admits (requests, tokens, input, output): whether it had room.
        fn admit(&mut self, now: Duration, input: u64, output: u64) -> bool {
            self.refill(now);
            let take = [1, input + output, input, output].map(i128::from);
            let mut ok = true;
            for ((level, limit), take) in self.level.iter_mut().zip(self.limits).zip(take) {
                if limit.is_some() {
                    ok &= *level >= take * self.period;
                    *level -= take * self.period;
                }
            }
            ok
        }

        fn end(&mut self, now: Duration, unused_output: u64) {
            self.refill(now);
            for i in [1, 3] {
                if let Some(limit) = self.limits[i] {
                    self.level[i] = (self.level[i] + i128::from(unused_output) * self.period)
                        .min(limit * self.period);
                }
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Advance(u64),
        Reserve {
            input: u64,
            output: u64,
            input_pct: u64,
            output_pct: u64,
            cancel: bool,
        },
        End {
            pick: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..20_000).prop_map(Op::Advance),
            (
                0u64..4_000,
                0u64..4_000,
                0u64..=100,
                0u64..=100,
                proptest::bool::weighted(0.2)
            )
                .prop_map(|(input, output, input_pct, output_pct, cancel)| {
                    Op::Reserve {
                        input,
                        output,
                        input_pct,
                        output_pct,
                        cancel,
                    }
                }),
            any::<usize>().prop_map(|pick| Op::End { pick }),
        ]
    }

    fn limits() -> impl Strategy<Value = Limits> {
        (
            1u32..20,
            proptest::option::of(1_000u64..12_000),
            proptest::option::of(1_000u64..8_000),
            proptest::option::of(1_000u64..8_000),
        )
            .prop_map(|(requests, tokens, input_tokens, output_tokens)| Limits {
                requests,
                tokens,
                input_tokens,
                output_tokens,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the bucket admits, Anthropic's bucket has room for,
        /// though the bucket only ever learns the real input at settlement.
        #[test]
        fn never_admits_what_anthropic_would_refuse(
            ops in proptest::collection::vec(op(), 1..300),
            limits in limits(),
        ) {
            let mut ours = TokenBucket::new(P, limits);
            let mut theirs = Anthropic::new(limits);
            // (id, reserved, actual, cancel)
            let mut live: Vec<(EntryId, Charge, Charge, bool)> = Vec::new();
            let mut now = Duration::ZERO;
            for op in ops {
                match op {
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                    Op::Reserve { input, output, input_pct, output_pct, cancel } => {
                        let reserved = Charge { input, output };
                        let fits = ours.fits(reserved, now);
                        let earliest = ours.earliest_fit(reserved, now);
                        let Some(id) = ours.reserve(reserved, now) else {
                            prop_assert!(!fits);
                            if let Some(t) = earliest {
                                prop_assert!(t > now);
                                // Room comes then, and not a nanosecond sooner.
                                prop_assert!(!ours.clone().fits(reserved, t - NS));
                                prop_assert!(ours.clone().fits(reserved, t));
                            }
                            continue;
                        };
                        prop_assert!(fits);
                        prop_assert_eq!(earliest, Some(now));
                        let actual = Charge {
                            input: input * input_pct / 100,
                            output: output * output_pct / 100,
                        };
                        if !cancel {
                            prop_assert!(
                                theirs.admit(now, actual.input, reserved.output),
                                "Anthropic would refuse {:?} at {:?}", reserved, now
                            );
                        }
                        live.push((id, reserved, actual, cancel));
                    }
                    Op::End { pick } if !live.is_empty() => {
                        let (id, reserved, actual, cancel) = live.swap_remove(pick % live.len());
                        if cancel {
                            ours.cancel(id, now);
                        } else {
                            ours.settle(id, actual, now);
                            theirs.end(now, reserved.output - actual.output);
                        }
                    }
                    _ => {}
                }
                // Forgotten after ten periods, never before.
                let in_flight = ours.in_flight(now);
                prop_assert!(in_flight.requests as usize <= live.len());
            }
        }

        /// What a sliding window admits, the bucket admits too: within any
        /// period the window spent at most the capacity, and over a longer
        /// span the bucket has refilled more than the window allowed.
        #[test]
        fn a_window_admissible_sequence_is_bucket_admissible(
            asks in proptest::collection::vec((0u64..15_000, 0u64..3_000, 0u64..3_000), 1..300),
            limits in limits(),
        ) {
            let mut window = Ledger::new(P, limits);
            let mut bucket = TokenBucket::new(P, limits);
            let mut now = Duration::ZERO;
            for (advance, input, output) in asks {
                now += Duration::from_millis(advance);
                let charge = Charge { input, output };
                if window.reserve(charge, now).is_some() {
                    prop_assert!(bucket.reserve(charge, now).is_some(), "{:?} at {:?}", charge, now);
                }
            }
        }

        #[test]
        fn parsing_never_panics(
            pairs in proptest::collection::vec((".{0,40}", ".{0,40}"), 0..12),
            stamp in "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,12})?([Zz]|[+-][0-9]{2}:[0-9]{2})?.{0,2}",
            field in "(requests|tokens|input-tokens|output-tokens)-(limit|remaining|reset)",
            value in ".{0,30}",
            now in any::<u64>(),
        ) {
            let now = Duration::from_nanos(now);
            let _ = RateLimitReport::from_headers(pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())), now);
            let _ = parse_rfc3339(&stamp);
            let name = format!("anthropic-ratelimit-{field}");
            let r = RateLimitReport::from_headers(
                [(name.as_str(), value.as_str()), (name.as_str(), stamp.as_str()), ("retry-after", value.as_str())],
                now,
            );
            // And learning from whatever came out never panics either.
            let mut b = TokenBucket::new(P, Limits::new(10, 10_000));
            let id = b.reserve(input(10), Duration::ZERO).unwrap();
            let _ = b.learn(id, &r, Duration::ZERO, Limits::new(10, 10_000), 3);
        }
    }
}
