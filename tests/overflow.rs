//! Overflow to Anthropic's own API, end to end: the real router in front of
//! the simulator serving both Vertex and (its Anthropic-API mode) the
//! first-party Messages API, on tokio's paused clock.
//!
//! Claude 3 Haiku has two Vertex regions, each taking [`VERTEX_PER_WINDOW`]
//! requests a window (output binds: every request asks for and produces
//! [`OUTPUT`] tokens), and an `overflow` to Anthropic whose output bucket
//! holds [`ANTHROPIC_BURST`] requests and refills at that many a minute.
//! Two tenants send three times the Vertex pool for two windows: `spill`
//! allows overflow, `stay` does not. What must hold:
//!
//! - **Vertex is never over quota**: the simulator answered no 429 there,
//!   and no 60 s window of its arrival log exceeds a bucket.
//! - **Anthropic is never over its buckets**: no 429 from the simulator,
//!   and its log replayed against an independent bucket computation shows
//!   no level below zero.
//! - **Goodput ≥ 98 %** of what the buckets allow together (defined at
//!   [`what_the_buckets_allow`]).
//! - **`stay` never reached Anthropic**, checked on the simulator's log:
//!   every request it logged is one that `spill` was answered from.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use spillway_sim::{AnthropicModel, Fault, FaultKind, SimConfig, SimModel, SimRegion};
use support::*;
use tokio::time::Instant;

/// Anthropic's id for Claude 3 Haiku (the default mapping of [`HAIKU`]).
const ANTHROPIC_HAIKU: &str = "claude-3-haiku-20240307";
const ANTHROPIC_KEY: &str = "sk-ant-overflow-test-4f1b9c2e";
const SPILL_KEY: &str = "key-of-spill";
const STAY_KEY: &str = "key-of-stay";

/// Output tokens each request asks for and gets.
const OUTPUT: u64 = 100;
/// Each Vertex region's output quota, in requests a window.
const VERTEX_PER_WINDOW: u64 = 15;
/// Anthropic's output bucket, in requests: its capacity, and its refill a
/// minute.
const ANTHROPIC_BURST: u64 = 10;

/// Spillway's window: Vertex's minute plus the configured transit margin.
const LEDGER_WINDOW: Duration = Duration::from_millis(60_250);
const SIM_WINDOW: Duration = Duration::from_secs(60);

fn sim_config(anthropic_otpm: u64) -> SimConfig {
    let haiku = SimModel::split(HAIKU, 1_000, 200_000, VERTEX_PER_WINDOW * OUTPUT);
    SimConfig {
        regions: vec![
            SimRegion {
                name: "us-central1".into(),
                models: vec![haiku.clone()],
            },
            SimRegion {
                name: "europe-west4".into(),
                models: vec![haiku],
            },
        ],
        ..SimConfig::vertex_defaults()
    }
    .with_anthropic(
        ANTHROPIC_KEY,
        vec![AnthropicModel::new(
            ANTHROPIC_HAIKU,
            1_000,
            200_000,
            anthropic_otpm,
        )],
    )
}

/// The same quotas in Spillway's config; the overflow's output limit is
/// `configured_otpm` (which a test may set above the simulator's).
fn overlay(sim_url: &str, configured_otpm: u64) -> String {
    let vertex_otpm = VERTEX_PER_WINDOW * OUTPUT;
    format!(
        r#"
[server]
auth = "api_key"
[scheduler]
max_wait_cap_ms = 60000
[providers.anthropic]
url = "{sim_url}"
api_key = "{ANTHROPIC_KEY}"

[models."{HAIKU}"]
regions = [
  {{ name = "us-central1", requests_per_min = 1000, input_tokens_per_min = 200000, output_tokens_per_min = {vertex_otpm} }},
  {{ name = "europe-west4", requests_per_min = 1000, input_tokens_per_min = 200000, output_tokens_per_min = {vertex_otpm} }},
]
overflow = [
  {{ provider = "anthropic", requests_per_min = 1000, input_tokens_per_min = 200000, output_tokens_per_min = {configured_otpm} }},
]

[tenants.spill]
key_sha256 = "{}"
allow_overflow = true
[tenants.stay]
key_sha256 = "{}"
"#,
        spillway_gateway::auth::hash_key(SPILL_KEY),
        spillway_gateway::auth::hash_key(STAY_KEY),
    )
}

