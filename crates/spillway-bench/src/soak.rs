//! `spillway-bench soak`: thousands of streams held open through the real
//! gateway for minutes, with clients dropping and reconnecting, and what the
//! gateway process costs before, during and after.
//!
//! Three processes besides this one, so that each has its own open-file
//! limit and none is measured with another's memory: the release
//! `spillway-sim` (the upstream), the release `spillway` (`serve` with a
//! generated config) and a `spillway-bench soak-client` (this binary again,
//! see `soak_client`). A proxied stream holds two descriptors in the gateway
//! (the client's connection and the upstream one) and one in each of the
//! others, so 9,000 streams are ~18,000 of a 20,000 limit in the gateway:
//! every child is started through `sh -c 'ulimit -n <hard>'` so its soft
//! limit is the hard one (no `setrlimit` binding is needed in any binary).
//!
//! The simulator is paced with a standing `Delay` fault (`per_token_ms`
//! between text deltas, `POST /_sim/faults`) and each request asks with
//! `SIM_OUTPUT_TOKENS=` for as many tokens as there are steps to the end of
//! the run, so a stream lasts minutes and all of them end together. Budgets
//! on both sides are far above what the run sends: the soak holds streams,
//! it does not test quota (a refusal would show as an HTTP error).
//!
//! Every `--sample-secs` it reads, for the gateway, `VmRSS` and `VmHWM`
//! (`/proc/PID/status`), the open descriptors (`/proc/PID/fd`), CPU time
//! (`/proc/PID/stat`) and from `GET /metrics` the open-stream gauge
//! (`spillway_open_streams`) and the in-flight reservations
//! (`spillway_budget_reserved`, requests and tokens); RSS and descriptors
//! of the simulator and the client too. Phases: **idle** (after a warm-up
//! of `--warmup` short streams, so a gateway that has served; the cold
//! start before them is sampled and reported beside it), **load** (while
//! streams are open), **after** (the client has exited; sampled for
//! `--settle-secs`, 300 s by default: pooled upstream connections idle 90 s
//! are closed by a reaper that runs every 90 s, and RSS settles in about a
//! minute after that).
//!
//! Then it checks that nothing was lost, counting from idle (the warm-up
//! is not the run's): the gauges are back at their idle values; every
//! stream the simulator started was recorded by the gateway
//! as ended (`spillway_requests_total` with outcome `ok`, `client_gone` or
//! `stream_error`) and counted as a 200 from upstream; completed streams
//! agree across simulator, gateway and client; the client's drops are the
//! gateway's `client_gone`; and the input tokens the gateway recorded are
//! those the simulator served. A mismatch prints `MISMATCH` and makes the
//! command fail after writing its report.
//!
//! The output directory (`--out`, default a new one under the temp dir)
//! keeps the configs, the logs (the gateway's JSON log at `info`),
//! `samples.csv` and `summary.md`, the table printed at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::children::{
    free_port, log_file, mib, open_file_limits, out_dir, proc_figures, spawn, stop, wait_http,
    GatewayToml, Proc, HAIKU, HUGE_TPM, TICKS_PER_SEC,
};

const REGIONS: [&str; 2] = ["us-central1", "europe-west4"];
const UPSTREAM_TOKEN: &str = "soak-upstream-token";

