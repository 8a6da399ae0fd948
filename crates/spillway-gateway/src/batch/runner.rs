//! The worker loop: batch items through the real request path.
//!
//! [`BatchService::run`] keeps at most `batch.concurrency` items in flight.
//! Whenever a slot is free it claims more from the store (each claim is a
//! lease: this process's owner id and an expiry, renewed every third of the
//! lease while it runs), and runs each claimed item as one
//! [`proxy::Call`](crate::proxy::Call) at [`Priority::Batch`] for the tenant
//! that submitted it. The scheduler only admits a batch request when no
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
//! | 5xx, 529, timeout, unreachable (after `proxy`'s own region fallback) | back to `pending` after a jittered exponential backoff; after `max_item_attempts`, `errored` |
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
use crate::auth::Tenant;
use crate::config::{BatchSettings, BatchStoreKind};
use crate::error::ApiError;
use crate::proxy::{forward, Call};
use crate::request_id::{new_request_id, RequestId};
use crate::scheduler::Priority;
use crate::server::AppState;

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
    /// Items in flight in this process.
    pub in_flight: i64,
    /// Bytes the store takes on disk.
    pub store_bytes: i64,
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
    in_flight: AtomicI64,
    /// Upstream attempts of batch items since start (items sent again after
    /// a crash count again).
    attempts: AtomicI64,
    pacer: Pacer,
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
            in_flight: AtomicI64::new(0),
            attempts: AtomicI64::new(0),
            pacer: Pacer::default(),
        }
    }

    pub fn store(&self) -> &Arc<dyn BatchStore> {
        &self.store
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
    pub fn base_url(&self, listen: std::net::SocketAddr, headers: &HeaderMap) -> String {
        if !self.settings.public_url.is_empty() {
            return self.settings.public_url.trim_end_matches('/').to_string();
        }
        if !listen.ip().is_unspecified() && listen.port() != 0 {
            return format!("http://{listen}");
        }
        match headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| h.parse::<http::uri::Authority>().is_ok())
        {
            Some(host) => format!("http://{host}"),
            None => format!("http://{listen}"),
        }
    }

    /// Batch counts, items finished, queue depth and store size.
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
            in_flight: self.in_flight.load(Ordering::Relaxed),
            store_bytes: stats.bytes,
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
        state: Arc<AppState>,
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
                            self.in_flight.fetch_add(1, Ordering::Relaxed);
                            tasks.spawn(Arc::clone(&self).run_item(Arc::clone(&state), item));
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

    async fn run_item(self: Arc<Self>, state: Arc<AppState>, item: ClaimedItem) {
        let step = execute(
            &state,
            &item,
            &self.attempts,
            &self.pacer,
            &*self.store,
            &self.clock,
            &self.changed,
        )
        .await;
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
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
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
    /// Next free slot per (model, regions).
    next: std::sync::Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
}

impl Pacer {
    /// How far apart items like this one must be: the larger of one request's
    /// and this item's tokens' share of the eligible regions' combined budget.
    fn spacing(state: &AppState, call: &Call<'_>) -> (String, Duration) {
        let q = &state.settings.quota;
        let window = Duration::from_secs(q.window_secs) + Duration::from_millis(q.window_margin_ms);
        let mut key = call.model.id.clone();
        let (mut requests, mut tokens) = (0u64, Some(0u64));
        for region in call
            .model
            .regions
            .iter()
            .filter(|r| call.tenant.policy.allows_region(&r.region))
        {
            key.push(' ');
            key.push_str(&region.region);
            let limits = state.quota_ceiling(&region.limits);
            requests += u64::from(limits.requests);
            tokens = tokens.zip(limits.tokens).map(|(a, b)| a + b);
        }
        let per_request = window.as_secs_f64() / requests.max(1) as f64;
        let charge = spillway_core::estimate::estimate_input(
            &call.body,
            call.model.chars_per_token,
            spillway_core::estimate::ImageRule::default(),
        )
        .tokens
        .saturating_add(call.max_tokens);
        let per_tokens = tokens
            .filter(|t| *t > 0)
            .map_or(0.0, |t| window.as_secs_f64() * charge as f64 / t as f64);
        (key, Duration::from_secs_f64(per_request.max(per_tokens)))
    }

    /// Takes the gate if it is open (`None`: go now), else says when it
    /// opens. Waiting items hold no slot, so items that never go (canceled,
    /// expired) cost the batch nothing.
    fn try_go(&self, state: &AppState, call: &Call<'_>) -> Option<tokio::time::Instant> {
        let (key, spacing) = Self::spacing(state, call);
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        let slot = next.entry(key).or_insert(now);
        if *slot > now {
            return Some(*slot);
        }
        // Keep the cadence across timer lateness; after idleness, no credit.
        let base = if now.duration_since(*slot) < spacing {
            *slot
        } else {
            now
        };
        *slot = base + spacing;
        None
    }

