//! The control API: drive the simulator over HTTP (for `spillway demo`, the
//! Python SDK tests and benchmarks). Everything here is also available on
//! [`crate::SimHandle`] for in-process tests. No authentication.
//!
//! | method and path | body | effect |
//! |---|---|---|
//! | `GET /_sim/counters` | | `{"total_requests":N,"tokens_issued":N,"regions":{region:{model:counters}}}` |
//! | `POST /_sim/reset` | | clears counters, quota windows, faults, recorded requests |
//! | `GET /_sim/faults` | | the active faults |
//! | `POST /_sim/faults` | a `Fault` (see `faults`) | adds it (201) |
//! | `DELETE /_sim/faults` | | clears all faults |
//! | `GET /_sim/quota` | | `{region:{model:limits}}` |
//! | `PUT /_sim/quota` | `{"region","model","requests_per_min","tokens_per_min","input_tokens_per_min"?,"output_tokens_per_min"?}` | sets the limits (offering the model in that region if it was not) |
//! | `PUT /_sim/output-tokens` | `{"default_output_tokens":N}` | sets the default answer length |
//! | `GET /_sim/requests` | | the last 64 requests (`RecordedRequest`s), oldest first |
//!
//! Malformed bodies get `400 {"error":"..."}`.

use std::sync::atomic::Ordering;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::faults::Fault;
use crate::quota::QuotaLimits;
use crate::state::SharedState;

/// Body of `PUT /_sim/quota`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaUpdate {
    region: String,
    model: String,
    requests_per_min: u32,
    tokens_per_min: u64,
    #[serde(default)]
    input_tokens_per_min: Option<u64>,
    #[serde(default)]
    output_tokens_per_min: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputTokens {
    default_output_tokens: u32,
}

pub(crate) fn routes() -> Router<SharedState> {
    Router::new()
        .route("/_sim/counters", get(counters))
        .route("/_sim/reset", post(reset))
        .route(
            "/_sim/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/_sim/quota", put(set_quota).get(get_quota))
        .route("/_sim/output-tokens", put(set_output_tokens))
        .route("/_sim/requests", get(requests))
}

fn bad_request(e: JsonRejection) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": e.body_text()})),
    )
        .into_response()
}

async fn counters(State(st): State<SharedState>) -> Response {
    Json(json!({
        "total_requests": st.total_requests.load(Ordering::Relaxed),
        "tokens_issued": st.oauth.issued(),
        "regions": st.all_counters(),
    }))
    .into_response()
}

async fn reset(State(st): State<SharedState>) -> StatusCode {
    st.reset();
    StatusCode::NO_CONTENT
}

async fn list_faults(State(st): State<SharedState>) -> Response {
    Json(st.faults.list()).into_response()
}

async fn add_fault(
    State(st): State<SharedState>,
    fault: Result<Json<Fault>, JsonRejection>,
) -> Response {
    match fault {
        Ok(Json(f)) => {
            st.faults.add(f);
            StatusCode::CREATED.into_response()
        }
        Err(e) => bad_request(e),
    }
}

async fn clear_faults(State(st): State<SharedState>) -> StatusCode {
    st.faults.clear();
    st.release_hangs();
    StatusCode::NO_CONTENT
}

async fn set_quota(
    State(st): State<SharedState>,
    update: Result<Json<QuotaUpdate>, JsonRejection>,
) -> Response {
    match update {
        Ok(Json(q)) => {
            st.set_limits(
                &q.region,
                &q.model,
                QuotaLimits {
                    requests_per_min: q.requests_per_min,
                    tokens_per_min: q.tokens_per_min,
                    input_tokens_per_min: q.input_tokens_per_min,
                    output_tokens_per_min: q.output_tokens_per_min,
                },
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => bad_request(e),
    }
}

async fn get_quota(State(st): State<SharedState>) -> Response {
    let limits = st.all_limits();
    let out: serde_json::Map<String, serde_json::Value> = limits
        .into_iter()
        .map(|(region, models)| {
            let m: serde_json::Map<String, serde_json::Value> = models
                .into_iter()
                .map(|(id, l)| {
                    (
                        id,
                        json!({
                            "requests_per_min": l.requests_per_min,
                            "tokens_per_min": l.tokens_per_min,
                            "input_tokens_per_min": l.input_tokens_per_min,
                            "output_tokens_per_min": l.output_tokens_per_min,
                        }),
                    )
                })
                .collect();
            (region, serde_json::Value::Object(m))
        })
        .collect();
    Json(out).into_response()
}

async fn set_output_tokens(
    State(st): State<SharedState>,
    body: Result<Json<OutputTokens>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(b)) => {
            st.default_output_tokens
                .store(b.default_output_tokens, Ordering::Relaxed);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => bad_request(e),
    }
}

async fn requests(State(st): State<SharedState>) -> Response {
    Json(st.recorder.snapshot()).into_response()
}
