//! Batch jobs: Anthropic's Message Batches API, drained from idle quota,
//! kept in a durable store.
//!
//! # The shape of it
//!
//! ```text
//! client ─POST /v1/messages/batches─▶ api ─(jsonl: streaming parse, validate each item
//!                                      │   exactly as an interactive request)─▶ store
//!                                      │                                           ▲ │
//!        ◀─GET …/results (JSONL, paged from the store)─────────────────────────────┘ │
//!                                                                                     ▼
//!                         runner: claim ≤ concurrency items (lease) ─▶ Forwarder::forward
//!                                 (Priority::Batch: same admission, fallback,
//!                                  settlement and logging as any request) ─▶ complete
//! ```
//!
//! - [`api`]: the HTTP handlers. A batch is submitted as Anthropic's JSON
//!   (`{"requests":[{"custom_id","params"}]}`) or as JSONL (one
//!   `{"custom_id","params"}` per line, `content-type: application/x-ndjson`);
//!   either way the body is parsed *as it arrives* ([`jsonl`]), each item is
//!   validated with the interactive rules and written to the store in chunks,
//!   so memory stays flat however large the upload. The batch is written as
//!   `staging` and becomes visible only once every item passed: an invalid
//!   batch is rejected whole, naming the index and the reason, and leaves
//!   nothing behind.
//! - [`store`]: [`store::BatchStore`], one SQL schema with two backends,
//!   SQLite (embedded, the default) and PostgreSQL (several replicas). Every
//!   state change of an item is one transaction that also moves its
//!   batch's counters, so `request_counts` are always exact and cheap to
//!   read.
//! - [`runner`]: the worker loop. It claims items with a *lease* (owner id +
//!   expiry, renewed while the item is in flight), runs each through
//!   [`crate::forwarder::Forwarder::forward`] at [`crate::scheduler::Priority::Batch`], and
//!   completes it only if it still holds the lease. The scheduler admits a
//!   batch request only when no interactive request of its model is waiting,
//!   so interactive traffic is delayed by at most the batch requests already
//!   admitted, and idle quota is used by the batch.
//! - [`progress`]: the open batches' recent completion rate (from the
//!   store's counters, so the fleet's) and each one's ETA in claim order,
//!   for the live page.
//!
//! # Guarantees
//!
//! - **Exactly one result per `custom_id`.** The result lives on the item's
//!   row (unique per batch and custom id) and is written by an `UPDATE …
//!   WHERE state = 'running' AND lease_owner = me`: a second execution of the
//!   same item (after a crash or a lost lease) cannot add a second result.
//! - **At least once upstream.** An item in flight when the process dies is
//!   claimed again after restart (SQLite: at start; PostgreSQL: when its lease
//!   expires) and may be sent upstream a second time. Its attempt counts.
//! - **Nothing is lost on SIGKILL.** Items are committed before the batch is
//!   acknowledged; SQLite runs in WAL mode with `synchronous = FULL`.
//! - **Bounded disk.** Ended batches are purged `retention_days` after they
//!   ended (29 by default, like Anthropic); SQLite gives pages back with
//!   incremental vacuum. [`runner::BatchService::snapshot`] reports the
//!   store's size.
//!
//! # Differences from Anthropic, on purpose
//!
//! - `request_counts` move while the batch runs (Anthropic keeps them at 0
//!   until the end): `processing` counts down as items finish.
//! - Results are purged, not archived: after retention the batch is gone
//!   (404), so `archived_at` is always `null`.
//!
//! # What this module must not do
//!
//! - Talk to upstream or to the quota store directly: every item goes
//!   through `Forwarder::forward`, so batches can never bypass admission,
//!   tenant policy, fallback or settlement.
//! - Hold a batch in memory: uploads are streamed into the store and results
//!   are streamed out of it page by page.
//! - Let one tenant see another's batch: every query is keyed by tenant, and
//!   a foreign id is a plain 404.

pub mod api;
pub mod jsonl;
pub mod progress;
pub mod runner;
pub mod store;

pub use runner::{BatchService, BatchSnapshot};

use serde::Serialize;

/// Anthropic's limits for one batch.
pub const MAX_CUSTOM_ID_LEN: usize = 64;

/// Errors of the batch module, mapped to [`crate::error::ApiError`] at the edge.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The batch is invalid as a whole or in one item; nothing was stored.
    #[error("{0}")]
    Invalid(String),
    #[error("message batch {0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("batch body is larger than the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error("content-type must be application/json (Anthropic's shape) or application/x-ndjson (one request per line), not {0:?}")]
    UnsupportedMediaType(String),
    #[error("batch store: {0}")]
    Store(#[from] sqlx::Error),
    /// The server's TLS certificate was not trusted (at connect).
    #[error("{0}")]
    Untrusted(String),
    #[error("batch store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The SQLite file could not be opened or prepared: the path says
    /// where (a read-only root filesystem, a missing volume).
    #[error("batch store: opening the SQLite database {path}: {source}")]
    OpenSqlite {
        path: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("reading the request body: {0}")]
    Body(String),
    /// The client was too slow sending its upload.
    #[error("{0}")]
    TimedOut(String),
}

impl BatchError {
    /// A failure reading the upload: the client's own slowness (408), or a
    /// broken body (400).
    pub fn reading(error: &std::io::Error) -> Self {
        match error.kind() {
            std::io::ErrorKind::TimedOut => BatchError::TimedOut(error.to_string()),
            _ => BatchError::Body(format!("reading the upload: {error}")),
        }
    }
}

/// Whether a store error means the store cannot be reached (so a retry
/// later can succeed), not that the request or the data is wrong.
fn store_unreachable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
    )
}

