//! Where a replica's local share starts when Redis fails: from what the
//! fleet had spent, not from an empty window.
//!
//! The fallback ledger holds 1/N of each budget B. Started empty, it let
//! the window that straddled a failover hold what Redis had admitted (up to
//! B) plus N fresh shares (B again): up to 2B. So each replica keeps a
//! picture of every budget's window and seeds its local ledger from it:
//!
//! - **The window as last seen**, `W` cut in [`SLICES`] parts by stamp,
//!   each summed and stamped with its newest entry (`lua/window.lua`),
//!   fetched every 250 ms while healthy. Seeded at 1/N (rounded up over
//!   every suffix, so at every later time what is still in the window is
//!   at least 1/N of what the fleet's entries still hold): for the rest of
//!   the window each replica has (B − known usage)/N, growing back to B/N
//!   as the known entries leave the window when the shared ones do.
//! - **This replica's own recent grants**, exactly (stamp and size, a
//!   lease's whole room), every one made in the last [`STALE`] before the
//!   failover, seeded in full. What the picture misses is what was granted
//!   after it was taken, and each grant is known exactly to the replica
//!   that made it; every live replica's picture is at most [`STALE`] old
//!   when Redis dies (it checks its own at failover), so the grants no
//!   picture shows are all among these.
//!
//! **The bound.** In any window after the failover, what reaches Vertex
//! is what Redis had admitted and is still in it (E), plus each replica's
//! local admissions, at most B/N less its seed. The seeds add up to at
//! least E: the pictures' part (1/N of each replica's picture) covers what
//! the pictures show, and the own grants cover, in full, everything newer.
//! So a window holds at most B — except that a replica's room cannot go
//! below zero: one whose own grants in the last [`STALE`] exceeded its
//! remaining share does not make the others hold back for it. That excess
//! is at most what the fleet admitted in the [`STALE`] before the failover
//! beyond an even split, less than 5% of B whenever the fleet's busiest
//! [`STALE`] admits under 5% of B more on one replica than on another (B
//! per minute: any traffic below 6 × B per minute that the load balancer
//! spreads; DEPLOYMENT.md). Rounding (a share is ⌊B/N⌋, seeds round up)
//! only ever holds back.
//!
//! **Redis back empty.** The same picture is what a Redis that restarted
//! without its data is given back (`resilient.rs`, by the first replica to
//! see its `epoch` key gone), with each replica's own grants made after it.
//!
//! A picture older than [`STALE`] at failover (the refresh starved, or the
//! replica never reached Redis) cannot be trusted to bound what others did:
//! the replica then holds its whole share as spent for one window
//! ([`seeds`]), except a replica that never saw Redis at all, which has
//! nothing to bound (it starts with its plain 1/N, as before).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spillway_core::ledger::{Limits, Usage};
use spillway_core::QuotaGroup;

/// Parts a window is cut into for the picture.
pub const SLICES: u32 = 16;
/// The oldest a picture may be at failover; also how far back a replica's
/// own grants are seeded in full.
pub const STALE: Duration = Duration::from_millis(1_000);

/// Usage stamped at a time: a part of a window, or one grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub at: Duration,
    pub usage: Usage,
}

/// A bucket, (bucket group, location).
pub type Bucket = (QuotaGroup, Arc<str>);

/// Every budget's window as Redis held it at `taken` (its clock).
#[derive(Debug, Clone, Default)]
pub struct Picture {
    pub taken: Duration,
    pub budgets: Vec<(Bucket, Vec<Part>)>,
}

/// A grant Redis made this replica: when, on which bucket, its entry.
#[derive(Debug, Clone)]
struct OwnGrant {
    granted: Duration,
    bucket: Bucket,
    entry: Part,
}

/// This replica's grants of the last [`STALE`] or so (pruned as it records).
#[derive(Debug, Default)]
pub struct OwnGrants {
    log: Mutex<VecDeque<OwnGrant>>,
}

impl OwnGrants {
    /// Records an entry Redis created for this replica at `granted`.
    pub fn record(&self, bucket: Bucket, entry: Part, granted: Duration) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        while log
            .front()
            .is_some_and(|g| granted.saturating_sub(g.granted) > STALE * 2)
        {
            log.pop_front();
        }
        log.push_back(OwnGrant {
            granted,
            bucket,
            entry,
        });
    }

    /// The entries granted at or after `since`.
    pub fn since(&self, since: Duration) -> Vec<(Bucket, Part)> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter()
            .filter(|g| g.granted >= since)
            .map(|g| (g.bucket.clone(), g.entry))
            .collect()
    }
}

fn div_ceil(v: u64, n: u64) -> u64 {
    v.div_ceil(n.max(1))
}

/// 1/N of a window's parts (oldest first), each suffix rounded up: at any
/// time, what is left of the result is at least 1/N of what is left of
/// `parts`, and the whole is ⌈total/N⌉ in each figure.
pub fn scaled(parts: &[Part], n: u32) -> Vec<Part> {
    let n = u64::from(n.max(1));
    let mut out = Vec::with_capacity(parts.len());
    let mut suffix = (0u64, 0u64, 0u64);
    let mut given = (0u64, 0u64, 0u64);
    for p in parts.iter().rev() {
        suffix.0 += u64::from(p.usage.requests);
        suffix.1 = suffix.1.saturating_add(p.usage.input);
        suffix.2 = suffix.2.saturating_add(p.usage.output);
        let want = (
            div_ceil(suffix.0, n),
            div_ceil(suffix.1, n),
            div_ceil(suffix.2, n),
        );
        let usage = Usage {
            requests: u32::try_from(want.0 - given.0).unwrap_or(u32::MAX),
            input: want.1 - given.1,
            output: want.2 - given.2,
        };
        given = want;
        if usage != Usage::default() {
            out.push(Part { at: p.at, usage });
        }
    }
    out.reverse();
    out
}

