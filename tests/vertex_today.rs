//! Today's Vertex, through the real router and the simulator: what its
//! answers mean for routing and budgets (issue "Today's Vertex quota
//! model", items 4 and 6–8).
//!
//! - A capacity 429 (Google short of capacity, no quota metric named) cools
//!   the location down and spills traffic; the learned budget is untouched.
//! - A region that says the model is not enabled for the project is routed
//!   around, re-probed after a cooldown, and never reaches a client as 404.
//! - A rejected upstream credential is refreshed and retried; a client never
//!   sees it as its own 401.
//! - Cache reads count toward the input quota only for models whose quota
//!   counts them.
//! - `"stream": true` sent to `:rawPredict` is forwarded as sent.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use spillway_sim::{Fault, FaultKind, SimConfig, SimModel, SimRegion};
use support::*;

fn sim_with(regions: &[(&str, Vec<SimModel>)]) -> SimConfig {
    SimConfig {
        regions: regions
            .iter()
            .map(|(name, models)| SimRegion {
                name: name.to_string(),
                models: models.clone(),
            })
            .collect(),
        ..SimConfig::vertex_defaults()
    }
}

const ADMIN_KEY: &str = "admin-key-for-tests";

async fn quotas(h: &Harness) -> Vec<Value> {
    h.http
        .get(format!("{}/admin/quotas", h.url))
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn admin_overlay() -> String {
    format!(
        "[admin]\nkey_sha256 = \"{}\"\n",
        spillway_gateway::auth::hash_key(ADMIN_KEY)
    )
}

#[tokio::test(start_paused = true)]
async fn capacity_429s_cool_a_location_down_without_lowering_its_budget() {
    let sim = sim_with(&[
        ("global", vec![SimModel::new(HAIKU, 60, 50_000)]),
        ("us-central1", vec![SimModel::new(HAIKU, 60, 50_000)]),
    ]);
    let overlay = format!(
        "{}[models.\"claude-3-haiku@20240307\"]\nregions = [{{ name = \"global\" }}, {{ name = \"us-central1\" }}]\n",
        admin_overlay()
    );
    let h = Harness::start_custom(sim, |_| overlay).await;
    h.sim
        .inject(Fault::region("global", FaultKind::Capacity).times(3));
    let mut served_by = Vec::new();
    for _ in 0..12 {
        let r = h.post_json("/v1/messages", &hello(HAIKU)).await;
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        served_by.push(
            r.headers()["x-spillway-region"]
                .to_str()
                .unwrap()
                .to_string(),
        );
        // Past a short cooldown, global is tried again (and refuses again).
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert_eq!(h.sim.counters("global", HAIKU).capacity_limited, 3);
    // Meanwhile the traffic spilled to the region.
    assert!(
        served_by.iter().filter(|r| *r == "us-central1").count() >= 3,
        "{served_by:?}"
    );
    // The learned budget of global is what was configured: capacity taught nothing.
    for budget in quotas(&h).await {
        assert_eq!(
            budget["effective"], budget["configured"],
            "a capacity 429 must not lower a budget: {budget}"
        );
    }
    let metrics = h.metrics().await;
    assert_eq!(
        series_value(&metrics, "spillway_upstream_capacity_429_total{model=\"claude-3-haiku@20240307\",region=\"global\"}"),
        3.0
    );
    // The cooldown ends: global serves again.
    tokio::time::sleep(Duration::from_secs(70)).await;
    let mut back = false;
    for _ in 0..6 {
        let r = h.post_json("/v1/messages", &hello(HAIKU)).await;
        assert_eq!(r.status(), 200);
        back |= r.headers()["x-spillway-region"] == "global";
    }
    assert!(back, "global came back after its cooldown");
}

#[tokio::test(start_paused = true)]
async fn a_region_without_the_model_is_routed_around_and_only_reprobed() {
    let h = Harness::start("").await;
    h.sim.refuse_model("us-central1", HAIKU);
    for i in 0..20 {
        let r = h.post_json("/v1/messages", &hello(HAIKU)).await;
        assert_eq!(r.status(), 200, "request {i}: {:?}", r.text().await);
        assert_eq!(r.headers()["x-spillway-region"], "europe-west4");
    }
    let probes = |h: &Harness| h.sim.counters("us-central1", HAIKU).requests;
    assert_eq!(
        probes(&h),
        1,
        "the refusing region is asked once, then routed around"
    );
    // Its cooldown over, it is re-probed once; still refusing, it stays out.
    tokio::time::sleep(Duration::from_secs(61)).await;
    for _ in 0..5 {
        let r = h.post_json("/v1/messages", &hello(HAIKU)).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(probes(&h), 2, "one re-probe after the cooldown");
    let metrics = h.metrics().await;
    assert_eq!(
        series_value(&metrics, "spillway_upstream_setup_errors_total{model=\"claude-3-haiku@20240307\",problem=\"model_not_enabled\",region=\"us-central1\"}"),
        2.0
    );
    // Enabled again: the next re-probe brings it back.
    h.sim.allow_model("us-central1", HAIKU);
    tokio::time::sleep(Duration::from_secs(121)).await;
    let mut regions = Vec::new();
    for _ in 0..4 {
        let r = h.post_json("/v1/messages", &hello(HAIKU)).await;
        regions.push(
            r.headers()["x-spillway-region"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    assert!(regions.iter().any(|r| r == "us-central1"), "{regions:?}");
}

#[tokio::test(start_paused = true)]
async fn a_model_enabled_nowhere_is_the_gateways_error_not_the_clients() {
    let h = Harness::start(ONE_REGION).await;
    h.sim.refuse_model("us-central1", HAIKU);
    let r = h.post_json("/v1/messages", &hello(HAIKU)).await;
    let message = expect_error(r, 502, "api_error").await;
    assert!(message.contains("not enabled"), "{message}");
}

const ONE_REGION: &str =
    "[models.\"claude-3-haiku@20240307\"]\nregions = [{ name = \"us-central1\" }]\n";

#[tokio::test]
async fn a_rotated_static_token_is_a_server_error_never_the_clients_401() {
    let h = Harness::start("").await;
    assert_eq!(
        h.post_json("/v1/messages", &hello(HAIKU)).await.status(),
        200
    );
    h.sim.rotate_token();
    let r = h.post_json("/v1/messages", &hello(HAIKU)).await;
    let message = expect_error(r, 500, "api_error").await;
    assert!(message.contains("upstream credentials"), "{message}");
    let metrics = h.metrics().await;
    let rejected: f64 = ["us-central1", "europe-west4"]
        .iter()
        .map(|region| {
            series_value(&metrics, &format!("spillway_upstream_setup_errors_total{{model=\"claude-3-haiku@20240307\",problem=\"credentials_rejected\",region=\"{region}\"}}"))
        })
        .sum();
    assert_eq!(rejected, 2.0, "refused, refreshed, refused again");
}

#[tokio::test(start_paused = true)]
async fn stream_true_on_raw_predict_is_forwarded_as_sent() {
    let h = Harness::start("").await;
    let body = json!({
        "anthropic_version": "vertex-2023-10-16",
        "max_tokens": 64,
        "stream": true,
        "messages": [{"role": "user", "content": "Hello, Claude"}]
    });
    let r = h
        .http
        .post(h.vertex_url(HAIKU, "rawPredict"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = read_events(r).await;
    assert_eq!(events.last().unwrap().0, "message_stop");
    let sent = h.sim.recent_requests();
    assert_eq!(sent.last().unwrap().action, "rawPredict");
    // Accounted: the stream's usage reached the ledger.
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("spillway_requests_total{model=\"claude-3-haiku@20240307\",outcome=\"ok\",tenant=\"anonymous\"} 1"),
        "{metrics}"
    );
}

/// A current model (cache reads not counted) and the same traffic on a
/// model configured to count them, both with 10,000 input tokens a minute.
#[tokio::test(start_paused = true)]
async fn cache_reads_count_only_where_the_models_quota_counts_them() {
    const CURRENT: &str = "claude-haiku-4-5@20251001";
    let sim = sim_with(&[(
        "us-central1",
        vec![
            SimModel::split(CURRENT, 600, 10_000, 10_000),
            SimModel::split(HAIKU, 600, 10_000, 10_000),
        ],
    )]);
    let overlay = "
[models.\"claude-haiku-4-5@20251001\"]
regions = [{ name = \"us-central1\", requests_per_min = 600, tokens_per_min = 100000000, input_tokens_per_min = 10000, output_tokens_per_min = 10000 }]

[models.\"claude-3-haiku@20240307\"]
regions = [{ name = \"us-central1\", requests_per_min = 600, tokens_per_min = 100000000, input_tokens_per_min = 10000, output_tokens_per_min = 10000 }]
";
    let h = Harness::start_custom(sim, |_| overlay.to_string()).await;
    // About 2,500 input tokens a request, nearly all of them cache reads.
    let prompt = format!("SIM_CACHE_READ=2400 {}", "cached context ".repeat(600));
    let body = |model: &str| {
        json!({"model": model, "max_tokens": 16,
               "messages": [{"role": "user", "content": prompt}]})
    };
    let (mut current_ok, mut counted_ok) = (0, 0);
    for _ in 0..30 {
        if h.post_fail_fast("/v1/messages", &body(CURRENT))
            .await
            .status()
            == 200
        {
            current_ok += 1;
        }
        if h.post_fail_fast("/v1/messages", &body(HAIKU))
            .await
            .status()
            == 200
        {
            counted_ok += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // 30 requests × ~2,500 prompt tokens in 15 s is 7× the input quota; the
    // current model's quota counts only the ~100 uncached tokens of each.
    assert_eq!(
        current_ok, 30,
        "cache reads that do not count must not block"
    );
    assert!(
        (2..=5).contains(&counted_ok),
        "where cache reads count, ~10,000 / 2,500 per minute: {counted_ok}"
    );
    for model in [CURRENT, HAIKU] {
        assert_eq!(
            h.sim.counters("us-central1", model).rate_limited,
            0,
            "{model}"
        );
    }
    for report in h.sim.bucket_reports(Duration::from_secs(60)) {
        assert!(report.within_limits(), "{report:?}");
    }
}

/// `config/examples/claude-4.toml`, as shipped, serving traffic (upstream
/// pointed at the simulator, which has the same lineage bucket on global).
#[tokio::test(start_paused = true)]
async fn the_shipped_claude_4_example_serves_traffic() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/examples/claude-4.toml"
    ))
    .expect("the example ships");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples/claude-4.toml");
    if let Err(e) = spillway_gateway::config::check_file(std::path::Path::new(path)) {
        panic!("spillway check-config refuses the example: {e}");
    }
    let sonnet =
        |id: &str| SimModel::split(id, 200, 400_000, 40_000).in_group("anthropic-claude-sonnet");
    let regional = |id: &str| SimModel::split(id, 60, 100_000, 10_000);
    let sim = sim_with(&[
        (
            "global",
            vec![
                sonnet("claude-sonnet-4-5@20250929"),
                sonnet("claude-sonnet-4-6"),
                SimModel::split("claude-haiku-4-5@20251001", 300, 500_000, 50_000),
            ],
        ),
        (
            "us-east5",
            vec![
                regional("claude-sonnet-4-5@20250929"),
                SimModel::split("claude-haiku-4-5@20251001", 120, 200_000, 20_000),
            ],
        ),
        ("europe-west1", vec![regional("claude-sonnet-4-6")]),
    ]);
    // The example pointed at the simulator: no client auth, and the
    // simulator's static token for Google credentials (the harness points
    // the URLs at it).
    let overlay = example
        .replace("auth = \"api_key\"", "auth = \"none\"")
        .replace(
            "auth = \"gcp\"",
            &format!("auth = \"static\"\ntoken = \"{UPSTREAM_TOKEN}\""),
        );
    assert_ne!(overlay, example);
    let h = Harness::start_custom(sim, |_| overlay).await;
    for model in ["claude-sonnet-4-5", "claude-sonnet-4-6", "claude-haiku-4-5"] {
        for _ in 0..3 {
            let r = h.post_json("/v1/messages", &hello(model)).await;
            assert_eq!(r.status(), 200, "{model}: {:?}", r.text().await);
            assert_eq!(
                r.headers()["x-spillway-region"],
                "global",
                "{model}: ordered, global first"
            );
        }
    }
}

/// Split limits shaped differently per location: a request that fits one
/// location's input limit (and not the other's) is served there, not
/// refused as "can never fit".
#[tokio::test(start_paused = true)]
async fn a_request_fitting_one_locations_split_limits_is_not_refused() {
    const CURRENT: &str = "claude-haiku-4-5@20251001";
    let sim = sim_with(&[
        (
            "us-east5",
            vec![SimModel::split(CURRENT, 60, 10_000, 1_000)],
        ),
        (
            "europe-west1",
            vec![SimModel::split(CURRENT, 60, 1_000, 10_000)],
        ),
    ]);
    let overlay = "
[models.\"claude-haiku-4-5@20251001\"]
regions = [
  { name = \"us-east5\", input_tokens_per_min = 10000, output_tokens_per_min = 1000 },
  { name = \"europe-west1\", input_tokens_per_min = 1000, output_tokens_per_min = 10000 },
]
";
    let h = Harness::start_custom(sim, |_| overlay.to_string()).await;
    // About 3,000 input tokens and 500 output: only us-east5 can take it.
    let body = json!({"model": CURRENT, "max_tokens": 500,
                      "messages": [{"role": "user", "content": "word ".repeat(2_000)}]});
    let r = h.post_json("/v1/messages", &body).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(r.headers()["x-spillway-region"], "us-east5");
    // max_tokens over every output limit never refuses: Vertex charges what
    // is generated, and so does admission.
    let body = json!({"model": CURRENT, "max_tokens": 5_000,
                      "messages": [{"role": "user", "content": "word ".repeat(2_000)}]});
    let r = h.post_json("/v1/messages", &body).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    // A prompt of at least 10,625 tokens by its bytes (more than either
    // input limit) is refused with the numbers.
    let body = json!({"model": CURRENT, "max_tokens": 100,
                      "messages": [{"role": "user", "content": "w".repeat(170_000)}]});
    let message = expect_error(
        h.post_json("/v1/messages", &body).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(message.contains("can never fit"), "{message}");
}
