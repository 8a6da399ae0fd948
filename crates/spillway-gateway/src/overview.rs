//! The live page's data: everything an operator watches, in one object
//! (`GET /admin/overview`), and the same object pushed every second
//! (`GET /admin/events`, server-sent events). Both sit behind the admin key.
//!
//! Why one object: the page shows budgets, cooldowns, learned limits,
//! queues, shares and batches side by side, and they must be of the same
//! moment to be read together (a bar of a budget beside the queue it
//! caused). Five endpoints polled apart would show five moments. So the
//! overview is built from one read of each store snapshot, with the queues
//! and shares read in the same pass, and `budgets` carries every field of
//! `/admin/quotas` as is (flattened), so the two can never disagree on a
//! name or a unit; what it adds is derived from them:
//!
//! - `dimensions`: each limit the bucket has (requests always; `tokens`,
//!   the combined limit, and/or `input_tokens` and `output_tokens`, as the
//!   model's quota is) as the bar shows it: `limit` (what admission uses
//!   now), `ceiling` (configured × `quota.headroom`: what the limit returns
//!   to), `configured`, and the window split into `used` (settled to
//!   actual usage), `reserved` (held by requests still in flight) and
//!   `free` (`limit − used − reserved`, never below 0). `used + reserved`
//!   is `/admin/quotas`'s `used`, `reserved` its `in_flight`.
//! - `learned`: an upstream 429 taught a limit below the ceiling
//!   (`spillway-core::adaptive`); it probes back up on its own.
//! - `queues`: per requester (model), how many wait and how long the
//!   longest has waited so far (`scheduler::QueueState`).
//! - `pools`: `/admin/shares` (each tenant's held part, demand and share
//!   of the model's pool; what batch holds).
//! - `batches`: the unfinished batches in the runner's claim order with
//!   their counts, the recent completion rate and each one's ETA
//!   (`batch::progress`); `null` with batches off.
//!
//! **Why server-sent events, read with `fetch()`.** The page could poll
//! `/admin/overview` every second; one stream instead costs one
//! authenticated request per viewer (not one a second, each a log line and
//! an auth check), and every viewer shares one build a second: the frame
//! is made once by the [`Feed`] producer and each connection sends the same
//! bytes. `EventSource` cannot send an `Authorization` header, and the key
//! must not travel in a URL or live in a cookie, so the page reads the
//! stream with `fetch()` and a `ReadableStream` reader, which can (and
//! `curl -N` can too). The stream ends, with an `event: closing`, when
//! the gateway starts closing connections at shutdown (a feed that never
//! ends would hold its connection open until the grace cut it); the page
//! reconnects with a backoff.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use spillway_core::ledger::{Limits, Usage};
use spillway_core::store::BudgetState;

use crate::admin::{QuotaView, ShareView};
use crate::feed::{Feed, Frame};
use crate::lifecycle::Lifecycle;
use crate::state::AppState;

/// How often the feed sends a frame.
pub const FEED_EVERY: Duration = Duration::from_secs(1);
/// The last event of a feed, when the gateway shuts down.
const CLOSING_EVENT: &[u8] = b"event: closing\ndata: {\"type\":\"closing\"}\n\n";

/// What `GET /admin/overview` answers and every feed event carries.
#[derive(Debug, Serialize)]
pub struct Overview {
    /// When it was built (RFC 3339, UTC, milliseconds), and as Unix ms.
    pub generated_at: String,
    pub generated_at_ms: i64,
    /// The quota window's length (Vertex's: 60 s).
    pub window_secs: u64,
    /// `quota.headroom`: the part of each configured quota planned for.
    pub headroom: f64,
    /// How old the budgets' store read is (it is the last one while the
    /// store is slow); `null` before the store ever answered.
    pub state_age_ms: Option<u64>,
    pub budgets: Vec<BudgetOverview>,
    pub queues: Vec<QueueOverview>,
    pub pools: Vec<ShareView>,
    pub batches: Option<BatchesOverview>,
}

/// One bucket: `/admin/quotas`'s view of it, and its bars.
#[derive(Debug, Serialize)]
pub struct BudgetOverview {
    #[serde(flatten)]
    pub quota: QuotaView,
    /// The models (requesters) drawing on this bucket here: several for a
    /// lineage on `global` and the multi-regions.
    pub models: Vec<String>,
    /// Some limit is below its ceiling: learned from an upstream 429.
    pub learned: bool,
    pub dimensions: Vec<Dimension>,
}

/// One limit of a bucket, as a bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Dimension {
    /// `requests`, `tokens` (input + output), `input_tokens`, `output_tokens`.
    pub name: &'static str,
    pub configured: u64,
    pub ceiling: u64,
    pub limit: u64,
    pub used: u64,
    pub reserved: u64,
    pub free: u64,
}

