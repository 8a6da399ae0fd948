//! Configuration: layered, validated once at start, then immutable.
//!
//! Layers, lowest first: the defaults compiled in from `config/default.toml`,
//! then each `--config` file, then environment variables named
//! `SPILLWAY__SECTION__KEY` (double underscores, because keys themselves
//! contain single ones). A bad configuration fails start-up, never later
//! on the request path, with every problem at once: each names its key, the
//! layer that set it, and for an enum the values it may take (`problems`,
//! `layers`). `serve`, `check-config` and a SIGHUP reload all load through
//! [`Settings::load_layers`], so they report the same.
//!
//! Secrets (the upstream static token, the batch store's and Redis's URLs,
//! the trace exporter's headers) never leave this module unredacted:
//! [`Settings::redacted_toml`] is what `spillway check-config` prints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::estimates::OutputReserve;
use serde::{Deserialize, Serialize};
use spillway_core::catalog::LocationKind;
use spillway_core::ledger::Limits;
use spillway_core::{Catalog, CatalogError, ModelSpec, QuotaGroup, RegionBudget, VERTEX_PROVIDER};

mod layers;
mod postgres_tls;
mod problems;
mod shared_quota;
mod telemetry;
use layers::Layers;
pub use postgres_tls::postgres_root_cert;
pub use problems::{Problem, Problems};
pub use shared_quota::QuotaStoreKind;
pub use telemetry::TelemetrySettings;

/// The defaults shipped with Spillway, embedded so the binary needs no files.
pub const DEFAULT_TOML: &str = include_str!("../../../../config/default.toml");
/// The demo overlay (simulated upstream, no client auth on loopback).
pub const DEMO_TOML: &str = include_str!("../../../../config/demo.toml");

/// Why a configuration was refused. Neither variant has a source: the
/// message is whole, so a printer that follows error chains shows it once.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read at all (a missing file, TOML syntax), so
    /// nothing in it could be checked.
    #[error("{0}")]
    Unreadable(String),
    /// Every problem found, each with its key and layer.
    #[error("{0}")]
    Invalid(Problems),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub quota: QuotaDefaults,
    pub scheduler: SchedulerSettings,
    #[serde(default)]
    pub admin: AdminSettings,
    /// Batch jobs (the Message Batches API).
    #[serde(default)]
    pub batch: BatchSettings,
    /// Keyed by Vertex model id, so a layer can add or change one model.
    pub models: BTreeMap<String, ModelSettings>,
    /// Keyed by tenant name.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantSettings>,
    /// How spend is kept (`spend`): prices are per model, caps per tenant.
    #[serde(default)]
    pub spend: SpendSettings,
    /// OpenTelemetry traces (off unless `otlp_endpoint` is set).
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// Providers other than Vertex (`[providers.anthropic]`), for models'
    /// `overflow`.
    #[serde(default)]
    pub providers: ProvidersSettings,
}

/// `[providers]`: the upstream APIs other than Vertex.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anthropic: Option<AnthropicSettings>,
}

/// `[providers.anthropic]`: Anthropic's own Messages API, as an overflow
/// provider.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnthropicSettings {
    /// Base URL; the only host this provider ever calls.
    #[serde(default = "default_anthropic_url")]
    pub url: String,
    /// The API key (`x-api-key`). A secret: prefer `api_key_env`.
    #[serde(default)]
    pub api_key: String,
    /// The environment variable holding the key when `api_key` is empty.
    #[serde(default = "default_anthropic_key_env")]
    pub api_key_env: String,
    /// The `anthropic-version` header sent with every call.
    #[serde(default = "default_anthropic_version")]
    pub version: String,
}

impl AnthropicSettings {
    /// The key: `api_key`, else the variable `api_key_env` names; empty if
    /// neither is set.
    pub fn key(&self) -> String {
        if !self.api_key.is_empty() {
            return self.api_key.clone();
        }
        std::env::var(&self.api_key_env).unwrap_or_default()
    }
}

impl std::fmt::Debug for AnthropicSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnthropicSettings")
            .field("url", &self.url)
            .field(
                "api_key",
                &if self.api_key.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("api_key_env", &self.api_key_env)
            .field("version", &self.version)
            .finish()
    }
}

fn default_anthropic_url() -> String {
    "https://api.anthropic.com".into()
}

fn default_anthropic_key_env() -> String {
    "ANTHROPIC_API_KEY".into()
}

fn default_anthropic_version() -> String {
    "2023-06-01".into()
}

/// The provider names `overflow` entries may use.
pub const ANTHROPIC_PROVIDER: &str = "anthropic";

/// `[spend]`: how often each replica writes its tenants' spend to the store
/// and reads everyone's back (the spend store is the quota store's Redis
/// with `quota.store = "redis"`, else the batch store's database).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpendSettings {
    /// Milliseconds between syncs with the store. A cap sees other
    /// replicas' spend at most about this late.
    pub sync_ms: u64,
}

impl Default for SpendSettings {
    fn default() -> Self {
        Self { sync_ms: 1000 }
    }
}

/// `[models."ID".prices]`: what Vertex bills for the model, in US dollars
/// per million tokens. Cache prices left out follow Anthropic's published
/// rule: 5-minute writes 1.25× input, 1-hour writes 2×, reads 0.1×.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSettings {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub cache_write_per_mtok: Option<f64>,
    pub cache_write_1h_per_mtok: Option<f64>,
    pub cache_read_per_mtok: Option<f64>,
    /// What regional and multi-region endpoints cost above `global`, as a
    /// fraction (Vertex: 0.1 for Claude 4.5 and later models).
    #[serde(default)]
    pub regional_premium: f64,
}

