//! `spillway-bench`: benchmark helpers that the load generator cannot do.
//!
//! ```text
//! spillway-bench open-streams --url http://127.0.0.1:PORT/v1/messages --pid PID [-n 1000] [--rounds 3]
//! spillway-bench mixed-workload [--windows 6] [--overload 3] [--seed 1] [--json]
//! spillway-bench shares-replicas [--replicas 3] [--per-window 12] [--weight 3]
//! spillway-bench soak [-n 9000] [--duration-secs 300] [--smoke]
//! spillway-bench cost [--secs 10] [--conns 50] [--rounds 3] [--log info]
//! ```
//!
//! `open-streams` opens N concurrent streaming Messages requests, each on its
//! own HTTP/1.1 connection, waits until every one has received its first
//! bytes (the `message_start` event), then reads `VmRSS` and `VmHWM` of the
//! process PID (the gateway) from `/proc/PID/status`, prints them, and
//! closes every stream. The upstream must keep the streams open long enough
//! (the script sets a simulator Delay fault and asks for many tokens).
//! Traffic goes only to the URL given; use a loopback address.
//!
//! `mixed-workload` runs the simulator and the gateway in this process on
//! tokio's paused clock and drives an interleaved mix of content (English,
//! CJK, code, JSON tool use, chat turns, long documents) from three tenants
//! at a multiple of the Haiku pool; it reports how well each kind of
//! content is charged, upstream 429s and goodput (see `mixed`).
//!
//! `soak` holds thousands of streams through the release `spillway` binary
//! for minutes, with the simulator and the clients (`soak-client`, this
//! binary again) in processes of their own, and reports the gateway's
//! memory, descriptors and gauges before, during and after (see `soak`).
//!
//! `cost` measures what one request costs the release gateway (CPU per
//! request, added latency, closed-loop throughput) beside the direct path,
//! against a canned upstream (`canned-upstream`, see `cost`).

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use children::mib;

mod children;
mod cost;
mod mixed;
mod shares_replicas;
mod soak;
mod soak_client;

#[derive(Parser)]
#[command(name = "spillway-bench", about = "Spillway benchmark helpers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hold N concurrent streams open and report the gateway's memory.
    OpenStreams {
        /// The gateway's streaming endpoint (POST, JSON body).
        #[arg(long)]
        url: String,
        /// Process whose /proc/PID/status is read (the gateway).
        #[arg(long)]
        pid: u32,
        /// Number of concurrent streams.
        #[arg(short, default_value_t = 1000)]
        n: usize,
        /// Request body.
        #[arg(
            long,
            default_value = r#"{"model":"claude-3-haiku@20240307","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Hello, Claude SIM_OUTPUT_TOKENS=60"}]}"#
        )]
        body: String,
        /// Seconds to wait for every stream's first event before giving up.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
        /// Seconds to keep the streams open after measuring (sampling RSS each second).
        #[arg(long, default_value_t = 0)]
        hold_secs: u64,
        /// Open, measure and close the N streams this many times (steady state:
        /// memory freed by one round may not go back to the OS).
        #[arg(long, default_value_t = 1)]
        rounds: u32,
    },
    /// In-process gateway + simulator on the paused clock, under a mixed
    /// workload from three tenants; reports charges, 429s and goodput.
    MixedWorkload {
        /// Quota windows (60 s of virtual time each) to drive.
        #[arg(long, default_value_t = 6)]
        windows: u32,
        /// Offered load, in actual tokens per minute, as a multiple of both
        /// Haiku regions' token pool.
        #[arg(long, default_value_t = 3.0)]
        overload: f64,
        /// Seed of the content and arrival times.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Set `quota.count_tokens_above` (exact counts for big requests).
        #[arg(long)]
        count_tokens_above: Option<u64>,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Weighted shares with several replicas on one Redis (real time).
    SharesReplicas {
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// Requests per region per 2-s window.
        #[arg(long, default_value_t = 12)]
        per_window: u32,
        /// Tenant a's weight (tenant b's is 1).
        #[arg(long, default_value_t = 3.0)]
        weight: f64,
    },
    /// Thousands of streams held through the release gateway for minutes,
    /// clients dropping and reconnecting; memory, fds and gauges sampled.
    Soak(soak::Args),
    /// The soak's client process (started by `soak`).
    #[command(hide = true)]
    SoakClient(soak_client::Args),
    /// Gateway CPU per request, added latency and closed-loop throughput,
    /// each beside the direct path, against the canned upstream.
    Cost(cost::Args),
    /// The cheapest Vertex that answers like one (started by `cost`).
    CannedUpstream(cost::canned::Args),
    /// The least an HTTP/1.1 proxy can do per request: the floor `cost
    /// --floor` measures the gateway against (started by `cost`).
    BareProxy(cost::bare::Args),
    /// The upstream HTTP client's own CPU per request: the gateway's reqwest
    /// client beside a hyper-util one, against the canned upstream.
    ClientCost(cost::client::Args),
}

