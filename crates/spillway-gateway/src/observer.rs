//! Logging and metrics as one observer: what happened to each request,
//! recorded once, in one place.
//!
//! - A [`Trace`] collects the facts of one forwarded call as the forwarder
//!   makes them (model, region, attempts, estimate, waits, outcome). It is
//!   plain data; nothing is logged while the call runs.
//! - [`Observer::record`] is the one place a request's outcome becomes its
//!   log line (`spillway::request`) and its outcome counters, token
//!   totals and spend (`spend`: priced from the usage, counted once). Per-attempt events (admissions, spillovers, upstream statuses,
//!   stream opens) are counted by the observer's other methods as they
//!   happen, because a dashboard wants them before the request ends.
//! - [`observe_requests`] is the outermost HTTP layer. It gives every
//!   request an id (`request-id` on every response, as Anthropic's API
//!   does), counts every HTTP request by surface, route template and status
//!   (`spillway_http_requests_total`), and records every model request when
//!   its response is done: a forwarded call from the [`RequestRecord`] its
//!   response carries (for a stream, when the body ends or the client drops
//!   it), a model request refused before forwarding (bad auth, bad JSON)
//!   from method, path and status. Admin, batch-API, catalog, health and
//!   metrics calls are not model requests: they are logged (health and
//!   metrics not even that) but never counted in `spillway_requests_total`,
//!   so a running `spillway status` or a scraper adds nothing there. The
//!   batch runner, which has no HTTP response, records its items with the
//!   same [`Observer::record`].
//!
//! So no request goes unrecorded, none is recorded twice, and inner code
//! never reaches back to tell an outer layer what it did. With traces on
//! (`telemetry`), the same moments end each request's spans: the layer
//! starts a request's span when it arrives, and `record` hands the finished
//! trace to [`Telemetry`]; with traces off both are a `None`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use futures::{Stream, StreamExt};
use http::HeaderValue;
use spillway_core::ledger::Charge;
use spillway_core::ModelId;
use spillway_vertex::Usage;

use crate::answer::StreamEnd;
use crate::metrics::{status_label, Metrics};
use crate::request_id::{new_request_id, RequestId};
use crate::scheduler::Priority;
use crate::spend::Spend;
use crate::telemetry::{CallFacts, CallSpan, HttpFacts, Telemetry};

/// The facts of one forwarded call, gathered while it runs.
#[derive(Debug, Clone)]
pub struct Trace {
    pub request_id: RequestId,
    pub tenant: Arc<str>,
    pub model: ModelId,
    /// The location of the last attempt; empty before any.
    pub region: Arc<str>,
    pub started: Instant,
    pub attempts: u32,
    /// What admission reserves (input with its margin, expected output).
    pub estimated: Charge,
    /// The input estimate before the margin.
    pub point_input: u64,
    /// What kind of content dominates the body (`ContentClass::name`).
    pub content_class: &'static str,
    pub queue_wait: Duration,
    /// Time to response headers of the last upstream attempt.
    pub upstream_latency: Duration,
    /// The outcome label once the forwarder knows it (`ok`, `rejected`,
    /// `invalid`, `upstream_error`, ...); a stream's comes at its end.
    pub outcome: &'static str,
    /// Interactive or batch: the `traffic` of its spend.
    pub priority: Priority,
    /// What this call's spans need (`telemetry`): `None` unless traces are
    /// on and the request is sampled.
    pub span: Option<Box<CallSpan>>,
}

impl Trace {
    pub fn new(request_id: RequestId, tenant: Arc<str>, model: ModelId) -> Self {
        Self {
            request_id,
            tenant,
            model,
            region: Arc::from(""),
            started: Instant::now(),
            attempts: 0,
            estimated: Charge::default(),
            point_input: 0,
            content_class: "-",
            queue_wait: Duration::ZERO,
            upstream_latency: Duration::ZERO,
            outcome: "error",
            priority: Priority::Interactive,
            span: None,
        }
    }
}

impl Trace {
    /// Notes what a call will reserve.
    pub fn note_plan(&mut self, charge: Charge, point_input: u64, class: &'static str) {
        self.estimated = charge;
        self.point_input = point_input;
        self.content_class = class;
    }
}

/// What a forwarded call's response carries to the [`observe_requests`]
/// layer: its trace, and its status (or, for a stream, how it will end).
#[derive(Clone)]
pub enum RequestRecord {
    Done {
        trace: Trace,
        status: u16,
        usage: Option<Usage>,
    },
    Streaming {
        trace: Trace,
        end: StreamEnd,
    },
}

/// Counts and logs what requests do. Cheap to clone.
#[derive(Clone)]
pub struct Observer {
    metrics: Arc<Metrics>,
    spend: Arc<Spend>,
    telemetry: Option<Arc<Telemetry>>,
}

