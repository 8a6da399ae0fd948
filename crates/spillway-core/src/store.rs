//! Where budgets live: the [`QuotaStore`] interface and the in-memory store.
//!
//! Admission is one atomic step per request: among the candidate regions
//! for a model, skip the drained and the cooling down, pick one by the
//! routing [`Strategy`], and reserve the request's charge there — or say
//! when the earliest candidate will have room. Doing choice and reservation
//! together is what lets a shared store (Redis, one Lua script, one round
//! trip) replace this one without changing routing or scheduling: callers
//! see only this trait.
//!
//! Methods return boxed futures so a networked store fits the same trait;
//! the in-memory store answers immediately. Time comes from a [`Clock`] the
//! store owns (a networked store uses its server's clock instead).
//!
//! ## Requesters and buckets
//!
//! A request is asked under its **requester** key (a model's own,
//! [`ReserveRequest::group`]) and a list of locations. Each (requester,
//! location) points at a budget identified by its **bucket**, (bucket
//! group, location) ([`BudgetConfig::bucket`]): on Vertex's `global` and
//! multi-region endpoints the models of one lineage point at one bucket,
//! on regional ones each model at its own (`catalog` decides). So one
//! budget may serve several requesters, and one request's candidates may
//! be in buckets of different groups. Grants and settlement name the
//! requester; state, runtime limits and drains name buckets.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::adaptive::{Adaptive, AdaptiveConfig, Exhausted};
use crate::bucket::{RateLimitReport, TokenBucket};
use crate::keys::QuotaGroup;
use crate::ledger::{Charge, EntryId, Ledger, Limits, Usage};

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Monotonic time since an arbitrary epoch.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Duration;
}

/// How to choose among regions that have room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// The region with the most headroom left after this request.
    #[default]
    MostHeadroom,
    /// The first region in configured order that has room (a primary
    /// region, spilling only when it is full).
    Ordered,
}

/// One admission question.
#[derive(Debug, Clone, Copy)]
pub struct ReserveRequest<'a> {
    /// The requester asking (a model's own key, `ModelSpec::requester`):
    /// its (requester, location) entries say which bucket each candidate
    /// location draws on.
    pub group: &'a QuotaGroup,
    /// Eligible regions, in configured preference order.
    pub regions: &'a [Arc<str>],
    pub charge: Charge,
    pub strategy: Strategy,
}

/// A budget's state as a request saw it (for rate-limit headers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetView {
    pub limits: Limits,
    /// Usage including this reservation.
    pub usage: Usage,
    /// When the window will be empty, on the store's clock.
    pub empty_at: Duration,
    pub now: Duration,
}

/// A reservation to settle when the request ends.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The requester it was granted to (settling finds the bucket from it
    /// and `region`).
    pub group: QuotaGroup,
    pub region: Arc<str>,
    pub entry: EntryId,
    pub charge: Charge,
    pub view: BudgetView,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Denial {
    /// No candidate has room now; the earliest one will at `retry_at`.
    Later { retry_at: Duration },
    /// No candidate can ever fit this charge.
    Never,
}

/// How a granted request ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Upstream served it; this is what it used.
    Used(Charge),
    /// Upstream answered 429 although the ledger had room.
    RateLimited(Exhausted),
    /// Upstream was overloaded or unreachable after the request was sent.
    Unavailable,
    /// Upstream served part of it (a stream) and then failed: overloaded
    /// mid-way, reset, or stopped sending. It is charged what it used, and
    /// the location cools down as for [`Outcome::Unavailable`].
    Broken(Charge),
    /// The request was never sent (client gone, or failed before sending).
    NotSent,
}

/// The live state of one budget, reported once per bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetState {
    /// The bucket group: with `region`, the budget's key.
    pub group: QuotaGroup,
    pub region: Arc<str>,
    pub configured: Limits,
    /// What admission uses now (headroom and learning applied).
    pub effective: Limits,
    pub usage: Usage,
    /// The part of `usage` reserved by requests still in flight.
    pub in_flight: Usage,
    pub cooldown_remaining: Duration,
    pub drained: bool,
}

pub trait QuotaStore: Send + Sync + 'static {
    /// Now on the store's clock. Callers turn a store time `t` into a delay
    /// as `t - now()`, so a store may count from any epoch (the in-memory
    /// one from start, a shared one from its server's Unix time).
    fn now(&self) -> Duration;
    /// How often a waiter should ask again even if nothing local changed: a
    /// shared store's budgets are also freed by other replicas' refunds,
    /// which wake no local waiter. `None`: local events say it all.
    fn recheck_after(&self) -> Option<Duration> {
        None
    }
    fn reserve<'a>(&'a self, request: ReserveRequest<'a>)
        -> StoreFuture<'a, Result<Grant, Denial>>;
    /// Would `request` fit now, and if not, when? Reserves nothing.
    fn probe<'a>(&'a self, request: ReserveRequest<'a>) -> StoreFuture<'a, Result<(), Denial>>;
    fn settle<'a>(&'a self, grant: &'a Grant, outcome: Outcome) -> StoreFuture<'a, ()>;
    fn states(&self) -> StoreFuture<'_, Vec<BudgetState>>;
    /// Sets the configured limits of the bucket (`group`, `region`) — a
    /// bucket group, as [`BudgetState::group`] names it — at run time;
    /// false if unknown.
    fn set_configured<'a>(
        &'a self,
        group: &'a QuotaGroup,
        region: &'a str,
        limits: Limits,
    ) -> StoreFuture<'a, bool>;
    /// Takes a region out of (or back into) rotation for every model.
    fn set_drained<'a>(&'a self, region: &'a str, drained: bool) -> StoreFuture<'a, usize>;
    /// How many replicas share these budgets (the pool a replica's tenant
    /// shares divide is 1/N of it); 1 for a store of one's own.
    fn replicas(&self) -> u32 {
        1
    }
    /// What upstream's rate-limit headers said in answer to `grant`: call
    /// it when they arrive, before [`QuotaStore::settle`]. A no-op for a
    /// store that cannot use them (Vertex sends none; its budgets are
    /// windows).
    fn learn<'a>(&'a self, grant: &'a Grant, report: &'a RateLimitReport) -> StoreFuture<'a, ()> {
        let _ = (grant, report);
        Box::pin(std::future::ready(()))
    }
}

