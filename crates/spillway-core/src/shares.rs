//! Weighted max-min shares of one model's pool, held over the window.
//!
//! A sliding-window budget is filled by whatever was admitted in the last
//! window, and most admissions find room at once: a wait queue ordered by
//! weight decides only who goes next *among waiters*, which is rarely
//! anyone. So weights must bound what each tenant holds **in the window**:
//!
//! - Each tenant's **demand** is what it asked for in the window that it
//!   could use — admissions, and requests refused only because it was over
//!   its share (not those refused for want of room: a tenant whose requests
//!   cannot fit must not keep a share nobody can use) — or its recent rate
//!   projected over the window if that is more, so contention is seen
//!   seconds after it starts, not a window later: a tenant active for
//!   less than a window stands for its rate so far, over the window.
//! - When demands add up to more than the pool, the pool is **contended**
//!   and each tenant's **share** is its weighted max-min share: tenants that
//!   want less than their weighted part get what they want, and the rest is
//!   divided among the others in proportion to their weights
//!   (work-conserving: a share nobody wants flows to whoever wants it, and a
//!   tenant alone gets the whole pool).
//! - A tenant may be admitted only while what it holds in the window plus
//!   the request fits its share. Uncontended, nobody is held back.
//!
//! Everything is measured in **pool fractions**: a request costs the larger
//! of its share of the pool's requests and of its tokens (the binding
//! dimension), summed over every location of the model, so spreading over
//! locations buys a tenant nothing. Time is a [`Duration`] since an
//! arbitrary epoch, passed in: nothing here reads a clock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::capacity::GiveBack;

/// The recent-rate horizon: demand is at least the arrivals of the last
/// `window / RATE_SLICES`, scaled to the window.
const RATE_SLICES: u32 = 12;

/// The soonest a held-back request is looked at again: the shares'
/// refresh (no sooner can anything it depends on have moved).
const MIN_RECHECK: Duration = REFRESH;

/// What was spent (or asked for) in the last window: (time, cost), oldest
/// first, with their sum, and the sum of the latest slice (kept by a second
/// cursor, so neither sum is ever recounted).
#[derive(Debug, Default)]
struct Window {
    entries: VecDeque<(Duration, f64)>,
    /// The sequence number of `entries[0]`: entries are named by it so a
    /// settled request can correct its cost.
    first_seq: u64,
    sum: f64,
    /// Index of the first entry of the latest slice, and that slice's sum.
    slice_from: usize,
    slice_sum: f64,
}

impl Window {
    fn push(&mut self, at: Duration, cost: f64) -> u64 {
        self.entries.push_back((at, cost));
        self.sum += cost;
        self.slice_sum += cost;
        self.first_seq + self.entries.len() as u64 - 1
    }

    /// Replaces entry `seq`'s cost, if it is still in the window.
    fn correct(&mut self, seq: u64, cost: f64) {
        let Some(i) = seq.checked_sub(self.first_seq) else {
            return;
        };
        let i = i as usize;
        let in_slice = i >= self.slice_from;
        if let Some(entry) = self.entries.get_mut(i) {
            let delta = cost - entry.1;
            entry.1 = cost;
            self.sum += delta;
            if in_slice {
                self.slice_sum += delta;
            }
        }
    }

    fn expire(&mut self, cutoff: Duration) {
        while self.entries.front().is_some_and(|(at, _)| *at <= cutoff) {
            if let Some((_, c)) = self.entries.pop_front() {
                self.first_seq += 1;
                self.sum -= c;
                if self.slice_from > 0 {
                    self.slice_from -= 1;
                } else {
                    self.slice_sum -= c;
                }
            }
        }
        self.entries.give_back();
        if self.entries.is_empty() {
            // No float drift survives an empty window.
            self.sum = 0.0;
            self.slice_sum = 0.0;
            self.slice_from = 0;
        }
        self.sum = self.sum.max(0.0);
    }