impl Observer {
    pub fn new(metrics: Arc<Metrics>, spend: Arc<Spend>) -> Self {
        Self {
            metrics,
            spend,
            telemetry: None,
        }
    }

    /// Spend per tenant, which [`Observer::record`] adds each request to.
    pub fn spend(&self) -> &Arc<Spend> {
        &self.spend
    }

    /// Records spans too (`[telemetry]` on).
    pub fn with_telemetry(mut self, telemetry: Option<Arc<Telemetry>>) -> Self {
        self.telemetry = telemetry;
        self
    }

    pub fn telemetry(&self) -> Option<&Arc<Telemetry>> {
        self.telemetry.as_ref()
    }

    /// The one place a request's outcome is logged and counted.
    pub fn record(&self, trace: &Trace, status: u16, usage: Option<Usage>) {
        let usage = usage.unwrap_or_default();
        let m = &self.metrics;
        let model = trace.model.as_str();
        m.requests
            .with_label_values(&[&*trace.tenant, model, trace.outcome])
            .inc();
        if usage.total() > 0 && !trace.region.is_empty() {
            let tokens = |kind: &str, n: u64| {
                m.tokens
                    .with_label_values(&[model, &*trace.region, kind])
                    .inc_by(n)
            };
            tokens("actual_input", usage.total_input());
            tokens("actual_output", usage.output_tokens);
            let by_tenant = |kind: &str, n: u64| {
                m.tenant_tokens
                    .with_label_values(&[&*trace.tenant, model, kind])
                    .inc_by(n)
            };
            by_tenant("input", usage.total_input());
            by_tenant("output", usage.output_tokens);
        }
        // What it cost, once: this is the one place a request is recorded.
        let cost = (usage.total() > 0 && !trace.region.is_empty())
            .then(|| {
                let traffic = match trace.priority {
                    Priority::Interactive => "interactive",
                    Priority::Batch => "batch",
                };
                self.spend
                    .record_usage(&trace.tenant, &trace.model, &trace.region, traffic, &usage)
            })
            .flatten();
        tracing::info!(
            target: "spillway::request",
            request_id = %trace.request_id,
            tenant = %trace.tenant,
            model = %trace.model,
            region = %trace.region,
            attempts = trace.attempts,
            status,
            outcome = trace.outcome,
            content_class = trace.content_class,
            estimated_input_tokens = trace.point_input,
            reserved_input_tokens = trace.estimated.input,
            reserved_output_tokens = trace.estimated.output,
            input_tokens = usage.total_input(),
            output_tokens = usage.output_tokens,
            cache_read_tokens = usage.cache_read_input_tokens,
            cache_write_tokens = usage.cache_creation_input_tokens,
            cost_usd = cost.map_or(0.0, |c| c.usd()),
            queue_wait_ms = trace.queue_wait.as_secs_f64() * 1000.0,
            upstream_latency_ms = trace.upstream_latency.as_secs_f64() * 1000.0,
            latency_ms = trace.started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
        if let (Some(telemetry), Some(span)) = (&self.telemetry, &trace.span) {
            telemetry.call_done(span, &call_facts(trace, status, &usage));
        }
    }

    /// A request that never became a forwarded call: a model request
    /// refused by auth or validation (counted as a model request, with
    /// tenant and model `-`), or a call to another surface (an admin, batch
    /// or catalog call, an unknown route: only logged).
    fn record_plain(
        &self,
        request_id: &RequestId,
        method: &http::Method,
        path: &str,
        status: u16,
        surface: Surface,
    ) {
        let outcome = match status {
            200..=299 => "ok",
            401 => "unauthenticated",
            404 => "not_found",
            413 => "too_large",
            400..=499 => "invalid",
            _ => "error",
        };
        if surface == Surface::Model {
            self.metrics
                .requests
                .with_label_values(&["-", "-", outcome])
                .inc();
        }
        tracing::info!(
            target: "spillway::request",
            request_id = %request_id,
            %method,
            path = %path,
            surface = surface.label(),
            status,
            outcome,
            "request"
        );
    }

    /// One HTTP request answered, whatever its surface.
    fn counted_http(&self, surface: Surface, route: &str, status: u16) {
        self.metrics
            .http_requests
            .with_label_values(&[surface.label(), route, status_label(status)])
            .inc();
    }

    /// One admission: its wait, where it went (spillover from the primary,
    /// fallback from a failed location) and the tokens reserved.
    pub fn admitted(&self, admission: Admission<'_>) {
        let m = &self.metrics;
        let (model, region) = (admission.model, admission.region);
        let priority = match admission.priority {
            Priority::Interactive => "interactive",
            Priority::Batch => "batch",
        };
        m.queue_wait_seconds
            .with_label_values(&[model, priority])
            .observe(admission.wait.as_secs_f64());
        if region != admission.primary {
            m.spillovers
                .with_label_values(&[model, admission.primary, region])
                .inc();
        }
        if let Some(from) = admission.failed_region {
            m.fallbacks.with_label_values(&[model, from, region]).inc();
        }
        let tokens =
            |kind: &str, n: u64| m.tokens.with_label_values(&[model, region, kind]).inc_by(n);
        tokens("estimated_input", admission.point_input);
        tokens("reserved_input", admission.reserved.input);
        tokens("reserved_output", admission.reserved.output);
    }

    /// One upstream attempt's answer (`status` as [`status_label`] names it,
    /// or `timeout`, `credentials`, `transport`).
    pub fn attempted(&self, region: &str, model: &str, status: &str, latency: Option<Duration>) {
        let m = &self.metrics;
        m.upstream_requests
            .with_label_values(&[region, model, status])
            .inc();
        if status == status_label(429) {
            m.upstream_rate_limited
                .with_label_values(&[region, model])
                .inc();
        }
        if let Some(latency) = latency {
            m.upstream_latency_seconds
                .with_label_values(&[region, model])
                .observe(latency.as_secs_f64());
        }
    }

    /// A 429 that named no quota metric: Google's capacity, not the budget.
    pub fn capacity_limited(&self, region: &str, model: &str) {
        self.metrics
            .upstream_capacity_limited
            .with_label_values(&[region, model])
            .inc();
    }

    /// An upstream answer about the gateway's own setup (`model_not_enabled`,
    /// `credentials_rejected`).
    pub fn setup_error(&self, region: &str, model: &str, problem: &str) {
        self.metrics
            .upstream_setup_errors
            .with_label_values(&[region, model, problem])
            .inc();
    }

    /// How far one request's input reservation was from its actual input
    /// (reserved / actual: below 1 is an under-reservation).
    pub fn estimate_ratio(&self, model: &str, class: &str, ratio: f64) {
        self.metrics
            .estimate_ratio
            .with_label_values(&[model, class])
            .observe(ratio);
    }

    /// One exact `count-tokens` call before admission (`ok`, `error`,
    /// `timeout`).
    pub fn counted_tokens(&self, model: &str, outcome: &str) {
        self.metrics
            .count_tokens
            .with_label_values(&[model, outcome])
            .inc();
    }

    pub fn stream_opened(&self, model: &str) {
        self.metrics.open_streams.with_label_values(&[model]).inc();
    }

    pub fn stream_closed(&self, region: &str, model: &str, first_event_after: Option<Duration>) {
        self.metrics.open_streams.with_label_values(&[model]).dec();
        if let Some(ttft) = first_event_after {
            self.metrics
                .time_to_first_token_seconds
                .with_label_values(&[region, model])
                .observe(ttft.as_secs_f64());
        }
    }
}

/// What [`Observer::admitted`] counts.
pub struct Admission<'a> {
    pub model: &'a str,
    pub primary: &'a str,
    pub region: &'a str,
    pub failed_region: Option<&'a str>,
    pub wait: Duration,
    pub priority: Priority,
    /// The input estimate before its margin.
    pub point_input: u64,
    pub reserved: Charge,
}

