//! The quota store the gateway runs on: the in-memory one (exact for one
//! replica) or the shared one in Redis ([`spillway_redis::ResilientStore`]),
//! built from the catalog: one budget per bucket, (bucket group, location),
//! and each model's (requester, location) pointing at its bucket.
//!
//! Queues stay local to each replica; admission is global: every replica's
//! scheduler asks the same Redis ledgers, one function call per decision.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use spillway_core::adaptive::AdaptiveConfig;
use spillway_core::bucket::{RateLimitReport, TokenBucket};
use spillway_core::catalog::is_overflow_requester;
use spillway_core::ledger::Limits;
use spillway_core::store::{
    BudgetConfig, BudgetState, Clock, Denial, Grant, MemoryStore, Outcome, QuotaStore,
    ReserveRequest, StoreFuture,
};
use spillway_core::{Catalog, QuotaGroup};
use spillway_redis::{RedisSettings, ResilientStore, StoreError, StoreMetrics};

use crate::config::{QuotaDefaults, QuotaStoreKind};

/// The store's clock: tokio's, so tests on a paused clock are exact.
pub struct TokioClock {
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

/// The overflow store: one token bucket per (model, overflow location),
/// in this replica's memory, on Anthropic's terms ([`TokenBucket`]).
///
/// Local, not shared in Redis: each replica takes `1/N` of every overflow
/// limit (and of what the provider's headers say is left), N being the
/// replicas sharing the Vertex store ([`QuotaStore::replicas`]: configured,
/// or counted live), so the replicas together never exceed the provider's
/// bucket, without a round trip per overflow decision. Overflow is the rare
/// path; a replica with no overflow traffic leaves its part idle, the price
/// of that choice. `None` when no model overflows.
pub fn open_overflow(q: &QuotaDefaults, catalog: &Catalog) -> Option<OverflowStore> {
    let budgets = catalog.overflow_budget_configs();
    if budgets.is_empty() {
        return None;
    }
    let store = MemoryStore::buckets(
        TokioClock {
            epoch: tokio::time::Instant::now(),
        },
        Duration::from_secs(q.window_secs),
        adaptive_config(q),
        &budgets,
    );
    Some(OverflowStore {
        store: Arc::new(store),
        configured: Mutex::new(budgets),
    })
}

/// The overflow store and every overflow bucket's whole (undivided)
/// configured limits, to re-divide when the number of replicas changes.
pub struct OverflowStore {
    store: Arc<MemoryStore<TokioClock, TokenBucket>>,
    configured: Mutex<Vec<BudgetConfig>>,
}

impl OverflowStore {
    /// Splits every limit `replicas` ways, if it is not split so already.
    async fn split(&self, replicas: u32) {
        let replicas = replicas.max(1);
        if self.store.share() == replicas {
            return;
        }
        self.store.set_share(replicas);
        let configured = self
            .configured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for b in configured {
            self.store
                .set_configured(&b.bucket, &b.region, divided(b.limits, replicas))
                .await;
        }
    }

    /// Sets a bucket's whole limits (an operator's `PUT /admin/quotas`);
    /// this replica takes its part.
    async fn set_whole(&self, bucket: &QuotaGroup, region: &str, limits: Limits) -> bool {
        let known = {
            let mut configured = self.configured.lock().unwrap_or_else(|p| p.into_inner());
            let mut known = false;
            for b in configured
                .iter_mut()
                .filter(|b| b.bucket == *bucket && b.region == region)
            {
                b.limits = limits;
                known = true;
            }
            known
        };
        known
            && self
                .store
                .set_configured(bucket, region, divided(limits, self.store.share()))
                .await
    }
}

/// One replica's part of `limits`, split `replicas` ways (rounded down,
/// never to zero).
fn divided(limits: Limits, replicas: u32) -> Limits {
    let n = u64::from(replicas.max(1));
    let part = |v: u64| (v / n).max(1);
    Limits {
        requests: (limits.requests / replicas.max(1)).max(1),
        tokens: limits.tokens.map(part),
        input_tokens: limits.input_tokens.map(part),
        output_tokens: limits.output_tokens.map(part),
    }
}

/// The Vertex store and the overflow store behind one [`QuotaStore`], so
/// the scheduler queues, shares and wakes overflow requests exactly as it
/// does Vertex ones. Which store a question goes to is decided by who asks:
/// overflow requesters ([`spillway_core::catalog::is_overflow_requester`])
/// ask the overflow store, every other requester the Vertex one. Times the
/// overflow store gives (a retry time) are moved onto the Vertex store's
/// clock, the one the scheduler reads. Before each overflow decision the
/// overflow's limits are split among the Vertex store's replicas as they
/// are now ([`OverflowStore`]).
pub struct ProviderStores {
    vertex: Arc<dyn QuotaStore>,
    overflow: OverflowStore,
}

impl ProviderStores {
    pub fn new(vertex: Arc<dyn QuotaStore>, overflow: OverflowStore) -> Self {
        Self { vertex, overflow }
    }

