//! OpenTelemetry traces end to end: the real gateway in front of the
//! simulator, exporting to a real OTLP/HTTP receiver run by the test (a
//! small axum server taking `POST /v1/traces` and decoding each body as
//! the protobuf `ExportTraceServiceRequest` it must be). Then a collector
//! that refuses connections and one that never answers: every request still
//! succeeds, and the dropped spans are counted.
//!
//! Real clock (the exporter's batching and timeouts are real time); every
//! wait polls with a deadline, none is a timing assertion.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{json, Value as Json};
use spillway_sim::{Fault, FaultKind, SimConfig};
use support::*;

/// One exported span and its resource's `service.name`.
#[derive(Clone)]
struct Exported {
    service: String,
    span: Span,
}

/// A real OTLP/HTTP receiver on a free loopback port.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Exported>>>,
}

impl Collector {
    async fn start() -> Self {
        let spans: Arc<Mutex<Vec<Exported>>> = Arc::default();
        let received = Arc::clone(&spans);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |headers: http::HeaderMap, body: bytes::Bytes| {
                let received = Arc::clone(&received);
                async move {
                    assert_eq!(headers["content-type"], "application/x-protobuf");
                    let request =
                        ExportTraceServiceRequest::decode(body).expect("a protobuf export request");
                    let mut spans = received.lock().unwrap();
                    for resource_spans in request.resource_spans {
                        let service = resource_spans
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|kv| kv.key == "service.name")
                            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                Value::StringValue(s) => Some(s.clone()),
                                _ => None,
                            })
                            .unwrap_or_default();
                        for scope in resource_spans.scope_spans {
                            for span in scope.spans {
                                spans.push(Exported {
                                    service: service.clone(),
                                    span,
                                });
                            }
                        }
                    }
                    (
                        [(http::header::CONTENT_TYPE, "application/x-protobuf")],
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, spans }
    }

    /// Waits (up to 20 s) until `found` picks something from the spans so far.
    async fn wait_for<T>(&self, what: &str, found: impl Fn(&[Exported]) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(t) = found(&self.spans.lock().unwrap()) {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what} in {:#?}",
                self.spans
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|e| e.span.name.clone())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server span of the request with this `request-id`.
    async fn request_span(&self, request_id: &str) -> Exported {
        self.wait_for(&format!("span of {request_id}"), |spans| {
            spans
                .iter()
                .find(|e| {
                    e.span.kind == SpanKind::Server as i32
                        && text(&e.span, "spillway.request_id").as_deref() == Some(request_id)
                })
                .cloned()
        })
        .await
    }

    /// The client spans whose parent is `parent`, in attempt order.
    fn children(&self, parent: &Span) -> Vec<Span> {
        let mut children: Vec<Span> = self
            .spans
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.span.clone())
            .filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
            .collect();
        children.sort_by_key(|s| int(s, "spillway.attempt"));
        children
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn text(span: &Span, key: &str) -> Option<String> {
    match attr(span, key)? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(span: &Span, key: &str) -> Option<i64> {
    match attr(span, key)? {
        Value::IntValue(n) => Some(*n),
        _ => None,
    }
}

fn strings(span: &Span, key: &str) -> Vec<String> {
    match attr(span, key) {
        Some(Value::ArrayValue(a)) => a
            .values
            .iter()
            .filter_map(|v| match v.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn status_code(span: &Span) -> i32 {
    span.status.as_ref().map_or(0, |s| s.code)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A gateway exporting to `endpoint`, with `extra` in its `[telemetry]`.
async fn gateway(endpoint: &str, extra: &str) -> Harness {
    // Spans leave within 50 ms unless the test says otherwise.
    let interval = if extra.contains("export_interval_ms") {
        ""
    } else {
        "export_interval_ms = 50\n"
    };
    Harness::start(&format!(
        "[quota]\nstrategy = \"ordered\"\n[telemetry]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"spillway-test\"\n{interval}{extra}"
    ))
    .await
}

fn ask(output_tokens: u32, max_tokens: u32) -> Json {
    json!({
        "model": HAIKU,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": format!("Hello SIM_OUTPUT_TOKENS={output_tokens}")}]
    })
}

/// Posts `body` to `/v1/messages` with `headers`: (status, request id,
/// served location, body).
async fn post(h: &Harness, body: &Json, headers: &[(&str, &str)]) -> (u16, String, String, Json) {
    let mut request = h.http.post(format!("{}/v1/messages", h.url)).json(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let id = response.headers()["request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let region = response
        .headers()
        .get("x-spillway-region")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (
        status,
        id,
        region,
        response.json().await.unwrap_or(Json::Null),
    )
}

#[tokio::test]
async fn a_request_is_one_server_span_with_genai_attributes_and_an_attempt_span() {
    let collector = Collector::start().await;
    let h = gateway(&collector.url, "").await;
    let (status, id, region, body) = post(&h, &ask(7, 64), &[]).await;
    assert_eq!(status, 200, "{body}");

    let exported = collector.request_span(&id).await;
    assert_eq!(exported.service, "spillway-test");
    let span = &exported.span;
    assert_eq!(span.name, format!("chat {HAIKU}"));
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert!(span.parent_span_id.is_empty(), "a new trace");
    assert_eq!(status_code(span), StatusCode::Unset as i32);
    assert_eq!(text(span, "gen_ai.operation.name").as_deref(), Some("chat"));
    assert_eq!(
        text(span, "gen_ai.provider.name").as_deref(),
        Some("gcp.vertex_ai")
    );
    assert_eq!(text(span, "gen_ai.request.model").as_deref(), Some(HAIKU));
    assert_eq!(int(span, "gen_ai.request.max_tokens"), Some(64));
    assert_eq!(int(span, "gen_ai.usage.output_tokens"), Some(7));
    assert_eq!(
        int(span, "gen_ai.usage.input_tokens"),
        body["usage"]["input_tokens"].as_i64(),
        "the simulator's usage"
    );
    assert_eq!(
        strings(span, "gen_ai.response.finish_reasons"),
        ["end_turn"]
    );
    assert_eq!(text(span, "spillway.tenant").as_deref(), Some("anonymous"));
    assert_eq!(text(span, "spillway.location"), Some(region.clone()));
    assert_eq!(region, "us-central1");
    assert_eq!(int(span, "spillway.attempts"), Some(1));
    assert_eq!(text(span, "spillway.outcome").as_deref(), Some("ok"));
    assert!(int(span, "spillway.reserved_input_tokens").is_some_and(|n| n > 0));
    assert!(int(span, "spillway.estimated_input_tokens").is_some_and(|n| n > 0));
    assert!(span.start_time_unix_nano > 0 && span.start_time_unix_nano <= span.end_time_unix_nano);

    let attempts = collector.children(span);
    assert_eq!(attempts.len(), 1);
    let attempt = &attempts[0];
    assert_eq!(attempt.kind, SpanKind::Client as i32);
    assert_eq!(attempt.name, "POST us-central1");
    assert_eq!(int(attempt, "http.response.status_code"), Some(200));
    assert_eq!(
        text(attempt, "server.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        int(attempt, "server.port"),
        Some(i64::from(h.sim.addr().port()))
    );
    assert!(
        span.start_time_unix_nano <= attempt.start_time_unix_nano
            && attempt.end_time_unix_nano <= span.end_time_unix_nano,
        "the attempt lies within its request"
    );
    // No credential, no project, no URL in any attribute.
    for kv in span.attributes.iter().chain(&attempt.attributes) {
        let shown = format!("{:?}", kv.value);
        assert!(
            !shown.contains(UPSTREAM_TOKEN) && !shown.contains("http://"),
            "{}: {shown}",
            kv.key
        );
    }

    // Cut short by max_tokens: the finish reason says so.
    let (status, id, _, _) = post(&h, &ask(100, 5), &[]).await;
    assert_eq!(status, 200);
    let span = collector.request_span(&id).await.span;
    assert_eq!(
        strings(&span, "gen_ai.response.finish_reasons"),
        ["max_tokens"]
    );
    assert_eq!(int(&span, "gen_ai.usage.output_tokens"), Some(5));
}

#[tokio::test]
async fn a_fallback_has_an_attempt_span_per_location() {
    let collector = Collector::start().await;
    let h = gateway(&collector.url, "").await;
    h.sim
        .inject(Fault::region("us-central1", FaultKind::Status(429)).times(1));
    let (status, id, region, _) = post(&h, &ask(3, 64), &[]).await;
    assert_eq!((status, region.as_str()), (200, "europe-west4"));

    let span = collector.request_span(&id).await.span;
    assert_eq!(int(&span, "spillway.attempts"), Some(2));
    assert_eq!(
        text(&span, "spillway.location").as_deref(),
        Some("europe-west4")
    );
    assert_eq!(status_code(&span), StatusCode::Unset as i32);
    let attempts = collector.children(&span);
    let seen: Vec<_> = attempts
        .iter()
        .map(|a| {
            (
                text(a, "spillway.location").unwrap(),
                int(a, "http.response.status_code").unwrap(),
                status_code(a),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("us-central1".to_string(), 429, StatusCode::Error as i32),
            ("europe-west4".to_string(), 200, StatusCode::Unset as i32),
        ]
    );
    assert_eq!(text(&attempts[0], "error.type").as_deref(), Some("429"));
    assert!(attempts[0].end_time_unix_nano <= attempts[1].start_time_unix_nano);
}

#[tokio::test]
async fn a_client_traceparent_is_continued_and_its_decision_kept() {
    let collector = Collector::start().await;
    let h = gateway(&collector.url, "sample_ratio = 0.0").await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    // The caller did not sample: nothing is recorded for it.
    let (status, unsampled, _, _) = post(
        &h,
        &ask(2, 64),
        &[("traceparent", &format!("00-{trace}-{parent}-00"))],
    )
    .await;
    assert_eq!(status, 200);
    // With sample_ratio 0, a request without a traceparent is not either.
    let (_, unparented, _, _) = post(&h, &ask(2, 64), &[]).await;
    let (status, id, _, _) = post(
        &h,
        &ask(2, 64),
        &[
            ("traceparent", &format!("00-{trace}-{parent}-01")),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let span = collector.request_span(&id).await.span;
    assert_eq!(hex(&span.trace_id), trace);
    assert_eq!(hex(&span.parent_span_id), parent);
    assert_eq!(span.trace_state, "congo=t61rcWkgMzE");
    for attempt in collector.children(&span) {
        assert_eq!(hex(&attempt.trace_id), trace);
    }
    // Spans leave in order: the earlier requests would be there by now.
    let spans = collector.spans.lock().unwrap();
    for skipped in [&unsampled, &unparented] {
        assert!(
            !spans
                .iter()
                .any(|e| text(&e.span, "spillway.request_id").as_deref() == Some(skipped)),
            "{skipped} was not sampled"
        );
    }
    // Nothing of the caller's context goes upstream (the simulator records
    // the body and the headers a provider may send: auth, anthropic-*).
    let sent = h.sim.recent_requests();
    assert!(!sent.is_empty());
    assert!(
        sent.iter().all(|r| !format!("{r:?}").contains(trace)),
        "no traceparent upstream"
    );
}

#[tokio::test]
async fn a_stream_has_its_span_when_it_ends() {
    let collector = Collector::start().await;
    let h = gateway(&collector.url, "").await;
    let mut body = ask(5, 64);
    body["stream"] = json!(true);
    let response = h
        .http
        .post(format!("{}/v1/messages", h.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let events = read_events(response).await;
    assert_eq!(
        events.last().map(|(name, _)| name.as_str()),
        Some("message_stop")
    );

    let span = collector.request_span(&id).await.span;
    assert_eq!(
        attr(&span, "spillway.stream"),
        Some(&Value::BoolValue(true))
    );
    assert_eq!(int(&span, "gen_ai.usage.output_tokens"), Some(5));
    assert_eq!(
        strings(&span, "gen_ai.response.finish_reasons"),
        ["end_turn"]
    );
    assert_eq!(text(&span, "spillway.outcome").as_deref(), Some("ok"));
    let attempts = collector.children(&span);
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0].end_time_unix_nano, span.end_time_unix_nano,
        "the streamed attempt ends with the stream"
    );
}

#[tokio::test]
async fn batch_items_link_to_the_request_that_created_their_batch() {
    let collector = Collector::start().await;
    let h = gateway(&collector.url, "").await;
    let requests: Vec<Json> = ["first", "second"]
        .iter()
        .map(|custom_id| json!({"custom_id": custom_id, "params": ask(4, 64)}))
        .collect();
    let response = h
        .http
        .post(format!("{}/v1/messages/batches", h.url))
        .json(&json!({ "requests": requests }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let created_by = response.headers()["request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let batch: Json = response.json().await.unwrap();
    let batch_id = batch["id"].as_str().unwrap().to_string();

    let created = collector.request_span(&created_by).await.span;
    assert_eq!(created.name, "POST /v1/messages/batches");
    assert_eq!(int(&created, "http.response.status_code"), Some(200));

    let items = collector
        .wait_for("both items' spans", |spans| {
            let items: Vec<Span> = spans
                .iter()
                .filter(|e| text(&e.span, "spillway.batch.id").as_deref() == Some(&batch_id))
                .filter(|e| e.span.kind == SpanKind::Server as i32)
                .map(|e| e.span.clone())
                .collect();
            (items.len() == 2).then_some(items)
        })
        .await;
    for item in &items {
        assert_eq!(item.name, format!("chat {HAIKU}"));
        assert_eq!(int(item, "gen_ai.usage.output_tokens"), Some(4));
        assert_ne!(
            item.trace_id, created.trace_id,
            "an item has a trace of its own"
        );
        assert_eq!(item.links.len(), 1, "{:?}", item.links);
        let link = &item.links[0];
        assert_eq!(
            (&link.trace_id, &link.span_id),
            (&created.trace_id, &created.span_id)
        );
        assert_eq!(collector.children(item).len(), 1);
    }
}

#[tokio::test]
async fn spans_queued_at_shutdown_are_sent_within_the_grace() {
    let collector = Collector::start().await;
    // Nothing would leave before a minute: only the shutdown flush sends it.
    let mut h = gateway(
        &collector.url,
        "export_interval_ms = 60000\nbatch_size = 2048",
    )
    .await;
    let (status, id, _, _) = post(&h, &ask(2, 64), &[]).await;
    assert_eq!(status, 200);
    h.stop();
    collector.request_span(&id).await;
}

/// Polls `/metrics` until `series` reaches at least `at_least`.
async fn wait_for_series(h: &Harness, series: &str, at_least: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let value = series_value(&h.metrics().await, series);
        if value >= at_least {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "{series} = {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Requests through a gateway whose collector is `endpoint`: every one
/// succeeds, none is exported, and the spans are counted as dropped.
async fn requests_succeed_while_spans_are_dropped(endpoint: &str) {
    let h = gateway(
        endpoint,
        "queue_size = 4\nbatch_size = 2\nexport_interval_ms = 10\nexport_timeout_ms = 300",
    )
    .await;
    for _ in 0..12 {
        let (status, _, _, body) = post(&h, &ask(2, 64), &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    wait_for_series(
        &h,
        "spillway_trace_spans_dropped_total{reason=\"export_failed\"}",
        1.0,
    )
    .await;
    // 24 spans into a queue of 4 that drains one 300-ms export at a time.
    wait_for_series(
        &h,
        "spillway_trace_spans_dropped_total{reason=\"queue_full\"}",
        1.0,
    )
    .await;
    let metrics = h.metrics().await;
    assert_eq!(
        series_value(&metrics, "spillway_trace_spans_exported_total"),
        0.0
    );
    assert_eq!(
        series_value(
            &metrics,
            &format!(
                "spillway_requests_total{{model=\"{HAIKU}\",outcome=\"ok\",tenant=\"anonymous\"}}"
            )
        ),
        12.0
    );
}

#[tokio::test]
async fn a_collector_that_refuses_connections_costs_requests_nothing() {
    // A port that was free a moment ago: connections are refused.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    requests_succeed_while_spans_are_dropped(&format!("http://{closed}")).await;
}

#[tokio::test]
async fn a_collector_that_never_answers_costs_requests_nothing() {
    // Accepts connections and never reads or answers: every export waits
    // until export_timeout_ms. (A non-routable address would do the same
    // from the connect side; loopback keeps the test on this machine.)
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    requests_succeed_while_spans_are_dropped(&format!("http://{addr}")).await;
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_traced() {
    let h = Harness::start_with("", SimConfig::vertex_defaults()).await;
    let (status, _, _, _) = post(&h, &ask(2, 64), &[]).await;
    assert_eq!(status, 200);
    let metrics = h.metrics().await;
    assert_eq!(
        series_value(&metrics, "spillway_trace_spans_exported_total"),
        0.0
    );
    for reason in ["queue_full", "export_failed", "shutdown"] {
        assert_eq!(
            series_value(
                &metrics,
                &format!("spillway_trace_spans_dropped_total{{reason=\"{reason}\"}}")
            ),
            0.0
        );
    }
}