/// `spillway-bench soak` (see the module docs).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Concurrent streams.
    #[arg(short, default_value_t = 9000)]
    pub n: usize,
    /// Seconds all streams are held after the ramp.
    #[arg(long, default_value_t = 300)]
    pub duration_secs: u64,
    /// Streams opened per second while ramping.
    #[arg(long, default_value_t = 300)]
    pub ramp_per_sec: u32,
    /// The simulator's pause between tokens, in ms.
    #[arg(long, default_value_t = 1000)]
    pub pace_ms: u64,
    /// Open streams dropped (and reconnected) at each drop tick, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub drop_percent: f64,
    /// Seconds between drop ticks.
    #[arg(long, default_value_t = 10)]
    pub drop_every_secs: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 5)]
    pub sample_secs: u64,
    /// Seconds sampled after the last stream ended. The upstream pool closes
    /// idle connections 90 s after their last use, but its reaper only runs
    /// every 90 s, so they can stay up to ~180 s; RSS then takes about a
    /// minute more to settle (threads' caches, the windows' last entries).
    #[arg(long, default_value_t = 300)]
    pub settle_secs: u64,
    /// Streams sent before the idle sample, four at a time (each two tokens
    /// long), so that idle is a gateway that has served: its request path's
    /// code paged in and its first-use state (metric series, pooled
    /// buffers, thread caches) built. The cold start before them is
    /// reported too. 0 takes idle cold.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// A short run: 200 streams for 10 s, 5% dropped every 2 s, 1-s samples,
    /// 15-s settle (overrides those flags). Not a measurement; a check that
    /// the soak works.
    #[arg(long)]
    pub smoke: bool,
    /// Directory holding the release `spillway` and `spillway-sim` (default:
    /// this binary's own, i.e. `target/release`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Where configs, logs, `samples.csv` and `summary.md` go.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl Args {
    fn effective(mut self) -> Self {
        if self.smoke {
            self.n = 200;
            self.duration_secs = 10;
            self.ramp_per_sec = 200;
            self.drop_percent = 5.0;
            self.drop_every_secs = 2;
            self.sample_secs = 1;
            self.settle_secs = 15;
        }
        self
    }
}

/// A Prometheus text exposition, as (name, labels, value) lines.
struct Metrics(Vec<(String, String, f64)>);

impl Metrics {
    fn parse(text: &str) -> Self {
        let lines = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let value: f64 = value.parse().ok()?;
                let (name, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                Some((name.to_string(), labels.to_string(), value))
            })
            .collect();
        Metrics(lines)
    }

    /// The sum of `name` over the series carrying every `key="value"` given.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.split(',').any(|p| p == format!("{k}=\"{v}\"")))
            })
            .map(|(_, _, v)| v)
            .sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Load,
    After,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Load => "load",
            Phase::After => "after",
        }
    }
}

/// One sample of everything watched.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: f64,
    phase: Phase,
    gateway: Proc,
    sim: Proc,
    client: Option<Proc>,
    open_streams: f64,
    reserved_requests: f64,
    reserved_tokens: f64,
    /// Streams the client has open (its last progress line).
    client_open: u64,
}

/// The children: stopped with SIGTERM at the end, killed if this process
/// leaves early (`kill_on_drop`).
struct Children {
    sim: Child,
    gateway: Option<Child>,
}

fn sim_toml() -> String {
    let mut s = String::from("window_secs = 60\n");
    for r in REGIONS {
        let _ = write!(
            s,
            "[[regions]]\nname = \"{r}\"\n[[regions.models]]\nid = \"{HAIKU}\"\nrequests_per_min = {}\ntokens_per_min = {HUGE_TPM}\n",
            u32::MAX
        );
    }
    s
}

fn gateway_toml(port: u16, sim: &str) -> String {
    GatewayToml {
        by: "spillway-bench soak",
        port,
        upstream: sim,
        project: "spillway-soak",
        token: UPSTREAM_TOKEN,
        regions: &REGIONS,
        upstream_extra: "",
    }
    .render()
}

/// What the sampler needs to reach.
struct Watch<'a> {
    http: &'a reqwest::Client,
    metrics_url: String,
    gateway_pid: u32,
    sim_pid: u32,
    t0: Instant,
}

impl Watch<'_> {
    async fn metrics(&self) -> anyhow::Result<Metrics> {
        let text = self
            .http
            .get(&self.metrics_url)
            .send()
            .await
            .context("GET /metrics")?
            .error_for_status()?
            .text()
            .await?;
        Ok(Metrics::parse(&text))
    }

    async fn sample(
        &self,
        phase: Phase,
        client_pid: Option<u32>,
        client_open: u64,
    ) -> anyhow::Result<Sample> {
        let m = self.metrics().await?;
        Ok(Sample {
            at: self.t0.elapsed().as_secs_f64(),
            phase,
            gateway: proc_figures(self.gateway_pid)?,
            sim: proc_figures(self.sim_pid)?,
            client: client_pid.and_then(|p| proc_figures(p).ok()),
            open_streams: m.sum("spillway_open_streams", &[]),
            reserved_requests: m.sum("spillway_budget_reserved", &[("resource", "requests")]),
            reserved_tokens: m.sum("spillway_budget_reserved", &[("resource", "tokens")]),
            client_open,
        })
    }
}

