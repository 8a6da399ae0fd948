//! The benchmark's child processes: starting one with its open-file limit
//! raised, waiting until it answers HTTP, stopping it with SIGTERM before
//! SIGKILL, and reading what it costs from `/proc` (memory, descriptors, CPU
//! time). Shared by `soak` and `cost`, which both measure release binaries
//! running as processes of their own.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::process::{Child, Command};

/// One process's figures at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Proc {
    pub(crate) rss_kib: u64,
    pub(crate) hwm_kib: u64,
    pub(crate) fds: u64,
    /// utime + stime, in clock ticks.
    pub(crate) cpu_ticks: u64,
}

/// Linux's `USER_HZ` (fixed at 100 for userspace since 2.6).
pub(crate) const TICKS_PER_SEC: f64 = 100.0;

pub(crate) fn proc_figures(pid: u32) -> anyhow::Result<Proc> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count() as u64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses:
    // state is field 3, utime 14 and stime 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let cpu_ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Ok(Proc {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        fds,
        cpu_ticks,
    })
}

/// The soft and hard `Max open files` of a process.
pub(crate) fn open_file_limits(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    let v: Vec<&str> = l.split_whitespace().collect();
                    format!("{}/{}", v.get(3).unwrap_or(&"?"), v.get(4).unwrap_or(&"?"))
                })
        })
        .unwrap_or_else(|| "?".into())
}

pub(crate) async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `bin args` with its soft open-file limit raised to the hard one.
pub(crate) fn spawn(
    bin: &Path,
    args: &[String],
    env: &[(&str, &str)],
    stdout: Stdio,
    stderr: Stdio,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$0" "$@""#)
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

pub(crate) fn log_file(out: &Path, name: &str) -> anyhow::Result<Stdio> {
    let f = std::fs::File::create(out.join(name))
        .with_context(|| format!("creating {}", out.join(name).display()))?;
    Ok(Stdio::from(f))
}

pub(crate) async fn wait_http(
    http: &reqwest::Client,
    url: &str,
    child: &mut Child,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{url}: the process exited early ({status}); see its log");
        }
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{url} did not answer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The output folder a benchmark was given, or a new one under the temp
/// dir named for the benchmark and this process; created either way.
pub(crate) fn out_dir(given: Option<&Path>, name: &str) -> anyhow::Result<PathBuf> {
    let out = match given {
        Some(d) => d.to_path_buf(),
        None => std::env::temp_dir().join(format!("spillway-{name}-{}", std::process::id())),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    Ok(out)
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub(crate) const HAIKU: &str = "claude-3-haiku@20240307";
/// Far above anything a benchmark sends: budgets that never refuse.
pub(crate) const HUGE_RPM: u64 = 4_000_000_000;
pub(crate) const HUGE_TPM: u64 = 1_000_000_000_000_000;

/// What differs between the benchmarks' gateway configs.
pub(crate) struct GatewayToml<'a> {
    /// The command that wrote it, named in the file's first line.
    pub(crate) by: &'a str,
    pub(crate) port: u16,
    /// The upstream's base URL (`http://host:port`).
    pub(crate) upstream: &'a str,
    pub(crate) project: &'a str,
    pub(crate) token: &'a str,
    /// Haiku's regions, each with a budget that never refuses.
    pub(crate) regions: &'a [&'a str],
    /// Extra `[upstream]` lines.
    pub(crate) upstream_extra: &'a str,
}

impl GatewayToml<'_> {
    /// The release gateway in front of `upstream`: no client auth, JSON
    /// logs, budgets and queue that never refuse (a refusal would show as
    /// an HTTP error in the benchmark, not as a figure), batches in memory.
    pub(crate) fn render(&self) -> String {
        let regions = self
            .regions
            .iter()
            .map(|r| {
                format!(
                    "{{ name = \"{r}\", requests_per_min = {HUGE_RPM}, tokens_per_min = {HUGE_TPM} }}"
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let GatewayToml {
            by,
            port,
            upstream,
            project,
            token,
            upstream_extra,
            ..
        } = self;
        format!(
            r#"# Generated by {by}: budgets that never refuse.
[server]
listen = "127.0.0.1:{port}"
auth = "none"
log_format = "json"

[upstream]
project = "{project}"
regional_url = "{upstream}"
global_url = "{upstream}"
auth = "static"
token = "{token}"
{upstream_extra}
[quota]
requests_per_min = {HUGE_RPM}
tokens_per_min = {HUGE_TPM}

[scheduler]
max_queue = 1000000

[batch]
sqlite_path = ":memory:"

[models."{HAIKU}"]
regions = [{regions}]
"#
        )
    }
}
