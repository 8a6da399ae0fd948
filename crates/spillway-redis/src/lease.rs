//! Leases: most admissions of a busy replica without a Redis round trip,
//! and still exact.
//!
//! A replica that has been busy asks Redis for more than the request in
//! hand: a *lease* of `1 + k` requests of that request's charge, reserved
//! as one ledger entry by the same atomic choose-and-reserve as any other
//! (`reserve.lua`), but stamped at the lease's end, `L` after it is granted
//! (`quota.redis_lease_ms`). Until then this replica admits further requests
//! for the model from it, in memory, while each fits what is left. Then the
//! lease closes: one call (`adjust.lua`) gives back what was not used.
//! Requests still in flight adjust the entry when they end, by what they
//! really used, as a settle does for a lone reservation.
//!
//! **Why it stays exact.** The whole lease was checked against the shared
//! budget when it was granted and counts from then. Every request it admits
//! goes out between the grant and the stamp, so the shared window, which
//! holds the entry until stamp + W, holds each of those requests at least
//! as long as Vertex's window does. No window of Vertex's can see more than
//! the ledger does, and the ledger never holds more than the budget. ("Goes
//! out before the stamp" holds on any round trip: local admissions end `L`
//! after this replica *asked*, by its copy of the server clock, which lags
//! the server and so never runs past the stamp.)
//!
//! **What it costs**, and why leases stay small: room leased and not used
//! is idle until the lease closes (at most `L`), and the entries stamped
//! after it on the same budget count `L` longer. So a lease takes at most a
//! quarter of what the budget has left after the request (`LEASE_SHARE` in
//! `common.lua`: near the limit it shrinks to nothing and admission is the
//! one round trip it always was), and `k` follows demand: how many requests
//! for the model this replica saw in the previous `L` (none below two).
//! And a cooldown, drain or limit set through another replica reaches this
//! replica's open leases only when they close, at most `L` later; through
//! this replica, at once (its leases on that budget are closed first).
//!
//! This module is the bookkeeping only: which leases are open, what each
//! has left, what each change to Redis must say. `store.rs` makes the calls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::IntCounter;
use spillway_core::adaptive::Exhausted;
use spillway_core::ledger::{Charge, EntryId};
use spillway_core::store::{BudgetView, Grant, Outcome, ReserveRequest, Strategy};
use spillway_core::QuotaGroup;

/// Marks the entry id of a grant admitted under a lease.
pub const LEASED: u64 = 1 << 62;
/// The most requests one lease holds beyond the one that asked for it.
const MAX_EXTRA: u32 = 256;

/// Requests and tokens, signed: changes to an entry go both ways.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    pub requests: i64,
    pub input: i64,
    pub output: i64,
}

impl Amount {
    fn of(requests: i64, charge: Charge) -> Self {
        let tokens = |t: u64| i64::try_from(t).unwrap_or(i64::MAX / 4);
        Self {
            requests,
            input: tokens(charge.input).saturating_mul(requests),
            output: tokens(charge.output).saturating_mul(requests),
        }
    }

    fn plus(self, o: Self) -> Self {
        Self {
            requests: self.requests + o.requests,
            input: self.input.saturating_add(o.input),
            output: self.output.saturating_add(o.output),
        }
    }

    fn minus(self, o: Self) -> Self {
        self.plus(Self {
            requests: -o.requests,
            input: -o.input,
            output: -o.output,
        })
    }

    /// Whether one more request of `charge` fits in this much.
    fn admits(self, charge: Charge) -> bool {
        let one = Self::of(1, charge);
        self.requests >= 1 && self.input >= one.input && self.output >= one.output
    }
}

/// What Redis should learn from how a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learn {
    Nothing,
    Success,
    RateLimited(Exhausted),
    Unavailable,
}

/// One change to a lease's entry in Redis (`adjust.lua`).
#[derive(Debug, Clone, PartialEq)]
pub struct Adjustment {
    pub group: QuotaGroup,
    pub region: Arc<str>,
    pub id: u64,
    pub stamp_us: i64,
    pub change: Amount,
    /// No request of the lease is in flight any more.
    pub settled: bool,
    pub learn: Learn,
}