/// What a meter makes of an upstream 429 for one of its reservations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateLimitLesson {
    /// A window's usage without the refused request: upstream's real limit
    /// is about this much ([`Adaptive::on_rate_limited`] learns it).
    Window(Usage),
    /// Nothing to learn about limits (the headers teach those); keep the
    /// location closed until this store time, or for the usual cooldown
    /// when `None`.
    Hold(Option<Duration>),
}

/// How a budget counts: a sliding window ([`Ledger`], Vertex) or token
/// buckets ([`TokenBucket`], Anthropic). The store does everything else
/// (choice, locks, cooldowns, drains) the same way for both.
pub trait Meter: std::fmt::Debug + Send + 'static {
    fn limits(&self) -> Limits;
    fn set_limits(&mut self, limits: Limits, now: Duration);
    fn reserve(&mut self, charge: Charge, now: Duration) -> Option<EntryId>;
    fn settle(&mut self, id: EntryId, actual: Charge, now: Duration);
    /// The request was never sent.
    fn cancel(&mut self, id: EntryId, now: Duration);
    /// Upstream answered 429 naming `which`.
    fn rate_limited(&mut self, id: EntryId, which: Exhausted, now: Duration) -> RateLimitLesson;
    /// Usage admitted elsewhere, stamped `at`.
    fn import(&mut self, at: Duration, usage: Usage, now: Duration);
    fn earliest_fit(&mut self, charge: Charge, now: Duration) -> Option<Duration>;
    /// When the meter holds nothing again: the window empty, the buckets
    /// full ([`BudgetView::empty_at`]).
    fn empty_at(&mut self, now: Duration) -> Duration;
    fn headroom_after(&mut self, charge: Charge, now: Duration) -> Option<f64>;
    fn usage(&mut self, now: Duration) -> Usage;
    fn in_flight(&mut self, now: Duration) -> Usage;
    /// Applies a response's rate-limit report for reservation `id`, with
    /// `ceiling` the most the limits may be and `share` the replicas
    /// splitting upstream's bucket. Returns a store time to stay closed
    /// until (`retry-after`). The window meter learns nothing from it.
    fn learn(
        &mut self,
        id: EntryId,
        report: &RateLimitReport,
        now: Duration,
        ceiling: Limits,
        share: u32,
    ) -> Option<Duration> {
        let _ = (id, report, now, ceiling, share);
        None
    }
}

impl Meter for Ledger {
    fn limits(&self) -> Limits {
        Ledger::limits(self)
    }
    fn set_limits(&mut self, limits: Limits, _now: Duration) {
        Ledger::set_limits(self, limits);
    }
    fn reserve(&mut self, charge: Charge, now: Duration) -> Option<EntryId> {
        Ledger::reserve(self, charge, now)
    }
    fn settle(&mut self, id: EntryId, actual: Charge, _now: Duration) {
        Ledger::settle(self, id, actual);
    }
    fn cancel(&mut self, id: EntryId, _now: Duration) {
        Ledger::cancel(self, id);
    }
    fn rate_limited(&mut self, id: EntryId, _which: Exhausted, now: Duration) -> RateLimitLesson {
        // Upstream counted the request but spent no tokens on it.
        Ledger::settle(self, id, Charge::default());
        let mut observed = Ledger::usage(self, now);
        observed.requests = observed.requests.saturating_sub(1);
        RateLimitLesson::Window(observed)
    }
    fn import(&mut self, at: Duration, usage: Usage, _now: Duration) {
        Ledger::import(self, at, usage);
    }
    fn earliest_fit(&mut self, charge: Charge, now: Duration) -> Option<Duration> {
        Ledger::earliest_fit(self, charge, now)
    }
    fn empty_at(&mut self, now: Duration) -> Duration {
        Ledger::empty_at(self, now)
    }
    fn headroom_after(&mut self, charge: Charge, now: Duration) -> Option<f64> {
        Ledger::headroom_after(self, charge, now)
    }
    fn usage(&mut self, now: Duration) -> Usage {
        Ledger::usage(self, now)
    }
    fn in_flight(&mut self, now: Duration) -> Usage {
        Ledger::in_flight(self, now)
    }
}

impl Meter for TokenBucket {
    fn limits(&self) -> Limits {
        TokenBucket::limits(self)
    }
    fn set_limits(&mut self, limits: Limits, now: Duration) {
        TokenBucket::set_limits(self, limits, now);
    }
    fn reserve(&mut self, charge: Charge, now: Duration) -> Option<EntryId> {
        TokenBucket::reserve(self, charge, now)
    }
    fn settle(&mut self, id: EntryId, actual: Charge, now: Duration) {
        TokenBucket::settle(self, id, actual, now);
    }
    fn cancel(&mut self, id: EntryId, now: Duration) {
        TokenBucket::cancel(self, id, now);
    }
    fn rate_limited(&mut self, id: EntryId, which: Exhausted, now: Duration) -> RateLimitLesson {
        RateLimitLesson::Hold(TokenBucket::rate_limited(self, id, which, now))
    }
    fn import(&mut self, _at: Duration, usage: Usage, now: Duration) {
        TokenBucket::import(self, usage, now);
    }
    fn earliest_fit(&mut self, charge: Charge, now: Duration) -> Option<Duration> {
        TokenBucket::earliest_fit(self, charge, now)
    }
    fn empty_at(&mut self, now: Duration) -> Duration {
        TokenBucket::full_at(self, now)
    }
    fn headroom_after(&mut self, charge: Charge, now: Duration) -> Option<f64> {
        TokenBucket::headroom_after(self, charge, now)
    }
    fn usage(&mut self, now: Duration) -> Usage {
        TokenBucket::usage(self, now)
    }
    fn in_flight(&mut self, now: Duration) -> Usage {
        TokenBucket::in_flight(self, now)
    }
    fn learn(
        &mut self,
        id: EntryId,
        report: &RateLimitReport,
        now: Duration,
        ceiling: Limits,
        share: u32,
    ) -> Option<Duration> {
        TokenBucket::learn(self, id, report, now, ceiling, share)
    }
}