fn print_sample(s: &Sample) {
    println!(
        "[{:>6.1}s {:<5}] gateway RSS {:>7.1} MiB, fds {:>5}, open {:>5}, reserved {} req / {} tok | client open {:>5} | sim RSS {:.1} MiB, fds {}",
        s.at,
        s.phase.name(),
        mib(s.gateway.rss_kib),
        s.gateway.fds,
        s.open_streams,
        s.reserved_requests,
        s.reserved_tokens,
        s.client_open,
        mib(s.sim.rss_kib),
        s.sim.fds,
    );
}

fn median(mut v: Vec<u64>) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

/// Runs the soak; `Ok` with the report even if a check failed, which the
/// report's `failed` says (so the table is always written).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let args = args.effective();
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no directory")?
            .to_path_buf(),
    };
    let (spillway, sim_bin) = (bin_dir.join("spillway"), bin_dir.join("spillway-sim"));
    for b in [&spillway, &sim_bin] {
        if !b.is_file() {
            bail!(
                "{} not found: build with `cargo build --release -p spillway -p spillway-sim -p spillway-bench` (or pass --bin-dir)",
                b.display()
            );
        }
    }
    let out = out_dir(args.out.as_deref(), "soak")?;
    println!("soak: output in {}", out.display());

    let http = spillway_gateway::tls::http_client_builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()?;

    // 1. The simulator, paced.
    let sim_port = free_port()?;
    let sim_url = format!("http://127.0.0.1:{sim_port}");
    std::fs::write(out.join("sim.toml"), sim_toml())?;
    let sim_args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{sim_port}"),
        "--config",
        &out.join("sim.toml").to_string_lossy(),
        "--bearer",
        UPSTREAM_TOKEN,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let sim = spawn(
        &sim_bin,
        &sim_args,
        &[("RUST_LOG", "warn")],
        log_file(&out, "sim.out")?,
        log_file(&out, "sim.err")?,
    )?;
    let mut children = Children { sim, gateway: None };
    wait_http(
        &http,
        &format!("{sim_url}/_sim/counters"),
        &mut children.sim,
    )
    .await?;
    for region in REGIONS {
        http.post(format!("{sim_url}/_sim/faults"))
            .json(&json!({"region": region, "kind": {"type": "delay", "first_token_ms": 0, "per_token_ms": args.pace_ms}}))
            .send()
            .await?
            .error_for_status()
            .context("setting the simulator's pace")?;
    }

    // 2. The gateway.
    let gw_port = free_port()?;
    let gw_addr = format!("127.0.0.1:{gw_port}");
    let config = out.join("gateway.toml");
    std::fs::write(&config, gateway_toml(gw_port, &sim_url))?;
    let gateway = spawn(
        &spillway,
        &[
            "serve".into(),
            "--config".into(),
            config.to_string_lossy().into_owned(),
        ],
        &[("RUST_LOG", "info")],
        log_file(&out, "gateway.out")?,
        log_file(&out, "gateway.log")?,
    )?;
    let gateway = children.gateway.insert(gateway);
    wait_http(&http, &format!("http://{gw_addr}/healthz"), gateway).await?;
    let (gateway_pid, sim_pid) = (
        gateway.id().context("gateway pid")?,
        children.sim.id().context("simulator pid")?,
    );
    let watch = Watch {
        http: &http,
        metrics_url: format!("http://{gw_addr}/metrics"),
        gateway_pid,
        sim_pid,
        t0: Instant::now(),
    };

    // 3. Idle: a few seconds after start, cold; then after a warm-up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cold = watch.sample(Phase::Idle, None, 0).await?;
    print!("cold start: ");
    print_sample(&cold);
    if args.warmup > 0 {
        warm_up(&gw_addr, args.warmup).await?;
        // Idle holds no connection: the upstream pool's (idle up to twice
        // its 90-s timeout) must have closed too.
        let waited = Instant::now();
        while proc_figures(gateway_pid)?.fds > cold.gateway.fds
            && waited.elapsed() < Duration::from_secs(args.settle_secs)
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        println!(
            "warm-up: connections closed after {:.0} s",
            waited.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let idle_metrics = watch.metrics().await?;
    let idle_sim = sim_counters(&http, &sim_url).await?;
    let idle = watch.sample(Phase::Idle, None, 0).await?;
    print_sample(&idle);
    let mut samples = vec![idle];

    // 4. The load, from its own process.
    let me = std::env::current_exe()?;
    let client_args: Vec<String> = vec![
        "soak-client".into(),
        "--addr".into(),
        gw_addr.clone(),
        "-n".into(),
        args.n.to_string(),
        "--duration-secs".into(),
        args.duration_secs.to_string(),
        "--ramp-per-sec".into(),
        args.ramp_per_sec.to_string(),
        "--pace-ms".into(),
        args.pace_ms.to_string(),
        "--drop-percent".into(),
        args.drop_percent.to_string(),
        "--drop-every-secs".into(),
        args.drop_every_secs.to_string(),
        "--model".into(),
        HAIKU.into(),
    ];
    let mut client = spawn(
        &me,
        &client_args,
        &[],
        Stdio::piped(),
        log_file(&out, "client.err")?,
    )?;
    let client_pid = client.id().context("client pid")?;
    let limits = [
        ("gateway", open_file_limits(gateway_pid)),
        ("simulator", open_file_limits(sim_pid)),
        ("client", open_file_limits(client_pid)),
    ];
    let mut lines = BufReader::new(client.stdout.take().context("client stdout")?).lines();
    let mut last: Value = json!({});
    let mut final_line: Option<Value> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(args.sample_secs.max(1)));
    tick.tick().await;
    let load_started = watch.t0.elapsed().as_secs_f64();
    loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                Some(l) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&l) {
                        if v["kind"] == "final" {
                            final_line = Some(v.clone());
                        }
                        last = v;
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                let open = last["open"].as_u64().unwrap_or(0);
                // A slow scrape under load is a figure too, not a reason to
                // abandon the run: said, and the sample skipped.
                match watch.sample(Phase::Load, Some(client_pid), open).await {
                    Ok(s) => {
                        print_sample(&s);
                        samples.push(s);
                    }
                    Err(e) => println!("sample skipped: {e:#}"),
                }
            }
        }
    }
    let status = client.wait().await?;
    let load_ended = watch.t0.elapsed().as_secs_f64();
    let Some(client_final) = final_line else {
        bail!("the soak client exited ({status}) without its final line; see client.err");
    };

    // 5. After: the streams are over; memory and descriptors should return.
    let settle_start = Instant::now();
    while settle_start.elapsed() < Duration::from_secs(args.settle_secs) {
        tokio::time::sleep(Duration::from_secs(args.sample_secs.max(1))).await;
        let s = watch.sample(Phase::After, None, 0).await?;
        print_sample(&s);
        samples.push(s);
    }
    let final_metrics = watch.metrics().await?;
    let final_sim = sim_counters(&http, &sim_url).await?;
    if let Some(g) = children.gateway.as_mut() {
        stop(g).await;
    }
    stop(&mut children.sim).await;

    let report = Report {
        args: &args,
        samples: &samples,
        cold,
        idle_metrics: &idle_metrics,
        final_metrics: &final_metrics,
        idle_sim: &idle_sim,
        final_sim: &final_sim,
        client: &client_final,
        limits: &limits,
        load_seconds: load_ended - load_started,
    };
    let (summary, failed) = report.render();
    std::fs::write(out.join("samples.csv"), csv(&samples))?;
    std::fs::write(out.join("summary.md"), &summary)?;
    println!("\n{summary}");
    println!("(written to {})", out.join("summary.md").display());
    if failed {
        bail!("the soak found a mismatch (see MISMATCH above)");
    }
    Ok(())
}