#[derive(Debug)]
struct Lease {
    group: QuotaGroup,
    region: Arc<str>,
    stamp_us: i64,
    /// As the grant saw the budget (for rate-limit headers).
    view: BudgetView,
    /// Local admissions end here (store clock).
    until: Duration,
    /// What its entry in Redis holds, as last written.
    held: Amount,
    /// Its requests' charges: estimates in flight, then what they used.
    used: Amount,
    in_flight: u32,
    /// Successes not yet told to Redis (told once, at close).
    successes: u32,
    open: bool,
}

impl Lease {
    /// Ends local admissions: the entry shrinks to what was used.
    fn close(&mut self, id: u64, learn: Option<Learn>) -> Option<Adjustment> {
        self.open = false;
        let change = self.used.minus(self.held);
        self.held = self.used;
        let learn = learn.unwrap_or(if self.successes > 0 {
            Learn::Success
        } else {
            Learn::Nothing
        });
        self.successes = 0;
        let settled = self.in_flight == 0;
        (change != Amount::default() || learn != Learn::Nothing || settled)
            .then(|| self.adjustment(id, change, learn))
    }

    fn adjustment(&self, id: u64, change: Amount, learn: Learn) -> Adjustment {
        Adjustment {
            group: self.group.clone(),
            region: Arc::clone(&self.region),
            id,
            stamp_us: self.stamp_us,
            change,
            settled: self.in_flight == 0,
            learn,
        }
    }
}

/// Requests for one model seen in the current and previous lease length.
#[derive(Debug, Default)]
struct Demand {
    since: Duration,
    current: u32,
    previous: u32,
}

#[derive(Debug, Default)]
struct Book {
    /// By entry id; a lease leaves when closed with nothing in flight.
    leases: HashMap<u64, Lease>,
    /// Recent admissions per quota group: how large a lease to ask for.
    demand: HashMap<QuotaGroup, Demand>,
}

impl Book {
    /// Counts a request for `group`; returns what the previous `length` saw
    /// (below two: 0, no lease), capped at MAX_EXTRA.
    fn count_demand(&mut self, group: &QuotaGroup, now: Duration, length: Duration) -> u32 {
        if !self.demand.contains_key(group) {
            self.demand.insert(group.clone(), Demand::default());
        }
        let d = self.demand.get_mut(group).expect("inserted above");
        let elapsed = now.saturating_sub(d.since);
        if elapsed >= length {
            d.previous = if elapsed < length * 2 { d.current } else { 0 };
            d.current = 0;
            d.since = now;
        }
        d.current += 1;
        if d.previous >= 2 {
            d.previous.min(MAX_EXTRA)
        } else {
            0
        }
    }

    /// The open lease `request` fits best (by its strategy), as a grant
    /// naming the lease; charged there when `take` gives the counters.
    fn admit(
        &mut self,
        request: &ReserveRequest<'_>,
        now: Duration,
        take: Option<&LeaseCounters>,
    ) -> Option<Grant> {
        let rank = |region: &str| request.regions.iter().position(|r| &**r == region);
        let mut best: Option<(u64, usize, i64)> = None;
        for (id, lease) in &self.leases {
            if !lease.open || now >= lease.until || lease.group != *request.group {
                continue;
            }
            let Some(position) = rank(&lease.region) else {
                continue;
            };
            let left = lease.held.minus(lease.used);
            if !left.admits(request.charge) {
                continue;
            }
            let better = match (best, request.strategy) {
                (None, _) => true,
                (Some((_, p, _)), Strategy::Ordered) => position < p,
                (Some((_, _, r)), Strategy::MostHeadroom) => left.requests > r,
            };
            if better {
                best = Some((*id, position, left.requests));
            }
        }
        let (id, _, _) = best?;
        let lease = self.leases.get_mut(&id).expect("found above");
        if let Some(counters) = take {
            lease.used = lease.used.plus(Amount::of(1, request.charge));
            lease.in_flight += 1;
            counters.admitted.inc();
        }
        Some(Grant {
            group: lease.group.clone(),
            region: Arc::clone(&lease.region),
            entry: EntryId::from_raw(id | LEASED),
            charge: request.charge,
            view: BudgetView { now, ..lease.view },
        })
    }
}

/// Counters for the gateway's metrics (unregistered unless given).
#[derive(Clone)]
pub struct LeaseCounters {
    pub granted: IntCounter,
    pub admitted: IntCounter,
}

