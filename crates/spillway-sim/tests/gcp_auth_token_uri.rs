//! `gcp_auth` 0.12 talks to the simulator's OAuth endpoint over plain HTTP.
//!
//! `gcp_auth`'s HTTP client is built with `https_or_http()`
//! (gcp_auth-0.12.7 `src/types.rs`, line 49), and `CustomServiceAccount`
//! posts its JWT to the key file's `token_uri` verbatim
//! (`src/custom_service_account.rs`, line 101). So a service-account key
//! whose `token_uri` is `http://127.0.0.1:PORT/token` works, which lets the
//! gateway run its real Google auth code against the simulator.
//!
//! The key in `tests/fixtures/` is a throwaway RSA key generated with
//! openssl for this test only.

use gcp_auth::{CustomServiceAccount, TokenProvider};
use serde_json::json;
use spillway_sim::{SimConfig, Simulator};

const KEY: &str = include_str!("fixtures/test-only-service-account-key.pem");

#[tokio::test]
async fn gcp_auth_gets_a_token_from_the_simulator_and_it_works_on_raw_predict() {
    let sim = Simulator::start(
        SimConfig {
            // Only this static token or tokens issued by /token are accepted.
            bearer_token: Some("static-token-not-used-here".into()),
            ..SimConfig::vertex_defaults()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();

    let key = json!({
        "type": "service_account",
        "project_id": "sim-project",
        "private_key_id": "test-only",
        "private_key": KEY,
        "client_email": "spillway-test@sim-project.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": format!("{}/token", sim.base_url()),
    });
    let provider = CustomServiceAccount::from_json(&key.to_string()).unwrap();
    let scopes = ["https://www.googleapis.com/auth/cloud-platform"];
    let token = provider.token(&scopes).await.unwrap();
    assert!(token.as_str().starts_with("sim-oauth-"));
    assert_eq!(sim.tokens_issued(), 1);
    // gcp_auth caches the token: no second request.
    let again = provider.token(&scopes).await.unwrap();
    assert_eq!(again.as_str(), token.as_str());
    assert_eq!(sim.tokens_issued(), 1);
    assert_eq!(provider.project_id(), Some("sim-project"));

    // reqwest has no crypto provider of its own in this workspace.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let r = reqwest::Client::new()
        .post(sim.predict_url(
            "sim-project",
            "us-central1",
            "claude-3-haiku@20240307",
            "rawPredict",
        ))
        .bearer_auth(token.as_str())
        .json(&json!({
            "anthropic_version": "vertex-2023-10-16",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let recorded = sim.recent_requests();
    assert_eq!(
        recorded.last().unwrap().authorization.as_deref(),
        Some(format!("Bearer {}", token.as_str()).as_str())
    );
    sim.shutdown().await;
}