fn report(label: &str, pid: u32) -> anyhow::Result<()> {
    let children::Proc {
        rss_kib: rss,
        hwm_kib: hwm,
        ..
    } = children::proc_figures(pid)?;
    println!(
        "{label}: VmRSS {rss} KiB ({:.1} MiB), VmHWM {hwm} KiB ({:.1} MiB)",
        mib(rss),
        mib(hwm)
    );
    Ok(())
}

async fn open_streams(
    url: String,
    pid: u32,
    n: usize,
    body: String,
    timeout: Duration,
    hold: Duration,
    round: u32,
) -> anyhow::Result<()> {
    println!("round {round}");
    // One client, no idle reuse needed: with every connection busy on its
    // stream, reqwest opens a new HTTP/1.1 connection per request.
    let client = spillway_gateway::tls::http_client_builder()
        .http1_only()
        .pool_max_idle_per_host(0)
        .tcp_nodelay(true)
        .no_proxy()
        .build()?;
    let (first_tx, mut first_rx) = mpsc::channel::<Result<(), String>>(n);
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let client = client.clone();
        let url = url.clone();
        let body = body.clone();
        let first_tx = first_tx.clone();
        let mut stop_rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let sent = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let response = match sent {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => {
                    let _ = first_tx.send(Err(format!("HTTP {}", r.status()))).await;
                    return;
                }
                Err(e) => {
                    let _ = first_tx.send(Err(e.to_string())).await;
                    return;
                }
            };
            let mut bytes = response.bytes_stream();
            match bytes.next().await {
                Some(Ok(_)) => {
                    let _ = first_tx.send(Ok(())).await;
                }
                Some(Err(e)) => {
                    let _ = first_tx.send(Err(e.to_string())).await;
                    return;
                }
                None => {
                    let _ = first_tx.send(Err("empty body".into())).await;
                    return;
                }
            }
            // Keep reading (as a real client would) until told to stop.
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => return,
                    chunk = bytes.next() => if chunk.is_none() { return },
                }
            }
        }));
    }
    drop(first_tx);
    let mut ok = 0usize;
    let mut errors = Vec::new();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    while ok + errors.len() < n {
        tokio::select! {
            got = first_rx.recv() => match got {
                Some(Ok(())) => ok += 1,
                Some(Err(e)) => errors.push(e),
                None => break,
            },
            _ = &mut deadline => break,
        }
    }
    println!(
        "streams with first event: {ok}/{n} after {:.2} s; errors: {}",
        started.elapsed().as_secs_f64(),
        errors.len()
    );
    if let Some(e) = errors.first() {
        println!("first error: {e}");
    }
    report(&format!("{ok} open streams"), pid)?;
    for s in 1..=hold.as_secs() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        report(&format!("{ok} open streams, +{s}s"), pid)?;
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    drop(client);
    tokio::time::sleep(Duration::from_secs(2)).await;
    report("2 s after closing", pid)?;
    if ok < n {
        bail!("only {ok} of {n} streams opened");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::OpenStreams {
            url,
            pid,
            n,
            body,
            timeout_secs,
            hold_secs,
            rounds,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            report("idle", pid)?;
            for round in 1..=rounds {
                runtime.block_on(open_streams(
                    url.clone(),
                    pid,
                    n,
                    body.clone(),
                    Duration::from_secs(timeout_secs),
                    Duration::from_secs(hold_secs),
                    round,
                ))?;
            }
            Ok(())
        }
        Command::MixedWorkload {
            windows,
            overload,
            seed,
            count_tokens_above,
            json,
        } => {
            let report = mixed::run(mixed::Options {
                windows,
                overload,
                seed,
                count_tokens_above,
            })?;
            println!("{report}");
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            Ok(())
        }
        Command::SharesReplicas {
            replicas,
            per_window,
            weight,
        } => {
            let line = shares_replicas::run(shares_replicas::Options {
                replicas,
                per_window,
                weights: (weight, 1.0),
            })?;
            println!("{line}");
            Ok(())
        }
        // One thread each: the parent only samples, and the client's 9,000
        // sockets are cheap to drive from one core (the other is the gateway's).
        Command::Soak(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(soak::run(args)),
        Command::SoakClient(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(soak_client::run(args.into())),
        Command::Cost(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.driver_threads.max(1))
            .enable_all()
            .build()?
            .block_on(cost::run(args)),
        Command::CannedUpstream(args) => cost::canned::run(args),
        Command::BareProxy(args) => cost::bare::run(args),
        Command::ClientCost(args) => cost::client::run(args),
    }
}