impl PriceSettings {
    /// Each price by its key, the cache prices filled in by the rule.
    fn by_key(&self) -> [(&'static str, f64); 5] {
        let input = self.input_per_mtok;
        [
            ("input_per_mtok", input),
            ("output_per_mtok", self.output_per_mtok),
            (
                "cache_write_per_mtok",
                self.cache_write_per_mtok.unwrap_or(input * 1.25),
            ),
            (
                "cache_write_1h_per_mtok",
                self.cache_write_1h_per_mtok.unwrap_or(input * 2.0),
            ),
            (
                "cache_read_per_mtok",
                self.cache_read_per_mtok.unwrap_or(input * 0.1),
            ),
        ]
    }

    /// The prices, or the key of the first that is not a price.
    pub fn model_prices(&self) -> Result<spillway_core::spend::ModelPrices, &'static str> {
        use spillway_core::spend::{ModelPrices, Price, Prices};
        let mut prices = [Price::default(); 5];
        for (slot, (key, usd)) in prices.iter_mut().zip(self.by_key()) {
            *slot = Price::from_usd_per_mtok(usd).ok_or(key)?;
        }
        if !(0.0..=1.0).contains(&self.regional_premium) {
            return Err("regional_premium");
        }
        let [input, output, cache_write_5m, cache_write_1h, cache_read] = prices;
        Ok(ModelPrices::with_regional_premium(
            Prices {
                input,
                output,
                cache_write_5m,
                cache_write_1h,
                cache_read,
            },
            self.regional_premium,
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    ApiKey,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Human,
    Json,
}

/// The HTTP library's own head limits sit above these, so Spillway's
/// (Anthropic-shaped) answers are the ones clients meet: see `connections`.
pub const MAX_HEADERS_LIMIT: usize = 400;
pub const MAX_HEADER_BYTES_LIMIT: usize = 256 * 1024;
/// hyper refuses targets of 65534 bytes and more on its own.
pub const MAX_URI_BYTES_LIMIT: usize = 60 * 1024;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub auth: ClientAuth,
    pub log_format: LogFormat,
    /// Slow clients (`client_limits`, `connections`): the request head must
    /// arrive within this long of its first byte.
    pub header_read_timeout_ms: u64,
    /// A connection with nothing in flight that sends nothing for this long
    /// is closed (longer than clients' pool idle times, so they close first).
    pub idle_timeout_ms: u64,
    pub body_idle_timeout_ms: u64,
    pub body_timeout_ms: u64,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    /// Client connections open at once; past it, 503 `overloaded_error`.
    /// Clamped at start to what the open-file limit allows.
    pub max_connections: usize,
    /// Shutdown (`lifecycle`): not ready at once, new connections refused
    /// after the delay, in-flight cut after the grace (both from the signal).
    pub shutdown_delay_ms: u64,
    pub shutdown_grace_ms: u64,
    /// TLS on the listener (`listener_tls`): PEM certificate chain and
    /// private key, both or neither; empty: plain HTTP.
    #[serde(default)]
    pub tls_cert: String,
    #[serde(default)]
    pub tls_key: String,
    /// How often the certificate files are read for a change (a new pair
    /// is loaded for new connections); 0: only on SIGHUP.
    #[serde(default = "default_tls_reload_ms")]
    pub tls_reload_ms: u64,
    /// PEM CA certificates that client certificates must chain to; empty:
    /// no client certificates are asked for.
    #[serde(default)]
    pub tls_client_ca: String,
    /// Whether a client certificate is asked for (`optional`) or required
    /// in the handshake; `none` unless `tls_client_ca` is set.
    #[serde(default)]
    pub client_cert: ClientCertMode,
}

fn default_tls_reload_ms() -> u64 {
    1000
}

/// Whether the TLS listener asks clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientCertMode {
    /// Not asked for.
    #[default]
    None,
    /// Asked for; a client without one may still use an API key.
    Optional,
    /// The handshake fails without a certificate the CA signed.
    Required,
}

impl ServerSettings {
    /// Whether the listener speaks TLS.
    pub fn tls(&self) -> bool {
        !self.tls_cert.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamAuth {
    Gcp,
    Static,
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    pub project: String,
    pub regional_url: String,
    pub global_url: String,
    #[serde(default)]
    pub multi_region_urls: BTreeMap<String, String>,
    pub auth: UpstreamAuth,
    pub key_file: String,
    pub token: String,
    pub connect_timeout_ms: u64,
    pub read_timeout_ms: u64,
    pub pool_idle_timeout_ms: u64,
    pub pool_max_idle_per_host: usize,
    pub drop_vertex_events: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingStrategy {
    MostHeadroom,
    Ordered,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaDefaults {
    pub requests_per_min: u32,
    /// The combined input + output limit of a location that sets none and
    /// has no split limit (its own or these defaults'): see
    /// [`Settings::catalog`].
    pub tokens_per_min: u64,
    /// Vertex's split quotas, when a project has them: the default of every
    /// location that sets none.
    pub input_tokens_per_min: Option<u64>,
    pub output_tokens_per_min: Option<u64>,
    pub window_secs: u64,
    /// Added to the window so a request admitted just after an old one left
    /// Spillway's window cannot reach Vertex while that one is still in its.
    pub window_margin_ms: u64,
    pub headroom: f64,
    pub strategy: RoutingStrategy,
    pub cooldown_base_ms: u64,
    pub cooldown_max_ms: u64,
    /// Characters per token when a model sets none.
    pub chars_per_token: f64,
    /// Learn each model's input rates and margins from actual usage.
    pub learn_estimates: bool,
    /// The quantile of recent estimate errors (and of recent output
    /// lengths) that is reserved: 0.95 holds enough for 19 requests in 20.
    #[serde(default = "default_estimate_margin")]
    pub estimate_margin: f64,
    /// `learned` (expected output) or `max_tokens`.
    #[serde(default)]
    pub output_reserve: OutputReserve,
    /// Ask Vertex's `count-tokens` for the exact input of requests
    /// estimated at this many tokens or more, where the count can change
    /// the admission decision; absent: never.
    #[serde(default)]
    pub count_tokens_above: Option<u64>,
    /// The longest a `count-tokens` call may take before the estimate is
    /// used instead.
    #[serde(default = "default_count_tokens_timeout_ms")]
    pub count_tokens_timeout_ms: u64,
    /// Where the ledgers live: `memory` (one replica) or `redis` (shared).
    #[serde(default)]
    pub store: QuotaStoreKind,
    /// `redis://host:port[/db]` when `store = "redis"` (a secret: redacted);
    /// `rediss://` for TLS.
    #[serde(default)]
    pub redis_url: String,
    /// A PEM file of CA certificates trusted for a `rediss://` server, in
    /// addition to the system's roots.
    #[serde(default)]
    pub redis_ca_file: String,
    #[serde(default = "shared_quota::default_key_prefix")]
    pub redis_key_prefix: String,
    /// Longest wait for Redis on the admission path before failing over.
    #[serde(default = "shared_quota::default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    /// How long a lease of shared budget lets a busy replica admit without
    /// a round trip to Redis; 0 turns leases off (`spillway-redis` lease.rs).
    #[serde(default = "shared_quota::default_redis_lease_ms")]
    pub redis_lease_ms: u64,
    /// N for the local 1/N share while Redis is down; 0 = live replicas.
    #[serde(default)]
    pub replicas: u32,
}

fn default_estimate_margin() -> f64 {
    0.95
}

fn default_count_tokens_timeout_ms() -> u64 {
    1000
}

fn default_reserve_min() -> f64 {
    0.05
}

fn default_reserve_max() -> f64 {
    0.9
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Hex SHA-256 of the admin key (`spillway hash-key`); empty disables
    /// the admin API.
    #[serde(default)]
    pub key_sha256: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSettings {
    /// How long a request may wait for quota when neither the request
    /// (`x-spillway-max-wait-ms`) nor its tenant says.
    pub max_wait_ms: u64,
    /// The most any request may ask to wait.
    pub max_wait_cap_ms: u64,
    /// Waiting requests per model; beyond it, 429 at once.
    pub max_queue: usize,
    /// Upstream attempts per request (fallbacks included).
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStoreKind {
    Sqlite,
    Postgres,
}

/// `[batch]`: batch jobs, their store and how hard they drain idle quota.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSettings {
    /// Serve the Message Batches API and run batches.
    pub enabled: bool,
    /// "sqlite" (embedded, one replica) or "postgres" (several replicas).
    pub store: BatchStoreKind,
    /// SQLite file, created on first start; ":memory:" keeps batches in
    /// memory (not durable: for the demo and tests).
    pub sqlite_path: String,
    /// `postgres://user:password@host:port/database` (a secret: redacted).
    pub postgres_url: String,
    pub postgres_max_connections: u32,
    /// Batch items in flight at once (waiting for quota or upstream).
    pub concurrency: usize,
    /// Upstream attempts per item (each with the forwarder's own region fallback)
    /// before it is recorded `errored`. Waiting for quota is not an attempt.
    pub max_item_attempts: u32,
    /// Backoff between attempts: base · 2^(attempt-1), at most max, jittered.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Days an ended batch's results are kept before it is purged.
    pub retention_days: u32,
    /// Base of `results_url`, e.g. `https://spillway.internal`; empty: the
    /// listen address (or the request's Host when listening on 0.0.0.0 or port 0).
    pub public_url: String,
    /// The least and the most of each model's pool batch work leaves to
    /// interactive traffic (fractions); between them, what interactive
    /// demand asks for, with a small margin.
    #[serde(default = "default_reserve_min")]
    pub interactive_reserve_min: f64,
    #[serde(default = "default_reserve_max")]
    pub interactive_reserve_max: f64,
    /// Requests in one batch (Anthropic: 100,000).
    pub max_requests: usize,
    /// Bytes in one batch upload (Anthropic: 256 MB).
    pub max_body_bytes: u64,
    /// How long a claimed item stays with this process without renewal.
    pub lease_secs: u64,
    /// How often an idle runner looks for work (new batches wake it at once).
    pub poll_ms: u64,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            store: BatchStoreKind::Sqlite,
            sqlite_path: "spillway-batches.sqlite3".into(),
            postgres_url: String::new(),
            postgres_max_connections: 8,
            concurrency: 32,
            max_item_attempts: 5,
            retry_base_ms: 1_000,
            retry_max_ms: 60_000,
            retention_days: 29,
            public_url: String::new(),
            interactive_reserve_min: default_reserve_min(),
            interactive_reserve_max: default_reserve_max(),
            max_requests: 100_000,
            max_body_bytes: 256_000_000,
            lease_secs: 30,
            poll_ms: 1_000,
        }
    }
}

impl BatchSettings {
    /// Defaults with an in-memory store (unit tests).
    pub fn for_tests() -> Self {
        Self {
            sqlite_path: ":memory:".into(),
            ..Self::default()
        }
    }

    fn check(&self, max_queue: usize, p: &mut Problems) {
        if !self.enabled {
            return;
        }
        match self.store {
            BatchStoreKind::Sqlite if self.sqlite_path.trim().is_empty() => {
                p.add("batch.sqlite_path", "must name a file (or \":memory:\")");
            }
            BatchStoreKind::Postgres
                if !(self.postgres_url.starts_with("postgres://")
                    || self.postgres_url.starts_with("postgresql://")) =>
            {
                p.add(
                    "batch.postgres_url",
                    "batch.store is \"postgres\": give a postgres://user@host/database URL",
                );
            }
            BatchStoreKind::Postgres => postgres_tls::check(&self.postgres_url, p),
            _ => {}
        }
        if self.concurrency == 0 || self.concurrency >= max_queue {
            p.add(
                "batch.concurrency",
                format!(
                    "must be 1 to {} (below scheduler.max_queue)",
                    max_queue.saturating_sub(1)
                ),
            );
        }
        if self.max_item_attempts == 0 {
            p.add("batch.max_item_attempts", "must be at least 1");
        }
        if self.retry_base_ms == 0 || self.retry_max_ms < self.retry_base_ms {
            p.add(
                "batch.retry_base_ms",
                "must be positive and at most batch.retry_max_ms",
            );
        }
        if self.retention_days == 0 {
            p.add("batch.retention_days", "must be at least 1");
        }
        if self.max_requests == 0 || self.max_body_bytes < 1024 {
            p.add(
                "batch.max_requests",
                "max_requests must be positive and max_body_bytes at least 1024",
            );
        }
        if self.lease_secs < 3 {
            p.add("batch.lease_secs", "must be at least 3");
        }
        if self.postgres_max_connections == 0 || self.poll_ms == 0 {
            p.add(
                "batch.poll_ms",
                "poll_ms and postgres_max_connections must be positive",
            );
        }
        if !self.public_url.is_empty() {
            match self.public_url.parse::<http::Uri>() {
                Err(e) => p.add("batch.public_url", format!("not a URL: {e}")),
                Ok(uri)
                    if !matches!(uri.scheme_str(), Some("http" | "https"))
                        || uri.host().is_none() =>
                {
                    p.add(
                        "batch.public_url",
                        "must be an http:// or https:// URL with a host",
                    );
                }
                Ok(_) => {}
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default = "default_context_window")]
    pub context_window: u64,
    pub chars_per_token: Option<f64>,
    #[serde(default)]
    pub regions: Vec<RegionSettings>,
    /// The model's Vertex lineage (`anthropic-claude-sonnet`): models naming
    /// one group share one bucket on `global` and on each multi-region
    /// (`us`, `eu`); on regional endpoints each keeps its own.
    pub quota_group: Option<String>,
    /// Whether cache reads count toward the input-token quota; unset: by
    /// model family (`claude-3-*` but 3.7: yes; later models: no).
    pub cache_reads_count: Option<bool>,
    /// What Vertex bills for the model; unset: the model has no spend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prices: Option<PriceSettings>,
    /// Other providers to overflow to when no Vertex location can admit a
    /// request before its deadline (tenants with `allow_overflow` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overflow: Vec<OverflowSettings>,
}

/// One `overflow` entry of a model: a provider and the limits it grants.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OverflowSettings {
    /// `anthropic`.
    pub provider: String,
    /// The provider's id for the model; unset: derived from the Vertex id
    /// (`claude-3-haiku@20240307` → `claude-3-haiku-20240307`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The provider's limits for the model (Anthropic's RPM, ITPM, OTPM for
    /// the organisation's tier). Learned lower from its headers if they are.
    pub requests_per_min: u32,
    pub input_tokens_per_min: u64,
    pub output_tokens_per_min: u64,
}

impl OverflowSettings {
    /// The provider's id for `vertex_id`.
    pub fn provider_model(&self, vertex_id: &str) -> String {
        self.model
            .clone()
            .unwrap_or_else(|| spillway_vertex::vertex_to_anthropic_id(vertex_id))
    }
}

fn default_context_window() -> u64 {
    200_000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSettings {
    /// A Vertex location: `global`, a multi-region (`us`, `eu`) or a region
    /// (`us-east5`); any name for another provider's location.
    pub name: String,
    /// Which upstream provider serves this location; `vertex` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    pub requests_per_min: Option<u32>,
    pub tokens_per_min: Option<u64>,
    pub input_tokens_per_min: Option<u64>,
    pub output_tokens_per_min: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// Hex SHA-256 of the client's key; the key itself is never stored.
    /// Empty: the tenant has no key (it is known by a client certificate).
    #[serde(default)]
    pub key_sha256: String,
    /// SHA-256 fingerprints of the client certificates that are this
    /// tenant (hex, `openssl x509 -fingerprint -sha256` colons allowed),
    /// over a TLS listener with `server.tls_client_ca`.
    #[serde(default)]
    pub client_cert_sha256: Vec<String>,
    /// Share of contended quota relative to other tenants.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Default wait for quota for this tenant's requests.
    pub max_wait_ms: Option<u64>,
    /// Regions this tenant's requests may use (data residency); empty: any.
    #[serde(default)]
    pub regions: Vec<String>,
    /// Optional caps on what this tenant may use, across all regions.
    pub requests_per_min: Option<u32>,
    pub tokens_per_min: Option<u64>,
    /// Optional spend caps in US dollars per UTC day and per UTC month: a
    /// request arriving once the tenant's spend reached one gets 429 until
    /// the period ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_cap_usd_per_day: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_cap_usd_per_month: Option<f64>,
    /// The tenant's requests may overflow to other providers (see models'
    /// `overflow`): off unless set. With `regions` set, the provider must
    /// be listed there too (`regions = ["europe-west4", "anthropic"]`).
    #[serde(default)]
    pub allow_overflow: bool,
}

impl TenantSettings {
    /// The spend caps in nanodollars (validated positive).
    pub fn spend_caps(&self) -> spillway_core::spend::SpendCaps {
        use spillway_core::spend::nanodollars_of_usd;
        spillway_core::spend::SpendCaps {
            per_day: self.spend_cap_usd_per_day.and_then(nanodollars_of_usd),
            per_month: self.spend_cap_usd_per_month.and_then(nanodollars_of_usd),
        }
    }
}

fn default_weight() -> f64 {
    1.0
}

impl Settings {
    /// Loads defaults, then `files` in order, then `SPILLWAY__*` variables.
    pub fn load(files: &[PathBuf]) -> Result<Self, ConfigError> {
        Self::load_layers(&[], files, None)
    }

    /// Like [`Settings::load`] with extra TOML text layered right above the
    /// defaults (the demo overlay) and, for tests, an explicit environment.
    pub fn load_layers(
        overlays: &[&str],
        files: &[PathBuf],
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        use config::{Environment, File, FileFormat};
        let mut builder =
            config::Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        for overlay in overlays {
            builder = builder.add_source(File::from_str(overlay, FileFormat::Toml));
        }
        for file in files {
            builder = builder.add_source(File::from(file.as_path()).format(FileFormat::Toml));
        }
        // Read once, so the layer that names a problem's origin is the
        // environment the settings came from.
        let env_vars = env.unwrap_or_else(|| std::env::vars().collect());
        let environment = Environment::with_prefix("SPILLWAY")
            .separator("__")
            .try_parsing(true)
            .source(Some(env_vars.clone()));
        let tree: serde_json::Value = builder
            .add_source(environment)
            .build()
            .and_then(|merged| merged.try_deserialize())
            .map_err(|e| ConfigError::Unreadable(e.to_string()))?;
        let mut problems = Problems::default();
        let settings = layers::read_settings(&tree, &mut problems);
        if let Some((settings, unread)) = &settings {
            let mut checked = Problems::default();
            settings.check(&mut checked);
            // Rules that ran on a stand-in for an unreadable part say
            // nothing about what the file holds.
            for key in unread {
                checked.forget_under(key);
            }
            problems.extend(checked);
        }
        match settings {
            Some((settings, _)) if problems.is_empty() => Ok(settings),
            _ => {
                // Only a refused config needs its layers read apart again.
                let layers = Layers::new(overlays, files, &env_vars);
                problems.attribute(|key| layers.origin_of(key));
                Err(ConfigError::Invalid(problems))
            }
        }
    }

    /// Checks everything serde cannot: cross-field rules and value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        self.check(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Adds every broken rule to `p`.
    fn check(&self, p: &mut Problems) {
        if self.server.max_body_bytes < 1024 {
            p.add("server.max_body_bytes", "must be at least 1024");
        }
        let s = &self.server;
        for (key, ms) in [
            ("server.header_read_timeout_ms", s.header_read_timeout_ms),
            ("server.idle_timeout_ms", s.idle_timeout_ms),
            ("server.body_idle_timeout_ms", s.body_idle_timeout_ms),
            ("server.body_timeout_ms", s.body_timeout_ms),
        ] {
            if ms == 0 {
                p.add(key, "must be positive");
            }
        }
        if s.max_headers == 0 || s.max_headers > MAX_HEADERS_LIMIT {
            p.add(
                "server.max_headers",
                format!("must be in 1..={MAX_HEADERS_LIMIT}"),
            );
        }
        if s.max_header_bytes < 1024 || s.max_header_bytes > MAX_HEADER_BYTES_LIMIT {
            p.add(
                "server.max_header_bytes",
                format!("must be in 1024..={MAX_HEADER_BYTES_LIMIT}"),
            );
        }
        if s.max_uri_bytes < 256 || s.max_uri_bytes > MAX_URI_BYTES_LIMIT {
            p.add(
                "server.max_uri_bytes",
                format!("must be in 256..={MAX_URI_BYTES_LIMIT}"),
            );
        }
        if s.max_connections == 0 {
            p.add("server.max_connections", "must be positive");
        }
        if s.shutdown_delay_ms > s.shutdown_grace_ms {
            p.add(
                "server.shutdown_delay_ms",
                "must not exceed server.shutdown_grace_ms (both count from the signal)",
            );
        }
        check_listener_tls(s, p);
        if self.server.auth == ClientAuth::None && !self.server.listen.ip().is_loopback() {
            p.add(
                "server.auth",
                format!(
                    "\"none\" is only allowed when server.listen is a loopback address, not {}",
                    self.server.listen
                ),
            );
        }
        if self.server.auth == ClientAuth::ApiKey && self.tenants.is_empty() {
            p.add(
                "tenants",
                "server.auth is \"api_key\" but no [tenants.NAME] are configured (add one with a key from `spillway hash-key`, or set server.auth = \"none\" on loopback)",
            );
        }
        let up = &self.upstream;
        if !up.regional_url.contains("{region}") && !is_loopback_url(&up.regional_url) {
            p.add(
                "upstream.regional_url",
                "must contain {region} (only a loopback simulator URL may omit it)",
            );
        } else {
            check_url(
                "upstream.regional_url",
                &up.regional_url.replace("{region}", "r"),
                p,
            );
        }
        check_url("upstream.global_url", &up.global_url, p);
        for (name, url) in &up.multi_region_urls {
            check_url(&format!("upstream.multi_region_urls.{name}"), url, p);
        }
        if !up.project.is_empty() && !is_gcp_project_id(&up.project) {
            p.add(
                "upstream.project",
                format!(
                    "{:?} is not a GCP project id (6-30 of a-z, 0-9, -)",
                    up.project
                ),
            );
        }
        if up.auth == UpstreamAuth::Static && up.token.is_empty() {
            p.add(
                "upstream.token",
                "upstream.auth is \"static\" but token is empty",
            );
        }
        if up.connect_timeout_ms == 0 || up.read_timeout_ms == 0 {
            p.add("upstream.connect_timeout_ms", "timeouts must be positive");
        }
        if self.quota.requests_per_min == 0 || self.quota.tokens_per_min == 0 {
            p.add(
                "quota",
                "requests_per_min and tokens_per_min must be positive",
            );
        }
        for (key, value) in [
            (
                "quota.input_tokens_per_min",
                self.quota.input_tokens_per_min,
            ),
            (
                "quota.output_tokens_per_min",
                self.quota.output_tokens_per_min,
            ),
        ] {
            if value == Some(0) {
                p.add(
                    key,
                    "a split quota must be positive (leave it out if your project has none)",
                );
            }
        }
        if spillway_core::learn::Quantile::new(self.quota.estimate_margin).is_none() {
            p.add(
                "quota.estimate_margin",
                format!(
                    "{} is not a quantile between 0.5 and 1 (0.95 reserves enough for 19 requests in 20)",
                    self.quota.estimate_margin
                ),
            );
        }
        let (lo, hi) = (
            self.batch.interactive_reserve_min,
            self.batch.interactive_reserve_max,
        );
        if !(0.0..=1.0).contains(&lo) || !(0.0..=1.0).contains(&hi) || lo > hi {
            p.add(
                "batch.interactive_reserve_min",
                format!("interactive_reserve_min ({lo}) and interactive_reserve_max ({hi}) must be fractions of the pool, min at most max"),
            );
        }
        let headroom = self.quota.headroom;
        if !(headroom > 0.0 && headroom <= 1.0) {
            p.add(
                "quota.headroom",
                format!("{headroom} is not in (0, 1]: it is the fraction of each quota Spillway plans to use (0.9 leaves 10% to others)"),
            );
        }
        if self.quota.count_tokens_timeout_ms == 0 {
            p.add("quota.count_tokens_timeout_ms", "must be positive");
        }
        shared_quota::check(&self.quota, p);
        if self.models.is_empty() {
            p.add("models", "at least one model must be configured");
        }
        for (id, model) in &self.models {
            let key = format!("models.{id:?}");
            if !spillway_vertex::is_valid_model_id(id) {
                p.add(key, "not a valid Vertex model id");
                continue;
            }
            if model.regions.is_empty() {
                p.add(
                    format!("{key}.regions"),
                    "must list at least one location, e.g. regions = [{ name = \"us-central1\" }]",
                );
            }
            if model
                .chars_per_token
                .is_some_and(|c| !(c > 0.0 && c.is_finite()))
            {
                p.add(
                    format!("{key}.chars_per_token"),
                    "must be a positive number",
                );
            }
            if model.context_window == 0 {
                p.add(format!("{key}.context_window"), "must be positive");
            }
            if model
                .quota_group
                .as_deref()
                .is_some_and(|g| g.trim().is_empty())
            {
                p.add(
                    format!("{key}.quota_group"),
                    "must name a lineage (e.g. \"anthropic-claude-sonnet\") or be left out",
                );
            }
            for (j, region) in model.regions.iter().enumerate() {
                self.check_location(&format!("{key}.regions[{j}]"), region, p);
            }
            for (j, overflow) in model.overflow.iter().enumerate() {
                self.check_overflow(&format!("{key}.overflow[{j}]"), overflow, p);
            }
            if let Some(Err(field)) = model.prices.as_ref().map(PriceSettings::model_prices) {
                p.add(
                    format!("{key}.prices.{field}"),
                    if field == "regional_premium" {
                        "must be a fraction from 0 to 1 (0.1: regional endpoints cost 10% more than global)".to_string()
                    } else {
                        format!(
                            "must be a price in US dollars per million tokens, from 0 to {} (a cache price left out is derived from input_per_mtok)",
                            spillway_core::spend::Price::MAX_USD_PER_MTOK
                        )
                    },
                );
            }
        }
        if !(50..=60_000).contains(&self.spend.sync_ms) {
            p.add("spend.sync_ms", "must be from 50 to 60000 milliseconds");
        }
        // The catalog repeats some of the checks above; its own (names used
        // twice, buckets that disagree) are worth reading only without them.
        let catalog = (!p.any_under("models")).then(|| self.catalog());
        if let Some(Err(e)) = catalog {
            // The catalog's messages start with their key.
            let text = e.to_string();
            match text.split_once(": ") {
                Some((key, problem)) => p.add(key, problem),
                None => p.add("models", text),
            }
        }
        let admin = &self.admin.key_sha256;
        if !admin.is_empty() && (admin.len() != 64 || hex::decode(admin).is_err()) {
            p.add(
                "admin.key_sha256",
                "must be 64 hex characters (the output of `spillway hash-key`), or empty",
            );
        }
        self.batch.check(self.scheduler.max_queue, p);
        self.telemetry.check(p);
        let overflows_to_anthropic = self
            .models
            .values()
            .any(|m| m.overflow.iter().any(|o| o.provider == ANTHROPIC_PROVIDER));
        match &self.providers.anthropic {
            None if overflows_to_anthropic => p.add(
                format!("providers.{ANTHROPIC_PROVIDER}"),
                "a model overflows to anthropic, but [providers.anthropic] is not configured",
            ),
            Some(a) if overflows_to_anthropic && a.key().is_empty() => p.add(
                format!("providers.{ANTHROPIC_PROVIDER}.api_key"),
                format!(
                    "no API key: set api_key, or the environment variable {} (providers.anthropic.api_key_env)",
                    a.api_key_env
                ),
            ),
            _ => {}
        }
        if let Some(anthropic) = &self.providers.anthropic {
            let url = reqwest::Url::parse(&anthropic.url);
            if !url.as_ref().is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some()
                    && u.query().is_none()
                    && u.username().is_empty()
            }) {
                p.add(
                    "providers.anthropic.url",
                    format!(
                        "{:?} is not an http(s) base URL such as \"https://api.anthropic.com\"",
                        anthropic.url
                    ),
                );
            }
            if anthropic.version.trim().is_empty() {
                p.add(
                    "providers.anthropic.version",
                    "must name an API version, e.g. \"2023-06-01\"",
                );
            }
        }
        for (name, tenant) in &self.tenants {
            if name.trim().is_empty() {
                p.add("tenants", "a tenant name must not be empty");
            }
            if !(tenant.weight > 0.0 && tenant.weight.is_finite()) {
                p.add(
                    format!("tenants.{name}.weight"),
                    "must be a positive number",
                );
            }
            if tenant
                .max_wait_ms
                .is_some_and(|w| w > self.scheduler.max_wait_cap_ms)
            {
                p.add(
                    format!("tenants.{name}.max_wait_ms"),
                    "must not exceed scheduler.max_wait_cap_ms",
                );
            }
            if tenant.requests_per_min == Some(0) || tenant.tokens_per_min == Some(0) {
                p.add(format!("tenants.{name}"), "caps must be positive");
            }
            for (field, cap) in [
                ("spend_cap_usd_per_day", tenant.spend_cap_usd_per_day),
                ("spend_cap_usd_per_month", tenant.spend_cap_usd_per_month),
            ] {
                let Some(cap) = cap else { continue };
                if !(cap.is_finite() && cap > 0.0 && cap < 1e9) {
                    p.add(
                        format!("tenants.{name}.{field}"),
                        format!("{cap} is not a positive amount of US dollars (leave it out for no cap)"),
                    );
                } else if !self.models.values().any(|m| m.prices.is_some()) {
                    p.add(
                        format!("tenants.{name}.{field}"),
                        "no model has prices, so nothing would count toward this cap: give models their [models.\"ID\".prices]",
                    );
                }
            }
            for region in &tenant.regions {
                if region == ANTHROPIC_PROVIDER {
                    continue;
                }
                if !is_region_name(region) {
                    p.add(
                        format!("tenants.{name}.regions"),
                        format!("{region:?} is not a Vertex location name"),
                    );
                }
            }
            let certs = &tenant.client_cert_sha256;
            if tenant.key_sha256.is_empty() && certs.is_empty() {
                p.add(
                    format!("tenants.{name}.key_sha256"),
                    "a tenant needs a credential: key_sha256 (the output of `spillway hash-key`) or client_cert_sha256",
                );
            } else if !tenant.key_sha256.is_empty()
                && (tenant.key_sha256.len() != 64 || hex::decode(&tenant.key_sha256).is_err())
            {
                p.add(
                    format!("tenants.{name}.key_sha256"),
                    "must be 64 hex characters (the output of `spillway hash-key`)",
                );
            }
            for (i, fingerprint) in certs.iter().enumerate() {
                if parse_fingerprint(fingerprint).is_none() {
                    p.add(
                        format!("tenants.{name}.client_cert_sha256[{i}]"),
                        format!("{fingerprint:?} is not a SHA-256 fingerprint: 64 hex characters, colons allowed (`openssl x509 -in client.pem -noout -fingerprint -sha256`)"),
                    );
                }
            }
            if !certs.is_empty() && self.server.tls_client_ca.is_empty() {
                p.add(
                    format!("tenants.{name}.client_cert_sha256"),
                    "client certificates are only asked for with server.tls_client_ca set: this tenant could never present one",
                );
            }
        }
        let mut seen: BTreeMap<[u8; 32], &str> = BTreeMap::new();
        for (name, tenant) in &self.tenants {
            for fingerprint in tenant
                .client_cert_sha256
                .iter()
                .filter_map(|f| parse_fingerprint(f))
            {
                if let Some(other) = seen.insert(fingerprint, name) {
                    if other != name {
                        p.add(
                            format!("tenants.{name}.client_cert_sha256"),
                            format!("a certificate can be one tenant only: {} is also listed by tenants.{other}", hex::encode(fingerprint)),
                        );
                    }
                }
            }
        }
    }

    /// One entry of a model's `regions`: a Vertex location (unless another
    /// provider serves it) with a host, and positive budgets.
    fn check_location(&self, key: &str, region: &RegionSettings, p: &mut Problems) {
        let vertex = region
            .provider
            .as_deref()
            .is_none_or(|p| p == VERTEX_PROVIDER);
        if !is_region_name(&region.name) {
            p.add(
                format!("{key}.name"),
                format!("{:?} is not a location name", region.name),
            );
        }
        match LocationKind::of(&region.name) {
            None if vertex => {
                p.add(
                    format!("{key}.name"),
                    format!(
                        "{:?} is not a Vertex location: use \"global\", a multi-region (\"us\", \"eu\") or a region such as \"us-central1\" (or name the provider that serves it)",
                        region.name
                    ),
                );
            }
            Some(LocationKind::MultiRegion)
                if vertex && !self.upstream.multi_region_urls.contains_key(&region.name) =>
            {
                p.add(
                    format!("upstream.multi_region_urls.{}", region.name),
                    format!(
                        "the multi-region {:?} is used by a model but has no host",
                        region.name
                    ),
                );
            }
            _ => {}
        }
        for (field, value) in [
            ("requests_per_min", region.requests_per_min.map(u64::from)),
            ("tokens_per_min", region.tokens_per_min),
            ("input_tokens_per_min", region.input_tokens_per_min),
            ("output_tokens_per_min", region.output_tokens_per_min),
        ] {
            if value == Some(0) {
                p.add(
                    format!("{key}.{field}"),
                    "must be positive (leave it out for the [quota] default)",
                );
            }
        }
    }

    /// One `overflow` entry: a provider that is configured, a model id it
    /// can take, and positive limits.
    fn check_overflow(&self, key: &str, overflow: &OverflowSettings, p: &mut Problems) {
        if overflow.provider != ANTHROPIC_PROVIDER {
            p.add(
                format!("{key}.provider"),
                format!(
                    "{:?} is not an overflow provider: the one there is is \"{ANTHROPIC_PROVIDER}\"",
                    overflow.provider
                ),
            );
        }
        if let Some(model) = &overflow.model {
            if !spillway_vertex::is_valid_model_id(model) || model.contains('@') {
                p.add(
                    format!("{key}.model"),
                    format!(
                        "{model:?} is not an Anthropic model id (e.g. \"claude-3-haiku-20240307\")"
                    ),
                );
            }
        }
        for (field, value) in [
            ("requests_per_min", u64::from(overflow.requests_per_min)),
            ("input_tokens_per_min", overflow.input_tokens_per_min),
            ("output_tokens_per_min", overflow.output_tokens_per_min),
        ] {
            if value == 0 {
                p.add(
                    format!("{key}.{field}"),
                    "must be positive: the provider's limit for this model (Anthropic's console shows them per tier)",
                );
            }
        }
    }

    /// A location's limits: its own values, else the `[quota]` defaults.
    /// The combined `tokens_per_min` is the location's own if set; else
    /// `quota.tokens_per_min` only when no split limit applies there (none
    /// at the location, none in `[quota]`): a project with Vertex's split
    /// quotas has no combined one, and inventing one would refuse what
    /// Vertex accepts.
    pub fn location_limits(&self, region: &RegionSettings) -> Limits {
        let q = &self.quota;
        let input_tokens = region.input_tokens_per_min.or(q.input_tokens_per_min);
        let output_tokens = region.output_tokens_per_min.or(q.output_tokens_per_min);
        let split = input_tokens.is_some() || output_tokens.is_some();
        Limits {
            requests: region.requests_per_min.unwrap_or(q.requests_per_min),
            tokens: region
                .tokens_per_min
                .or((!split).then_some(q.tokens_per_min)),
            input_tokens,
            output_tokens,
        }
    }

    /// The model catalog with every location's effective budget and bucket.
    pub fn catalog(&self) -> Result<Catalog, CatalogError> {
        let models = self
            .models
            .iter()
            .map(|(id, m)| ModelSpec {
                quota_group: QuotaGroup::from(m.quota_group.as_deref().unwrap_or(id)),
                cache_reads_count: m
                    .cache_reads_count
                    .unwrap_or_else(|| spillway_core::catalog::default_cache_reads_count(id)),
                prices: m.prices.as_ref().and_then(|p| p.model_prices().ok()),
                id: id.as_str().into(),
                aliases: m.aliases.clone(),
                context_window: m.context_window,
                chars_per_token: m.chars_per_token.unwrap_or(self.quota.chars_per_token),
                regions: m
                    .regions
                    .iter()
                    .map(|r| RegionBudget {
                        provider: r.provider.as_deref().unwrap_or(VERTEX_PROVIDER).into(),
                        ..RegionBudget::vertex(&r.name, self.location_limits(r))
                    })
                    .collect(),
                overflow: m
                    .overflow
                    .iter()
                    .map(|o| RegionBudget {
                        provider: o.provider.clone(),
                        ..RegionBudget::vertex(
                            &o.provider,
                            Limits::split(
                                o.requests_per_min,
                                o.input_tokens_per_min,
                                o.output_tokens_per_min,
                            ),
                        )
                    })
                    .collect(),
            })
            .collect();
        Catalog::new(models)
    }

    /// The effective configuration as TOML, secrets replaced.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.upstream.token.is_empty() {
            shown.upstream.token = "<redacted>".into();
        }
        if !shown.batch.postgres_url.is_empty() {
            shown.batch.postgres_url = "<redacted>".into();
        }
        if !shown.quota.redis_url.is_empty() {
            shown.quota.redis_url = "<redacted>".into();
        }
        if !shown.admin.key_sha256.is_empty() {
            shown.admin.key_sha256 = format!("{}…", &shown.admin.key_sha256[..8]);
        }
        shown.telemetry = shown.telemetry.redacted();
        if let Some(anthropic) = shown.providers.anthropic.as_mut() {
            if !anthropic.api_key.is_empty() {
                anthropic.api_key = "<redacted>".into();
            }
        }
        for tenant in shown.tenants.values_mut() {
            // A digest is not the key, but showing all of it helps nobody.
            if !tenant.key_sha256.is_empty() {
                tenant.key_sha256 =
                    format!("{}…", &tenant.key_sha256[..8.min(tenant.key_sha256.len())]);
            }
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// A certificate's SHA-256 fingerprint as configured: 64 hex digits, in
/// either case, optionally in `openssl`'s colon-separated form.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let digits: String = text.trim().chars().filter(|c| *c != ':').collect();
    if digits.len() != 64 {
        return None;
    }
    hex::decode(digits).ok()?.try_into().ok()
}

/// The `server.tls_*` and `server.client_cert` rules: a certificate and its
/// key together, readable files, and client certificates only with a CA.
fn check_listener_tls(s: &ServerSettings, p: &mut Problems) {
    match (s.tls_cert.is_empty(), s.tls_key.is_empty()) {
        (false, true) => p.add(
            "server.tls_key",
            "server.tls_cert is set: give its private key too (PEM), both or neither",
        ),
        (true, false) => p.add(
            "server.tls_cert",
            "server.tls_key is set: give the certificate chain too (PEM), both or neither",
        ),
        _ => {}
    }
    for (key, path) in [
        ("server.tls_cert", &s.tls_cert),
        ("server.tls_key", &s.tls_key),
        ("server.tls_client_ca", &s.tls_client_ca),
    ] {
        if !path.is_empty() {
            if let Err(e) = std::fs::metadata(path).and_then(|m| {
                if m.is_file() {
                    Ok(())
                } else {
                    Err(std::io::Error::other("not a file"))
                }
            }) {
                p.add(key, format!("cannot read {path:?}: {e}"));
            }
        }
    }
    if !s.tls_client_ca.is_empty() && s.tls_cert.is_empty() {
        p.add(
            "server.tls_client_ca",
            "client certificates need TLS on the listener: set server.tls_cert and server.tls_key",
        );
    }
    match (s.client_cert, s.tls_client_ca.is_empty()) {
        (ClientCertMode::None, false) => p.add(
            "server.client_cert",
            "server.tls_client_ca is set but client_cert is \"none\": set \"optional\" (a key or a certificate) or \"required\" (every client presents one)",
        ),
        (ClientCertMode::Optional | ClientCertMode::Required, true) => p.add(
            "server.client_cert",
            "client certificates are verified against server.tls_client_ca: set it to the PEM file of the CA that signs them",
        ),
        _ => {}
    }
}

/// Loads and validates a config file for `spillway check-config`: the
/// same path `spillway serve --config FILE` takes, so both report the same.
pub fn check_file(path: &Path) -> Result<Settings, ConfigError> {
    Settings::load(&[path.to_path_buf()])
}

fn check_url(key: &str, url: &str, p: &mut Problems) {
    let parsed = match url.parse::<http::Uri>() {
        Ok(parsed) => parsed,
        Err(e) => return p.add(key, format!("{url:?} is not a URL: {e}")),
    };
    match parsed.scheme_str() {
        Some("https") => {}
        Some("http") if is_loopback_url(url) => {}
        Some("http") => {
            p.add(key, "plain http is only allowed to a loopback address");
        }
        _ => p.add(key, format!("{url:?} must start with https://")),
    }
    if parsed.host().is_none_or(str::is_empty) {
        p.add(key, format!("{url:?} has no host"));
    }
    if parsed.path() != "/" && !parsed.path().is_empty() {
        p.add(key, "give the scheme and host only; Spillway adds /v1/...");
    }
}

fn is_loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    match uri.host() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

fn is_gcp_project_id(s: &str) -> bool {
    (6..=30).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_region_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_plus_demo_are_valid_and_carry_vertex_quotas() {
        let s = Settings::load_layers(&[DEMO_TOML], &[], env(&[])).unwrap();
        let catalog = s.catalog().unwrap();
        let haiku = catalog.resolve("claude-3-haiku@20240307").unwrap().model;
        let regions: Vec<_> = haiku.regions.iter().map(|r| r.region.as_str()).collect();
        assert_eq!(regions, ["us-central1", "europe-west4"]);
        assert_eq!(haiku.regions[0].limits, Limits::new(60, 50_000));
        assert_eq!(haiku.context_window, 200_000);
        let sonnet = catalog.resolve("claude-3-sonnet@20240229").unwrap().model;
        assert_eq!(sonnet.regions[1].region, "asia-southeast1");
    }

    #[test]
    fn defaults_alone_need_tenants() {
        let err = Settings::load_layers(&[], &[], env(&[])).unwrap_err();
        assert!(err.to_string().starts_with("tenants:"), "{err}");
    }

    #[test]
    fn environment_overrides_use_double_underscores() {
        let s = Settings::load_layers(
            &[DEMO_TOML],
            &[],
            env(&[
                ("SPILLWAY__SERVER__LISTEN", "127.0.0.1:9999"),
                ("SPILLWAY__QUOTA__REQUESTS_PER_MIN", "120"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.listen.port(), 9999);
        let catalog = s.catalog().unwrap();
        let haiku = catalog.resolve("claude-3-haiku").unwrap().model;
        assert_eq!(haiku.regions[0].limits.requests, 120);
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Settings::load_layers(
            &[DEMO_TOML],
            &[],
            env(&[("SPILLWAY__SERVER__LISTEN", "not-an-address")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("server.listen"), "{err}");

        let err = Settings::load_layers(
            &[DEMO_TOML, "[server]\nlisten = \"0.0.0.0:8080\"\n"],
            &[],
            env(&[]),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("server.auth:"), "{err}");

        let err = Settings::load_layers(
            &[
                DEMO_TOML,
                "[upstream]\nregional_url = \"http://evil.example.com\"\n",
            ],
            &[],
            env(&[]),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("upstream.regional_url:"),
            "{err}"
        );

        let err = Settings::load_layers(&[DEMO_TOML, "[server]\nlisten_port = 1\n"], &[], env(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
    }

    #[test]
    fn a_new_model_is_a_few_lines() {
        let extra = r#"
[models."claude-sonnet-4-5@20250929"]
aliases = ["claude-sonnet-4-5"]
regions = [{ name = "global" }, { name = "us-east5", requests_per_min = 120 }]
"#;
        let s = Settings::load_layers(&[DEMO_TOML, extra], &[], env(&[])).unwrap();
        let catalog = s.catalog().unwrap();
        let m = catalog.resolve("claude-sonnet-4-5").unwrap().model;
        assert!(catalog.resolve("claude-3-haiku@20240307").is_some());
        assert_eq!(m.regions[1].limits, Limits::new(120, 50_000));
    }

    #[test]
    fn models_can_share_a_quota_group() {
        let extra = r#"
[models."claude-opus-4-7"]
quota_group = "anthropic-claude-opus"
regions = [{ name = "global" }]
[models."claude-opus-4-8"]
quota_group = "anthropic-claude-opus"
regions = [{ name = "global" }]
"#;
        let s = Settings::load_layers(&[DEMO_TOML, extra], &[], env(&[])).unwrap();
        let catalog = s.catalog().unwrap();
        let shared: Vec<_> = catalog
            .budgets()
            .into_iter()
            .filter(|(g, _)| *g == "anthropic-claude-opus")
            .collect();
        assert_eq!(shared.len(), 1);
        let bad = format!("{extra}[models.\"claude-opus-4-8\".x]\n");
        assert!(Settings::load_layers(&[DEMO_TOML, &bad], &[], env(&[])).is_err());
        let mismatch = extra.replace(
            "quota_group = \"anthropic-claude-opus\"\nregions = [{ name = \"global\" }]\n[models.\"claude-opus-4-8\"]",
            "quota_group = \"anthropic-claude-opus\"\nregions = [{ name = \"global\", requests_per_min = 5 }]\n[models.\"claude-opus-4-8\"]",
        );
        let err = Settings::load_layers(&[DEMO_TOML, &mismatch], &[], env(&[])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("models.\"claude-opus-4-8\".regions: location \"global\""),
            "{err}"
        );
        assert!(err.to_string().contains("claude-opus-4-7"), "{err}");
    }

    /// `overflow` entries and `[providers.anthropic]`: what they make of the
    /// catalog, and every mistake named once, at its key.
    #[test]
    fn overflow_needs_a_configured_provider_with_a_key_and_positive_limits() {
        let overflow = r#"
[models."claude-3-haiku@20240307"]
overflow = [{ provider = "anthropic", requests_per_min = 50, input_tokens_per_min = 50000, output_tokens_per_min = 10000 }]
[tenants.eu]
key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
regions = ["europe-west4", "anthropic"]
allow_overflow = true
"#;
        let provider = "[providers.anthropic]\napi_key = \"sk-ant-config-test\"\n";
        let s = Settings::load_layers(&[DEMO_TOML, overflow, provider], &[], env(&[])).unwrap();
        let catalog = s.catalog().unwrap();
        let haiku = catalog.resolve("claude-3-haiku@20240307").unwrap().model;
        assert_eq!(haiku.overflow.len(), 1);
        assert_eq!(haiku.overflow[0].region, "anthropic");
        assert_eq!(haiku.overflow[0].limits, Limits::split(50, 50_000, 10_000));
        assert!(haiku.regions.iter().all(|r| r.provider == "vertex"));
        assert_eq!(
            s.models["claude-3-haiku@20240307"].overflow[0]
                .provider_model("claude-3-haiku@20240307"),
            "claude-3-haiku-20240307"
        );
        // The key is redacted wherever the settings are shown.
        assert!(!s.redacted_toml().contains("sk-ant-config-test"));
        assert!(!format!("{s:?}").contains("sk-ant-config-test"));

        let err = |layers: &[&str]| {
            Settings::load_layers(layers, &[], env(&[]))
                .unwrap_err()
                .to_string()
        };
        // No provider section; a key missing (named once, not per model).
        let e = err(&[DEMO_TOML, overflow]);
        assert!(
            e.starts_with("providers.anthropic: a model overflows to anthropic"),
            "{e}"
        );
        let keyless = "[providers.anthropic]\napi_key_env = \"SPILLWAY_TEST_UNSET_KEY\"\n";
        let e = err(&[DEMO_TOML, overflow, keyless]);
        assert!(
            e.starts_with("providers.anthropic.api_key: no API key"),
            "{e}"
        );
        assert_eq!(e.matches("no API key").count(), 1, "{e}");
        // An unknown provider, a Vertex-style id, a zero limit.
        let e = err(&[
            DEMO_TOML,
            &overflow.replace("\"anthropic\", requests", "\"openai\", requests"),
            provider,
        ]);
        assert!(
            e.contains("models.\"claude-3-haiku@20240307\".overflow[0].provider"),
            "{e}"
        );
        let e = err(&[
            DEMO_TOML,
            &overflow.replace(
                "requests_per_min = 50,",
                "model = \"claude-3-haiku@20240307\", requests_per_min = 50,",
            ),
            provider,
        ]);
        assert!(e.contains("overflow[0].model"), "{e}");
        let e = err(&[
            DEMO_TOML,
            &overflow.replace("requests_per_min = 50", "requests_per_min = 0"),
            provider,
        ]);
        assert!(
            e.contains("overflow[0].requests_per_min: must be positive"),
            "{e}"
        );
        // A URL that is not an http(s) base.
        let e = err(&[
            DEMO_TOML,
            overflow,
            &format!("{provider}url = \"ftp://example.com\"\n"),
        ]);
        assert!(e.contains("providers.anthropic.url"), "{e}");
    }

    /// Two Sonnet versions of one lineage on global, us and a region each,
    /// with Vertex's split quotas only.
    const LINEAGE: &str = r#"
[quota]
input_tokens_per_min = 30000
output_tokens_per_min = 8000
[models."claude-sonnet-4-5@20250929"]
quota_group = "anthropic-claude-sonnet"
regions = [{ name = "global" }, { name = "us" }, { name = "us-east5", requests_per_min = 10 }]
[models."claude-sonnet-4-6@20260101"]
quota_group = "anthropic-claude-sonnet"
regions = [{ name = "global" }, { name = "eu" }, { name = "europe-west1", requests_per_min = 20 }]
"#;

    #[test]
    fn a_lineage_shares_buckets_on_global_and_multi_regions_and_not_in_regions() {
        let s = Settings::load_layers(&[DEMO_TOML, LINEAGE], &[], env(&[])).unwrap();
        let catalog = s.catalog().unwrap();
        let buckets: Vec<String> = catalog
            .budgets()
            .into_iter()
            .filter(|(_, r)| {
                !["us-central1", "europe-west4", "asia-southeast1"].contains(&r.region.as_str())
            })
            .map(|(g, r)| format!("{g} {}", r.region))
            .collect();
        assert_eq!(
            buckets,
            [
                "anthropic-claude-sonnet global",
                "anthropic-claude-sonnet us",
                "claude-sonnet-4-5@20250929 us-east5",
                "anthropic-claude-sonnet eu",
                "claude-sonnet-4-6@20260101 europe-west1",
            ]
        );
        // Limits differing in the two regions are no conflict: two buckets.
        let s45 = catalog.resolve("claude-sonnet-4-5@20250929").unwrap().model;
        assert_eq!(s45.regions[2].limits.requests, 10);
    }

    #[test]
    fn split_quotas_need_no_combined_limit() {
        let s = Settings::load_layers(&[DEMO_TOML, LINEAGE], &[], env(&[])).unwrap();
        let catalog = s.catalog().unwrap();
        let s45 = catalog.resolve("claude-sonnet-4-5@20250929").unwrap().model;
        // [quota] has split limits: no location inherits the combined default.
        assert_eq!(s45.regions[0].limits, Limits::split(60, 30_000, 8_000));
        let haiku = catalog.resolve("claude-3-haiku@20240307").unwrap().model;
        assert_eq!(haiku.regions[0].limits.tokens, None);

        // Split limits at one location only: only that one loses it; a
        // location's own combined limit always counts.
        let one = r#"
[models."claude-sonnet-4-5@20250929"]
regions = [
  { name = "global", input_tokens_per_min = 30000, output_tokens_per_min = 8000 },
  { name = "us-east5", output_tokens_per_min = 8000, tokens_per_min = 20000 },
  { name = "europe-west1" },
]
"#;
        let s = Settings::load_layers(&[DEMO_TOML, one], &[], env(&[])).unwrap();
        let catalog = s.catalog().unwrap();
        let m = catalog.resolve("claude-sonnet-4-5@20250929").unwrap().model;
        let tokens: Vec<_> = m.regions.iter().map(|r| r.limits.tokens).collect();
        assert_eq!(tokens, [None, Some(20_000), Some(50_000)]);
        assert_eq!(m.regions[1].limits.input_tokens, None);
    }

    #[test]
    fn bad_locations_and_split_quotas_name_the_key() {
        let load = |extra: &str| {
            Settings::load_layers(&[DEMO_TOML, extra], &[], env(&[]))
                .unwrap_err()
                .to_string()
        };
        let err = load("[quota]\ninput_tokens_per_min = 0\n");
        assert!(err.starts_with("quota.input_tokens_per_min:"), "{err}");
        let err = load(
            "[models.\"claude-3-haiku@20240307\"]\nregions = [{ name = \"global\" }, { name = \"us-east5\", output_tokens_per_min = 0 }]\n",
        );
        assert!(
            err.starts_with("models.\"claude-3-haiku@20240307\".regions[1].output_tokens_per_min:"),
            "{err}"
        );
        for bad in ["us-central", "asia", "uscentral1", "global1"] {
            let err = load(&format!(
                "[models.\"claude-3-haiku@20240307\"]\nregions = [{{ name = \"{bad}\" }}]\n"
            ));
            assert!(
                err.starts_with("models.\"claude-3-haiku@20240307\".regions[0].name:")
                    && err.contains("not a Vertex location"),
                "{bad}: {err}"
            );
        }
        // A multi-region needs a host (the defaults have `us` and `eu`).
        let mut s = Settings::load_layers(&[DEMO_TOML, LINEAGE], &[], env(&[])).unwrap();
        s.upstream.multi_region_urls.remove("eu");
        let err = s.validate().unwrap_err().to_string();
        assert!(err.starts_with("upstream.multi_region_urls.eu:"), "{err}");
        let err = load("[models.\"claude-3-haiku@20240307\"]\nquota_group = \"\"\n");
        assert!(
            err.starts_with("models.\"claude-3-haiku@20240307\".quota_group:"),
            "{err}"
        );
        // Another provider's location may have any name.
        let ok = "[models.\"claude-3-haiku@20240307\"]\nregions = [{ name = \"elsewhere\", provider = \"canned\" }]\n";
        assert!(Settings::load_layers(&[DEMO_TOML, ok], &[], env(&[])).is_ok());
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_layer() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(
            &file,
            r#"
[quota]
strategy = "random"
headroom = 1.5
[scheduler]
max_queue = "many"
[models."claude-3-haiku@20240307"]
regions = []
[models."claude-3-sonnet@20240229"]
regions = [{ name = "us-central1", requests_per_min = "x" }]
[tenants.a]
key_sha256 = "short"
"#,
        )
        .unwrap();
        let err = Settings::load_layers(
            &[DEMO_TOML],
            std::slice::from_ref(&file),
            env(&[("SPILLWAY__SERVER__MAX_BODY_BYTES", "10")]),
        )
        .unwrap_err();
        let ConfigError::Invalid(problems) = &err else {
            panic!("{err}")
        };
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let at = |key: &str| {
            shown
                .iter()
                .find(|line| line.starts_with(&format!("{key}: ")))
                .unwrap_or_else(|| panic!("no problem for {key} in {shown:#?}"))
                .clone()
        };
        let f = file.display();
        assert_eq!(
            at("quota.strategy"),
            format!("quota.strategy: \"random\" is not one of most_headroom, ordered (set in {f})")
        );
        assert!(
            at("scheduler.max_queue").contains("invalid type"),
            "{shown:#?}"
        );
        assert!(at("scheduler.max_queue").ends_with(&format!("(set in {f})")));
        assert!(
            at("models.\"claude-3-sonnet@20240229\".regions[0].requests_per_min")
                .contains("invalid type")
        );
        assert!(at("models.\"claude-3-haiku@20240307\".regions").contains("at least one location"));
        assert!(at("tenants.a.key_sha256").contains("64 hex"));
        assert_eq!(
            at("server.max_body_bytes"),
            "server.max_body_bytes: must be at least 1024 (set in the environment variable SPILLWAY__SERVER__MAX_BODY_BYTES)"
        );
        // quota could not be read (strategy), so its other rules are not
        // guessed from the defaults: headroom is reported on the next run.
        assert_eq!(problems.len(), 6, "{shown:#?}");
        assert!(err
            .to_string()
            .starts_with("6 problems in the configuration:\n  - "));

        // With the enum fixed, the range rule speaks.
        std::fs::write(&file, "[quota]\nheadroom = 1.5\n").unwrap();
        let err =
            Settings::load_layers(&[DEMO_TOML], std::slice::from_ref(&file), env(&[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("quota.headroom: 1.5 is not in (0, 1]: it is the fraction of each quota Spillway plans to use (0.9 leaves 10% to others) (set in {f})")
        );
        for ok in ["1.0", "0.5", "1"] {
            std::fs::write(&file, format!("[quota]\nheadroom = {ok}\n")).unwrap();
            assert!(
                Settings::load_layers(&[DEMO_TOML], std::slice::from_ref(&file), env(&[])).is_ok()
            );
        }
        for bad in ["0", "-1", "0.0"] {
            std::fs::write(&file, format!("[quota]\nheadroom = {bad}\n")).unwrap();
            assert!(
                Settings::load_layers(&[DEMO_TOML], std::slice::from_ref(&file), env(&[])).is_err()
            );
        }
    }

    #[test]
    fn unknown_keys_and_unreadable_files_say_so_once() {
        let err = Settings::load_layers(
            &[DEMO_TOML, "[server]\nlisten_port = 1\n[extra]\n"],
            &[],
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("server.listen_port: unknown key (known here: listen, "),
            "{err}"
        );
        assert!(err.contains("extra: unknown section"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("broken.toml");
        std::fs::write(&file, "[quota\n").unwrap();
        let err = Settings::load(std::slice::from_ref(&file)).unwrap_err();
        assert!(matches!(err, ConfigError::Unreadable(_)), "{err}");
        assert!(err.to_string().contains("broken.toml"), "{err}");
        assert!(std::error::Error::source(&err).is_none());
        let missing = dir.path().join("missing.toml");
        let err = check_file(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }

    #[test]
    fn prices_and_spend_caps_are_read_and_checked() {
        use spillway_core::spend::{Price, Tokens};
        let s = Settings::load_layers(&[DEMO_TOML], &[], env(&[])).unwrap();
        let catalog = s.catalog().unwrap();
        let haiku = catalog.resolve("claude-3-haiku@20240307").unwrap().model;
        let prices = haiku.prices.expect("the defaults carry list prices");
        assert_eq!(prices.global.input, Price(250_000));
        assert_eq!(prices.global.cache_read, Price(30_000));
        assert_eq!(
            prices.regional, prices.global,
            "no regional premium on Claude 3"
        );
        let sonnet = catalog.resolve("claude-3-sonnet@20240229").unwrap().model;
        let p = sonnet.prices.unwrap().global;
        // Cache prices left out follow the rule: 1.25x, 2x, 0.1x input.
        assert_eq!(
            (p.cache_write_5m, p.cache_write_1h, p.cache_read),
            (Price(3_750_000), Price(6_000_000), Price(300_000))
        );
        let extra = r#"
[models."claude-sonnet-4-5@20250929"]
regions = [{ name = "global" }, { name = "us-east5" }]
prices = { input_per_mtok = 3.0, output_per_mtok = 15.0, regional_premium = 0.1 }
[models."claude-opus-4-1@20250805"]
regions = [{ name = "us-east5" }]
[tenants.a]
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
spend_cap_usd_per_day = 50.0
spend_cap_usd_per_month = 1000
"#;
        let s = Settings::load_layers(&[DEMO_TOML, extra], &[], env(&[])).unwrap();
        let catalog = s.catalog().unwrap();
        let s45 = catalog.resolve("claude-sonnet-4-5@20250929").unwrap().model;
        let one_m_out = Tokens {
            output: 1_000_000,
            ..Tokens::default()
        };
        let p = s45.prices.unwrap();
        assert_eq!(p.at("global").cost(&one_m_out).usd(), 15.0);
        assert_eq!(p.at("us-east5").cost(&one_m_out).usd(), 16.5);
        let opus = catalog.resolve("claude-opus-4-1@20250805").unwrap().model;
        assert_eq!(opus.prices, None, "no prices: no spend, none made up");
        let caps = s.tenants["a"].spend_caps();
        assert_eq!(caps.per_day, Some(50_000_000_000));
        assert_eq!(caps.per_month, Some(1_000_000_000_000));

        let load = |extra: &str| {
            Settings::load_layers(&[DEMO_TOML, extra], &[], env(&[]))
                .unwrap_err()
                .to_string()
        };
        let err = load("[models.\"claude-3-haiku@20240307\".prices]\ninput_per_mtok = -1\noutput_per_mtok = 1\n");
        assert!(
            err.starts_with("models.\"claude-3-haiku@20240307\".prices.input_per_mtok: must be a price in US dollars per million tokens"),
            "{err}"
        );
        let err = load("[models.\"claude-3-haiku@20240307\".prices]\nregional_premium = 2\n");
        assert!(
            err.starts_with(
                "models.\"claude-3-haiku@20240307\".prices.regional_premium: must be a fraction"
            ),
            "{err}"
        );
        let err = load("[models.\"claude-3-haiku@20240307\".prices]\ninput_cost = 1\n");
        assert!(
            err.contains("prices.input_cost: unknown key (known here: input_per_mtok, "),
            "{err}"
        );
        let err = load("[tenants.b]\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\nspend_cap_usd_per_day = 0\n");
        assert!(
            err.starts_with(
                "tenants.b.spend_cap_usd_per_day: 0 is not a positive amount of US dollars"
            ),
            "{err}"
        );
        let err = load("[spend]\nsync_ms = 10\n");
        assert!(
            err.starts_with("spend.sync_ms: must be from 50 to 60000"),
            "{err}"
        );
        let err = load("[spend]\nflush_ms = 10\n");
        assert!(
            err.starts_with("spend.flush_ms: unknown key (known here: sync_ms)"),
            "{err}"
        );
    }

    #[test]
    fn tls_settings_are_checked_together_and_name_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cert.pem");
        std::fs::write(&file, "x").unwrap();
        let f = file.display();
        let load = |extra: &str| {
            Settings::load_layers(&[DEMO_TOML, extra], &[], env(&[]))
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string())
        };
        let err = load(&format!("[server]\ntls_cert = \"{f}\"\n"));
        assert!(
            err.starts_with("server.tls_key: server.tls_cert is set"),
            "{err}"
        );
        let err = load("[server]\ntls_key = \"/nonexistent/key.pem\"\n");
        assert!(
            err.contains("server.tls_cert: server.tls_key is set"),
            "{err}"
        );
        assert!(
            err.contains("server.tls_key: cannot read \"/nonexistent/key.pem\""),
            "{err}"
        );
        let both = format!("[server]\ntls_cert = \"{f}\"\ntls_key = \"{f}\"\n");
        assert_eq!(load(&both), "");
        let err = load(&format!("{both}client_cert = \"required\"\n"));
        assert!(
            err.starts_with(
                "server.client_cert: client certificates are verified against server.tls_client_ca"
            ),
            "{err}"
        );
        let err = load(&format!("{both}tls_client_ca = \"{f}\"\n"));
        assert!(
            err.starts_with(
                "server.client_cert: server.tls_client_ca is set but client_cert is \"none\""
            ),
            "{err}"
        );
        let err = load(&format!("{both}client_cert = \"sometimes\"\n"));
        assert!(
            err.contains("\"sometimes\" is not one of none, optional, required"),
            "{err}"
        );
        let mtls = format!("{both}tls_client_ca = \"{f}\"\nclient_cert = \"optional\"\n");
        assert_eq!(load(&mtls), "");
        let err = load(&format!(
            "[server]\ntls_client_ca = \"{f}\"\nclient_cert = \"optional\"\n"
        ));
        assert!(
            err.contains("server.tls_client_ca: client certificates need TLS on the listener"),
            "{err}"
        );

        // Tenants: a credential each, fingerprints well-formed and one tenant's.
        let fp = "AB:".repeat(31) + "AB";
        let ok = format!("{mtls}[tenants.a]\nclient_cert_sha256 = [\"{fp}\"]\n");
        let s = Settings::load_layers(&[DEMO_TOML, &ok], &[], env(&[])).unwrap();
        assert_eq!(
            parse_fingerprint(&s.tenants["a"].client_cert_sha256[0]),
            Some([0xab; 32])
        );
        assert_eq!(parse_fingerprint(&"ab".repeat(32)), Some([0xab; 32]));
        assert!(
            s.redacted_toml().contains(&fp),
            "fingerprints are not secrets"
        );
        let err = load(&format!("{mtls}[tenants.a]\nweight = 2\n"));
        assert!(
            err.starts_with("tenants.a.key_sha256: a tenant needs a credential"),
            "{err}"
        );
        let err = load(&format!(
            "{mtls}[tenants.a]\nclient_cert_sha256 = [\"abc\"]\n"
        ));
        assert!(
            err.starts_with(
                "tenants.a.client_cert_sha256[0]: \"abc\" is not a SHA-256 fingerprint"
            ),
            "{err}"
        );
        let err = load(&format!("{mtls}[tenants.a]\nclient_cert_sha256 = [\"{fp}\"]\n[tenants.b]\nclient_cert_sha256 = [\"{}\"]\n", "ab".repeat(32)));
        assert!(
            err.contains("a certificate can be one tenant only"),
            "{err}"
        );
        let err = load(&format!("[tenants.a]\nclient_cert_sha256 = [\"{fp}\"]\n"));
        assert!(err.starts_with("tenants.a.client_cert_sha256: client certificates are only asked for with server.tls_client_ca"), "{err}");
    }

    #[test]
    fn rediss_is_verified_and_its_ca_file_needs_it() {
        let load = |extra: &str| {
            Settings::load_layers(&[DEMO_TOML, extra], &[], env(&[]))
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string())
        };
        let redis = "[quota]\nstore = \"redis\"\n";
        assert_eq!(
            load(&format!("{redis}redis_url = \"rediss://r:6380\"\n")),
            ""
        );
        let err = load(&format!(
            "{redis}redis_url = \"rediss://r:6380/#insecure\"\n"
        ));
        assert!(
            err.starts_with("quota.redis_url: rediss:// URLs take no #fragment"),
            "{err}"
        );
        let err = load(&format!(
            "{redis}redis_url = \"redis://r:6379\"\nredis_ca_file = \"/ca.pem\"\n"
        ));
        assert!(
            err.starts_with("quota.redis_ca_file: is only used with"),
            "{err}"
        );
        let err = load(&format!(
            "{redis}redis_url = \"rediss://r:6380\"\nredis_ca_file = \"/nonexistent/ca.pem\"\n"
        ));
        assert!(err.starts_with("quota.redis_ca_file: cannot read"), "{err}");
        let err = load("[batch]\nstore = \"postgres\"\npostgres_url = \"postgres://db/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem\"\n");
        assert!(
            err.starts_with("batch.postgres_url: sslrootcert names \"/nonexistent/ca.pem\""),
            "{err}"
        );
    }

    #[test]
    fn redaction_hides_the_upstream_token() {
        let s = Settings::load_layers(&[DEMO_TOML], &[], env(&[])).unwrap();
        let shown = s.redacted_toml();
        assert!(!shown.contains("demo-upstream-token"));
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn telemetry_comes_from_files_and_the_environment_with_its_headers_redacted() {
        let s = Settings::load_layers(&[DEMO_TOML], &[], env(&[])).unwrap();
        assert!(!s.telemetry.enabled(), "off by default");
        let s = Settings::load_layers(
            &[DEMO_TOML, "[telemetry]\nsample_ratio = 0.25\n"],
            &[],
            env(&[
                (
                    "SPILLWAY__TELEMETRY__OTLP_ENDPOINT",
                    "http://127.0.0.1:4318",
                ),
                (
                    "SPILLWAY__TELEMETRY__HEADERS__AUTHORIZATION",
                    "Bearer otel-s3cret",
                ),
            ]),
        )
        .unwrap();
        assert!(s.telemetry.enabled());
        assert_eq!(s.telemetry.sample_ratio, 0.25);
        assert_eq!(s.telemetry.traces_url(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(s.telemetry.headers["authorization"], "Bearer otel-s3cret");
        let shown = s.redacted_toml();
        assert!(!shown.contains("otel-s3cret"), "{shown}");
        assert!(shown.contains("[telemetry"), "{shown}");
        let err = Settings::load_layers(
            &[DEMO_TOML],
            &[],
            env(&[("SPILLWAY__TELEMETRY__SAMPLE_RATIO", "2")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("telemetry.sample_ratio: 2 is not a fraction")
                && err.contains("SPILLWAY__TELEMETRY__SAMPLE_RATIO"),
            "{err}"
        );
        let err = Settings::load_layers(
            &[DEMO_TOML, "[telemetry]\nendpoint = \"x\"\n"],
            &[],
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("telemetry.endpoint") && err.contains("otlp_endpoint"),
            "{err}"
        );
    }
}