/// `n` streaming requests through the gateway, four at a time, each read to
/// its end, on connections that close after their request.
async fn warm_up(gw_addr: &str, n: usize) -> anyhow::Result<()> {
    let http = spillway_gateway::tls::http_client_builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()?;
    let body = json!({
        "model": HAIKU,
        "max_tokens": 2,
        "stream": true,
        "messages": [{"role": "user", "content": "Soak warm-up. SIM_OUTPUT_TOKENS=2"}],
    });
    let one = |_| async {
        let response = http
            .post(format!("http://{gw_addr}/v1/messages"))
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() || !text.contains("message_stop") {
            bail!("warm-up stream: {status}: {text}");
        }
        anyhow::Ok(())
    };
    use futures::{StreamExt as _, TryStreamExt as _};
    futures::stream::iter(0..n)
        .map(one)
        .buffer_unordered(4)
        .try_collect::<()>()
        .await?;
    println!("warm-up: {n} streams served");
    Ok(())
}

async fn sim_counters(http: &reqwest::Client, sim_url: &str) -> anyhow::Result<Value> {
    Ok(http
        .get(format!("{sim_url}/_sim/counters"))
        .send()
        .await?
        .json()
        .await?)
}

fn csv(samples: &[Sample]) -> String {
    let mut s = String::from(
        "t_s,phase,gw_rss_kib,gw_hwm_kib,gw_fds,gw_cpu_ticks,open_streams,reserved_requests,reserved_tokens,client_open,sim_rss_kib,sim_fds,client_rss_kib,client_fds\n",
    );
    for x in samples {
        let c = x.client.unwrap_or_default();
        let _ = writeln!(
            s,
            "{:.1},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            x.at,
            x.phase.name(),
            x.gateway.rss_kib,
            x.gateway.hwm_kib,
            x.gateway.fds,
            x.gateway.cpu_ticks,
            x.open_streams,
            x.reserved_requests,
            x.reserved_tokens,
            x.client_open,
            x.sim.rss_kib,
            x.sim.fds,
            c.rss_kib,
            c.fds
        );
    }
    s
}

