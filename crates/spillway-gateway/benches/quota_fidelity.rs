//! Quota fidelity: does Spillway use the whole quota, and never more?
//!
//! The real gateway router and the Vertex simulator (strict sliding
//! windows) run over loopback in one tokio runtime on a *paused* clock, so
//! many one-minute windows of traffic pass in seconds and every run is the
//! same. Scenarios:
//!
//! 1. Offered load at 3× the aggregate quota (two regions) for 6 windows:
//!    goodput against the quota, upstream 429s (the simulator refuses any
//!    window over quota, so zero 429s means no window went over).
//! 2. The same with token-heavy requests, so tokens bind instead of requests.
//! 3. The simulator's true quota 20% below the configured one: successes
//!    against the true capacity, upstream 429s per upstream request.
//! 4. Recovery: a region learned a lower quota (40 of 60); the quota is
//!    restored; how long until Spillway uses all of it again.
//!
//! Run: `cargo bench -p spillway-gateway --bench quota_fidelity`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};
use spillway_gateway::config::{Settings, DEMO_TOML};
use spillway_gateway::Gateway;
use spillway_sim::{SimConfig, SimHandle, Simulator};
use tokio::time::{sleep, Instant};

const HAIKU: &str = "claude-3-haiku@20240307";
const W: u64 = 60;

struct Stack {
    sim: SimHandle,
    url: String,
    http: reqwest::Client,
}

async fn start(overlay: &str) -> Stack {
    let mut sim_config = SimConfig::vertex_defaults();
    sim_config.bearer_token = Some("demo-upstream-token".into());
    let sim = Simulator::start(sim_config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let env: HashMap<String, String> = [
        ("SPILLWAY__UPSTREAM__REGIONAL_URL", sim.base_url()),
        ("SPILLWAY__UPSTREAM__GLOBAL_URL", sim.base_url()),
        ("SPILLWAY__SERVER__LISTEN", "127.0.0.1:0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let overlay = format!("[server]\nlog_format = \"human\"\n{overlay}");
    let settings = Settings::load_layers(&[DEMO_TOML, &overlay], &[], Some(env)).unwrap();
    let gateway = Gateway::new(settings).await.unwrap();
    let listener = gateway.bind().await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(gateway.serve(listener, std::future::pending()));
    Stack {
        sim,
        url,
        http: spillway_gateway::tls::http_client(),
    }
}

/// Sends `per_minute` requests a minute for `windows` minutes; returns the
/// virtual times (seconds from start) at which requests succeeded.
async fn offer(
    stack: &Stack,
    per_minute: u64,
    windows: u64,
    body: Value,
    max_wait_ms: u64,
) -> (Vec<f64>, usize) {
    let start = Instant::now();
    let total = per_minute * windows;
    let gap = Duration::from_secs(W) / per_minute as u32;
    let body = Arc::new(body);
    let sends = (0..total).map(|i| {
        let body = Arc::clone(&body);
        async move {
            sleep(gap * i as u32).await;
            let r = stack
                .http
                .post(format!("{}/v1/messages", stack.url))
                .header("x-spillway-max-wait-ms", max_wait_ms.to_string())
                .json(&*body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), start.elapsed().as_secs_f64())
        }
    });
    let results = join_all(sends).await;
    let ok: Vec<f64> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, t)| *t)
        .collect();
    let rejected = results.iter().filter(|(s, _)| *s == 429).count();
    (ok, rejected)
}

fn upstream(stack: &Stack, regions: &[&str]) -> (u64, u64) {
    regions.iter().fold((0, 0), |(req, rl), r| {
        let c = stack.sim.counters(r, HAIKU);
        (req + c.requests, rl + c.rate_limited)
    })
}

fn hello() -> Value {
    json!({"model": HAIKU, "max_tokens": 64, "messages": [{"role": "user", "content": "Hello, Claude"}]})
}

