//! `spillway-sim`: run the Vertex AI simulator as a standalone server (for
//! `spillway demo`, benchmarks and the Python SDK tests).
//!
//! ```text
//! spillway-sim --listen 127.0.0.1:8790 [--window-secs 60] [--bearer TOKEN] [--config sim.toml]
//!              [--anthropic-key KEY]
//! ```
//!
//! `--anthropic-key` (or `SPILLWAY_SIM_ANTHROPIC_KEY`) also serves
//! Anthropic's first-party API (`POST /v1/messages`) with that key: with the
//! config file's `[anthropic]` models if it has the section (the flag then
//! only replaces the key), else `AnthropicConfig::defaults`.
//!
//! Without `--config` it serves `SimConfig::vertex_defaults()`; flags given
//! on the command line override the file. It prints its base URL on stdout
//! (one line, `spillway-sim listening on http://...`) and runs until Ctrl-C or SIGTERM.
//! Logs go to stderr, filtered by `RUST_LOG` (default `warn`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use spillway_sim::{AnthropicConfig, SimConfig, Simulator};

#[derive(Debug, Parser)]
#[command(
    name = "spillway-sim",
    about = "Simulated Vertex AI (Anthropic endpoints) for tests and benchmarks"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8790")]
    listen: SocketAddr,
    /// Quota window in seconds (Vertex: 60).
    #[arg(long)]
    window_secs: Option<f64>,
    /// Require this bearer token (tokens from POST /token are accepted too).
    #[arg(long)]
    bearer: Option<String>,
    /// TOML file with regions, models and quotas (see the spillway_sim::config docs).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Default answer length in tokens.
    #[arg(long)]
    output_tokens: Option<u32>,
    /// Do not send Vertex's `vertex_event` SSE event.
    #[arg(long)]
    no_vertex_event: bool,
    /// Also serve Anthropic's first-party API (/v1/messages), accepting this x-api-key.
    #[arg(long, env = "SPILLWAY_SIM_ANTHROPIC_KEY")]
    anthropic_key: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            SimConfig::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => SimConfig::vertex_defaults(),
    };
    if let Some(secs) = args.window_secs {
        config.window = Duration::try_from_secs_f64(secs).context("--window-secs")?;
    }
    if let Some(b) = args.bearer {
        config.bearer_token = Some(b);
    }
    if let Some(n) = args.output_tokens {
        config.default_output_tokens = n;
    }
    if args.no_vertex_event {
        config.emit_vertex_event = false;
    }
    if let Some(key) = args.anthropic_key {
        match config.anthropic.as_mut() {
            Some(a) => a.api_key = key,
            None => config.anthropic = Some(AnthropicConfig::defaults(key)),
        }
    }
    let sim = Simulator::start(config, args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("spillway-sim listening on {}", sim.base_url());
    wait_for_signal().await?;
    sim.shutdown().await;
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix (how `spillway demo` and CI stop the simulator).
async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
