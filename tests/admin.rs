//! The admin API and `spillway status`, over loopback.

mod support;

use serde_json::{json, Value};
use spillway_gateway::auth::hash_key;
use support::*;

const ADMIN: &str = "sk-spw-admin-key";

fn admin_overlay(extra: &str) -> String {
    format!("[admin]\nkey_sha256 = \"{}\"\n{extra}", hash_key(ADMIN))
}

async fn admin(
    h: &Harness,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut r = h
        .http
        .request(method, format!("{}{path}", h.url))
        .header("x-api-key", ADMIN);
    if let Some(body) = body {
        r = r.json(&body);
    }
    r.send().await.unwrap()
}

fn budget<'a>(quotas: &'a Value, region: &str) -> &'a Value {
    quotas
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["model"] == HAIKU && q["region"] == region)
        .unwrap()
}

#[tokio::test]
async fn the_admin_api_needs_its_key() {
    let h = Harness::start("").await;
    let r = h
        .http
        .get(format!("{}/admin/quotas", h.url))
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "permission_error").await;

    let h = Harness::start(&admin_overlay("")).await;
    let r = h
        .http
        .get(format!("{}/admin/quotas", h.url))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "authentication_error").await;
    let r = h
        .http
        .get(format!("{}/admin/quotas", h.url))
        .header("x-api-key", "nope")
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "authentication_error").await;
    // The admin key parses as client keys do: the bearer scheme in any case.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = h
            .http
            .get(format!("{}/admin/quotas", h.url))
            .header("authorization", format!("{scheme} {ADMIN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "scheme {scheme:?}");
    }
}

