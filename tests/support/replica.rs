//! One `spillway serve` process of a fleet: the tests that run several
//! replicas (Redis failover, rolling restarts) start, probe, stop and read
//! them through this, and a failed assertion still SIGKILLs them (`Drop`).

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// A replica, killed when dropped.
pub struct Replica {
    pub name: String,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub log: PathBuf,
    pub child: Child,
}

impl Replica {
    /// Writes `spillway-{name}.toml` in `dir` (listening on a free port, in
    /// front of the simulator at `sim_url`; see [`super::binary::write_config`])
    /// and starts the binary on it, its output in `spillway-{name}.log`.
    pub fn start(
        name: &str,
        dir: &Path,
        sim_url: &str,
        project: &str,
        token: &str,
        server: &str,
        extra: &str,
    ) -> Self {
        let port = super::binary::free_port();
        let config = dir.join(format!("spillway-{name}.toml"));
        super::binary::write_config(&config, port, sim_url, project, token, server, extra);
        let log = dir.join(format!("spillway-{name}.log"));
        let child = super::binary::serve(&config, &log);
        Self {
            name: name.to_string(),
            url: format!("http://127.0.0.1:{port}"),
            log,
            child,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/healthz` answers 200; fails, with the log, if the
    /// process exits or takes over 30 s.
    pub async fn wait_healthy(&mut self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "replica {} exited early: {status}\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if let Ok(r) = http.get(format!("{}/healthz", self.url)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "replica {} did not become healthy\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether `/readyz` answers 200 now.
    pub async fn ready(&self, http: &reqwest::Client) -> bool {
        matches!(
            http.get(format!("{}/readyz", self.url)).send().await,
            Ok(r) if r.status() == 200
        )
    }

    /// The value of the unlabelled series `name` on `/metrics`.
    pub async fn metric(&self, http: &reqwest::Client, name: &str) -> Option<f64> {
        let text = http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        super::series(&text, name)
    }

    /// The sum of every series of `name`, whatever its labels.
    pub async fn metric_sum(&self, http: &reqwest::Client, name: &str) -> f64 {
        super::binary::metrics_text(http, &self.url)
            .await
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sends SIGTERM, as an orchestrator does to start a graceful shutdown.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGTERM to replica {}", self.name);
    }

    /// Waits for the process to exit on its own, for at most `limit`.
    pub async fn exited_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}
