//! `spillway`: the command line.
//!
//! - `spillway serve [--config FILE]...`: run the gateway.
//! - `spillway demo [--load]`: the gateway in front of the bundled Vertex
//!   simulator, needing no Google account, with the admin API on and,
//!   with `--load`, synthetic traffic to watch (see `demo`).
//! - `spillway check-config FILE`: validate a config and print the effective
//!   settings with secrets redacted.
//! - `spillway status`: the live quota table from the admin API.
//! - `spillway batch submit FILE.jsonl [--wait] | status ID | results ID | cancel ID`:
//!   batch jobs (see `batch_cli`).
//! - `spillway hash-key [KEY]`: the SHA-256 digest to put in config for a
//!   client key (a fresh key is generated when none is given).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use spillway_gateway::config::{check_file, LogFormat, Settings};
use spillway_gateway::Gateway;

#[cfg(all(target_os = "linux", not(target_env = "msvc")))]
mod allocator;
mod batch_cli;
mod demo;
mod json_log;
mod status;

#[derive(Parser)]
#[command(
    name = "spillway",
    version,
    about = "A quota-aware gateway for Claude on Vertex AI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config files layered over the built-in defaults, in order.
        #[arg(long = "config", short = 'c')]
        config: Vec<PathBuf>,
    },
    /// Run the gateway in front of a simulated Vertex AI (no Google account needed).
    Demo(demo::DemoArgs),
    /// Validate a config file and print the effective config, secrets redacted.
    CheckConfig { file: PathBuf },
    /// Show the live quota table from a running gateway's admin API.
    Status {
        /// The gateway's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The admin key (or set SPILLWAY_ADMIN_KEY).
        #[arg(long, env = "SPILLWAY_ADMIN_KEY", hide_env_values = true)]
        admin_key: String,
        /// Print once instead of refreshing.
        #[arg(long)]
        once: bool,
        /// Refresh interval in seconds.
        #[arg(long, default_value_t = 2)]
        every: u64,
    },
    /// Batch jobs: submit a JSONL file, follow it, fetch results, cancel.
    Batch(batch_cli::BatchArgs),
    /// Print the SHA-256 digest of a client key for `[tenants.NAME] key_sha256`.
    HashKey {
        /// The key; omitted, a new random key is generated and printed too.
        key: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::HashKey { key } => {
            hash_key(key);
            Ok(())
        }
        Command::Serve { config } => run(|| async move {
            let settings = Settings::load(&config)?;
            serve(settings, config).await
        }),
        Command::Demo(args) => run(|| demo::run(args)),
        Command::Batch(args) => run(|| batch_cli::run(args)),
        Command::Status {
            url,
            admin_key,
            once,
            every,
        } => run(|| status::watch(url, admin_key, once, every)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spillway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run<F, Fut>(f: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f())
}

fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let settings = check_file(file)?;
    println!("# {}: valid\n{}", file.display(), settings.redacted_toml());
    Ok(())
}

fn hash_key(key: Option<String>) {
    match key {
        Some(key) => println!("{}", spillway_gateway::auth::hash_key(&key)),
        None => {
            let key = spillway_gateway::auth::new_client_key();
            println!("key:        {key}");
            println!("key_sha256: {}", spillway_gateway::auth::hash_key(&key));
        }
    }
}

/// Logs go to stderr through a background writer, so a slow terminal or
/// pipe never stalls the request path; colours only on a terminal. The
/// returned guard flushes what is pending when dropped at exit.
fn init_logging(format: LogFormat) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    // Not lossy: under pressure a request waits rather than its line vanishing.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // The default (128k lines) preallocates ~4 MiB; 16k lines is still
        // seconds of full-rate access logs.
        .buffered_lines_limit(16 * 1024)
        // Buffered: the worker flushes each time it has drained what is
        // queued, so a burst of lines costs one write(2), not one per line.
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    let installed = match format {
        LogFormat::Json => builder.event_format(json_log::JsonLines).try_init(),
        LogFormat::Human => builder.try_init(),
    };
    installed.is_ok().then_some(guard)
}

async fn serve(settings: Settings, files: Vec<PathBuf>) -> anyhow::Result<()> {
    let _flush_logs = init_logging(settings.server.log_format);
    let gateway = Gateway::new(settings).await?;
    #[cfg(all(target_os = "linux", not(target_env = "msvc")))]
    allocator::register(gateway.state().metrics.registry())?;
    let listener = gateway.bind().await?;
    let scheme = if gateway.state().listener_tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(addr = %listener.local_addr()?, scheme, "spillway listening");
    reload_on_sighup(&gateway, files);
    gateway.serve(listener, shutdown_signal()).await?;
    Ok(())
}

/// SIGHUP re-reads the config files and applies what can change live.
fn reload_on_sighup(gateway: &Gateway, files: Vec<PathBuf>) {
    #[cfg(unix)]
    {
        let state = std::sync::Arc::clone(gateway.state());
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hangups) = signal(SignalKind::hangup()) else {
                return;
            };
            while hangups.recv().await.is_some() {
                match Settings::load(&files) {
                    Ok(settings) => spillway_gateway::admin::reload(&state, settings).await,
                    Err(e) => {
                        tracing::error!(error = %e, "reload refused: invalid configuration; keeping the current one")
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (gateway, files);
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
