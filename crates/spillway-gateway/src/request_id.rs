//! The outermost layer: every request gets an id, every response carries it
//! as `request-id` (as Anthropic's API does), and every request is logged
//! exactly once.
//!
//! Requests that reach the proxy are logged there, with model, region,
//! tokens and timings, and mark themselves logged. Anything refused earlier
//! (bad auth, bad JSON, unknown route) is logged here from the response, so
//! no request goes unrecorded and none is recorded twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderValue;

use crate::metrics::Metrics;

/// The id of the request being served, and whether its log line was written.
#[derive(Debug, Clone)]
pub struct RequestId {
    pub id: Arc<str>,
    logged: Arc<AtomicBool>,
}

impl RequestId {
    pub fn new(id: &str) -> Self {
        Self {
            id: Arc::from(id),
            logged: Arc::default(),
        }
    }

    /// Records that this request's one log line has been written.
    pub fn mark_logged(&self) {
        self.logged.store(true, Ordering::Relaxed);
    }

    fn is_logged(&self) -> bool {
        self.logged.load(Ordering::Relaxed)
    }
}

/// `req_` and 24 random base-62 characters (about 143 bits).
pub fn new_request_id() -> String {
    crate::ids::random_id("req_", 24)
}

pub async fn assign_request_id(
    State(metrics): State<Arc<Metrics>>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = new_request_id();
    let header = HeaderValue::from_str(&id).expect("request ids are ASCII");
    let request_id = RequestId::new(&id);
    request.extensions_mut().insert(request_id.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    response.headers_mut().insert("request-id", header);
    let quiet = matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics");
    if !request_id.is_logged() && !quiet {
        let status = response.status().as_u16();
        let outcome = match status {
            401 => "unauthenticated",
            404 => "not_found",
            413 => "too_large",
            400..=499 => "invalid",
            _ => "error",
        };
        metrics
            .requests
            .with_label_values(&["-", "-", outcome])
            .inc();
        tracing::info!(
            target: "spillway::request",
            request_id = %request_id.id,
            %method,
            path = %path,
            status,
            outcome,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_unique_and_well_formed() {
        let a = super::new_request_id();
        let b = super::new_request_id();
        assert_ne!(a, b);
        assert!(a.starts_with("req_") && a.len() == 28);
        assert!(a[4..].bytes().all(|c| c.is_ascii_alphanumeric()));
    }
}
