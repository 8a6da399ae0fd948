//! End-to-end behaviour of the simulator, observed the way the gateway
//! observes it: over HTTP with reqwest.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use spillway_sim::{count_tokens, Fault, FaultKind, SimConfig, SimHandle, SimModel, Simulator};
use tokio::time::Instant;

const HAIKU: &str = "claude-3-haiku@20240307";
const SONNET: &str = "claude-3-sonnet@20240229";
const US: &str = "us-central1";
const EU: &str = "europe-west4";

async fn start(config: SimConfig) -> SimHandle {
    Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// A client with no timers of its own, so tokio's paused clock only moves
/// when the simulator (or the test) wants it to.
fn client() -> reqwest::Client {
    // reqwest has no crypto provider of its own in this workspace.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .pool_idle_timeout(None)
        .build()
        .unwrap()
}

fn body(text: &str, max_tokens: u64) -> Value {
    json!({
        "anthropic_version": "vertex-2023-10-16",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    })
}

async fn post(
    sim: &SimHandle,
    region: &str,
    model: &str,
    action: &str,
    b: &Value,
) -> reqwest::Response {
    client()
        .post(sim.predict_url("proj", region, model, action))
        .json(b)
        .send()
        .await
        .unwrap()
}

async fn post_text(
    sim: &SimHandle,
    region: &str,
    model: &str,
    action: &str,
    b: &Value,
) -> (u16, String, reqwest::header::HeaderMap) {
    let r = post(sim, region, model, action, b).await;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.text().await.unwrap(), headers)
}

fn events(sse: &str) -> Vec<(String, Value)> {
    sse.split_terminator("\n\n")
        .map(|ev| {
            let (name, data) = ev.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap().to_string();
            let data = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            (name, data)
        })
        .collect()
}

#[tokio::test]
async fn raw_predict_answers_a_vertex_message() {
    let sim = start(SimConfig::vertex_defaults()).await;
    let b = body("Hello, world! SIM_OUTPUT_TOKENS=5", 100);
    let (status, text, headers) = post_text(&sim, US, HAIKU, "rawPredict", &b).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    // Field order as Vertex sends it.
    assert!(
        text.starts_with(r#"{"model":"claude-3-haiku-20240307","id":"msg_vrtx_"#),
        "{text}"
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    let id = v["id"].as_str().unwrap();
    assert_eq!(id.len(), "msg_vrtx_".len() + 24);
    assert!(id["msg_vrtx_".len()..]
        .chars()
        .all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(v["content"][0]["text"], "lorem ipsum dolor sit amet");
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["stop_sequence"].is_null());
    let input = count_tokens(&b);
    assert_eq!(
        v["usage"],
        json!({"input_tokens": input, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 5})
    );

    // max_tokens caps the answer.
    let (_, text, _) = post_text(
        &sim,
        US,
        HAIKU,
        "rawPredict",
        &body("SIM_OUTPUT_TOKENS=50", 3),
    )
    .await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 3);

    // The runtime default applies without a directive.
    sim.set_default_output_tokens(2);
    let (_, text, _) = post_text(&sim, US, HAIKU, "rawPredict", &body("hi", 100)).await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["usage"]["output_tokens"], 2);

    let c = sim.counters(US, HAIKU);
    assert_eq!((c.requests, c.succeeded), (3, 3));
    assert_eq!(c.output_tokens, 5 + 3 + 2);
    assert_eq!(sim.total_requests(), 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn stream_has_vertex_framing() {
    let sim = start(SimConfig::vertex_defaults()).await;
    let b = body("SIM_OUTPUT_TOKENS=6", 100);
    let (status, text, headers) = post_text(&sim, EU, HAIKU, "streamRawPredict", &b).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream; charset=utf-8");

    // Raw bytes: padding before the closing brace, ping spacing.
    assert!(text.starts_with("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-3-haiku-20240307\",\"id\":\"msg_vrtx_"));
    assert!(
        text.contains("\"output_tokens\":2}}             }\n\n"),
        "{text}"
    );
    assert!(text.contains("event: ping\ndata: {\"type\": \"ping\"}\n\n"));
    assert!(text.contains("\"text\":\"\"}         }\n\n"));
    assert!(text.contains("{\"type\":\"text_delta\",\"text\":\" ipsum\"}   }\n\n"));
    assert!(text.contains(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0   }\n\n"
    ));
    assert!(
        text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"              }\n\n")
    );

    let evs = events(&text);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "vertex_event",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    for (name, data) in &evs {
        assert_eq!(data["type"], name.as_str());
    }
    let input = count_tokens(&b);
    assert_eq!(evs[0].1["message"]["usage"]["input_tokens"], input);
    let start_out = evs[0].1["message"]["usage"]["output_tokens"]
        .as_u64()
        .unwrap();
    assert!((1..=4).contains(&start_out));
    let text_out: String = evs
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text_out, "lorem ipsum dolor sit amet consectetur");
    assert_eq!(evs[11].1["usage"], json!({"output_tokens": 6}));
    assert_eq!(evs[11].1["delta"]["stop_reason"], "end_turn");

    let c = sim.counters(EU, HAIKU);
    assert_eq!(
        (c.streams_started, c.streams_completed, c.succeeded),
        (1, 1, 1)
    );
    assert_eq!((c.input_tokens, c.output_tokens), (input, 6));
    sim.shutdown().await;
}

