//! `mixed-workload`: the gateway and the simulator in this process, on
//! tokio's paused clock (minutes of traffic in seconds), under an
//! interleaved mix of content from three tenants at a multiple of the pool.
//!
//! Set up as `tests/support`'s `Harness` does: the simulator with Vertex's
//! default quotas on a free loopback port, the gateway from the demo config
//! pointed at it, with client auth and three tenants of weight 1. Every
//! request goes to 127.0.0.1 only.
//!
//! What it measures:
//! - per content class (the bench's label, joined by `request-id` to the
//!   gateway's `spillway::request` log line), after the first window: how
//!   far the reserved input was from the actual input (p50, p95);
//! - upstream 429s per region and whether any 60 s window at the simulator
//!   went over budget;
//! - goodput over windows 2..N: actual tokens (and requests) the simulator
//!   admitted, over what the two regions could take in that time; and what
//!   clients were refused (400 "can never fit", 429).

mod capture;
mod report;
mod workload;

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use spillway_sim::{SimConfig, SimHandle, Simulator};
use tokio::time::Instant;
use tracing_subscriber::layer::SubscriberExt;

pub use report::Report;

use capture::RequestLines;
use content::HAIKU;
use spillway_bench::content;
use workload::{Planned, TENANTS};

const UPSTREAM_TOKEN: &str = "demo-upstream-token";
pub const REGIONS: [&str; 2] = ["us-central1", "europe-west4"];
/// Each client request waits this long for quota at most.
const MAX_WAIT_MS: &str = "10000";

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub windows: u32,
    pub overload: f64,
    pub seed: u64,
    /// `quota.count_tokens_above`, to measure exact counts' cost and gain.
    pub count_tokens_above: Option<u64>,
}

/// What one client request got back.
#[derive(Debug, Default)]
pub struct Outcome {
    pub status: u16,
    pub request_id: String,
    /// The error message, for refusals.
    pub error: String,
    /// A unary message, or a stream that reached `message_stop`.
    pub completed: bool,
}

/// Runs the bench on a fresh paused-clock runtime.
pub fn run(options: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(options.windows >= 2, "--windows must be at least 2");
    anyhow::ensure!(
        options.overload.is_finite() && options.overload > 0.0,
        "--overload must be a positive number"
    );
    let lines = RequestLines::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(lines.clone()))
        .context("installing the log capture")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    let wall = std::time::Instant::now();
    let mut report = runtime.block_on(drive(options, lines))?;
    report.wall_seconds = wall.elapsed().as_secs_f64();
    Ok(report)
}

struct Running {
    sim: SimHandle,
    gateway: spillway_bench::gateway::RunningGateway,
}

/// The simulator and the gateway, as `tests/support`'s `Harness` starts them.
async fn start(options: Options) -> anyhow::Result<Running> {
    let mut sim_config = SimConfig::vertex_defaults();
    sim_config.bearer_token = Some(UPSTREAM_TOKEN.into());
    let sim = Simulator::start(sim_config, "127.0.0.1:0".parse()?).await?;
    let mut overlay = String::from("[server]\nauth = \"api_key\"\n");
    if let Some(n) = options.count_tokens_above {
        overlay.push_str(&format!("[quota]\ncount_tokens_above = {n}\n"));
    }
    for t in &TENANTS {
        overlay.push_str(&format!(
            "[tenants.{}]\nkey_sha256 = \"{}\"\nweight = 1\n",
            t.name,
            spillway_gateway::auth::hash_key(t.key)
        ));
    }
    let gateway = spillway_bench::gateway::start(&sim.base_url(), &overlay).await?;
    Ok(Running { sim, gateway })
}

async fn send(client: &reqwest::Client, url: &str, p: &Planned) -> Outcome {
    let sent = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-api-key", TENANTS[p.tenant].key)
        .header("x-spillway-max-wait-ms", MAX_WAIT_MS)
        .body(p.body.clone())
        .send()
        .await;
    let response = match sent {
        Ok(r) => r,
        Err(e) => {
            return Outcome {
                error: e.to_string(),
                ..Outcome::default()
            }
        }
    };
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let mut outcome = Outcome {
        status: response.status().as_u16(),
        request_id: header("request-id"),
        ..Outcome::default()
    };
    if outcome.status != 200 {
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        outcome.error = body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        return outcome;
    }
    if p.stream {
        // Read event by event; done when `message_stop` arrives.
        let mut bytes = response.bytes_stream();
        let mut tail = String::new();
        while let Some(chunk) = bytes.next().await {
            let Ok(chunk) = chunk else { break };
            tail.push_str(&String::from_utf8_lossy(&chunk));
            if tail.contains("event: message_stop") {
                outcome.completed = true;
            }
            if tail.len() > 64 {
                tail.drain(..tail.len() - 64);
            }
        }
    } else {
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        outcome.completed = body["type"] == "message";
    }
    outcome
}

async fn drive(options: Options, lines: RequestLines) -> anyhow::Result<Report> {
    let running = start(options).await?;
    let sim = &running.sim;
    let window = sim.window();
    let limits = sim
        .limits(REGIONS[0], HAIKU)
        .context("Haiku is offered in us-central1")?;
    let tokens_per_min = limits.tokens_per_min.context("a combined token limit")?;
    let pool = tokens_per_min * REGIONS.len() as u64;
    let offered_per_window = (pool as f64 * options.overload) as u64;
    let planned = workload::plan(options.seed, options.windows, window, offered_per_window);

    let client = spillway_gateway::tls::http_client_builder()
        .no_proxy()
        .build()?;
    let url = format!("{}/v1/messages", running.gateway.url);
    let start = Instant::now();
    let outcomes: Vec<Outcome> = futures::future::join_all(planned.iter().map(|p| {
        let (client, url) = (&client, &url);
        async move {
            tokio::time::sleep_until(start + p.at).await;
            send(client, url, p).await
        }
    }))
    .await;
    // Let the last log lines (written as responses finish) land.
    tokio::time::sleep(Duration::from_millis(100)).await;

    Ok(report::build(report::Inputs {
        options,
        window,
        start,
        tokens_per_min,
        requests_per_min: u64::from(limits.requests_per_min),
        sim,
        planned: &planned,
        outcomes: &outcomes,
        lines: &lines.by_request_id(),
    }))
}
