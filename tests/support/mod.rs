//! A real gateway over loopback in front of an in-process simulator.
//!
//! Each test gets its own simulator and gateway on free ports, so tests run
//! in parallel without sharing quota or faults.

#![allow(dead_code)]

pub mod arrivals;
pub mod binary;
pub mod certs;
pub mod postgres;
pub mod replica;
pub mod tally;

use std::collections::HashMap;

use serde_json::{json, Value};
use spillway_gateway::config::{Settings, DEMO_TOML};
use spillway_gateway::Gateway;
use spillway_sim::{SimConfig, SimHandle, Simulator};

pub const UPSTREAM_TOKEN: &str = "demo-upstream-token";
pub const HAIKU: &str = "claude-3-haiku@20240307";
pub const SONNET: &str = "claude-3-sonnet@20240229";

pub struct Harness {
    pub sim: SimHandle,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Harness {
    /// Gateway with the demo config (no client auth) plus `overlay` TOML.
    pub async fn start(overlay: &str) -> Self {
        Self::start_with(overlay, SimConfig::vertex_defaults()).await
    }

    pub async fn start_with(overlay: &str, sim_config: SimConfig) -> Self {
        Self::start_custom(sim_config, |_| overlay.to_string()).await
    }

    /// Like [`Harness::start_with`], with an overlay that may depend on the
    /// simulator's URL.
    pub async fn start_custom(sim_config: SimConfig, overlay: impl FnOnce(&str) -> String) -> Self {
        Self::start_hooked(sim_config, overlay, |_| {}).await
    }

    /// Like [`Harness::start_custom`], with `hook` run on the gateway before
    /// it serves (to set its spend clock, say).
    pub async fn start_hooked(
        mut sim_config: SimConfig,
        overlay: impl FnOnce(&str) -> String,
        hook: impl FnOnce(&Gateway),
    ) -> Self {
        sim_config.bearer_token = Some(UPSTREAM_TOKEN.into());
        let sim = Simulator::start(sim_config, "127.0.0.1:0".parse().unwrap())
            .await
            .expect("simulator starts");
        let overlay = overlay(&sim.base_url());
        let overlay = overlay.as_str();
        let env: HashMap<String, String> = [
            ("SPILLWAY__UPSTREAM__REGIONAL_URL", sim.base_url()),
            ("SPILLWAY__UPSTREAM__GLOBAL_URL", sim.base_url()),
            ("SPILLWAY__SERVER__LISTEN", "127.0.0.1:0".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let settings =
            Settings::load_layers(&[DEMO_TOML, overlay], &[], Some(env)).expect("valid config");
        let gateway = Gateway::new(settings).await.expect("gateway starts");
        hook(&gateway);
        let listener = gateway.bind().await.expect("binds");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(gateway.serve(listener, async {
            let _ = stopped.await;
        }));
        Self {
            sim,
            url,
            http: spillway_gateway::tls::http_client(),
            stop: Some(stop),
        }
    }

    /// Signals the gateway to shut down (as SIGTERM would).
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub fn vertex_url(&self, model: &str, action: &str) -> String {
        format!(
            "{}/v1/projects/client-project/locations/us-east5/publishers/anthropic/models/{model}:{action}",
            self.url
        )
    }

    /// Posts with `x-spillway-max-wait-ms: 0`: no waiting for quota.
    pub async fn post_fail_fast(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .header("x-spillway-max-wait-ms", "0")
            .json(body)
            .send()
            .await
            .expect("gateway answers")
    }

    /// `GET /metrics`, as text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("gateway answers")
            .text()
            .await
            .expect("metrics are text")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .expect("gateway answers")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The value of the series named exactly `series` (name and labels, labels
/// in Prometheus's order), or panics naming it.
pub fn series_value(metrics: &str, series: &str) -> f64 {
    self::series(metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

/// The value of `series` (a name, with its labels if it has any) in a
/// `/metrics` text, if it is there.
pub fn series(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// Runs `spillway status --once` against `url` with the admin `key`.
pub async fn status_once(url: &str, key: &str) -> std::process::Output {
    let args = ["status", "--once", "--url", url, "--admin-key", key].map(String::from);
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

pub fn hello(model: &str) -> Value {
    json!({
        "model": model,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hello, Claude"}]
    })
}

/// Asserts an Anthropic-shaped error and returns its message.
pub async fn expect_error(response: reqwest::Response, status: u16, kind: &str) -> String {
    assert_eq!(response.status().as_u16(), status, "status");
    assert!(response.headers().contains_key("request-id"));
    let body: Value = response.json().await.expect("error body is JSON");
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    body["error"]["message"]
        .as_str()
        .expect("message")
        .to_string()
}

/// Reads a whole SSE body into (event name, data JSON) pairs.
pub async fn read_events(response: reqwest::Response) -> Vec<(String, Value)> {
    let text = response.text().await.unwrap_or_default();
    parse_events(&text)
}

pub fn parse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            (name, serde_json::from_str(&data).unwrap_or(Value::Null))
        })
        .collect()
}
