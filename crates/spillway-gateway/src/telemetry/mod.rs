//! OpenTelemetry traces: what happened to each model request, as spans a
//! tracing backend can show next to the caller's own.
//!
//! # What is exported
//!
//! - **One server span per model request** (`chat {model}`, kind SERVER),
//!   following the GenAI semantic conventions: `gen_ai.operation.name`,
//!   `gen_ai.provider.name` (`gcp.vertex_ai`: the attribute that replaced
//!   `gen_ai.system` in semconv 1.37, with the value it names for Vertex AI,
//!   whatever model family it serves), `gen_ai.request.model`,
//!   `gen_ai.request.max_tokens`, `gen_ai.usage.*` and
//!   `gen_ai.response.finish_reasons` (the answer's `stop_reason`); and
//!   Spillway's own `spillway.*` (tenant, chosen location, attempts, queue
//!   wait, the estimate and the reservation, outcome, request id). A failed
//!   request has status ERROR and `error.type` = its outcome. A stream's
//!   span ends when the stream does.
//! - **One client span per upstream attempt** (`POST {location}`, kind
//!   CLIENT, child of the request's span): location, `server.address` and
//!   `server.port` from configuration (never a URL, a project or a token),
//!   the HTTP status or `timeout` / `transport`, and its own duration.
//! - A plain HTTP server span for the other API calls (batch API, catalog,
//!   admin; never health or metrics), so the `POST /v1/messages/batches`
//!   that created a batch is a span its items can link to.
//!
//! # Context
//!
//! A client's W3C `traceparent` / `tracestate` is continued: the request's
//! span is its child, in its trace, and its sampled flag decides (parent
//! based; `sample_ratio` decides for new traces). Nothing is sent upstream:
//! Vertex does not join a caller's trace, so the client's context stays in
//! Spillway. A batch item runs long after its request, so it starts a trace
//! of its own with a **link** to the span that created its batch (whose
//! `traceparent` is stored with the batch) and `spillway.batch.id`.
//!
//! # Cost, and never slowing a request
//!
//! With `telemetry.otlp_endpoint` empty there is no [`Telemetry`]: the
//! observer holds `None`, a [`crate::observer::Trace`] carries no
//! [`CallSpan`], the attempts push nothing, and no span is built. When on,
//! the request path does three cheap things: it reads `traceparent` and
//! decides sampling when the request arrives ([`Telemetry::incoming`]); it
//! notes each upstream attempt's start, end and status in the call's
//! [`CallSpan`]; and when the request is recorded (for a stream, when it
//! ends) it builds the spans after the fact from those facts, with their
//! real start and end times, and hands them to a bounded queue with
//! `try_send`. That never waits: a full queue drops the span and counts it.
//! A task on the runtime ([`export`]) takes spans in batches of
//! `batch_size` (or whatever came within `export_interval_ms`) and posts
//! them as OTLP/HTTP protobuf with the `opentelemetry-otlp` exporter over a
//! client of our own (`tls::http_client_builder`); an export that fails or
//! takes longer than `export_timeout_ms` drops its spans and counts them.
//! A dead collector therefore costs the request path nothing: the export
//! task waits, the queue fills, spans are dropped
//! (`spillway_trace_spans_dropped_total{reason="queue_full"|"export_failed"}`),
//! requests go on. Shutdown flushes what is queued within the time left of
//! the shutdown grace and then stops, whether the collector answered or not.
//!
//! The SDK's own `BatchSpanProcessor` is not used: it runs on a thread of
//! its own (the async exporter would need a blocking client, or the
//! experimental runtime processor), and it counts neither its drops nor
//! its failed exports where `/metrics` could show them. The SDK is used for
//! what it is good at: span data, ids, the parent-based ratio sampler, the
//! W3C propagator and the OTLP encoding.

mod export;
mod spans;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt, TraceFlags};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample,
};
use opentelemetry_sdk::Resource;
use spillway_core::ledger::Charge;
use spillway_core::Catalog;
use spillway_vertex::{StopReason, Usage};

use crate::config::Settings;
use crate::metrics::Metrics;

/// The value of `gen_ai.provider.name` for Vertex AI locations.
pub const VERTEX_AI: &str = "gcp.vertex_ai";

