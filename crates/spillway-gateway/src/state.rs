//! What every handler shares: the forwarder (the request lifecycle), the
//! keys in force, the batch service, settings and metrics. Built once by
//! `server`; the parts that change have their own interior locks.

use std::sync::Arc;

use crate::auth::Keys;
use crate::batch::BatchService;
use crate::config::Settings;
use crate::forwarder::Forwarder;
use crate::metrics::Metrics;

pub struct AppState {
    pub settings: Settings,
    pub forwarder: Arc<Forwarder>,
    pub keys: Arc<Keys>,
    /// SHA-256 of the admin key; `None` disables the admin API.
    pub admin_key_digest: Option<[u8; 32]>,
    pub metrics: Arc<Metrics>,
    /// Batch jobs (store and runner); `None` when `batch.enabled = false`.
    pub batches: Option<Arc<BatchService>>,
    /// Spend per tenant (the observer records into it, caps read it).
    pub spend: Arc<crate::spend::Spend>,
    /// Store-backed state for operators, readable while a store is down.
    pub snapshots: crate::snapshots::Snapshots,
    /// The live page's event feed, shared by every viewer.
    pub feed: Arc<crate::feed::Feed>,
    pub started: tokio::time::Instant,
    /// The listener's TLS (certificate in force, reloads); `None`: plain HTTP.
    pub listener_tls: Option<Arc<crate::listener_tls::ListenerTls>>,
}