    /// Whether `cost` more fits `cap`; if not, how long until enough of
    /// what is held leaves the window (or a slice, if it never will alone).
    fn decide(&self, cost: f64, cap: f64, now: Duration, window: Duration) -> ShareDecision {
        // A cap smaller than one request still admits one at a time.
        if self.sum + cost <= cap + 1e-9 || self.entries.is_empty() {
            return ShareDecision::Admit;
        }
        let under = self.sum < cap;
        let mut left = self.sum;
        for (at, c) in &self.entries {
            left -= c;
            if left + cost <= cap + 1e-9 {
                // Never zero: a waiter woken for nothing must let time pass.
                let after = (*at + window).saturating_sub(now).max(MIN_RECHECK);
                return if under {
                    ShareDecision::Oversized(after)
                } else {
                    ShareDecision::HeldBack(after)
                };
            }
        }
        let after = window / RATE_SLICES;
        if under {
            ShareDecision::Oversized(after)
        } else {
            ShareDecision::HeldBack(after)
        }
    }
}

#[derive(Debug, Default)]
struct Tenant {
    weight: f64,
    /// Admissions still in the window.
    held: Window,
    /// Arrivals still in the window.
    asked: Window,
    /// When this tenant became active (its first entry since it last had
    /// none): until a window has passed, its rate so far stands for it.
    since: Option<Duration>,
}

impl Tenant {
    /// What it asks for over a window: its window's arrivals, or its recent
    /// rate projected, whichever is more.
    fn demand(&mut self, now: Duration, window: Duration) -> f64 {
        // A tenant active for less than a window: its rate so far, over the
        // window (at least a slice of history, so one early request is not
        // taken for a flood). After that, what the window holds.
        let active = self.since.map_or(window, |s| now.saturating_sub(s));
        if active >= window {
            return self.asked.sum;
        }
        let seen = active.max(window / RATE_SLICES);
        self.asked.sum * window.as_secs_f64() / seen.as_secs_f64()
    }
}

/// How much of the pool batch work leaves to interactive traffic: the
/// interactive demand (as [`PoolShares`] projects it) times
/// [`RESERVE_MARGIN`], within `[min, max]` of the pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InteractiveReserve {
    pub min: f64,
    pub max: f64,
}

/// Headroom above the interactive demand that batch leaves: bursts above
/// the recent rate find room without waiting for the window to slide.
pub const RESERVE_MARGIN: f64 = 1.05;

impl Default for InteractiveReserve {
    fn default() -> Self {
        Self {
            min: 0.05,
            max: 0.9,
        }
    }
}

/// Whether a tenant may be admitted now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ShareDecision {
    Admit,
    /// Under its share, but this request is larger than what the share has
    /// left: it waits for its tenant's own admissions to leave (after this
    /// long), and its share meanwhile is room others may borrow.
    Oversized(Duration),
    /// Over its share; what it holds shrinks enough at the earliest after
    /// this long (or the shares may move sooner).
    HeldBack(Duration),
}

/// One tenant's place in the pool, for metrics and `spillway status`.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantShare {
    pub tenant: Arc<str>,
    /// Pool fraction held in the window.
    pub held: f64,
    /// Pool fraction asked for over the window.
    pub demand: f64,
    /// Its weighted max-min share while contended, else 1.
    pub share: f64,
}

/// One model's pool, shared between its interactive tenants and batch work.
#[derive(Debug, Default)]
pub struct PoolShares {
    window: Duration,
    tenants: HashMap<Arc<str>, Tenant>,
    /// Batch admissions still in the window (batch is one class: it takes
    /// what interactive traffic leaves, whoever submitted it).
    batch: Window,
    /// The shares as last computed: every decision within [`REFRESH`] of
    /// it uses them, so a decision costs one tenant's lookup, not a pass
    /// over every tenant.
    cached: Cached,
}

