//! The client-facing HTTP surface: thin handlers that turn a request into a
//! [`CallRequest`], hand it to the
//! [`Forwarder`](crate::forwarder::Forwarder), and render what comes back
//! (an [`Answer`] or a [`ForwardError`](crate::answer::ForwardError)) as HTTP.
//!
//! Two surfaces lead to the same call:
//! - **Vertex-style**, for `AnthropicVertex(base_url=".../v1")`:
//!   `POST /v1/projects/{p}/locations/{l}/publishers/anthropic/models/{model}:rawPredict`
//!   (and `:streamRawPredict`, and `count-tokens:rawPredict`). The path's
//!   project is ignored (Spillway bills its own) and its location is only a
//!   hint: choosing the region is Spillway's job.
//! - **Anthropic-style**, for `Anthropic(base_url=...)`: `POST /v1/messages`
//!   and `/v1/messages/count_tokens` with `model` in the body.
//!
//! Every check on the request's form runs here: content type, size, JSON,
//! the Messages rules. The checks on what it asks for (model, locations,
//! context window, can ever fit, tenant caps) run in the forwarder before it
//! asks for quota. Either way a refused request never reaches upstream.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde_json::{Map, Value};
use spillway_vertex::{
    parse_body, parse_model_action, validate, Operation, RequestSummary, Specifier,
    COUNT_TOKENS_MODEL,
};

use crate::answer::{Answer, Served};
use crate::error::ApiError;
use crate::forwarder::{CallRequest, Forwarded};
use crate::observer::RequestRecord;
use crate::request_id::RequestId;
use crate::scheduler::Priority;
use crate::state::AppState;
use crate::telemetry::RequestSpan;
use crate::tenants::Tenant;

/// Reads and parses a JSON body, enforcing content type and size first.
async fn read_json(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Map<String, Value>, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::UnsupportedMediaType(content_type));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge { limit });
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|e| body_error(&e, limit))?;
    Ok(parse_body(&bytes)?)
}

/// Why a body could not be read: too slow (408), too large (413), or
/// the connection broke (400; the client will not see it anyway).
fn body_error(error: &axum::Error, limit: usize) -> ApiError {
    if let Some(timed_out) = crate::client_limits::BodyTimedOut::find(error) {
        return ApiError::RequestTimeout(timed_out.to_string());
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return ApiError::TooLarge { limit };
        }
        cause = e.source();
    }
    ApiError::BadRequest(format!("reading the request body: {error}"))
}

/// `x-spillway-regions: a,b`: narrow the regions (data residency).
fn region_hint(headers: &HeaderMap) -> Result<Option<Vec<String>>, ApiError> {
    let Some(value) = headers.get("x-spillway-regions") else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::BadRequest("x-spillway-regions: not ASCII".into()))?;
    let regions: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_string)
        .collect();
    if regions.is_empty() {
        return Err(ApiError::BadRequest(
            "x-spillway-regions: name at least one region".into(),
        ));
    }
    Ok(Some(regions))
}

/// `x-spillway-max-wait-ms: N`: how long to wait for quota (0: fail fast).
fn max_wait(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(value) = headers.get("x-spillway-max-wait-ms") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|ms| Some(Duration::from_millis(ms)))
        .ok_or_else(|| {
            ApiError::BadRequest(
                "x-spillway-max-wait-ms: expected a whole number of milliseconds".into(),
            )
        })
}

/// The parts of a call that come from the client's request, not its body.
struct Caller {
    tenant: Tenant,
    request_id: RequestId,
    headers: HeaderMap,
    /// The request's span (traces on): the call's spans continue it.
    span: Option<RequestSpan>,
}

impl Caller {
    fn request(
        self,
        op: Operation,
        body: Map<String, Value>,
        summary: &RequestSummary,
        stream_endpoint: bool,
    ) -> Result<CallRequest, ApiError> {
        Ok(CallRequest {
            op,
            stream: summary.stream,
            stream_endpoint,
            max_tokens: summary.max_tokens.unwrap_or(0),
            body,
            beta: self.headers.get("anthropic-beta").cloned(),
            region_hint: region_hint(&self.headers)?,
            max_wait: max_wait(&self.headers)?,
            priority: Priority::Interactive,
            tenant: self.tenant,
            request_id: self.request_id,
            span: self.span,
        })
    }
}

/// Prepares and forwards one call for model `name`, and renders the result.
async fn forward(state: &AppState, name: &str, request: CallRequest) -> Result<Response, ApiError> {
    let call = state.forwarder.prepare(name, request)?;
    // Boxed here, once: the call's future is ~10 KiB, and every layer
    // above (handler, middleware, router) would otherwise hold it inline
    // and copy it each time it is moved into a box of its own.
    let forwarded = Box::pin(state.forwarder.forward(call)).await;
    Ok(render(forwarded))
}

