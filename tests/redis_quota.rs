//! Several replicas, one quota pool: three in-process gateways share one
//! Redis in front of one strict sliding-window simulator, in real time with
//! a compressed window (2 s). The simulator answers 429 to anything over
//! its quota, so "no upstream 429" means no window was ever over quota.

#[path = "../crates/spillway-redis/tests/common/mod.rs"]
mod redis_server;
mod support;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_server::RedisServer;
use serde_json::json;
use spillway_gateway::config::{Settings, DEMO_TOML};
use spillway_gateway::Gateway;
use spillway_sim::{SimConfig, SimHandle, SimModel, SimRegion, Simulator};
use support::tally::Tally;

const HAIKU: &str = "claude-3-haiku@20240307";
const TOKEN: &str = "demo-upstream-token";
const WINDOW: Duration = Duration::from_secs(2);
/// Requests per region per window, at the simulator and in the budgets.
const PER_WINDOW: u32 = 12;
/// Transit allowance added to the window (Spillway stamps admission, the
/// simulator arrival): a loaded 2-core host needs more than a datacenter.
const MARGIN_MS: u64 = 60;
const REGIONS: [&str; 2] = ["us-central1", "europe-west4"];

async fn simulator(per_window: u32) -> SimHandle {
    let config = SimConfig {
        regions: REGIONS
            .iter()
            .map(|r| SimRegion {
                name: (*r).into(),
                models: vec![SimModel::new(HAIKU, per_window, 10_000_000)],
            })
            .collect(),
        bearer_token: Some(TOKEN.into()),
        window: WINDOW,
        ..SimConfig::vertex_defaults()
    };
    Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulator starts")
}

