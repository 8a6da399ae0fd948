//! The quota store the gateway runs on: the in-memory one (exact for one
//! replica) or the shared one in Redis ([`spillway_redis::ResilientStore`]),
//! built from the catalog: one budget per bucket, (bucket group, location),
//! and each model's (requester, location) pointing at its bucket.
//!
//! Queues stay local to each replica; admission is global: every replica's
//! scheduler asks the same Redis ledgers, one function call per decision.

use std::sync::Arc;
use std::time::Duration;

use spillway_core::adaptive::AdaptiveConfig;
use spillway_core::store::{BudgetConfig, Clock, MemoryStore, QuotaStore};
use spillway_core::Catalog;
use spillway_redis::{RedisSettings, ResilientStore, StoreError, StoreMetrics};

use crate::config::{QuotaDefaults, QuotaStoreKind};

/// The store's clock: tokio's, so tests on a paused clock are exact.
struct TokioClock {
    epoch: tokio::time::Instant,
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        tokio::time::Instant::now().duration_since(self.epoch)
    }
}

/// The ledger's window: Vertex's, plus a margin for transit, so a request
/// admitted at the edge of Spillway's window cannot reach Vertex while
/// that one is still in its.
pub fn ledger_window(q: &QuotaDefaults) -> Duration {
    Duration::from_secs(q.window_secs) + Duration::from_millis(q.window_margin_ms)
}

/// What upstream refusals teach, from the `quota.*` settings.
pub fn adaptive_config(q: &QuotaDefaults) -> AdaptiveConfig {
    AdaptiveConfig {
        headroom: q.headroom,
        cooldown_base: Duration::from_millis(q.cooldown_base_ms),
        cooldown_max: Duration::from_millis(q.cooldown_max_ms),
        probe_period: Duration::from_secs(q.window_secs),
    }
}

/// Opens the configured store over every bucket of `catalog`, each
/// (requester, location) pointing at its bucket. A shared store starts degraded (and keeps retrying) if Redis
/// does not answer, so a replica starts even while Redis is down; a
/// `rediss://` server whose certificate is not trusted stops start-up instead.
pub async fn open(
    q: &QuotaDefaults,
    catalog: &Catalog,
    registry: &prometheus::Registry,
) -> Result<Arc<dyn QuotaStore>, String> {
    let budgets: Vec<BudgetConfig> = catalog.budget_configs();
    let window = ledger_window(q);
    let adaptive = adaptive_config(q);
    match q.store {
        QuotaStoreKind::Memory => {
            // The store's series exist in every mode (one replica, never
            // degraded, no leases), so dashboards and alerts read the same.
            StoreMetrics::new(Some(registry)).replicas.set(1);
            Ok(Arc::new(MemoryStore::new(
                TokioClock {
                    epoch: tokio::time::Instant::now(),
                },
                window,
                adaptive,
                &budgets,
            )))
        }
        QuotaStoreKind::Redis => {
            let settings = RedisSettings {
                url: q.redis_url.clone(),
                key_prefix: q.redis_key_prefix.clone(),
                timeout: Duration::from_millis(q.redis_timeout_ms),
                window,
                adaptive,
                budgets,
                lease: Duration::from_millis(q.redis_lease_ms),
                ca_file: (!q.redis_ca_file.is_empty())
                    .then(|| std::path::PathBuf::from(&q.redis_ca_file)),
            };
            let store =
                ResilientStore::start(&settings, q.replicas, StoreMetrics::new(Some(registry)))
                    .await
                    .map_err(|e| match e {
                        StoreError::UntrustedCertificate { .. } => format!(
                            "{e}; quota.redis_ca_file must name the CA that signed it (trusted beside the system's roots)"
                        ),
                        e => e.to_string(),
                    })?;
            Ok(Arc::new(store))
        }
    }
}