    fn for_requester(&self, requester: &str) -> &dyn QuotaStore {
        if is_overflow_requester(requester) {
            self.overflow.store.as_ref()
        } else {
            self.vertex.as_ref()
        }
    }

    /// Before an overflow decision: the limits split as replicas are now.
    async fn split_for(&self, requester: &str) {
        if is_overflow_requester(requester) {
            self.overflow.split(self.vertex.replicas()).await;
        }
    }

    /// An overflow store time on the Vertex store's clock.
    fn to_vertex_time(&self, overflow_time: Duration) -> Duration {
        let ahead = overflow_time.saturating_sub(self.overflow.store.now());
        self.vertex.now() + ahead
    }

    fn denial(&self, requester: &str, denial: Denial) -> Denial {
        match denial {
            Denial::Later { retry_at } if is_overflow_requester(requester) => Denial::Later {
                retry_at: self.to_vertex_time(retry_at),
            },
            other => other,
        }
    }
}

impl QuotaStore for ProviderStores {
    fn now(&self) -> Duration {
        self.vertex.now()
    }

    fn recheck_after(&self) -> Option<Duration> {
        self.vertex.recheck_after()
    }

    fn reserve<'a>(
        &'a self,
        request: ReserveRequest<'a>,
    ) -> StoreFuture<'a, Result<Grant, Denial>> {
        Box::pin(async move {
            let group = request.group.as_str();
            self.split_for(group).await;
            self.for_requester(group)
                .reserve(request)
                .await
                .map_err(|d| self.denial(group, d))
        })
    }

    fn probe<'a>(&'a self, request: ReserveRequest<'a>) -> StoreFuture<'a, Result<(), Denial>> {
        Box::pin(async move {
            let group = request.group.as_str();
            self.split_for(group).await;
            self.for_requester(group)
                .probe(request)
                .await
                .map_err(|d| self.denial(group, d))
        })
    }

    fn settle<'a>(&'a self, grant: &'a Grant, outcome: Outcome) -> StoreFuture<'a, ()> {
        self.for_requester(grant.group.as_str())
            .settle(grant, outcome)
    }

    fn learn<'a>(&'a self, grant: &'a Grant, report: &'a RateLimitReport) -> StoreFuture<'a, ()> {
        self.for_requester(grant.group.as_str())
            .learn(grant, report)
    }

    fn states(&self) -> StoreFuture<'_, Vec<BudgetState>> {
        Box::pin(async move {
            let mut states = self.vertex.states().await;
            self.overflow.split(self.vertex.replicas()).await;
            states.extend(self.overflow.store.states().await);
            states
        })
    }

    fn set_configured<'a>(
        &'a self,
        group: &'a QuotaGroup,
        region: &'a str,
        limits: Limits,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            self.vertex.set_configured(group, region, limits).await
                || self.overflow.set_whole(group, region, limits).await
        })
    }

    fn set_drained<'a>(&'a self, region: &'a str, drained: bool) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            self.vertex.set_drained(region, drained).await
                + self.overflow.store.set_drained(region, drained).await
        })
    }

    fn replicas(&self) -> u32 {
        self.vertex.replicas()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use spillway_core::ledger::Charge;
    use spillway_core::store::Strategy;
    use spillway_core::{ModelSpec, RegionBudget};

    use super::*;

    /// A Vertex store whose replica count a test sets.
    struct Fleet {
        inner: MemoryStore<TokioClock, spillway_core::ledger::Ledger>,
        replicas: AtomicU32,
    }

    impl QuotaStore for Fleet {
        fn now(&self) -> Duration {
            self.inner.now()
        }
        fn reserve<'a>(
            &'a self,
            request: ReserveRequest<'a>,
        ) -> StoreFuture<'a, Result<Grant, Denial>> {
            self.inner.reserve(request)
        }
        fn probe<'a>(&'a self, request: ReserveRequest<'a>) -> StoreFuture<'a, Result<(), Denial>> {
            self.inner.probe(request)
        }
        fn settle<'a>(&'a self, grant: &'a Grant, outcome: Outcome) -> StoreFuture<'a, ()> {
            self.inner.settle(grant, outcome)
        }
        fn states(&self) -> StoreFuture<'_, Vec<BudgetState>> {
            self.inner.states()
        }
        fn set_configured<'a>(
            &'a self,
            group: &'a QuotaGroup,
            region: &'a str,
            limits: Limits,
        ) -> StoreFuture<'a, bool> {
            self.inner.set_configured(group, region, limits)
        }
        fn set_drained<'a>(&'a self, region: &'a str, drained: bool) -> StoreFuture<'a, usize> {
            self.inner.set_drained(region, drained)
        }
        fn replicas(&self) -> u32 {
            self.replicas.load(Ordering::Relaxed)
        }
    }

    fn catalog() -> Catalog {
        let id = "claude-3-haiku@20240307";
        Catalog::new(vec![ModelSpec {
            id: id.into(),
            aliases: Vec::new(),
            context_window: 200_000,
            chars_per_token: 3.5,
            regions: vec![RegionBudget::vertex("us-central1", Limits::new(60, 50_000))],
            quota_group: id.into(),
            cache_reads_count: true,
            prices: None,
            overflow: vec![RegionBudget {
                provider: "anthropic".into(),
                ..RegionBudget::vertex("anthropic", Limits::split(90, 90_000, 9_000))
            }],
        }])
        .unwrap()
    }

    fn overflow_limits(states: &[BudgetState]) -> (Limits, Limits) {
        let s = states.iter().find(|s| &*s.region == "anthropic").unwrap();
        (s.configured, s.effective)
    }

    /// Each replica takes its part of the overflow's limits, re-divided as
    /// replicas come and go; an operator's new limits are divided too.
    #[tokio::test(start_paused = true)]
    async fn the_overflow_is_split_among_the_replicas_there_are_now() {
        let q = crate::config::Settings::load_layers(&[crate::config::DEMO_TOML], &[], None)
            .unwrap()
            .quota;
        let catalog = catalog();
        let fleet = Arc::new(Fleet {
            inner: MemoryStore::new(
                TokioClock {
                    epoch: tokio::time::Instant::now(),
                },
                ledger_window(&q),
                adaptive_config(&q),
                &catalog.budget_configs(),
            ),
            replicas: AtomicU32::new(3),
        });
        let stores = ProviderStores::new(fleet.clone(), open_overflow(&q, &catalog).unwrap());
        let states = stores.states().await;
        assert_eq!(
            overflow_limits(&states),
            (
                Limits::split(30, 30_000, 3_000),
                Limits::split(30, 30_000, 3_000)
            )
        );
        // A fourth replica joined: the next overflow decision splits anew.
        fleet.replicas.store(4, Ordering::Relaxed);
        let model = &catalog.models()[0];
        let regions = [Arc::from("anthropic")];
        let grant = stores
            .reserve(ReserveRequest {
                group: &model.overflow_requester(),
                regions: &regions,
                charge: Charge {
                    input: 100,
                    output: 100,
                },
                strategy: Strategy::Ordered,
            })
            .await
            .unwrap();
        assert_eq!(grant.view.limits, Limits::split(22, 22_500, 2_250));
        // The Vertex store never saw it.
        let vertex = fleet.inner.states_now();
        assert!(vertex.iter().all(|s| &*s.region != "anthropic"));
        assert_eq!(vertex[0].usage.requests, 0);
        // An operator sets the whole bucket's limits: this replica takes a
        // quarter.
        let bucket = QuotaGroup::from("claude-3-haiku@20240307");
        assert!(
            stores
                .set_configured(&bucket, "anthropic", Limits::split(40, 40_000, 4_000))
                .await
        );
        let states = stores.states().await;
        assert_eq!(overflow_limits(&states).0, Limits::split(10, 10_000, 1_000));
    }
}
