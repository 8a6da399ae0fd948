//! Assembling the gateway: state, router and layers, and serving it.
//!
//! The layering, outermost first: request id → (for API routes) client auth
//! → handler. Health endpoints sit outside auth so probes need no key.

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{middleware, Router};
use std::time::Duration;

use spillway_core::adaptive::AdaptiveConfig;
use spillway_core::ledger::Limits;
use spillway_core::store::{BudgetConfig, Clock, MemoryStore, QuotaStore, Strategy};
use spillway_core::Catalog;
use tokio::net::TcpListener;

use crate::auth::{require_tenant, KeyRing, Keys};
use crate::config::{RoutingStrategy, Settings};
use crate::estimates::EstimateLearner;
use crate::metrics::{Metrics, Snapshot};
use crate::routes;
use crate::scheduler::Scheduler;
use crate::upstream::{Upstream, UpstreamInitError};

/// What every handler shares. Built once; the parts that change (budgets,
/// queues, estimate corrections) have their own interior locks.
pub struct AppState {
    pub settings: Settings,
    pub catalog: Catalog,
    pub upstream: Upstream,
    pub keys: Arc<Keys>,
    /// SHA-256 of the admin key; `None` disables the admin API.
    pub admin_key_digest: Option<[u8; 32]>,
    pub scheduler: Scheduler,
    pub estimates: EstimateLearner,
    pub strategy: Strategy,
    pub max_wait: Duration,
    pub max_wait_cap: Duration,
    pub max_attempts: u32,
    pub metrics: Arc<Metrics>,
    /// Batch jobs (store and runner); `None` when `batch.enabled = false`.
    pub batches: Option<Arc<crate::batch::BatchService>>,
    headroom: f64,
}

impl AppState {
    /// What a configured budget allows at most, headroom applied.
    pub fn quota_ceiling(&self, configured: &Limits) -> Limits {
        AdaptiveConfig {
            headroom: self.headroom,
            ..AdaptiveConfig::default()
        }
        .ceiling(*configured)
    }
}

