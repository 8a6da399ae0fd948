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
//!   ([`errors`]); `"stream": true` sent to `:rawPredict` streams, as the
//!   simulator's reading of an undocumented case ([`server`]);
//! * today's Vertex quota system ([`quota`]): requests, input tokens and
//!   output tokens per minute counted separately (a combined limit is
//!   optional), per model on regional locations and per *lineage group* on
//!   `global` and the multi-regions (`us`, `eu`), with a strict sliding
//!   window, Vertex's 429 bodies naming the right metric and base model
//!   ([`errors`]), and a log of every admission so a test can check every
//!   window of a run ([`SimHandle::bucket_reports`], [`quota::peak_usage`]);
//! * prompt caching: a real prefix cache per location and model, keyed by
//!   the prompt up to each `cache_control` breakpoint, with a 5-minute TTL
//!   ([`cache`]), or as a test dictates it (`SIM_CACHE_READ=`,
//!   `SIM_CACHE_WRITE=`), with a per-model rule for whether cache reads
//!   count against the input quota ([`message`], [`config`]);
//! * a deterministic tokenizer that deliberately differs from `chars / 3.5`
//!   ([`tokenizer`]);
//! * switchable faults: 5xx, 529, quota and *capacity* 429s, hangs,
//!   connection resets, mid-stream drops, slow tokens ([`faults`]); models
//!   refused by a region at run time (404, [`SimHandle::refuse_model`]);
//!   revoked bearer tokens (401, [`SimHandle::rotate_token`]);
//! * counters and a ring buffer of recent requests, so tests can assert what
//!   reached "Google" ([`counters`], [`recorder`]);
//! * an HTTP control API ([`control`]) and an OAuth JWT-bearer endpoint ([`oauth`]);
//! * optionally, on the same port, **Anthropic's first-party Messages API**
//!   (`POST /v1/messages`, `POST /v1/messages/count_tokens`) for testing a
//!   gateway's overflow to `api.anthropic.com` ([`anthropic`]): `x-api-key`
//!   and `anthropic-version` checked as the real API does, `request-id` on
//!   every answer, Anthropic's error bodies, and per-model RPM / ITPM /
//!   OTPM limits as **continuously refilling token buckets**
//!   ([`ratelimit`]) with the `anthropic-ratelimit-*` headers, 429s with
//!   `retry-after`, OTPM charged at `max_tokens` then credited back, a
//!   complete log of the run and a replay that proves no bucket was ever
//!   overdrawn ([`SimHandle::anthropic_admissions_report`]).
//!
//! ## Anthropic's first-party API in a test
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use spillway_sim::{AnthropicLimits, AnthropicModel, Fault, FaultKind, SimConfig, Simulator};
//!
//! let config = SimConfig::vertex_defaults().with_anthropic(
//!     "sk-ant-test",
//!     vec![AnthropicModel::new("claude-sonnet-4-5", 50, 30_000, 8_000)],
//! );
//! let sim = Simulator::start(config, "127.0.0.1:0".parse().unwrap()).await?;
//! // Point the gateway's Anthropic base URL at `sim.base_url()` (it serves
//! // `/v1/messages` next to the Vertex routes) and its key at "sk-ant-test".
//! // The real limit is lower than the gateway believes:
//! sim.set_anthropic_limits("claude-sonnet-4-5", AnthropicLimits::new(10, 30_000, 8_000));
//! sim.inject(Fault::anthropic(FaultKind::Status(529)).times(1));
//! // ... drive the gateway ...
//! for r in sim.anthropic_admissions_report() {
//!     assert!(r.within_limits() && r.levels_consistent, "{r:?}");
//! }
//! # Ok(()) }
//! ```
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
//! ## Controlling the answer length and the cache
//!
//! Put `SIM_OUTPUT_TOKENS=<n>` anywhere in the last user message to get an
//! `n`-token answer (capped by `max_tokens`); otherwise the answer has
//! [`SimConfig::default_output_tokens`] tokens. `SIM_CACHE_READ=<r>` and
//! `SIM_CACHE_WRITE=<w>` there make `r` (`w`) of the prompt's tokens cache
//! reads (writes) in the reported usage, and `SIM_CACHE_WRITE_1H=<h>` makes
//! `h` of the writes 1-hour ones (`usage.cache_creation`) ([`message`]). Time uses
//! `tokio::time::Instant`, so tests may run on tokio's paused clock.
//!
//! ## Quota buckets in a test
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! use spillway_sim::{SimConfig, SimModel, SimRegion, Simulator};
//!
//! let sonnet = |id: &str| SimModel::split(id, 50, 20_000, 4_000).in_group("anthropic-claude-sonnet");
//! let config = SimConfig {
//!     regions: vec![SimRegion {
//!         name: "global".into(),
//!         // One shared window for both ids on `global`.
//!         models: vec![sonnet("claude-sonnet-4-6"), sonnet("claude-sonnet-4-5@20250929")],
//!     }],
//!     ..SimConfig::vertex_defaults()
//! };
//! let sim = Simulator::start(config, "127.0.0.1:0".parse().unwrap()).await?;
//! // ... drive the gateway ...
//! for r in sim.bucket_reports(Duration::from_secs(60)) {
//!     assert!(r.within_limits(), "{:?} peaked at {:?}", r.id, r.peak);
//! }
//! # Ok(()) }
//! ```