/// One requester's wait queue.
#[derive(Debug, Serialize)]
pub struct QueueOverview {
    pub model: String,
    pub interactive: usize,
    pub batch: usize,
    /// How long the longest-waiting request of each class has waited.
    pub longest_interactive_ms: Option<u64>,
    pub longest_batch_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct BatchesOverview {
    pub in_progress: i64,
    pub canceling: i64,
    /// Items of unfinished batches not finished yet.
    pub open_items: i64,
    /// Items run to a result a second, over about the last 30 s; `null`
    /// until two looks a second apart.
    pub items_per_sec: Option<f64>,
    /// The first unfinished batches, in claim order.
    pub running: Vec<BatchOverview>,
    /// Unfinished batches not listed.
    pub unlisted: i64,
}

#[derive(Debug, Serialize)]
pub struct BatchOverview {
    pub id: String,
    pub tenant: String,
    /// `in_progress` or `canceling`.
    pub processing_status: String,
    pub created_at: String,
    pub total: i64,
    pub succeeded: i64,
    pub errored: i64,
    pub canceled: i64,
    pub expired: i64,
    pub processing: i64,
    /// Seconds until it should be done at the current rate, behind the
    /// batches ahead of it; `null` without a rate.
    pub eta_secs: Option<f64>,
}

fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The bars of one bucket: every limit it has, in a fixed order.
pub fn dimensions(
    configured: Limits,
    ceiling: Limits,
    effective: Limits,
    usage: Usage,
    in_flight: Usage,
) -> Vec<Dimension> {
    let dim = |name, configured: u64, ceiling: u64, limit: u64, total: u64, reserved: u64| {
        let reserved = reserved.min(total);
        Dimension {
            name,
            configured,
            ceiling,
            limit,
            used: total - reserved,
            reserved,
            free: limit.saturating_sub(total),
        }
    };
    let mut out = vec![dim(
        "requests",
        u64::from(configured.requests),
        u64::from(ceiling.requests),
        u64::from(effective.requests),
        u64::from(usage.requests),
        u64::from(in_flight.requests),
    )];
    // Each token limit: its name, where the limits keep it, what counts.
    type LimitOf = fn(&Limits) -> Option<u64>;
    type UsageOf = fn(&Usage) -> u64;
    let tokens: [(&str, LimitOf, UsageOf); 3] = [
        ("tokens", |l| l.tokens, Usage::tokens),
        ("input_tokens", |l| l.input_tokens, |u| u.input),
        ("output_tokens", |l| l.output_tokens, |u| u.output),
    ];
    for (name, limit_of, usage_of) in tokens {
        if let Some(c) = limit_of(&configured) {
            out.push(dim(
                name,
                c,
                limit_of(&ceiling).unwrap_or(c),
                limit_of(&effective).unwrap_or(c),
                usage_of(&usage),
                usage_of(&in_flight),
            ));
        }
    }
    out
}

fn budget_overview(state: &AppState, b: &BudgetState) -> BudgetOverview {
    let ceiling = crate::quota_store::adaptive_config(&state.settings.quota).ceiling(b.configured);
    let dimensions = dimensions(b.configured, ceiling, b.effective, b.usage, b.in_flight);
    BudgetOverview {
        quota: crate::admin::quota_view(state, b),
        models: state
            .forwarder
            .catalog()
            .requesters_of(&b.group, &b.region)
            .into_iter()
            .map(|r| r.to_string())
            .collect(),
        learned: dimensions.iter().any(|d| d.limit < d.ceiling),
        dimensions,
    }
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

async fn batches_overview(state: &AppState) -> Option<BatchesOverview> {
    let service = state.batches.as_ref()?;
    let read = crate::admin::read_batches(state).await?;
    let snap = &read.value;
    let count = |status: &str| {
        snap.batches
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    };
    let rate = service.progress().rate(read.at, &snap.open);
    let etas = crate::batch::progress::etas(&snap.open, rate);
    let (in_progress, canceling) = (count("in_progress"), count("canceling"));
    Some(BatchesOverview {
        in_progress,
        canceling,
        open_items: snap.open_items,
        items_per_sec: rate.map(|r| round(r, 3)),
        unlisted: (in_progress + canceling - snap.open.len() as i64).max(0),
        running: snap
            .open
            .iter()
            .zip(etas)
            .map(|(b, eta)| {
                let p = &b.progress;
                BatchOverview {
                    id: b.id.clone(),
                    tenant: b.tenant.clone(),
                    processing_status: b.status.clone(),
                    created_at: crate::rfc3339::format_unix_millis(p.created_at, true),
                    total: p.total,
                    succeeded: p.succeeded,
                    errored: p.errored,
                    canceled: p.canceled,
                    expired: p.expired,
                    processing: p.processing(),
                    eta_secs: eta.map(|d| round(d.as_secs_f64(), 1)),
                }
            })
            .collect(),
    })
}

/// The overview now: one read of each store snapshot, queues and shares
/// read in the same pass.
pub async fn build(state: &AppState) -> Overview {
    let (budgets, batches) =
        tokio::join!(crate::admin::read_budgets(state), batches_overview(state));
    let scheduler = state.forwarder.scheduler();
    let queues = state
        .forwarder
        .catalog()
        .requesters()
        .into_iter()
        .map(|group| {
            let q = scheduler.queue_state(group);
            let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
            QueueOverview {
                model: group.to_string(),
                interactive: q.interactive,
                batch: q.batch,
                longest_interactive_ms: ms(q.longest_interactive),
                longest_batch_ms: ms(q.longest_batch),
            }
        })
        .collect();
    let generated_at_ms = unix_ms_now();
    Overview {
        generated_at: crate::rfc3339::format_unix_millis(generated_at_ms, true),
        generated_at_ms,
        window_secs: state.settings.quota.window_secs,
        headroom: state.settings.quota.headroom,
        state_age_ms: budgets.as_ref().map(|b| b.at.elapsed().as_millis() as u64),
        budgets: budgets
            .iter()
            .flat_map(|b| b.value.iter())
            .map(|b| budget_overview(state, b))
            .collect(),
        queues,
        pools: crate::admin::share_views(state),
        batches,
    }
}

/// Admin data is never cached: by the browser, nor by a proxy between.
fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

/// `GET /admin/overview`.
pub async fn overview(State(state): State<Arc<AppState>>) -> Response {
    no_store(axum::Json(build(&state).await).into_response())
}

/// One feed event: `event: overview`, the overview as one line of JSON.
fn encode(overview: &Overview) -> Option<Frame> {
    let json = serde_json::to_vec(overview)
        .inspect_err(|e| tracing::warn!(error = %e, "admin feed: cannot encode the overview"))
        .ok()?;
    let mut frame = Vec::with_capacity(json.len() + 24);
    frame.extend_from_slice(b"event: overview\ndata: ");
    frame.extend_from_slice(&json);
    frame.extend_from_slice(b"\n\n");
    Some(Bytes::from(frame))
}

/// A connection's side of the feed: the frames as they come, until the
/// gateway closes (then `event: closing`) or the producer is gone.
fn frames(
    mut rx: tokio::sync::watch::Receiver<Option<Frame>>,
    life: Lifecycle,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    // The frame already there when a connection subscribes (the producer
    // runs for others): a new viewer need not wait for the next tick.
    let first = rx.borrow_and_update().clone();
    // (a frame to send first, receiver, lifecycle, closed?)
    futures::stream::unfold(
        (first, rx, life, false),
        |(first, mut rx, life, closed)| async move {
            if closed {
                return None;
            }
            if let Some(frame) = first {
                return Some((Ok(frame), (None, rx, life, false)));
            }
            loop {
                tokio::select! {
                    biased;
                    _ = life.closing() => {
                        return Some((Ok(Bytes::from_static(CLOSING_EVENT)), (None, rx, life, true)));
                    }
                    changed = rx.changed() => {
                        changed.ok()?;
                        let frame = rx.borrow_and_update().clone();
                        if let Some(frame) = frame {
                            return Some((Ok(frame), (None, rx, life, false)));
                        }
                    }
                }
            }
        },
    )
}

/// `GET /admin/events`: the overview as server-sent events, one
/// `event: overview` a second, shared by every viewer.
pub async fn events(State(state): State<Arc<AppState>>) -> Response {
    let producer_state = Arc::clone(&state);
    let rx = Feed::subscribe(&state.feed, FEED_EVERY, move || {
        let state = Arc::clone(&producer_state);
        async move { encode(&build(&state).await) }
    });
    let life = state.forwarder.lifecycle().clone();
    let mut response = Body::from_stream(frames(rx, life)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    // Tell buffering proxies (nginx) to pass each event on as it comes.
    headers.insert("x-accel-buffering", http::HeaderValue::from_static("no"));
    no_store(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_split_the_window_into_used_reserved_and_free() {
        let configured = Limits::split(60, 1_000, 500);
        let mut effective = configured;
        effective.output_tokens = Some(300);
        let usage = Usage {
            requests: 10,
            input: 400,
            output: 350,
        };
        let in_flight = Usage {
            requests: 2,
            input: 100,
            output: 50,
        };
        let dims = dimensions(configured, configured, effective, usage, in_flight);
        assert_eq!(
            dims,
            [
                Dimension {
                    name: "requests",
                    configured: 60,
                    ceiling: 60,
                    limit: 60,
                    used: 8,
                    reserved: 2,
                    free: 50
                },
                Dimension {
                    name: "input_tokens",
                    configured: 1_000,
                    ceiling: 1_000,
                    limit: 1_000,
                    used: 300,
                    reserved: 100,
                    free: 600
                },
                // Learned below what is already in the window: nothing free.
                Dimension {
                    name: "output_tokens",
                    configured: 500,
                    ceiling: 500,
                    limit: 300,
                    used: 300,
                    reserved: 50,
                    free: 0
                },
            ]
        );
        let combined = dimensions(
            Limits::new(5, 100),
            Limits::new(4, 90),
            Limits::new(4, 90),
            usage,
            in_flight,
        );
        assert_eq!(
            combined.iter().map(|d| d.name).collect::<Vec<_>>(),
            ["requests", "tokens"]
        );
        assert_eq!(
            (combined[1].used, combined[1].reserved, combined[1].free),
            (600, 150, 0)
        );
        assert_eq!(combined[0].ceiling, 4);
    }
}
