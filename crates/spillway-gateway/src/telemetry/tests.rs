use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::{SpanKind, Status, TraceId};
use opentelemetry::{Array, Value};
use spillway_core::ledger::Charge;
use spillway_vertex::{StopReason, Usage};

use super::*;
use crate::config::{Settings, DEMO_TOML};

const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

fn settings(extra: &str) -> Settings {
    // Nothing listens there: these tests never export.
    let overlay = format!("[telemetry]\notlp_endpoint = \"http://127.0.0.1:9\"\n{extra}");
    Settings::load_layers(&[DEMO_TOML, &overlay], &[], Some(Default::default())).unwrap()
}

fn telemetry(extra: &str) -> Arc<Telemetry> {
    let s = settings(extra);
    let catalog = s.catalog().unwrap();
    Telemetry::start(&s, &catalog, &Metrics::new())
        .unwrap()
        .expect("on")
}

fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
    pairs
        .iter()
        .map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap()))
        .collect()
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

use opentelemetry_sdk::trace::SpanData;

#[tokio::test]
async fn off_without_an_endpoint() {
    let s = Settings::load_layers(&[DEMO_TOML], &[], Some(Default::default())).unwrap();
    let catalog = s.catalog().unwrap();
    assert!(Telemetry::start(&s, &catalog, &Metrics::new())
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_client_traceparent_is_continued_with_its_state_and_decision() {
    let t = telemetry("");
    let sampled = t.incoming(&headers(&[
        (
            "traceparent",
            &format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
        ),
        ("tracestate", "vendor=opaque"),
    ]));
    assert!(sampled.sampled());
    assert_eq!(
        sampled.context().trace_id(),
        TraceId::from_hex(CLIENT_TRACE).unwrap()
    );
    let parent = sampled.parent.as_ref().expect("a remote parent");
    assert!(parent.is_remote());
    assert_eq!(format!("{:016x}", parent.span_id()), CLIENT_SPAN);
    assert_ne!(sampled.context().span_id(), parent.span_id());
    assert_eq!(sampled.context().trace_state().header(), "vendor=opaque");
    assert!(sampled
        .traceparent()
        .starts_with(&format!("00-{CLIENT_TRACE}-")));
    assert!(sampled.traceparent().ends_with("-01"));

    // The caller decided not to sample: neither does Spillway.
    let unsampled = t.incoming(&headers(&[(
        "traceparent",
        &format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"),
    )]));
    assert!(!unsampled.sampled());
    assert!(unsampled.traceparent().ends_with("-00"));

    // A malformed one starts a new trace.
    let fresh = t.incoming(&headers(&[("traceparent", "00-zz-yy-01")]));
    assert!(fresh.parent.is_none() && fresh.sampled());
    assert_ne!(
        fresh.context().trace_id(),
        TraceId::from_hex(CLIENT_TRACE).unwrap()
    );
}

#[tokio::test]
async fn the_ratio_decides_for_new_traces_only() {
    let never = telemetry("sample_ratio = 0.0");
    assert!(!never.incoming(&http::HeaderMap::new()).sampled());
    // A sampled caller is followed whatever the ratio.
    assert!(never
        .incoming(&headers(&[(
            "traceparent",
            &format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
        )]))
        .sampled());
    let half = telemetry("sample_ratio = 0.5");
    let sampled = (0..2000)
        .filter(|_| half.incoming(&http::HeaderMap::new()).sampled())
        .count();
    assert!((800..1200).contains(&sampled), "{sampled} of 2000");
}

#[tokio::test]
async fn batch_items_start_a_trace_linked_to_their_batch() {
    let t = telemetry("");
    let created = t.incoming(&http::HeaderMap::new());
    let item = t.batch_item("msgbatch_1", Some(&created.traceparent()));
    assert!(item.parent.is_none());
    assert_ne!(item.context().trace_id(), created.context().trace_id());
    let batch = item.batch.as_ref().unwrap();
    assert_eq!(&*batch.id, "msgbatch_1");
    let link = batch.link.as_ref().unwrap();
    assert_eq!(link.trace_id(), created.context().trace_id());
    assert_eq!(link.span_id(), created.context().span_id());
    // No stored context (traces were off when the batch was made): no link.
    let unlinked = t.batch_item("msgbatch_2", None);
    assert!(unlinked.batch.as_ref().unwrap().link.is_none());
    let garbage = t.batch_item("msgbatch_3", Some("nonsense"));
    assert!(garbage.batch.as_ref().unwrap().link.is_none());
}

#[tokio::test]
async fn a_call_becomes_a_server_span_and_one_client_span_per_attempt() {
    let t = telemetry("");
    let start = t.incoming(&headers(&[(
        "traceparent",
        &format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
    )]));
    let mut call = CallSpan::new(start, "chat", 64, false);
    let (primary, fallback): (Arc<str>, Arc<str>) = ("us-central1".into(), "europe-west4".into());
    call.attempted(&primary, Instant::now(), AttemptStatus::Http(429));
    call.attempted(&fallback, Instant::now(), AttemptStatus::Http(200));
    call.body_read(Some(StopReason::MaxTokens));
    let usage = Usage {
        input_tokens: 10,
        output_tokens: 64,
        cache_read_input_tokens: 5,
        cache_creation_input_tokens: 0,
        cache_creation_1h_input_tokens: 0,
    };
    let facts = CallFacts {
        request_id: "req_1",
        tenant: "search",
        model: "claude-3-haiku@20240307",
        location: "europe-west4",
        attempts: 2,
        queue_wait: Duration::from_millis(3),
        content_class: "prose",
        point_input: 12,
        reserved: Charge {
            input: 14,
            output: 40,
        },
        outcome: "ok",
        status: 200,
        usage: &usage,
    };
    let now = Instant::now();
    let server = spans::call_span(&t.scope, &call, &facts, VERTEX_AI, now);
    assert_eq!(server.name, "chat claude-3-haiku@20240307");
    assert_eq!(server.span_kind, SpanKind::Server);
    assert_eq!(format!("{:016x}", server.parent_span_id), CLIENT_SPAN);
    assert!(server.parent_span_is_remote);
    assert_eq!(server.status, Status::Unset);
    assert!(server.start_time <= server.end_time);
    for (key, value) in [
        ("gen_ai.operation.name", Value::from("chat")),
        ("gen_ai.provider.name", Value::from(VERTEX_AI)),
        (
            "gen_ai.request.model",
            Value::from("claude-3-haiku@20240307"),
        ),
        ("gen_ai.request.max_tokens", Value::I64(64)),
        ("gen_ai.usage.input_tokens", Value::I64(15)),
        ("gen_ai.usage.output_tokens", Value::I64(64)),
        ("gen_ai.usage.cache_read.input_tokens", Value::I64(5)),
        (
            "gen_ai.response.finish_reasons",
            Value::Array(Array::String(vec!["max_tokens".into()])),
        ),
        ("spillway.tenant", Value::from("search")),
        ("spillway.location", Value::from("europe-west4")),
        ("spillway.attempts", Value::I64(2)),
        ("spillway.estimated_input_tokens", Value::I64(12)),
        ("spillway.reserved_input_tokens", Value::I64(14)),
        ("spillway.reserved_output_tokens", Value::I64(40)),
        ("spillway.outcome", Value::from("ok")),
        ("spillway.request_id", Value::from("req_1")),
    ] {
        assert_eq!(attr(&server, key), Some(&value), "{key}");
    }
    assert!(attr(&server, "error.type").is_none());

    let upstream = |location: &str| t.upstreams.get(&(facts.model.into(), location.into()));
    let host = upstream("us-central1")
        .and_then(|u| u.host.clone())
        .unwrap();
    assert_eq!(
        (&*host.0, host.1),
        ("127.0.0.1", 8790),
        "the demo's simulator URL"
    );
    let first = spans::attempt_span(
        &t.scope,
        &call,
        &call.upstream[0],
        1,
        Some((&host.0, host.1)),
        t.ids.new_span_id(),
        now,
    );
    assert_eq!(first.name, "POST us-central1");
    assert_eq!(first.span_kind, SpanKind::Client);
    assert_eq!(first.parent_span_id, server.span_context.span_id());
    assert_eq!(
        first.span_context.trace_id(),
        server.span_context.trace_id()
    );
    assert_eq!(first.status, Status::error("HTTP 429"));
    assert_eq!(
        attr(&first, "http.response.status_code"),
        Some(&Value::I64(429))
    );
    assert_eq!(attr(&first, "error.type"), Some(&Value::from("429")));
    assert_eq!(
        attr(&first, "server.address"),
        Some(&Value::from("127.0.0.1"))
    );
    assert_eq!(attr(&first, "spillway.attempt"), Some(&Value::I64(1)));
}

#[tokio::test]
async fn failures_are_errors_with_their_outcome() {
    let t = telemetry("");
    let mut call = CallSpan::new(t.incoming(&http::HeaderMap::new()), "chat", 64, true);
    let region: Arc<str> = "us-central1".into();
    call.attempted(&region, Instant::now(), AttemptStatus::Timeout);
    let usage = Usage::default();
    let facts = CallFacts {
        request_id: "req_2",
        tenant: "anonymous",
        model: "claude-3-haiku@20240307",
        location: "",
        attempts: 1,
        queue_wait: Duration::ZERO,
        content_class: "-",
        point_input: 0,
        reserved: Charge::default(),
        outcome: "attempts_exhausted",
        status: 502,
        usage: &usage,
    };
    let now = Instant::now();
    let server = spans::call_span(&t.scope, &call, &facts, VERTEX_AI, now);
    assert_eq!(
        server.status,
        Status::error("attempts_exhausted (HTTP 502)")
    );
    assert_eq!(
        attr(&server, "error.type"),
        Some(&Value::from("attempts_exhausted"))
    );
    assert!(attr(&server, "gen_ai.usage.input_tokens").is_none());
    assert!(attr(&server, "spillway.location").is_none());
    assert!(server.parent_span_id == opentelemetry::trace::SpanId::INVALID);
    let attempt = spans::attempt_span(
        &t.scope,
        &call,
        &call.upstream[0],
        1,
        None,
        t.ids.new_span_id(),
        now,
    );
    assert_eq!(attempt.status, Status::error("timeout"));
    assert!(attr(&attempt, "server.address").is_none());
}
