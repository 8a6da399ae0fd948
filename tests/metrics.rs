//! `GET /metrics` over loopback: the series operators build dashboards on
//! move as traffic flows.

mod support;

use spillway_sim::{Fault, FaultKind};
use support::*;

#[tokio::test(start_paused = true)]
async fn metrics_follow_quota_routing_and_refusals() {
    let h = Harness::start("[quota]\nstrategy = \"ordered\"\n").await;
    // Fill the primary region, so the rest spills over.
    for _ in 0..62 {
        assert_eq!(
            h.post_json("/v1/messages", &hello(HAIKU)).await.status(),
            200
        );
    }
    h.sim
        .inject(Fault::region("europe-west4", FaultKind::Status(429)).times(1));
    h.sim
        .inject(Fault::region("europe-west4", FaultKind::Status(429)).times(1));
    let _ = h.post_fail_fast("/v1/messages", &hello(HAIKU)).await;
    let _ = h
        .post_json("/v1/messages", &serde_json::json!({"model": HAIKU}))
        .await;

    let response = h
        .http
        .get(format!("{}/metrics", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    // The shared store's series exist with the in-memory store too: one
    // replica, never degraded, no leases (dashboards read the same).
    assert_eq!(series_value(&text, "spillway_quota_store_degraded"), 0.0);
    assert_eq!(series_value(&text, "spillway_quota_store_replicas"), 1.0);
    assert_eq!(
        series_value(&text, "spillway_quota_store_lease_admissions_total"),
        0.0
    );
    let m = HAIKU;
    assert_eq!(
        series_value(
            &text,
            &format!(
                "spillway_requests_total{{model=\"{m}\",outcome=\"ok\",tenant=\"anonymous\"}}"
            )
        ),
        62.0
    );
    assert_eq!(
        series_value(
            &text,
            "spillway_requests_total{model=\"-\",outcome=\"invalid\",tenant=\"-\"}"
        ),
        1.0
    );
    assert_eq!(series_value(&text, &format!("spillway_spillovers_total{{from=\"us-central1\",model=\"{m}\",to=\"europe-west4\"}}")), 3.0);
    assert_eq!(
        series_value(
            &text,
            &format!("spillway_upstream_429_total{{model=\"{m}\",region=\"europe-west4\"}}")
        ),
        1.0
    );
    assert_eq!(series_value(&text, &format!("spillway_budget_limit{{model=\"{m}\",region=\"us-central1\",resource=\"requests\"}}")), 60.0);
    assert_eq!(series_value(&text, &format!("spillway_budget_used{{model=\"{m}\",region=\"us-central1\",resource=\"requests\"}}")), 60.0);
    assert!(
        series_value(
            &text,
            &format!("spillway_cooldown_seconds{{model=\"{m}\",region=\"europe-west4\"}}")
        ) > 0.0
    );
    assert!(series_value(&text, &format!("spillway_budget_effective{{model=\"{m}\",region=\"europe-west4\",resource=\"requests\"}}")) < 60.0);
    assert!(
        series_value(
            &text,
            &format!("spillway_admission_decision_seconds_count{{model=\"{m}\"}}")
        ) >= 63.0
    );
    // Every stream has ended; the series exists from the start, at 0.
    assert_eq!(
        series_value(&text, &format!("spillway_open_streams{{model=\"{m}\"}}")),
        0.0
    );
    assert!(series_value(&text, &format!("spillway_tokens_total{{kind=\"actual_output\",model=\"{m}\",region=\"us-central1\"}}")) > 0.0);
    assert!(text.contains("spillway_build_info{version="));
    // Series exist at zero before their first event, so rate() sees it.
    assert_eq!(
        series_value(
            &text,
            &format!("spillway_upstream_429_total{{model=\"{m}\",region=\"us-central1\"}}")
        ),
        0.0
    );
    assert_eq!(series_value(&text, &format!("spillway_fallbacks_total{{from=\"us-central1\",model=\"{m}\",to=\"europe-west4\"}}")), 0.0);
    assert!(series_value(&text, &format!("spillway_tenant_tokens_total{{kind=\"output\",model=\"{m}\",tenant=\"anonymous\"}}")) > 0.0);
    assert_eq!(
        series_value(
            &text,
            &format!("spillway_queue_wait_seconds_count{{model=\"{m}\",priority=\"interactive\"}}")
        ),
        63.0,
        "62 served plus the one admitted to europe-west4 before its 429"
    );
}

/// A stream is counted once, when it ends, with its model and tenant: the
/// outer layer sees its headers (200) long before and must not count it as
/// an unattributed request too.
#[tokio::test]
async fn a_stream_is_counted_once_with_its_outcome() {
    let h = Harness::start("").await;
    let mut body = hello(HAIKU);
    body["stream"] = serde_json::json!(true);
    for _ in 0..3 {
        let response = h.post_json("/v1/messages", &body).await;
        assert_eq!(response.status(), 200);
        assert!(response.text().await.unwrap().contains("message_stop"));
    }
    let text = h.metrics().await;
    let counted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("spillway_requests_total{"))
        .collect();
    assert_eq!(
        counted,
        [format!(
            "spillway_requests_total{{model=\"{HAIKU}\",outcome=\"ok\",tenant=\"anonymous\"}} 3"
        )],
        "{text}"
    );
}

/// `spillway status` (the real binary, polling the admin API of a real
/// `spillway serve`) and the other non-model calls — health, readiness,
/// scrapes, the model catalog, an unknown path — are counted by surface and
/// route in `spillway_http_requests_total`, and add no sample at all to
/// `spillway_requests_total`, which counts model requests only. (Before,
/// each admin call was a `spillway_requests_total{model="-",tenant="-"}`
/// request: a running `spillway status` made ~0.5 phantom requests/s.)
///
/// `SPILLWAY_BIN=<an older build>` runs the same test against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_ops_calls_are_not_model_requests() {
    use spillway_gateway::auth::hash_key;
    use support::binary::{free_port, metrics_text, serve, wait_healthy, write_config};

    const ADMIN: &str = "sk-spw-admin-metrics-test";
    let mut sim_config = spillway_sim::SimConfig::vertex_defaults();
    sim_config.bearer_token = Some(UPSTREAM_TOKEN.into());
    let sim = spillway_sim::Simulator::start(sim_config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let config = dir.path().join("spillway.toml");
    let admin = format!("[admin]\nkey_sha256 = \"{}\"\n", hash_key(ADMIN));
    write_config(
        &config,
        port,
        &sim.base_url(),
        "metrics-test",
        UPSTREAM_TOKEN,
        "",
        &admin,
    );
    let log = dir.path().join("spillway.log");
    let http = spillway_gateway::tls::http_client();
    let mut gateway = serve(&config, &log);
    wait_healthy(&http, &url, &mut gateway).await;
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    // One model request, so spillway_requests_total has a sample to keep.
    let r = http
        .post(format!("{url}/v1/messages"))
        .json(&hello(HAIKU))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", logs());
    let scrape = || metrics_text(&http, &url);
    let model_requests = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("spillway_requests_total"))
            .map(String::from)
            .collect()
    };
    let before = model_requests(&scrape().await);
    assert_eq!(
        before,
        [format!(
            "spillway_requests_total{{model=\"{HAIKU}\",outcome=\"ok\",tenant=\"anonymous\"}} 1"
        )]
    );

    // What an operator's terminal does: `spillway status`, three refreshes.
    const POLLS: usize = 3;
    for _ in 0..POLLS {
        let out = support::status_once(&url, ADMIN).await;
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(HAIKU),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            logs()
        );
    }
    // Probes, the catalog, a wrong admin key, a path with no route.
    for (path, key, status) in [
        ("/healthz", None, 200),
        ("/readyz", None, 200),
        ("/v1/models", None, 200),
        ("/admin/quotas", Some("wrong"), 401),
        ("/no/such/path", None, 404),
    ] {
        let mut r = http.get(format!("{url}{path}"));
        if let Some(key) = key {
            r = r.header("x-api-key", key);
        }
        assert_eq!(r.send().await.unwrap().status(), status, "GET {path}");
    }

    let text = scrape().await;
    assert_eq!(
        model_requests(&text),
        before,
        "admin, ops, catalog and unrouted calls added model-request samples:\n{text}"
    );
    assert!(!text.contains("outcome=\"error\""), "{text}");
    let http_requests = |surface: &str, route: &str, status: &str| {
        series_value(
            &text,
            &format!(
                "spillway_http_requests_total{{route=\"{route}\",status=\"{status}\",surface=\"{surface}\"}}"
            ),
        )
    };
    // `spillway status` reads the quotas and the shares on each refresh.
    assert_eq!(http_requests("admin", "/admin/quotas", "200"), POLLS as f64);
    assert_eq!(http_requests("admin", "/admin/shares", "200"), POLLS as f64);
    assert_eq!(http_requests("admin", "/admin/quotas", "401"), 1.0);
    assert_eq!(http_requests("model", "/v1/messages", "200"), 1.0);
    assert_eq!(http_requests("models", "/v1/models", "200"), 1.0);
    assert_eq!(http_requests("ops", "/readyz", "200"), 1.0);
    assert!(http_requests("ops", "/healthz", "200") >= 1.0);
    assert_eq!(
        http_requests("ops", "/metrics", "200"),
        1.0,
        "the first scrape"
    );
    // Unrouted: `-`, never the raw path (the label stays bounded).
    assert_eq!(http_requests("other", "-", "404"), 1.0);
    assert!(!text.contains("/no/such/path"), "{text}");

    gateway.kill().unwrap();
    gateway.wait().unwrap();
}
