//! # spillway-sim: a faithful stand-in for Claude on Vertex AI
//!
//! This crate simulates the three Anthropic endpoints of Google's Vertex AI
//! (`:rawPredict`, `:streamRawPredict`, `count-tokens:rawPredict`) plus
//! Google's OAuth token endpoint, closely enough that a gateway tested
//! against it behaves the same against the real service. It is the test
//! double for *Google only*: everything the gateway does is real.
//!
//! What it reproduces, and where to read about it:
//!
//! * exact response bodies and SSE framing, including Vertex's whitespace
//!   padding, `ping` and `vertex_event` quirks ([`sse`], [`message`]);
//! * both error families, and the array-wrapping of Google errors on streams
//!   ([`errors`]);
//! * per-(region, model) quotas with a strict sliding window and Vertex's
//!   429 bodies ([`quota`]);
//! * a deterministic tokenizer that deliberately differs from `chars / 3.5`
//!   ([`tokenizer`]);
//! * switchable faults: 5xx, 529, 429, hangs, connection resets, mid-stream
//!   drops, slow tokens ([`faults`]);
//! * counters and a ring buffer of recent requests, so tests can assert what
//!   reached "Google" ([`counters`], [`recorder`]);
//! * an HTTP control API ([`control`]) and an OAuth JWT-bearer endpoint ([`oauth`]).
//!
//! ## Using it in a test
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use spillway_sim::{Fault, FaultKind, SimConfig, Simulator};
//!
//! let sim = Simulator::start(SimConfig::vertex_defaults(), "127.0.0.1:0".parse().unwrap()).await?;
//! // Point the gateway's upstream for every region at `sim.base_url()`.
//! sim.inject(Fault::region("us-central1", FaultKind::Status(503)).times(1));
//! // ... drive the gateway ...
//! assert_eq!(sim.counters("us-central1", "claude-3-haiku@20240307").errors.get(&503), Some(&1));
//! sim.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! ## Controlling the answer length
//!
//! Put `SIM_OUTPUT_TOKENS=<n>` anywhere in the last user message to get an
//! `n`-token answer (capped by `max_tokens`); otherwise the answer has
//! [`SimConfig::default_output_tokens`] tokens. Time uses
//! `tokio::time::Instant`, so tests may run on tokio's paused clock.

pub mod config;
pub mod control;
pub mod counters;
pub mod errors;
pub mod faults;
pub mod message;
pub mod oauth;
pub mod quota;
pub mod recorder;
pub mod server;
pub mod sse;
mod state;
pub mod tokenizer;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{SimConfig, SimModel, SimRegion};
pub use counters::ModelCounters;
pub use faults::{Fault, FaultKind};
pub use quota::{QuotaLimits, WindowUsage};
pub use recorder::RecordedRequest;
pub use tokenizer::count_tokens;

use faults::lock;
use state::State;

/// Starts simulators.
#[derive(Debug)]
pub struct Simulator;

impl Simulator {
    /// Binds `addr` (use port 0 for a free port) and serves the simulated
    /// Vertex AI there until [`SimHandle::shutdown`].
    pub async fn start(config: SimConfig, addr: SocketAddr) -> std::io::Result<SimHandle> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let state = Arc::new(State::new(&config));
        let app = server::router(state.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let listener = listener.tap_io(|tcp| {
            // Small SSE writes must not wait for Nagle.
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(SimHandle {
            state,
            addr: local,
            stop: Arc::new(Mutex::new(Some((tx, task)))),
        })
    }
}

/// A running simulator. Cheap to clone; all clones control the same server.
#[derive(Clone)]
pub struct SimHandle {
    state: Arc<State>,
    addr: SocketAddr,
    #[allow(clippy::type_complexity)]
    stop: Arc<Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

impl SimHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (a wildcard bind is reported as loopback).
    pub fn base_url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The full URL of a predict call, e.g.
    /// `predict_url("p", "us-central1", "claude-3-haiku@20240307", "rawPredict")`.
    pub fn predict_url(&self, project: &str, region: &str, model: &str, action: &str) -> String {
        format!(
            "{}/v1/projects/{project}/locations/{region}/publishers/anthropic/models/{model}:{action}",
            self.base_url()
        )
    }

    /// Counters of (region, model); all zero if it saw nothing.
    pub fn counters(&self, region: &str, model: &str) -> ModelCounters {
        self.state.counters(region, model)
    }

    /// Predict requests received, over all regions and models (count-tokens
    /// excluded).
    pub fn total_requests(&self) -> u64 {
        self.state.total_requests.load(Ordering::Relaxed)
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        self.state.faults.add(fault);
    }

    /// Removes all faults, and releases requests hanging on a `Hang` fault
    /// (they then answer normally).
    pub fn clear_faults(&self) {
        self.state.faults.clear();
        self.state.release_hangs();
    }

    /// The active faults.
    pub fn faults(&self) -> Vec<Fault> {
        self.state.faults.list()
    }

    /// Sets requests and tokens per window for (region, model), keeping its
    /// split input/output limits. Offers the model in that region if it was
    /// not. Usage already in the window is kept.
    pub fn set_quota(&self, region: &str, model: &str, requests_per_min: u32, tokens_per_min: u64) {
        let mut limits = self.state.limits(region, model).unwrap_or(QuotaLimits {
            requests_per_min,
            tokens_per_min,
            input_tokens_per_min: None,
            output_tokens_per_min: None,
        });
        limits.requests_per_min = requests_per_min;
        limits.tokens_per_min = tokens_per_min;
        self.state.set_limits(region, model, limits);
    }

    /// Sets all limits of (region, model), including the split ones.
    pub fn set_limits(&self, region: &str, model: &str, limits: QuotaLimits) {
        self.state.set_limits(region, model, limits);
    }

    /// Current usage inside the quota window of (region, model).
    pub fn window_usage(&self, region: &str, model: &str) -> Option<WindowUsage> {
        let slot = self.state.slot(region, model)?;
        let usage = lock(&slot.quota).usage(tokio::time::Instant::now(), self.state.window);
        Some(usage)
    }

    /// Sets the answer length used when a request has no `SIM_OUTPUT_TOKENS=`.
    pub fn set_default_output_tokens(&self, n: u32) {
        self.state.default_output_tokens.store(n, Ordering::Relaxed);
    }

    /// When each predict request for an offered (region, model) arrived,
    /// whatever its answer, oldest first (the last 65,536):
    /// what a test needs to check every window of a run, not only the
    /// simulator's own verdicts.
    pub fn arrivals(&self, region: &str, model: &str) -> Vec<tokio::time::Instant> {
        self.state
            .slot(region, model)
            .map(|slot| lock(&slot.arrivals).iter().copied().collect())
            .unwrap_or_default()
    }

    /// The last 64 requests, oldest first.
    pub fn recent_requests(&self) -> Vec<RecordedRequest> {
        self.state.recorder.snapshot()
    }

    /// Clears counters, quota windows, faults and recorded requests (quota
    /// limits, the default answer length and issued OAuth tokens are kept).
    pub fn reset(&self) {
        self.state.reset();
    }

    /// OAuth tokens issued by `POST /token` (since start or the last reset).
    pub fn tokens_issued(&self) -> u64 {
        self.state.oauth.issued()
    }

    /// Stops accepting connections, lets in-flight requests finish (hung
    /// ones are released) for up to 5 s, then stops the server.
    pub async fn shutdown(self) {
        let stop = lock(&self.stop).take();
        let Some((tx, mut task)) = stop else {
            return;
        };
        self.state.shutting_down.store(true, Ordering::Relaxed);
        let _ = tx.send(());
        self.state.release_hangs();
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}