/// Where one (model, location) is served: what an attempt's span says.
#[derive(Debug, Clone)]
struct Upstream {
    /// `gen_ai.provider.name`.
    provider: Arc<str>,
    /// `server.address` and `server.port`, from configuration.
    host: Option<(Arc<str>, u16)>,
}

/// Traces, when `[telemetry]` turns them on. Shared by the observer (which
/// records) and the layer and the batch runner (which start spans).
pub struct Telemetry {
    sampler: Sampler,
    ids: RandomIdGenerator,
    propagator: TraceContextPropagator,
    scope: InstrumentationScope,
    /// By (model, location).
    upstreams: HashMap<(String, String), Upstream>,
    /// By model: its first location's, for requests that never got one.
    providers: HashMap<String, Arc<str>>,
    queue: export::Queue,
    exporter: export::Handle,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the exporter's headers.
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Starts the exporter if `[telemetry]` names an endpoint (`None` if it
    /// does not). Must run inside the tokio runtime: the export task is
    /// spawned on it.
    pub fn start(
        settings: &Settings,
        catalog: &Catalog,
        metrics: &Metrics,
    ) -> Result<Option<Arc<Self>>, String> {
        let t = &settings.telemetry;
        if !t.enabled() {
            return Ok(None);
        }
        let resource = Resource::builder()
            .with_service_name(t.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let (queue, exporter) = export::start(t, resource, metrics)?;
        if t.otlp_endpoint.trim().starts_with("http://")
            && !t.headers.is_empty()
            && !is_loopback(t.otlp_endpoint.trim())
        {
            tracing::warn!(
                endpoint = %t.otlp_endpoint,
                "telemetry.headers are sent over plain http to a host that is not loopback; use https:// for a collector outside this machine"
            );
        }
        tracing::info!(
            endpoint = %t.traces_url(),
            sample_ratio = t.sample_ratio,
            queue_size = t.queue_size,
            "exporting traces (OTLP/HTTP)"
        );
        Ok(Some(Arc::new(Self {
            sampler: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(t.sample_ratio))),
            ids: RandomIdGenerator::default(),
            propagator: TraceContextPropagator::new(),
            scope: InstrumentationScope::builder("spillway")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            upstreams: upstreams(settings, catalog),
            providers: catalog
                .models()
                .iter()
                .filter_map(|m| {
                    let first = m.regions.first()?;
                    Some((m.id.as_str().to_string(), provider_name(&first.provider)))
                })
                .collect(),
            queue,
            exporter,
        })))
    }

    /// The span of a request that just arrived: a child of the client's
    /// `traceparent` if it sent a valid one, else the root of a new trace,
    /// sampled as the parent says or by `sample_ratio`.
    pub fn incoming(&self, headers: &http::HeaderMap) -> RequestSpan {
        let cx = self
            .propagator
            .extract_with_context(&Context::new(), &HeaderCarrier(headers));
        let parent = cx.span().span_context().clone();
        let parent = parent.is_valid().then_some(parent);
        self.start_span(parent.as_ref().map(|_| &cx), parent, None)
    }

    /// The span of one batch item's call: a new trace, linked to the span
    /// of the request that created its batch when that was stored.
    pub fn batch_item(&self, batch_id: &str, traceparent: Option<&str>) -> RequestSpan {
        let link = traceparent.and_then(|value| {
            let cx = self
                .propagator
                .extract_with_context(&Context::new(), &TraceparentCarrier(value));
            let sc = cx.span().span_context().clone();
            sc.is_valid().then_some(sc)
        });
        self.start_span(
            None,
            None,
            Some(BatchOrigin {
                id: Arc::from(batch_id),
                link,
            }),
        )
    }