impl From<BatchError> for crate::error::ApiError {
    fn from(e: BatchError) -> Self {
        use crate::error::ApiError;
        match e {
            BatchError::Invalid(m) | BatchError::Conflict(m) => ApiError::BadRequest(m),
            BatchError::NotFound(id) => ApiError::NotFound(format!("message batch {id} not found")),
            BatchError::TooLarge { limit } => ApiError::TooLarge {
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
            },
            BatchError::UnsupportedMediaType(ct) => ApiError::UnsupportedMediaType(ct),
            BatchError::Body(m) => ApiError::BadRequest(m),
            BatchError::TimedOut(m) => ApiError::RequestTimeout(m),
            BatchError::Store(e) if store_unreachable(&e) => {
                tracing::warn!(error = %e, "batch store unreachable");
                ApiError::Overloaded {
                    message: "the batch store is unreachable; retry later (interactive requests are not affected)".into(),
                    retry_after: std::time::Duration::from_secs(5),
                }
            }
            e @ (BatchError::Store(_)
            | BatchError::Migrate(_)
            | BatchError::OpenSqlite { .. }
            | BatchError::Untrusted(_)) => {
                tracing::error!(error = %e, "batch store failure");
                ApiError::Internal("the batch store failed; see the Spillway log".into())
            }
        }
    }
}

/// A batch's processing status, as Anthropic names it, plus `staging`
/// (being uploaded; invisible to clients and to the runner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessingStatus {
    Staging,
    InProgress,
    Canceling,
    Ended,
}

impl ProcessingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Staging => "staging",
            Self::InProgress => "in_progress",
            Self::Canceling => "canceling",
            Self::Ended => "ended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "staging" => Self::Staging,
            "in_progress" => Self::InProgress,
            "canceling" => Self::Canceling,
            "ended" => Self::Ended,
            _ => return None,
        })
    }
}

/// `request_counts`, as Anthropic names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    pub processing: i64,
    pub succeeded: i64,
    pub errored: i64,
    pub canceled: i64,
    pub expired: i64,
}

/// One batch as stored. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRecord {
    pub id: String,
    pub tenant: String,
    pub status: ProcessingStatus,
    pub created_at: i64,
    pub expires_at: i64,
    pub ended_at: Option<i64>,
    pub cancel_initiated_at: Option<i64>,
    pub archived_at: Option<i64>,
    pub counts: RequestCounts,
}

impl BatchRecord {
    pub fn total(&self) -> i64 {
        let c = &self.counts;
        c.processing + c.succeeded + c.errored + c.canceled + c.expired
    }

    /// The `MessageBatch` object; `base_url` is Spillway's public URL.
    pub fn to_json(&self, base_url: &str) -> serde_json::Value {
        let time = |ms: Option<i64>| ms.map(rfc3339);
        let results_url = (self.status == ProcessingStatus::Ended)
            .then(|| format!("{base_url}/v1/messages/batches/{}/results", self.id));
        serde_json::json!({
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.status,
            "request_counts": self.counts,
            "ended_at": time(self.ended_at),
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "archived_at": time(self.archived_at),
            "cancel_initiated_at": time(self.cancel_initiated_at),
            "results_url": results_url,
        })
    }
}

/// Wall-clock milliseconds that follow tokio's clock: the Unix time at
/// start plus tokio's elapsed time. In production that is wall time; on a
/// paused test clock a batch's 24 hours pass in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct BatchClock {
    unix_ms_at_start: i64,
    start: tokio::time::Instant,
}

impl BatchClock {
    pub fn new() -> Self {
        let unix_ms_at_start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Self {
            unix_ms_at_start,
            start: tokio::time::Instant::now(),
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.unix_ms_at_start + self.start.elapsed().as_millis() as i64
    }
}

impl Default for BatchClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds, e.g.
/// `2024-08-20T18:37:24.100Z`.
pub fn rfc3339(ms: i64) -> String {
    crate::rfc3339::format_unix_millis(ms, true)
}

/// `msgbatch_01` and 22 base-62 characters, like Anthropic's ids.
pub fn new_batch_id() -> String {
    crate::ids::random_id("msgbatch_01", 22)
}

/// Whether `id` could be a batch id (anything else is a 404 without a query).
pub fn is_batch_id(id: &str) -> bool {
    id.len() <= 64
        && id.starts_with("msgbatch_")
        && id[9..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Anthropic's rule for `custom_id`: 1 to 64 of `[a-zA-Z0-9_-]`.
pub fn check_custom_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_CUSTOM_ID_LEN {
        return Err(format!(
            "custom_id must be 1 to {MAX_CUSTOM_ID_LEN} characters, not {}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "custom_id {id:?} contains {c:?}; only a-z, A-Z, 0-9, _ and - are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_724_179_044_100), "2024-08-20T18:37:24.100Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn ids_are_anthropic_shaped() {
        let a = new_batch_id();
        assert!(a.starts_with("msgbatch_01") && a.len() == 33, "{a}");
        assert!(is_batch_id(&a));
        assert_ne!(a, new_batch_id());
        assert!(!is_batch_id("msg_123"));
        assert!(!is_batch_id("msgbatch_a/b"));
    }

    #[test]
    fn custom_ids_follow_anthropic_rules() {
        assert!(check_custom_id("req-1_A").is_ok());
        assert!(check_custom_id(&"x".repeat(64)).is_ok());
        assert!(check_custom_id("").is_err());
        assert!(check_custom_id(&"x".repeat(65)).is_err());
        assert!(check_custom_id("a b").unwrap_err().contains("' '"));
        assert!(check_custom_id("é").is_err());
    }
}
