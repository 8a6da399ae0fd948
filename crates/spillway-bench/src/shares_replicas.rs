//! `spillway-bench shares-replicas`: weighted shares with several replicas
//! on one Redis, in real time.
//!
//! Starts a private `redis-server` on a free loopback port, the simulator
//! (2 regions × `--per-window` requests per 2-s window) and `--replicas`
//! in-process gateways sharing the budgets in Redis, each with tenants
//! `a` and `b` of weights `--weights`. Each tenant offers three times the
//! pool for three windows, its requests spread round-robin over the
//! replicas (as a load balancer would), each willing to wait 1 s. Prints
//! what each tenant was served within the three windows, their ratio, and
//! the simulator's 429s and window check. Traffic goes to 127.0.0.1 only.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::future::join_all;
use serde_json::json;
use spillway_sim::{SimConfig, SimModel, SimRegion, Simulator};

const HAIKU: &str = "claude-3-haiku@20240307";
const TOKEN: &str = "demo-upstream-token";
const WINDOW: Duration = Duration::from_secs(2);
const REGIONS: [&str; 2] = ["us-central1", "europe-west4"];
const KEYS: [&str; 2] = ["sk-spw-bench-a", "sk-spw-bench-b"];

pub struct Options {
    pub replicas: u32,
    pub per_window: u32,
    pub weights: (f64, f64),
}

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis() -> anyhow::Result<(Redis, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("redis-server (apt-get install redis-server)")?;
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((Redis(child), format!("redis://127.0.0.1:{port}")))
}

pub fn run(options: Options) -> anyhow::Result<String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(drive(options))
}

async fn drive(o: Options) -> anyhow::Result<String> {
    let (_redis, redis_url) = redis()?;
    let sim = Simulator::start(
        SimConfig {
            regions: REGIONS
                .iter()
                .map(|r| SimRegion {
                    name: (*r).into(),
                    models: vec![SimModel::new(HAIKU, o.per_window, 10_000_000)],
                })
                .collect(),
            bearer_token: Some(TOKEN.into()),
            window: WINDOW,
            ..SimConfig::vertex_defaults()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let mut urls = Vec::new();
    let mut gateways = Vec::new();
    for _ in 0..o.replicas {
        let overlay = format!(
            "[server]\nauth = \"api_key\"\n[tenants.a]\nkey_sha256 = \"{}\"\nweight = {}\n[tenants.b]\nkey_sha256 = \"{}\"\nweight = {}\n\
             [quota]\nstore = \"redis\"\nredis_url = \"{redis_url}\"\nreplicas = {}\nwindow_secs = 2\nwindow_margin_ms = 60\n\
             [models.\"{HAIKU}\"]\nregions = [{{ name = \"us-central1\", requests_per_min = {pw}, tokens_per_min = 10000000 }}, \
             {{ name = \"europe-west4\", requests_per_min = {pw}, tokens_per_min = 10000000 }}]\n",
            spillway_gateway::auth::hash_key(KEYS[0]),
            o.weights.0,
            spillway_gateway::auth::hash_key(KEYS[1]),
            o.weights.1,
            o.replicas,
            pw = o.per_window,
        );
        let gateway = spillway_bench::gateway::start(&sim.base_url(), &overlay).await?;
        urls.push(format!("{}/v1/messages", gateway.url));
        gateways.push(gateway);
    }
    let http = spillway_gateway::tls::http_client();
    let urls = Arc::new(urls);
    let pool_per_sec = f64::from(2 * o.per_window) / WINDOW.as_secs_f64();
    let rate = 3.0 * pool_per_sec; // per tenant
    let windows = 3u32;
    let per_tenant = (rate * (WINDOW * windows).as_secs_f64()) as u64;
    let start = tokio::time::Instant::now();
    let horizon = start + WINDOW * windows;
    let sends = (0..2usize).flat_map(|k| {
        let (http, urls) = (http.clone(), Arc::clone(&urls));
        (0..per_tenant).map(move |i| {
            let (http, urls) = (http.clone(), Arc::clone(&urls));
            async move {
                let at = Duration::from_secs_f64(i as f64 / rate) + Duration::from_millis(k as u64);
                tokio::time::sleep_until(start + at).await;
                let url = &urls[(i as usize + k) % urls.len()];
                let r = http
                    .post(url)
                    .header("x-api-key", KEYS[k])
                    .header("x-spillway-max-wait-ms", "1000")
                    .json(&json!({"model": HAIKU, "max_tokens": 16,
                        "messages": [{"role": "user", "content": "SIM_OUTPUT_TOKENS=3 hi"}]}))
                    .send()
                    .await;
                let ok = matches!(r.map(|r| r.status().as_u16()), Ok(200));
                (k, ok && tokio::time::Instant::now() <= horizon)
            }
        })
    });
    let outcomes = join_all(sends).await;
    let served: Vec<usize> = (0..2)
        .map(|k| outcomes.iter().filter(|o| o.0 == k && o.1).count())
        .collect();
    let upstream_429: u64 = REGIONS
        .iter()
        .map(|r| sim.counters(r, HAIKU).rate_limited)
        .sum();
    let within = sim.bucket_reports(WINDOW).iter().all(|r| r.within_limits());
    drop(gateways);
    let pool = 2 * o.per_window * windows;
    Ok(format!(
        "replicas {}, weights {:?}, pool {pool} requests over {windows} windows of {:?}: served a {} b {} (ratio {:.2}, {:.0}% of the pool); upstream 429s {upstream_429}; windows within limits: {within}",
        o.replicas,
        o.weights,
        WINDOW,
        served[0],
        served[1],
        served[0] as f64 / served[1].max(1) as f64,
        (served[0] + served[1]) as f64 * 100.0 / f64::from(pool),
    ))
}