struct Report<'a> {
    args: &'a Args,
    samples: &'a [Sample],
    /// Before the warm-up (`samples[0]`, idle, is after it).
    cold: Sample,
    idle_metrics: &'a Metrics,
    final_metrics: &'a Metrics,
    idle_sim: &'a Value,
    final_sim: &'a Value,
    client: &'a Value,
    limits: &'a [(&'static str, String)],
    load_seconds: f64,
}

/// The simulator's counters summed over regions and models.
fn sim_total(counters: &Value, field: &str) -> u64 {
    counters["regions"]
        .as_object()
        .into_iter()
        .flat_map(|regions| regions.values())
        .filter_map(Value::as_object)
        .flat_map(|models| models.values())
        .filter_map(|c| c[field].as_u64())
        .sum()
}

impl Report<'_> {
    /// The Markdown summary, and whether a check failed.
    fn render(&self) -> (String, bool) {
        let a = self.args;
        let n = a.n as f64;
        let idle = self.samples[0];
        // Full load: samples with (nearly) every stream open; drops in
        // flight keep a few below n.
        let full: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.phase == Phase::Load && s.open_streams >= 0.98 * n)
            .collect();
        let load: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.phase == Phase::Load)
            .collect();
        let after: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.phase == Phase::After)
            .collect();
        let peak = |f: fn(&Sample) -> u64| self.samples.iter().map(f).max().unwrap_or(0);
        let full_rss = median(full.iter().map(|s| s.gateway.rss_kib).collect());
        let full_rss_max = full.iter().map(|s| s.gateway.rss_kib).max().unwrap_or(0);
        let full_fds = median(full.iter().map(|s| s.gateway.fds).collect());
        let peak_rss = peak(|s| s.gateway.rss_kib);
        let peak_fds = peak(|s| s.gateway.fds);
        let hwm = peak(|s| s.gateway.hwm_kib);
        let first_after = after.first().copied().copied().unwrap_or(idle);
        let last_after = after.last().copied().copied().unwrap_or(idle);
        let back_within_20 = after
            .iter()
            .find(|s| s.gateway.rss_kib as f64 <= 1.2 * idle.gateway.rss_kib as f64)
            .map(|s| s.at - load.last().map(|l| l.at).unwrap_or(s.at));
        let per_stream_kib = (full_rss as f64 - idle.gateway.rss_kib as f64) / n;
        let per_stream_fds = (full_fds as f64 - idle.gateway.fds as f64) / n;
        // CPU over the full-load samples (first to last).
        let cpu = match (full.first(), full.last()) {
            (Some(f), Some(l)) if l.at > f.at => {
                (l.gateway.cpu_ticks - f.gateway.cpu_ticks) as f64 / TICKS_PER_SEC / (l.at - f.at)
                    * 100.0
            }
            _ => f64::NAN,
        };
        let client_full = |f: fn(&Proc) -> u64| {
            median(
                full.iter()
                    .filter_map(|s| s.client.as_ref().map(f))
                    .collect(),
            )
        };
        let sim_full = |f: fn(&Proc) -> u64| median(full.iter().map(|s| f(&s.sim)).collect());

        let mut s = String::new();
        let _ = writeln!(
            s,
            "Soak: {} streams × {} s (ramp {}/s, pace {} ms/token, {}% dropped and reconnected every {} s), {}machine: {} cores, {:.1} GiB RAM; load phase {:.0} s, {} samples at full load.",
            a.n,
            a.duration_secs,
            a.ramp_per_sec,
            a.pace_ms,
            a.drop_percent,
            a.drop_every_secs,
            if a.smoke { "smoke run; " } else { "" },
            std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0),
            mem_total_gib(),
            self.load_seconds,
            full.len(),
        );
        let _ = writeln!(
            s,
            "Open-file limits (soft/hard): {}.\n",
            self.limits
                .iter()
                .map(|(p, l)| format!("{p} {l}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            s,
            "| gateway | idle | full load (median) | peak | after +{:.0} s | after +{:.0} s |",
            first_after.at - load.last().map(|l| l.at).unwrap_or(first_after.at),
            last_after.at - load.last().map(|l| l.at).unwrap_or(last_after.at),
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        let _ = writeln!(
            s,
            "| RSS, MiB | {:.1} | {:.1} (max {:.1}) | {:.1} (VmHWM {:.1}) | {:.1} | {:.1} |",
            mib(idle.gateway.rss_kib),
            mib(full_rss),
            mib(full_rss_max),
            mib(peak_rss),
            mib(hwm),
            mib(first_after.gateway.rss_kib),
            mib(last_after.gateway.rss_kib),
        );
        let _ = writeln!(
            s,
            "| open fds | {} | {} | {} | {} | {} |",
            idle.gateway.fds, full_fds, peak_fds, first_after.gateway.fds, last_after.gateway.fds
        );
        let gauge = |f: fn(&Sample) -> f64| {
            let max = self.samples.iter().map(f).fold(0.0, f64::max);
            format!(
                "{} | {} | {} | {} | {}",
                f(&idle),
                median(full.iter().map(|s| f(s) as u64).collect()),
                max,
                f(&first_after),
                f(&last_after)
            )
        };
        let _ = writeln!(
            s,
            "| `spillway_open_streams` | {} |",
            gauge(|x| x.open_streams)
        );
        let _ = writeln!(
            s,
            "| `spillway_budget_reserved` requests | {} |",
            gauge(|x| x.reserved_requests)
        );
        let _ = writeln!(
            s,
            "| `spillway_budget_reserved` tokens | {} |",
            gauge(|x| x.reserved_tokens)
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "Per open stream (full-load median − idle, / {}): **{:.1} KiB** of gateway RSS, **{:.2}** fds. Gateway CPU at full load: {:.0}% of one core. Client at full load: RSS {:.1} MiB, {} fds; simulator: RSS {:.1} MiB, {} fds.",
            a.n,
            per_stream_kib,
            per_stream_fds,
            cpu,
            mib(client_full(|p| p.rss_kib)),
            client_full(|p| p.fds),
            mib(sim_full(|p| p.rss_kib)),
            sim_full(|p| p.fds),
        );
        let rss_ok = full_rss_max <= 400 * 1024;
        let after_ok = last_after.gateway.rss_kib as f64 <= 1.2 * idle.gateway.rss_kib as f64;
        let over = |base: &Sample| {
            (last_after.gateway.rss_kib as f64 / base.gateway.rss_kib as f64 - 1.0) * 100.0
        };
        let _ = writeln!(
            s,
            "RSS at full load ≤ 400 MiB: **{}** (max sample {:.1} MiB). Back within 20% of idle after the run: **{}** ({:.1} MiB vs idle {:.1}, {:+.0}%, limit {:.1}; {}).\n",
            if rss_ok { "met" } else { "missed" },
            mib(full_rss_max),
            if after_ok { "met" } else { "missed" },
            mib(last_after.gateway.rss_kib),
            mib(idle.gateway.rss_kib),
            over(&idle),
            mib(idle.gateway.rss_kib) * 1.2,
            match back_within_20 {
                Some(t) => format!("first within at +{t:.0} s"),
                None => "never within during the settle".into(),
            }
        );
        let _ = writeln!(
            s,
            "Idle is after a warm-up of {} streams. The cold start before them: RSS {:.1} MiB, {} fds; after the run is {:+.0}% over it.\n",
            a.warmup,
            mib(self.cold.gateway.rss_kib),
            self.cold.gateway.fds,
            over(&self.cold),
        );

        // The allocator's own account, idle vs after: live heap (allocated)
        // against what it keeps in RAM (resident) tells a leak from pages
        // kept. Absent (all zero) on builds without jemalloc.
        let heap = |m: &Metrics, kind: &str| {
            m.sum("spillway_allocator_bytes", &[("kind", kind)]) / (1024.0 * 1024.0)
        };
        let kinds = ["allocated", "active", "resident", "metadata", "retained"];
        let _ = writeln!(
            s,
            "Allocator, idle → after the run (MiB): {}.\n",
            kinds
                .iter()
                .map(|k| format!(
                    "{k} {:.1} → {:.1}",
                    heap(self.idle_metrics, k),
                    heap(self.final_metrics, k)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );

        // Streams and settlement.
        let c = |k: &str| self.client[k].as_u64().unwrap_or(0);
        let fm = self.final_metrics;
        let im = self.idle_metrics;
        // Counted since idle: the warm-up's requests are not the run's.
        let since_idle = |name: &str, labels: &[(&str, &str)]| {
            (fm.sum(name, labels) - im.sum(name, labels)) as u64
        };
        let outcome = |o: &str| since_idle("spillway_requests_total", &[("outcome", o)]);
        // `spillway_requests_total` by outcome, counted since idle.
        let by_outcome = |m: &Metrics, sign: i64, into: &mut BTreeMap<String, i64>| {
            for (name, labels, v) in &m.0 {
                if name == "spillway_requests_total" {
                    let o = labels
                        .split(',')
                        .find_map(|p| p.strip_prefix("outcome=\""))
                        .map(|o| o.trim_end_matches('"').to_string())
                        .unwrap_or_default();
                    *into.entry(o).or_default() += sign * *v as i64;
                }
            }
        };
        let mut outcomes = BTreeMap::new();
        by_outcome(fm, 1, &mut outcomes);
        by_outcome(im, -1, &mut outcomes);
        let _ = writeln!(
            s,
            "Client: {} requests, peak {} open, {} completed, {} dropped mid-stream and reconnected, {} HTTP errors, {} stream errors, {} unfinished, {} events read{}.",
            c("requests"),
            c("peak_open"),
            c("completed"),
            c("dropped"),
            c("http_errors"),
            c("stream_errors"),
            c("unfinished"),
            c("events"),
            match self.client["first_error"].as_str() {
                Some(e) => format!(" (first error: {e})"),
                None => String::new(),
            }
        );
        let _ = writeln!(
            s,
            "Gateway `spillway_requests_total` by outcome: {}.\n",
            outcomes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );

        let sim = |field: &str| {
            sim_total(self.final_sim, field).saturating_sub(sim_total(self.idle_sim, field))
        };
        let sim_started = sim("streams_started");
        let sim_completed = sim("streams_completed");
        let sim_input = sim("input_tokens")
            + sim("cache_read_input_tokens")
            + sim("cache_creation_input_tokens");
        let upstream_200 = since_idle("spillway_upstream_requests_total", &[("status", "200")]);
        let gw_ended = outcome("ok") + outcome("client_gone") + outcome("stream_error");
        let gw_input = since_idle("spillway_tokens_total", &[("kind", "actual_input")]);
        let checks: Vec<(String, bool)> = vec![
            (
                format!(
                    "`spillway_open_streams` back to idle: {} → {}",
                    im.sum("spillway_open_streams", &[]),
                    fm.sum("spillway_open_streams", &[])
                ),
                fm.sum("spillway_open_streams", &[]) == im.sum("spillway_open_streams", &[]),
            ),
            (
                format!(
                    "`spillway_budget_reserved` back to idle: requests {} → {}, tokens {} → {}",
                    im.sum("spillway_budget_reserved", &[("resource", "requests")]),
                    fm.sum("spillway_budget_reserved", &[("resource", "requests")]),
                    im.sum("spillway_budget_reserved", &[("resource", "tokens")]),
                    fm.sum("spillway_budget_reserved", &[("resource", "tokens")]),
                ),
                fm.sum("spillway_budget_reserved", &[])
                    == im.sum("spillway_budget_reserved", &[]),
            ),
            (
                format!("streams the simulator started ({sim_started}) = upstream 200s the gateway counted ({upstream_200})"),
                sim_started == upstream_200,
            ),
            (
                format!("streams the simulator started ({sim_started}) = streams the gateway recorded as ended, i.e. settled ({gw_ended})"),
                sim_started == gw_ended,
            ),
            (
                format!(
                    "completed: simulator {sim_completed} = gateway `ok` {} = client {}",
                    outcome("ok"),
                    c("completed")
                ),
                sim_completed == outcome("ok") && outcome("ok") == c("completed"),
            ),
            (
                format!(
                    "client drops ({}) = gateway `client_gone` ({})",
                    c("dropped"),
                    outcome("client_gone")
                ),
                c("dropped") == outcome("client_gone"),
            ),
            (
                format!("input tokens the simulator served ({sim_input}) = `actual_input` the gateway recorded ({gw_input})"),
                sim_input == gw_input,
            ),
            (
                format!(
                    "no client errors ({} HTTP, {} stream, {} unfinished)",
                    c("http_errors"),
                    c("stream_errors"),
                    c("unfinished")
                ),
                c("http_errors") + c("stream_errors") + c("unfinished") == 0,
            ),
        ];
        let mut failed = false;
        let _ = writeln!(s, "Settlement checks:");
        for (text, ok) in &checks {
            failed |= !ok;
            let _ = writeln!(s, "- {} {text}", if *ok { "ok:" } else { "**MISMATCH**:" });
        }
        (s, failed)
    }
}

fn mem_total_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_sums_filter_by_labels() {
        let m = Metrics::parse(
            "# HELP x y\nspillway_open_streams 3\nspillway_budget_reserved{model=\"m\",region=\"a\",resource=\"requests\"} 2\nspillway_budget_reserved{model=\"m\",region=\"b\",resource=\"requests\"} 1\nspillway_budget_reserved{model=\"m\",region=\"a\",resource=\"tokens\"} 700\n",
        );
        assert_eq!(m.sum("spillway_open_streams", &[]), 3.0);
        assert_eq!(
            m.sum("spillway_budget_reserved", &[("resource", "requests")]),
            3.0
        );
        assert_eq!(m.sum("spillway_budget_reserved", &[]), 703.0);
        assert_eq!(m.sum("spillway_budget_reserved", &[("region", "c")]), 0.0);
    }
}
