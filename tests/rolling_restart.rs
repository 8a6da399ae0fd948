//! A rolling restart of three real `spillway` processes under steady
//! traffic, the way an orchestrator upgrades a Deployment: one replica at a
//! time gets SIGTERM, a new process takes its place once the old one has
//! exited, and the next follows when the new one is ready.
//!
//! The replicas share one private `redis-server` (quota ledgers) and one
//! PostgreSQL database (a batch is worked through the whole restart) in
//! front of one strict sliding-window simulator. The client side plays the
//! load balancer: it probes every replica's `/readyz` every 100 ms and sends
//! only to those that answer 200, which is what `server.shutdown_delay_ms`
//! exists for (the listener stays open until the balancer has noticed).
//!
//! What is checked:
//! - **no admitted request is lost**: every answer is a 200 (a stream that
//!   ends in `message_stop`) or Spillway's own 429 refusal, never a transport
//!   error, a 5xx or a stream cut with `event: error`;
//! - **no window over budget**: at the simulator, every window of its length
//!   holds at most the budget per region, and it answered no 429 (it answers
//!   one to anything over its quota); a new process reads the budget the
//!   fleet has spent from Redis rather than starting with a fresh one;
//! - every old process shuts down cleanly (exit status 0, no work cut), and
//!   the batch ends with exactly one succeeded result per item.
//!
//! Counts only: nothing here asserts how long anything took.

#[path = "../crates/spillway-redis/tests/common/mod.rs"]
mod redis_server;
mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis_server::RedisServer;
use serde_json::json;
use spillway_sim::{Fault, FaultKind, SimConfig, SimHandle, SimModel, SimRegion, Simulator};
use support::arrivals::busiest_window;
use support::binary::{batch, create_batch, results, succeeded};
use support::postgres::TempDatabase;
use support::replica::Replica;

const HAIKU: &str = "claude-3-haiku@20240307";
const TOKEN: &str = "rolling-test-upstream-token";
const REGIONS: [&str; 2] = ["us-central1", "europe-west4"];
const REPLICAS: usize = 3;
/// The simulator's window, and the gateways' `quota.window_secs`.
const WINDOW: Duration = Duration::from_secs(10);
/// Requests per region per window, at the simulator and in the budgets.
const BUDGET: usize = 60;
/// Interactive requests per second, over both regions: most of the
/// budget (12 a second), so the batch gets the rest and both run across
/// every restart.
const OFFERED_PER_SEC: u32 = 10;
const BATCH_ITEMS: usize = 40;
/// The balancer's probe period; the replicas' drain delay is several of it.
const PROBE: Duration = Duration::from_millis(100);
const SHUTDOWN_DELAY_MS: u64 = 1_000;
const SHUTDOWN_GRACE_MS: u64 = 8_000;

/// The replicas as the balancer sees them: a URL and whether its last
/// readiness probe passed.
#[derive(Default)]
struct Pool {
    members: RwLock<Vec<(String, bool)>>,
}

impl Pool {
    fn add(&self, url: &str) {
        self.members.write().unwrap().push((url.to_string(), false));
    }

    fn remove(&self, url: &str) {
        self.members.write().unwrap().retain(|(u, _)| u != url);
    }

    fn ready(&self) -> Vec<String> {
        let members = self.members.read().unwrap();
        members
            .iter()
            .filter(|(_, ready)| *ready)
            .map(|(u, _)| u.clone())
            .collect()
    }

    /// Probes every member's `/readyz` until `stop`.
    async fn probe(self: Arc<Self>, stop: Arc<AtomicBool>) {
        let http = spillway_gateway::tls::http_client();
        while !stop.load(Ordering::Relaxed) {
            let urls: Vec<String> = self
                .members
                .read()
                .unwrap()
                .iter()
                .map(|(u, _)| u.clone())
                .collect();
            for url in urls {
                let ready = matches!(
                    http.get(format!("{url}/readyz"))
                        .timeout(PROBE)
                        .send()
                        .await,
                    Ok(r) if r.status() == 200
                );
                for member in self.members.write().unwrap().iter_mut() {
                    if member.0 == url {
                        member.1 = ready;
                    }
                }
            }
            tokio::time::sleep(PROBE).await;
        }
    }
}

#[derive(Default)]
struct Outcomes {
    ok: AtomicU64,
    refused: AtomicU64,
    lost: AtomicU64,
    no_replica_ready: AtomicU64,
}

