//! How fast open batches are finishing, and when each should be done: the
//! live page's batch progress and ETA.
//!
//! Why a measured rate and not a configured one: a batch runs on what
//! interactive traffic leaves of the quota (the scheduler admits batch work
//! only behind interactive waiters, and shares hold it to what interactive
//! demand leaves), so its pace is set by everyone else's traffic and
//! changes by the minute. The only honest forecast is the recent past: the
//! items of open batches that ran to a result (succeeded or errored; not
//! those canceled or expired, which take no work) over the last
//! [`RATE_WINDOW`], from the store's own counters, so with several
//! replicas it is the whole fleet's pace, not this replica's.
//!
//! The runner claims items in batch order (`ORDER BY batch_seq, idx`), so
//! a batch is done once it and every batch ahead of it are: its ETA is the
//! items still open up to and including it, divided by the rate. Items
//! retried later (`not_before`) can let a later batch finish first; the
//! ETA is then a little pessimistic for it. No rate yet (the first look,
//! or nothing finished in the window): no ETA, rather than a guess.
//!
//! Samples are taken when someone looks (the page's feed, once a second);
//! [`Rates`] keeps at most one a [`MIN_SPACING`] and none older than the
//! window, so its memory is bounded by the window over the spacing times
//! the listed batches.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::store::OpenBatch;

/// How far back the rate looks.
pub const RATE_WINDOW: Duration = Duration::from_secs(30);
/// Samples closer together than this are not kept (one snapshot read
/// twice, or several pages asking in the same moment).
pub const MIN_SPACING: Duration = Duration::from_millis(500);

/// One look at the open batches: by id, (items that ran to a result,
/// items not finished).
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    batches: HashMap<String, (i64, i64)>,
}

impl Sample {
    fn of(at: Instant, open: &[OpenBatch]) -> Self {
        Self {
            at,
            batches: open
                .iter()
                .map(|b| {
                    let p = &b.progress;
                    (b.id.clone(), (p.succeeded + p.errored, p.processing()))
                })
                .collect(),
        }
    }
}

/// Items that ran to a result between `old` and `new`: what each batch in
/// both moved, plus, for a batch in `old` that is gone from `new` (it
/// ended: the listed batches are a prefix in claim order, so none leaves
/// it otherwise), the items it still had open.
fn finished_between(old: &Sample, new: &Sample) -> i64 {
    old.batches
        .iter()
        .map(|(id, (done, open))| match new.batches.get(id) {
            Some((now_done, _)) => (now_done - done).max(0),
            None => *open,
        })
        .sum()
}

/// The ETA of each batch of `open` (in claim order) at `per_sec` items a
/// second: the items open up to and including it over the rate.
pub fn etas(open: &[OpenBatch], per_sec: Option<f64>) -> Vec<Option<Duration>> {
    let mut ahead = 0i64;
    open.iter()
        .map(|b| {
            ahead += b.progress.processing();
            per_sec
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(ahead as f64 / r))
        })
        .collect()
}

/// The recent looks at the open batches, for [`Rates::rate`].
#[derive(Debug, Default)]
pub struct Rates {
    samples: Mutex<VecDeque<Sample>>,
}

impl Rates {
    /// Records what the store showed at `at` (when the snapshot was read)
    /// and returns the items finished a second over about the last
    /// [`RATE_WINDOW`], or `None` while the samples span less than
    /// [`MIN_SPACING`] × 2.
    pub fn rate(&self, at: Instant, open: &[OpenBatch]) -> Option<f64> {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        // Looks from long ago (nobody watched for a while) say nothing
        // about the pace now.
        samples.retain(|s| at.saturating_duration_since(s.at) < RATE_WINDOW * 2);
        if samples
            .back()
            .is_none_or(|s| at.saturating_duration_since(s.at) >= MIN_SPACING)
        {
            samples.push_back(Sample::of(at, open));
        }
        // The baseline is the newest sample at least a window old (or the
        // oldest there is): drop the ones before it.
        while samples.len() > 2 && at.saturating_duration_since(samples[1].at) >= RATE_WINDOW {
            samples.pop_front();
        }
        let (oldest, newest) = (samples.front()?, samples.back()?);
        let span = newest.at.saturating_duration_since(oldest.at);
        if span < MIN_SPACING * 2 {
            return None;
        }
        Some(finished_between(oldest, newest) as f64 / span.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::store::BatchProgress;

    fn batch(id: &str, total: i64, succeeded: i64, errored: i64, canceled: i64) -> OpenBatch {
        OpenBatch {
            id: id.into(),
            tenant: "t".into(),
            status: "in_progress".into(),
            progress: BatchProgress {
                created_at: 0,
                total,
                succeeded,
                errored,
                canceled,
                expired: 0,
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_counts_results_over_the_window_including_batches_that_ended() {
        let rates = Rates::default();
        let t0 = Instant::now();
        assert_eq!(
            rates.rate(t0, &[batch("a", 10, 2, 0, 0), batch("b", 10, 0, 0, 0)]),
            None
        );
        // Too close to the last sample: not kept, still no rate.
        assert_eq!(
            rates.rate(t0 + Duration::from_millis(100), &[batch("a", 10, 3, 0, 0)]),
            None
        );
        // 10 s later: a finished its 8 open items (and left the list), b
        // ran 1 and errored 1, and had 3 canceled (no work: not counted).
        let rate = rates.rate(t0 + Duration::from_secs(10), &[batch("b", 10, 1, 1, 3)]);
        assert_eq!(rate, Some(1.0));
        // Past the window the first sample is dropped; the baseline moves.
        let rate = rates.rate(t0 + Duration::from_secs(45), &[batch("b", 10, 8, 1, 3)]);
        assert_eq!(rate, Some(7.0 / 35.0));
        assert!(rates.samples.lock().unwrap().len() <= 2);
        // After a long look away the old samples are forgotten.
        assert_eq!(
            rates.rate(t0 + Duration::from_secs(600), &[batch("b", 10, 9, 1, 3)]),
            None
        );
    }

    #[test]
    fn each_batch_waits_for_the_ones_ahead_of_it() {
        let open = [batch("a", 10, 6, 0, 0), batch("b", 20, 0, 0, 0)];
        let etas = etas(&open, Some(2.0));
        assert_eq!(
            etas,
            [Some(Duration::from_secs(2)), Some(Duration::from_secs(12))]
        );
        assert_eq!(super::etas(&open, None), [None, None]);
        assert_eq!(super::etas(&open, Some(0.0)), [None, None]);
    }
}