/// What part of the gateway a request is for, from its path: only
/// [`Surface::Model`] requests are model requests (`spillway_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Messages, count_tokens, Vertex predict: what quota is for.
    Model,
    /// The Message Batches API (its items are model requests of their own).
    Batches,
    /// The model catalog (`/v1/models`).
    Models,
    /// The admin API.
    Admin,
    /// Health, readiness, metrics.
    Ops,
    /// No route of the gateway's.
    Other,
}

impl Surface {
    pub fn of(path: &str) -> Self {
        match path {
            "/v1/messages" | "/v1/messages/count_tokens" => Self::Model,
            "/healthz" | "/readyz" | "/metrics" => Self::Ops,
            p if p.starts_with("/v1/projects/") => Self::Model,
            p if p == "/v1/messages/batches" || p.starts_with("/v1/messages/batches/") => {
                Self::Batches
            }
            p if p == "/v1/models" || p.starts_with("/v1/models/") => Self::Models,
            p if p == "/admin" || p.starts_with("/admin/") => Self::Admin,
            _ => Self::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Batches => "batches",
            Self::Models => "models",
            Self::Admin => "admin",
            Self::Ops => "ops",
            Self::Other => "other",
        }
    }
}

/// A route layer: hands the matched route template to [`observe_requests`]
/// on the response (the outer layer runs before routing, so the request's
/// own `MatchedPath` never reaches it).
pub async fn note_route(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().cloned();
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(route);
    }
    response
}