/// One region-model budget in memory.
#[derive(Debug)]
struct Budget<M> {
    meter: M,
    adaptive: Adaptive,
    drained: bool,
}

impl<M: Meter> Budget<M> {
    fn sync_limits(&mut self, now: Duration) {
        self.meter.set_limits(self.adaptive.limits(), now);
    }
}

/// One bucket's budget, shared by every requester pointing at it.
#[derive(Debug)]
struct SharedBudget<M> {
    /// The bucket group; with `region`, the budget's key.
    bucket: QuotaGroup,
    region: Arc<str>,
    budget: Mutex<Budget<M>>,
}

/// A requester's locations in configured order, each with the index of the
/// budget it draws on.
type Locations = Vec<(Arc<str>, usize)>;

/// The in-memory store: exact for one replica. `M` is how its budgets
/// count: sliding windows ([`MemoryStore::new`]) or token buckets
/// ([`MemoryStore::buckets`]).
pub struct MemoryStore<C: Clock, M: Meter = Ledger> {
    clock: C,
    /// Every bucket's budget once, sorted by (bucket group, location). A
    /// budget's index here is its place in the one global lock order.
    budgets: Vec<SharedBudget<M>>,
    /// requester → its locations, in configured order. Built once; only the
    /// budgets' contents change, under their own locks.
    requesters: HashMap<QuotaGroup, Locations>,
    jitter_state: AtomicU64,
    /// Replicas splitting upstream's real buckets (report limits and
    /// levels are divided by it); 1 unless [`MemoryStore::with_share`] or
    /// [`MemoryStore::set_share`] said otherwise.
    share: AtomicU32,
}

/// One (requester, location) for [`MemoryStore::new`]: which bucket it
/// draws on, and that bucket's limits.
#[derive(Debug, Clone)]
pub struct BudgetConfig {
    /// The requester (a model's key, `ModelSpec::requester`).
    pub group: QuotaGroup,
    /// The bucket group: (`bucket`, `region`) is the budget's key. Configs
    /// naming one bucket share one budget (the first one's limits count;
    /// the catalog makes them agree).
    pub bucket: QuotaGroup,
    pub region: String,
    pub limits: Limits,
}

fn lock<M>(budget: &Mutex<Budget<M>>) -> MutexGuard<'_, Budget<M>> {
    // A panic while holding the lock left consistent-enough state; keep serving.
    budget
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<C: Clock> MemoryStore<C, Ledger> {
    /// Budgets as sliding windows of length `window` (Vertex).
    pub fn new(
        clock: C,
        window: Duration,
        adaptive: AdaptiveConfig,
        budgets: &[BudgetConfig],
    ) -> Self {
        Self::with_meters(clock, adaptive, budgets, |limits| {
            Ledger::new(window, limits)
        })
    }
}

impl<C: Clock> MemoryStore<C, TokenBucket> {
    /// Budgets as token buckets refilling their limits every `period`
    /// (Anthropic's first-party API: 60 s). Each starts full.
    pub fn buckets(
        clock: C,
        period: Duration,
        adaptive: AdaptiveConfig,
        budgets: &[BudgetConfig],
    ) -> Self {
        Self::with_meters(clock, adaptive, budgets, |limits| {
            TokenBucket::new(period, limits)
        })
    }

    /// This replica's budgets are one of `share` (≥ 1) equal slices of
    /// upstream's real buckets: reports are divided by it before learning.
    pub fn with_share(self, share: u32) -> Self {
        self.set_share(share);
        self
    }

    /// Changes the number of slices (replicas came or went). The limits
    /// are the caller's to re-divide ([`QuotaStore::set_configured`]).
    pub fn set_share(&self, share: u32) {
        self.share.store(share.max(1), Ordering::Relaxed);
    }

    /// The number of slices upstream's buckets are split into.
    pub fn share(&self) -> u32 {
        self.share.load(Ordering::Relaxed)
    }
}

impl<C: Clock, M: Meter> MemoryStore<C, M> {
    fn with_meters(
        clock: C,
        adaptive: AdaptiveConfig,
        budgets: &[BudgetConfig],
        meter: impl Fn(Limits) -> M,
    ) -> Self {
        let mut keys: Vec<(&QuotaGroup, &str, Limits)> = Vec::new();
        for b in budgets {
            if !keys
                .iter()
                .any(|(g, r, _)| **g == b.bucket && *r == b.region)
            {
                keys.push((&b.bucket, &b.region, b.limits));
            }
        }
        keys.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let shared: Vec<SharedBudget<M>> = keys
            .iter()
            .map(|&(bucket, region, limits)| {
                let adaptive = Adaptive::new(limits, adaptive);
                SharedBudget {
                    bucket: bucket.clone(),
                    region: Arc::from(region),
                    budget: Mutex::new(Budget {
                        meter: meter(adaptive.limits()),
                        adaptive,
                        drained: false,
                    }),
                }
            })
            .collect();
        let mut requesters: HashMap<QuotaGroup, Locations> = HashMap::new();
        for b in budgets {
            let index = keys
                .iter()
                .position(|(g, r, _)| **g == b.bucket && *r == b.region)
                .expect("every bucket was collected above");
            let locations = requesters.entry(b.group.clone()).or_default();
            if !locations.iter().any(|(r, _)| **r == *b.region) {
                locations.push((Arc::clone(&shared[index].region), index));
            }
        }
        Self {
            clock,
            budgets: shared,
            requesters,
            jitter_state: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
            share: AtomicU32::new(1),
        }
    }

