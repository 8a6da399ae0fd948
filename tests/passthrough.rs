//! Both client surfaces, unary and streaming, end to end over loopback:
//! what the client sees and what reached the (simulated) upstream.

mod support;

use serde_json::{json, Value};
use spillway_sim::{Fault, FaultKind};
use support::*;

#[tokio::test]
async fn anthropic_surface_unary_round_trip() {
    let h = Harness::start("").await;
    let response = h
        .http
        .post(format!("{}/v1/messages", h.url))
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "tools-2024-04-04")
        .json(&hello(HAIKU))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-spillway-region"], "us-central1");
    assert!(response.headers()["request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    let message: Value = response.json().await.unwrap();
    assert_eq!(message["type"], "message");
    assert!(message["usage"]["input_tokens"].as_u64().unwrap() > 0);

    let sent = h.sim.recent_requests();
    assert_eq!(sent.len(), 1);
    let sent = &sent[0];
    assert_eq!(sent.region, "us-central1");
    assert_eq!(sent.model, HAIKU);
    assert_eq!(sent.action, "rawPredict");
    assert_eq!(
        sent.project, "spillway-demo",
        "Spillway bills its own project"
    );
    let body = sent.body.as_ref().unwrap();
    assert!(body.get("model").is_none(), "model moves to the URL");
    assert_eq!(body["anthropic_version"], "vertex-2023-10-16");
    assert!(
        sent.anthropic_version_header.is_none(),
        "header must not be forwarded"
    );
    assert_eq!(sent.anthropic_beta.as_deref(), Some("tools-2024-04-04"));
    assert_eq!(
        sent.authorization.as_deref(),
        Some("Bearer demo-upstream-token")
    );
}

#[tokio::test]
async fn vertex_surface_keeps_the_clients_anthropic_version() {
    let h = Harness::start("").await;
    let mut body = hello(HAIKU);
    body.as_object_mut().unwrap().remove("model");
    body["anthropic_version"] = json!("2023-06-01");
    let response = h
        .http
        .post(h.vertex_url(HAIKU, "rawPredict"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sent = &h.sim.recent_requests()[0];
    assert_eq!(
        sent.body.as_ref().unwrap()["anthropic_version"],
        "2023-06-01"
    );
    // The path said us-east5 and client-project; Spillway chooses its own.
    assert_eq!(sent.region, "us-central1");
    assert_eq!(sent.project, "spillway-demo");
}

#[tokio::test]
async fn anthropic_model_ids_and_aliases_resolve() {
    let h = Harness::start("").await;
    let response = h
        .post_json("/v1/messages", &hello("claude-3-haiku-20240307"))
        .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("warning").is_none());

    let response = h.post_json("/v1/messages", &hello("claude-3-sonnet")).await;
    assert_eq!(response.status(), 200);
    let warning = response.headers()["warning"].to_str().unwrap().to_string();
    assert!(warning.contains(SONNET), "{warning}");
    assert_eq!(h.sim.recent_requests()[1].model, SONNET);
}

#[tokio::test]
async fn streams_are_relayed_event_by_event_without_vertex_events() {
    let h = Harness::start("").await;
    let mut body = hello(HAIKU);
    body["stream"] = json!(true);
    let response = h.post_json("/v1/messages", &body).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = read_events(response).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    assert!(names.contains(&"content_block_delta"));
    assert!(names.contains(&"ping"), "pings pass through");
    assert!(!names.contains(&"vertex_event"), "vertex_event is dropped");
    for (name, data) in &events {
        assert_eq!(
            data["type"],
            name.as_str(),
            "data JSON parses and matches its event"
        );
    }
    let sent = &h.sim.recent_requests()[0];
    assert_eq!(sent.action, "streamRawPredict");
    assert_eq!(sent.body.as_ref().unwrap()["stream"], true);
}

#[tokio::test]
async fn vertex_stream_endpoint_streams() {
    let h = Harness::start("").await;
    let mut body = hello(HAIKU);
    body.as_object_mut().unwrap().remove("model");
    let response = h
        .http
        .post(h.vertex_url(HAIKU, "streamRawPredict"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = read_events(response).await;
    assert_eq!(events.last().unwrap().0, "message_stop");
}

#[tokio::test]
async fn a_stream_that_dies_upstream_ends_with_an_error_event() {
    let h = Harness::start("").await;
    h.sim.inject(Fault::region(
        "us-central1",
        FaultKind::DropMidStream { after_events: 3 },
    ));
    let mut body = hello(HAIKU);
    body["stream"] = json!(true);
    body["max_tokens"] = json!(200);
    body["messages"][0]["content"] = json!("SIM_OUTPUT_TOKENS=100 please");
    let response = h.post_json("/v1/messages", &body).await;
    assert_eq!(response.status(), 200);
    let events = read_events(response).await;
    assert_eq!(events[0].0, "message_start");
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(data["type"], "error");
    assert_eq!(data["error"]["type"], "api_error");
    assert!(!events.iter().any(|(n, _)| n == "message_stop"));
}

#[tokio::test]
async fn count_tokens_on_both_surfaces() {
    let h = Harness::start("").await;
    let body = json!({"model": HAIKU, "messages": [{"role": "user", "content": "how many tokens are in this request?"}]});
    let response = h.post_json("/v1/messages/count_tokens", &body).await;
    assert_eq!(response.status(), 200);
    let counted: Value = response.json().await.unwrap();
    assert_eq!(
        counted["input_tokens"].as_u64(),
        Some(spillway_sim::count_tokens(&body))
    );

    let response = h
        .http
        .post(h.vertex_url("count-tokens", "rawPredict"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sent = h.sim.recent_requests();
    assert!(sent.iter().all(|r| r.model == "count-tokens"));
    assert_eq!(
        sent[0].body.as_ref().unwrap()["model"],
        HAIKU,
        "count-tokens keeps model in the body"
    );
}

#[tokio::test]
async fn upstream_errors_become_anthropic_errors() {
    // Sonnet configured in a region the simulator does not offer it in:
    // Vertex's 404 is about the gateway's setup, so the client gets a 502
    // `api_error` (never a `not_found_error` about its own request), read
    // from the Google object of rawPredict and the array of streamRawPredict.
    let h = Harness::start(
        r#"[models."claude-3-sonnet@20240229"]
regions = [{ name = "europe-west4" }]
"#,
    )
    .await;
    let message = expect_error(
        h.post_json("/v1/messages", &hello(SONNET)).await,
        502,
        "api_error",
    )
    .await;
    assert!(message.contains("not enabled"), "{message}");
    let mut streaming = hello(SONNET);
    streaming["stream"] = json!(true);
    expect_error(
        h.post_json("/v1/messages", &streaming).await,
        502,
        "api_error",
    )
    .await;
    // A Google error about the request itself keeps its meaning.
    for region in ["us-central1", "europe-west4"] {
        h.sim
            .inject(Fault::region(region, FaultKind::Status(400)).times(2));
    }
    let message = expect_error(
        h.post_json("/v1/messages", &hello(HAIKU)).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(!message.is_empty());
    let mut streaming = hello(HAIKU);
    streaming["stream"] = json!(true);
    expect_error(
        h.post_json("/v1/messages", &streaming).await,
        400,
        "invalid_request_error",
    )
    .await;
}

/// Haiku in one region only, so a failure has nowhere to fall back to.
const ONE_REGION: &str =
    "[models.\"claude-3-haiku@20240307\"]\nregions = [{ name = \"us-central1\" }]\n";

#[tokio::test]
async fn upstream_failures_with_nowhere_to_go_keep_their_meaning() {
    for (status, kind) in [
        (429, "rate_limit_error"),
        (503, "overloaded_error"),
        (529, "overloaded_error"),
        (500, "api_error"),
    ] {
        let h = Harness::start(ONE_REGION).await;
        h.sim
            .inject(Fault::region("us-central1", FaultKind::Status(status)));
        let response = h.post_fail_fast("/v1/messages", &hello(HAIKU)).await;
        let retry_after = response.headers().get("retry-after").cloned();
        expect_error(response, status, kind).await;
        if status == 429 {
            let seconds: u64 = retry_after
                .expect("429 says when")
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=60).contains(&seconds), "{seconds}");
        }
        let sent = h.sim.counters("us-central1", HAIKU).requests;
        assert_eq!(sent, 1, "{status}: one attempt, then the region cools down");
    }
}

#[tokio::test]
async fn transport_failures_are_reported_without_secrets() {
    let h = Harness::start(&format!("{ONE_REGION}[upstream]\nread_timeout_ms = 300\n")).await;
    h.sim
        .inject(Fault::region("us-central1", FaultKind::Reset).times(1));
    let message = expect_error(
        h.post_fail_fast("/v1/messages", &hello(HAIKU)).await,
        502,
        "api_error",
    )
    .await;
    assert!(
        !message.contains(UPSTREAM_TOKEN) && !message.contains("spillway-demo"),
        "{message}"
    );

    let h = Harness::start(&format!("{ONE_REGION}[upstream]\nread_timeout_ms = 300\n")).await;
    h.sim.inject(
        Fault::region(
            "us-central1",
            FaultKind::Hang(std::time::Duration::from_secs(30)),
        )
        .times(1),
    );
    expect_error(
        h.post_fail_fast("/v1/messages", &hello(HAIKU)).await,
        504,
        "timeout_error",
    )
    .await;
}

#[tokio::test]
async fn health_and_readiness() {
    let h = Harness::start("").await;
    let healthz = h
        .http
        .get(format!("{}/healthz", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);
    let readyz = h
        .http
        .get(format!("{}/readyz", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 200);
}