/// What one bucket's local ledger starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub bucket: Bucket,
    pub parts: Vec<Part>,
}

/// The seeds for a failover at `now` (Redis's clock, as followed here):
/// `picture` (if any) scaled to 1/N and this replica's own grants since
/// `now − STALE` in full, per bucket, oldest first. A picture older than
/// [`STALE`] seeds each bucket's whole local share (`shares`) at `now`
/// instead: nothing bounds what the others admitted since it was taken.
pub fn seeds(
    picture: Option<&Picture>,
    own: &OwnGrants,
    shares: &[(Bucket, Limits)],
    n: u32,
    now: Duration,
) -> Vec<Seed> {
    let Some(picture) = picture else {
        return Vec::new();
    };
    if now.saturating_sub(picture.taken) > STALE {
        return shares
            .iter()
            .map(|(bucket, share)| Seed {
                bucket: bucket.clone(),
                parts: vec![Part {
                    at: now,
                    usage: whole(*share),
                }],
            })
            .collect();
    }
    let mine = own.since(now.saturating_sub(STALE));
    let mut out: Vec<Seed> = Vec::new();
    for (bucket, parts) in &picture.budgets {
        let mut all = scaled(parts, n);
        all.extend(mine.iter().filter(|(b, _)| b == bucket).map(|(_, p)| *p));
        all.sort_by_key(|p| p.at);
        if !all.is_empty() {
            out.push(Seed {
                bucket: bucket.clone(),
                parts: all,
            });
        }
    }
    out
}

/// A whole share as usage: all of its requests spent.
fn whole(share: Limits) -> Usage {
    Usage {
        requests: share.requests,
        ..Usage::default()
    }
}

/// The part of `seeded` still in a window of length `window` at `now`
/// (the ledger drops an entry once it is strictly older than the window).
pub fn still_in_window(seeded: &[Part], window: Duration, now: Duration) -> Usage {
    let mut u = Usage::default();
    for p in seeded.iter().filter(|p| now.saturating_sub(p.at) <= window) {
        u.requests = u.requests.saturating_add(p.usage.requests);
        u.input = u.input.saturating_add(p.usage.input);
        u.output = u.output.saturating_add(p.usage.output);
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn req(at: u64, requests: u32) -> Part {
        Part {
            at: ms(at),
            usage: Usage {
                requests,
                input: u64::from(requests) * 10,
                output: 0,
            },
        }
    }

    fn left(parts: &[Part], from: Duration) -> u32 {
        parts
            .iter()
            .filter(|p| p.at >= from)
            .map(|p| p.usage.requests)
            .sum()
    }

    #[test]
    fn a_scaled_window_keeps_a_share_of_every_suffix() {
        let parts = [
            req(0, 5),
            req(100, 1),
            req(200, 7),
            req(300, 1),
            req(400, 2),
        ];
        for n in 1..=5 {
            let s = scaled(&parts, n);
            let total: u32 = s.iter().map(|p| p.usage.requests).sum();
            assert_eq!(total, 16u32.div_ceil(n), "n = {n}");
            for from in [0, 100, 200, 300, 400, 500] {
                // What is left at any time is at least 1/N of what the
                // fleet's entries leave.
                let fleet = left(&parts, ms(from));
                assert!(
                    u64::from(left(&s, ms(from))) * u64::from(n) >= u64::from(fleet),
                    "n = {n}, from {from}: {s:?}"
                );
            }
        }
    }

    #[test]
    fn own_grants_since_the_picture_are_seeded_whole_and_a_stale_picture_holds_everything() {
        let bucket: Bucket = ("haiku".into(), Arc::from("us-central1"));
        let own = OwnGrants::default();
        own.record(bucket.clone(), req(8_000, 4), ms(8_000));
        own.record(bucket.clone(), req(9_100, 3), ms(9_100));
        own.record(bucket.clone(), req(9_950, 2), ms(9_900));
        let picture = Picture {
            taken: ms(9_800),
            budgets: vec![(
                bucket.clone(),
                vec![req(1_000, 5), req(8_000, 4), req(9_100, 3)],
            )],
        };
        let share = Limits::new(10, 1_000);
        let shares = [(bucket.clone(), share)];
        let s = seeds(Some(&picture), &own, &shares, 3, ms(10_000));
        assert_eq!(s.len(), 1);
        // 12 seen / 3 = 4, plus the grant made after the picture (2) and the
        // one of the last STALE the others' pictures may miss (3); not the
        // older one (4), which every live picture shows.
        assert_eq!(left(&s[0].parts, ms(0)), 4 + 2 + 3, "{s:?}");
        assert!(s[0].parts.windows(2).all(|w| w[0].at <= w[1].at));

        let stale = seeds(Some(&picture), &own, &shares, 3, ms(9_800) + STALE + ms(1));
        assert_eq!(stale[0].parts.len(), 1);
        assert_eq!(stale[0].parts[0].usage.requests, 10, "the whole share");
        assert!(seeds(None, &own, &shares, 3, ms(10_000)).is_empty());
    }

    #[test]
    fn what_is_written_back_leaves_out_the_seed_still_in_the_window() {
        let parts = [req(0, 2), req(5_000, 3)];
        assert_eq!(still_in_window(&parts, ms(10_000), ms(9_000)).requests, 5);
        assert_eq!(still_in_window(&parts, ms(10_000), ms(10_000)).requests, 5);
        assert_eq!(still_in_window(&parts, ms(10_000), ms(10_001)).requests, 3);
    }
}
