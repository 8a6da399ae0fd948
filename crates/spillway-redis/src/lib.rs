//! Shared budgets for several Spillway replicas: the [`QuotaStore`] in Redis.
//!
//! Vertex gives one quota pool per project, region and model, so replicas
//! must share their ledgers exactly or together they overrun it N-fold.
//! [`RedisStore`] keeps every ledger in Redis and changes it only through
//! atomic Lua functions that mirror `spillway-core`'s `Ledger` and `Adaptive`
//! line for line (choose-and-reserve across all candidate regions in one
//! call, so one round trip per admission; settle with refund or 429
//! learning; state; runtime limits), stamped with the Redis server's clock
//! so replicas' clocks do not matter. A budget is two keys: its entries
//! (a sorted set, expiring a little after the window) and its state (sums
//! and adaptive state in one packed string, expiring after ten windows;
//! the sums count only while the entries exist), so idle budgets vanish.
//!
//! [`ResilientStore`] is what the gateway runs: Redis while it answers, and
//! a local in-memory store holding 1/N of every budget (N from config or
//! from live replica heartbeats in Redis) while it does not, started from
//! what the fleet had spent in the window (`failover.rs`), with a gauge,
//! one log line per transition, and resynchronisation when Redis returns.
//!
//! Store time is microseconds since the Unix epoch on the Redis server's
//! clock; [`ServerClock`] follows it locally (system time plus the offset
//! measured on every reply), so `QuotaStore::now()` is coherent with the
//! times functions return and the local fallback counts on the same clock.
//!
//! [`RedisSpend`] keeps tenants' spend totals (per UTC day and month) in
//! the same Redis: plain integer keys, one script call per sync.
//!
//! [`QuotaStore`]: spillway_core::store::QuotaStore

mod failover;
mod lease;
mod resilient;
mod spend;
mod store;
mod tls;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spillway_core::adaptive::AdaptiveConfig;
use spillway_core::store::{BudgetConfig, Clock};

pub use lease::LeaseCounters;
pub use resilient::{ResilientStore, StoreMetrics};
pub use spend::{RedisSpend, SpendAdd};
pub use store::RedisStore;
pub use tls::certificate_problem;

/// What a Redis store needs to know.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://`, `unix://`).
    pub url: String,
    /// Prepended to every key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Longest wait for one Redis call on the request path before failing
    /// over to the local share.
    pub timeout: Duration,
    /// The ledger window, margin included.
    pub window: Duration,
    pub adaptive: AdaptiveConfig,
    pub budgets: Vec<BudgetConfig>,
    /// How long a lease lets this replica admit without asking Redis
    /// (`lease.rs`); zero: every admission asks.
    pub lease: Duration,
    /// For `rediss://`: a PEM file of CA certificates trusted beside the
    /// system's roots (`tls.rs`). The server's certificate is always verified.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Why a Redis call failed.
#[derive(Debug)]
pub enum StoreError {
    /// No connection (never made, or dropped after a failure).
    Disconnected,
    /// No answer within the configured timeout.
    Timeout,
    Redis(redis::RedisError),
    /// A script answered something unexpected.
    Protocol(String),
    /// TLS could not be set up (the CA file).
    Tls(String),
    /// The server's TLS certificate was not trusted: a setup error, not an
    /// outage (the gateway refuses to start on it rather than retrying).
    UntrustedCertificate {
        server: String,
        problem: String,
    },
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Disconnected => write!(f, "not connected to Redis"),
            StoreError::Timeout => write!(f, "Redis did not answer in time"),
            StoreError::Redis(e) => write!(f, "Redis: {e}"),
            StoreError::Protocol(e) => write!(f, "unexpected script reply: {e}"),
            StoreError::Tls(e) => write!(f, "TLS: {e}"),
            StoreError::UntrustedCertificate { server, problem } => write!(
                f,
                "Redis at {server}: the server's TLS certificate was not trusted ({problem})"
            ),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError::Redis(e)
    }
}

/// The Redis server's clock, followed locally: system time since the Unix
/// epoch plus the offset measured at the last reply. Cheap to clone; all
/// clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct ServerClock {
    offset_us: Arc<AtomicI64>,
}

fn system_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl ServerClock {
    /// Records that the server said `server_us` just now.
    pub fn observe(&self, server_us: i64) {
        self.offset_us
            .store(server_us - system_us(), Ordering::Relaxed);
    }

    pub fn offset(&self) -> Duration {
        Duration::from_micros(self.offset_us.load(Ordering::Relaxed).unsigned_abs())
    }
}

impl Clock for ServerClock {
    fn now(&self) -> Duration {
        let us = system_us() + self.offset_us.load(Ordering::Relaxed);
        Duration::from_micros(us.max(0) as u64)
    }
}

impl StoreError {
    /// What about the server's certificate the client did not trust, if
    /// that is why a connection failed.
    pub fn certificate_problem(&self) -> Option<String> {
        match self {
            StoreError::Redis(e) => tls::certificate_problem(e),
            StoreError::UntrustedCertificate { problem, .. } => Some(problem.clone()),
            _ => None,
        }
    }
}

/// Whether `url` is a Redis URL the client accepts (for config validation).
pub fn check_url(url: &str) -> Result<(), String> {
    redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