/// Fills europe-west4's window with `stay`'s requests (all served there).
async fn fill_europe(h: &Harness) {
    for i in 0..VERTEX_PER_WINDOW as usize {
        let r = h
            .http
            .post(format!("{}/v1/messages", h.url))
            .header("x-api-key", STAY_KEY)
            .header("x-spillway-regions", "europe-west4")
            .json(&request("stay", i))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-spillway-region"], "europe-west4");
    }
}

/// `overlay` with the admin API on, under [`ADMIN_KEY`].
fn with_admin(overlay: String) -> String {
    overlay
        + &format!(
            "[admin]\nkey_sha256 = \"{}\"\n",
            spillway_gateway::auth::hash_key(ADMIN_KEY)
        )
}

fn request(tenant: &str, i: usize) -> Value {
    json!({
        "model": HAIKU,
        "max_tokens": OUTPUT,
        "messages": [{"role": "user", "content": format!("SIM_OUTPUT_TOKENS={OUTPUT} tenant {tenant} request {i}")}]
    })
}

/// One client's answer: status, provider and location.
#[derive(Debug)]
struct Answered {
    tenant: &'static str,
    status: u16,
    provider: Option<String>,
    region: Option<String>,
    retry_after: Option<u64>,
}

/// Sends `total` requests evenly over `over`, alternating between
/// `tenants`, each willing to wait `max_wait` for quota.
async fn offer(
    h: &Harness,
    tenants: &[(&'static str, &'static str)],
    total: usize,
    over: Duration,
    max_wait: Duration,
) -> Vec<Answered> {
    let spacing = over / total as u32;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let (tenant, key) = tenants[i % tenants.len()];
        let (http, url) = (h.http.clone(), h.url.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + spacing * i as u32).await;
            let r = http
                .post(format!("{url}/v1/messages"))
                .header("x-api-key", key)
                .header("x-spillway-max-wait-ms", max_wait.as_millis().to_string())
                .json(&request(tenant, i))
                .send()
                .await
                .expect("gateway answers");
            let header = |name: &str| {
                r.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_string())
            };
            Answered {
                tenant,
                status: r.status().as_u16(),
                provider: header("x-spillway-provider"),
                region: header("x-spillway-region"),
                retry_after: header("retry-after").and_then(|v| v.parse().ok()),
            }
        }));
    }
    let mut answers = Vec::with_capacity(total);
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// What the buckets allow over the run's first two Spillway windows,
/// `[start, start + 2 × 60.25 s)`, in requests:
///
/// - **Vertex**: each region at most its output quota in any window no
///   longer than Spillway's, so two windows' worth each.
/// - **Anthropic**: a bucket full when the first overflow reached it (at
///   `first`) and refilling continuously at its limit a minute, so its
///   capacity plus the refill until the horizon. Before `first` Vertex had
///   room, and overflow is not meant to be used then: its refill was lost
///   to a full bucket, by design.
fn what_the_buckets_allow(horizon: Duration, first: Duration) -> (u64, u64) {
    let vertex = 2 * 2 * VERTEX_PER_WINDOW;
    let refill = horizon.saturating_sub(first).as_secs_f64() / 60.0 * ANTHROPIC_BURST as f64;
    let anthropic = ANTHROPIC_BURST + refill.floor() as u64;
    (vertex, anthropic)
}