    /// A number in [0, 1) for cooldown jitter (xorshift; quality is not critical).
    fn jitter(&self) -> f64 {
        let mut x = self.jitter_state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter_state.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The budget (requester, region) draws on.
    fn budget_of(&self, requester: &str, region: &str) -> Option<&Mutex<Budget<M>>> {
        let (_, index) = self
            .requesters
            .get(requester)?
            .iter()
            .find(|(r, _)| &**r == region)?;
        Some(&self.budgets[*index].budget)
    }

    /// The bucket group (requester, region) draws on, if configured.
    pub fn bucket_of(&self, requester: &str, region: &str) -> Option<&QuotaGroup> {
        let (_, index) = self
            .requesters
            .get(requester)?
            .iter()
            .find(|(r, _)| &**r == region)?;
        Some(&self.budgets[*index].bucket)
    }

    /// The budget of the bucket (bucket group, region).
    fn bucket(&self, bucket: &str, region: &str) -> Option<&Mutex<Budget<M>>> {
        self.budgets
            .iter()
            .find(|b| b.bucket.as_str() == bucket && &*b.region == region)
            .map(|b| &b.budget)
    }

    /// Locks the budgets of `candidates` (a requester's locations) in the
    /// one global order — by budget index, whatever order the requester
    /// lists them in — so two requesters sharing budgets never deadlock;
    /// returns the guards in the candidates' order.
    fn lock_in_order<'s>(
        &'s self,
        candidates: &[&'s (Arc<str>, usize)],
    ) -> Vec<(&'s Arc<str>, MutexGuard<'s, Budget<M>>)> {
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.sort_by_key(|&k| candidates[k].1);
        let mut guards: Vec<Option<MutexGuard<'s, Budget<M>>>> =
            candidates.iter().map(|_| None).collect();
        for k in order {
            guards[k] = Some(lock(&self.budgets[candidates[k].1].budget));
        }
        candidates
            .iter()
            .zip(guards)
            .map(|((region, _), guard)| (region, guard.expect("every candidate is locked")))
            .collect()
    }

    /// The synchronous heart of [`QuotaStore::reserve`].
    pub fn reserve_now(&self, request: ReserveRequest<'_>) -> Result<Grant, Denial> {
        self.decide(request, true)
            .map(|g| g.expect("reserving yields a grant"))
    }

    /// The synchronous heart of [`QuotaStore::probe`].
    pub fn probe_now(&self, request: ReserveRequest<'_>) -> Result<(), Denial> {
        self.decide(request, false).map(|_| ())
    }

    fn decide(&self, request: ReserveRequest<'_>, reserve: bool) -> Result<Option<Grant>, Denial> {
        let now = self.clock.now();
        let Some(locations) = self.requesters.get(request.group) else {
            return Err(Denial::Never);
        };
        // Lock every candidate so choice and reservation are one step; in
        // the global order, as budgets are shared between requesters.
        let eligible: Vec<&(Arc<str>, usize)> = locations
            .iter()
            .filter(|(region, _)| request.regions.iter().any(|r| r == region))
            .collect();
        let mut candidates = self.lock_in_order(&eligible);
        let mut best: Option<(usize, f64)> = None;
        for (i, (_, budget)) in candidates.iter_mut().enumerate() {
            if budget.drained || budget.adaptive.in_cooldown(now) {
                continue;
            }
            if let Some(headroom) = budget.meter.headroom_after(request.charge, now) {
                let better = best.is_none_or(|(_, h)| headroom > h);
                if better {
                    best = Some((i, headroom));
                }
                if request.strategy == Strategy::Ordered {
                    break;
                }
            }
        }
        if let Some((i, _)) = best {
            if !reserve {
                return Ok(None);
            }
            let (region, budget) = &mut candidates[i];
            let entry = budget
                .meter
                .reserve(request.charge, now)
                .expect("headroom_after said it fits");
            let view = BudgetView {
                limits: budget.meter.limits(),
                usage: budget.meter.usage(now),
                empty_at: budget.meter.empty_at(now),
                now,
            };
            return Ok(Some(Grant {
                group: request.group.clone(),
                region: Arc::clone(region),
                entry,
                charge: request.charge,
                view,
            }));
        }
        let mut retry_at: Option<Duration> = None;
        for (_, budget) in candidates.iter_mut() {
            if budget.drained {
                continue;
            }
            let when = match budget.meter.earliest_fit(request.charge, now) {
                Some(t) => Some(t.max(budget.adaptive.cooldown_until())),
                // Too big for the learned limit but not for the ceiling:
                // learning will raise the limit again within a probe period.
                None if budget.adaptive.configured().admits(request.charge) => {
                    Some(now + Duration::from_secs(60))
                }
                None => None,
            };
            if let Some(t) = when {
                retry_at = Some(retry_at.map_or(t, |r| r.min(t)));
            }
        }
        match retry_at {
            Some(retry_at) => Err(Denial::Later { retry_at }),
            None => Err(Denial::Never),
        }
    }

    /// The synchronous heart of [`QuotaStore::settle`].
    pub fn settle_now(&self, grant: &Grant, outcome: Outcome) {
        let Some(budget) = self.budget_of(grant.group.as_str(), &grant.region) else {
            return;
        };
        let now = self.clock.now();
        let jitter = self.jitter();
        let mut budget = lock(budget);
        match outcome {
            Outcome::Used(actual) => {
                budget.meter.settle(grant.entry, actual, now);
                if budget.adaptive.on_success(now) {
                    budget.sync_limits(now);
                }
            }
            Outcome::RateLimited(which) => {
                match budget.meter.rate_limited(grant.entry, which, now) {
                    RateLimitLesson::Window(observed) => {
                        budget
                            .adaptive
                            .on_rate_limited(now, observed, which, jitter);
                        budget.sync_limits(now);
                    }
                    // Upstream said when: exactly that long.
                    RateLimitLesson::Hold(Some(until)) => budget.adaptive.hold_until(until),
                    RateLimitLesson::Hold(None) => budget.adaptive.on_unavailable(now, jitter),
                }
            }
            Outcome::Unavailable => {
                budget.meter.settle(grant.entry, Charge::default(), now);
                budget.adaptive.on_unavailable(now, jitter);
            }
            Outcome::Broken(used) => {
                budget.meter.settle(grant.entry, used, now);
                budget.adaptive.on_unavailable(now, jitter);
            }
            Outcome::NotSent => budget.meter.cancel(grant.entry, now),
        }
    }

    /// The synchronous heart of [`QuotaStore::learn`]: applies `report`
    /// (upstream's rate-limit headers in answer to `grant`) to the grant's
    /// budget, with its ceiling (configured limits, headroom applied) as
    /// the most learning may set, and keeps the location closed until
    /// `retry-after` when the report carries one. Call it when the headers
    /// arrive, before [`MemoryStore::settle_now`]. A window budget learns
    /// nothing from it.
    pub fn learn_now(&self, grant: &Grant, report: &RateLimitReport) {
        let Some(budget) = self.budget_of(grant.group.as_str(), &grant.region) else {
            return;
        };
        let now = self.clock.now();
        let mut budget = lock(budget);
        let ceiling = budget.adaptive.ceiling();
        if let Some(until) = budget.meter.learn(
            grant.entry,
            report,
            now,
            ceiling,
            self.share.load(Ordering::Relaxed),
        ) {
            budget.adaptive.hold_until(until);
        }
    }

    /// Adds usage admitted elsewhere to the bucket (`bucket`, `region`)
    /// as one settled entry stamped `at` ([`Ledger::import`]): how a
    /// fallback store starts from what the shared one had counted. False
    /// if the bucket is unknown.
    pub fn import_now(&self, bucket: &str, region: &str, at: Duration, usage: Usage) -> bool {
        let Some(budget) = self.bucket(bucket, region) else {
            return false;
        };
        let now = self.clock.now();
        lock(budget).meter.import(at, usage, now);
        true
    }

    pub fn states_now(&self) -> Vec<BudgetState> {
        let now = self.clock.now();
        // Sorted by (bucket group, location) already: each bucket once.
        self.budgets
            .iter()
            .map(|shared| {
                let mut b = lock(&shared.budget);
                BudgetState {
                    group: shared.bucket.clone(),
                    region: Arc::clone(&shared.region),
                    configured: b.adaptive.configured(),
                    effective: b.meter.limits(),
                    usage: b.meter.usage(now),
                    in_flight: b.meter.in_flight(now),
                    cooldown_remaining: b.adaptive.cooldown_until().saturating_sub(now),
                    drained: b.drained,
                }
            })
            .collect()
    }
}

impl<C: Clock, M: Meter> QuotaStore for MemoryStore<C, M> {
    fn now(&self) -> Duration {
        self.clock.now()
    }