pub mod anthropic;
pub mod cache;
pub mod config;
pub mod control;
pub mod counters;
pub mod errors;
pub mod faults;
pub mod message;
pub mod oauth;
pub mod quota;
pub mod ratelimit;
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

pub use anthropic::{AnthropicCounters, AnthropicRequest, ANTHROPIC_REGION};
pub use config::{AnthropicConfig, AnthropicModel, ConfigError, SimConfig, SimModel, SimRegion};
pub use counters::ModelCounters;
pub use faults::{Fault, FaultKind};
pub use message::InputUsage;
pub use quota::{
    peak_usage, Admission, BucketId, BucketKey, LocationKind, PeakUsage, QuotaLimits, WindowUsage,
};
pub use ratelimit::{
    replay_admissions, AdmissionsReport, AnthropicLimits, AnthropicLog, AnthropicLogEntry,
    BucketLevels, LimitChange, LimiterSnapshot, RateLimitDimension,
};
pub use recorder::RecordedRequest;
pub use tokenizer::count_tokens;

use faults::lock;
use state::State;

/// A bucket's view of a run, from [`SimHandle::bucket_reports`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BucketReport {
    /// Location and key.
    pub id: BucketId,
    /// The `base_model` dimension its 429s name.
    pub base_model: String,
    /// The models drawing on it, sorted.
    pub models: Vec<String>,
    /// Its current limits.
    pub limits: QuotaLimits,
    /// Requests admitted since start or the last reset.
    pub admitted: u64,
    /// Whether the log dropped old admissions (then `peak` covers only the
    /// last [`quota::ADMISSION_LOG_LEN`]).
    pub log_truncated: bool,
    /// The most any window held, per figure.
    pub peak: PeakUsage,
}

impl BucketReport {
    /// Whether no window exceeded the (current) limits.
    pub fn within_limits(&self) -> bool {
        self.limits.allows(&self.peak)
    }
}

/// Starts simulators.
#[derive(Debug)]
pub struct Simulator;