async fn full_use(windows: u64) {
    let stack = start("").await;
    let quota_per_min = 120;
    let (ok, rejected) = offer(&stack, 3 * quota_per_min, windows, hello(), 10_000).await;
    let in_period = ok.iter().filter(|t| **t < (windows * W) as f64).count() as u64;
    let (sent, refused) = upstream(&stack, &["us-central1", "europe-west4"]);
    println!(
        "| 3x load, requests bind | {windows} | {} | {in_period} | {:.1}% | {sent} | {refused} | {rejected} |",
        quota_per_min * windows,
        100.0 * in_period as f64 / (quota_per_min * windows) as f64
    );
}

async fn full_use_tokens(windows: u64) {
    let stack = start("").await;
    // ~5,000 tokens each (estimate ≈ simulator's count): 10 per region-minute.
    let body = json!({"model": HAIKU, "max_tokens": 200,
        "messages": [{"role": "user", "content": format!("SIM_OUTPUT_TOKENS=200 {}", "abcdefg ".repeat(2_100))}]});
    let per_request = spillway_sim::count_tokens(&body) + 200;
    let capacity = 2 * 50_000 / per_request * windows;
    let (ok, rejected) = offer(&stack, 3 * capacity / windows, windows, body, 10_000).await;
    let in_period = ok.iter().filter(|t| **t < (windows * W) as f64).count() as u64;
    let (sent, refused) = upstream(&stack, &["us-central1", "europe-west4"]);
    println!(
        "| 3x load, tokens bind ({per_request} tokens/request) | {windows} | {capacity} | {in_period} | {:.1}% | {sent} | {refused} | {rejected} |",
        100.0 * in_period as f64 / capacity as f64
    );
}

async fn lower_true_quota(windows: u64) {
    let stack = start("").await;
    for region in ["us-central1", "europe-west4"] {
        stack.sim.set_quota(region, HAIKU, 48, 50_000);
    }
    let true_per_min = 96;
    let (ok, rejected) = offer(&stack, 3 * 120, windows, hello(), 10_000).await;
    let in_period = ok.iter().filter(|t| **t < (windows * W) as f64).count() as u64;
    let (sent, refused) = upstream(&stack, &["us-central1", "europe-west4"]);
    println!(
        "| true quota 48/min, configured 60/min | {windows} | {} (true) | {in_period} | {:.1}% | {sent} | {refused} ({:.2}%) | {rejected} |",
        true_per_min * windows,
        100.0 * in_period as f64 / (true_per_min * windows) as f64,
        100.0 * refused as f64 / sent.max(1) as f64
    );
}

async fn recovery() {
    let stack =
        start("[models.\"claude-3-haiku@20240307\"]\nregions = [{ name = \"us-central1\" }]\n")
            .await;
    stack.sim.set_quota("us-central1", HAIKU, 40, 50_000);
    // Learn the lower quota over 3 windows of 2× load.
    let _ = offer(&stack, 120, 3, hello(), 0).await;
    stack.sim.set_quota("us-central1", HAIKU, 60, 50_000);
    let restored = Instant::now();
    // Keep offering 2× load; find the first window (sliding, per second) with 60 successes.
    let (ok, _) = offer(&stack, 120, 8, hello(), 0).await;
    let mut recovered_at = None;
    for (i, t) in ok.iter().enumerate() {
        let window_start = t - W as f64;
        let in_window = ok[..=i].iter().filter(|x| **x > window_start).count();
        if in_window >= 60 {
            recovered_at = Some(*t);
            break;
        }
    }
    let _ = restored;
    match recovered_at {
        Some(t) => println!("| recovery 40→60/min | time from restore to a full 60-request window: {t:.0} s ({:.1} windows) |", t / W as f64),
        None => println!("| recovery 40→60/min | not within 8 windows |"),
    }
}

fn main() {
    // cargo bench passes --bench; nothing to parse.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        println!("| scenario | windows | quota (requests) | client successes in period | of quota | upstream requests | upstream 429s | Spillway 429s |");
        println!("|---|---|---|---|---|---|---|---|");
        full_use(6).await;
        full_use_tokens(6).await;
        lower_true_quota(8).await;
        recovery().await;
    });
}