#[tokio::test]
async fn quotas_show_live_state_and_regions_can_be_drained() {
    let h = Harness::start(&admin_overlay("")).await;
    assert_eq!(
        h.post_json("/v1/messages", &hello(HAIKU)).await.status(),
        200
    );
    let quotas: Value = admin(&h, reqwest::Method::GET, "/admin/quotas", None)
        .await
        .json()
        .await
        .unwrap();
    let used: u64 = ["us-central1", "europe-west4"]
        .iter()
        .map(|r| budget(&quotas, r)["used"]["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(used, 1);
    assert_eq!(
        budget(&quotas, "us-central1")["configured"]["requests_per_min"],
        60
    );

    let r = admin(
        &h,
        reqwest::Method::POST,
        "/admin/regions/us-central1/drain",
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let drained: Value = r.json().await.unwrap();
    assert_eq!(drained["budgets"], 2, "haiku and sonnet");
    for _ in 0..4 {
        let r = h.post_json("/v1/messages", &hello(HAIKU)).await;
        assert_eq!(r.headers()["x-spillway-region"], "europe-west4");
    }
    // Sonnet's other region is asia-southeast1.
    let r = h.post_json("/v1/messages", &hello(SONNET)).await;
    assert_eq!(r.headers()["x-spillway-region"], "asia-southeast1");
    assert_eq!(
        admin(
            &h,
            reqwest::Method::POST,
            "/admin/regions/us-central1/undrain",
            None
        )
        .await
        .status(),
        200
    );
    let r = admin(
        &h,
        reqwest::Method::POST,
        "/admin/regions/mars-north1/drain",
        None,
    )
    .await;
    expect_error(r, 404, "not_found_error").await;
}

/// A unary response does not wait for its settle (with a shared store that
/// is another round trip), but the settle still lands: the reservation
/// stops being in flight and the budget holds the tokens actually used.
#[tokio::test]
async fn a_unary_request_is_settled_after_its_response_with_its_real_usage() {
    let h = Harness::start(&admin_overlay("")).await;
    let r = h.post_json("/v1/messages", &hello(HAIKU)).await;
    assert_eq!(r.status(), 200);
    let region = r.headers()["x-spillway-region"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = r.json().await.unwrap();
    let (input, output) = (
        body["usage"]["input_tokens"].as_u64().unwrap(),
        body["usage"]["output_tokens"].as_u64().unwrap(),
    );
    let mut last = Value::Null;
    for _ in 0..200 {
        let quotas: Value = admin(&h, reqwest::Method::GET, "/admin/quotas", None)
            .await
            .json()
            .await
            .unwrap();
        last = budget(&quotas, &region).clone();
        if last["in_flight"]["requests"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(last["in_flight"]["requests"], 0, "settled: {last}");
    assert_eq!(last["used"]["requests"], 1, "{last}");
    assert_eq!(last["used"]["input_tokens"], input, "{last}");
    assert_eq!(last["used"]["output_tokens"], output, "{last}");
}

#[tokio::test]
async fn budgets_can_be_raised_at_run_time() {
    let h = Harness::start(&admin_overlay("[models.\"claude-3-haiku@20240307\"]\nregions = [{ name = \"us-central1\", requests_per_min = 1 }]\n")).await;
    assert_eq!(
        h.post_fail_fast("/v1/messages", &hello(HAIKU))
            .await
            .status(),
        200
    );
    assert_eq!(
        h.post_fail_fast("/v1/messages", &hello(HAIKU))
            .await
            .status(),
        429
    );
    let r = admin(
        &h,
        reqwest::Method::PUT,
        &format!("/admin/quotas/{HAIKU}/us-central1"),
        Some(json!({"requests_per_min": 120, "tokens_per_min": 100000})),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        h.post_fail_fast("/v1/messages", &hello(HAIKU))
            .await
            .status(),
        200
    );
    let r = admin(
        &h,
        reqwest::Method::PUT,
        &format!("/admin/quotas/{HAIKU}/us-central1"),
        Some(json!({"requests_per_min": 0, "tokens_per_min": 1})),
    )
    .await;
    expect_error(r, 400, "invalid_request_error").await;
    let r = admin(
        &h,
        reqwest::Method::PUT,
        &format!("/admin/quotas/{HAIKU}/us-central1"),
        Some(json!({"rpm": 5})),
    )
    .await;
    expect_error(r, 400, "invalid_request_error").await;
    let r = admin(
        &h,
        reqwest::Method::PUT,
        "/admin/quotas/claude-x/us-central1",
        Some(json!({"requests_per_min": 5, "tokens_per_min": 5})),
    )
    .await;
    expect_error(r, 404, "not_found_error").await;
}

#[tokio::test]
async fn tenants_are_listed_without_their_keys() {
    let old_key = "sk-spw-old";
    let overlay = admin_overlay(&format!(
        "[server]\nauth = \"api_key\"\n[tenants.search]\nkey_sha256 = \"{}\"\nweight = 3\nregions = [\"europe-west4\"]\n",
        hash_key(old_key)
    ));
    let h = Harness::start(&overlay).await;
    let r = admin(&h, reqwest::Method::GET, "/admin/tenants", None).await;
    let text = r.text().await.unwrap();
    assert!(!text.contains(&hash_key(old_key)), "{text}");
    let tenants: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(tenants[0]["name"], "search");
    assert_eq!(tenants[0]["weight"], 3.0);
    assert_eq!(tenants[0]["regions"], json!(["europe-west4"]));
}

#[tokio::test]
async fn spillway_status_prints_the_live_table() {
    let h = Harness::start(&admin_overlay("")).await;
    assert_eq!(
        h.post_json("/v1/messages", &hello(HAIKU)).await.status(),
        200
    );
    let out = status_once(&h.url, ADMIN).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("MODEL") && stdout.contains(HAIKU) && stdout.contains("europe-west4"),
        "{stdout}"
    );

    let out = status_once(&h.url, "wrong").await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

/// A free loopback port (bound and released; the race is acceptable in tests).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn sighup_reloads_tenants_and_budgets_and_keeps_the_ledgers() {
    let mut sim_config = spillway_sim::SimConfig::vertex_defaults();
    sim_config.bearer_token = Some(UPSTREAM_TOKEN.into());
    let sim = spillway_sim::Simulator::start(sim_config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("spillway-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("spillway.toml");
    let config = |key: &str, rpm: u32| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nauth = \"api_key\"\n[upstream]\nproject = \"spillway-demo\"\nregional_url = \"{url}\"\nglobal_url = \"{url}\"\nauth = \"static\"\ntoken = \"{UPSTREAM_TOKEN}\"\n[admin]\nkey_sha256 = \"{admin}\"\n[tenants.app]\nkey_sha256 = \"{key}\"\n[models.\"claude-3-haiku@20240307\"]\nregions = [{{ name = \"us-central1\", requests_per_min = {rpm} }}]\n",
            url = sim.base_url(),
            admin = hash_key(ADMIN),
            key = hash_key(key),
        )
    };
    std::fs::write(&file, config("sk-spw-first", 5)).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["serve", "--config", file.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = spillway_gateway::tls::http_client();
    let mut up = false;
    for _ in 0..100 {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(up, "gateway did not start");
    let ask = |key: &'static str| {
        http.post(format!("{base}/v1/messages"))
            .header("x-api-key", key)
            .json(&hello(HAIKU))
            .send()
    };
    assert_eq!(ask("sk-spw-first").await.unwrap().status(), 200);

    std::fs::write(&file, config("sk-spw-second", 50)).unwrap();
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let mut reloaded = false;
    for _ in 0..100 {
        if ask("sk-spw-second").await.unwrap().status() == 200 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let quotas: Value = http
        .get(format!("{base}/admin/quotas"))
        .header("x-api-key", ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let old_key_status = ask("sk-spw-first").await.unwrap().status();
    let _ = child.kill();
    let _ = child.wait();
    assert!(reloaded, "the new key was never accepted");
    assert_eq!(old_key_status, 401, "the old key is gone");
    let haiku = budget(&quotas, "us-central1");
    assert_eq!(haiku["configured"]["requests_per_min"], 50);
    assert_eq!(
        haiku["used"]["requests"], 2,
        "the ledger kept what was spent"
    );
}