/// How long computed shares serve decisions: demand and shares move over
/// seconds, admissions every few microseconds.
const REFRESH: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
struct Cached {
    at: Option<Duration>,
    capacity: f64,
    reserve_min: f64,
    /// `None` while uncontended or a tenant is alone.
    shares: Option<HashMap<Arc<str>, f64>>,
    /// What interactive tenants hold, kept current between refreshes.
    in_use: f64,
    batch_cap: f64,
}

impl PoolShares {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            tenants: HashMap::new(),
            batch: Window::default(),
            cached: Cached::default(),
        }
    }

    fn tenant(&mut self, name: &Arc<str>, weight: f64, now: Duration) -> &mut Tenant {
        let t = self.tenants.entry(Arc::clone(name)).or_default();
        t.weight = weight.max(1e-6);
        t.since.get_or_insert(now);
        t
    }

    fn expire(&mut self, now: Duration) {
        // Nothing is a window old before a window has passed.
        let Some(cutoff) = now.checked_sub(self.window) else {
            return;
        };
        self.tenants.retain(|_, t| {
            t.held.expire(cutoff);
            t.asked.expire(cutoff);
            !(t.held.entries.is_empty() && t.asked.entries.is_empty())
        });
        self.batch.expire(cutoff);
    }

    /// A request of `cost` arrived for `tenant`.
    pub fn asked(&mut self, tenant: &Arc<str>, weight: f64, cost: f64, now: Duration) {
        self.tenant(tenant, weight, now).asked.push(now, cost);
    }

    /// A request of `cost` was admitted for `tenant`.
    /// Returns the admission's number, for [`PoolShares::settled`].
    pub fn admitted(&mut self, tenant: &Arc<str>, weight: f64, cost: f64, now: Duration) -> u64 {
        self.cached.in_use += cost;
        self.tenant(tenant, weight, now).held.push(now, cost)
    }

    /// A batch request of `cost` was admitted; returns its number.
    pub fn admitted_batch(&mut self, cost: f64, now: Duration) -> u64 {
        self.batch.push(now, cost)
    }

    /// Admission `seq` of `tenant` (`None`: batch) turned out to cost
    /// `cost`: what it holds is what it used, as the ledger settles.
    pub fn settled(&mut self, tenant: Option<&Arc<str>>, seq: u64, cost: f64) {
        match tenant {
            Some(name) => {
                if let Some(t) = self.tenants.get_mut(name) {
                    t.held.correct(seq, cost);
                }
            }
            None => self.batch.correct(seq, cost),
        }
    }

    /// What interactive tenants ask for over a window, in pool fractions.
    pub fn interactive_demand(&mut self, now: Duration) -> f64 {
        let window = self.window;
        self.tenants
            .values_mut()
            .map(|t| t.demand(now, window))
            .sum()
    }

    /// The part of a pool of `capacity` batch may hold now: all but the
    /// interactive reserve.
    pub fn batch_cap(&mut self, now: Duration, capacity: f64, reserve: InteractiveReserve) -> f64 {
        self.expire(now);
        let kept = (self.interactive_demand(now) * RESERVE_MARGIN).clamp(reserve.min, reserve.max);
        (1.0 - kept).max(0.0) * capacity
    }

    /// Whether a batch request of `cost` may be admitted now.
    pub fn decide_batch(
        &mut self,
        cost: f64,
        now: Duration,
        capacity: f64,
        reserve: InteractiveReserve,
    ) -> ShareDecision {
        self.decider(now, capacity, reserve).decide_batch(cost)
    }

    /// Pool fraction batch holds in the window.
    pub fn batch_held(&mut self, now: Duration) -> f64 {
        self.expire(now);
        self.batch.sum.max(0.0)
    }

    /// Each tenant's share of a pool of `capacity` (1 = the whole pool),
    /// or `None` while demand fits it.
    fn shares(&mut self, now: Duration, capacity: f64) -> Option<HashMap<&Arc<str>, f64>> {
        let window = self.window;
        let demands: Vec<(&Arc<str>, f64, f64)> = self
            .tenants
            .iter_mut()
            .map(|(name, t)| (name, t.demand(now, window), t.weight))
            .collect();
        if demands.iter().map(|d| d.1).sum::<f64>() <= capacity {
            return None;
        }
        Some(max_min(demands, capacity))
    }

    /// Whether `tenant` may take `cost` more of a pool of `capacity` now.
    pub fn decide(
        &mut self,
        tenant: &Arc<str>,
        cost: f64,
        now: Duration,
        capacity: f64,
    ) -> ShareDecision {
        self.decider(now, capacity, InteractiveReserve::default())
            .decide(tenant, cost)
    }

    /// The shares as of `now`, computed once for several decisions (a wait
    /// queue asks for each waiter ahead of its own).
    pub fn decider(
        &mut self,
        now: Duration,
        capacity: f64,
        reserve: InteractiveReserve,
    ) -> Decider<'_> {
        let fresh = self
            .cached
            .at
            .is_some_and(|at| now.saturating_sub(at) < REFRESH)
            && self.cached.capacity == capacity
            && self.cached.reserve_min == reserve.min;
        if !fresh {
            let batch_cap = self.batch_cap(now, capacity, reserve);
            // Equal weights ask for nothing the wait queue's fair order does
            // not already give symmetric demand, and holding lumpy requests
            // to equal shares idles the pool (a tenant whose next request is
            // larger than its share's room leaves that room unused): shares
            // are held only between tenants of different weights.
            let mut weights = self.tenants.values().map(|t| t.weight);
            let first = weights.next().unwrap_or(1.0);
            let weighted = weights.any(|w| (w - first).abs() > 1e-9);
            let shares = if self.tenants.len() < 2 || !weighted {
                None
            } else {
                self.shares(now, capacity).map(|s| {
                    s.into_iter()
                        .map(|(name, share)| (Arc::clone(name), share))
                        .collect()
                })
            };
            self.cached = Cached {
                at: Some(now),
                capacity,
                reserve_min: reserve.min,
                shares,
                in_use: self.tenants.values().map(|t| t.held.sum).sum(),
                batch_cap,
            };
        }
        Decider { pool: self, now }
    }

    /// Every tenant's place, for operators.
    pub fn report(&mut self, now: Duration, capacity: f64) -> Vec<TenantShare> {
        self.expire(now);
        let shares: Option<HashMap<Arc<str>, f64>> = self
            .shares(now, capacity)
            .map(|s| s.into_iter().map(|(n, v)| (Arc::clone(n), v)).collect());
        let window = self.window;
        let mut out: Vec<TenantShare> = self
            .tenants
            .iter_mut()
            .map(|(name, t)| TenantShare {
                tenant: Arc::clone(name),
                held: t.held.sum.max(0.0),
                demand: t.demand(now, window),
                share: shares
                    .as_ref()
                    .and_then(|s| s.get(name).copied())
                    .unwrap_or(capacity),
            })
            .collect();
        out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        out
    }
}