    fn start_span(
        &self,
        parent_cx: Option<&Context>,
        parent: Option<SpanContext>,
        batch: Option<BatchOrigin>,
    ) -> RequestSpan {
        let trace_id = parent
            .as_ref()
            .map_or_else(|| self.ids.new_trace_id(), |p| p.trace_id());
        let decision =
            self.sampler
                .should_sample(parent_cx, trace_id, "", &SpanKind::Server, &[], &[]);
        let flags = match decision.decision {
            SamplingDecision::RecordAndSample => TraceFlags::SAMPLED,
            _ => TraceFlags::default(),
        };
        RequestSpan {
            context: SpanContext::new(
                trace_id,
                self.ids.new_span_id(),
                flags,
                false,
                decision.trace_state,
            ),
            parent,
            batch: batch.map(Box::new),
            received: Instant::now(),
            received_at: SystemTime::now(),
        }
    }

    /// Records a finished model request (from the observer): its span and
    /// one per upstream attempt, queued for export.
    pub fn call_done(&self, span: &CallSpan, facts: &CallFacts<'_>) {
        if self.queue.refuse_unbuilt(1 + span.upstream.len() as u64) {
            return;
        }
        let ids = || self.ids.new_span_id();
        let upstream = |location: &str| self.upstreams.get(&(facts.model.into(), location.into()));
        let provider = upstream(facts.location)
            .map(|u| Arc::clone(&u.provider))
            .or_else(|| self.providers.get(facts.model).cloned())
            .unwrap_or_else(|| Arc::from(VERTEX_AI));
        let now = Instant::now();
        self.queue
            .push(spans::call_span(&self.scope, span, facts, &provider, now));
        for (n, attempt) in span.upstream.iter().enumerate() {
            let host = upstream(&attempt.location).and_then(|u| u.host.clone());
            self.queue.push(spans::attempt_span(
                &self.scope,
                span,
                attempt,
                n + 1,
                host.as_ref().map(|(h, p)| (&**h, *p)),
                ids(),
                now,
            ));
        }
    }

    /// Records a request that was no model call (an API call, or a model
    /// request refused before it became one).
    pub fn http_done(&self, span: &RequestSpan, request: HttpFacts<'_>) {
        if self.queue.refuse_unbuilt(1) {
            return;
        }
        self.queue.push(spans::http_span(
            &self.scope,
            span,
            &request,
            Instant::now(),
        ));
    }

    /// Sends what is queued, within `within`, and stops exporting. Never
    /// takes longer: what is not out by then is dropped (and counted).
    pub async fn shutdown(&self, within: Duration) {
        self.queue.close();
        self.exporter.stop(within).await;
    }
}

/// The start of one request's span, from its arrival: its context (ids and
/// sampled flag), its remote parent, and for a batch item its batch.
#[derive(Debug, Clone)]
pub struct RequestSpan {
    context: SpanContext,
    parent: Option<SpanContext>,
    batch: Option<Box<BatchOrigin>>,
    /// When the request arrived, on both clocks: every later instant is
    /// placed on the wall clock from its distance to this one.
    received: Instant,
    received_at: SystemTime,
}

#[derive(Debug, Clone)]
struct BatchOrigin {
    id: Arc<str>,
    link: Option<SpanContext>,
}

impl RequestSpan {
    /// Whether this request's spans are recorded.
    pub fn sampled(&self) -> bool {
        self.context.is_sampled()
    }

    /// The span's W3C `traceparent` (stored with a batch, for its items' links).
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.context.trace_id(),
            self.context.span_id(),
            self.context.trace_flags().to_u8()
        )
    }

    /// `at` on the wall clock.
    fn wall(&self, at: Instant) -> SystemTime {
        self.received_at + at.saturating_duration_since(self.received)
    }

    #[cfg(test)]
    fn context(&self) -> &SpanContext {
        &self.context
    }
}

/// What a model request's span needs beyond the trace's own facts, carried
/// in its `Trace` (boxed: one pointer when traces are off).
#[derive(Debug, Clone)]
pub struct CallSpan {
    start: RequestSpan,
    /// `gen_ai.operation.name`: `chat`, or `count_tokens`.
    operation: &'static str,
    max_tokens: u64,
    stream: bool,
    /// Each upstream HTTP request, in order.
    upstream: Vec<UpstreamAttempt>,
    stop_reason: Option<StopReason>,
}

/// One upstream HTTP request.
#[derive(Debug, Clone)]
pub struct UpstreamAttempt {
    pub location: Arc<str>,
    pub started: Instant,
    /// Headers in, or the failure; for the answer that was relayed, when
    /// its body was whole (a unary answer) or its stream ended.
    pub ended: Instant,
    pub status: AttemptStatus,
}

