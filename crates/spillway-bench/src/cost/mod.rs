//! `spillway-bench cost`: what one request costs the gateway, measured
//! beside the direct path in the same run.
//!
//! Three processes besides this one's driver: the canned upstream
//! (`spillway-bench canned-upstream`, see [`canned`]), the release
//! `spillway serve` in front of it (a generated config: budgets that never
//! refuse, `auth = "none"`, JSON request logs at `info` unless
//! `--log` says otherwise, written to a file), and the load driver
//! ([`load`]) in this process. Each figure is taken for the direct path
//! (driver → upstream, Vertex's path and body) and for the gateway path
//! (driver → Spillway `/v1/messages` → upstream), alternating, `--rounds`
//! times; the table shows every round and the median.
//!
//! The figures:
//! - **CPU per request**: the gateway's utime + stime from `/proc/PID/stat`
//!   over the measured span, divided by the requests completed in it. CPU
//!   time is what a noisy, shared machine distorts least: another process
//!   slows the gateway's wall clock, not its instruction count. The
//!   upstream's CPU per request is shown too, as the floor one HTTP/1.1 hop
//!   costs; the gateway serves one hop and makes another.
//! - **Added latency at c=1**: p50 and p99 of the time to the full body,
//!   one connection in a closed loop, gateway path minus direct path.
//! - **Closed-loop throughput** at `--conns` (50) for unary and streaming
//!   requests: everything on the same two cores, driver and upstream
//!   included, so it is a ceiling of the whole box, not of the gateway alone.
//!
//! Writes `summary.md`, `cost.toml`, the gateway's log and `figures.json`
//! to `--out`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use serde_json::json;
use tokio::process::Child;

use crate::children::{
    free_port, log_file, out_dir, proc_figures, spawn, stop, wait_http, GatewayToml, HAIKU,
    TICKS_PER_SEC,
};

pub mod bare;
pub mod canned;
pub mod client;
mod load;

use load::{Outcome, Run, Target};

const UPSTREAM_TOKEN: &str = "cost-upstream-token";
const VERTEX_PATH: &str =
    "/v1/projects/spillway-bench/locations/us-central1/publishers/anthropic/models/claude-3-haiku@20240307";

/// `spillway-bench cost` (see the module docs).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Measured seconds per run (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Warm-up seconds per run, not counted.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Connections of the closed-loop throughput runs.
    #[arg(long, default_value_t = 50)]
    pub conns: usize,
    /// Direct and gateway runs alternate this many times per figure.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The gateway's `RUST_LOG`.
    #[arg(long, default_value = "info")]
    pub log: String,
    /// Which figures: any of `latency`, `unary`, `stream`.
    #[arg(long, value_delimiter = ',', default_value = "latency,unary,stream")]
    pub parts: Vec<String>,
    /// Worker threads of the load driver.
    #[arg(long, default_value_t = 1)]
    pub driver_threads: usize,
    /// Pin the gateway to these CPUs (`taskset -c` syntax, e.g. `1`), to
    /// keep it apart from the driver and the upstream: run this command
    /// itself under `taskset -c 0` then. Its tokio runtime sizes itself to
    /// the CPUs it is given.
    #[arg(long)]
    pub gateway_cpus: Option<String>,
    /// The gateway binary (default: `spillway` beside this one).
    #[arg(long)]
    pub spillway: Option<PathBuf>,
    /// Also measure the bare proxy (`spillway-bench bare-proxy`, on the
    /// gateway's CPUs) as a third path in every round: the floor that two
    /// loopback hops cost on this box, with none of the gateway's work.
    #[arg(long)]
    pub floor: bool,
    /// Extra config layered over the generated one (e.g. to try a setting).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the configs, logs and `summary.md` go.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn gateway_toml(port: u16, upstream: SocketAddr) -> String {
    GatewayToml {
        by: "spillway-bench cost",
        port,
        upstream: &format!("http://{upstream}"),
        project: "spillway-bench",
        token: UPSTREAM_TOKEN,
        regions: &["us-central1"],
        upstream_extra: "pool_max_idle_per_host = 4096\n",
    }
    .render()
}

/// One measured run's figures.
#[derive(Debug, Clone)]
struct Figures {
    outcome: Outcome,
    /// CPU µs per request of the proxy in the path, the gateway or the bare
    /// one (None on the direct path).
    proxy_cpu_us: Option<f64>,
    upstream_cpu_us: f64,
}

/// Which path a run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Straight to the canned upstream.
    Direct,
    /// Through the bare proxy ([`bare`]).
    Floor,
    /// Through Spillway.
    Gateway,
}

/// A proxy process in the path: where it listens and its pid.
#[derive(Debug, Clone, Copy)]
struct Proxy {
    addr: SocketAddr,
    pid: u32,
}