/// Replica `name`: Redis-shared budgets of `BUDGET` per region, the batch
/// store in PostgreSQL, a drain delay for the balancer.
fn replica(name: &str, dir: &Path, sim_url: &str, redis_url: &str, pg_url: &str) -> Replica {
    let regions = REGIONS
        .map(|r| {
            format!("{{ name = \"{r}\", requests_per_min = {BUDGET}, tokens_per_min = 10000000 }}")
        })
        .join(", ");
    let server = format!(
        "shutdown_delay_ms = {SHUTDOWN_DELAY_MS}\nshutdown_grace_ms = {SHUTDOWN_GRACE_MS}\n"
    );
    let extra = format!(
        r#"[quota]
store = "redis"
redis_url = "{redis_url}"
replicas = {REPLICAS}
window_secs = {window}
[models."{HAIKU}"]
regions = [{regions}]
[batch]
store = "postgres"
postgres_url = "{pg_url}"
postgres_max_connections = 4
concurrency = 4
lease_secs = 3
poll_ms = 100
"#,
        window = WINDOW.as_secs(),
    );
    Replica::start(name, dir, sim_url, "rolling-test", TOKEN, &server, &extra)
}

async fn simulator() -> SimHandle {
    let config = SimConfig {
        regions: REGIONS
            .iter()
            .map(|r| SimRegion {
                name: (*r).into(),
                models: vec![SimModel::new(HAIKU, BUDGET as u32, 10_000_000)],
            })
            .collect(),
        bearer_token: Some(TOKEN.into()),
        window: WINDOW,
        ..SimConfig::vertex_defaults()
    };
    let sim = Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulator starts");
    // Answers take a few hundred milliseconds, so every SIGTERM finds
    // requests and batch items in flight.
    for region in REGIONS {
        sim.inject(Fault::region(
            region,
            FaultKind::Delay {
                first_token: Duration::from_millis(150),
                per_token: Duration::from_millis(25),
            },
        ));
    }
    sim
}

/// One request, alternately unary and streamed, and how it ended.
async fn one_request(http: &reqwest::Client, url: &str, stream: bool, out: &Outcomes) {
    let body = json!({"model": HAIKU, "max_tokens": 16, "stream": stream,
        "messages": [{"role": "user", "content": "SIM_OUTPUT_TOKENS=6 hello"}]});
    let sent = http
        .post(format!("{url}/v1/messages"))
        .header("x-spillway-max-wait-ms", "0")
        .json(&body)
        .send()
        .await;
    let lost = |why: String| {
        eprintln!("lost ({url}, stream {stream}): {why}");
        out.lost.fetch_add(1, Ordering::Relaxed);
    };
    let response = match sent {
        Ok(r) => r,
        Err(e) => return lost(format!("transport: {e}")),
    };
    let status = response.status().as_u16();
    let text = match response.text().await {
        Ok(t) => t,
        Err(e) => return lost(format!("{status}, body cut: {e}")),
    };
    match status {
        429 => {
            out.refused.fetch_add(1, Ordering::Relaxed);
        }
        200 if !stream && text.contains("\"type\":\"message\"") => {
            out.ok.fetch_add(1, Ordering::Relaxed);
        }
        200 if stream && text.contains("event: message_stop") && !text.contains("event: error") => {
            out.ok.fetch_add(1, Ordering::Relaxed);
        }
        _ => lost(format!("{status}: {text}")),
    }
}