impl LeaseCounters {
    pub fn unregistered() -> Self {
        Self {
            granted: IntCounter::new("leases_granted", "-").expect("valid metric"),
            admitted: IntCounter::new("lease_admissions", "-").expect("valid metric"),
        }
    }
}

/// This replica's open leases.
pub struct Leases {
    /// `L`; zero: no leases.
    length: Duration,
    book: Mutex<Book>,
    counters: LeaseCounters,
}

/// How long before its stamp a lease stops admitting: a margin for the
/// local system clock stepping between two readings of the server's.
const CLOCK_SLACK: Duration = Duration::from_millis(1);

impl Leases {
    pub fn new(length: Duration, counters: LeaseCounters) -> Self {
        Self {
            length,
            book: Mutex::new(Book::default()),
            counters,
        }
    }

    pub fn length(&self) -> Duration {
        self.length
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One admission: counts it in `request.group`'s demand and admits it
    /// from an open lease with room, charged there; without one, says how
    /// many more requests than it a lease asked for now should hold (0: ask
    /// for it alone). One lock for both: this runs on every admission.
    pub fn reserve(&self, request: &ReserveRequest<'_>, now: Duration) -> Result<Grant, u32> {
        if self.length.is_zero() {
            return Err(0);
        }
        let mut book = self.book();
        let want = book.count_demand(request.group, now, self.length);
        book.admit(request, now, Some(&self.counters)).ok_or(want)
    }

    /// Would an open lease admit `request` now? Takes nothing.
    pub fn probe(&self, request: &ReserveRequest<'_>, now: Duration) -> bool {
        !self.length.is_zero() && self.book().admit(request, now, None).is_some()
    }

    /// Records a lease Redis granted (`requests` of `grant.charge`, its entry
    /// stamped `stamp_us`) with `grant` as its first request; returns that
    /// grant as the lease's and when local admissions end.
    ///
    /// `asked_at` is the local copy of the server clock read before the
    /// call. That copy lags the server (its offset was measured when a reply
    /// arrived, after the server's `TIME`), so `asked_at` is no later than
    /// the server's time when it granted: counting the length from it ends
    /// local admissions before the entry's stamp however long the round trip.
    pub fn open(
        &self,
        mut grant: Grant,
        requests: u32,
        stamp_us: i64,
        asked_at: Duration,
    ) -> (Grant, Duration) {
        let id = grant.entry.raw();
        let until = asked_at.min(grant.view.now) + self.length.saturating_sub(CLOCK_SLACK);
        let lease = Lease {
            group: grant.group.clone(),
            region: Arc::clone(&grant.region),
            stamp_us,
            view: grant.view,
            until,
            held: Amount::of(i64::from(requests), grant.charge),
            used: Amount::of(1, grant.charge),
            in_flight: 1,
            successes: 0,
            open: true,
        };
        self.book().leases.insert(id, lease);
        self.counters.granted.inc();
        self.counters.admitted.inc();
        grant.entry = EntryId::from_raw(id | LEASED);
        (grant, until)
    }

    /// One of a lease's requests ended; what Redis must hear, if anything
    /// now (an open lease keeps successes for its close, but a 429 or an
    /// unavailable upstream closes it at once: routing must see it).
    pub fn settle(&self, grant: &Grant, outcome: Outcome) -> Option<Adjustment> {
        let id = grant.entry.raw() & !LEASED;
        let mut book = self.book();
        let lease = book.leases.get_mut(&id)?;
        let estimate = Amount::of(1, grant.charge);
        let unsent = Amount {
            requests: 0,
            ..estimate
        };
        let (change, learn) = match outcome {
            Outcome::Used(actual) => (Amount::of(1, actual).minus(estimate), Learn::Success),
            Outcome::RateLimited(which) => {
                (Amount::default().minus(unsent), Learn::RateLimited(which))
            }
            Outcome::Unavailable => (Amount::default().minus(unsent), Learn::Unavailable),
            Outcome::NotSent => (Amount::default().minus(estimate), Learn::Nothing),
            Outcome::Broken(used) => (Amount::of(1, used).minus(estimate), Learn::Unavailable),
        };
        lease.used = lease.used.plus(change);
        lease.in_flight = lease.in_flight.saturating_sub(1);
        let adjustment = if lease.open {
            match learn {
                Learn::Success => {
                    lease.successes += 1;
                    None
                }
                Learn::Nothing => None,
                Learn::RateLimited(_) | Learn::Unavailable => lease.close(id, Some(learn)),
            }
        } else {
            lease.held = lease.held.plus(change);
            Some(lease.adjustment(id, change, learn))
        };
        if !lease.open && lease.in_flight == 0 {
            book.leases.remove(&id);
        }
        adjustment
    }

    /// Ends a lease's local admissions (its time is up).
    pub fn close(&self, id: u64) -> Option<Adjustment> {
        let mut book = self.book();
        let lease = book.leases.get_mut(&id)?;
        if !lease.open {
            return None;
        }
        let adjustment = lease.close(id, None);
        if lease.in_flight == 0 {
            book.leases.remove(&id);
        }
        adjustment
    }

    /// Closes the open leases on `region` (of these requesters — those
    /// drawing on one bucket there — or of every one): an operator drained
    /// it or changed its limits here.
    pub fn revoke(&self, groups: Option<&[QuotaGroup]>, region: &str) -> Vec<Adjustment> {
        let ids: Vec<u64> = self
            .book()
            .leases
            .iter()
            .filter(|(_, l)| {
                l.open && &*l.region == region && groups.is_none_or(|g| g.contains(&l.group))
            })
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter().filter_map(|id| self.close(id)).collect()
    }

    /// Leases still tracked (open, or closed with requests in flight).
    pub fn tracked(&self) -> usize {
        self.book().leases.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_core::ledger::{Limits, Usage};

    const MS: Duration = Duration::from_millis(1);

    fn leases() -> Leases {
        Leases::new(MS * 50, LeaseCounters::unregistered())
    }

    fn charge(input: u64, output: u64) -> Charge {
        Charge { input, output }
    }

    fn grant(id: u64, region: &str, c: Charge, now: Duration) -> Grant {
        Grant {
            group: "m".into(),
            region: Arc::from(region),
            entry: EntryId::from_raw(id),
            charge: c,
            view: BudgetView {
                limits: Limits::new(60, 50_000),
                usage: Usage::default(),
                empty_at: now,
                now,
            },
        }
    }

    static M: std::sync::LazyLock<QuotaGroup> = std::sync::LazyLock::new(|| QuotaGroup::from("m"));

    fn ask<'a>(regions: &'a [Arc<str>], c: Charge, strategy: Strategy) -> ReserveRequest<'a> {
        ReserveRequest {
            group: &M,
            regions,
            charge: c,
            strategy,
        }
    }