    fn reserve<'a>(
        &'a self,
        request: ReserveRequest<'a>,
    ) -> StoreFuture<'a, Result<Grant, Denial>> {
        let result = self.reserve_now(request);
        Box::pin(std::future::ready(result))
    }

    fn probe<'a>(&'a self, request: ReserveRequest<'a>) -> StoreFuture<'a, Result<(), Denial>> {
        Box::pin(std::future::ready(self.probe_now(request)))
    }

    fn settle<'a>(&'a self, grant: &'a Grant, outcome: Outcome) -> StoreFuture<'a, ()> {
        self.settle_now(grant, outcome);
        Box::pin(std::future::ready(()))
    }

    fn states(&self) -> StoreFuture<'_, Vec<BudgetState>> {
        Box::pin(std::future::ready(self.states_now()))
    }

    fn set_configured<'a>(
        &'a self,
        group: &'a QuotaGroup,
        region: &'a str,
        limits: Limits,
    ) -> StoreFuture<'a, bool> {
        let now = self.clock.now();
        let found = self.bucket(group.as_str(), region).map(|b| {
            let mut b = lock(b);
            b.adaptive.set_configured(limits);
            b.sync_limits(now);
        });
        Box::pin(std::future::ready(found.is_some()))
    }

    fn set_drained<'a>(&'a self, region: &'a str, drained: bool) -> StoreFuture<'a, usize> {
        let mut count = 0;
        for shared in self.budgets.iter().filter(|b| &*b.region == region) {
            lock(&shared.budget).drained = drained;
            count += 1;
        }
        Box::pin(std::future::ready(count))
    }

    fn learn<'a>(&'a self, grant: &'a Grant, report: &'a RateLimitReport) -> StoreFuture<'a, ()> {
        self.learn_now(grant, report);
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[derive(Clone, Default)]
    struct TestClock(Arc<AtomicU64>);
    impl Clock for TestClock {
        fn now(&self) -> Duration {
            Duration::from_millis(self.0.load(Ordering::Relaxed))
        }
    }
    impl TestClock {
        fn advance(&self, ms: u64) {
            self.0.fetch_add(ms, Ordering::Relaxed);
        }
    }

    const HAIKU: &str = "claude-3-haiku@20240307";

    fn store(clock: TestClock) -> MemoryStore<TestClock> {
        let budgets = ["us-central1", "europe-west4"].map(|region| BudgetConfig {
            group: HAIKU.into(),
            bucket: HAIKU.into(),
            region: region.into(),
            limits: Limits::new(60, 50_000),
        });
        MemoryStore::new(
            clock,
            Duration::from_secs(60),
            AdaptiveConfig::default(),
            &budgets,
        )
    }

    fn regions() -> Vec<Arc<str>> {
        vec![Arc::from("us-central1"), Arc::from("europe-west4")]
    }

    static HAIKU_GROUP: std::sync::LazyLock<QuotaGroup> =
        std::sync::LazyLock::new(|| QuotaGroup::from(HAIKU));

    fn ask<'a>(regions: &'a [Arc<str>], tokens: u64, strategy: Strategy) -> ReserveRequest<'a> {
        ReserveRequest {
            group: &HAIKU_GROUP,
            regions,
            charge: Charge {
                input: tokens,
                output: 0,
            },
            strategy,
        }
    }

    #[test]
    fn most_headroom_spreads_and_ordered_fills_the_primary_first() {
        let s = store(TestClock::default());
        let r = regions();
        let mut by_region = HashMap::new();
        for _ in 0..120 {
            let g = s.reserve_now(ask(&r, 10, Strategy::MostHeadroom)).unwrap();
            *by_region.entry(g.region.to_string()).or_insert(0) += 1;
        }
        assert_eq!(by_region["us-central1"], 60);
        assert_eq!(by_region["europe-west4"], 60);
        assert!(matches!(
            s.reserve_now(ask(&r, 10, Strategy::MostHeadroom)),
            Err(Denial::Later { .. })
        ));

        let s = store(TestClock::default());
        assert_eq!(s.probe_now(ask(&r, 10, Strategy::Ordered)), Ok(()));
        for i in 0..61 {
            let g = s.reserve_now(ask(&r, 10, Strategy::Ordered)).unwrap();
            let expected = if i < 60 {
                "us-central1"
            } else {
                "europe-west4"
            };
            assert_eq!(&*g.region, expected);
        }
    }

    #[test]
    fn token_spillover_and_never_fitting_requests() {
        let s = store(TestClock::default());
        let r = regions();
        // ~170,000 characters ≈ 48,572 tokens: one per region per window.
        let g1 = s
            .reserve_now(ask(&r, 48_600, Strategy::MostHeadroom))
            .unwrap();
        let g2 = s
            .reserve_now(ask(&r, 48_600, Strategy::MostHeadroom))
            .unwrap();
        assert_ne!(g1.region, g2.region);
        match s.reserve_now(ask(&r, 48_600, Strategy::MostHeadroom)) {
            Err(Denial::Later { retry_at }) => assert!(retry_at > Duration::from_secs(60)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.reserve_now(ask(&r, 50_001, Strategy::MostHeadroom))
                .unwrap_err(),
            Denial::Never
        );
    }

    #[test]
    fn settling_refunds_and_not_sent_cancels() {
        let clock = TestClock::default();
        let s = store(clock.clone());
        let only: Vec<Arc<str>> = vec![Arc::from("us-central1")];
        let g = s
            .reserve_now(ask(&only, 40_000, Strategy::Ordered))
            .unwrap();
        assert!(s
            .reserve_now(ask(&only, 20_000, Strategy::Ordered))
            .is_err());
        s.settle_now(
            &g,
            Outcome::Used(Charge {
                input: 5_000,
                output: 100,
            }),
        );
        let g2 = s
            .reserve_now(ask(&only, 20_000, Strategy::Ordered))
            .unwrap();
        s.settle_now(&g2, Outcome::NotSent);
        let state = &s.states_now()[1];
        assert_eq!(&*state.region, "us-central1");
        assert_eq!(
            state.usage,
            Usage {
                requests: 1,
                input: 5_000,
                output: 100
            }
        );
    }

    #[test]
    fn a_429_cools_the_region_down_and_traffic_spills() {
        let clock = TestClock::default();
        let s = store(clock.clone());
        let r = regions();
        let g = s.reserve_now(ask(&r, 10, Strategy::Ordered)).unwrap();
        assert_eq!(&*g.region, "us-central1");
        s.settle_now(&g, Outcome::RateLimited(Exhausted::Requests));
        let g = s.reserve_now(ask(&r, 10, Strategy::Ordered)).unwrap();
        assert_eq!(&*g.region, "europe-west4", "us-central1 is cooling down");
        clock.advance(2_000);
        let g = s.reserve_now(ask(&r, 10, Strategy::Ordered)).unwrap();
        assert_eq!(&*g.region, "us-central1");
    }

    #[test]
    fn drained_regions_take_nothing_and_runtime_quota_changes_apply() {
        let s = store(TestClock::default());
        let r = regions();
        assert_eq!(futures_ready(s.set_drained("us-central1", true)), 1);
        for _ in 0..5 {
            assert_eq!(
                &*s.reserve_now(ask(&r, 10, Strategy::Ordered))
                    .unwrap()
                    .region,
                "europe-west4"
            );
        }
        assert!(futures_ready(s.set_configured(
            &HAIKU_GROUP,
            "europe-west4",
            Limits::new(5, 50_000)
        )));
        assert!(s.reserve_now(ask(&r, 10, Strategy::Ordered)).is_err());
        assert!(!futures_ready(s.set_configured(
            &HAIKU_GROUP,
            "nowhere",
            Limits::new(5, 5)
        )));
    }

    /// Polls a future the in-memory store returns (always ready).
    fn futures_ready<T>(f: StoreFuture<'_, T>) -> T {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = f;
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("the memory store never waits"),
        }
    }

    const S45: &str = "claude-sonnet-4-5@20250929";
    const S46: &str = "claude-sonnet-4-6@20260101";
    const LINEAGE: &str = "anthropic-claude-sonnet";

    /// Two Sonnet versions of one lineage: `global` shared (2 requests a
    /// window), a region each (1 request), and S46 also in S45's region.
    fn lineage_store(clock: TestClock) -> MemoryStore<TestClock> {
        let config = |group: &str, bucket: &str, region: &str, requests: u32| BudgetConfig {
            group: group.into(),
            bucket: bucket.into(),
            region: region.into(),
            limits: Limits::new(requests, 1_000_000),
        };
        MemoryStore::new(
            clock,
            Duration::from_secs(60),
            AdaptiveConfig::default(),
            &[
                config(S45, LINEAGE, "global", 2),
                config(S45, S45, "us-east5", 1),
                config(S46, LINEAGE, "global", 2),
                config(S46, S46, "us-east5", 1),
                config(S46, S46, "europe-west1", 1),
            ],
        )
    }

    fn ask_as<'a>(group: &'a QuotaGroup, regions: &'a [Arc<str>]) -> ReserveRequest<'a> {
        ReserveRequest {
            group,
            regions,
            charge: Charge {
                input: 10,
                output: 10,
            },
            strategy: Strategy::Ordered,
        }
    }

    #[test]
    fn requesters_of_a_lineage_share_global_and_keep_their_regions() {
        let s = lineage_store(TestClock::default());
        let (s45, s46) = (QuotaGroup::from(S45), QuotaGroup::from(S46));
        let global: Vec<Arc<str>> = vec![Arc::from("global")];
        // One budget of 2 on global, whoever asks.
        let g = s.reserve_now(ask_as(&s45, &global)).unwrap();
        assert_eq!(g.group, S45, "a grant names its requester");
        assert_eq!(s.bucket_of(S46, "global").unwrap(), LINEAGE);
        assert_eq!(s.bucket_of(S46, "us-east5").unwrap(), S46);
        s.reserve_now(ask_as(&s46, &global)).unwrap();
        assert!(matches!(
            s.reserve_now(ask_as(&s45, &global)),
            Err(Denial::Later { .. })
        ));
        assert!(s.reserve_now(ask_as(&s46, &global)).is_err());
        // A refund through one requester is room for the other.
        s.settle_now(&g, Outcome::NotSent);
        s.reserve_now(ask_as(&s46, &global)).unwrap();
        // us-east5: one budget each, though both name the lineage.
        let east: Vec<Arc<str>> = vec![Arc::from("us-east5")];
        s.reserve_now(ask_as(&s45, &east)).unwrap();
        s.reserve_now(ask_as(&s46, &east)).unwrap();
        assert!(s.reserve_now(ask_as(&s45, &east)).is_err());
        // S45 is not served in europe-west1: nothing to ask there.
        let west: Vec<Arc<str>> = vec![Arc::from("europe-west1")];
        assert_eq!(
            s.reserve_now(ask_as(&s45, &west)).unwrap_err(),
            Denial::Never
        );
        // State: each bucket once, named by its bucket group.
        let states: Vec<(String, String, u32)> = s
            .states_now()
            .iter()
            .map(|b| (b.group.to_string(), b.region.to_string(), b.usage.requests))
            .collect();
        let row = |g: &str, r: &str, n: u32| (g.to_string(), r.to_string(), n);
        assert_eq!(
            states,
            [
                row(LINEAGE, "global", 2),
                row(S45, "us-east5", 1),
                row(S46, "europe-west1", 0),
                row(S46, "us-east5", 1),
            ]
        );
        // Limits are set per bucket: the lineage's global budget for both.
        assert!(futures_ready(s.set_configured(
            &QuotaGroup::from(LINEAGE),
            "global",
            Limits::new(3, 1_000_000)
        )));
        s.reserve_now(ask_as(&s45, &global)).unwrap();
        assert!(s.reserve_now(ask_as(&s46, &global)).is_err());
        assert!(!futures_ready(s.set_configured(
            &QuotaGroup::from(LINEAGE),
            "us-east5",
            Limits::new(3, 1_000_000)
        )));
        assert_eq!(futures_ready(s.set_drained("us-east5", true)), 2);
    }

    #[test]
    fn budgets_are_locked_in_one_global_order_whatever_the_requester_lists() {
        // Two requesters share two budgets, listing them in opposite
        // orders: locking in each one's order would deadlock.
        let config = |group: &str, region: &str| BudgetConfig {
            group: group.into(),
            bucket: LINEAGE.into(),
            region: region.into(),
            limits: Limits::new(u32::MAX, 1 << 40),
        };
        let s = Arc::new(MemoryStore::new(
            TestClock::default(),
            Duration::from_secs(60),
            AdaptiveConfig::default(),
            &[
                config(S45, "global"),
                config(S45, "us"),
                config(S46, "us"),
                config(S46, "global"),
            ],
        ));
        let orders = |group: &str| {
            let regions = &s.requesters[group];
            regions
                .iter()
                .map(|(r, i)| (r.to_string(), *i))
                .collect::<Vec<_>>()
        };
        let (a, b) = (orders(S45), orders(S46));
        assert_eq!((a[0].0.as_str(), b[0].0.as_str()), ("global", "us"));
        assert_eq!(
            (a[0].1, a[1].1),
            (b[1].1, b[0].1),
            "same budgets, two orders"
        );
        let guards_for = |group: &str| {
            let eligible: Vec<&(Arc<str>, usize)> = s.requesters[group].iter().collect();
            let guards = s.lock_in_order(&eligible);
            guards
                .iter()
                .map(|(r, _)| r.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            guards_for(S46),
            ["us", "global"],
            "guards in the requester's order"
        );

        // Hold the first budget of the order (global): S46, listing us
        // first, must wait for it without holding us meanwhile.
        let (global, us) = (a[0].1, a[1].1);
        assert!(global < us);
        let held = lock(&s.budgets[global].budget);
        let asker = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let group = QuotaGroup::from(S46);
                let regions: Vec<Arc<str>> = vec![Arc::from("us"), Arc::from("global")];
                s.reserve_now(ask_as(&group, &regions)).is_ok()
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            s.budgets[us].budget.try_lock().is_ok(),
            "a requester waiting for the first budget holds no later one"
        );
        drop(held);
        assert!(asker.join().unwrap());
    }

    fn bucket_store(clock: TestClock) -> MemoryStore<TestClock, TokenBucket> {
        let budgets = ["us-central1", "europe-west4"].map(|region| BudgetConfig {
            group: HAIKU.into(),
            bucket: HAIKU.into(),
            region: region.into(),
            limits: Limits::new(60, 60_000),
        });
        MemoryStore::buckets(
            clock,
            Duration::from_secs(60),
            AdaptiveConfig::default(),
            &budgets,
        )
    }

    fn state_of<C: Clock, M: Meter>(s: &MemoryStore<C, M>, region: &str) -> BudgetState {
        s.states_now()
            .into_iter()
            .find(|b| &*b.region == region)
            .unwrap()
    }

    #[test]
    fn the_bucket_store_reserves_settles_and_refills_through_the_trait() {
        let clock = TestClock::default();
        let s = bucket_store(clock.clone());
        let only: Vec<Arc<str>> = vec![Arc::from("us-central1")];
        let g = futures_ready(s.reserve(ask(&only, 60_000, Strategy::Ordered))).unwrap();
        assert_eq!(g.view.usage.tokens(), 60_000);
        assert_eq!(g.view.empty_at, Duration::from_secs(60), "full again at");
        assert_eq!(
            futures_ready(s.probe(ask(&only, 1, Strategy::Ordered))),
            Err(Denial::Later {
                retry_at: Duration::from_millis(1)
            })
        );
        futures_ready(s.settle(
            &g,
            Outcome::Used(Charge {
                input: 30_000,
                output: 0,
            }),
        ));
        let state = state_of(&s, "us-central1");
        assert_eq!(state.usage.tokens(), 30_000);
        assert_eq!(state.in_flight, Usage::default());
        // Half a period later half the capacity is back, on top.
        clock.advance(30_000);
        assert!(s.reserve_now(ask(&only, 60_000, Strategy::Ordered)).is_ok());
        assert_eq!(
            s.reserve_now(ask(&only, 60_001, Strategy::Ordered))
                .unwrap_err(),
            Denial::Never
        );
        let states = futures_ready(s.states());
        assert_eq!(states.len(), 2);
        assert!(futures_ready(s.set_configured(
            &HAIKU_GROUP,
            "us-central1",
            Limits::new(60, 10_000)
        )));
        assert_eq!(
            state_of(&s, "us-central1").effective,
            Limits::new(60, 10_000)
        );
        assert_eq!(futures_ready(s.set_drained("europe-west4", true)), 1);
    }

    #[test]
    fn a_bucket_429_with_retry_after_closes_the_location_exactly_that_long() {
        let clock = TestClock::default();
        let s = bucket_store(clock.clone());
        let r = regions();
        let g = s.reserve_now(ask(&r, 1_000, Strategy::Ordered)).unwrap();
        assert_eq!(&*g.region, "us-central1");
        let report = RateLimitReport::from_headers([("retry-after", "7")], Duration::ZERO);
        futures_ready(s.learn(&g, &report));
        s.settle_now(&g, Outcome::RateLimited(Exhausted::Tokens));
        let state = state_of(&s, "us-central1");
        // No window learning: the limits stand; the tokens bucket is empty.
        assert_eq!(state.effective, Limits::new(60, 60_000));
        assert_eq!(
            state.usage,
            Usage {
                requests: 1,
                input: 60_000,
                output: 0
            }
        );
        assert_eq!(state.cooldown_remaining, Duration::from_secs(7));
        clock.advance(6_999);
        let g = s.reserve_now(ask(&r, 10, Strategy::Ordered)).unwrap();
        assert_eq!(&*g.region, "europe-west4", "still closed");
        clock.advance(1);
        let g = s.reserve_now(ask(&r, 10, Strategy::Ordered)).unwrap();
        assert_eq!(&*g.region, "us-central1", "open again at 7 s");
    }

    #[test]
    fn a_bucket_429_without_retry_after_and_a_529_cool_down_as_usual() {
        for outcome in [
            Outcome::RateLimited(Exhausted::Requests),
            Outcome::Unavailable,
        ] {
            let clock = TestClock::default();
            let s = bucket_store(clock.clone());
            let r = regions();
            let g = s.reserve_now(ask(&r, 1_000, Strategy::Ordered)).unwrap();
            s.settle_now(&g, outcome);
            let state = state_of(&s, "us-central1");
            assert!(
                state.cooldown_remaining >= Duration::from_millis(800),
                "{outcome:?}"
            );
            assert!(
                state.cooldown_remaining <= Duration::from_millis(1_200),
                "{outcome:?}"
            );
            assert_eq!(state.effective, Limits::new(60, 60_000), "{outcome:?}");
            let g = s.reserve_now(ask(&r, 10, Strategy::Ordered)).unwrap();
            assert_eq!(&*g.region, "europe-west4", "{outcome:?}");
            clock.advance(1_200);
            let g = s.reserve_now(ask(&r, 10, Strategy::Ordered)).unwrap();
            assert_eq!(&*g.region, "us-central1", "{outcome:?}");
        }
        // A 529 refunds the tokens; the request counts.
        let s = bucket_store(TestClock::default());
        let only: Vec<Arc<str>> = vec![Arc::from("us-central1")];
        let g = s.reserve_now(ask(&only, 5_000, Strategy::Ordered)).unwrap();
        s.settle_now(&g, Outcome::Unavailable);
        assert_eq!(
            state_of(&s, "us-central1").usage,
            Usage {
                requests: 1,
                input: 0,
                output: 0
            }
        );
    }

    #[test]
    fn learn_now_lowers_a_bucket_limit_by_share_and_never_above_configured() {
        let s = bucket_store(TestClock::default()).with_share(2);
        let only: Vec<Arc<str>> = vec![Arc::from("us-central1")];
        let g = s.reserve_now(ask(&only, 1_000, Strategy::Ordered)).unwrap();
        let report = RateLimitReport::from_headers(
            [
                ("anthropic-ratelimit-requests-limit", "50"),
                ("anthropic-ratelimit-requests-remaining", "48"),
                ("anthropic-ratelimit-requests-reset", "1970-01-01T00:00:02Z"),
                ("anthropic-ratelimit-tokens-limit", "400000"),
                ("anthropic-ratelimit-tokens-remaining", "398000"),
                ("anthropic-ratelimit-tokens-reset", "1970-01-01T00:00:02Z"),
            ],
            Duration::ZERO,
        );
        s.learn_now(&g, &report);
        let state = state_of(&s, "us-central1");
        // 50 / 2 = 25 requests; 400,000 / 2 is above the configured 60,000.
        assert_eq!(state.effective, Limits::new(25, 60_000));
        assert_eq!(state.configured, Limits::new(60, 60_000));
        assert_eq!(state.cooldown_remaining, Duration::ZERO);
        // The cut to 25 filled the requests bucket; 48 / 2 = 24 left right
        // after ours says one is used, and the discrepancy sync restores it.
        assert_eq!(state.usage.requests, 1);
        // The window store learns nothing from the same report.
        let w = store(TestClock::default());
        let g = w.reserve_now(ask(&only, 1_000, Strategy::Ordered)).unwrap();
        let report = RateLimitReport::from_headers(
            [
                ("anthropic-ratelimit-requests-limit", "5"),
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "1970-01-01T00:00:02Z"),
                ("retry-after", "30"),
            ],
            Duration::ZERO,
        );
        futures_ready(w.learn(&g, &report));
        let state = state_of(&w, "us-central1");
        assert_eq!(state.effective, Limits::new(60, 50_000));
        assert_eq!(state.cooldown_remaining, Duration::ZERO);
    }

    #[test]
    fn unknown_models_never_fit() {
        let s = store(TestClock::default());
        let r = regions();
        let mut q = ask(&r, 1, Strategy::Ordered);
        let unknown = QuotaGroup::from("claude-x");
        q.group = &unknown;
        assert_eq!(s.reserve_now(q).unwrap_err(), Denial::Never);
        let _ = AtomicU64::new(0);
    }
}
