//! The real Google credential path: a service-account key whose `token_uri`
//! is the simulator's OAuth endpoint, so `gcp_auth` signs a JWT, trades it
//! for an access token, and Spillway uses that token upstream.

mod support;

use serde_json::json;
use support::*;

const TEST_ONLY_KEY: &str =
    include_str!("../crates/spillway-sim/tests/fixtures/test-only-service-account-key.pem");

fn key_file(token_uri: &str) -> std::path::PathBuf {
    let key = json!({
        "type": "service_account",
        "project_id": "sa-project-1",
        "private_key_id": "test-only",
        "private_key": TEST_ONLY_KEY,
        "client_email": "spillway@sa-project-1.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    });
    // One file per call: tests run in parallel in this process, and two
    // of them sharing a file would read each other's token endpoint.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("spillway-sa-{}-{n}.json", std::process::id()));
    std::fs::write(&path, key.to_string()).unwrap();
    path
}

#[tokio::test]
async fn service_account_tokens_are_fetched_cached_and_used_upstream() {
    let h = Harness::start_custom(spillway_sim::SimConfig::vertex_defaults(), |sim_url| {
        let path = key_file(&format!("{sim_url}/token"));
        // No project configured: it comes from the key file.
        format!(
            "[upstream]\nauth = \"gcp\"\nproject = \"\"\nkey_file = {:?}\n",
            path.to_str().unwrap()
        )
    })
    .await;
    for _ in 0..2 {
        let response = h.post_json("/v1/messages", &hello(HAIKU)).await;
        assert_eq!(response.status(), 200);
    }
    assert_eq!(h.sim.tokens_issued(), 1, "gcp_auth caches the token");
    for sent in h.sim.recent_requests() {
        let auth = sent.authorization.unwrap();
        assert!(auth.starts_with("Bearer sim-oauth-"), "{auth}");
        assert_eq!(sent.project, "sa-project-1", "project from the key file");
    }
    let ready = h
        .http
        .get(format!("{}/readyz", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

/// Vertex rejects the token in hand (the key was rotated, the token
/// revoked): the gateway gets a fresh one and retries, and no client sees it.
#[tokio::test]
async fn a_revoked_token_is_replaced_and_no_client_sees_a_401() {
    let h = Harness::start_custom(spillway_sim::SimConfig::vertex_defaults(), |sim_url| {
        let path = key_file(&format!("{sim_url}/token"));
        format!(
            "[upstream]\nauth = \"gcp\"\nkey_file = {:?}\n",
            path.to_str().unwrap()
        )
    })
    .await;
    assert_eq!(
        h.post_json("/v1/messages", &hello(HAIKU)).await.status(),
        200
    );
    h.sim.rotate_token();
    for _ in 0..3 {
        let response = h.post_json("/v1/messages", &hello(HAIKU)).await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
    }
    assert_eq!(
        h.sim.tokens_issued(),
        2,
        "one fresh token after the rotation"
    );
    let metrics = h.metrics().await;
    let rejected: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("spillway_upstream_setup_errors_total")
                && l.contains("credentials_rejected")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(rejected, 1.0, "the one rejection is counted");
}

#[tokio::test]
async fn unusable_credentials_fail_readiness_and_requests_without_leaking() {
    // A token endpoint nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/token", listener.local_addr().unwrap());
    drop(listener);
    let path = key_file(&dead);
    let overlay = format!(
        "[upstream]\nauth = \"gcp\"\nkey_file = {:?}\n",
        path.to_str().unwrap()
    );
    let h = Harness::start(&overlay).await;

    let ready = h
        .http
        .get(format!("{}/readyz", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let message = expect_error(
        h.post_json("/v1/messages", &hello(HAIKU)).await,
        500,
        "api_error",
    )
    .await;
    assert!(message.contains("credentials"), "{message}");
    assert!(
        !message.contains("BEGIN") && !message.contains("sa-project-1"),
        "{message}"
    );
    assert_eq!(h.sim.total_requests(), 0);
}