#[tokio::test]
async fn vertex_event_can_be_turned_off() {
    let sim = start(SimConfig {
        emit_vertex_event: false,
        ..SimConfig::vertex_defaults()
    })
    .await;
    let (_, text, _) = post_text(&sim, US, SONNET, "streamRawPredict", &body("x", 100)).await;
    assert!(!text.contains("vertex_event"));
    assert_eq!(events(&text).len(), 6 + 12);
    sim.shutdown().await;
}

#[tokio::test]
async fn model_not_in_region_is_google_404_object_or_array() {
    let sim = start(SimConfig::vertex_defaults()).await;
    let expected = json!({"error": {"code": 404, "message": "Publisher Model `projects/proj/locations/europe-west4/publishers/anthropic/models/claude-3-sonnet@20240229` was not found or your project does not have access to it. Please ensure you are using a valid model version. For more information, see: https://cloud.google.com/vertex-ai/generative-ai/docs/model-reference/claude", "status": "NOT_FOUND"}});
    let (status, text, _) = post_text(&sim, EU, SONNET, "rawPredict", &body("x", 10)).await;
    assert_eq!(status, 404);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), expected);
    let (status, text, _) = post_text(&sim, EU, SONNET, "streamRawPredict", &body("x", 10)).await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!([expected])
    );
    let (status, _, _) = post_text(&sim, "mars-north1", HAIKU, "rawPredict", &body("x", 10)).await;
    assert_eq!(status, 404);
    assert_eq!(sim.counters(EU, SONNET).errors.get(&404), Some(&2));
    sim.shutdown().await;
}

