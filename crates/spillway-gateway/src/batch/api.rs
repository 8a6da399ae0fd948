//! The Message Batches API over HTTP, as Anthropic defines it, so the
//! official SDKs' `client.messages.batches.*` work against Spillway:
//!
//! | call | route |
//! |---|---|
//! | create | `POST /v1/messages/batches` (JSON `{"requests": [...]}`, or JSONL with `content-type: application/x-ndjson`) |
//! | retrieve | `GET /v1/messages/batches/{id}` |
//! | list | `GET /v1/messages/batches?before_id&after_id&limit` (newest first) |
//! | cancel | `POST /v1/messages/batches/{id}/cancel` |
//! | delete | `DELETE /v1/messages/batches/{id}` (ended batches only) |
//! | results | `GET /v1/messages/batches/{id}/results` (JSONL, streamed) |
//!
//! Routes sit behind the auth layer; every store query is keyed by the
//! caller's tenant, so another tenant's batch id is a plain 404.

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use futures::TryStreamExt;
use http::{header, HeaderMap};
use serde::Deserialize;
use serde_json::json;
use spillway_vertex::{validate, Operation};
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::jsonl::{self, Format, Limits, RawRequest};
use super::store::{BatchStore, DeleteOutcome, NewBatch, NewItem, PageQuery};
use super::{check_custom_id, is_batch_id, new_batch_id, BatchError, BatchService};
use crate::error::ApiError;
use crate::forwarder::{CallRequest, Forwarder};
use crate::request_id::RequestId;
use crate::scheduler::Priority;
use crate::telemetry::RequestSpan;
use crate::tenants::Tenant;

/// A batch expires this long after it was created.
pub const EXPIRY_MS: i64 = 24 * 3_600_000;
/// Items written to the store per transaction during an upload.
const INSERT_CHUNK: usize = 1_000;
/// Result rows read from the store per page while streaming results.
const RESULTS_PAGE: i64 = 1_000;

/// What the batch handlers share.
pub struct BatchApi {
    /// `None` when `batch.enabled = false`: every route answers 404.
    pub service: Option<Arc<BatchService>>,
    /// Items are validated by the forwarder's own checks, as interactive
    /// requests are.
    pub forwarder: Arc<Forwarder>,
    /// `server.listen`, the default base of `results_url`.
    pub listen: std::net::SocketAddr,
    /// `https` on a TLS listener, else `http`.
    pub scheme: &'static str,
}

/// The batch routes (mounted behind client auth by the server).
pub fn routes() -> Router<Arc<BatchApi>> {
    Router::new()
        .route("/v1/messages/batches", post(create).get(list))
        .route("/v1/messages/batches/{id}", get(retrieve).delete(delete))
        .route("/v1/messages/batches/{id}/cancel", post(cancel))
        .route("/v1/messages/batches/{id}/results", get(results))
}

fn service(state: &BatchApi) -> Result<&Arc<BatchService>, ApiError> {
    state
        .service
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("message batches are disabled on this gateway".into()))
}

fn base_url(state: &BatchApi, service: &BatchService, headers: &HeaderMap) -> String {
    service.base_url(state.scheme, state.listen, headers)
}

fn checked_id(id: &str) -> Result<&str, ApiError> {
    if is_batch_id(id) {
        Ok(id)
    } else {
        Err(BatchError::NotFound(id.chars().take(80).collect()).into())
    }
}

/// Logs what a batch API call did (the observer layer logs the request).
fn log_call(request_id: &RequestId, tenant: &Tenant, action: &'static str, batch: &str) {
    tracing::info!(
        target: "spillway::batch_api",
        request_id = %request_id,
        tenant = %tenant.name,
        action,
        batch,
        "batch api"
    );
}