struct Replica {
    url: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn replica(sim: &SimHandle, redis_url: &str, replicas: u32, per_window: u32) -> Replica {
    let overlay = format!(
        "[quota]\nstore = \"redis\"\nredis_url = \"{redis_url}\"\nreplicas = {replicas}\n\
         window_secs = 2\nwindow_margin_ms = {MARGIN_MS}\nredis_timeout_ms = 50\n\
         [scheduler]\nmax_wait_ms = 4000\n\
         [models.\"{HAIKU}\"]\nregions = [{{ name = \"us-central1\", requests_per_min = {per_window}, tokens_per_min = 10000000 }}, \
         {{ name = \"europe-west4\", requests_per_min = {per_window}, tokens_per_min = 10000000 }}]\n"
    );
    let env: HashMap<String, String> = [
        ("SPILLWAY__UPSTREAM__REGIONAL_URL", sim.base_url()),
        ("SPILLWAY__UPSTREAM__GLOBAL_URL", sim.base_url()),
        ("SPILLWAY__SERVER__LISTEN", "127.0.0.1:0".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = Settings::load_layers(&[DEMO_TOML, &overlay], &[], Some(env)).expect("config");
    let gateway = Gateway::new(settings).await.expect("gateway starts");
    let listener = gateway.bind().await.expect("binds");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.serve(listener, async {
        let _ = stopped.await;
    }));
    Replica { url, _stop: stop }
}

/// `clients` loops per replica, each posting until `until`.
async fn load(replicas: &[Replica], clients: usize, until: Instant, tally: Arc<Tally>) {
    let http = spillway_gateway::tls::http_client();
    let body = json!({"model": HAIKU, "max_tokens": 16,
        "messages": [{"role": "user", "content": "SIM_OUTPUT_TOKENS=4 hello"}]});
    let mut tasks = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        for c in 0..clients {
            let (http, body, url, tally) = (
                http.clone(),
                body.clone(),
                format!("{}/v1/messages", r.url),
                Arc::clone(&tally),
            );
            tasks.push(tokio::spawn(async move {
                // Stagger, so replicas do not move in lockstep.
                tokio::time::sleep(Duration::from_millis((i * 7 + c * 3) as u64)).await;
                while Instant::now() < until {
                    let wait = until.saturating_duration_since(Instant::now()).as_millis();
                    let sent = http
                        .post(&url)
                        .header("x-spillway-max-wait-ms", wait.min(4000).to_string())
                        .json(&body)
                        .send()
                        .await;
                    tally.record(sent);
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("client task");
    }
}

fn upstream_429s(sim: &SimHandle) -> u64 {
    REGIONS
        .iter()
        .map(|r| sim.counters(r, HAIKU).rate_limited)
        .sum()
}

async fn metric(replica: &Replica, name: &str) -> Option<f64> {
    let text = spillway_gateway::tls::http_client()
        .get(format!("{}/metrics", replica.url))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    support::series(&text, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_budget_exactly_under_contention() {
    let leased = contention(PER_WINDOW).await;
    println!("{leased} requests admitted under leases");
}

/// A budget roomy enough for leases to form (each at most a quarter of
/// what is left): the replicas admit many requests without asking Redis,
/// and still no window goes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_with_leases_share_a_roomy_budget_exactly() {
    let leased = contention(60).await;
    assert!(leased > 0.0, "leases were used");
}

/// Three replicas, six clients each, four windows; returns how many
/// requests were admitted under leases.
async fn contention(per_window: u32) -> f64 {
    let redis = RedisServer::start();
    let sim = simulator(per_window).await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(replica(&sim, &redis.url(), 3, per_window).await);
    }
    let windows = 4u32;
    let started = Instant::now();
    let tally = Arc::new(Tally::default());
    load(&replicas, 6, started + WINDOW * windows, Arc::clone(&tally)).await;
    let ok = tally.ok.load(Ordering::Relaxed);
    let quota = u64::from(per_window) * REGIONS.len() as u64 * u64::from(windows);
    let goodput = ok as f64 / quota as f64;
    println!(
        "3 replicas, {windows} windows of {WINDOW:?}: {ok} served (aggregate quota {quota}, goodput {:.1}%), {} refused by Spillway, {} upstream 429s",
        goodput * 100.0,
        tally.refused.load(Ordering::Relaxed),
        upstream_429s(&sim)
    );
    for r in &replicas {
        println!(
            "failovers: {:?}, leases: {:?}, admitted under them: {:?}",
            metric(r, "spillway_quota_store_failovers_total").await,
            metric(r, "spillway_quota_store_leases_total").await,
            metric(r, "spillway_quota_store_lease_admissions_total").await,
        );
    }
    assert_eq!(
        upstream_429s(&sim),
        0,
        "no window over quota at the simulator"
    );
    assert_eq!(
        tally.other.load(Ordering::Relaxed),
        0,
        "every request answered 200 or 429"
    );
    assert!(goodput >= 0.95, "goodput {goodput:.3}");
    let mut leased = 0.0;
    for r in &replicas {
        assert_eq!(metric(r, "spillway_quota_store_degraded").await, Some(0.0));
        leased += metric(r, "spillway_quota_store_lease_admissions_total")
            .await
            .unwrap_or(0.0);
    }
    leased
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_survive_redis_dying_and_resynchronise_when_it_returns() {
    let mut redis = RedisServer::start();
    let sim = simulator(PER_WINDOW).await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        // N from live heartbeats.
        replicas.push(replica(&sim, &redis.url(), 0, PER_WINDOW).await);
    }
    // Heartbeats converge on N = 3 within one period.
    let converge = Instant::now();
    loop {
        let mut all = true;
        for r in &replicas {
            all &= metric(r, "spillway_quota_store_replicas").await == Some(3.0);
        }
        if all {
            break;
        }
        assert!(
            converge.elapsed() < Duration::from_secs(5),
            "replicas counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let started = Instant::now();
    let end = started + Duration::from_secs(9);
    let tally = Arc::new(Tally::default());
    let load = tokio::spawn(load_owned(replicas, end, Arc::clone(&tally)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = upstream_429s(&sim);
    redis.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = upstream_429s(&sim) - before;
    redis.restart();
    let restarted = Instant::now();
    let replicas = load.await.expect("load");
    let recovered_after = restarted.elapsed();
    let mut degraded = Vec::new();
    for r in &replicas {
        degraded.push(metric(r, "spillway_quota_store_degraded").await);
        assert!(
            metric(r, "spillway_quota_store_failovers_total").await >= Some(1.0),
            "the outage was seen"
        );
    }
    let ok = tally.ok.load(Ordering::Relaxed);
    println!(
        "outage: {ok} served, {} refused by Spillway, {} lost; upstream 429s: {before} before, {during} during the 3 s outage, {} after; load ended {recovered_after:?} after restart",
        tally.refused.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
        upstream_429s(&sim) - before - during,
    );
    assert_eq!(tally.other.load(Ordering::Relaxed), 0, "no request lost");
    assert_eq!(degraded, vec![Some(0.0); 3], "all back on Redis");
    assert!(ok > 0);

    // The documented worst case (DEPLOYMENT.md), checked on what reached
    // "Vertex": any window holds at most 2B (B from Redis before the
    // failover plus N local shares of B/N after it); a window wholly inside
    // the outage, once the last pre-outage sends have landed, at most B; a
    // window wholly after recovery at most B again.
    let b = PER_WINDOW as usize;
    let settle = Duration::from_millis(200);
    for region in REGIONS {
        let arrivals: Vec<Instant> = sim
            .arrivals(region, HAIKU)
            .into_iter()
            .map(|t| t.into_std())
            .collect();
        let any = busiest_window(&arrivals, None);
        let inside = busiest_window(&arrivals, Some((killed + settle, restarted)));
        let after = busiest_window(
            &arrivals,
            Some((restarted + Duration::from_millis(500), end)),
        );
        println!("{region}: busiest window {any}, inside the outage {inside}, after recovery {after} (B = {b})");
        assert!(any <= 2 * b, "{region}: {any} in one window, over 2B");
        assert!(
            inside <= b,
            "{region}: {inside} in a window inside the outage, over B"
        );
        assert!(
            after <= b,
            "{region}: {after} in a window after recovery, over B"
        );
    }
}

/// The most arrivals in one window of length `WINDOW`, among windows lying
/// wholly within `within` if given. A count only changes as a window's edge
/// crosses an arrival, so starts at arrivals (and, when bounded, at the two
/// extreme starts allowed) cover every window.
fn busiest_window(arrivals: &[Instant], within: Option<(Instant, Instant)>) -> usize {
    let count = |start: Instant| {
        arrivals
            .iter()
            .filter(|&&t| t >= start && t < start + WINDOW)
            .count()
    };
    match within {
        None => arrivals.iter().map(|&t| count(t)).max().unwrap_or(0),
        Some((from, to)) => {
            let Some(last) = to.checked_sub(WINDOW).filter(|&last| last >= from) else {
                return 0;
            };
            arrivals
                .iter()
                .copied()
                .filter(|&t| t >= from && t <= last)
                .chain([from, last])
                .map(count)
                .max()
                .unwrap_or(0)
        }
    }
}

async fn load_owned(replicas: Vec<Replica>, until: Instant, tally: Arc<Tally>) -> Vec<Replica> {
    load(&replicas, 4, until, tally).await;
    replicas
}

/// How long after Redis returns until every replica is back on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_redis_returns_is_quick() {
    let mut redis = RedisServer::start();
    let sim = simulator(PER_WINDOW).await;
    let replicas = [
        replica(&sim, &redis.url(), 3, PER_WINDOW).await,
        replica(&sim, &redis.url(), 3, PER_WINDOW).await,
    ];
    redis.kill();
    // Any call notices; with no traffic the heartbeat does (≤ 2 s).
    let http = spillway_gateway::tls::http_client();
    for r in &replicas {
        let status = http
            .post(format!("{}/v1/messages", r.url))
            .json(&json!({"model": HAIKU, "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "served from the local share");
        assert_eq!(metric(r, "spillway_quota_store_degraded").await, Some(1.0));
    }
    redis.restart();
    let restarted = Instant::now();
    for r in &replicas {
        while metric(r, "spillway_quota_store_degraded").await != Some(0.0) {
            assert!(restarted.elapsed() < Duration::from_secs(5), "recovers");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    println!(
        "recovered on every replica {:?} after Redis returned",
        restarted.elapsed()
    );
    assert!(restarted.elapsed() < Duration::from_secs(2));
}