/// How an upstream attempt answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptStatus {
    Http(u16),
    Timeout,
    Transport,
    /// No usable credential to send.
    Credentials,
}

impl CallSpan {
    pub fn new(start: RequestSpan, operation: &'static str, max_tokens: u64, stream: bool) -> Self {
        Self {
            start,
            operation,
            max_tokens,
            stream,
            upstream: Vec::new(),
            stop_reason: None,
        }
    }

    /// One upstream attempt, started at `started`, answered now.
    pub fn attempted(&mut self, location: &Arc<str>, started: Instant, status: AttemptStatus) {
        self.upstream.push(UpstreamAttempt {
            location: Arc::clone(location),
            started,
            ended: Instant::now(),
            status,
        });
    }

    /// The answer was read whole (a unary body): the last attempt ends now.
    pub fn body_read(&mut self, stop_reason: Option<StopReason>) {
        if let Some(last) = self.upstream.last_mut() {
            last.ended = Instant::now();
        }
        self.stop_reason = stop_reason;
    }

    /// A stream ended: why the model stopped, if it said.
    pub fn stream_ended(&mut self, stop_reason: Option<StopReason>) {
        self.stop_reason = stop_reason;
    }
}

/// A finished model request, as the observer knows it.
pub struct CallFacts<'a> {
    pub request_id: &'a str,
    pub tenant: &'a str,
    pub model: &'a str,
    /// The chosen location; empty if none was.
    pub location: &'a str,
    pub attempts: u32,
    pub queue_wait: Duration,
    pub content_class: &'a str,
    /// The input estimate before its margin.
    pub point_input: u64,
    pub reserved: Charge,
    pub outcome: &'a str,
    pub status: u16,
    pub usage: &'a Usage,
}

/// A request that was no model call.
pub struct HttpFacts<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    /// The matched route template, if one matched.
    pub route: Option<&'a str>,
    pub status: u16,
    pub request_id: &'a str,
    /// A model request refused before forwarding: an error whatever its status.
    pub model_request: bool,
}

/// `gen_ai.provider.name` for a configured provider name.
fn provider_name(provider: &str) -> Arc<str> {
    if provider == spillway_core::VERTEX_PROVIDER {
        Arc::from(VERTEX_AI)
    } else {
        Arc::from(provider)
    }
}

/// Every (model, location)'s provider and, for Vertex, host and port by the
/// SDK's host rule (`upstream.global_url`, `multi_region_urls`,
/// `regional_url`): configuration only.
fn upstreams(settings: &Settings, catalog: &Catalog) -> HashMap<(String, String), Upstream> {
    let up = &settings.upstream;
    let mut out = HashMap::new();
    for model in catalog.models() {
        for location in &model.regions {
            let region = location.region.as_str();
            let host = (location.provider == spillway_core::VERTEX_PROVIDER)
                .then(|| {
                    let base = if region == "global" {
                        up.global_url.clone()
                    } else if let Some(url) = up.multi_region_urls.get(region) {
                        url.clone()
                    } else {
                        up.regional_url.replace("{region}", region)
                    };
                    host_and_port(&base)
                })
                .flatten();
            out.insert(
                (model.id.as_str().to_string(), region.to_string()),
                Upstream {
                    provider: provider_name(&location.provider),
                    host,
                },
            );
        }
    }
    out
}

fn host_and_port(url: &str) -> Option<(Arc<str>, u16)> {
    let uri = url.parse::<http::Uri>().ok()?;
    let host = uri.host()?;
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("http") => 80,
        _ => 443,
    });
    Some((
        Arc::from(host.trim_start_matches('[').trim_end_matches(']')),
        port,
    ))
}

fn is_loopback(url: &str) -> bool {
    url.parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned))
        .is_some_and(|host| {
            host == "localhost"
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        })
}

/// Request headers as the propagator reads them.
struct HeaderCarrier<'a>(&'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// A stored `traceparent`, as the propagator reads it.
struct TraceparentCarrier<'a>(&'a str);

impl Extractor for TraceparentCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

#[cfg(test)]
mod tests;