/// Checks one uploaded request with the rules of an interactive one and
/// turns it into a stored item.
fn validate_item(
    state: &BatchApi,
    tenant: &Tenant,
    raw: RawRequest,
    seen: &mut HashSet<String>,
) -> Result<NewItem, BatchError> {
    let at = &raw.location;
    check_custom_id(&raw.custom_id)
        .map_err(|m| BatchError::Invalid(format!("{at}.custom_id: {m}")))?;
    if !seen.insert(raw.custom_id.clone()) {
        return Err(BatchError::Invalid(format!(
            "{at}.custom_id: {:?} is used by an earlier request; custom_id must be unique within a batch",
            raw.custom_id
        )));
    }
    let summary = validate(&raw.params, Operation::Messages, true)
        .map_err(|e| BatchError::Invalid(format!("{at}.params: {e}")))?;
    if summary.stream {
        return Err(BatchError::Invalid(format!(
            "{at}.params.stream: batch requests cannot stream"
        )));
    }
    let name = summary.model.as_deref().unwrap_or_default();
    let params = serde_json::to_string(&raw.params).expect("a JSON map serializes");
    let request = CallRequest {
        op: Operation::Messages,
        stream: false,
        stream_endpoint: false,
        max_tokens: summary.max_tokens.unwrap_or(0),
        body: raw.params,
        beta: None,
        region_hint: None,
        max_wait: None,
        priority: Priority::Batch,
        tenant: tenant.clone(),
        request_id: RequestId::from("batch-validation".to_string()),
        span: None,
    };
    let call = state
        .forwarder
        .prepare(name, request)
        .map_err(|e| BatchError::Invalid(format!("{at}.params.model: {e}")))?;
    state
        .forwarder
        .precheck(&call)
        .map_err(|e| BatchError::Invalid(format!("{at}.params: {e}")))?;
    Ok(NewItem {
        custom_id: raw.custom_id,
        params,
    })
}

/// Drops a staging batch unless the upload completed (client gone, invalid
/// item, store failure).
struct Staging {
    store: Arc<dyn BatchStore>,
    seq: i64,
    done: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (store, seq) = (Arc::clone(&self.store), self.seq);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = store.discard(seq).await {
                    tracing::warn!(error = %e, "dropping an unfinished batch upload failed; maintenance will");
                }
            });
        }
    }
}

/// `POST /v1/messages/batches`
pub async fn create(
    State(state): State<Arc<BatchApi>>,
    Extension(tenant): Extension<Tenant>,
    Extension(request_id): Extension<RequestId>,
    span: Option<Extension<RequestSpan>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Stored with the batch: its items' spans link to this request's.
    let traceparent = span.map(|Extension(span)| span.traceparent());
    let result = create_batch(&state, &tenant, &headers, body, traceparent).await;
    let outcome = match &result {
        Ok(id) => id.clone(),
        Err(e) => format!("rejected: {e}"),
    };
    log_call(&request_id, &tenant, "create", &outcome);
    retrieve_json(&state, &tenant, &result?, &headers).await
}