/// Share decisions against one computation of the shares.
pub struct Decider<'a> {
    pool: &'a PoolShares,
    now: Duration,
}

impl Decider<'_> {
    /// Whether a batch request of `cost` may be admitted: batch holds at
    /// most what the interactive reserve leaves.
    pub fn decide_batch(&self, cost: f64) -> ShareDecision {
        let (window, cap) = (self.pool.window, self.pool.cached.batch_cap);
        match self.pool.batch.decide(cost, cap, self.now, window) {
            // Interactive demand may also fall sooner than batch entries
            // leave: look again within a slice.
            ShareDecision::HeldBack(after) => {
                ShareDecision::HeldBack(after.min(window / RATE_SLICES))
            }
            ShareDecision::Oversized(after) => {
                ShareDecision::Oversized(after.min(window / RATE_SLICES))
            }
            admit => admit,
        }
    }

    /// A tenant alone is never held back (the budget alone bounds it), and
    /// shares are of the pool in use when that is more than `capacity` (a
    /// budget raised at run time is shared, not left idle).
    pub fn decide(&self, tenant: &Arc<str>, cost: f64) -> ShareDecision {
        let cached = &self.pool.cached;
        let Some(shares) = &cached.shares else {
            return ShareDecision::Admit;
        };
        let pool = cached.capacity.max(cached.in_use + cost);
        let share = shares.get(tenant).copied().unwrap_or(cached.capacity) * pool / cached.capacity;
        match self.pool.tenants.get(tenant) {
            Some(t) => t.held.decide(cost, share, self.now, self.pool.window),
            None => ShareDecision::Admit,
        }
    }
}

