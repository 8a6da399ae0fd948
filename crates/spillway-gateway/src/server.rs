//! Assembling the gateway: state, router and layers, and serving it.
//!
//! The layering, outermost first: the observer (request id, one record per
//! request) → client limits (head size, body pacing) → the shutdown cut →
//! (for API routes) client auth → handler. Health endpoints sit outside
//! auth so probes need no key; so do the live page's static files
//! (`admin_page`), which hold no data. Connections themselves (how many, header
//! timeouts, shutdown) are `connections`' business. Each surface's handlers get the state
//! they need (`AppState`, or the batch API's own `BatchApi`), so no module
//! below this one needs to know how the gateway is put together.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{middleware, Router};
use tokio::net::TcpListener;

use crate::auth::{require_tenant, KeyRing, Keys};
use crate::batch::api::BatchApi;
use crate::config::Settings;
use crate::forwarder::Forwarder;
use crate::metrics::{Metrics, Snapshot};
use crate::observer::observe_requests;
use crate::routes;
use crate::state::AppState;
use crate::upstream::{Anthropic, Providers, UpstreamInitError, Vertex};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("config: {0}")]
    Config(String),
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamInitError),
    #[error("batch store: {0}")]
    Batch(String),
    #[error("quota store: {0}")]
    QuotaStore(String),
    #[error("listener TLS: {0}")]
    Tls(#[from] crate::listener_tls::TlsSetupError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// `GET /metrics`: Prometheus exposition. Store-backed state comes from
/// the last snapshot when a store is slow (`snapshots`); everything else
/// is read now.
async fn metrics_handler(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
) -> impl axum::response::IntoResponse {
    let scheduler = state.forwarder.scheduler();
    let budgets = crate::admin::read_budgets(&state).await;
    let batches = crate::admin::read_batches(&state).await;
    let queues = state
        .forwarder
        .catalog()
        .requesters()
        .into_iter()
        .map(|group| {
            let (interactive, batch) = scheduler.queue_depth(group);
            (group.as_str(), interactive, batch)
        })
        .collect();
    // The oldest batch's age is read now, not when its snapshot was taken.
    let now_ms = state.batches.as_ref().map_or(0, |service| service.now_ms());
    let batch_counts = batches.as_ref().map(|b| crate::metrics::BatchSnapshot {
        batches: b.value.batches.clone(),
        processing: b.value.open_items,
        completed: b.value.completed.clone(),
        oldest: b.value.oldest_running.map(|p| crate::metrics::OldestBatch {
            age_secs: (now_ms - p.created_at).max(0) as f64 / 1000.0,
            requests: [
                ("processing", p.processing()),
                ("succeeded", p.succeeded),
                ("errored", p.errored),
                ("canceled", p.canceled),
                ("expired", p.expired),
            ],
        }),
    });
    let shares = scheduler.shares();
    let spend = spend_samples(&state);
    let no_budgets = Vec::new();
    let text = state.metrics.render(Snapshot {
        budgets: budgets.as_ref().map_or(&no_budgets, |b| &b.value),
        queues,
        batches: batch_counts,
        shares: &shares,
        spend,
    });
    (
        [(http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        text,
    )
}

/// Each tracked tenant's spend and caps, in dollars, for a scrape.
fn spend_samples(state: &AppState) -> Vec<crate::metrics::TenantSpendSample> {
    use spillway_core::spend::usd_of_nanodollars;
    let keys = state.keys.current();
    state
        .spend
        .totals()
        .into_iter()
        .map(|t| {
            let caps = keys
                .tenants()
                .find(|k| k.name == t.tenant)
                .map(|k| k.policy.spend_caps)
                .unwrap_or_default();
            crate::metrics::TenantSpendSample {
                tenant: t.tenant.to_string(),
                day_usd: usd_of_nanodollars(t.day),
                month_usd: usd_of_nanodollars(t.month),
                cap_day_usd: caps.per_day.map(usd_of_nanodollars),
                cap_month_usd: caps.per_month.map(usd_of_nanodollars),
            }
        })
        .collect()
}

/// A gateway ready to serve.
pub struct Gateway {
    state: Arc<AppState>,
}

impl Gateway {
    /// Builds the gateway with the providers the config names (Vertex, and
    /// Anthropic where `[providers.anthropic]` is configured).
    pub async fn new(settings: Settings) -> Result<Self, StartError> {
        let vertex = Vertex::from_settings(&settings.upstream).await?;
        let mut providers =
            Providers::default().with(spillway_core::VERTEX_PROVIDER, Arc::new(vertex));
        if let Ok(catalog) = settings.catalog() {
            if let Some(anthropic) = Anthropic::from_settings(&settings, &catalog)? {
                providers = providers.with(crate::config::ANTHROPIC_PROVIDER, Arc::new(anthropic));
            }
        }
        Self::with_providers(settings, providers).await
    }

    /// Builds the gateway over the given providers, by the names the
    /// catalog's locations use.
    pub async fn with_providers(
        settings: Settings,
        providers: Providers,
    ) -> Result<Self, StartError> {
        settings
            .validate()
            .map_err(|e| StartError::Config(e.to_string()))?;
        // The stores' TLS clients take the process's provider: *ring*.
        crate::tls::install_crypto_provider();
        let catalog = settings
            .catalog()
            .map_err(|e| StartError::Config(e.to_string()))?;
        for model in catalog.models() {
            for (key, locations) in [("regions", &model.regions), ("overflow", &model.overflow)] {
                if let Some(r) = locations
                    .iter()
                    .find(|r| providers.get(&r.provider).is_none())
                {
                    return Err(StartError::Config(format!(
                        "models.{:?}.{key}: location {:?} names provider {:?}, which is not available",
                        model.id.as_str(),
                        r.region,
                        r.provider
                    )));
                }
            }
        }
        let metrics = Arc::new(Metrics::new());
        metrics.pre_register(
            &catalog
                .models()
                .iter()
                .map(|m| {
                    (
                        m.id.as_str(),
                        m.regions
                            .iter()
                            .chain(&m.overflow)
                            .map(|r| r.region.as_str())
                            .collect(),
                    )
                })
                .collect::<Vec<_>>(),
        );
        metrics.set_location_providers(catalog.models().iter().flat_map(|m| {
            m.regions
                .iter()
                .chain(&m.overflow)
                .map(|r| (r.region.as_str(), r.provider.as_str()))
        }));
        let listener_tls = crate::listener_tls::ListenerTls::from_settings(
            &settings.server,
            Some(metrics.tls_reloads.clone()),
        )?
        .map(Arc::new);
        let keys = Arc::new(Keys::new(
            KeyRing::from_settings(&settings).with_failure_counter(metrics.auth_failures.clone()),
        ));
        let admin_key_digest = hex::decode(&settings.admin.key_sha256)
            .ok()
            .and_then(|d| <[u8; 32]>::try_from(d).ok());
        let mut store = crate::quota_store::open(&settings.quota, &catalog, metrics.registry())
            .await
            .map_err(StartError::QuotaStore)?;
        if let Some(overflow) = crate::quota_store::open_overflow(&settings.quota, &catalog) {
            store = Arc::new(crate::quota_store::ProviderStores::new(store, overflow));
        }
        let telemetry = crate::telemetry::Telemetry::start(&settings, &catalog, &metrics)
            .map_err(StartError::Config)?;
        let batches = if settings.batch.enabled {
            let service = crate::batch::BatchService::open(&settings.batch)
                .await
                .map_err(|e| {
                    // Store errors name the batch store already.
                    let text = e.to_string();
                    StartError::Batch(text.strip_prefix("batch store: ").unwrap_or(&text).into())
                })?;
            Some(Arc::new(service))
        } else {
            None
        };
        let spend = Arc::new(open_spend(
            &settings,
            &catalog,
            batches.as_deref(),
            &metrics,
        )?);
        let forwarder = Arc::new(
            Forwarder::new(
                &settings,
                catalog,
                store,
                providers,
                Arc::clone(&metrics),
                Arc::clone(&spend),
            )
            .with_telemetry(telemetry),
        );
        let state = AppState {
            settings,
            forwarder,
            keys,
            admin_key_digest,
            metrics,
            batches,
            spend,
            snapshots: Default::default(),
            feed: Default::default(),
            started: tokio::time::Instant::now(),
            listener_tls,
        };
        let tenants = crate::spend::tenants_of(&state.settings);
        state.spend.track(&tenants);
        for tenant in &tenants {
            for model in state.forwarder.catalog().models() {
                if state.spend.has_prices(&model.id) {
                    for traffic in ["interactive", "batch"] {
                        state.metrics.spend_usd.with_label_values(&[
                            tenant,
                            model.id.as_str(),
                            traffic,
                        ]);
                    }
                }
            }
        }
        if state.spend.store_kind() == "memory"
            && state
                .settings
                .tenants
                .values()
                .any(|t| !t.spend_caps().is_empty())
        {
            tracing::warn!("spend caps are kept in memory only (batch.enabled = false and quota.store = \"memory\"): a restart starts every tenant's day and month from zero");
        }
        // Refusals start at zero for every capped period, so the first shows in rate().
        for tenant in state.keys.current().tenants() {
            for period in spillway_core::spend::Period::ALL {
                if tenant.policy.spend_caps.of(period).is_some() {
                    state
                        .metrics
                        .spend_cap_refusals
                        .with_label_values(&[&tenant.name, period.name()]);
                }
            }
        }
        if !state.spend.sync().await {
            tracing::warn!(
                store = state.spend.store_kind(),
                "spend totals could not be read at start: caps count only what this replica spends until the store answers"
            );
        }
        Ok(Self {
            state: Arc::new(state),
        })
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    pub fn router(&self) -> Router {
        let state = self.state.clone();
        let api = Router::new()
            .route("/v1/messages", post(routes::messages))
            .route("/v1/messages/count_tokens", post(routes::count_tokens))
            .route("/v1/models", get(crate::models::list))
            .route("/v1/models/{id}", get(crate::models::retrieve))
            .route(
                "/v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model_action}",
                post(routes::vertex_predict),
            )
            .merge(crate::batch::api::routes().with_state(Arc::new(BatchApi {
                service: state.batches.clone(),
                forwarder: Arc::clone(&state.forwarder),
                listen: state.settings.server.listen,
                scheme: if state.listener_tls.is_some() {
                    "https"
                } else {
                    "http"
                },
            })))
            .route_layer(middleware::from_fn_with_state(
                state.keys.clone(),
                require_tenant,
            ));
        let admin = Router::new()
            .route("/admin/quotas", get(crate::admin::quotas))
            .route(
                "/admin/quotas/{model}/{region}",
                axum::routing::put(crate::admin::set_quota),
            )
            .route("/admin/tenants", get(crate::admin::tenants))
            .route("/admin/shares", get(crate::admin::shares))
            .route("/admin/overview", get(crate::overview::overview))
            .route("/admin/events", get(crate::overview::events))
            .route("/admin/regions/{region}/drain", post(crate::admin::drain))
            .route(
                "/admin/regions/{region}/undrain",
                post(crate::admin::undrain),
            )
            .route_layer(middleware::from_fn_with_state(
                Arc::clone(&state),
                crate::admin::require_admin,
            ));
        Router::new()
            .route("/healthz", get(routes::healthz))
            .route("/readyz", get(routes::readyz))
            .route("/metrics", get(metrics_handler))
            .merge(api)
            .merge(admin)
            // The live page and its assets: public, they hold no data.
            .merge(crate::admin_page::routes())
            // The matched route template, for the observer's HTTP counter.
            .route_layer(middleware::from_fn(crate::observer::note_route))
            .fallback(routes::not_found)
            .method_not_allowed_fallback(routes::method_not_allowed)
            // Handlers enforce the configured limit themselves, with an
            // Anthropic-shaped 413, so axum's 2 MB default must not interfere.
            .layer(DefaultBodyLimit::disable())
            .layer(middleware::from_fn_with_state(
                self.state.forwarder.lifecycle().clone(),
                crate::lifecycle::cut_at_stop,
            ))
            .layer(middleware::from_fn_with_state(
                crate::client_limits::ClientLimits::from_settings(&self.state.settings.server),
                crate::client_limits::limit_clients,
            ))
            .layer(middleware::from_fn_with_state(
                self.state.forwarder.observer().clone(),
                observe_requests,
            ))
            .with_state(state)
    }

    /// Applies a re-read configuration (SIGHUP), keeping the ledgers.
    pub async fn reload(&self, settings: Settings) {
        crate::admin::reload(&self.state, settings).await;
    }

    /// Binds the configured address.
    pub async fn bind(&self) -> Result<TcpListener, StartError> {
        let addr = self.state.settings.server.listen;
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    }

    /// Serves on `listener` until `shutdown` resolves, then shuts down in
    /// the phases of [`Lifecycle`](crate::lifecycle::Lifecycle): not ready
    /// at once, no new connection after `server.shutdown_delay_ms`, what is
    /// still running cut at `server.shutdown_grace_ms`. Returns within the
    /// grace and one second, every reservation settled or refunded.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = &self.state;
        let life = state.forwarder.lifecycle().clone();
        let server = &state.settings.server;
        let grace = Duration::from_millis(server.shutdown_grace_ms);
        // When the signal came: what is left of the grace bounds the last
        // trace export.
        let signalled = Arc::new(std::sync::OnceLock::new());
        let phases = tokio::spawn({
            let life = life.clone();
            let delay = Duration::from_millis(server.shutdown_delay_ms);
            let signalled = Arc::clone(&signalled);
            let shutdown = async move {
                shutdown.await;
                let _ = signalled.set(tokio::time::Instant::now());
            };
            async move { life.run(shutdown, delay, grace).await }
        });
        // Batch items run beside the server; the runner stops claiming and
        // gives its leases back when connections close.
        let runner = state.batches.clone().map(|batches| {
            let forwarder = Arc::clone(&state.forwarder);
            let keys = Arc::clone(&state.keys);
            let life = life.clone();
            tokio::spawn(batches.run(forwarder, keys, async move { life.closing().await }))
        });
        // Spend is written to its store and read back every spend.sync_ms.
        let spend_sync = tokio::spawn({
            let spend = Arc::clone(&state.spend);
            let every = Duration::from_millis(state.settings.spend.sync_ms);
            let life = life.clone();
            async move { spend.run(every, async move { life.closing().await }).await }
        });
        // New certificate files are picked up for new connections until
        // the listener closes.
        if let (Some(tls), reload_ms) = (&state.listener_tls, server.tls_reload_ms) {
            if reload_ms > 0 {
                let life = life.clone();
                tokio::spawn(
                    Arc::clone(tls).watch(Duration::from_millis(reload_ms), async move {
                        life.closing().await
                    }),
                );
            }
        }
        let cut = crate::connections::serve(
            listener,
            self.router(),
            server,
            life.clone(),
            Arc::clone(&state.metrics),
            state.listener_tls.clone(),
        )
        .await;
        if let Some(runner) = runner {
            life.close();
            if tokio::time::timeout(RUNNER_STOP, runner).await.is_err() {
                tracing::warn!("shutdown: the batch runner did not stop in time; its leases expire on their own");
            }
        }
        let unsettled = state.forwarder.settled(SETTLE_AT_EXIT).await;
        // Every request is recorded by now: write the last spend. (The loop
        // stopped at closing; a sync of its still running is waited for, never
        // cut, so nothing it was writing is lost or written twice.)
        if tokio::time::timeout(SPEND_AT_EXIT, state.spend.sync())
            .await
            .is_err()
        {
            tracing::warn!("shutdown: the last spend sync did not finish in time; up to one sync of this replica's spend is not in the store");
        }
        spend_sync.abort();
        if let Some(telemetry) = state.forwarder.observer().telemetry() {
            // Within the grace and its second, whatever the collector does.
            let exit_by = signalled.get().map_or_else(
                || tokio::time::Instant::now() + TRACES_AT_EXIT,
                |at| *at + grace + EXIT_AFTER_GRACE,
            );
            let left = exit_by.saturating_duration_since(tokio::time::Instant::now());
            telemetry.shutdown(left.max(TRACES_AT_EXIT_MIN)).await;
        }
        phases.abort();
        if cut > 0 || unsettled > 0 {
            tracing::warn!(
                connections_cut = cut,
                settlements_unfinished = unsettled,
                "shutdown: done, with work cut"
            );
        } else {
            tracing::info!("shutdown: done");
        }
        Ok(())
    }
}

/// What is left of the second after the grace, once cut answers are out
/// (`connections::FLUSH_AFTER_STOP`): for the batch runner, then settlements.
const RUNNER_STOP: Duration = Duration::from_millis(250);
const SETTLE_AT_EXIT: Duration = Duration::from_millis(150);
const SPEND_AT_EXIT: Duration = Duration::from_millis(300);

/// Spend per tenant over the store the gateway already has: the quota
/// store's Redis when shared, else the batch store's database, else memory.
/// Its totals are read once before serving, so a restarted replica knows
/// what its tenants spent today before it admits anything.
fn open_spend(
    settings: &Settings,
    catalog: &spillway_core::Catalog,
    batches: Option<&crate::batch::BatchService>,
    metrics: &Arc<Metrics>,
) -> Result<crate::spend::Spend, StartError> {
    use crate::spend::{MemorySpendStore, RedisSpendStore, SpendStore};
    let store: Arc<dyn SpendStore> = match (settings.quota.store, batches) {
        (crate::config::QuotaStoreKind::Redis, _) => {
            let q = &settings.quota;
            let redis = spillway_redis::RedisSpend::new(
                &q.redis_url,
                &q.redis_key_prefix,
                Duration::from_millis(q.redis_timeout_ms.max(1000)),
                (!q.redis_ca_file.is_empty()).then(|| std::path::Path::new(&q.redis_ca_file)),
            )
            .map_err(|e| StartError::Config(format!("quota.redis_url: {e}")))?;
            Arc::new(RedisSpendStore(redis))
        }
        (_, Some(batches)) => Arc::new(crate::batch::store::BatchSpendStore(Arc::clone(
            batches.store(),
        ))),
        (_, None) => Arc::new(MemorySpendStore::default()),
    };
    let prices = catalog
        .models()
        .iter()
        .filter_map(|m| Some((m.id.clone(), m.prices?)))
        .collect();
    Ok(crate::spend::Spend::new(
        prices,
        store,
        crate::spend::SpendClock::new(),
        Arc::clone(metrics),
    ))
}
/// The last trace export: what is left of the grace and its second (less a
/// margin for the exit itself), or this long when no signal came (the
/// server's future ended otherwise), and never less than the minimum.
const EXIT_AFTER_GRACE: Duration = Duration::from_millis(950);
const TRACES_AT_EXIT: Duration = Duration::from_millis(500);
const TRACES_AT_EXIT_MIN: Duration = Duration::from_millis(20);
