//! State read from the stores for operators, without waiting on them.
//!
//! `/metrics`, `/admin/quotas` and so `spillway status` show budgets (from
//! the quota store, Redis with several replicas) and batch counts (from the
//! batch store, PostgreSQL). A scrape must not wait on either: Prometheus
//! gives up after 10 s and loses every quota metric with it, exactly when an
//! operator needs them. So each is a [`Snapshot`]: a read starts one refresh
//! in the background (never two at once, each bounded by [`REFRESH_LIMIT`]),
//! waits at most [`READ_WAIT`] for it, and otherwise answers with the last
//! value; `spillway_state_age_seconds{source}` says how old that is.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use spillway_core::store::BudgetState;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::batch::runner::BatchSnapshot;

/// How long a read waits for a fresh value before answering with the last.
pub const READ_WAIT: Duration = Duration::from_millis(50);
/// How long one refresh may take before it is given up.
pub const REFRESH_LIMIT: Duration = Duration::from_secs(5);

/// A value and when it was read.
#[derive(Debug)]
pub struct Stamped<T> {
    pub at: Instant,
    pub value: T,
}

/// The last value of something slow to read, refreshed on demand.
pub struct Snapshot<T> {
    last: watch::Sender<Option<Arc<Stamped<T>>>>,
    refreshing: AtomicBool,
}

impl<T: Send + Sync + 'static> Default for Snapshot<T> {
    fn default() -> Self {
        Self {
            last: watch::Sender::new(None),
            refreshing: AtomicBool::new(false),
        }
    }
}

impl<T: Send + Sync + 'static> Snapshot<T> {
    /// The freshest value available within `wait`. `fetch` is called (and
    /// its future run on a task of its own) only when no refresh is already
    /// running; `None` from it keeps the last value.
    pub async fn read<F, Fut>(self: &Arc<Self>, fetch: F, wait: Duration) -> Option<Arc<Stamped<T>>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Option<T>> + Send + 'static,
    {
        let mut changed = self.last.subscribe();
        changed.mark_unchanged();
        if !self.refreshing.swap(true, Ordering::AcqRel) {
            let (me, fetching) = (Arc::clone(self), fetch());
            tokio::spawn(async move {
                if let Ok(Some(value)) = tokio::time::timeout(REFRESH_LIMIT, fetching).await {
                    me.last.send_replace(Some(Arc::new(Stamped {
                        at: Instant::now(),
                        value,
                    })));
                }
                me.refreshing.store(false, Ordering::Release);
            });
        }
        let _ = tokio::time::timeout(wait, changed.changed()).await;
        self.last.borrow().clone()
    }
}

/// Every snapshot operators read.
#[derive(Default)]
pub struct Snapshots {
    pub budgets: Arc<Snapshot<Vec<BudgetState>>>,
    pub batches: Arc<Snapshot<BatchSnapshot>>,
}

/// Seconds since `at`, for the age gauge; a value never read is as old as
/// the process.
pub fn age_secs<T>(read: &Option<Arc<Stamped<T>>>, started: Instant) -> f64 {
    let since = read.as_ref().map_or(started, |s| s.at);
    since.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stalled_store_is_answered_from_the_last_value_in_time() {
        let snap: Arc<Snapshot<u32>> = Arc::default();
        let first = snap.read(|| async { Some(1) }, READ_WAIT).await;
        assert_eq!(first.unwrap().value, 1);
        // The store stalls: the read answers after READ_WAIT with the last value.
        let started = Instant::now();
        let stale = snap
            .read(
                || async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Some(2)
                },
                READ_WAIT,
            )
            .await;
        assert_eq!(started.elapsed(), READ_WAIT);
        assert_eq!(stale.unwrap().value, 1);
        // While that refresh hangs, no second one starts.
        let fetched = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&fetched);
        snap.read(
            move || {
                f.store(true, Ordering::Relaxed);
                async { Some(3) }
            },
            READ_WAIT,
        )
        .await;
        assert!(!fetched.load(Ordering::Relaxed));
        // The hung refresh is given up at REFRESH_LIMIT; the next read refreshes.
        tokio::time::sleep(REFRESH_LIMIT).await;
        let fresh = snap.read(|| async { Some(4) }, READ_WAIT).await;
        assert_eq!(fresh.unwrap().value, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_the_last_value() {
        let snap: Arc<Snapshot<u32>> = Arc::default();
        assert!(snap.read(|| async { None }, READ_WAIT).await.is_none());
        snap.read(|| async { Some(7) }, READ_WAIT).await;
        let kept = snap.read(|| async { None }, READ_WAIT).await;
        assert_eq!(kept.unwrap().value, 7);
    }
}