#[tokio::test]
async fn validation_errors_are_anthropic_shaped() {
    let sim = start(SimConfig::vertex_defaults()).await;
    let cases = [
        (
            json!({"model": "x", "anthropic_version": "vertex-2023-10-16", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}),
            "model: Extra inputs are not permitted",
        ),
        (
            json!({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}),
            "anthropic_version: Field required",
        ),
        (
            json!({"anthropic_version": "v", "messages": [{"role": "user", "content": "x"}]}),
            "max_tokens: Field required",
        ),
        (
            json!({"anthropic_version": "v", "max_tokens": 1}),
            "messages: Field required",
        ),
        (
            json!({"anthropic_version": "v", "max_tokens": 1e40, "messages": []}),
            "max_tokens: Input should be a valid integer",
        ),
    ];
    for (b, message) in cases {
        for action in ["rawPredict", "streamRawPredict"] {
            let (status, text, _) = post_text(&sim, US, HAIKU, action, &b).await;
            assert_eq!(status, 400);
            assert_eq!(
                serde_json::from_str::<Value>(&text).unwrap(),
                json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}})
            );
        }
    }
    // Any anthropic_version string is accepted (the SDK may send its own).
    let mut b = body("x", 5);
    b["anthropic_version"] = json!("2023-06-01");
    assert_eq!(post(&sim, US, HAIKU, "rawPredict", &b).await.status(), 200);

    // Garbage never panics the server.
    for raw in [&b"not json"[..], b"[1,2]", b"", b"{\"messages\":", b"\xff\xfe", b"{\"anthropic_version\":\"v\",\"max_tokens\":18446744073709551615,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image\",\"source\":{\"type\":\"base64\",\"data\":7}},5,null]}]}"] {
        let r = client()
            .post(sim.predict_url("p", US, HAIKU, "rawPredict"))
            .body(raw.to_vec())
            .send()
            .await
            .unwrap();
        assert!(r.status() == 400 || r.status() == 200, "{raw:?} -> {}", r.status());
    }
    let r = client()
        .post(format!(
            "{}/v1/projects/p/locations/{US}/publishers/anthropic/models/{HAIKU}:explode",
            sim.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    sim.shutdown().await;
}

#[tokio::test]
async fn bearer_is_checked_and_requests_are_recorded() {
    let sim = start(SimConfig {
        bearer_token: Some("good-token".into()),
        ..SimConfig::vertex_defaults()
    })
    .await;
    let url = sim.predict_url("proj", US, HAIKU, "rawPredict");
    let r = client()
        .post(&url)
        .header("x-api-key", "sk-ant-client-secret")
        .header("anthropic-version", "2023-06-01")
        .json(&body("x", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": {"code": 401, "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.", "status": "UNAUTHENTICATED"}})
    );
    let r = client()
        .post(sim.predict_url("proj", US, HAIKU, "streamRawPredict"))
        .bearer_auth("wrong")
        .json(&body("x", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.unwrap().is_array());
    let r = client()
        .post(&url)
        .bearer_auth("good-token")
        .header("anthropic-beta", "tools-2024-04-04")
        .json(&body("x", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let recs = sim.recent_requests();
    assert_eq!(recs.len(), 3);
    assert!(recs[0].has_x_api_key);
    assert_eq!(
        recs[0].anthropic_version_header.as_deref(),
        Some("2023-06-01")
    );
    assert_eq!(recs[0].authorization, None);
    assert_eq!(recs[0].status, 401);
    assert_eq!(recs[1].action, "streamRawPredict");
    let last = &recs[2];
    assert!(!last.has_x_api_key && !last.has_anthropic_version_header());
    assert_eq!(last.authorization.as_deref(), Some("Bearer good-token"));
    assert_eq!(last.anthropic_beta.as_deref(), Some("tools-2024-04-04"));
    assert_eq!(
        (
            last.region.as_str(),
            last.model.as_str(),
            last.project.as_str()
        ),
        (US, HAIKU, "proj")
    );
    assert_eq!(last.body.as_ref().unwrap(), &body("x", 5));
    assert_eq!(last.body_len, body("x", 5).to_string().len());
    assert_eq!(last.status, 200);

    // The ring buffer keeps the last 64.
    for _ in 0..70 {
        client()
            .post(&url)
            .bearer_auth("good-token")
            .json(&body("x", 5))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(sim.recent_requests().len(), 64);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn quota_is_a_strict_sliding_window() {
    let mut config = SimConfig::vertex_defaults();
    config.regions[1].models = vec![SimModel::new(HAIKU, 2, 1_000_000)];
    let sim = start(config).await;
    let b = body("x", 10);
    let t0 = Instant::now();
    assert_eq!(post(&sim, EU, HAIKU, "rawPredict", &b).await.status(), 200);
    tokio::time::advance(Duration::from_secs(40)).await;
    assert_eq!(post(&sim, EU, HAIKU, "rawPredict", &b).await.status(), 200);

    let (status, text, headers) = post_text(&sim, EU, HAIKU, "rawPredict", &b).await;
    assert_eq!(status, 429);
    assert_eq!(
        text,
        r#"{"error":{"code":429,"message":"Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model with base model: anthropic-claude-3-haiku. Please submit a quota increase request. https://cloud.google.com/vertex-ai/docs/generative-ai/quotas-genai.","status":"RESOURCE_EXHAUSTED"}}"#
    );
    assert!(headers.get("retry-after").is_none());
    // Streams get the same object wrapped in an array.
    let (status, text, _) = post_text(&sim, EU, HAIKU, "streamRawPredict", &b).await;
    assert_eq!(status, 429);
    assert!(text.starts_with("[{\"error\":{\"code\":429,") && text.ends_with("}]"));

    // 60 s after the first request it is still (exactly) in the window...
    tokio::time::advance(t0 + Duration::from_secs(60) - Instant::now()).await;
    assert_eq!(post(&sim, EU, HAIKU, "rawPredict", &b).await.status(), 429);
    // ...and just after, one slot frees (the t0+40 one is still counted).
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(post(&sim, EU, HAIKU, "rawPredict", &b).await.status(), 200);
    assert_eq!(post(&sim, EU, HAIKU, "rawPredict", &b).await.status(), 429);

    let c = sim.counters(EU, HAIKU);
    assert_eq!((c.requests, c.succeeded, c.rate_limited), (7, 3, 4));
    // Rejected requests did not consume quota.
    assert_eq!(sim.window_usage(EU, HAIKU).unwrap().requests, 2);

    // Google raised the quota.
    sim.set_quota(EU, HAIKU, 10, 1_000_000);
    assert_eq!(post(&sim, EU, HAIKU, "rawPredict", &b).await.status(), 200);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn token_quota_counts_input_plus_output() {
    let mut config = SimConfig::vertex_defaults();
    config.window = Duration::from_secs(5);
    let b = body("SIM_OUTPUT_TOKENS=20", 100);
    let per_request = count_tokens(&b) + 20;
    config.regions[1].models = vec![SimModel::new(HAIKU, 100, per_request * 2)];
    let sim = start(config).await;
    assert_eq!(post(&sim, EU, HAIKU, "rawPredict", &b).await.status(), 200);
    assert_eq!(
        post(&sim, EU, HAIKU, "streamRawPredict", &b).await.status(),
        200
    );
    let (status, text, _) = post_text(&sim, EU, HAIKU, "rawPredict", &b).await;
    assert_eq!(status, 429);
    assert!(text.contains("online_prediction_input_tokens_per_minute_per_base_model with base model: anthropic-claude-3-haiku"));
    // A smaller request still fits? No: the window is full to the token.
    let small = body("SIM_OUTPUT_TOKENS=1", 1);
    assert_eq!(
        post(&sim, EU, HAIKU, "rawPredict", &small).await.status(),
        429
    );
    // The compressed window frees everything after 5 s.
    tokio::time::advance(Duration::from_millis(5001)).await;
    assert_eq!(post(&sim, EU, HAIKU, "rawPredict", &b).await.status(), 200);

    // Split output limit names the output metric.
    sim.set_limits(
        EU,
        HAIKU,
        spillway_sim::QuotaLimits {
            requests_per_min: 100,
            tokens_per_min: Some(1_000_000),
            input_tokens_per_min: None,
            output_tokens_per_min: Some(30),
        },
    );
    let (status, text, _) = post_text(&sim, EU, HAIKU, "rawPredict", &b).await;
    assert_eq!(status, 429);
    assert!(text.contains("online_prediction_output_tokens_per_minute_per_base_model"));

    // count-tokens is free and never limited.
    let ct = json!({"model": HAIKU, "messages": [{"role": "user", "content": "how many tokens are in this request?"}]});
    for _ in 0..5 {
        let (status, text, _) = post_text(&sim, EU, "count-tokens", "rawPredict", &ct).await;
        assert_eq!(status, 200);
        assert_eq!(text, format!("{{\"input_tokens\": {}}}", count_tokens(&ct)));
    }
    assert_eq!(sim.counters(EU, HAIKU).count_tokens_requests, 5);
    sim.shutdown().await;
}

#[tokio::test]
async fn count_tokens_validates_model_in_body() {
    let sim = start(SimConfig::vertex_defaults()).await;
    let (status, text, _) = post_text(
        &sim,
        EU,
        "count-tokens",
        "rawPredict",
        &json!({"model": SONNET, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 404);
    assert!(text.contains("models/claude-3-sonnet@20240229` was not found"));
    let (status, _, _) = post_text(
        &sim,
        EU,
        "count-tokens",
        "rawPredict",
        &json!({"messages": []}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(sim.total_requests(), 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn injected_statuses_have_vertex_bodies() {
    let sim = start(SimConfig::vertex_defaults()).await;
    let b = body("x", 5);
    sim.inject(Fault::region(US, FaultKind::Status(503)).times(2));
    let (s, t, _) = post_text(&sim, US, HAIKU, "rawPredict", &b).await;
    assert_eq!(s, 503);
    assert_eq!(
        serde_json::from_str::<Value>(&t).unwrap()["error"]["status"],
        "UNAVAILABLE"
    );
    let (s, t, _) = post_text(&sim, US, SONNET, "streamRawPredict", &b).await;
    assert_eq!(s, 503);
    assert_eq!(
        serde_json::from_str::<Value>(&t).unwrap()[0]["error"]["code"],
        503
    );
    assert_eq!(post(&sim, US, HAIKU, "rawPredict", &b).await.status(), 200);

    sim.inject(
        Fault::region(US, FaultKind::Status(529))
            .for_model(SONNET)
            .times(1),
    );
    assert_eq!(post(&sim, US, HAIKU, "rawPredict", &b).await.status(), 200);
    let (s, t, _) = post_text(&sim, US, SONNET, "streamRawPredict", &b).await;
    assert_eq!(s, 529);
    assert_eq!(
        serde_json::from_str::<Value>(&t).unwrap(),
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    );

    sim.inject(Fault::region(EU, FaultKind::Status(500)));
    for _ in 0..3 {
        let (s, t, _) = post_text(&sim, EU, HAIKU, "rawPredict", &b).await;
        assert_eq!(s, 500);
        assert_eq!(
            serde_json::from_str::<Value>(&t).unwrap()["error"]["status"],
            "INTERNAL"
        );
    }
    sim.inject(Fault::region(US, FaultKind::Status(429)).times(1));
    let (s, t, _) = post_text(&sim, US, HAIKU, "rawPredict", &b).await;
    assert_eq!(s, 429);
    assert!(t.contains("online_prediction_requests_per_base_model"));
    sim.clear_faults();
    assert_eq!(post(&sim, EU, HAIKU, "rawPredict", &b).await.status(), 200);

    let eu = sim.counters(EU, HAIKU);
    assert_eq!(eu.errors.get(&500), Some(&3));
    assert_eq!(eu.succeeded, 1);
    let us = sim.counters(US, HAIKU);
    assert_eq!(
        (us.rate_limited, us.errors.get(&503).copied()),
        (1, Some(1))
    );
    // Faulted requests consumed no quota.
    assert_eq!(sim.window_usage(US, HAIKU).unwrap().requests, 2);
    assert_eq!(sim.window_usage(EU, HAIKU).unwrap().requests, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn reset_fault_drops_the_connection_without_a_response() {
    let sim = start(SimConfig::vertex_defaults()).await;
    sim.inject(Fault::region(US, FaultKind::Reset).times(2));
    for action in ["rawPredict", "streamRawPredict"] {
        let err = client()
            .post(sim.predict_url("p", US, HAIKU, action))
            .json(&body("x", 5))
            .send()
            .await
            .expect_err("a reset connection must not produce a response");
        assert!(err.status().is_none());
        assert!(
            err.is_request() || err.is_connect() || err.is_body(),
            "{err:?}"
        );
    }
    assert_eq!(
        post(&sim, US, HAIKU, "rawPredict", &body("x", 5))
            .await
            .status(),
        200
    );
    let c = sim.counters(US, HAIKU);
    assert_eq!((c.resets, c.succeeded), (2, 1));
    assert_eq!(sim.window_usage(US, HAIKU).unwrap().requests, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn drop_mid_stream_breaks_the_body_and_consumes_quota() {
    let sim = start(SimConfig::vertex_defaults()).await;
    sim.inject(Fault::region(US, FaultKind::DropMidStream { after_events: 5 }).times(1));
    // rawPredict is not affected by (and does not use up) a stream fault.
    assert_eq!(
        post(&sim, US, HAIKU, "rawPredict", &body("x", 50))
            .await
            .status(),
        200
    );
    let r = post(
        &sim,
        US,
        HAIKU,
        "streamRawPredict",
        &body("SIM_OUTPUT_TOKENS=10", 50),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut received = String::new();
    let mut stream = r.bytes_stream();
    let mut failed = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => received.push_str(std::str::from_utf8(&b).unwrap()),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body must end with an error, got {received:?}");
    assert!(received.contains("event: message_start"));
    assert_eq!(received.matches("event: ").count(), 5, "{received}");
    assert!(!received.contains("message_stop"));
    let c = sim.counters(US, HAIKU);
    assert_eq!((c.streams_started, c.streams_completed), (1, 0));
    assert_eq!(c.output_tokens, 12 + 2);
    assert_eq!(sim.window_usage(US, HAIKU).unwrap().requests, 2);
    // The fault was used once; the next stream completes.
    let (_, text, _) = post_text(&sim, US, HAIKU, "streamRawPredict", &body("x", 50)).await;
    assert!(text.ends_with("data: {\"type\":\"message_stop\"              }\n\n"));
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn hang_waits_then_answers_and_forever_waits_until_cleared() {
    let sim = start(SimConfig::vertex_defaults()).await;
    sim.inject(Fault::region(US, FaultKind::Hang(Duration::from_secs(30))).times(1));
    let t0 = Instant::now();
    assert_eq!(
        post(&sim, US, HAIKU, "rawPredict", &body("x", 5))
            .await
            .status(),
        200
    );
    assert_eq!(t0.elapsed(), Duration::from_secs(30));

    // A client-side timeout sees a hang.
    sim.inject(Fault::region(US, FaultKind::Hang(Duration::MAX)));
    let pending = tokio::time::timeout(
        Duration::from_secs(600),
        post(&sim, US, HAIKU, "rawPredict", &body("x", 5)),
    )
    .await;
    assert!(pending.is_err());

    // Clearing the faults releases hung requests, which then answer.
    let sim2 = sim.clone();
    let hung = tokio::spawn(async move {
        post(&sim2, US, HAIKU, "rawPredict", &body("x", 5))
            .await
            .status()
    });
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!hung.is_finished());
    sim.clear_faults();
    assert_eq!(hung.await.unwrap(), 200);
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn delay_fault_paces_tokens() {
    let sim = start(SimConfig::vertex_defaults()).await;
    let delay = FaultKind::Delay {
        first_token: Duration::from_millis(500),
        per_token: Duration::from_millis(50),
    };
    sim.inject(Fault::region(US, delay).for_model(HAIKU));
    let t0 = Instant::now();
    let r = post(
        &sim,
        US,
        HAIKU,
        "streamRawPredict",
        &body("SIM_OUTPUT_TOKENS=4", 50),
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut arrivals = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        arrivals.push((t0.elapsed(), String::from_utf8(chunk.to_vec()).unwrap()));
    }
    // First chunk (header events + first delta) after 500 ms, then one delta
    // every 50 ms.
    let deltas: Vec<Duration> = arrivals
        .iter()
        .filter(|(_, s)| s.contains("text_delta"))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(
        deltas,
        [500, 550, 600, 650].map(Duration::from_millis).to_vec(),
        "{arrivals:?}"
    );

    let t1 = Instant::now();
    assert_eq!(
        post(
            &sim,
            US,
            HAIKU,
            "rawPredict",
            &body("SIM_OUTPUT_TOKENS=4", 50)
        )
        .await
        .status(),
        200
    );
    assert_eq!(t1.elapsed(), Duration::from_millis(500 + 4 * 50));
    // Other models are not delayed.
    let t2 = Instant::now();
    assert_eq!(
        post(&sim, US, SONNET, "rawPredict", &body("x", 50))
            .await
            .status(),
        200
    );
    assert_eq!(t2.elapsed(), Duration::ZERO);
    sim.shutdown().await;
}

#[tokio::test]
async fn control_api_over_http() {
    let sim = start(SimConfig::vertex_defaults()).await;
    let c = client();
    let base = sim.base_url();
    let r = c
        .post(format!("{base}/_sim/faults"))
        .json(&json!({"region": EU, "kind": {"type": "status", "status": 503}, "remaining": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c
        .post(format!("{base}/_sim/faults"))
        .json(&json!({"region": EU, "kind": {"type": "nope"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(sim.faults().len(), 1);
    assert_eq!(
        post(&sim, EU, HAIKU, "rawPredict", &body("x", 5))
            .await
            .status(),
        503
    );

    let r = c
        .put(format!("{base}/_sim/quota"))
        .json(
            &json!({"region": EU, "model": HAIKU, "requests_per_min": 1, "tokens_per_min": 100000}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        post(&sim, EU, HAIKU, "rawPredict", &body("x", 5))
            .await
            .status(),
        200
    );
    assert_eq!(
        post(&sim, EU, HAIKU, "rawPredict", &body("x", 5))
            .await
            .status(),
        429
    );

    let counters: Value = c
        .get(format!("{base}/_sim/counters"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counters["total_requests"], 3);
    let eu = &counters["regions"][EU][HAIKU];
    assert_eq!(
        (
            eu["requests"].as_u64(),
            eu["succeeded"].as_u64(),
            eu["rate_limited"].as_u64()
        ),
        (Some(3), Some(1), Some(1))
    );
    assert_eq!(eu["errors"]["503"], 1);

    let recs: Value = c
        .get(format!("{base}/_sim/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(recs.as_array().unwrap().len(), 3);

    c.post(format!("{base}/_sim/faults"))
        .json(&json!({"region": EU, "kind": {"type": "reset"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        c.delete(format!("{base}/_sim/faults"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert!(sim.faults().is_empty());
    assert_eq!(
        c.post(format!("{base}/_sim/reset"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(sim.total_requests(), 0);
    assert_eq!(sim.counters(EU, HAIKU), Default::default());
    // The window was cleared, the raised-down quota kept.
    assert_eq!(
        post(&sim, EU, HAIKU, "rawPredict", &body("x", 5))
            .await
            .status(),
        200
    );
    assert_eq!(
        post(&sim, EU, HAIKU, "rawPredict", &body("x", 5))
            .await
            .status(),
        429
    );

    let r = c
        .put(format!("{base}/_sim/output-tokens"))
        .json(&json!({"default_output_tokens": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let v: Value = post(&sim, US, HAIKU, "rawPredict", &body("x", 50))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["output_tokens"], 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn oauth_token_endpoint() {
    use base64::Engine as _;
    let sim = start(SimConfig {
        bearer_token: Some("static".into()),
        ..SimConfig::vertex_defaults()
    })
    .await;
    let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3000;
    let claims = json!({"iss": "sa@proj.iam.gserviceaccount.com", "scope": "https://www.googleapis.com/auth/cloud-platform", "aud": format!("{}/token", sim.base_url()), "exp": exp, "iat": exp - 3600});
    let jwt = format!(
        "{}.{}.{}",
        enc(r#"{"alg":"RS256","typ":"JWT"}"#),
        enc(&claims.to_string()),
        enc("sig")
    );
    let form = |assertion: &str| {
        format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        )
    };
    let token_req = |b: String| {
        client()
            .post(format!("{}/token", sim.base_url()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(b)
            .send()
    };
    let r = token_req(form(&jwt)).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["expires_in"], 3600);
    assert_eq!(v["token_type"], "Bearer");
    let token = v["access_token"].as_str().unwrap().to_string();
    assert!(token.starts_with("sim-oauth-"));
    assert_eq!(sim.tokens_issued(), 1);

    for bad in [
        form("not-a-jwt"),
        form(&format!("{}.{}.x", enc("{}"), enc("{\"iss\":\"a\"}"))),
        "grant_type=password".into(),
        "%%%".into(),
    ] {
        let r = token_req(bad.clone()).await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].is_string());
    }
    let r = token_req(form("a.b.c")).await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_grant");
    assert_eq!(sim.tokens_issued(), 1);

    let r = client()
        .post(sim.predict_url("p", US, HAIKU, "rawPredict"))
        .bearer_auth(&token)
        .json(&body("x", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_requests() {
    let mut config = SimConfig::vertex_defaults();
    config.regions[0].models = vec![SimModel::new(HAIKU, 1_000_000, u64::MAX)];
    let sim = start(config).await;
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..400 {
        let c = c.clone();
        let action = if i % 2 == 0 {
            "rawPredict"
        } else {
            "streamRawPredict"
        };
        let url = sim.predict_url("p", US, HAIKU, action);
        tasks.push(tokio::spawn(async move {
            let r = c
                .post(url)
                .json(&body("hello there", 100))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap().len()
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap() > 0);
    }
    let c = sim.counters(US, HAIKU);
    assert_eq!(
        (c.requests, c.succeeded, c.streams_completed),
        (400, 400, 200)
    );
    sim.shutdown().await;
}

/// Rough throughput check (run with
/// `cargo test --release -p spillway-sim --test vertex_sim -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn throughput_smoke() {
    let mut config = SimConfig::vertex_defaults();
    config.regions[0].models = vec![SimModel::new(HAIKU, u32::MAX, u64::MAX)];
    let sim = start(config).await;
    let c = client();
    let start = std::time::Instant::now();
    let n = 20_000;
    let mut tasks = Vec::new();
    for w in 0..64 {
        let c = c.clone();
        let raw = sim.predict_url("p", US, HAIKU, "rawPredict");
        let stream = sim.predict_url("p", US, HAIKU, "streamRawPredict");
        tasks.push(tokio::spawn(async move {
            for i in 0..n / 64 {
                let url = if (w + i) % 2 == 0 { &raw } else { &stream };
                let r = c
                    .post(url)
                    .json(&body("hello there", 100))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} requests in {secs:.2}s = {:.0} req/s",
        sim.total_requests(),
        sim.total_requests() as f64 / secs
    );
    sim.shutdown().await;
}
