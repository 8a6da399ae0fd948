//! Driving the real `spillway` binary as a subprocess: its config file,
//! free ports, waiting for health, and reading a batch and the metrics back
//! over HTTP.

use std::net::TcpListener;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A free loopback port (bound and released; the race is acceptable here).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a `spillway serve` config to `path`: listening on
/// `127.0.0.1:{port}` with no client auth plus the `server` keys, in front
/// of the simulator at `sim_url` (regional and global) with the static
/// upstream `token`, then the `extra` TOML (tables of the test's own).
pub fn write_config(
    path: &Path,
    port: u16,
    sim_url: &str,
    project: &str,
    token: &str,
    server: &str,
    extra: &str,
) {
    std::fs::write(
        path,
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
auth = "none"
{server}
[upstream]
project = "{project}"
regional_url = "{sim_url}"
global_url = "{sim_url}"
auth = "static"
token = "{token}"
{extra}"#
        ),
    )
    .unwrap();
}

/// Waits until `GET {url}/healthz` answers 200; fails if the process exits.
pub async fn wait_healthy(http: &reqwest::Client, url: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("spillway exited early: {status}");
        }
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "spillway did not become healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /v1/messages/batches/{id}`.
pub async fn batch(http: &reqwest::Client, url: &str, id: &str) -> Value {
    http.get(format!("{url}/v1/messages/batches/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `GET {url}/metrics`, as text.
pub async fn metrics_text(http: &reqwest::Client, url: &str) -> String {
    let response = http.get(format!("{url}/metrics")).send().await.unwrap();
    response.text().await.unwrap()
}

/// Creates a batch of `items` Claude 3 Haiku requests, `item-0` onwards,
/// each answered with `output_tokens` tokens: its id, or the answer that
/// was not a created batch.
pub async fn create_batch(
    http: &reqwest::Client,
    url: &str,
    items: usize,
    output_tokens: u32,
) -> Result<String, Value> {
    let requests: Vec<Value> = (0..items)
        .map(|i| {
            serde_json::json!({"custom_id": format!("item-{i}"), "params": {
                "model": "claude-3-haiku@20240307", "max_tokens": 16,
                "messages": [{"role": "user",
                              "content": format!("SIM_OUTPUT_TOKENS={output_tokens} {i}")}]}})
        })
        .collect();
    let created: Value = http
        .post(format!("{url}/v1/messages/batches"))
        .json(&serde_json::json!({ "requests": requests }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    match created["id"].as_str() {
        Some(id) => Ok(id.to_string()),
        None => Err(created),
    }
}

/// An ended batch's results (`GET results_url`), one JSON line each.
pub async fn results(http: &reqwest::Client, ended: &Value) -> Vec<Value> {
    let url = ended["results_url"]
        .as_str()
        .expect("an ended batch has results");
    let text = http.get(url).send().await.unwrap().text().await.unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn succeeded(b: &Value) -> u64 {
    b["request_counts"]["succeeded"].as_u64().unwrap()
}

/// Starts `spillway serve --config FILE`, its output appended to `log`,
/// with no `SPILLWAY__` variable of the test's environment leaking in.
pub fn serve(config: &std::path::Path, log: &std::path::Path) -> Child {
    serve_with_env(config, log, &[])
}

/// [`serve`], with `env` set for the process.
pub fn serve_with_env(
    config: &std::path::Path,
    log: &std::path::Path,
    env: &[(&str, &str)],
) -> Child {
    use std::process::{Command, Stdio};
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    // SPILLWAY_BIN runs the same test against another build (an older one,
    // to see a defect the test was written for).
    let binary =
        std::env::var("SPILLWAY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_spillway").into());
    let mut command = Command::new(binary);
    command
        .args(["serve", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("SPILLWAY__")) {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    command.spawn().expect("spillway starts")
}