/// Weighted max-min fair shares of `capacity` among (name, demand, weight).
fn max_min(mut demands: Vec<(&Arc<str>, f64, f64)>, capacity: f64) -> HashMap<&Arc<str>, f64> {
    demands.sort_by(|a, b| (a.1 / a.2).total_cmp(&(b.1 / b.2)));
    let mut left = capacity;
    let mut weights: f64 = demands.iter().map(|d| d.2).sum();
    let mut out = HashMap::new();
    for (name, demand, weight) in demands {
        let fair = if weights > 0.0 {
            left * weight / weights
        } else {
            0.0
        };
        let share = demand.min(fair);
        out.insert(name, if demand <= fair { fair } else { share });
        left -= share;
        weights -= weight;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: Duration = Duration::from_secs(60);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn name(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    /// Offers `rate` requests/s of cost `c` per tenant for `secs`, admitting
    /// whatever the shares allow and the pool (capacity 1) has room for;
    /// returns what each was served.
    fn run(tenants: &[(&str, f64, f64)], secs: u64, c: f64) -> Vec<f64> {
        let mut p = PoolShares::new(W);
        let names: Vec<Arc<str>> = tenants.iter().map(|t| name(t.0)).collect();
        let mut served = vec![0.0; tenants.len()];
        let mut pool: VecDeque<(Duration, f64)> = VecDeque::new();
        let step = 50; // ms
        let mut debt = vec![0.0; tenants.len()];
        for tick in 0..(secs * 1000 / step) {
            let now = ms(tick * step);
            while pool.front().is_some_and(|(at, _)| *at + W < now) {
                pool.pop_front();
            }
            for (i, (_, weight, rate)) in tenants.iter().enumerate() {
                debt[i] += rate * step as f64 / 1000.0;
                while debt[i] >= 1.0 {
                    debt[i] -= 1.0;
                    p.asked(&names[i], *weight, c, now);
                    let used: f64 = pool.iter().map(|x| x.1).sum();
                    if used + c <= 1.0 + 1e-9
                        && p.decide(&names[i], c, now, 1.0) == ShareDecision::Admit
                    {
                        p.admitted(&names[i], *weight, c, now);
                        pool.push_back((now, c));
                        served[i] += c;
                    }
                }
            }
        }
        served
    }

    #[test]
    fn weights_hold_over_the_window_from_the_first_one() {
        // Pool: 120 requests a window; each tenant offers 6/s (3× the pool).
        let c = 1.0 / 120.0;
        let s = run(&[("a", 3.0, 6.0), ("b", 1.0, 6.0)], 180, c);
        let ratio = s[0] / s[1];
        assert!((2.7..=3.3).contains(&ratio), "{s:?} → {ratio}");
        let s = run(&[("a", 1.0, 6.0), ("b", 1.0, 6.0)], 180, c);
        let ratio = s[0] / s[1];
        assert!((0.9..=1.1).contains(&ratio), "{s:?} → {ratio}");
    }

    #[test]
    fn a_lone_tenant_gets_the_whole_pool_and_idle_shares_flow() {
        let c = 1.0 / 120.0;
        let s = run(&[("a", 1.0, 6.0)], 180, c);
        assert!(s[0] >= 0.99 * 3.0, "{s:?}");
        // b wants a little (0.5/s = a quarter of the pool, under its
        // weighted third): it gets nearly all of it (this model has no wait
        // queue: an arrival at the instant the pool is full is lost), and a
        // gets the rest, more than its weighted two thirds.
        let s = run(&[("a", 2.0, 6.0), ("b", 1.0, 0.5)], 180, c);
        assert!(s[1] >= 0.9 * 0.5 * 180.0 * c, "{s:?}");
        assert!(s[0] + s[1] >= 0.97 * 3.0, "{s:?}");
    }

    #[test]
    fn batch_leaves_what_interactive_asks_for_and_takes_the_rest_back() {
        let mut p = PoolShares::new(W);
        let r = InteractiveReserve::default();
        let c = 1.0 / 120.0;
        // Alone, batch may fill all but the floor.
        assert!((p.batch_cap(ms(0), 1.0, r) - 0.95).abs() < 1e-9);
        // Interactive at 1/s (half the pool): from its first seconds, batch
        // is capped at the other half, less the margin.
        let user = name("u");
        for i in 0..5 {
            p.asked(&user, 1.0, c, ms(1_000 * i));
        }
        let cap = p.batch_cap(ms(4_500), 1.0, r);
        assert!((cap - (1.0 - 0.5 * RESERVE_MARGIN)).abs() < 0.03, "{cap}");
        // A batch holding more than that is held back, not refused.
        for i in 5..10 {
            p.asked(&user, 1.0, c, ms(1_000 * i));
        }
        for i in 0..100 {
            p.admitted_batch(c, ms(100 * i));
        }
        assert!(matches!(
            p.decide_batch(c, ms(10_000), 1.0, r),
            ShareDecision::HeldBack(_)
        ));
        // Quiet for a window: batch may take the whole pool (less the floor).
        let cap = p.batch_cap(ms(75_000), 1.0, r);
        assert!((cap - 0.95).abs() < 1e-9, "{cap}");
        assert_eq!(p.decide_batch(c, ms(75_000), 1.0, r), ShareDecision::Admit);
    }

    #[test]
    fn max_min_is_weighted_and_work_conserving() {
        let (a, b, c) = (name("a"), name("b"), name("c"));
        let s = max_min(vec![(&a, 10.0, 3.0), (&b, 10.0, 1.0)], 1.0);
        assert!((s[&a] - 0.75).abs() < 1e-9 && (s[&b] - 0.25).abs() < 1e-9);
        // c wants only 0.1: it gets (at least) that; a and b split the rest 3:1.
        let s = max_min(vec![(&a, 10.0, 3.0), (&b, 10.0, 1.0), (&c, 0.1, 1.0)], 1.0);
        assert!(s[&c] >= 0.1);
        assert!(
            (s[&a] - 0.675).abs() < 1e-9 && (s[&b] - 0.225).abs() < 1e-9,
            "{s:?}"
        );
    }

    proptest! {
        #[test]
        fn shares_never_exceed_the_pool_for_those_who_want_more(
            demands in prop::collection::vec((0.0f64..5.0, 0.1f64..10.0), 1..8),
        ) {
            let names: Vec<Arc<str>> = (0..demands.len()).map(|i| name(&i.to_string())).collect();
            let input = names.iter().zip(&demands).map(|(n, (d, w))| (n, *d, *w)).collect();
            let s = max_min(input, 1.0);
            // Those who get less than they want together get at most the pool.
            let given: f64 = names.iter().zip(&demands)
                .map(|(n, (d, _))| s[n].min(*d)).sum();
            prop_assert!(given <= 1.0 + 1e-9);
            // Work-conserving: if demand exceeds the pool, it is all given.
            let total: f64 = demands.iter().map(|d| d.0).sum();
            if total > 1.0 { prop_assert!(given >= 1.0 - 1e-9, "{given}"); }
        }
    }
}