#[tokio::test(start_paused = true)]
async fn three_times_the_vertex_pool_overflows_for_the_tenant_that_allows_it_and_no_bucket_is_exceeded(
) {
    let otpm = ANTHROPIC_BURST * OUTPUT;
    let h = Harness::start_custom(sim_config(otpm), |url| overlay(url, otpm)).await;
    // Both surfaces' logs and buckets start with the load.
    h.sim.reset();
    let start = Instant::now();
    let vertex_pool = 2 * VERTEX_PER_WINDOW as usize;
    let total = 3 * vertex_pool * 2;
    let answers = offer(
        &h,
        &[("spill", SPILL_KEY), ("stay", STAY_KEY)],
        total,
        Duration::from_secs(120),
        Duration::from_secs(10),
    )
    .await;

    // Every answer is a success with its provider named, or an honest 429.
    let mut from_anthropic = 0u64;
    for a in &answers {
        match (a.status, a.provider.as_deref()) {
            (200, Some("vertex")) => {
                let region = a.region.as_deref().unwrap();
                assert!(region == "us-central1" || region == "europe-west4", "{a:?}");
            }
            (200, Some("anthropic")) => {
                assert_eq!(
                    a.tenant, "spill",
                    "only the tenant that allows it overflows"
                );
                assert_eq!(a.region.as_deref(), Some("anthropic"));
                from_anthropic += 1;
            }
            (429, _) => assert!(a.retry_after.is_some(), "an honest retry-after: {a:?}"),
            _ => panic!("unexpected answer {a:?}"),
        }
    }

    // Vertex: no 429, no window over any bucket.
    for region in ["us-central1", "europe-west4"] {
        assert_eq!(h.sim.counters(region, HAIKU).rate_limited, 0, "{region}");
    }
    let reports: Vec<_> = h
        .sim
        .bucket_reports(SIM_WINDOW)
        .into_iter()
        .filter(|r| r.admitted > 0)
        .collect();
    assert_eq!(reports.len(), 2, "both regions served");
    for r in &reports {
        assert!(!r.log_truncated);
        assert!(r.within_limits(), "{:?} peaked at {:?}", r.id, r.peak);
    }

    // Anthropic: no 429, and its log replays with no bucket below zero.
    let counters = h.sim.anthropic_counters(ANTHROPIC_HAIKU);
    assert_eq!(counters.rate_limited, 0, "{counters:?}");
    assert!(counters.succeeded > 0, "overflow was used");
    let replay = h.sim.anthropic_admissions_report();
    assert_eq!(replay.len(), 1);
    assert!(
        replay[0].complete && replay[0].levels_consistent,
        "{replay:?}"
    );
    assert!(replay[0].within_limits(), "{replay:?}");

    // The non-allowing tenant never reached Anthropic: every request the
    // simulator logged there is one `spill` was answered from, and no body
    // it kept is one of `stay`'s.
    let log = h.sim.anthropic_log();
    assert!(log.complete);
    assert_eq!(
        log.entries.len() as u64,
        from_anthropic,
        "one Anthropic request per answer from it"
    );
    for recorded in h.sim.anthropic_recent_requests() {
        let body = recorded.body.expect("small bodies are kept").to_string();
        assert!(body.contains("tenant spill"), "{body}");
        assert!(!body.contains("tenant stay"), "{body}");
        assert!(recorded.x_api_key_valid, "the configured key was sent");
    }

    // Goodput over the first two windows.
    let horizon = LEDGER_WINDOW * 2;
    let vertex_served: u64 = reports
        .iter()
        .map(|r| {
            h.sim
                .admissions(&r.id)
                .iter()
                .filter(|a| a.at < start + horizon)
                .count() as u64
        })
        .sum();
    let admitted: Vec<Duration> = log
        .entries
        .iter()
        .filter(|e| e.admitted)
        .map(|e| Duration::from_nanos(e.at_ns))
        .collect();
    let first = *admitted.first().expect("overflow was used");
    let anthropic_served = admitted.iter().filter(|&&at| at < horizon).count() as u64;
    let (vertex_allowed, anthropic_allowed) = what_the_buckets_allow(horizon, first);
    let served = vertex_served + anthropic_served;
    let allowed = vertex_allowed + anthropic_allowed;
    let goodput = served as f64 / allowed as f64;
    let spill_served = answers
        .iter()
        .filter(|a| a.tenant == "spill" && a.status == 200)
        .count();
    let stay_served = answers
        .iter()
        .filter(|a| a.tenant == "stay" && a.status == 200)
        .count();
    println!(
        "offered {total}; in the first two windows Vertex served {vertex_served} of {vertex_allowed}, \
         Anthropic {anthropic_served} of {anthropic_allowed} (first overflow at {first:?}): \
         goodput {:.1}%; spill served {spill_served}, stay {stay_served}",
        goodput * 100.0
    );
    assert!(served <= allowed, "never more than the buckets allow");
    assert!(goodput >= 0.98, "goodput {goodput:.3}");
    assert!(
        anthropic_served as f64 >= 0.98 * anthropic_allowed as f64,
        "the overflow bucket was used: {anthropic_served} of {anthropic_allowed}"
    );
}