async fn create_batch(
    state: &Arc<BatchApi>,
    tenant: &Tenant,
    headers: &HeaderMap,
    body: Body,
    traceparent: Option<String>,
) -> Result<String, ApiError> {
    let service = service(state)?;
    let settings = service.settings();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let format = Format::from_content_type(&content_type)
        .ok_or(BatchError::UnsupportedMediaType(content_type))?;
    let limits = Limits {
        max_bytes: settings.max_body_bytes,
        max_requests: settings.max_requests,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes) {
        return Err(BatchError::TooLarge {
            limit: limits.max_bytes,
        }
        .into());
    }

    let now = service.now_ms();
    let batch = NewBatch {
        id: new_batch_id(),
        tenant: tenant.name.to_string(),
        created_at: now,
        expires_at: now + EXPIRY_MS,
        traceparent,
    };
    let store = Arc::clone(service.store());
    let seq = store.create(&batch).await.map_err(ApiError::from)?;
    let mut staging = Staging {
        store: Arc::clone(&store),
        seq,
        done: false,
    };

    // The body, as a blocking reader for the parser's thread.
    let stream =
        body.into_data_stream()
            .map_err(|e| match crate::client_limits::BodyTimedOut::find(&e) {
                Some(t) => std::io::Error::new(std::io::ErrorKind::TimedOut, t),
                None => std::io::Error::other(e.to_string()),
            });
    let reader = SyncIoBridge::new(StreamReader::new(Box::pin(stream)));
    let (chunks, mut received) = tokio::sync::mpsc::channel::<Vec<NewItem>>(2);
    let (parse_state, parse_tenant) = (Arc::clone(state), tenant.clone());
    let parser = tokio::task::spawn_blocking(move || {
        let mut seen = HashSet::new();
        let mut chunk = Vec::with_capacity(INSERT_CHUNK);
        let gone = || BatchError::Body("the upload stopped before it was stored".into());
        let count = jsonl::parse(reader, format, limits, |raw| {
            chunk.push(validate_item(&parse_state, &parse_tenant, raw, &mut seen)?);
            if chunk.len() == INSERT_CHUNK {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(INSERT_CHUNK));
                chunks.blocking_send(full).map_err(|_| gone())?;
            }
            Ok(())
        })?;
        if !chunk.is_empty() {
            chunks.blocking_send(chunk).map_err(|_| gone())?;
        }
        Ok::<usize, BatchError>(count)
    });
    let mut next_idx = 0i64;
    while let Some(chunk) = received.recv().await {
        store.insert_items(seq, next_idx, &chunk).await?;
        next_idx += chunk.len() as i64;
    }
    let count = parser
        .await
        .map_err(|e| ApiError::Internal(format!("batch upload parser: {e}")))??;
    debug_assert_eq!(count as i64, next_idx);
    store.activate(seq, next_idx).await?;
    staging.done = true;
    service.notify();
    tracing::info!(batch = %batch.id, tenant = %tenant.name, requests = count, "batch created");
    Ok(batch.id)
}

async fn retrieve_json(
    state: &BatchApi,
    tenant: &Tenant,
    id: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let service = service(state)?;
    let record = service
        .store()
        .get(&tenant.name, checked_id(id)?)
        .await?
        .ok_or_else(|| BatchError::NotFound(id.to_string()))?;
    Ok(Json(record.to_json(&base_url(state, service, headers))).into_response())
}

