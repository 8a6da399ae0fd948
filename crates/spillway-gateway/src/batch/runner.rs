//! The worker loop: batch items through the real request path.
//!
//! [`BatchService::run`] keeps at most `batch.concurrency` items in flight.
//! Whenever a slot is free it claims more from the store (each claim is a
//! lease: this process's owner id and an expiry, renewed every third of the
//! lease while it runs), and runs each claimed item as one
//! [`Call`] at [`Priority::Batch`] for the tenant
//! that submitted it, through the same [`Forwarder`] as interactive
//! requests. The forwarder's answer is used as it is: a unary Message is
//! stored as the result, and the [`ForwardError`]'s variant says whether to
//! try again; no HTTP response is built or read on the way. The scheduler only admits a batch request when no
//! interactive request of its model is waiting, so:
//!
//! - interactive traffic waits at most for the batch requests already
//!   admitted (one admission decision), never for queued batch items;
//! - when interactive traffic is idle, the waiting batch items take every
//!   bit of quota as it frees, in whichever region has it.
//!
//! What an item's outcome means:
//!
//! | outcome | then |
//! |---|---|
//! | 200 | `succeeded`, with the Message |
//! | no quota before the item's deadline (429 from the scheduler, or upstream 429 with no region left) | back to `pending` until the quota is expected; the attempt is refunded |
//! | 5xx, 529, timeout, unreachable (after the forwarder's own region fallback) | back to `pending` after a jittered exponential backoff; after `max_item_attempts`, `errored` |
//! | any other error (400, 404, ...) | `errored` at once: retrying cannot help |
//!
//! A separate maintenance task renews leases, expires what is left of
//! batches past their 24 hours, and purges batches past retention.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use rand::Rng;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use spillway_vertex::{validate, Operation};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::store::{BatchStore, ClaimedItem, Finish, PgStore, SqliteStore};
use super::{BatchClock, BatchError};
use crate::answer::{Answer, ForwardError};
use crate::auth::Keys;
use crate::config::{BatchSettings, BatchStoreKind};
use crate::error::ApiError;
use crate::forwarder::{Call, CallRequest, Forwarded, Forwarder, Pacing};
use crate::request_id::{new_request_id, RequestId};
use crate::scheduler::Priority;

/// Items finished since this process started, by result.
#[derive(Debug, Default)]
struct Completed {
    succeeded: AtomicI64,
    errored: AtomicI64,
    canceled: AtomicI64,
    expired: AtomicI64,
}