/// The store's clock: tokio's, so tests on a paused clock are exact.
struct TokioClock {
    epoch: tokio::time::Instant,
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        tokio::time::Instant::now().duration_since(self.epoch)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("config: {0}")]
    Config(String),
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamInitError),
    #[error("batch store: {0}")]
    Batch(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// `GET /metrics`: Prometheus exposition, state gauges refreshed now.
async fn metrics_handler(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
) -> impl axum::response::IntoResponse {
    let budgets = state.scheduler.store().states().await;
    let queues = state
        .catalog
        .quota_groups()
        .into_iter()
        .map(|group| {
            let (interactive, batch) = state.scheduler.queue_depth(group);
            (group, interactive, batch)
        })
        .collect();
    let batches = match &state.batches {
        Some(service) => match service.snapshot().await {
            Ok(b) => Some(crate::metrics::BatchSnapshot {
                batches: b.batches,
                processing: b.open_items,
                completed: b.completed,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read batch state");
                None
            }
        },
        None => None,
    };
    let text = state.metrics.render(Snapshot {
        budgets: &budgets,
        queues,
        batches,
    });
    (
        [(http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        text,
    )
}

/// A gateway ready to serve.
pub struct Gateway {
    state: Arc<AppState>,
}

impl Gateway {
    pub async fn new(settings: Settings) -> Result<Self, StartError> {
        settings
            .validate()
            .map_err(|e| StartError::Config(e.to_string()))?;
        let catalog = settings
            .catalog()
            .map_err(|e| StartError::Config(e.to_string()))?;
        let upstream = Upstream::from_settings(&settings.upstream).await?;
        let metrics = Arc::new(Metrics::new());
        metrics.pre_register(
            &catalog
                .models()
                .iter()
                .map(|m| {
                    (
                        m.id.as_str(),
                        m.regions.iter().map(|r| r.region.as_str()).collect(),
                    )
                })
                .collect::<Vec<_>>(),
        );
        let keys = Arc::new(Keys::new(
            KeyRing::from_settings(&settings).with_failure_counter(metrics.auth_failures.clone()),
        ));
        let admin_key_digest = hex::decode(&settings.admin.key_sha256)
            .ok()
            .and_then(|d| <[u8; 32]>::try_from(d).ok());
        let q = &settings.quota;
        let window = Duration::from_secs(q.window_secs);
        let adaptive = AdaptiveConfig {
            headroom: q.headroom,
            cooldown_base: Duration::from_millis(q.cooldown_base_ms),
            cooldown_max: Duration::from_millis(q.cooldown_max_ms),
            probe_period: window,
        };
        let budgets: Vec<BudgetConfig> = catalog
            .budgets()
            .into_iter()
            .map(|(group, r)| BudgetConfig {
                model: group.to_string(),
                region: r.region.clone(),
                limits: r.limits,
            })
            .collect();
        let ledger_window = window + Duration::from_millis(q.window_margin_ms);
        let store: Arc<dyn QuotaStore> = match q.store {
            crate::shared_quota::QuotaStoreKind::Memory => {
                // The store's series exist in every mode (one replica, never
                // degraded, no leases), so dashboards and alerts read the same.
                spillway_redis::StoreMetrics::new(Some(metrics.registry()))
                    .replicas
                    .set(1);
                Arc::new(MemoryStore::new(
                    TokioClock {
                        epoch: tokio::time::Instant::now(),
                    },
                    ledger_window,
                    adaptive,
                    &budgets,
                ))
            }
            crate::shared_quota::QuotaStoreKind::Redis => {
                crate::shared_quota::open(q, ledger_window, adaptive, budgets, metrics.registry())
                    .await
                    .map_err(StartError::Config)?
            }
        };
        let models: Vec<Arc<str>> = catalog
            .models()
            .iter()
            .map(|m| Arc::from(m.id.as_str()))
            .collect();
        let scheduler = Scheduler::new(store, &models, settings.scheduler.max_queue)
            .with_decision_histogram(metrics.admission_seconds.clone());
        let estimates = EstimateLearner::new(&models, q.learn_estimates);
        let strategy = match q.strategy {
            RoutingStrategy::MostHeadroom => Strategy::MostHeadroom,
            RoutingStrategy::Ordered => Strategy::Ordered,
        };
        let batches = if settings.batch.enabled {
            let service = crate::batch::BatchService::open(&settings.batch)
                .await
                .map_err(|e| StartError::Batch(e.to_string()))?;
            Some(Arc::new(service))
        } else {
            None
        };
        let state = AppState {
            batches,
            max_wait: Duration::from_millis(settings.scheduler.max_wait_ms),
            max_wait_cap: Duration::from_millis(settings.scheduler.max_wait_cap_ms),
            max_attempts: settings.scheduler.max_attempts,
            headroom: q.headroom,
            metrics,
            strategy,
            estimates,
            scheduler,
            settings,
            catalog,
            upstream,
            keys,
            admin_key_digest,
        };
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
            .route(
                "/v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model_action}",
                post(routes::vertex_predict),
            )
            .merge(crate::batch::api::routes())
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
            .fallback(routes::not_found)
            .method_not_allowed_fallback(routes::method_not_allowed)
            // Handlers enforce the configured limit themselves, with an
            // Anthropic-shaped 413, so axum's 2 MB default must not interfere.
            .layer(DefaultBodyLimit::disable())
            .layer(middleware::from_fn_with_state(
                Arc::clone(&self.state.metrics),
                crate::request_id::assign_request_id,
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

    /// Serves on `listener` until `shutdown` resolves, then drains.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        use axum::serve::ListenerExt;
        // Small SSE events must not wait for the client's delayed ACK
        // (Nagle): that cost ~40 ms per stream in BENCHMARKS.md.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        // Batch items run beside the server and stop with it.
        let (stop_batches, batches_stopped) = tokio::sync::oneshot::channel::<()>();
        let runner = self.state.batches.clone().map(|batches| {
            tokio::spawn(batches.run(Arc::clone(&self.state), async {
                let _ = batches_stopped.await;
            }))
        });
        // `into_make_service`: each connection gets a clone of the built
        // router (one Arc). Serving the `Router` itself would rebuild its
        // route table for every connection (~8 KiB each, BENCHMARKS.md).
        let served = axum::serve(listener, self.router().into_make_service())
            .with_graceful_shutdown(shutdown)
            .await;
        let _ = stop_batches.send(());
        if let Some(runner) = runner {
            let _ = runner.await;
        }
        served
    }
}
