//! The provider seam: a second upstream is a `Provider` implementation and a
//! line where the gateway is built, nothing in the request path.
//!
//! This test is that sketch. `Canned` answers every call itself (as a
//! provider for another API would after its own HTTP call); a location names
//! it in config (`provider = "canned"`), and requests routed there are
//! admitted, relayed and settled like any Vertex answer.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use spillway_core::ModelId;
use spillway_gateway::answer::ForwardError;
use spillway_gateway::config::{Settings, DEMO_TOML};
use spillway_gateway::upstream::{Provider, ProviderFuture, ProviderRequest, Providers, Vertex};
use spillway_gateway::Gateway;
use spillway_vertex::Operation;

#[derive(Default)]
struct Canned {
    calls: AtomicU32,
}

impl Provider for Canned {
    fn encode(&self, mut body: Map<String, Value>, _op: Operation, model: &ModelId) -> Bytes {
        // This API wants the model in the body.
        body.insert("model".into(), Value::String(model.to_string()));
        Bytes::from(serde_json::to_vec(&body).expect("serializes"))
    }

    fn send<'a>(&'a self, request: ProviderRequest<'a>) -> ProviderFuture<'a, reqwest::Response> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let sent: Value = serde_json::from_slice(&request.body).expect("encoded JSON");
            let answer = json!({
                "id": "msg_canned", "type": "message", "role": "assistant",
                "model": sent["model"], "content": [{"type": "text", "text": "canned"}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 7, "output_tokens": 3}
            });
            let response = http::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(answer.to_string())
                .expect("valid response");
            Ok(reqwest::Response::from(response))
        })
    }

    fn ready(&self) -> ProviderFuture<'_, ()> {
        Box::pin(async { Ok::<(), ForwardError>(()) })
    }
}

#[tokio::test]
async fn a_location_served_by_another_provider_goes_through_the_same_lifecycle() {
    let overlay = r#"
[server]
listen = "127.0.0.1:0"

[models."claude-3-haiku@20240307"]
regions = [{ name = "elsewhere", provider = "canned", requests_per_min = 2 }]
"#;
    let settings = Settings::load_layers(&[DEMO_TOML, overlay], &[], None).expect("valid config");
    let canned = Arc::new(Canned::default());
    let vertex = Vertex::from_settings(&settings.upstream)
        .await
        .expect("vertex");
    let providers = Providers::default()
        .with("vertex", Arc::new(vertex))
        .with("canned", Arc::clone(&canned) as Arc<dyn Provider>);
    let gateway = Gateway::with_providers(settings, providers)
        .await
        .expect("starts");
    let listener = gateway.bind().await.expect("binds");
    let url = format!("http://{}/v1/messages", listener.local_addr().unwrap());
    tokio::spawn(gateway.serve(listener, std::future::pending()));

    let http = spillway_gateway::tls::http_client();
    let body = json!({"model": "claude-3-haiku@20240307", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..2 {
        let r = http.post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-spillway-region"], "elsewhere");
        assert!(r
            .headers()
            .contains_key("anthropic-ratelimit-requests-remaining"));
        let message: Value = r.json().await.unwrap();
        assert_eq!(message["content"][0]["text"], "canned");
        assert_eq!(message["model"], "claude-3-haiku@20240307");
    }
    // The location's budget holds for the new provider too.
    let r = http
        .post(&url)
        .header("x-spillway-max-wait-ms", "0")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(canned.calls.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_location_naming_an_unknown_provider_is_a_startup_error() {
    let overlay = r#"
[models."claude-3-haiku@20240307"]
regions = [{ name = "elsewhere", provider = "nobody" }]
"#;
    let settings = Settings::load_layers(&[DEMO_TOML, overlay], &[], None).expect("valid config");
    let Err(error) = Gateway::new(settings).await else {
        panic!("started with an unknown provider");
    };
    let message = error.to_string();
    assert!(message.contains("\"nobody\""), "{message}");
}
