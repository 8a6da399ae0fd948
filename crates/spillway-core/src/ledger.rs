//! The reservation ledger: one (region, model) budget, never over quota in
//! any window, refundable.
//!
//! Vertex does not document its quota window. Spillway assumes the strictest
//! reading — a sliding window of length `W` over which at most `R` requests
//! and `T` tokens may be spent — so that whatever Vertex really does, a
//! request Spillway admits is one Vertex would admit too.
//!
//! The ledger keeps a log of admitted requests, each stamped with its
//! admission time and its current charge (the reservation, later replaced by
//! the actual usage). A request is admitted at time `t` only if everything
//! stamped in the closed window `[t - W, t]` plus this request fits the
//! limits. That suffices for *every* window: in any window `[s, s + W]`, the
//! latest admission `t*` saw all the others in `[t* - W, t*]` and checked
//! their sum. Refunds only lower charges, so they cannot break it.
//!
//! Why not governor's GCRA: after a full burst, GCRA lets the budget refill
//! continuously, so some 60 s window can see close to twice the quota; and
//! GCRA cannot refund an over-estimate. A log is exact and, with at most a
//! budget's worth of entries live, small.
//!
//! An *under*-estimate is the one way a window can exceed the budget: the
//! actual usage replaces the reservation in place, and the excess is real
//! spending the ledger could not foresee. The excess is recorded (so later
//! admissions wait for it) and bounded by the estimation error; estimation
//! corrections exist to keep it rare.
//!
//! Time is a [`Duration`] since an arbitrary epoch, passed in by the caller:
//! the ledger never reads a clock.

use std::collections::VecDeque;
use std::time::Duration;

use crate::capacity::GiveBack;

/// Limits for one window. `tokens` bounds input + output; the split limits
/// mirror Vertex's separate input and output token quotas when configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub requests: u32,
    pub tokens: Option<u64>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
}

impl Limits {
    pub fn new(requests: u32, tokens: u64) -> Self {
        Self {
            requests,
            tokens: Some(tokens),
            input_tokens: None,
            output_tokens: None,
        }
    }

    /// Vertex's split quotas only: `requests`, `input` tokens and `output`
    /// tokens per window, no combined limit.
    pub fn split(requests: u32, input: u64, output: u64) -> Self {
        Self {
            requests,
            tokens: None,
            input_tokens: Some(input),
            output_tokens: Some(output),
        }
    }

    /// Whether `charge` alone could ever fit (an empty window): every
    /// limit that is set, each on its own dimension.
    pub fn admits(&self, charge: Charge) -> bool {
        self.fits(Usage::default(), charge)
    }

    fn fits(&self, used: Usage, charge: Charge) -> bool {
        let input = used.input.saturating_add(charge.input);
        let output = used.output.saturating_add(charge.output);
        used.requests < self.requests
            && self
                .tokens
                .is_none_or(|max| input.saturating_add(output) <= max)
            && self.input_tokens.is_none_or(|max| input <= max)
            && self.output_tokens.is_none_or(|max| output <= max)
    }

    /// The token limit that binds a combined charge (for headers and
    /// rejections): the combined limit, or input + output when only split
    /// limits are set, or unbounded when a dimension has no limit at all.
    /// A summary only: whether a charge fits is [`Limits::admits`], which
    /// checks each dimension.
    pub fn token_capacity(&self) -> u64 {
        let split = match (self.input_tokens, self.output_tokens) {
            (Some(i), Some(o)) => Some(i.saturating_add(o)),
            _ => None,
        };
        match (self.tokens, split) {
            (Some(t), Some(s)) => t.min(s),
            (Some(t), None) => t,
            (None, Some(s)) => s,
            (None, None) => u64::MAX,
        }
    }
}

/// Tokens a request is charged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charge {
    pub input: u64,
    pub output: u64,
}

impl Charge {
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// What the current window holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub requests: u32,
    pub input: u64,
    pub output: u64,
}