/// What the metrics module reads: cheap, one store query or two.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchSnapshot {
    /// Batches by processing status: `in_progress`, `canceling`, `ended`.
    pub batches: Vec<(&'static str, i64)>,
    /// Items finished since start, by result (monotonic).
    pub completed: Vec<(&'static str, i64)>,
    /// Items of unfinished batches still to finish: the batch queue depth.
    pub open_items: i64,
    /// The oldest batch in progress, if any: the one being worked on.
    pub oldest_running: Option<super::store::BatchProgress>,
    /// The first unfinished batches, in the runner's claim order.
    pub open: Vec<super::store::OpenBatch>,
}

/// The batch store, the runner's state and the clock, shared by the API
/// handlers and the runner.
pub struct BatchService {
    store: Arc<dyn BatchStore>,
    clock: BatchClock,
    settings: BatchSettings,
    /// This process's lease owner id.
    owner: String,
    wake: Notify,
    /// Some batch stopped running (canceled, expired): paced items recheck.
    changed: Notify,
    completed: Completed,
    /// Upstream attempts of batch items since start (items sent again after
    /// a crash count again).
    attempts: AtomicI64,
    pacer: Pacer,
    /// Recent looks at the open batches, for their rate and ETAs.
    progress: super::progress::Rates,
}

impl BatchService {
    /// Opens the configured store (creating the SQLite file or the
    /// PostgreSQL tables on first start) and takes back what a previous
    /// process of a single-node store left in flight.
    pub async fn open(settings: &BatchSettings) -> Result<Self, BatchError> {
        let store: Arc<dyn BatchStore> = match settings.store {
            BatchStoreKind::Sqlite => {
                let store = SqliteStore::open(&settings.sqlite_path).await?;
                let reclaimed = store.reclaim_all().await?;
                if reclaimed > 0 {
                    tracing::warn!(
                        items = reclaimed,
                        "batch items were in flight when Spillway last stopped; they will be sent again"
                    );
                }
                Arc::new(store)
            }
            BatchStoreKind::Postgres => Arc::new(
                PgStore::connect(&settings.postgres_url, settings.postgres_max_connections).await?,
            ),
        };
        Ok(Self::with_store(store, settings.clone()))
    }

    /// A service over an already opened store.
    pub fn with_store(store: Arc<dyn BatchStore>, settings: BatchSettings) -> Self {
        let owner = format!(
            "spillway-{}-{}",
            std::process::id(),
            &new_request_id()[4..16]
        );
        Self {
            store,
            clock: BatchClock::new(),
            settings,
            owner,
            wake: Notify::new(),
            changed: Notify::new(),
            completed: Completed::default(),
            attempts: AtomicI64::new(0),
            pacer: Pacer::default(),
            progress: Default::default(),
        }
    }

    pub fn store(&self) -> &Arc<dyn BatchStore> {
        &self.store
    }

    /// The open batches' completion rate, from the looks taken so far.
    pub fn progress(&self) -> &super::progress::Rates {
        &self.progress
    }

    pub fn settings(&self) -> &BatchSettings {
        &self.settings
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Tells the runner there may be new work (a new batch).
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// Counts items canceled by a client's cancel, and wakes the items of
    /// the batch that wait for their turn.
    pub(crate) fn canceled(&self, n: i64) {
        self.completed.canceled.fetch_add(n, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// The base of `results_url`: `batch.public_url` if set, else the
    /// configured listen address, else (listening on an unspecified address
    /// or port 0) the `Host` the client used.
    pub fn base_url(
        &self,
        scheme: &str,
        listen: std::net::SocketAddr,
        headers: &HeaderMap,
    ) -> String {
        if !self.settings.public_url.is_empty() {
            return self.settings.public_url.trim_end_matches('/').to_string();
        }
        if !listen.ip().is_unspecified() && listen.port() != 0 {
            return format!("{scheme}://{listen}");
        }
        match headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| h.parse::<http::uri::Authority>().is_ok())
        {
            Some(host) => format!("{scheme}://{host}"),
            None => format!("{scheme}://{listen}"),
        }
    }

    /// Batch counts, items finished and queue depth.
    pub async fn snapshot(&self) -> Result<BatchSnapshot, BatchError> {
        let stats = self.store.stats().await?;
        let c = &self.completed;
        Ok(BatchSnapshot {
            batches: stats.batches,
            completed: vec![
                ("succeeded", c.succeeded.load(Ordering::Relaxed)),
                ("errored", c.errored.load(Ordering::Relaxed)),
                ("canceled", c.canceled.load(Ordering::Relaxed)),
                ("expired", c.expired.load(Ordering::Relaxed)),
            ],
            open_items: stats.open_items,
            oldest_running: stats.oldest_running,
            open: stats.open,
        })
    }

    /// Upstream attempts of batch items since start.
    pub fn attempts(&self) -> i64 {
        self.attempts.load(Ordering::Relaxed)
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(self.settings.lease_secs)
    }

    /// Runs batch items until `shutdown` resolves. In-flight items are then
    /// dropped and their leases given up, so they run again at the next start
    /// (or on another replica at once).
    pub async fn run(
        self: Arc<Self>,
        forwarder: Arc<Forwarder>,
        keys: Arc<Keys>,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let maintenance = tokio::spawn(Arc::clone(&self).maintain_forever());
        tokio::pin!(shutdown);
        let mut tasks = JoinSet::new();
        let concurrency = self.settings.concurrency;
        let poll = Duration::from_millis(self.settings.poll_ms);
        loop {
            let free = concurrency.saturating_sub(tasks.len());
            let mut idle = false;
            if free > 0 {
                let now = self.clock.now_ms();
                let lease_until = now + self.lease().as_millis() as i64;
                match self
                    .store
                    .claim(&self.owner, now, lease_until, free as i64)
                    .await
                {
                    Ok(items) => {
                        idle = items.len() < free;
                        for item in items {
                            let (forwarder, keys) = (Arc::clone(&forwarder), Arc::clone(&keys));
                            tasks.spawn(Arc::clone(&self).run_item(forwarder, keys, item));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "claiming batch items failed; retrying");
                        idle = true;
                    }
                }
            }
            if !idle && tasks.len() < concurrency {
                continue;
            }
            tokio::select! {
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = self.wake.notified(), if idle => {}
                _ = tokio::time::sleep(poll), if idle => {}
                _ = &mut shutdown => break,
            }
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        maintenance.abort();
        if let Err(e) = self.store.renew(&self.owner, 0).await {
            tracing::warn!(error = %e, "could not give up batch leases at shutdown");
        }
    }

    async fn maintain_forever(self: Arc<Self>) {
        let every = (self.lease() / 3).min(Duration::from_secs(5));
        let retention = Duration::from_secs(u64::from(self.settings.retention_days) * 86_400);
        loop {
            tokio::time::sleep(every).await;
            let now = self.clock.now_ms();
            if let Err(e) = self
                .store
                .renew(&self.owner, now + self.lease().as_millis() as i64)
                .await
            {
                tracing::error!(error = %e, "renewing batch leases failed");
            }
            let purge_before = now - retention.as_millis() as i64;
            let stale_upload_before = now - 3_600_000;
            match self
                .store
                .maintain(now, purge_before, stale_upload_before)
                .await
            {
                Ok(report) => {
                    self.completed
                        .expired
                        .fetch_add(report.expired_items as i64, Ordering::Relaxed);
                    self.completed
                        .canceled
                        .fetch_add(report.canceled_items as i64, Ordering::Relaxed);
                    if report.expiring_batches > 0 {
                        self.changed.notify_waiters();
                    }
                    if report.expired_items + report.purged_batches + report.dropped_uploads > 0 {
                        tracing::info!(
                            expired_items = report.expired_items,
                            purged_batches = report.purged_batches,
                            dropped_uploads = report.dropped_uploads,
                            "batch maintenance"
                        );
                    }
                }
                Err(e) => tracing::error!(error = %e, "batch maintenance failed"),
            }
        }
    }

    async fn run_item(
        self: Arc<Self>,
        forwarder: Arc<Forwarder>,
        keys: Arc<Keys>,
        item: ClaimedItem,
    ) {
        let step = self.execute(&forwarder, &keys, &item).await;
        let now = self.clock.now_ms();
        let recorded = match step {
            Step::Done(finish, result) => self.finish(&item, finish, &result, now).await,
            Step::Skip => self
                .store
                .release(item.key, &self.owner, now, true)
                .await
                .map(|_| ()),
            Step::Retry {
                after,
                refund,
                error,
            } => {
                if !refund && item.attempts >= i64::from(self.settings.max_item_attempts) {
                    self.finish(&item, Finish::Errored, &error, now).await
                } else {
                    let after = if refund {
                        after
                    } else {
                        backoff(&self.settings, item.attempts)
                    };
                    self.store
                        .release(
                            item.key,
                            &self.owner,
                            now + after.as_millis() as i64,
                            refund,
                        )
                        .await
                        .map(|_| ())
                }
            }
        };
        if let Err(e) = recorded {
            // The lease runs out and the item runs again: at least once.
            tracing::error!(error = %e, batch = %item.batch_id, custom_id = %item.custom_id, "recording a batch item failed");
        }
    }

    async fn finish(
        &self,
        item: &ClaimedItem,
        finish: Finish,
        result: &str,
        now: i64,
    ) -> Result<(), BatchError> {
        let recorded = self
            .store
            .complete(item.key, &self.owner, finish, result, now)
            .await?;
        if recorded {
            let counter = match finish {
                Finish::Succeeded => &self.completed.succeeded,
                Finish::Errored => &self.completed.errored,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        } else {
            tracing::warn!(batch = %item.batch_id, custom_id = %item.custom_id, "batch item was taken over before it finished; its other result stands");
        }
        Ok(())
    }
}

/// Spaces batch admissions evenly at the rate of the quota they draw on.
///
/// The upstream quota is a sliding window: a burst of N admissions at once
/// fills it, and nothing frees until the whole window has passed. If batch
/// items took idle quota in bursts, an interactive request arriving just
/// after would wait up to a window. Paced, batch admissions are one *refill
/// interval* (window / requests per window, or the item's share of the
/// token budget) apart, so the window frees a slot every interval; the
/// scheduler gives each freed slot to a waiting interactive request first.
/// Interactive requests therefore wait at most about one refill interval
/// for quota a batch holds, and with no interactive traffic the batch still
/// runs at the full rate of the quota.
#[derive(Default)]
struct Pacer {
    /// Next free slot per pace key (model and locations).
    next: std::sync::Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
}

impl Pacer {
    /// Takes the gate for `pacing` if it is open (`None`: go now), else says
    /// when it opens. Waiting items hold no slot, so items that never go
    /// (canceled, expired) cost the batch nothing.
    fn try_go(&self, pacing: &Pacing) -> Option<tokio::time::Instant> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        let slot = next.entry(pacing.key.clone()).or_insert(now);
        if *slot > now {
            return Some(*slot);
        }
        // Keep the cadence across timer lateness; after idleness, no credit.
        let base = if now.duration_since(*slot) < pacing.spacing {
            *slot
        } else {
            now
        };
        *slot = base + pacing.spacing;
        None
    }

    /// Gives back the slot just taken (the item turned out not to go).
    fn undo(&self, pacing: &Pacing) {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = next.get_mut(&pacing.key) {
            *slot -= pacing.spacing;
        }
    }
}

/// `retry_base_ms · 2^(attempt-1)`, at most `retry_max_ms`, minus up to 25% jitter.
fn backoff(settings: &BatchSettings, attempts: i64) -> Duration {
    let exp = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(20);
    let ms = settings
        .retry_base_ms
        .saturating_mul(1u64 << exp)
        .min(settings.retry_max_ms);
    let jitter = rand::rng().random_range(0.75..=1.0);
    Duration::from_millis((ms as f64 * jitter) as u64)
}

/// What to do with an item after one try.
enum Step {
    Done(Finish, String),
    /// The batch was canceled or expired before the item was sent: hand it
    /// back, for maintenance to mark it canceled or expired.
    Skip,
    Retry {
        after: Duration,
        /// The try never got quota: it does not count as an attempt.
        refund: bool,
        /// The `errored` result to record if no attempt is left.
        error: String,
    },
}

/// `{"type":"errored","error":{"type":"error","error":{..},"request_id":..}}`
fn errored(error: &ApiError, request_id: &str) -> String {
    let (kind, _) = error.kind_and_status();
    let body = spillway_vertex::error_body(kind, &error.to_string(), Some(request_id));
    format!(
        r#"{{"type":"errored","error":{}}}"#,
        String::from_utf8_lossy(&body)
    )
}

/// What to do after one try whose answer was `result`.
fn step_after(result: Result<Answer, ForwardError>, request_id: &str) -> Step {
    let error = match result {
        Ok(Answer::Unary { body, .. }) => match serde_json::from_slice::<&RawValue>(&body) {
            Ok(message) => {
                return Step::Done(
                    Finish::Succeeded,
                    format!(r#"{{"type":"succeeded","message":{}}}"#, message.get()),
                )
            }
            Err(e) => ForwardError::UpstreamUnavailable {
                region: String::new(),
                reason: format!("the response was not JSON: {e}"),
            },
        },
        Ok(Answer::Stream { .. }) => ForwardError::UpstreamUnavailable {
            region: String::new(),
            reason: "a batch item was answered with a stream".into(),
        },
        Err(e) => e,
    };
    let retry = match &error {
        ForwardError::RateLimited { retry_after, .. } => Some((
            (*retry_after).clamp(Duration::from_millis(100), Duration::from_secs(60)),
            true,
        )),
        ForwardError::Upstream(e) if e.status == 429 => Some((Duration::from_secs(1), true)),
        e if e.is_transient() => Some((Duration::ZERO, false)),
        _ => None,
    };
    let result = errored(&ApiError::from(error), request_id);
    match retry {
        Some((after, refund)) => Step::Retry {
            after,
            refund,
            error: result,
        },
        None => Step::Done(Finish::Errored, result),
    }
}

impl BatchService {
    /// The item as a call for the tenant that submitted it, checked again
    /// (the config may have changed since it was submitted).
    fn call_for<'f>(
        forwarder: &'f Forwarder,
        keys: &Keys,
        item: &ClaimedItem,
        request_id: &str,
    ) -> Result<Call<'f>, ApiError> {
        let Some(tenant) = keys.current().tenant_named(&item.tenant) else {
            return Err(ApiError::BadRequest(format!(
                "tenant {:?}, which submitted this batch, is no longer configured",
                item.tenant
            )));
        };
        let params: Map<String, Value> = serde_json::from_str(&item.params)
            .map_err(|e| ApiError::Internal(format!("stored params unreadable: {e}")))?;
        let summary = validate(&params, Operation::Messages, true)?;
        let name = summary.model.as_deref().unwrap_or_default();
        let request = CallRequest {
            op: Operation::Messages,
            stream: false,
            stream_endpoint: false,
            max_tokens: summary.max_tokens.unwrap_or(0),
            body: params,
            beta: None,
            region_hint: None,
            max_wait: Some(forwarder.policy().max_wait_cap),
            priority: Priority::Batch,
            tenant,
            request_id: RequestId::from(request_id.to_string()),
            // A trace of its own, linked to the request that created the batch.
            span: forwarder
                .observer()
                .telemetry()
                .map(|t| t.batch_item(&item.batch_id, item.batch_traceparent.as_deref())),
        };
        Ok(forwarder.prepare(name, request)?)
    }

    /// Whether the item's batch still runs; a store failure is a retry.
    async fn still_active(&self, item: &ClaimedItem) -> Result<bool, Step> {
        match self
            .store
            .batch_active(item.key.batch_seq, self.clock.now_ms())
            .await
        {
            Ok(active) => Ok(active),
            Err(e) => {
                tracing::error!(error = %e, "batch store unavailable");
                Err(Step::Retry {
                    after: Duration::from_secs(1),
                    refund: true,
                    error: String::new(),
                })
            }
        }
    }

    /// Waits for the item's turn at its pace. A cancel or the expiry may
    /// come first, and then it is not sent. Cancels and expiries in this
    /// process wake the wait; one on another replica is seen within a minute.
    async fn wait_turn(&self, item: &ClaimedItem, pacing: &Pacing) -> Result<(), Step> {
        loop {
            match self.pacer.try_go(pacing) {
                None => {
                    return match self.still_active(item).await {
                        Ok(true) => Ok(()),
                        Ok(false) => {
                            self.pacer.undo(pacing);
                            Err(Step::Skip)
                        }
                        Err(step) => {
                            self.pacer.undo(pacing);
                            Err(step)
                        }
                    }
                }
                Some(opens) => {
                    let changed = self.changed.notified();
                    let wake = opens.min(tokio::time::Instant::now() + Duration::from_secs(60));
                    tokio::select! {
                        _ = changed => match self.still_active(item).await {
                            Ok(true) => {}
                            Ok(false) => return Err(Step::Skip),
                            Err(step) => return Err(step),
                        },
                        _ = tokio::time::sleep_until(wake) => {}
                    }
                }
            }
        }
    }

    async fn execute(&self, forwarder: &Arc<Forwarder>, keys: &Keys, item: &ClaimedItem) -> Step {
        let request_id = new_request_id();
        let call = match Self::call_for(forwarder, keys, item, &request_id) {
            Ok(call) => call,
            Err(e) => return Step::Done(Finish::Errored, errored(&e, &request_id)),
        };
        let pacing = forwarder.pacing(&call);
        if let Err(step) = self.wait_turn(item, &pacing).await {
            return step;
        }
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let Forwarded { trace, result } = forwarder.forward(call).await;
        let (status, usage) = match &result {
            Ok(Answer::Unary { usage, .. }) => (200, *usage),
            Ok(Answer::Stream { .. }) => (200, None),
            Err(e) => (ApiError::status_of(e), None),
        };
        forwarder.observer().record(&trace, status, usage);
        step_after(result, &request_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let s = BatchSettings {
            retry_base_ms: 1000,
            retry_max_ms: 8000,
            ..crate::config::BatchSettings::for_tests()
        };
        for (attempt, full) in [(1, 1000), (2, 2000), (3, 4000), (4, 8000), (9, 8000)] {
            let d = backoff(&s, attempt).as_millis() as u64;
            assert!(d <= full && d >= full * 3 / 4, "attempt {attempt}: {d}");
        }
    }

    #[test]
    fn errored_results_are_anthropic_shaped() {
        let e = ApiError::BadRequest("max_tokens: field required".into());
        let v: Value = serde_json::from_str(&errored(&e, "req_1")).unwrap();
        assert_eq!(v["type"], "errored");
        assert_eq!(v["error"]["type"], "error");
        assert_eq!(v["error"]["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["error"]["message"], "max_tokens: field required");
        assert_eq!(v["error"]["request_id"], "req_1");
    }
}