/// A forwarded call as an HTTP response, carrying its record for the
/// observer layer.
fn render(forwarded: Forwarded) -> Response {
    let Forwarded { trace, result } = forwarded;
    let (mut response, record) = match result {
        Ok(Answer::Unary {
            body,
            content_type,
            usage,
            served,
        }) => {
            let mut response = Response::new(Body::from(body));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, content_type);
            success_headers(response.headers_mut(), &served);
            let record = RequestRecord::Done {
                trace,
                status: 200,
                usage,
            };
            (response, record)
        }
        Ok(Answer::Stream {
            events,
            end,
            served,
        }) => {
            let mut response = Response::new(Body::from_stream(events));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            success_headers(headers, &served);
            (response, RequestRecord::Streaming { trace, end })
        }
        Err(error) => {
            let status = ApiError::status_of(&error);
            let response = ApiError::from(error).into_response();
            let record = RequestRecord::Done {
                trace,
                status,
                usage: None,
            };
            (response, record)
        }
    };
    response.extensions_mut().insert(record);
    response
}

fn success_headers(headers: &mut HeaderMap, served: &Served) {
    if let Ok(v) = HeaderValue::from_str(&served.region) {
        headers.insert("x-spillway-region", v);
    }
    headers.insert(
        "x-spillway-provider",
        HeaderValue::from_static(served.provider),
    );
    if let Some(warning) = served
        .alias_warning
        .as_deref()
        .and_then(|w| HeaderValue::from_str(w).ok())
    {
        headers.insert(header::WARNING, warning);
    }
    if let Some(view) = &served.budget {
        crate::ratelimit::add_budget_headers(headers, view);
    }
}

/// `POST /v1/messages` and `POST /v1/messages/count_tokens`.
async fn anthropic_surface(
    state: Arc<AppState>,
    op: Operation,
    caller: Caller,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_json(&caller.headers, body, state.settings.server.max_body_bytes).await?;
    let summary = validate(&body, op, true)?;
    let name = summary.model.clone().unwrap_or_default();
    let stream = summary.stream;
    let request = caller.request(op, body, &summary, stream)?;
    forward(&state, &name, request).await
}

pub async fn messages(
    State(state): State<Arc<AppState>>,
    Extension(tenant): Extension<Tenant>,
    Extension(request_id): Extension<RequestId>,
    span: Option<Extension<RequestSpan>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = Caller {
        tenant,
        request_id,
        headers,
        span: span.map(|Extension(s)| s),
    };
    anthropic_surface(state, Operation::Messages, caller, body).await
}

pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    Extension(tenant): Extension<Tenant>,
    Extension(request_id): Extension<RequestId>,
    span: Option<Extension<RequestSpan>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = Caller {
        tenant,
        request_id,
        headers,
        span: span.map(|Extension(s)| s),
    };
    anthropic_surface(state, Operation::CountTokens, caller, body).await
}

/// `POST /v1/projects/{p}/locations/{l}/publishers/anthropic/models/{model}:{action}`.
pub async fn vertex_predict(
    State(state): State<Arc<AppState>>,
    Extension(tenant): Extension<Tenant>,
    Extension(request_id): Extension<RequestId>,
    span: Option<Extension<RequestSpan>>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path((_project, _location_hint, model_action)) =
        path.map_err(|e| ApiError::NotFound(format!("path: {e}")))?;
    // The route cannot split `{model}:{action}` itself (one segment).
    let (model_name, specifier) = parse_model_action(&model_action).ok_or_else(|| {
        ApiError::NotFound(format!(
            "{model_action:?}: expected MODEL:rawPredict or MODEL:streamRawPredict"
        ))
    })?;
    let caller = Caller {
        tenant,
        request_id,
        headers,
        span: span.map(|Extension(s)| s),
    };
    let path_stream = specifier == Specifier::StreamRawPredict;
    let mut body = read_json(&caller.headers, body, state.settings.server.max_body_bytes).await?;
    if model_name == COUNT_TOKENS_MODEL {
        if path_stream {
            return Err(ApiError::NotFound(
                "count-tokens supports rawPredict only".into(),
            ));
        }
        let summary = validate(&body, Operation::CountTokens, true)?;
        let name = summary.model.clone().unwrap_or_default();
        let request = caller.request(Operation::CountTokens, body, &summary, false)?;
        return forward(&state, &name, request).await;
    }
    // An unknown model is the first thing to say, before the body's rules.
    state.forwarder.resolve(model_name)?;
    let mut summary = validate(&body, Operation::Messages, false)?;
    if path_stream && !summary.stream {
        // The endpoint is the client's explicit choice; keep the body consistent.
        body.insert("stream".into(), Value::Bool(true));
        summary.stream = true;
    }
    // `"stream": true` sent to `:rawPredict` goes to `:rawPredict` as sent:
    // whatever Vertex answers (events or JSON) is relayed and accounted.
    let request = caller.request(Operation::Messages, body, &summary, path_stream)?;
    forward(&state, model_name, request).await
}

pub async fn healthz() -> &'static str {
    "ok"
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.forwarder.lifecycle().is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    match state.forwarder.providers().ready().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response(),
    }
}

pub async fn not_found(uri: http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