impl Usage {
    pub fn tokens(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// Names a reservation so it can be settled later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EntryId(u64);

impl EntryId {
    /// An id minted by another store (a shared store names its own entries).
    pub fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    pub fn raw(self) -> u64 {
        self.0
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    at: Duration,
    /// 1 while the request counts; 0 once cancelled (never sent).
    requests: u32,
    charge: Charge,
    /// Settled to actual usage (or cancelled): no longer in flight.
    settled: bool,
}

/// One (region, model) budget.
#[derive(Debug, Clone)]
pub struct Ledger {
    window: Duration,
    limits: Limits,
    entries: VecDeque<Entry>,
    /// Id of `entries[0]`.
    first_id: u64,
    used: Usage,
    /// The part of `used` reserved by requests not yet settled.
    in_flight: Usage,
}

fn add(usage: &mut Usage, requests: u32, charge: Charge) {
    usage.requests += requests;
    usage.input += charge.input;
    usage.output += charge.output;
}

fn sub(usage: &mut Usage, requests: u32, charge: Charge) {
    usage.requests -= requests;
    usage.input -= charge.input;
    usage.output -= charge.output;
}

impl Ledger {
    pub fn new(window: Duration, limits: Limits) -> Self {
        Self {
            window,
            limits,
            entries: VecDeque::new(),
            first_id: 0,
            used: Usage::default(),
            in_flight: Usage::default(),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Changes the limits; what is already spent stays spent.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Drops entries strictly older than the window: an entry exactly `W`
    /// old still counts, matching the strictest upstream reading.
    fn evict(&mut self, now: Duration) {
        while let Some(front) = self.entries.front() {
            if now.saturating_sub(front.at) <= self.window {
                break;
            }
            sub(&mut self.used, front.requests, front.charge);
            if !front.settled {
                sub(&mut self.in_flight, front.requests, front.charge);
            }
            self.entries.pop_front();
            self.first_id += 1;
        }
        self.entries.give_back();
    }

    /// Usage in the window ending at `now`, reservations included.
    pub fn usage(&mut self, now: Duration) -> Usage {
        self.evict(now);
        self.used
    }

    /// The part of [`Ledger::usage`] reserved by requests not yet settled.
    pub fn in_flight(&mut self, now: Duration) -> Usage {
        self.evict(now);
        self.in_flight
    }

    /// Whether `charge` fits right now.
    pub fn fits(&mut self, charge: Charge, now: Duration) -> bool {
        self.evict(now);
        self.limits.fits(self.used, charge)
    }

    /// Reserves `charge` at `now` if it fits.
    pub fn reserve(&mut self, charge: Charge, now: Duration) -> Option<EntryId> {
        if !self.fits(charge, now) {
            return None;
        }
        // Keep the log in time order even if a caller's clock steps back.
        let at = self.entries.back().map_or(now, |last| last.at.max(now));
        self.entries.push_back(Entry {
            at,
            requests: 1,
            charge,
            settled: false,
        });
        add(&mut self.used, 1, charge);
        add(&mut self.in_flight, 1, charge);
        Some(EntryId(self.first_id + self.entries.len() as u64 - 1))
    }

    fn entry_mut(&mut self, id: EntryId) -> Option<&mut Entry> {
        let index = id.0.checked_sub(self.first_id)?;
        self.entries.get_mut(usize::try_from(index).ok()?)
    }

    /// Replaces a reservation with what the request actually used. An entry
    /// already out of the window no longer matters and is ignored.
    pub fn settle(&mut self, id: EntryId, actual: Charge) {
        let Some(entry) = self.entry_mut(id) else {
            return;
        };
        let before = *entry;
        entry.charge = actual;
        entry.settled = true;
        sub(&mut self.used, 0, before.charge);
        add(&mut self.used, 0, actual);
        if !before.settled {
            sub(&mut self.in_flight, before.requests, before.charge);
        }
    }

    /// Records usage admitted elsewhere (another store's entries, known
    /// when this ledger takes over from it) as one settled entry stamped
    /// `at`, counted whatever the limits until it leaves the window. Kept
    /// in time order by stamping it no earlier than the newest entry: an
    /// entry that leaves later is the safe direction, and the ids of the
    /// entries before it do not move.
    pub fn import(&mut self, at: Duration, usage: Usage) {
        let at = self.entries.back().map_or(at, |last| last.at.max(at));
        let charge = Charge {
            input: usage.input,
            output: usage.output,
        };
        self.entries.push_back(Entry {
            at,
            requests: usage.requests,
            charge,
            settled: true,
        });
        add(&mut self.used, usage.requests, charge);
    }

    /// Removes a reservation entirely: the request was never sent.
    pub fn cancel(&mut self, id: EntryId) {
        let Some(entry) = self.entry_mut(id) else {
            return;
        };
        let before = *entry;
        entry.requests = 0;
        entry.charge = Charge::default();
        entry.settled = true;
        sub(&mut self.used, before.requests, before.charge);
        if !before.settled {
            sub(&mut self.in_flight, before.requests, before.charge);
        }
    }

    /// The earliest time at or after `now` when `charge` fits, as entries
    /// age out; `None` if it never can under the current limits.
    pub fn earliest_fit(&mut self, charge: Charge, now: Duration) -> Option<Duration> {
        self.evict(now);
        if !self.limits.admits(charge) {
            return None;
        }
        if self.limits.fits(self.used, charge) {
            return Some(now);
        }
        let mut left = self.used;
        for entry in &self.entries {
            sub(&mut left, entry.requests, entry.charge);
            if self.limits.fits(left, charge) {
                // Out of the closed window one tick after it is `W` old.
                return Some((entry.at + self.window + Duration::from_nanos(1)).max(now));
            }
        }
        Some(now)
    }

    /// When the window will hold nothing (for `*-reset` headers).
    pub fn empty_at(&mut self, now: Duration) -> Duration {
        self.evict(now);
        self.entries
            .back()
            .map_or(now, |last| last.at + self.window + Duration::from_nanos(1))
    }

    /// The fraction of the tightest dimension left after `charge`, in
    /// `[0, 1]`, or `None` if it does not fit now. Routing prefers the
    /// region where this is largest.
    pub fn headroom_after(&mut self, charge: Charge, now: Duration) -> Option<f64> {
        if !self.fits(charge, now) {
            return None;
        }
        let used = self.used;
        let fraction = |used: u64, limit: Option<u64>| {
            limit.map_or(1.0, |max| {
                if max == 0 {
                    0.0
                } else {
                    (max.saturating_sub(used) as f64 / max as f64).clamp(0.0, 1.0)
                }
            })
        };
        let input = used.input + charge.input;
        let output = used.output + charge.output;
        let l = self.limits;
        Some(
            fraction(u64::from(used.requests) + 1, Some(u64::from(l.requests)))
                .min(fraction(input + output, l.tokens))
                .min(fraction(input, l.input_tokens))
                .min(fraction(output, l.output_tokens)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: Duration = Duration::from_secs(60);

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn c(total: u64) -> Charge {
        Charge {
            input: total,
            output: 0,
        }
    }

    #[test]
    fn admits_up_to_the_request_limit_then_frees_after_the_window() {
        let mut l = Ledger::new(W, Limits::new(3, 1_000));
        for i in 0..3 {
            assert!(l.reserve(c(1), secs(i as f64)).is_some());
        }
        assert!(l.reserve(c(1), secs(10.0)).is_none());
        // The first entry (t=0) counts until strictly after t=60.
        assert!(l.reserve(c(1), secs(60.0)).is_none());
        assert_eq!(
            l.earliest_fit(c(1), secs(10.0)),
            Some(W + Duration::from_nanos(1))
        );
        assert!(l.reserve(c(1), W + Duration::from_nanos(1)).is_some());
    }

    #[test]
    fn a_peak_leaves_no_capacity_behind_and_ids_hold() {
        let mut l = Ledger::new(W, Limits::new(20_000, 1_000_000));
        for i in 0..10_000 {
            assert!(l.reserve(c(1), secs(i as f64 / 1_000.0)).is_some());
        }
        let peak = l.entries.capacity();
        let late = l.reserve(c(5), secs(30.0)).unwrap();
        // Once the peak's entries leave the window, so does their room.
        assert_eq!(l.usage(secs(70.5)).requests, 1);
        assert!(
            l.entries.capacity() <= 64,
            "{peak} -> {}",
            l.entries.capacity()
        );
        l.settle(late, c(2));
        assert_eq!(l.usage(secs(70.5)).input, 2);
    }

    #[test]
    fn imported_usage_counts_until_it_leaves_the_window_and_ids_hold() {
        let mut l = Ledger::new(W, Limits::new(4, 1_000));
        let a = l.reserve(c(100), secs(0.0)).unwrap();
        let used = Usage {
            requests: 2,
            input: 300,
            output: 0,
        };
        l.import(secs(5.0), used);
        // Stamped no earlier than the newest entry: never out of order.
        l.import(
            secs(1.0),
            Usage {
                requests: 1,
                ..Usage::default()
            },
        );
        assert_eq!(l.usage(secs(6.0)).requests, 4);
        assert!(
            l.reserve(c(1), secs(6.0)).is_none(),
            "imported room is spent"
        );
        l.settle(a, c(10));
        assert_eq!(
            l.usage(secs(6.0)).input,
            310,
            "the earlier id still names its entry"
        );
        assert_eq!(
            l.in_flight(secs(6.0)),
            Usage::default(),
            "imports are settled"
        );
        // The first leaves after 60 s, the imports after 65 s.
        assert_eq!(l.usage(secs(61.0)).requests, 3);
        assert_eq!(l.usage(secs(65.5)).requests, 0);
    }

    #[test]
    fn tokens_bind_and_refunds_free_room() {
        let mut l = Ledger::new(W, Limits::new(100, 1_000));
        let a = l.reserve(c(700), secs(0.0)).unwrap();
        assert!(l.reserve(c(400), secs(1.0)).is_none());
        l.settle(a, c(200));
        assert!(l.reserve(c(400), secs(1.0)).is_some());
        assert_eq!(l.usage(secs(1.0)).tokens(), 600);
    }

    #[test]
    fn in_flight_counts_only_unsettled_reservations() {
        let mut l = Ledger::new(W, Limits::new(10, 1_000));
        let a = l.reserve(c(100), secs(0.0)).unwrap();
        let b = l.reserve(c(200), secs(0.0)).unwrap();
        assert_eq!(
            l.in_flight(secs(1.0)),
            Usage {
                requests: 2,
                input: 300,
                output: 0
            }
        );
        l.settle(a, c(50));
        l.cancel(b);
        assert_eq!(l.in_flight(secs(1.0)), Usage::default());
        assert_eq!(
            l.usage(secs(1.0)),
            Usage {
                requests: 1,
                input: 50,
                output: 0
            }
        );
        let _c = l.reserve(c(10), secs(1.0)).unwrap();
        assert_eq!(l.in_flight(secs(100.0)), Usage::default(), "evicted");
    }

    #[test]
    fn cancel_returns_the_request_too() {
        let mut l = Ledger::new(W, Limits::new(1, 1_000));
        let a = l.reserve(c(10), secs(0.0)).unwrap();
        assert!(!l.fits(c(1), secs(1.0)));
        l.cancel(a);
        assert!(l.fits(c(1), secs(1.0)));
        assert_eq!(l.usage(secs(1.0)), Usage::default());
    }

    #[test]
    fn split_only_limits_admit_by_dimension() {
        let limits = Limits::split(10, 1_000, 200);
        assert_eq!(limits.token_capacity(), 1_200);
        // Within each dimension, whatever the sum.
        assert!(limits.admits(Charge {
            input: 1_000,
            output: 200
        }));
        // Over one dimension, though the sum fits the capacity.
        assert!(!limits.admits(Charge {
            input: 100,
            output: 201
        }));
        assert!(!limits.admits(Charge {
            input: 1_001,
            output: 0
        }));
        let input_only = Limits {
            output_tokens: None,
            ..limits
        };
        assert_eq!(input_only.token_capacity(), u64::MAX);
        assert!(input_only.admits(Charge {
            input: 1_000,
            output: 1 << 40
        }));
        // The ledger waits for output room alone when only output binds.
        let mut l = Ledger::new(W, limits);
        let big_output = Charge {
            input: 10,
            output: 150,
        };
        assert!(l.reserve(big_output, secs(0.0)).is_some());
        assert!(l.reserve(big_output, secs(1.0)).is_none());
        assert!(l
            .reserve(
                Charge {
                    input: 900,
                    output: 50
                },
                secs(1.0)
            )
            .is_some());
        assert_eq!(
            l.earliest_fit(big_output, secs(2.0)),
            Some(secs(0.0) + W + Duration::from_nanos(1))
        );
    }

    #[test]
    fn split_limits_bind_separately() {
        let limits = Limits {
            requests: 10,
            tokens: None,
            input_tokens: Some(100),
            output_tokens: Some(50),
        };
        let mut l = Ledger::new(W, limits);
        assert!(l
            .reserve(
                Charge {
                    input: 90,
                    output: 10
                },
                secs(0.0)
            )
            .is_some());
        assert!(l
            .reserve(
                Charge {
                    input: 20,
                    output: 0
                },
                secs(0.0)
            )
            .is_none());
        assert!(l
            .reserve(
                Charge {
                    input: 10,
                    output: 40
                },
                secs(0.0)
            )
            .is_some());
        assert!(l
            .reserve(
                Charge {
                    input: 0,
                    output: 1
                },
                secs(0.0)
            )
            .is_none());
    }

    #[test]
    fn never_fits_is_none() {
        let mut l = Ledger::new(W, Limits::new(10, 1_000));
        assert_eq!(l.earliest_fit(c(1_001), secs(0.0)), None);
    }

    #[test]
    fn headroom_prefers_the_emptier_budget() {
        let mut full = Ledger::new(W, Limits::new(10, 1_000));
        let mut empty = Ledger::new(W, Limits::new(10, 1_000));
        full.reserve(c(800), secs(0.0)).unwrap();
        let now = secs(1.0);
        assert!(
            empty.headroom_after(c(100), now).unwrap() > full.headroom_after(c(100), now).unwrap()
        );
        assert_eq!(full.headroom_after(c(300), now), None);
    }

    #[test]
    fn settling_an_expired_entry_is_harmless() {
        let mut l = Ledger::new(W, Limits::new(10, 1_000));
        let a = l.reserve(c(500), secs(0.0)).unwrap();
        let _ = l.usage(secs(120.0));
        l.settle(a, c(900));
        l.cancel(a);
        assert_eq!(l.usage(secs(120.0)), Usage::default());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Advance(u64),
        Reserve {
            input: u64,
            output: u64,
        },
        Settle {
            pick: usize,
            input_pct: u64,
            output_pct: u64,
        },
        Cancel {
            pick: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..30_000).prop_map(Op::Advance),
            (0u64..6_000, 0u64..6_000).prop_map(|(input, output)| Op::Reserve { input, output }),
            (any::<usize>(), 0u64..=150, 0u64..=100).prop_map(|(pick, input_pct, output_pct)| {
                Op::Settle {
                    pick,
                    input_pct,
                    output_pct,
                }
            }),
            any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The window invariant: for every closed window of length W, what
        /// the ledger admitted fits the limits, except for the excess of
        /// actual over reserved input (the estimation error), which is
        /// bounded by that excess. Output never exceeds its reservation
        /// (`max_tokens` caps it).
        #[test]
        fn no_window_is_ever_over_budget(ops in proptest::collection::vec(op(), 1..300),
                                         requests in 1u32..20, tokens in 1_000u64..20_000) {
            let limits = Limits::new(requests, tokens);
            let mut ledger = Ledger::new(W, limits);
            // Shadow log: (time, requests, charge, reserved, id, settled).
            let mut log: Vec<(Duration, u32, Charge, Charge, EntryId, bool)> = Vec::new();
            let mut now = Duration::ZERO;
            for op in ops {
                match op {
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                    Op::Reserve { input, output } => {
                        let charge = Charge { input, output };
                        let fits_before = ledger.fits(charge, now);
                        let earliest = ledger.earliest_fit(charge, now);
                        match ledger.reserve(charge, now) {
                            Some(id) => {
                                prop_assert!(fits_before);
                                prop_assert_eq!(earliest, Some(now));
                                log.push((now, 1, charge, charge, id, false));
                            }
                            None => {
                                prop_assert!(!fits_before);
                                if let Some(t) = earliest {
                                    prop_assert!(t > now);
                                    // Room really comes then (absent other reservations).
                                    let mut probe = ledger.clone();
                                    prop_assert!(probe.fits(charge, t));
                                } else {
                                    prop_assert!(!limits.admits(charge));
                                }
                            }
                        }
                    }
                    Op::Settle { pick, input_pct, output_pct } if !log.is_empty() => {
                        let i = pick % log.len();
                        let reserved = log[i].3;
                        // A request is settled once, or cancelled instead.
                        if log[i].1 == 0 || log[i].5 { continue; }
                        let actual = Charge {
                            input: reserved.input * input_pct / 100,
                            output: reserved.output * output_pct / 100,
                        };
                        ledger.settle(log[i].4, actual);
                        log[i].2 = actual;
                        log[i].5 = true;
                    }
                    Op::Cancel { pick } if !log.is_empty() => {
                        let i = pick % log.len();
                        if log[i].5 { continue; }
                        ledger.cancel(log[i].4);
                        log[i].1 = 0;
                        log[i].2 = Charge::default();
                    }
                    _ => {}
                }
            }
            for &(start, ..) in &log {
                let in_window = log.iter().filter(|e| e.0 >= start && e.0 <= start + W);
                let (mut reqs, mut toks, mut excess) = (0u32, 0u64, 0u64);
                for e in in_window {
                    reqs += e.1;
                    toks += e.2.total();
                    excess += e.2.input.saturating_sub(e.3.input);
                }
                prop_assert!(reqs <= requests, "{} requests in a window", reqs);
                prop_assert!(toks <= tokens + excess, "{} tokens in a window (excess {})", toks, excess);
            }
        }
    }
}