/// Anthropic's real output limit is half what Spillway was told. Its
/// headers teach the real one on the first answer; the budget converges
/// within one window, with at most two 429s from Anthropic, and none after
/// the first window.
#[tokio::test(start_paused = true)]
async fn a_lower_real_limit_is_learned_from_anthropics_headers_within_a_window() {
    let real = ANTHROPIC_BURST * OUTPUT;
    let h = Harness::start_custom(sim_config(real), |url| with_admin(overlay(url, 2 * real))).await;
    h.sim.reset();
    let start = Instant::now();
    // One request a second for two windows: the Vertex pool takes 30, the
    // rest asks the overflow.
    let answers = offer(
        &h,
        &[("spill", SPILL_KEY)],
        120,
        Duration::from_secs(120),
        Duration::from_secs(5),
    )
    .await;
    let counters = h.sim.anthropic_counters(ANTHROPIC_HAIKU);
    let log = h.sim.anthropic_log();
    let late_429s = log
        .entries
        .iter()
        .filter(|e| e.status == 429 && Duration::from_nanos(e.at_ns) >= SIM_WINDOW)
        .count();
    let served = answers.iter().filter(|a| a.status == 200).count();
    println!(
        "served {served} of 120; Anthropic: {} succeeded, {} rate limited ({late_429s} after the first window), after {:?}",
        counters.succeeded,
        counters.rate_limited,
        start.elapsed()
    );
    assert!(counters.succeeded > 0, "the overflow was used");
    assert!(counters.rate_limited <= 2, "{counters:?}");
    // And the learned bucket is the real one, not a timid guess: from the
    // first overflow on, the real bucket allowed its capacity plus its
    // refill until the load ended; nearly all of it was used.
    let first = log
        .entries
        .iter()
        .find(|e| e.admitted)
        .map(|e| Duration::from_nanos(e.at_ns))
        .unwrap();
    let refill = (Duration::from_secs(120) - first).as_secs_f64() / 60.0 * ANTHROPIC_BURST as f64;
    let allowed = ANTHROPIC_BURST + refill.floor() as u64;
    assert!(
        counters.succeeded as f64 >= 0.9 * allowed as f64,
        "{} of the {allowed} the real bucket allowed",
        counters.succeeded
    );
    assert_eq!(late_429s, 0, "converged within the first window");
    let replay = h.sim.anthropic_admissions_report();
    assert!(replay[0].within_limits(), "{replay:?}");
    // The budget now says what Anthropic does.
    let quotas: Vec<Value> = h
        .http
        .get(format!("{}/admin/quotas", h.url))
        .header("x-api-key", ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let overflow = quotas
        .iter()
        .find(|q| q["region"] == "anthropic")
        .expect("the overflow budget is listed");
    assert_eq!(overflow["provider"], "anthropic");
    assert_eq!(overflow["configured"]["output_tokens_per_min"], 2 * real);
    assert_eq!(overflow["effective"]["output_tokens_per_min"], real);
}

const ADMIN_KEY: &str = "admin-key-for-overflow";

/// Residency: a tenant pinned to regions overflows only when it lists the
/// provider; an `x-spillway-regions` hint likewise. Streams overflow event
/// by event, with their usage settled.
#[tokio::test(start_paused = true)]
async fn residency_keeps_a_pinned_tenant_on_vertex_unless_it_lists_the_provider() {
    let otpm = ANTHROPIC_BURST * OUTPUT;
    let h = Harness::start_custom(sim_config(otpm), |url| {
        overlay(url, otpm)
            + &format!(
                r#"
[tenants.eu]
key_sha256 = "{}"
regions = ["europe-west4"]
allow_overflow = true
[tenants.eu-or-anthropic]
key_sha256 = "{}"
regions = ["europe-west4", "anthropic"]
allow_overflow = true
"#,
                spillway_gateway::auth::hash_key("key-eu"),
                spillway_gateway::auth::hash_key("key-eu-or-anthropic"),
            )
    })
    .await;
    // Fill europe-west4 (15 requests), from a tenant that stays on Vertex.
    let mut europe = 0;
    for i in 0..VERTEX_PER_WINDOW as usize {
        let r = h
            .http
            .post(format!("{}/v1/messages", h.url))
            .header("x-api-key", "key-eu")
            .json(&request("eu", i))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-spillway-region"], "europe-west4");
        europe += 1;
    }
    assert_eq!(europe, VERTEX_PER_WINDOW);
    let send = |key: &'static str, hint: Option<&'static str>, stream: bool| {
        let (http, url) = (h.http.clone(), h.url.clone());
        async move {
            let mut body = request(key, 0);
            body["stream"] = json!(stream);
            let mut r = http
                .post(format!("{url}/v1/messages"))
                .header("x-api-key", key)
                .header("x-spillway-max-wait-ms", "0")
                .json(&body);
            if let Some(hint) = hint {
                r = r.header("x-spillway-regions", hint);
            }
            r.send().await.unwrap()
        }
    };
    // Pinned to europe-west4, now full: refused, never overflowed.
    let r = send("key-eu", None, false).await;
    assert_eq!(r.status(), 429);
    // Pinned, but listing the provider: overflows.
    let r = send("key-eu-or-anthropic", None, false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-spillway-provider"], "anthropic");
    // A hint naming only europe-west4 keeps an allowing tenant on Vertex.
    let r = send(SPILL_KEY, Some("europe-west4"), false).await;
    assert_eq!(r.status(), 429);
    // A hint naming the provider lets it overflow; a stream, relayed whole.
    let r = send(SPILL_KEY, Some("europe-west4,anthropic"), true).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-spillway-provider"], "anthropic");
    let events = read_events(r).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    let delta = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta.1["usage"]["output_tokens"], OUTPUT);
    // What Anthropic received: its own model id, no Vertex body field, the
    // version header, and the gateway's key (never the client's).
    let sent = h.sim.anthropic_recent_requests();
    assert_eq!(sent.len(), 2);
    let seen: HashSet<bool> = sent.iter().map(|r| r.x_api_key_valid).collect();
    assert_eq!(seen, HashSet::from([true]));
    for r in &sent {
        let body = r.body.as_ref().unwrap();
        assert_eq!(body["model"], ANTHROPIC_HAIKU);
        assert!(body.get("anthropic_version").is_none());
        assert_eq!(r.anthropic_version.as_deref(), Some("2023-06-01"));
    }
}

/// A 529 from Anthropic cools the overflow down: the next overflow request
/// is not sent there until the cooldown ends, and the client hears an
/// overloaded error or an honest 429, never a hang.
#[tokio::test(start_paused = true)]
async fn an_overloaded_anthropic_cools_the_overflow_down() {
    let otpm = ANTHROPIC_BURST * OUTPUT;
    let h = Harness::start_custom(sim_config(otpm), |url| overlay(url, otpm)).await;
    // Vertex full: 15 per region.
    for i in 0..2 * VERTEX_PER_WINDOW as usize {
        let r = h
            .http
            .post(format!("{}/v1/messages", h.url))
            .header("x-api-key", STAY_KEY)
            .json(&request("stay", i))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    h.sim
        .inject(Fault::region("anthropic", FaultKind::Status(529)).times(1));
    let post = || {
        h.http
            .post(format!("{}/v1/messages", h.url))
            .header("x-api-key", SPILL_KEY)
            .header("x-spillway-max-wait-ms", "0")
            .json(&request("spill", 0))
            .send()
    };
    let r = post().await.unwrap();
    let status = r.status().as_u16();
    assert!(status == 529 || status == 429, "{status}");
    assert_eq!(h.sim.anthropic_counters(ANTHROPIC_HAIKU).overloaded, 1);
    // Cooling down: refused by Spillway, not sent.
    let r = post().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(h.sim.anthropic_counters(ANTHROPIC_HAIKU).requests, 1);
    // After the cooldown, served there.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let r = post().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-spillway-provider"], "anthropic");
}

/// The Anthropic key, end to end against the release binary with debug
/// logging: it reaches Anthropic (so the checks below can fail), and it is
/// in no log line, no metric, no admin answer, no request to Vertex, and
/// not in `spillway check-config`'s rendering of a file that holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_key_is_in_no_log_no_metric_and_no_vertex_request() {
    use support::binary::{free_port, serve_with_env, wait_healthy};
    let mut config = sim_config(ANTHROPIC_BURST * OUTPUT);
    config.bearer_token = Some(UPSTREAM_TOKEN.into());
    let sim = spillway_sim::Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // Vertex takes two requests a window: the rest overflow.
    sim.set_limits(
        "us-central1",
        HAIKU,
        spillway_sim::QuotaLimits::split(2, 200_000, 200_000),
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let body = |key_line: &str| {
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
auth = "api_key"
[upstream]
project = "secrets-test"
regional_url = "{sim}"
global_url = "{sim}"
auth = "static"
token = "{UPSTREAM_TOKEN}"
[admin]
key_sha256 = "{admin}"
[providers.anthropic]
url = "{sim}"
{key_line}
[models."{HAIKU}"]
regions = [{{ name = "us-central1", requests_per_min = 2, input_tokens_per_min = 200000, output_tokens_per_min = 200000 }}]
overflow = [{{ provider = "anthropic", requests_per_min = 1000, input_tokens_per_min = 200000, output_tokens_per_min = 1000 }}]
[tenants.spill]
key_sha256 = "{spill}"
allow_overflow = true
"#,
            sim = sim.base_url(),
            admin = spillway_gateway::auth::hash_key(ADMIN_KEY),
            spill = spillway_gateway::auth::hash_key(SPILL_KEY),
        )
    };
    let served = dir.path().join("spillway.toml");
    std::fs::write(
        &served,
        body("api_key_env = \"SPILLWAY_TEST_ANTHROPIC_KEY\""),
    )
    .unwrap();
    let log = dir.path().join("spillway.log");
    let mut gateway = serve_with_env(
        &served,
        &log,
        &[
            ("SPILLWAY_TEST_ANTHROPIC_KEY", ANTHROPIC_KEY),
            ("RUST_LOG", "debug"),
        ],
    );
    let http = spillway_gateway::tls::http_client();
    wait_healthy(&http, &url, &mut gateway).await;

    let post = |stream: bool| {
        let mut body = request("spill", 0);
        body["stream"] = json!(stream);
        http.post(format!("{url}/v1/messages"))
            .header("x-api-key", SPILL_KEY)
            .header("x-spillway-max-wait-ms", "0")
            .json(&body)
            .send()
    };
    let mut providers = Vec::new();
    for stream in [false, false, false, true] {
        let r = post(stream).await.unwrap();
        assert_eq!(r.status(), 200);
        providers.push(
            r.headers()["x-spillway-provider"]
                .to_str()
                .unwrap()
                .to_string(),
        );
        let _ = r.bytes().await;
    }
    assert_eq!(providers, ["vertex", "vertex", "anthropic", "anthropic"]);
    // An overloaded Anthropic and a refusal: the error paths log too.
    sim.inject(Fault::region("anthropic", FaultKind::Status(529)).times(1));
    let r = post(false).await.unwrap();
    assert!(matches!(r.status().as_u16(), 429 | 529), "{}", r.status());
    let _ = r.bytes().await;
    let r = post(false).await.unwrap();
    assert_eq!(r.status(), 429, "cooling down");
    let _ = r.bytes().await;

    // It reached Anthropic, as the configured key.
    let sent = sim.anthropic_recent_requests();
    assert!(sent.len() >= 3, "{}", sent.len());
    assert!(sent.iter().all(|r| r.x_api_key_valid));

    let metrics = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics
        .contains("spillway_location_provider{provider=\"anthropic\",region=\"anthropic\"} 1"));
    let mut admin = String::new();
    for path in ["/admin/quotas", "/admin/overview", "/admin/tenants"] {
        let r = http
            .get(format!("{url}{path}"))
            .header("x-api-key", ADMIN_KEY)
            .send()
            .await
            .unwrap();
        admin.push_str(&r.text().await.unwrap());
    }
    assert!(
        admin.contains("anthropic"),
        "the admin API shows the overflow"
    );
    let _ = gateway.kill();
    let _ = gateway.wait();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.lines().count() > 10, "debug logging was on");

    let checked = dir.path().join("with-key.toml");
    std::fs::write(&checked, body(&format!("api_key = \"{ANTHROPIC_KEY}\""))).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
        .arg("check-config")
        .arg(&checked)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let rendered = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(rendered.contains("<redacted>"), "{rendered}");

    for (what, text) in [
        ("the log", logged.as_str()),
        ("/metrics", metrics.as_str()),
        ("the admin API", admin.as_str()),
        ("check-config", rendered.as_str()),
    ] {
        assert!(!text.contains(ANTHROPIC_KEY), "the key is in {what}");
    }
    let vertex = sim.recent_requests();
    assert!(vertex.len() >= 2);
    for r in &vertex {
        assert!(!r.has_x_api_key, "no x-api-key goes to Vertex");
        let seen = format!("{:?} {:?} {:?}", r.authorization, r.anthropic_beta, r.body);
        assert!(
            !seen.contains(ANTHROPIC_KEY),
            "the key went to Vertex: {seen}"
        );
        assert!(!seen.contains(SPILL_KEY), "the client's key went to Vertex");
    }
    for r in &sent {
        let seen = format!("{:?}", r.body);
        assert!(
            !seen.contains(SPILL_KEY),
            "the client's key went to Anthropic"
        );
    }
}