impl Simulator {
    /// Binds `addr` (use port 0 for a free port) and serves the simulated
    /// Vertex AI there until [`SimHandle::shutdown`]. A config that fails
    /// [`SimConfig::validate`] is an `InvalidInput` error (its source is the
    /// [`ConfigError`]).
    pub async fn start(config: SimConfig, addr: SocketAddr) -> std::io::Result<SimHandle> {
        config
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
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

    /// Sets requests and combined tokens per window for (region, model)'s
    /// bucket, keeping its split input/output limits. Offers the model in
    /// that region (with a bucket of its own) if it was not. Usage already
    /// in the window is kept. On a shared lineage bucket this changes the
    /// limits of every model of the group there.
    pub fn set_quota(&self, region: &str, model: &str, requests_per_min: u32, tokens_per_min: u64) {
        let mut limits = self
            .state
            .limits(region, model)
            .unwrap_or(QuotaLimits::combined(requests_per_min, tokens_per_min));
        limits.requests_per_min = requests_per_min;
        limits.tokens_per_min = Some(tokens_per_min);
        self.state.set_limits(region, model, limits);
    }

    /// Sets all limits of (region, model)'s bucket (see [`SimHandle::set_quota`]).
    pub fn set_limits(&self, region: &str, model: &str, limits: QuotaLimits) {
        self.state.set_limits(region, model, limits);
    }

    /// The limits of (region, model)'s bucket, if the model is offered there.
    pub fn limits(&self, region: &str, model: &str) -> Option<QuotaLimits> {
        self.state.limits(region, model)
    }

    /// Current usage inside the quota window of (region, model)'s bucket
    /// (shared with its lineage group on `global` and multi-regions).
    pub fn window_usage(&self, region: &str, model: &str) -> Option<WindowUsage> {
        let slot = self.state.slot(region, model)?;
        Some(slot.bucket.usage(self.state.window))
    }

    /// The bucket (region, model) draws on, if the model is offered there.
    pub fn bucket_of(&self, region: &str, model: &str) -> Option<BucketId> {
        self.state.slot(region, model).map(|s| s.bucket.id.clone())
    }

    /// Every quota bucket, sorted by location, then key.
    pub fn buckets(&self) -> Vec<BucketId> {
        self.state.buckets().iter().map(|b| b.id.clone()).collect()
    }

    /// The admission log of a bucket: every admitted request (the last
    /// [`quota::ADMISSION_LOG_LEN`]), oldest first, with the tokens it was
    /// charged. Empty for an unknown bucket.
    pub fn admissions(&self, bucket: &BucketId) -> Vec<Admission> {
        self.state
            .bucket(bucket)
            .map(|b| b.log().0)
            .unwrap_or_default()
    }

    /// For every bucket: its limits, members, admissions and the peak of
    /// every window of length `window` over the logged run (see
    /// [`quota::peak_usage`]). With `window` = the simulator's window, each
    /// report must be [`BucketReport::within_limits`] unless limits were
    /// lowered during the run.
    pub fn bucket_reports(&self, window: Duration) -> Vec<BucketReport> {
        self.state
            .buckets()
            .iter()
            .map(|b| {
                let (log, dropped) = b.log();
                BucketReport {
                    id: b.id.clone(),
                    base_model: b.id.base_model(),
                    models: self.state.bucket_models(&b.id),
                    limits: b.limits(),
                    admitted: log.len() as u64 + dropped,
                    log_truncated: dropped > 0,
                    peak: peak_usage(&log, window),
                }
            })
            .collect()
    }

    /// The simulator's quota window length.
    pub fn window(&self) -> Duration {
        self.state.window
    }

    /// Makes `region` refuse `model` with Vertex's 404 `NOT_FOUND` ("Publisher
    /// Model `projects/...` was not found or your project does not have
    /// access to it..."), on predict and count-tokens, until
    /// [`SimHandle::allow_model`] or a reset. Works for offered models and
    /// not (the latter already get that 404).
    pub fn refuse_model(&self, region: &str, model: &str) {
        self.state.refuse(region, model);
    }

    /// Undoes [`SimHandle::refuse_model`]; returns whether it was refused.
    /// (It does not offer a model the region never had: see
    /// [`SimHandle::set_limits`] for that.)
    pub fn allow_model(&self, region: &str, model: &str) -> bool {
        self.state.allow(region, model)
    }

    /// The (region, model) pairs currently refused, sorted.
    pub fn refused_models(&self) -> Vec<(String, String)> {
        self.state.refused()
    }

    /// Revokes the accepted bearer token(s): the static one and every token
    /// `/token` issued so far now get Google's 401 `UNAUTHENTICATED`.
    /// Tokens issued by `/token` from now on are accepted, as is the new
    /// static token returned here. If no token was required before, one is
    /// from now on.
    pub fn rotate_token(&self) -> String {
        self.state.rotate_token()
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

    /// Clears counters, quota windows, admission logs, faults, model
    /// refusals and recorded requests, and resets the first-party surface
    /// (buckets full again, a new log, counters and recorded requests
    /// cleared). Quota limits (Vertex and Anthropic), the default answer
    /// length, the bearer token, the API key and issued OAuth tokens are kept.
    pub fn reset(&self) {
        self.state.reset();
    }

    /// The first-party Messages URL, `http://127.0.0.1:PORT/v1/messages`
    /// (served only with [`SimConfig::anthropic`]; the Anthropic base URL
    /// to give a client is [`SimHandle::base_url`]).
    pub fn anthropic_messages_url(&self) -> String {
        format!("{}/v1/messages", self.base_url())
    }

    /// The accepted `x-api-key`, if the first-party surface is configured.
    pub fn anthropic_api_key(&self) -> Option<String> {
        self.state
            .anthropic
            .as_ref()
            .map(|a| a.api_key().to_owned())
    }

    /// First-party counters of one model (all zero if unknown or not
    /// configured; see [`AnthropicCounters`] for what counts where).
    pub fn anthropic_counters(&self, model: &str) -> AnthropicCounters {
        self.state
            .anthropic
            .as_ref()
            .map(|a| a.counters(model))
            .unwrap_or_default()
    }

    /// First-party counters over every request (those that never named a
    /// configured model included: 401s, 404s, ...).
    pub fn anthropic_total_counters(&self) -> AnthropicCounters {
        self.state
            .anthropic
            .as_ref()
            .map(|a| a.total_counters())
            .unwrap_or_default()
    }

    /// The complete first-party log since start or the last reset (see
    /// [`ratelimit`]); empty if not configured.
    pub fn anthropic_log(&self) -> AnthropicLog {
        self.state
            .anthropic
            .as_ref()
            .map(|a| a.log())
            .unwrap_or_default()
    }

    /// [`replay_admissions`] of [`SimHandle::anthropic_log`]: per model,
    /// the lowest level each bucket reached and any overdraft. Every report
    /// must be `within_limits()` and `levels_consistent`.
    pub fn anthropic_admissions_report(&self) -> Vec<AdmissionsReport> {
        replay_admissions(&self.anthropic_log())
    }

    /// The last [`anthropic::RECORDED_ANTHROPIC_REQUESTS`] first-party
    /// requests (Messages and count_tokens), oldest first.
    pub fn anthropic_recent_requests(&self) -> Vec<AnthropicRequest> {
        self.state
            .anthropic
            .as_ref()
            .map(|a| a.recent())
            .unwrap_or_default()
    }

    /// Sets a first-party model's limits at run time (`None`: not
    /// enforced). Each bucket keeps its level, clamped to the new capacity;
    /// a newly enforced limit starts full. An unconfigured model is offered
    /// from now on (default cache rule). Returns false, doing nothing, if
    /// the first-party surface is not configured.
    pub fn set_anthropic_limits(&self, model: &str, limits: AnthropicLimits) -> bool {
        match &self.state.anthropic {
            Some(a) => {
                a.set_limits(model, limits);
                true
            }
            None => false,
        }
    }

    /// A first-party model's limits, if it is offered.
    pub fn anthropic_limits(&self, model: &str) -> Option<AnthropicLimits> {
        self.anthropic_levels(model).map(|(l, _)| l)
    }

    /// A first-party model's limits and its buckets now (exact floor
    /// levels, unrounded, and the time until each is full).
    pub fn anthropic_levels(&self, model: &str) -> Option<(AnthropicLimits, LimiterSnapshot)> {
        self.state.anthropic.as_ref()?.model_levels(model)
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