    /// What a lease asked for now would want (none is open).
    fn want(l: &Leases, now: Duration) -> u32 {
        let r: Vec<Arc<str>> = vec![Arc::from("us")];
        l.reserve(&ask(&r, charge(1, 1), Strategy::Ordered), now)
            .unwrap_err()
    }

    #[test]
    fn demand_below_two_per_length_asks_for_no_lease() {
        let l = leases();
        assert_eq!(want(&l, Duration::ZERO), 0);
        assert_eq!(want(&l, MS * 10), 0);
        assert_eq!(want(&l, MS * 20), 0);
        // The previous 50 ms saw three.
        assert_eq!(want(&l, MS * 60), 3);
        // A quiet stretch longer than a length forgets.
        assert_eq!(want(&l, MS * 400), 0);
        let off = Leases::new(Duration::ZERO, LeaseCounters::unregistered());
        for t in 0..10 {
            assert_eq!(want(&off, MS * t), 0);
        }
    }

    #[test]
    fn a_lease_admits_what_fits_until_it_ends_then_gives_back_the_rest() {
        let l = leases();
        let r: Vec<Arc<str>> = vec![Arc::from("us")];
        let c = charge(100, 10);
        let (first, until) = l.open(grant(7, "us", c, Duration::ZERO), 3, 50_000, Duration::ZERO);
        assert_eq!(first.entry.raw(), 7 | LEASED);
        assert_eq!(until, MS * 49);
        let second = l.reserve(&ask(&r, c, Strategy::Ordered), MS * 10).unwrap();
        // A bigger request does not fit what is left; a probe takes nothing.
        assert!(l
            .reserve(&ask(&r, charge(101, 10), Strategy::Ordered), MS * 10)
            .is_err());
        assert!(l.probe(&ask(&r, c, Strategy::Ordered), MS * 10));
        assert!(
            l.reserve(&ask(&r, c, Strategy::Ordered), MS * 49).is_err(),
            "ended"
        );
        let _third = l.reserve(&ask(&r, c, Strategy::Ordered), MS * 11).unwrap();
        assert!(
            l.reserve(&ask(&r, c, Strategy::Ordered), MS * 12).is_err(),
            "all taken"
        );
        // While open, a success is kept for the close; a cancel gives back.
        assert_eq!(l.settle(&first, Outcome::Used(charge(90, 30))), None);
        assert_eq!(l.settle(&second, Outcome::NotSent), None);
        let close = l.close(7).unwrap();
        // held 3 × (100, 10); used: first (90, 30), third (100, 10) in flight.
        assert_eq!(
            close.change,
            Amount {
                requests: -1,
                input: -110,
                output: 10
            }
        );
        assert_eq!(close.learn, Learn::Success);
        assert!(!close.settled);
        assert_eq!(l.close(7), None, "closed once");
        // The last request ends after the close: its own change, settled.
        let third = grant(7 | LEASED, "us", c, MS * 11);
        let last = l.settle(&third, Outcome::Used(charge(100, 4))).unwrap();
        assert_eq!(
            last.change,
            Amount {
                requests: 0,
                input: 0,
                output: -6
            }
        );
        assert!(last.settled);
        assert_eq!(l.tracked(), 0);
    }

