//! Every way a request can be wrong gets a clear Anthropic-shaped 4xx, and
//! none of them reaches the upstream.

mod support;

use serde_json::{json, Value};
use support::*;

async fn rejected(h: &Harness, body: Value, status: u16, kind: &str, needle: &str) {
    let response = h.post_json("/v1/messages", &body).await;
    assert_eq!(
        response
            .headers()
            .get("x-should-retry")
            .map(|v| v.to_str().unwrap()),
        Some("false")
    );
    let message = expect_error(response, status, kind).await;
    assert!(
        message.contains(needle),
        "{message:?} should mention {needle:?} for {body}"
    );
}

#[tokio::test]
async fn invalid_messages_bodies() {
    let h = Harness::start("").await;
    let base = hello(HAIKU);
    let without = |key: &str| {
        let mut b = base.clone();
        b.as_object_mut().unwrap().remove(key);
        b
    };
    let with = |key: &str, value: Value| {
        let mut b = base.clone();
        b[key] = value;
        b
    };
    rejected(
        &h,
        without("max_tokens"),
        400,
        "invalid_request_error",
        "max_tokens",
    )
    .await;
    rejected(
        &h,
        without("messages"),
        400,
        "invalid_request_error",
        "messages",
    )
    .await;
    rejected(&h, without("model"), 400, "invalid_request_error", "model").await;
    rejected(
        &h,
        with("max_tokens", json!(-1)),
        400,
        "invalid_request_error",
        "max_tokens",
    )
    .await;
    rejected(
        &h,
        with("max_tokens", json!("64")),
        400,
        "invalid_request_error",
        "max_tokens",
    )
    .await;
    rejected(
        &h,
        with("messages", json!([])),
        400,
        "invalid_request_error",
        "messages",
    )
    .await;
    rejected(
        &h,
        with("messages", json!([{"role": "assistant", "content": "hi"}])),
        400,
        "invalid_request_error",
        "user",
    )
    .await;
    rejected(
        &h,
        with(
            "messages",
            json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
        ),
        400,
        "invalid_request_error",
        "alternate",
    )
    .await;
    rejected(
        &h,
        with("messages", json!([{"role": "robot", "content": "a"}])),
        400,
        "invalid_request_error",
        "role",
    )
    .await;
    rejected(
        &h,
        with("stream", json!("yes")),
        400,
        "invalid_request_error",
        "stream",
    )
    .await;
    rejected(
        &h,
        with("model", json!("claude-9-unknown@20990101")),
        404,
        "not_found_error",
        "claude-9-unknown",
    )
    .await;
    rejected(
        &h,
        with("model", json!("../../evil.example.com/")),
        404,
        "not_found_error",
        "model",
    )
    .await;
    rejected(&h, json!([1, 2, 3]), 400, "invalid_request_error", "object").await;
    assert_eq!(
        h.sim.total_requests(),
        0,
        "no rejected request reaches upstream"
    );
}

#[tokio::test]
async fn malformed_json_wrong_type_and_oversize() {
    let h = Harness::start("[server]\nmax_body_bytes = 4096\n").await;
    let post = |body: Vec<u8>, content_type: &'static str| {
        h.http
            .post(format!("{}/v1/messages", h.url))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let m = expect_error(
        post(b"{\"model\": ".to_vec(), "application/json")
            .await
            .unwrap(),
        400,
        "invalid_request_error",
    )
    .await;
    assert!(m.contains("JSON"), "{m}");
    expect_error(
        post(b"\xff\xfe".to_vec(), "application/json")
            .await
            .unwrap(),
        400,
        "invalid_request_error",
    )
    .await;
    let m = expect_error(
        post(b"model=x".to_vec(), "application/x-www-form-urlencoded")
            .await
            .unwrap(),
        415,
        "invalid_request_error",
    )
    .await;
    assert!(m.contains("application/json"), "{m}");
    let mut big = hello(HAIKU);
    big["messages"][0]["content"] = json!("x".repeat(10_000));
    let m = expect_error(
        post(serde_json::to_vec(&big).unwrap(), "application/json")
            .await
            .unwrap(),
        413,
        "request_too_large",
    )
    .await;
    assert!(m.contains("4096"), "{m}");
    assert_eq!(h.sim.total_requests(), 0);
}

#[test]
fn a_model_with_no_region_is_a_config_error() {
    // Such a model used to start and refuse every request; it is now a
    // config error, found before anything is served.
    let overlay = "[models.\"claude-3-sonnet@20240229\"]\nregions = []\n";
    let err = spillway_gateway::config::Settings::load_layers(
        &[spillway_gateway::config::DEMO_TOML, overlay],
        &[],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with(
            "models.\"claude-3-sonnet@20240229\".regions: must list at least one location"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn vertex_paths_are_checked() {
    let h = Harness::start("").await;
    let mut body = hello(HAIKU);
    body.as_object_mut().unwrap().remove("model");
    for (model, action, status) in [
        (HAIKU, "predict", 404),
        ("claude-9@1", "rawPredict", 404),
        ("count-tokens", "streamRawPredict", 404),
    ] {
        let response = h
            .http
            .post(h.vertex_url(model, action))
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_error(response, status, "not_found_error").await;
    }
    // (`"stream": true` to `:rawPredict` is not refused: Vertex accepts it,
    // so Spillway forwards it; see tests/vertex_today.rs.)
    let response = h
        .http
        .post(format!("{}/v1/nowhere", h.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_error(response, 404, "not_found_error").await;
    let response = h
        .http
        .get(format!("{}/v1/messages", h.url))
        .send()
        .await
        .unwrap();
    expect_error(response, 405, "invalid_request_error").await;
    assert_eq!(h.sim.total_requests(), 0);
}

#[tokio::test]
async fn client_keys_are_required_checked_and_never_forwarded() {
    let key = "sk-spw-test-key-1";
    let overlay = format!(
        "[server]\nauth = \"api_key\"\n[tenants.team-a]\nkey_sha256 = \"{}\"\n",
        spillway_gateway::auth::hash_key(key)
    );
    let h = Harness::start(&overlay).await;
    let url = format!("{}/v1/messages", h.url);
    let m = expect_error(
        h.post_json("/v1/messages", &hello(HAIKU)).await,
        401,
        "authentication_error",
    )
    .await;
    assert!(m.contains("missing"), "{m}");
    let wrong = h
        .http
        .post(&url)
        .header("x-api-key", "sk-spw-wrong")
        .json(&hello(HAIKU))
        .send()
        .await
        .unwrap();
    expect_error(wrong, 401, "authentication_error").await;
    assert_eq!(h.sim.total_requests(), 0);

    let by_header = h
        .http
        .post(&url)
        .header("x-api-key", key)
        .json(&hello(HAIKU))
        .send()
        .await
        .unwrap();
    assert_eq!(by_header.status(), 200);
    let by_bearer = h
        .http
        .post(h.vertex_url(HAIKU, "rawPredict"))
        .bearer_auth(key)
        .json(&{
            let mut b = hello(HAIKU);
            b.as_object_mut().unwrap().remove("model");
            b
        })
        .send()
        .await
        .unwrap();
    assert_eq!(by_bearer.status(), 200);
    for sent in h.sim.recent_requests() {
        assert!(!sent.has_x_api_key);
        assert_eq!(
            sent.authorization.as_deref(),
            Some("Bearer demo-upstream-token")
        );
    }
    // Health probes need no key.
    assert_eq!(
        h.http
            .get(format!("{}/healthz", h.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
