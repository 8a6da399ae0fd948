//! The provider seam: where a call goes once it has quota.
//!
//! A [`Provider`] turns a client's Messages body into the body its API
//! expects ([`Provider::encode`]) and sends one attempt to one of its
//! locations ([`Provider::send`]); the forwarder interprets the answer
//! (status, body, stream) the same way for every provider. The catalog names
//! each location's provider (`RegionBudget::provider`), and [`Providers`]
//! finds it by that name, so adding a provider is a new module here and a
//! line where the gateway is built, not a branch in the request path.
//!
//! [`vertex`] is the first provider: Vertex AI's Anthropic endpoints with
//! Google credentials. [`anthropic`] is Anthropic's own API, an *overflow*
//! provider: a model's `overflow` locations are tried only when no Vertex
//! location can admit a request in time, for tenants that allow it. Three
//! rules bind every provider:
//! - **Hosts come only from config.** A URL is built from configured parts
//!   and catalog ids; nothing a client sends can name a host, and redirects
//!   are never followed.
//! - **No total timeout.** A stream may run for many minutes, so only
//!   connecting and each read are bounded.
//! - **Credentials stay inside the provider.** They are attached at the last
//!   moment, marked sensitive, never logged; the client's own key was
//!   removed by the auth layer before the call was built.

pub mod anthropic;
pub mod client;
pub mod vertex;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use serde_json::{Map, Value};
use spillway_core::bucket::RateLimitReport;
use spillway_core::ModelId;
use spillway_vertex::Operation;

use crate::answer::ForwardError;

pub use anthropic::Anthropic;
pub use vertex::{upstream_client, UpstreamInitError, Vertex};

pub type ProviderFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ForwardError>> + Send + 'a>>;

/// One attempt, as the forwarder hands it to a provider.
#[derive(Debug, Clone)]
pub struct ProviderRequest<'a> {
    /// A location of this provider, from the catalog.
    pub location: &'a str,
    pub model: &'a ModelId,
    pub op: Operation,
    /// The client asked for server-sent events.
    pub stream: bool,
    /// What [`Provider::encode`] made of the client's body.
    pub body: Bytes,
    /// The client's `anthropic-beta`, the one client header forwarded.
    pub beta: Option<HeaderValue>,
}

/// An upstream API that serves Claude.
pub trait Provider: Send + Sync + 'static {
    /// The request body this provider expects, from the client's
    /// validated Messages (or count_tokens) body.
    fn encode(&self, body: Map<String, Value>, op: Operation, model: &ModelId) -> Bytes;
    /// Sends one attempt. Any HTTP answer is `Ok` (the forwarder reads
    /// error statuses and bodies); transport failures and missing
    /// credentials are `Err`.
    fn send<'a>(&'a self, request: ProviderRequest<'a>) -> ProviderFuture<'a, reqwest::Response>;
    /// Whether the provider can serve now (credentials obtainable).
    fn ready(&self) -> ProviderFuture<'_, ()>;
    /// The provider rejected the gateway's own credentials (401/403): get
    /// fresh ones (a rotated key, a revoked token) before the one retry.
    fn refresh_credentials(&self) -> ProviderFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// What an operator should check when the provider refuses the
    /// gateway's own credentials (401/403), for the log line that says so.
    fn credentials_rejected(&self) -> &'static str {
        "the upstream rejected the gateway's credentials: check them"
    }
    /// When `error` says the provider does not serve the model to the
    /// gateway there (not the client's fault: its setup), what the
    /// operator should fix; the location is then routed around for a while.
    fn model_missing(&self, _error: &spillway_vertex::UpstreamError) -> Option<ModelMissing> {
        None
    }
    /// What an answer's headers say about the provider's own rate limits
    /// (Anthropic's `anthropic-ratelimit-*`), for its budget to learn
    /// from; `None` for a provider that sends none (Vertex).
    fn rate_limits(&self, _headers: &http::HeaderMap) -> Option<RateLimitReport> {
        None
    }
}

/// A provider's name as a static label (`x-spillway-provider`, metrics):
/// providers are modules of this crate, so their names are a closed set.
pub fn provider_label(name: &str) -> &'static str {
    match name {
        spillway_core::VERTEX_PROVIDER => spillway_core::VERTEX_PROVIDER,
        crate::config::ANTHROPIC_PROVIDER => crate::config::ANTHROPIC_PROVIDER,
        _ => "other",
    }
}

/// A provider's answer that it does not serve a model to the gateway.
#[derive(Debug, Clone, Copy)]
pub struct ModelMissing {
    /// What the client is told, after the model id ("… is not enabled for
    /// the gateway's project there").
    pub reason: &'static str,
    /// What the operator should fix, for the log line.
    pub fix: &'static str,
}

/// The configured providers, by the name the catalog uses.
#[derive(Clone, Default)]
pub struct Providers(HashMap<String, Arc<dyn Provider>>);

impl Providers {
    pub fn with(mut self, name: &str, provider: Arc<dyn Provider>) -> Self {
        self.0.insert(name.to_string(), provider);
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.0.get(name)
    }

    /// Ready when every provider is.
    pub async fn ready(&self) -> Result<(), ForwardError> {
        for provider in self.0.values() {
            provider.ready().await?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}
