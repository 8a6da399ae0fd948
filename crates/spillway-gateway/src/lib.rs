//! The Spillway gateway: the HTTP edge between backend services and
//! Claude on Vertex AI.
//!
//! A request travels: [`request_id`] layer → [`auth`] layer → a handler in
//! [`routes`] (content type, size, JSON and Messages validation, model
//! resolution) → [`proxy::forward`] (region, upstream call, relay, log) →
//! [`upstream`] (URL from config, Google credentials) and, for streams,
//! [`passthrough`] (bytes relayed as they arrive, usage read on the side).
//! Errors are [`error::ApiError`] until the edge renders them in Anthropic's
//! shape. [`config`] loads and validates settings once at start.

pub mod admin;
pub mod auth;
pub mod batch;
pub mod config;
pub mod error;
pub mod estimates;
pub mod ids;
pub mod metrics;
pub mod passthrough;
pub mod proxy;
pub mod ratelimit;
pub mod request_id;
pub mod rfc3339;
pub mod routes;
pub mod scheduler;
pub mod server;
pub mod shared_quota;
pub mod tenants;
pub mod upstream;

pub use config::Settings;
pub use server::{AppState, Gateway, StartError};
