//! `spillway-bench client-cost`: what the upstream HTTP client alone costs
//! per request, reqwest as the gateway configures it beside a hyper-util
//! client, in the same run against the same canned upstream.
//!
//! Why: the gateway's per-request profile puts reqwest's `send` at about a
//! quarter of its instructions, and replacing it means rewriting the provider
//! seam around another response type. This measures what that would buy
//! before anyone pays for it. Everything else a gateway does is left out:
//! the loop here only sends the request Vertex gets (same path, headers and
//! body) and reads the whole answer.
//!
//! The driver runs on one current-thread runtime in this process, so this
//! process's CPU time (utime + stime from `/proc/self/stat`) over a run,
//! divided by the requests it completed, is the client's cost per request
//! plus a loop that is the same for both. The canned upstream is another
//! process. Pin this one to a CPU of its own for stable figures:
//!
//! ```text
//! taskset -c 1 target/release/spillway-bench client-cost
//! ```

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::{median, VERTEX_PATH};
use crate::children::{proc_figures, stop, TICKS_PER_SEC};

/// `spillway-bench client-cost` (see the module docs).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Measured seconds per client per round.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    /// Rounds; the clients alternate within each.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Requests in flight (closed loop).
    #[arg(long, default_value_t = 50)]
    pub conns: usize,
    /// `:streamRawPredict` (the canned event stream) instead of `:rawPredict`.
    #[arg(long)]
    pub stream: bool,
}

/// What the gateway sends Vertex (the canned upstream does not check it).
const BEARER: &str = "Bearer cost-upstream-token";

/// The two clients measured.
#[derive(Clone)]
enum Client {
    /// `spillway_gateway::upstream::upstream_client`, the gateway's own.
    Reqwest(reqwest::Client),
    /// hyper-util's pooled client over a plain `HttpConnector`, configured
    /// like the gateway's (no-delay, the same pool limits).
    Hyper(Box<hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>>),
}

impl Client {
    fn name(&self) -> &'static str {
        match self {
            Client::Reqwest(_) => "reqwest",
            Client::Hyper(_) => "hyper-util",
        }
    }

    async fn call(&self, url: &str, uri: &http::Uri, body: &Bytes, stream: bool) -> bool {
        match self {
            Client::Reqwest(client) => {
                let mut request = client
                    .post(url)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header(http::header::AUTHORIZATION, BEARER)
                    .body(body.clone());
                if stream {
                    request = request.header(http::header::ACCEPT, "text/event-stream");
                }
                match request.send().await {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
            Client::Hyper(client) => {
                let mut request = http::Request::post(uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header(http::header::AUTHORIZATION, BEARER);
                if stream {
                    request = request.header(http::header::ACCEPT, "text/event-stream");
                }
                let Ok(request) = request.body(Full::new(body.clone())) else {
                    return false;
                };
                match client.request(request).await {
                    Ok(r) if r.status().is_success() => r.into_body().collect().await.is_ok(),
                    _ => false,
                }
            }
        }
    }
}

/// One closed-loop run: requests completed and this process's CPU µs per
/// request.
async fn measure(
    client: &Client,
    url: &str,
    body: &Bytes,
    args: &Args,
) -> anyhow::Result<(u64, f64)> {
    let uri: http::Uri = url.parse()?;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // A short warm-up fills the pool, so connects are not counted.
    let warm_until = Instant::now() + Duration::from_millis(500);
    let end = warm_until + Duration::from_secs(args.secs);
    let me = std::process::id();
    let mut before = None;
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let mut loops = Vec::new();
            for _ in 0..args.conns {
                let (client, url, uri, body) =
                    (client.clone(), url.to_string(), uri.clone(), body.clone());
                let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
                let stream = args.stream;
                loops.push(tokio::task::spawn_local(async move {
                    loop {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        let ok = client.call(&url, &uri, &body, stream).await;
                        if now >= warm_until {
                            if ok { &done } else { &failed }.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            tokio::time::sleep_until(warm_until.into()).await;
            before = Some(proc_figures(me)?.cpu_ticks);
            for l in loops {
                l.await?;
            }
            anyhow::Ok(())
        })
        .await?;
    let ticks = proc_figures(me)?.cpu_ticks - before.unwrap_or(0);
    let done = done.load(Ordering::Relaxed);
    let failed = failed.load(Ordering::Relaxed);
    anyhow::ensure!(
        failed == 0,
        "{failed} requests failed with {}",
        client.name()
    );
    Ok((
        done,
        ticks as f64 / TICKS_PER_SEC * 1e6 / done.max(1) as f64,
    ))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(drive(args))
}

async fn drive(args: Args) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let (upstream, mut child) = super::start_canned(&me, Stdio::null()).await?;
    let method = if args.stream {
        "streamRawPredict"
    } else {
        "rawPredict"
    };
    let url = format!("http://{upstream}{VERTEX_PATH}:{method}");
    let body = Bytes::from(serde_json::to_vec(&serde_json::json!({
        "anthropic_version": "vertex-2023-10-16",
        "max_tokens": 64,
        "stream": args.stream,
        "messages": [{"role": "user", "content": "Hello, Claude"}],
    }))?);

    // The shipped defaults, as `spillway serve` with no config has them.
    let settings = spillway_gateway::Settings::load_layers(
        &["[server]\nauth = \"none\"\n"],
        &[],
        Some(Default::default()),
    )?
    .upstream;
    let reqwest = spillway_gateway::upstream::upstream_client(&settings)
        .context("the gateway's upstream client")?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_millis(settings.pool_idle_timeout_ms))
        .pool_max_idle_per_host(settings.pool_max_idle_per_host)
        .build(connector);
    let clients = [Client::Reqwest(reqwest), Client::Hyper(Box::new(hyper))];

    println!(
        "client CPU µs per request, {} in flight, {}, {} s × {} rounds",
        args.conns,
        if args.stream { "streaming" } else { "unary" },
        args.secs,
        args.rounds
    );
    println!("\n| round | client | requests/s | CPU µs/request |\n|---|---|---|---|");
    let mut figures: Vec<Vec<f64>> = vec![Vec::new(); clients.len()];
    for round in 1..=args.rounds {
        for (i, client) in clients.iter().enumerate() {
            let (done, us) = measure(client, &url, &body, &args).await?;
            figures[i].push(us);
            println!(
                "| {round} | {} | {:.0} | {us:.1} |",
                client.name(),
                done as f64 / args.secs as f64
            );
        }
    }
    let medians: Vec<f64> = figures.into_iter().map(median).collect();
    for (client, m) in clients.iter().zip(&medians) {
        println!("| **median** | {} | | **{m:.1}** |", client.name());
    }
    println!(
        "\nhyper-util / reqwest: {:.2} (this process's CPU, loop included)",
        medians[1] / medians[0]
    );
    stop(&mut child).await;
    Ok(())
}