    /// Gives back the slot just taken (the item turned out not to go).
    fn undo(&self, state: &AppState, call: &Call<'_>) {
        let (key, spacing) = Self::spacing(state, call);
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = next.get_mut(&key) {
            *slot -= spacing;
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

/// The owner of a batch, as configured now.
fn tenant_of(state: &AppState, name: &str) -> Option<Tenant> {
    match state.keys.current().tenant_named(name) {
        Some(t) => Some(t.clone()),
        None if state.settings.server.auth == crate::config::ClientAuth::None => {
            let anonymous = Tenant::anonymous();
            (*anonymous.name == *name).then_some(anonymous)
        }
        None => None,
    }
}

async fn execute(
    state: &Arc<AppState>,
    item: &ClaimedItem,
    attempts: &AtomicI64,
    pacer: &Pacer,
    store: &dyn BatchStore,
    clock: &BatchClock,
    changed: &Notify,
) -> Step {
    let request_id = new_request_id();
    let done_error = |e: ApiError| Step::Done(Finish::Errored, errored(&e, &request_id));
    let Some(tenant) = tenant_of(state, &item.tenant) else {
        return done_error(ApiError::BadRequest(format!(
            "tenant {:?}, which submitted this batch, is no longer configured",
            item.tenant
        )));
    };
    let params: Map<String, Value> = match serde_json::from_str(&item.params) {
        Ok(p) => p,
        Err(e) => return done_error(ApiError::Internal(format!("stored params unreadable: {e}"))),
    };
    // Validated at submit; checked again because the config may have changed.
    let summary = match validate(&params, Operation::Messages, true) {
        Ok(s) => s,
        Err(e) => return done_error(e.into()),
    };
    let name = summary.model.as_deref().unwrap_or_default();
    let resolution = match crate::routes::resolve_model(state, name) {
        Ok(r) => r,
        Err(e) => return done_error(e),
    };
    let call = Call {
        op: Operation::Messages,
        model: resolution.model,
        alias_warning: None,
        stream: false,
        max_tokens: summary.max_tokens.unwrap_or(0),
        body: params,
        beta: None,
        region_hint: None,
        max_wait: Some(state.max_wait_cap),
        priority: Priority::Batch,
        tenant,
        request_id: RequestId::new(&request_id),
    };
    // Wait for its turn; a cancel or the expiry may come first, and then it
    // is not sent. Cancels and expiries in this process wake the wait; one
    // on another replica is seen within a minute.
    let active = || async {
        match store.batch_active(item.key.batch_seq, clock.now_ms()).await {
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
    };
    loop {
        match pacer.try_go(state, &call) {
            None => match active().await {
                Ok(true) => break,
                Ok(false) => {
                    pacer.undo(state, &call);
                    return Step::Skip;
                }
                Err(step) => {
                    pacer.undo(state, &call);
                    return step;
                }
            },
            Some(opens) => {
                let changed = changed.notified();
                let wake = opens.min(tokio::time::Instant::now() + Duration::from_secs(60));
                tokio::select! {
                    _ = changed => match active().await {
                        Ok(true) => {}
                        Ok(false) => return Step::Skip,
                        Err(step) => return step,
                    },
                    _ = tokio::time::sleep_until(wake) => {}
                }
            }
        }
    }
    attempts.fetch_add(1, Ordering::Relaxed);
    let error = match forward(state, call).await {
        Ok(response) => {
            let limit = state.settings.server.max_body_bytes.max(64 << 20);
            match axum::body::to_bytes(response.into_body(), limit).await {
                Ok(bytes) => match serde_json::from_slice::<&RawValue>(&bytes) {
                    Ok(message) => {
                        return Step::Done(
                            Finish::Succeeded,
                            format!(r#"{{"type":"succeeded","message":{}}}"#, message.get()),
                        )
                    }
                    Err(e) => ApiError::UpstreamUnavailable {
                        region: String::new(),
                        reason: format!("the response was not JSON: {e}"),
                    },
                },
                Err(e) => ApiError::UpstreamUnavailable {
                    region: String::new(),
                    reason: format!("reading the response: {e}"),
                },
            }
        }
        Err(e) => e,
    };
    match &error {
        ApiError::RateLimited { retry_after, .. } => Step::Retry {
            after: (*retry_after).clamp(Duration::from_millis(100), Duration::from_secs(60)),
            refund: true,
            error: errored(&error, &request_id),
        },
        ApiError::Upstream(e) if e.status == 429 => Step::Retry {
            after: Duration::from_secs(1),
            refund: true,
            error: errored(&error, &request_id),
        },
        e if e.kind_and_status().1.is_server_error() => Step::Retry {
            after: Duration::ZERO,
            refund: false,
            error: errored(&error, &request_id),
        },
        _ => done_error(error),
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
