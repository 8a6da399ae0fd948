//! Spans from the facts of a finished request: plain functions, built after
//! the fact with the request's real start and end times.

use std::borrow::Cow;
use std::time::Instant;

use opentelemetry::trace::{Link, SpanContext, SpanId, SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use super::{AttemptStatus, CallFacts, CallSpan, HttpFacts, RequestSpan, UpstreamAttempt};

fn kv(key: &'static str, value: impl Into<Value>) -> KeyValue {
    KeyValue::new(key, value)
}

fn int(n: u64) -> Value {
    Value::I64(i64::try_from(n).unwrap_or(i64::MAX))
}

fn ms(d: std::time::Duration) -> Value {
    Value::F64(d.as_secs_f64() * 1000.0)
}

fn owned(s: &str) -> Value {
    Value::String(StringValue::from(s.to_string()))
}

/// A span's parent id and whether that parent is a caller's.
fn parent_of(start: &RequestSpan) -> (SpanId, bool) {
    start
        .parent
        .as_ref()
        .map_or((SpanId::INVALID, false), |p| (p.span_id(), true))
}

/// A batch item's link to the span that created its batch.
fn links_of(start: &RequestSpan) -> SpanLinks {
    let links = start
        .batch
        .as_ref()
        .and_then(|b| {
            let context = b.link.clone()?;
            Some(Link::new(
                context,
                vec![KeyValue::new("spillway.batch.id", owned(&b.id))],
                0,
            ))
        })
        .into_iter()
        .collect();
    let mut out = SpanLinks::default();
    out.links = links;
    out
}

/// A span of `kind` named `name`, its other parts to be filled in.
fn new_span(
    scope: &InstrumentationScope,
    context: SpanContext,
    kind: SpanKind,
    name: String,
) -> SpanData {
    SpanData {
        span_context: context,
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: kind,
        name: Cow::Owned(name),
        start_time: std::time::UNIX_EPOCH,
        end_time: std::time::UNIX_EPOCH,
        attributes: Vec::new(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope.clone(),
    }
}

/// The model request's server span, ending at `now`.
pub(super) fn call_span(
    scope: &InstrumentationScope,
    call: &CallSpan,
    facts: &CallFacts<'_>,
    provider: &str,
    now: Instant,
) -> SpanData {
    let start = &call.start;
    let usage = facts.usage;
    let mut a = Vec::with_capacity(28);
    a.push(kv("gen_ai.operation.name", call.operation));
    a.push(kv("gen_ai.provider.name", owned(provider)));
    a.push(kv("gen_ai.request.model", owned(facts.model)));
    if call.max_tokens > 0 {
        a.push(kv("gen_ai.request.max_tokens", int(call.max_tokens)));
    }
    if usage.total() > 0 {
        // Semconv: input includes cached tokens; the cache parts besides.
        a.push(kv("gen_ai.usage.input_tokens", int(usage.total_input())));
        a.push(kv("gen_ai.usage.output_tokens", int(usage.output_tokens)));
        a.push(kv(
            "gen_ai.usage.cache_read.input_tokens",
            int(usage.cache_read_input_tokens),
        ));
        a.push(kv(
            "gen_ai.usage.cache_creation.input_tokens",
            int(usage.cache_creation_input_tokens),
        ));
    }
    if let Some(reason) = call.stop_reason {
        a.push(kv(
            "gen_ai.response.finish_reasons",
            Value::Array(Array::String(vec![StringValue::from(reason.as_str())])),
        ));
    }
    a.push(kv("http.response.status_code", i64::from(facts.status)));
    a.push(kv("spillway.request_id", owned(facts.request_id)));
    a.push(kv("spillway.tenant", owned(facts.tenant)));
    if !facts.location.is_empty() {
        a.push(kv("spillway.location", owned(facts.location)));
    }
    a.push(kv("spillway.attempts", i64::from(facts.attempts)));
    a.push(kv("spillway.stream", call.stream));
    a.push(kv("spillway.queue_wait_ms", ms(facts.queue_wait)));
    a.push(kv("spillway.content_class", owned(facts.content_class)));
    a.push(kv(
        "spillway.estimated_input_tokens",
        int(facts.point_input),
    ));
    a.push(kv(
        "spillway.reserved_input_tokens",
        int(facts.reserved.input),
    ));
    a.push(kv(
        "spillway.reserved_output_tokens",
        int(facts.reserved.output),
    ));
    a.push(kv("spillway.outcome", owned(facts.outcome)));
    if let Some(batch) = &start.batch {
        a.push(kv("spillway.batch.id", owned(&batch.id)));
    }
    let status = if facts.outcome == "ok" {
        Status::Unset
    } else {
        a.push(kv("error.type", owned(facts.outcome)));
        Status::error(format!("{} (HTTP {})", facts.outcome, facts.status))
    };
    let mut span = new_span(
        scope,
        start.context.clone(),
        SpanKind::Server,
        format!("{} {}", call.operation, facts.model),
    );
    (span.parent_span_id, span.parent_span_is_remote) = parent_of(start);
    (span.start_time, span.end_time) = (start.wall(start.received), start.wall(now));
    span.attributes = a;
    span.links = links_of(start);
    span.status = status;
    span
}

/// The client span of upstream attempt `n` (from 1), a child of the call's.
/// The attempt whose answer was streamed ends with the stream, at `now`.
pub(super) fn attempt_span(
    scope: &InstrumentationScope,
    call: &CallSpan,
    attempt: &UpstreamAttempt,
    n: usize,
    host: Option<(&str, u16)>,
    span_id: SpanId,
    now: Instant,
) -> SpanData {
    let start = &call.start;
    let last = n == call.upstream.len();
    let streamed = last && call.stream && matches!(attempt.status, AttemptStatus::Http(200..=299));
    let ended = if streamed { now } else { attempt.ended };
    let mut a = Vec::with_capacity(8);
    a.push(kv("http.request.method", "POST"));
    if let Some((address, port)) = host {
        a.push(kv("server.address", owned(address)));
        a.push(kv("server.port", i64::from(port)));
    }
    a.push(kv("spillway.location", owned(&attempt.location)));
    a.push(kv("spillway.attempt", n as i64));
    let error = match attempt.status {
        AttemptStatus::Http(code) => {
            a.push(kv("http.response.status_code", i64::from(code)));
            (code >= 400).then(|| code.to_string())
        }
        AttemptStatus::Timeout => Some("timeout".to_string()),
        AttemptStatus::Transport => Some("transport".to_string()),
        AttemptStatus::Credentials => Some("credentials".to_string()),
    };
    let status = match error {
        Some(kind) => {
            let description = match attempt.status {
                AttemptStatus::Http(code) => format!("HTTP {code}"),
                _ => kind.clone(),
            };
            a.push(kv("error.type", Value::String(kind.into())));
            Status::error(description)
        }
        None => Status::Unset,
    };
    let context = SpanContext::new(
        start.context.trace_id(),
        span_id,
        start.context.trace_flags(),
        false,
        start.context.trace_state().clone(),
    );
    let mut span = new_span(
        scope,
        context,
        SpanKind::Client,
        format!("POST {}", attempt.location),
    );
    span.parent_span_id = start.context.span_id();
    (span.start_time, span.end_time) = (start.wall(attempt.started), start.wall(ended));
    span.attributes = a;
    span.status = status;
    span
}

/// A request that was no model call: an HTTP server span.
pub(super) fn http_span(
    scope: &InstrumentationScope,
    start: &RequestSpan,
    request: &HttpFacts<'_>,
    now: Instant,
) -> SpanData {
    let mut a = Vec::with_capacity(6);
    a.push(kv("http.request.method", owned(request.method.as_str())));
    a.push(kv("url.path", owned(request.path)));
    if let Some(route) = request.route {
        a.push(kv("http.route", owned(route)));
    }
    a.push(kv("http.response.status_code", i64::from(request.status)));
    a.push(kv("spillway.request_id", owned(request.request_id)));
    let failed = request.status >= 500 || (request.model_request && request.status >= 400);
    let status = if failed {
        a.push(kv(
            "error.type",
            Value::String(request.status.to_string().into()),
        ));
        Status::error(format!("HTTP {}", request.status))
    } else {
        Status::Unset
    };
    let name = match request.route {
        Some(route) => format!("{} {route}", request.method),
        None => request.method.to_string(),
    };
    let mut span = new_span(scope, start.context.clone(), SpanKind::Server, name);
    (span.parent_span_id, span.parent_span_is_remote) = parent_of(start);
    (span.start_time, span.end_time) = (start.wall(start.received), start.wall(now));
    span.attributes = a;
    span.links = links_of(start);
    span.status = status;
    span
}