/// Batch items overflow too, for a tenant that allows it (at batch
/// priority, in the overflow's own queue): with every Vertex region of the
/// model drained, `spill`'s batch is served by Anthropic, `stay`'s waits.
#[tokio::test(start_paused = true)]
async fn batch_items_of_an_allowing_tenant_overflow_when_vertex_cannot_take_them() {
    let otpm = ANTHROPIC_BURST * OUTPUT;
    let h = Harness::start_custom(sim_config(otpm), |url| with_admin(overlay(url, otpm))).await;
    for region in ["us-central1", "europe-west4"] {
        let r = h
            .http
            .post(format!("{}/admin/regions/{region}/drain", h.url))
            .header("x-api-key", ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let submit = |key: &'static str, tenant: &'static str, items: usize| {
        let (http, url) = (h.http.clone(), h.url.clone());
        async move {
            let requests: Vec<Value> = (0..items)
                .map(
                    |i| json!({"custom_id": format!("{tenant}-{i}"), "params": request(tenant, i)}),
                )
                .collect();
            let created: Value = http
                .post(format!("{url}/v1/messages/batches"))
                .header("x-api-key", key)
                .json(&json!({ "requests": requests }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            created["id"].as_str().expect("batch created").to_string()
        }
    };
    let status = |key: &'static str, id: String| {
        let (http, url) = (h.http.clone(), h.url.clone());
        async move {
            let b: Value = http
                .get(format!("{url}/v1/messages/batches/{id}"))
                .header("x-api-key", key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            b
        }
    };
    let spill = submit(SPILL_KEY, "spill", 4).await;
    let stay = submit(STAY_KEY, "stay", 2).await;
    let mut ended = None;
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = status(SPILL_KEY, spill.clone()).await;
        if b["processing_status"] == "ended" {
            ended = Some(b);
            break;
        }
    }
    let ended = ended.expect("the allowing tenant's batch ended");
    assert_eq!(ended["request_counts"]["succeeded"], 4, "{ended}");
    let stayed = status(STAY_KEY, stay).await;
    assert_eq!(stayed["processing_status"], "in_progress", "{stayed}");
    assert_eq!(stayed["request_counts"]["succeeded"], 0);
    // Anthropic saw exactly the four items of `spill`, none of `stay`.
    assert_eq!(h.sim.anthropic_counters(ANTHROPIC_HAIKU).succeeded, 4);
    for r in h.sim.anthropic_recent_requests() {
        let body = r.body.unwrap().to_string();
        assert!(
            body.contains("tenant spill") && !body.contains("tenant stay"),
            "{body}"
        );
    }
    // Vertex saw nothing: both regions were drained.
    assert_eq!(h.sim.total_requests(), 0);
}

/// `config/examples/anthropic-overflow.toml`, as shipped (the key given
/// in place of its environment variable, hosts pointed at the simulator):
/// it loads, and the tenant that allows overflow overflows once Vertex is
/// full.
#[tokio::test(start_paused = true)]
async fn the_shipped_overflow_example_serves_and_overflows() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/examples/anthropic-overflow.toml"
    );
    let example = std::fs::read_to_string(path).expect("the example ships");
    let sim = SimConfig::vertex_defaults().with_anthropic(
        ANTHROPIC_KEY,
        vec![
            AnthropicModel::new(ANTHROPIC_HAIKU, 50, 50_000, 10_000),
            AnthropicModel::new("claude-sonnet-4-5-20250929", 50, 30_000, 8_000),
        ],
    );
    let h = Harness::start_custom(sim, |url| {
        example
            .replace(
                "auth = \"gcp\"",
                &format!("auth = \"static\"\ntoken = \"{UPSTREAM_TOKEN}\""),
            )
            .replace(
                "api_key_env = \"ANTHROPIC_API_KEY\"",
                &format!("api_key = \"{ANTHROPIC_KEY}\""),
            )
            .replace(
                "url = \"https://api.anthropic.com\"",
                &format!("url = \"{url}\""),
            )
    })
    .await;
    // Vertex takes one request a window in each of Haiku's regions.
    for region in ["us-central1", "europe-west4"] {
        h.sim.set_quota(region, HAIKU, 1, 50_000);
    }
    let mut providers = Vec::new();
    for i in 0..3 {
        let r = h
            .http
            .post(format!("{}/v1/messages", h.url))
            .header("x-api-key", "test") // the example's `checkout` tenant
            .header("x-spillway-max-wait-ms", "0")
            .json(&json!({"model": "claude-3-haiku", "max_tokens": 16,
                          "messages": [{"role": "user", "content": format!("hello {i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        providers.push(
            r.headers()["x-spillway-provider"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(providers, ["vertex", "vertex", "anthropic"]);
}

/// `spillway status` shows both providers: each Vertex location and the
/// overflow, with who serves it.
#[tokio::test]
async fn spillway_status_shows_both_providers() {
    let otpm = ANTHROPIC_BURST * OUTPUT;
    let h = Harness::start_custom(sim_config(otpm), |url| with_admin(overlay(url, otpm))).await;
    let r = h
        .http
        .post(format!("{}/v1/messages", h.url))
        .header("x-api-key", SPILL_KEY)
        .header("x-spillway-regions", "anthropic,us-central1")
        .json(&request("spill", 0))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let out = status_once(&h.url, ADMIN_KEY).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |region: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(region))
            .unwrap_or_else(|| panic!("no {region} row in\n{stdout}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(
        stdout.lines().next().unwrap().contains("PROVIDER"),
        "{stdout}"
    );
    assert_eq!(row("us-central1")[2], "vertex");
    assert_eq!(row("europe-west4")[2], "vertex");
    let anthropic = row("anthropic");
    assert_eq!(anthropic[0], HAIKU);
    assert_eq!(anthropic[2], "anthropic");
}

/// Anthropic refusing the gateway's key is the gateway's problem, never
/// the client's: after one retry the client gets a 500 `api_error`, not a
/// 401 it would take for its own key.
#[tokio::test(start_paused = true)]
async fn a_rejected_anthropic_key_is_a_server_error_not_the_clients_401() {
    let otpm = ANTHROPIC_BURST * OUTPUT;
    let h = Harness::start_custom(sim_config(otpm), |url| {
        overlay(url, otpm).replace(ANTHROPIC_KEY, "sk-ant-revoked")
    })
    .await;
    // europe-west4 full, so the next request of `spill` there overflows.
    fill_europe(&h).await;
    let r = h
        .http
        .post(format!("{}/v1/messages", h.url))
        .header("x-api-key", SPILL_KEY)
        .header("x-spillway-regions", "anthropic,europe-west4")
        .header("x-spillway-max-wait-ms", "0")
        .json(&request("spill", 99))
        .send()
        .await
        .unwrap();
    expect_error(r, 500, "api_error").await;
    let sent = h.sim.anthropic_recent_requests();
    assert_eq!(sent.len(), 2, "one attempt and one retry");
    assert!(sent.iter().all(|r| r.has_x_api_key && !r.x_api_key_valid));
}

/// A model id Anthropic does not know is the gateway's misconfiguration
/// (`overflow[].model`), not the client's: a 502 naming the setup, a
/// setup-error metric, and the overflow routed around afterwards (not
/// asked again while it is out).
#[tokio::test(start_paused = true)]
async fn an_overflow_model_anthropic_does_not_know_is_a_setup_error_routed_around() {
    let otpm = ANTHROPIC_BURST * OUTPUT;
    let h = Harness::start_custom(sim_config(otpm), |url| {
        overlay(url, otpm).replace(
            "{ provider = \"anthropic\", ",
            "{ provider = \"anthropic\", model = \"claude-3-haiku-19990101\", ",
        )
    })
    .await;
    let post = |i: usize| {
        h.http
            .post(format!("{}/v1/messages", h.url))
            .header("x-api-key", SPILL_KEY)
            .header("x-spillway-regions", "anthropic")
            .header("x-spillway-max-wait-ms", "0")
            .json(&request("spill", i))
            .send()
    };
    // The hint leaves no Vertex region: refused before anything is sent.
    let r = post(0).await.unwrap();
    expect_error(r, 400, "invalid_request_error").await;
    // With europe-west4 full, overflow is asked, and says "no such model".
    fill_europe(&h).await;
    let post = |i: usize| {
        h.http
            .post(format!("{}/v1/messages", h.url))
            .header("x-api-key", SPILL_KEY)
            .header("x-spillway-regions", "europe-west4,anthropic")
            .header("x-spillway-max-wait-ms", "0")
            .json(&request("spill", i))
            .send()
    };
    let message = expect_error(post(1).await.unwrap(), 502, "api_error").await;
    assert!(message.contains("overflow[].model"), "{message}");
    assert_eq!(h.sim.anthropic_recent_requests().len(), 1);
    let metrics = h.metrics().await;
    assert_eq!(
        series_value(
            &metrics,
            &format!("spillway_upstream_setup_errors_total{{model=\"{HAIKU}\",problem=\"model_not_enabled\",region=\"anthropic\"}}")
        ),
        1.0
    );
    // Out of routing now: the next one is refused by Spillway, not sent.
    let r = post(2).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(h.sim.anthropic_recent_requests().len(), 1);
}