/// `GET /v1/messages/batches/{id}`
pub async fn retrieve(
    State(state): State<Arc<BatchApi>>,
    Extension(tenant): Extension<Tenant>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    log_call(&request_id, &tenant, "retrieve", &id);
    retrieve_json(&state, &tenant, &id, &headers).await
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    before_id: Option<String>,
    after_id: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/messages/batches`
pub async fn list(
    State(state): State<Arc<BatchApi>>,
    Extension(tenant): Extension<Tenant>,
    Extension(request_id): Extension<RequestId>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    log_call(&request_id, &tenant, "list", "");
    list_page(&state, &tenant, query, &headers).await
}

async fn list_page(
    state: &BatchApi,
    tenant: &Tenant,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let service = service(state)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("query: {e}")))?;
    let limit = match q.limit.as_deref() {
        None => 20,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::BadRequest(format!("limit: must be 1 to 1000, not {text:?}"))
            })?,
    };
    if q.before_id.is_some() && q.after_id.is_some() {
        return Err(ApiError::BadRequest(
            "give before_id or after_id, not both".into(),
        ));
    }
    for cursor in [&q.before_id, &q.after_id].into_iter().flatten() {
        checked_id(cursor)?;
    }
    let page = PageQuery {
        before_id: q.before_id.clone(),
        after_id: q.after_id.clone(),
        limit,
    };
    let (records, has_more) = service
        .store()
        .list(&tenant.name, &page)
        .await?
        .ok_or_else(|| BatchError::NotFound(q.after_id.or(q.before_id).unwrap_or_default()))?;
    let base = base_url(state, service, headers);
    Ok(Json(json!({
        "data": records.iter().map(|r| r.to_json(&base)).collect::<Vec<_>>(),
        "has_more": has_more,
        "first_id": records.first().map(|r| r.id.as_str()),
        "last_id": records.last().map(|r| r.id.as_str()),
    }))
    .into_response())
}

/// `POST /v1/messages/batches/{id}/cancel`
pub async fn cancel(
    State(state): State<Arc<BatchApi>>,
    Extension(tenant): Extension<Tenant>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    log_call(&request_id, &tenant, "cancel", &id);
    cancel_batch(&state, &tenant, &id, &headers).await
}

async fn cancel_batch(
    state: &BatchApi,
    tenant: &Tenant,
    id: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let service = service(state)?;
    let id = checked_id(id)?;
    let store = service.store();
    let before = store
        .get(&tenant.name, id)
        .await?
        .ok_or_else(|| BatchError::NotFound(id.to_string()))?;
    let record = store
        .cancel(&tenant.name, id, service.now_ms())
        .await?
        .ok_or_else(|| BatchError::NotFound(id.to_string()))?;
    service.canceled(record.counts.canceled - before.counts.canceled);
    Ok(Json(record.to_json(&base_url(state, service, headers))).into_response())
}

/// `DELETE /v1/messages/batches/{id}`
pub async fn delete(
    State(state): State<Arc<BatchApi>>,
    Extension(tenant): Extension<Tenant>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    log_call(&request_id, &tenant, "delete", &id);
    delete_batch(&state, &tenant, &id).await
}

async fn delete_batch(state: &BatchApi, tenant: &Tenant, id: &str) -> Result<Response, ApiError> {
    let service = service(state)?;
    let id = checked_id(id)?;
    match service.store().delete(&tenant.name, id).await? {
        DeleteOutcome::Deleted => {
            Ok(Json(json!({"id": id, "type": "message_batch_deleted"})).into_response())
        }
        DeleteOutcome::NotFound => Err(BatchError::NotFound(id.to_string()).into()),
        DeleteOutcome::NotEnded => Err(BatchError::Conflict(format!(
            "message batch {id} is still processing; only ended batches can be deleted (cancel it first)"
        ))
        .into()),
    }
}

/// `GET /v1/messages/batches/{id}/results`
pub async fn results(
    State(state): State<Arc<BatchApi>>,
    Extension(tenant): Extension<Tenant>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    log_call(&request_id, &tenant, "results", &id);
    stream_results(&state, &tenant, &id).await
}

/// One results line.
fn result_line(row: &super::store::ResultRow) -> String {
    let custom_id = serde_json::to_string(&row.custom_id).expect("strings serialize");
    match (&row.result, row.state.as_str()) {
        (Some(result), _) => format!("{{\"custom_id\":{custom_id},\"result\":{result}}}\n"),
        (None, state) => {
            format!("{{\"custom_id\":{custom_id},\"result\":{{\"type\":\"{state}\"}}}}\n")
        }
    }
}

async fn stream_results(state: &BatchApi, tenant: &Tenant, id: &str) -> Result<Response, ApiError> {
    let service = service(state)?;
    let id = checked_id(id)?;
    let store = Arc::clone(service.store());
    let record = store
        .get(&tenant.name, id)
        .await?
        .ok_or_else(|| BatchError::NotFound(id.to_string()))?;
    if record.status != super::ProcessingStatus::Ended {
        return Err(BatchError::Conflict(format!(
            "results of message batch {id} are available once it has ended (processing_status is {})",
            record.status.as_str()
        ))
        .into());
    }
    let seq = store
        .seq_of(&tenant.name, id)
        .await?
        .ok_or_else(|| BatchError::NotFound(id.to_string()))?;
    // Page through the store: at most one page is held at a time.
    let pages = futures::stream::try_unfold(Some(-1i64), move |after| {
        let store = Arc::clone(&store);
        async move {
            let Some(after) = after else {
                return Ok(None);
            };
            let rows = store
                .results_page(seq, after, RESULTS_PAGE)
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "reading batch results failed mid-stream");
                    std::io::Error::other(e.to_string())
                })?;
            let next =
                (rows.len() as i64 == RESULTS_PAGE).then(|| rows.last().map_or(after, |r| r.idx));
            let text: String = rows.iter().map(result_line).collect();
            Ok::<_, std::io::Error>(Some((Bytes::from(text), next)))
        }
    })
    .try_filter(|chunk| futures::future::ready(!chunk.is_empty()));
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-jsonl")
        .body(Body::from_stream(pages))
        .expect("static headers are valid"))
}