/// One round: the direct run, the bare proxy's (with `--floor`) and the
/// gateway's.
struct Round {
    direct: Figures,
    floor: Option<Figures>,
    gateway: Figures,
}

struct Bench {
    args: Args,
    gateway: Proxy,
    floor: Option<Proxy>,
    upstream: SocketAddr,
    upstream_pid: u32,
}

impl Bench {
    fn proxy(&self, via: Via) -> Option<Proxy> {
        match via {
            Via::Direct => None,
            Via::Floor => self.floor,
            Via::Gateway => Some(self.gateway),
        }
    }

    fn target(&self, via: Via, stream: bool) -> Target {
        let stream_field = if stream { r#","stream":true"# } else { "" };
        let messages = r#""messages":[{"role":"user","content":"Hello, Claude"}]"#;
        let must_contain = stream.then_some(&b"message_stop"[..]);
        if let Some(proxy) = self.proxy(via) {
            Target {
                addr: proxy.addr,
                path: "/v1/messages".into(),
                body: Bytes::from(format!(
                    r#"{{"model":"{HAIKU}","max_tokens":64{stream_field},{messages}}}"#
                )),
                authorization: None,
                must_contain,
            }
        } else {
            let op = if stream {
                "streamRawPredict"
            } else {
                "rawPredict"
            };
            Target {
                addr: self.upstream,
                path: format!("{VERTEX_PATH}:{op}"),
                body: Bytes::from(format!(
                    r#"{{"anthropic_version":"vertex-2023-10-16","max_tokens":64{stream_field},{messages}}}"#
                )),
                authorization: Some(format!("Bearer {UPSTREAM_TOKEN}")),
                must_contain,
            }
        }
    }

    async fn run(&self, via: Via, stream: bool, conns: usize) -> anyhow::Result<Figures> {
        let run = Run::start(self.target(via, stream), conns).await?;
        tokio::time::sleep(Duration::from_secs(self.args.warmup_secs)).await;
        let ticks = |pid: u32| proc_figures(pid).map(|p| p.cpu_ticks).unwrap_or(0);
        // On the direct path the gateway's ticks are read but not used.
        let gw = self.proxy(via).unwrap_or(self.gateway).pid;
        let up = self.upstream_pid;
        let (outcome, start, end) = run
            .measure(
                Duration::from_secs(self.args.secs),
                || (ticks(gw), ticks(up)),
                || (ticks(gw), ticks(up)),
            )
            .await?;
        if outcome.errors > 0 {
            bail!(
                "{} of {} requests failed; first: {}",
                outcome.errors,
                outcome.requests + outcome.errors,
                outcome.first_error.as_deref().unwrap_or("?")
            );
        }
        let per_request =
            |ticks: u64| ticks as f64 / TICKS_PER_SEC * 1e6 / outcome.requests.max(1) as f64;
        Ok(Figures {
            proxy_cpu_us: (via != Via::Direct).then(|| per_request(end.0 - start.0)),
            upstream_cpu_us: per_request(end.1 - start.1),
            outcome,
        })
    }

    /// `rounds` rounds of direct, bare-proxy (with `--floor`) and gateway
    /// runs, alternating.
    async fn rounds(&self, stream: bool, conns: usize) -> anyhow::Result<Vec<Round>> {
        let mut rounds = Vec::new();
        for _ in 0..self.args.rounds {
            let direct = self.run(Via::Direct, stream, conns).await?;
            let floor = match self.floor {
                Some(_) => Some(self.run(Via::Floor, stream, conns).await?),
                None => None,
            };
            let gateway = self.run(Via::Gateway, stream, conns).await?;
            rounds.push(Round {
                direct,
                floor,
                gateway,
            });
        }
        Ok(rounds)
    }
}

/// `bin args`, or `taskset -c CPUS bin args` when pinned: the program to
/// spawn and its arguments.
fn pinned(cpus: Option<&str>, bin: &std::path::Path, args: Vec<String>) -> (PathBuf, Vec<String>) {
    match cpus {
        Some(cpus) => {
            let mut taskset = vec![
                "-c".to_string(),
                cpus.to_string(),
                bin.to_string_lossy().into_owned(),
            ];
            taskset.extend(args);
            (PathBuf::from("taskset"), taskset)
        }
        None => (bin.to_path_buf(), args),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

async fn wait_tcp(addr: SocketAddr, child: &mut Child) -> anyhow::Result<()> {
    for _ in 0..200 {
        if let Some(status) = child.try_wait()? {
            bail!("the canned upstream exited early ({status})");
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens at {addr} after 10 s")
}

/// Starts `me canned-upstream` on a free loopback port and waits until it
/// listens: its address and process.
async fn start_canned(me: &std::path::Path, stderr: Stdio) -> anyhow::Result<(SocketAddr, Child)> {
    let upstream: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut child = spawn(
        me,
        &[
            "canned-upstream".into(),
            "--listen".into(),
            upstream.to_string(),
        ],
        &[],
        Stdio::null(),
        stderr,
    )?;
    wait_tcp(upstream, &mut child).await?;
    Ok((upstream, child))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let spillway = match &args.spillway {
        Some(p) => p.clone(),
        None => me.with_file_name("spillway"),
    };
    if !spillway.is_file() {
        bail!(
            "{} not found: build with `cargo build --release -p spillway -p spillway-bench` (or pass --spillway)",
            spillway.display()
        );
    }
    let out = out_dir(args.out.as_deref(), "cost")?;

    let (upstream, mut upstream_child) = start_canned(&me, log_file(&out, "upstream.err")?).await?;

    let port = free_port()?;
    std::fs::write(out.join("cost.toml"), gateway_toml(port, upstream))?;
    let mut gateway_args = vec![
        "serve".to_string(),
        "--config".into(),
        out.join("cost.toml").to_string_lossy().into_owned(),
    ];
    if let Some(extra) = &args.config {
        gateway_args.push("--config".into());
        gateway_args.push(extra.to_string_lossy().into_owned());
    }
    let (gateway_bin, gateway_args) = pinned(args.gateway_cpus.as_deref(), &spillway, gateway_args);
    let mut gateway_child = spawn(
        &gateway_bin,
        &gateway_args,
        &[("RUST_LOG", args.log.as_str())],
        Stdio::null(),
        log_file(&out, "gateway.log")?,
    )?;
    let http = spillway_gateway::tls::http_client_builder()
        .no_proxy()
        .build()?;
    let gateway: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    wait_http(
        &http,
        &format!("http://{gateway}/healthz"),
        &mut gateway_child,
    )
    .await?;
    let mut floor_child = None;
    let floor = if args.floor {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let floor_args = vec![
            "bare-proxy".to_string(),
            "--listen".into(),
            addr.to_string(),
            "--upstream".into(),
            upstream.to_string(),
        ];
        let (bin, floor_args) = pinned(args.gateway_cpus.as_deref(), &me, floor_args);
        let child = floor_child.insert(spawn(
            &bin,
            &floor_args,
            &[],
            Stdio::null(),
            log_file(&out, "bare-proxy.err")?,
        )?);
        wait_http(&http, &format!("http://{addr}/healthz"), child).await?;
        Some(Proxy {
            addr,
            pid: child.id().context("bare proxy pid")?,
        })
    } else {
        None
    };

    let bench = Bench {
        gateway: Proxy {
            addr: gateway,
            pid: gateway_child.id().context("gateway pid")?,
        },
        floor,
        upstream_pid: upstream_child.id().context("upstream pid")?,
        upstream,
        args: args.clone(),
    };
    let result = measure_all(&bench).await;
    stop(&mut gateway_child).await;
    if let Some(child) = &mut floor_child {
        stop(child).await;
    }
    stop(&mut upstream_child).await;
    let (summary, figures) = result?;
    std::fs::write(out.join("summary.md"), &summary)?;
    std::fs::write(
        out.join("figures.json"),
        serde_json::to_string_pretty(&figures)?,
    )?;
    println!("{summary}");
    println!("(written to {})", out.display());
    Ok(())
}

async fn measure_all(bench: &Bench) -> anyhow::Result<(String, serde_json::Value)> {
    let args = &bench.args;
    let mut md = String::new();
    let mut figures = serde_json::Map::new();
    let _ = writeln!(
        md,
        "rounds: {}, {} s each after {} s warm-up; gateway RUST_LOG={}; gateway CPUs: {}\n",
        args.rounds,
        args.secs,
        args.warmup_secs,
        args.log,
        args.gateway_cpus.as_deref().unwrap_or("any")
    );
    let floor = bench.floor.is_some();
    if args.parts.iter().any(|p| p == "latency") {
        for stream in [false, true] {
            let kind = if stream { "streaming" } else { "unary" };
            let rounds = bench.rounds(stream, 1).await?;
            let floor_columns = if floor {
                (
                    "| bare proxy p50 | bare proxy p99 | bare added p50 | bare added p99 ",
                    "---:|---:|---:|---:|",
                )
            } else {
                ("", "")
            };
            let _ = writeln!(
                md,
                "### c=1 closed loop, {kind}: latency to the full body (µs)\n\n| round | direct p50 | direct p99 {}| gateway p50 | gateway p99 | added p50 | added p99 |\n|---|---:|---:|{}---:|---:|---:|---:|",
                floor_columns.0, floor_columns.1
            );
            let (mut add50, mut add99) = (Vec::new(), Vec::new());
            let (mut bare50, mut bare99) = (Vec::new(), Vec::new());
            for (i, round) in rounds.iter().enumerate() {
                let q = |f: &Figures| (f.outcome.quantile_us(0.5), f.outcome.quantile_us(0.99));
                let (d50, d99) = q(&round.direct);
                let (g50, g99) = q(&round.gateway);
                add50.push(g50 - d50);
                add99.push(g99 - d99);
                let mut row = format!("| {} | {d50:.0} | {d99:.0} |", i + 1);
                if let Some(f) = &round.floor {
                    let (f50, f99) = q(f);
                    bare50.push(f50 - d50);
                    bare99.push(f99 - d99);
                    let _ = write!(
                        row,
                        " {f50:.0} | {f99:.0} | {:.0} | {:.0} |",
                        f50 - d50,
                        f99 - d99
                    );
                }
                let _ = writeln!(
                    md,
                    "{row} {g50:.0} | {g99:.0} | {:.0} | {:.0} |",
                    g50 - d50,
                    g99 - d99
                );
            }
            let (m50, m99) = (median(add50), median(add99));
            let bare = if floor {
                let (b50, b99) = (median(bare50), median(bare99));
                figures.insert(
                    format!("bare_proxy_added_latency_{kind}_us"),
                    json!({"p50": b50, "p99": b99}),
                );
                format!(" | | **{b50:.0}** | **{b99:.0}** |")
            } else {
                String::new()
            };
            let _ = writeln!(
                md,
                "| **median** | | |{bare} | | **{m50:.0}** | **{m99:.0}** |\n"
            );
            figures.insert(
                format!("added_latency_{kind}_us"),
                json!({"p50": m50, "p99": m99}),
            );
        }
    }
    for (part, stream) in [("unary", false), ("stream", true)] {
        if !args.parts.iter().any(|p| p == part) {
            continue;
        }
        let kind = if stream { "streaming" } else { "unary" };
        let rounds = bench.rounds(stream, args.conns).await?;
        let floor_columns = if floor {
            ("| bare proxy req/s | bare proxy CPU µs/req ", "---:|---:|")
        } else {
            ("", "")
        };
        let _ = writeln!(
            md,
            "### c={} closed loop, {kind}\n\n| round | direct req/s | upstream CPU µs/req (direct) {}| gateway req/s | **gateway CPU µs/req** | upstream CPU µs/req (via gateway) | gateway p50 / p99 ms |\n|---|---:|---:|{}---:|---:|---:|---:|",
            args.conns, floor_columns.0, floor_columns.1
        );
        let (mut cpu, mut rps, mut direct_rps) = (Vec::new(), Vec::new(), Vec::new());
        let (mut bare_cpu, mut bare_rps) = (Vec::new(), Vec::new());
        for (i, round) in rounds.iter().enumerate() {
            let (d, g) = (&round.direct, &round.gateway);
            let gcpu = g.proxy_cpu_us.unwrap_or(f64::NAN);
            cpu.push(gcpu);
            rps.push(g.outcome.per_sec());
            direct_rps.push(d.outcome.per_sec());
            let mut row = format!(
                "| {} | {:.0} | {:.1} |",
                i + 1,
                d.outcome.per_sec(),
                d.upstream_cpu_us
            );
            if let Some(f) = &round.floor {
                let fcpu = f.proxy_cpu_us.unwrap_or(f64::NAN);
                bare_cpu.push(fcpu);
                bare_rps.push(f.outcome.per_sec());
                let _ = write!(row, " {:.0} | {fcpu:.1} |", f.outcome.per_sec());
            }
            let _ = writeln!(
                md,
                "{row} {:.0} | {gcpu:.1} | {:.1} | {:.2} / {:.2} |",
                g.outcome.per_sec(),
                g.upstream_cpu_us,
                g.outcome.quantile_us(0.5) / 1000.0,
                g.outcome.quantile_us(0.99) / 1000.0,
            );
        }
        let (mcpu, mrps, mdirect) = (median(cpu), median(rps), median(direct_rps));
        let mut entry = json!({"conns": args.conns, "direct_rps": mdirect, "gateway_rps": mrps, "gateway_cpu_us_per_request": mcpu});
        let bare = if floor {
            let (bcpu, brps) = (median(bare_cpu), median(bare_rps));
            entry["bare_proxy_rps"] = json!(brps);
            entry["bare_proxy_cpu_us_per_request"] = json!(bcpu);
            format!(" **{brps:.0}** | **{bcpu:.1}** |")
        } else {
            String::new()
        };
        let _ = writeln!(
            md,
            "| **median** | {mdirect:.0} | |{bare} **{mrps:.0}** | **{mcpu:.1}** | | |\n"
        );
        figures.insert(format!("closed_loop_{kind}"), entry);
    }
    Ok((md, serde_json::Value::Object(figures)))
}
