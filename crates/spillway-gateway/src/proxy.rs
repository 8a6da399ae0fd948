//! The plain service at the centre: take one validated call, pick a region,
//! send it to Vertex, and shape what comes back.
//!
//! Everything HTTP-specific about the *client* (paths, auth, body limits)
//! happened before this point, in `routes` and the layers; everything
//! specific to *Vertex* (URLs, credentials) lives in `upstream`. What is
//! left here is the request's life: choose, send, relay, account, log.

use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use serde_json::{Map, Value};
use spillway_core::ModelSpec;
use spillway_vertex::{
    normalize_upstream_error, to_vertex_body, usage_from_message_body, Operation, Usage,
};

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::passthrough::{SsePassthrough, StreamOutcome};
use crate::request_id::RequestId;
use crate::server::AppState;

/// One client call, validated and resolved to a model.
pub struct Call<'a> {
    pub op: Operation,
    pub model: &'a ModelSpec,
    pub body: Map<String, Value>,
    pub stream: bool,
    pub beta: Option<HeaderValue>,
    /// Set when the client named the model by an unversioned alias.
    pub alias_warning: Option<String>,
    pub tenant: Tenant,
    pub request_id: RequestId,
}

/// Picks the region for a call. Quota-aware routing replaces this with the
/// ledger's choice; until then the primary region serves every call.
fn choose_region(model: &ModelSpec) -> Result<&str, ApiError> {
    model
        .regions
        .first()
        .map(|r| r.region.as_str())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "model {:?} is not served in any configured region",
                model.id
            ))
        })
}

pub async fn forward(state: &AppState, call: Call<'_>) -> Result<Response, ApiError> {
    let started = Instant::now();
    let region = choose_region(call.model)?.to_string();
    let stream = call.op == Operation::Messages && call.stream;
    let body = Bytes::from(to_vertex_body(call.body, call.op, &call.model.id));
    let upstream = state
        .upstream
        .send(&region, &call.model.id, call.op, stream, body, call.beta)
        .await;
    let log = RequestLog {
        request_id: call.request_id,
        tenant: call.tenant,
        model: call.model.id.clone(),
        region: region.clone(),
        started,
    };
    let response = match upstream {
        Ok(response) => response,
        Err(error) => {
            log.emit(error.kind_and_status().1.as_u16(), None, "transport");
            return Err(error);
        }
    };
    let status = response.status();
    if !status.is_success() {
        let bytes = response.bytes().await.unwrap_or_default();
        let error = normalize_upstream_error(status.as_u16(), &bytes);
        tracing::debug!(%region, upstream_status = status.as_u16(), google_status = ?error.google_status, "upstream error");
        log.emit(error.status, None, "upstream_error");
        return Err(ApiError::Upstream(error));
    }

    let mut builder = Response::builder().status(StatusCode::OK).header(
        "x-spillway-region",
        HeaderValue::from_str(&region).expect("region names are validated ASCII"),
    );
    if let Some(warning) = &call.alias_warning {
        if let Ok(value) = HeaderValue::from_str(warning) {
            builder = builder.header(header::WARNING, value);
        }
    }

    if stream {
        let drop_vertex_events = state.settings.upstream.drop_vertex_events;
        let body = SsePassthrough::new(
            response.bytes_stream(),
            drop_vertex_events,
            move |outcome: StreamOutcome| {
                let result = if outcome.completed {
                    "ok"
                } else if outcome.client_gone {
                    "client_gone"
                } else {
                    "stream_error"
                };
                log.emit(200, Some(outcome.usage), result);
            },
        );
        let response = builder
            .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(body))
            .expect("static headers are valid");
        return Ok(response);
    }

    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/json"));
    let bytes = match response.bytes().await {
        Ok(bytes) => bytes,
        Err(e) => {
            let error = crate::upstream::classify_send_error(&region, e);
            log.emit(error.kind_and_status().1.as_u16(), None, "transport");
            return Err(error);
        }
    };
    let usage = if call.op == Operation::Messages {
        usage_from_message_body(&bytes)
    } else {
        None
    };
    log.emit(200, usage, "ok");
    Ok(builder
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(bytes))
        .expect("headers are valid"))
}

/// What the one log line per request says.
struct RequestLog {
    request_id: RequestId,
    tenant: Tenant,
    model: String,
    region: String,
    started: Instant,
}

impl RequestLog {
    fn emit(&self, status: u16, usage: Option<Usage>, outcome: &'static str) {
        let usage = usage.unwrap_or_default();
        tracing::info!(
            target: "spillway::request",
            request_id = %self.request_id.0,
            tenant = %self.tenant.name,
            model = %self.model,
            region = %self.region,
            status,
            outcome,
            input_tokens = usage.total_input(),
            output_tokens = usage.output_tokens,
            latency_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
}