    /// The local clock lags the server's by up to a reply's transit: local
    /// admissions end a length after the earlier of the two readings.
    #[test]
    fn a_lease_ends_a_length_after_it_was_asked_for() {
        let l = leases();
        let (_, until) = l.open(grant(3, "us", charge(1, 1), MS * 30), 2, 0, MS * 10);
        assert_eq!(until, MS * 59);
        let (_, until) = l.open(grant(4, "us", charge(1, 1), MS * 30), 2, 0, MS * 40);
        assert_eq!(until, MS * 79);
    }

    #[test]
    fn a_429_closes_the_lease_at_once_and_is_learned() {
        let l = leases();
        let r: Vec<Arc<str>> = vec![Arc::from("us")];
        let c = charge(100, 10);
        let (first, _) = l.open(grant(9, "us", c, Duration::ZERO), 4, 50_000, Duration::ZERO);
        let adj = l
            .settle(&first, Outcome::RateLimited(Exhausted::Tokens))
            .unwrap();
        assert_eq!(adj.learn, Learn::RateLimited(Exhausted::Tokens));
        // The request counts, its tokens do not, the three unused go back.
        assert_eq!(
            adj.change,
            Amount {
                requests: -3,
                input: -400,
                output: -40
            }
        );
        assert!(adj.settled);
        assert!(l.reserve(&ask(&r, c, Strategy::Ordered), MS).is_err());
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn strategies_pick_among_open_leases_and_revoking_closes_them() {
        let l = leases();
        let r: Vec<Arc<str>> = vec![Arc::from("us"), Arc::from("eu")];
        let c = charge(1, 1);
        l.open(
            grant(1, "eu", c, Duration::ZERO),
            10,
            50_000,
            Duration::ZERO,
        );
        l.open(grant(2, "us", c, Duration::ZERO), 3, 50_000, Duration::ZERO);
        let g = l.reserve(&ask(&r, c, Strategy::Ordered), MS).unwrap();
        assert_eq!(&*g.region, "us");
        let g = l.reserve(&ask(&r, c, Strategy::MostHeadroom), MS).unwrap();
        assert_eq!(&*g.region, "eu");
        // Only the regions asked for.
        let only_us: Vec<Arc<str>> = vec![Arc::from("us")];
        let g = l
            .reserve(&ask(&only_us, c, Strategy::MostHeadroom), MS)
            .unwrap();
        assert_eq!(&*g.region, "us");
        let revoked = l.revoke(None, "eu");
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].id, 1);
        let g = l.reserve(&ask(&r, c, Strategy::MostHeadroom), MS).ok();
        assert!(g.is_none(), "us is full, eu revoked: {g:?}");
    }
}
