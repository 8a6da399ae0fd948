//! Assembling the gateway: state, router and layers, and serving it.
//!
//! The layering, outermost first: request id → (for API routes) client auth
//! → handler. Health endpoints sit outside auth so probes need no key.

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{middleware, Router};
use spillway_core::Catalog;
use tokio::net::TcpListener;

use crate::auth::{require_tenant, KeyRing};
use crate::config::Settings;
use crate::routes;
use crate::upstream::{Upstream, UpstreamInitError};

/// What every handler shares. Built once; immutable while serving.
#[derive(Debug)]
pub struct AppState {
    pub settings: Settings,
    pub catalog: Catalog,
    pub upstream: Upstream,
    pub keys: Arc<KeyRing>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("config: {0}")]
    Config(String),
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamInitError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
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
        let keys = Arc::new(KeyRing::from_settings(&settings));
        Ok(Self {
            state: Arc::new(AppState {
                settings,
                catalog,
                upstream,
                keys,
            }),
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
            .route_layer(middleware::from_fn_with_state(
                state.keys.clone(),
                require_tenant,
            ));
        Router::new()
            .route("/healthz", get(routes::healthz))
            .route("/readyz", get(routes::readyz))
            .merge(api)
            .fallback(routes::not_found)
            .method_not_allowed_fallback(routes::method_not_allowed)
            // Handlers enforce the configured limit themselves, with an
            // Anthropic-shaped 413, so axum's 2 MB default must not interfere.
            .layer(DefaultBodyLimit::disable())
            .layer(middleware::from_fn(crate::request_id::assign_request_id))
            .with_state(state)
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
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}
