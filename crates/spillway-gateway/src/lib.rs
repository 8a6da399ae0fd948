//! The Spillway gateway: the HTTP edge between backend services and
//! Claude on Vertex AI.
//!
//! A request travels: the [`observer`] layer (request id, one record per
//! request) → the [`auth`] layer → a handler in [`routes`] (content type,
//! size, JSON and Messages validation) → the [`forwarder`] (model, charge,
//! admission through the [`scheduler`], attempts, relay, settlement) → a
//! provider in [`upstream`] (URL from config, Google credentials) and, for
//! streams, [`passthrough`] (bytes relayed as they arrive, usage read on the
//! side). The forwarder answers in domain terms ([`answer`]); `routes`
//! renders that as HTTP, with errors in Anthropic's shape ([`error`]), and
//! [`batch`] stores it as results. [`config`] loads and validates settings
//! once at start; [`server`] puts it all together.

pub mod admin;
pub mod admin_page;
pub mod answer;
pub mod auth;
pub mod batch;
pub mod client_limits;
pub mod config;
pub mod connections;
pub mod error;
pub mod estimates;
pub mod fast_hash;
pub mod feed;
pub mod forwarder;
pub mod ids;
pub mod lifecycle;
pub mod listener_tls;
pub mod metrics;
pub mod models;
pub mod observer;
pub mod overview;
pub mod passthrough;
pub mod quota_store;
pub mod ratelimit;
pub mod request_id;
pub mod rfc3339;
pub mod routes;
pub mod scheduler;
pub mod server;
pub mod snapshots;
pub mod spend;
pub mod state;
pub mod telemetry;
pub mod tenants;
pub mod tls;
pub mod upstream;

pub use config::Settings;
pub use server::{Gateway, StartError};
pub use state::AppState;