/// Open-loop traffic at `OFFERED_PER_SEC`, round robin over the ready
/// replicas, until `stop`.
async fn traffic(pool: Arc<Pool>, stop: Arc<AtomicBool>, out: Arc<Outcomes>) {
    let http = spillway_gateway::tls::http_client();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / OFFERED_PER_SEC);
    let mut tasks = Vec::new();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let ready = pool.ready();
        if ready.is_empty() {
            out.no_replica_ready.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let url = ready[n % ready.len()].clone();
        let (http, out) = (http.clone(), Arc::clone(&out));
        let stream = n % 2 == 1;
        n += 1;
        tasks.push(tokio::spawn(async move {
            one_request(&http, &url, stream, &out).await;
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_traffic_loses_nothing_admitted_and_keeps_every_window_in_budget() {
    TempDatabase::around("spillway_rolling", scenario).await;
}

async fn scenario(pg_url: String) {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let sim = simulator().await;
    let http = spillway_gateway::tls::http_client();
    let pool = Arc::new(Pool::default());
    let start = |name: &str| replica(name, dir.path(), &sim.base_url(), &redis.url(), &pg_url);

    let mut replicas = Vec::new();
    for i in 0..REPLICAS {
        // One after another, so the first creates the batch tables alone.
        let mut r = start(&format!("{i}-v1"));
        r.wait_healthy(&http).await;
        pool.add(&r.url);
        replicas.push(r);
    }
    let stop_probes = Arc::new(AtomicBool::new(false));
    let probes = tokio::spawn(Arc::clone(&pool).probe(Arc::clone(&stop_probes)));
    while pool.ready().len() < REPLICAS {
        tokio::time::sleep(PROBE).await;
    }

    let id = create_batch(&http, &replicas[0].url, BATCH_ITEMS, 4)
        .await
        .unwrap_or_else(|answer| panic!("batch created: {answer}"));

    let stop_traffic = Arc::new(AtomicBool::new(false));
    let out = Arc::new(Outcomes::default());
    let load = tokio::spawn(traffic(
        Arc::clone(&pool),
        Arc::clone(&stop_traffic),
        Arc::clone(&out),
    ));
    tokio::time::sleep(WINDOW / 4).await;

    // The rollout: each old replica drains and exits before its successor
    // starts (maxSurge 0), and the next waits for the successor's readiness.
    let mut retired = Vec::new();
    for i in 0..REPLICAS {
        let mut old = replicas.remove(0);
        old.terminate();
        let grace = Duration::from_millis(SHUTDOWN_GRACE_MS + 5_000);
        let status = old.exited_within(grace).await;
        assert_eq!(
            status.map(|s| s.success()),
            Some(true),
            "replica {} exits cleanly after SIGTERM: {status:?}\n{}",
            old.name,
            old.log_text()
        );
        pool.remove(&old.url);
        let mut new = start(&format!("{i}-v2"));
        new.wait_healthy(&http).await;
        pool.add(&new.url);
        while !pool.ready().contains(&new.url) {
            tokio::time::sleep(PROBE).await;
        }
        replicas.push(new);
        retired.push(old);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    tokio::time::sleep(WINDOW / 4).await;
    stop_traffic.store(true, Ordering::Relaxed);
    load.await.expect("traffic");

    let deadline = Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let bt = batch(&http, &replicas[0].url, &id).await;
        if bt["processing_status"] == "ended" {
            break bt;
        }
        assert!(Instant::now() < deadline, "the batch did not end: {bt}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop_probes.store(true, Ordering::Relaxed);
    probes.await.expect("probes");

    let upstream_429s: u64 = REGIONS
        .iter()
        .map(|r| sim.counters(r, HAIKU).rate_limited)
        .sum();
    let busiest: Vec<usize> = REGIONS
        .iter()
        .map(|r| busiest_window(&sim.arrivals(r, HAIKU), WINDOW))
        .collect();
    let (ok, refused, lost) = (
        out.ok.load(Ordering::Relaxed),
        out.refused.load(Ordering::Relaxed),
        out.lost.load(Ordering::Relaxed),
    );
    println!(
        "rolling restart of {REPLICAS}: {ok} served, {refused} refused by Spillway, {lost} lost, \
         {} ticks with no replica ready; busiest {WINDOW:?} window per region {busiest:?} \
         (B = {BUDGET}); upstream 429s {upstream_429s}; batch {}",
        out.no_replica_ready.load(Ordering::Relaxed),
        ended["request_counts"]
    );
    for old in &retired {
        let log = old.log_text();
        assert!(
            log.contains("shutdown: done") && !log.contains("with work cut"),
            "replica {} drained without cutting work:\n{log}",
            old.name
        );
    }
    assert_eq!(lost, 0, "no admitted request lost");
    assert_eq!(
        out.no_replica_ready.load(Ordering::Relaxed),
        0,
        "a replica was ready at every moment"
    );
    assert!(
        ok >= u64::from(OFFERED_PER_SEC) * 5,
        "traffic was served throughout: {ok}"
    );
    for (region, most) in REGIONS.iter().zip(&busiest) {
        assert!(
            *most <= BUDGET,
            "{region}: {most} arrivals in one {WINDOW:?} window, over B = {BUDGET}"
        );
    }
    assert_eq!(upstream_429s, 0, "no upstream 429 from over-admission");

    assert_eq!(succeeded(&ended), BATCH_ITEMS as u64, "{ended}");
    let ids: Vec<String> = results(&http, &ended)
        .await
        .iter()
        .map(|line| {
            assert_eq!(line["result"]["type"], "succeeded", "{line}");
            line["custom_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), BATCH_ITEMS, "exactly one result per custom_id");
    let expected: HashSet<String> = (0..BATCH_ITEMS).map(|i| format!("item-{i}")).collect();
    assert_eq!(ids.into_iter().collect::<HashSet<_>>(), expected);
}