/// The outermost layer: a request id for every request, every HTTP request
/// counted by surface, route and status, and every model request recorded
/// once its response is done.
pub async fn observe_requests(
    State(observer): State<Observer>,
    mut request: Request,
    next: Next,
) -> Response {
    let id = new_request_id();
    let header = HeaderValue::from_str(&id).expect("request ids are ASCII");
    let request_id = RequestId::from(id);
    request.extensions_mut().insert(request_id.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let surface = Surface::of(&path);
    // The request's span starts now (traces on, and not health or metrics).
    let span = match observer.telemetry() {
        Some(telemetry) if surface != Surface::Ops => {
            let span = telemetry.incoming(request.headers());
            request.extensions_mut().insert(span.clone());
            Some(span)
        }
        _ => None,
    };
    let mut response = next.run(request).await;
    response.headers_mut().insert("request-id", header);
    // The template (`/admin/regions/{region}/drain`), never the raw path:
    // the label stays bounded. `-` when no route answered (unknown path,
    // or refused by an outer layer first).
    let route = response.extensions_mut().remove::<MatchedPath>();
    observer.counted_http(
        surface,
        route.as_ref().map_or("-", |r| r.as_str()),
        response.status().as_u16(),
    );
    match response.extensions_mut().remove::<RequestRecord>() {
        Some(RequestRecord::Done {
            trace,
            status,
            usage,
        }) => observer.record(&trace, status, usage),
        Some(RequestRecord::Streaming { trace, end }) => {
            let (parts, body) = response.into_parts();
            let body = RecordOnEnd {
                inner: Some(body.into_data_stream()),
                pending: Some((observer, trace, end)),
            };
            response = Response::from_parts(parts, Body::from_stream(body));
        }
        None => {
            if surface != Surface::Ops {
                observer.record_plain(
                    &request_id,
                    &method,
                    &path,
                    response.status().as_u16(),
                    surface,
                );
            }
            if let (Some(telemetry), Some(span)) = (observer.telemetry(), span) {
                if span.sampled() {
                    telemetry.http_done(
                        &span,
                        HttpFacts {
                            method: &method,
                            path: &path,
                            route: route.as_ref().map(|r| r.as_str()),
                            status: response.status().as_u16(),
                            request_id: request_id.as_str(),
                            model_request: surface == Surface::Model,
                        },
                    );
                }
            }
        }
    }
    response
}

/// What a call's span says, from its trace.
fn call_facts<'a>(trace: &'a Trace, status: u16, usage: &'a Usage) -> CallFacts<'a> {
    CallFacts {
        request_id: trace.request_id.as_str(),
        tenant: &trace.tenant,
        model: trace.model.as_str(),
        location: &trace.region,
        attempts: trace.attempts,
        queue_wait: trace.queue_wait,
        content_class: trace.content_class,
        point_input: trace.point_input,
        reserved: trace.estimated,
        outcome: trace.outcome,
        status,
        usage,
    }
}

/// A streamed body that records its request when it ends or is dropped.
struct RecordOnEnd<S> {
    inner: Option<S>,
    pending: Option<(Observer, Trace, StreamEnd)>,
}

impl<S> RecordOnEnd<S> {
    fn finish(&mut self) {
        // The inner stream reports how it ended when it is done or dropped:
        // drop it first, so its end is known.
        self.inner = None;
        if let Some((observer, mut trace, end)) = self.pending.take() {
            let (usage, outcome) = end.get().unwrap_or((Usage::default(), "client_gone"));
            trace.outcome = outcome;
            if let Some(span) = trace.span.as_mut() {
                span.stream_ended(end.stop_reason());
            }
            observer.record(&trace, 200, Some(usage));
        }
    }
}

impl<S> Stream for RecordOnEnd<S>
where
    S: Stream<Item = Result<Bytes, axum::Error>> + Unpin,
{
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match inner.poll_next_unpin(cx) {
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

impl<S> Drop for RecordOnEnd<S> {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::Surface;

    #[test]
    fn only_model_paths_are_model_requests() {
        for (path, surface) in [
            ("/v1/messages", Surface::Model),
            ("/v1/messages/count_tokens", Surface::Model),
            (
                "/v1/projects/p/locations/us-east5/publishers/anthropic/models/m:rawPredict",
                Surface::Model,
            ),
            ("/v1/messages/batches", Surface::Batches),
            ("/v1/messages/batches/msgbatch_1/results", Surface::Batches),
            ("/v1/models", Surface::Models),
            ("/v1/models/claude-3-haiku@20240307", Surface::Models),
            ("/admin/quotas", Surface::Admin),
            ("/admin/regions/us-central1/drain", Surface::Admin),
            ("/healthz", Surface::Ops),
            ("/readyz", Surface::Ops),
            ("/metrics", Surface::Ops),
            ("/administrator", Surface::Other),
            ("/v1/messagesx", Surface::Other),
            ("/", Surface::Other),
        ] {
            assert_eq!(Surface::of(path), surface, "{path}");
        }
    }
}
