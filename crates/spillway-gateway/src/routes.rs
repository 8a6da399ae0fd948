//! The client-facing HTTP surface: thin handlers that turn a request into a
//! [`proxy::Call`](crate::proxy::Call).
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
//! Every check that can reject a request runs here, before anything is
//! sent: content type, size, JSON, the Messages rules, the model.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use http::{header, HeaderMap, StatusCode};
use serde_json::{Map, Value};
use spillway_core::Resolution;
use spillway_vertex::{
    anthropic_to_vertex_id, is_valid_model_id, parse_body, parse_model_action, validate, Operation,
    RequestSummary, Specifier, COUNT_TOKENS_MODEL,
};

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::proxy::{forward, Call};
use crate::request_id::RequestId;
use crate::scheduler::Priority;
use crate::server::AppState;

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
        .map_err(|_| ApiError::TooLarge { limit })?;
    Ok(parse_body(&bytes)?)
}

/// Resolves a client's model name: Vertex id, Anthropic id, or alias.
pub(crate) fn resolve_model<'a>(
    state: &'a AppState,
    name: &str,
) -> Result<Resolution<'a>, ApiError> {
    let not_found = || ApiError::NotFound(format!("model: {name}"));
    if !is_valid_model_id(name) {
        return Err(not_found());
    }
    state
        .catalog
        .resolve(name)
        .or_else(|| anthropic_to_vertex_id(name).and_then(|id| state.catalog.resolve(&id)))
        .ok_or_else(not_found)
}

fn alias_warning(name: &str, resolution: &Resolution<'_>) -> Option<String> {
    resolution.via_alias.then(|| {
        tracing::warn!(
            alias = name,
            model = %resolution.model.id,
            "model alias resolved; Google advises pinning versioned model ids"
        );
        format!(
            "299 spillway \"model alias {name} resolved to {}; Google advises versioned model ids\"",
            resolution.model.id
        )
    })
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

#[allow(clippy::too_many_arguments)]
fn new_call<'a>(
    op: Operation,
    name: &str,
    resolution: Resolution<'a>,
    body: Map<String, Value>,
    summary: &RequestSummary,
    headers: &HeaderMap,
    tenant: Tenant,
    request_id: RequestId,
) -> Result<Call<'a>, ApiError> {
    Ok(Call {
        op,
        model: resolution.model,
        alias_warning: alias_warning(name, &resolution),
        stream: summary.stream,
        max_tokens: summary.max_tokens.unwrap_or(0),
        body,
        beta: headers.get("anthropic-beta").cloned(),
        region_hint: region_hint(headers)?,
        max_wait: max_wait(headers)?,
        priority: Priority::Interactive,
        tenant,
        request_id,
    })
}

/// `POST /v1/messages` and `POST /v1/messages/count_tokens`.
async fn anthropic_surface(
    state: Arc<AppState>,
    op: Operation,
    tenant: Tenant,
    request_id: RequestId,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_json(&headers, body, state.settings.server.max_body_bytes).await?;
    let summary = validate(&body, op, true)?;
    let name = summary.model.as_deref().unwrap_or_default();
    let resolution = resolve_model(&state, name)?;
    let call = new_call(
        op, name, resolution, body, &summary, &headers, tenant, request_id,
    )?;
    forward(&state, call).await
}

pub async fn messages(
    State(state): State<Arc<AppState>>,
    Extension(tenant): Extension<Tenant>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    anthropic_surface(
        state,
        Operation::Messages,
        tenant,
        request_id,
        headers,
        body,
    )
    .await
    .unwrap_or_else(IntoResponse::into_response)
}

pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    Extension(tenant): Extension<Tenant>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    anthropic_surface(
        state,
        Operation::CountTokens,
        tenant,
        request_id,
        headers,
        body,
    )
    .await
    .unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/projects/{p}/locations/{l}/publishers/anthropic/models/{model}:{action}`.
pub async fn vertex_predict(
    State(state): State<Arc<AppState>>,
    Extension(tenant): Extension<Tenant>,
    Extension(request_id): Extension<RequestId>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    vertex_surface(state, tenant, request_id, path, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn vertex_surface(
    state: Arc<AppState>,
    tenant: Tenant,
    request_id: RequestId,
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
    let path_stream = specifier == Specifier::StreamRawPredict;
    let mut body = read_json(&headers, body, state.settings.server.max_body_bytes).await?;
    if model_name == COUNT_TOKENS_MODEL {
        if path_stream {
            return Err(ApiError::NotFound(
                "count-tokens supports rawPredict only".into(),
            ));
        }
        let summary = validate(&body, Operation::CountTokens, true)?;
        let name = summary.model.as_deref().unwrap_or_default();
        let resolution = resolve_model(&state, name)?;
        let call = new_call(
            Operation::CountTokens,
            name,
            resolution,
            body,
            &summary,
            &headers,
            tenant,
            request_id,
        )?;
        return forward(&state, call).await;
    }
    let resolution = resolve_model(&state, model_name)?;
    let mut summary = validate(&body, Operation::Messages, false)?;
    if summary.stream && !path_stream {
        return Err(ApiError::BadRequest(
            "stream: true must be sent to :streamRawPredict, not :rawPredict".into(),
        ));
    }
    if path_stream && !summary.stream {
        // The endpoint is the client's explicit choice; keep the body consistent.
        body.insert("stream".into(), Value::Bool(true));
        summary.stream = true;
    }
    let call = new_call(
        Operation::Messages,
        model_name,
        resolution,
        body,
        &summary,
        &headers,
        tenant,
        request_id,
    )?;
    forward(&state, call).await
}

pub async fn healthz() -> &'static str {
    "ok"
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.upstream.ready().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response(),
    }
}

pub async fn not_found(uri: http::Uri) -> Response {
    ApiError::NotFound(format!("no route for {}", uri.path())).into_response()
}

pub async fn method_not_allowed() -> Response {
    ApiError::MethodNotAllowed.into_response()
}
