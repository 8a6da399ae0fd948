//! The control API: drive the simulator over HTTP (for `spillway demo`, the
//! Python SDK tests and benchmarks). Everything here is also available on
//! [`crate::SimHandle`] for in-process tests. No authentication.
//!
//! | method and path | body | effect |
//! |---|---|---|
//! | `GET /_sim/counters` | | `{"total_requests":N,"tokens_issued":N,"regions":{region:{model:counters}}}` |
//! | `POST /_sim/reset` | | clears counters, quota windows and admission logs, faults, refusals, recorded requests |
//! | `GET /_sim/faults` | | the active faults |
//! | `POST /_sim/faults` | a `Fault` (see `faults`) | adds it (201) |
//! | `DELETE /_sim/faults` | | clears all faults |
//! | `GET /_sim/quota` | | `{region:{model:limits}}`; each entry also names its `bucket` and `base_model` |
//! | `PUT /_sim/quota` | `{"region","model","requests_per_min","tokens_per_min"?,"input_tokens_per_min"?,"output_tokens_per_min"?}` | sets the limits of the model's bucket (offering the model in that region if it was not); an absent token limit is not enforced |
//! | `GET /_sim/buckets` | | every quota bucket: `id`, `location_kind`, `base_model`, `models`, `limits`, `admitted`, `log_truncated`, `usage` (now) and `peak` (the most any window of the simulator's length held over the run; see `SimHandle::bucket_reports`) |
//! | `POST /_sim/models/refuse` | `{"region","model"}` | the region answers 404 `NOT_FOUND` for the model |
//! | `POST /_sim/models/allow` | `{"region","model"}` | undoes a refusal; `{"was_refused":bool}` |
//! | `GET /_sim/models/refused` | | `[{"region","model"}]` |
//! | `POST /_sim/rotate-token` | | revokes the bearer token(s); answers `{"bearer_token":"<new static token>"}` (tokens from `/token` issued later work too) |
//! | `PUT /_sim/output-tokens` | `{"default_output_tokens":N}` | sets the default answer length |
//! | `GET /_sim/requests` | | the last 64 requests (`RecordedRequest`s), oldest first |
//!
//! Anthropic's first-party surface (see `anthropic`; every route answers
//! `404 {"error":"anthropic mode is not configured"}` without it):
//!
//! | method and path | body | effect |
//! |---|---|---|
//! | `GET /_sim/anthropic/counters` | | `{"total":counters,"models":{model:counters}}` (`AnthropicCounters`) |
//! | `GET /_sim/anthropic/limits` | | `{model:{"limits":{requests_per_min,input_tokens_per_min,output_tokens_per_min},"levels":{requests,input_tokens,output_tokens: null or {limit,remaining,time_to_full (ms)}}}}`, exact floor levels now |
//! | `PUT /_sim/anthropic/limits` | `{"model","requests_per_min"?,"input_tokens_per_min"?,"output_tokens_per_min"?}` | sets the model's limits (absent: not enforced); levels kept, clamped; offers an unknown model (204) |
//! | `GET /_sim/anthropic/log` | | the complete log since start or reset (`AnthropicLog`: `period_ns`, `complete`, `dropped`, `limit_changes`, `entries`) |
//! | `GET /_sim/anthropic/report` | | `replay_admissions` of that log: `[AdmissionsReport]` (`model`, `limits`, `admitted`, `rate_limited`, `min_level`, `violations`, `levels_consistent`, `first_violation_seq`, `complete`) |
//! | `GET /_sim/anthropic/requests` | | the last 256 first-party requests (`AnthropicRequest`s), oldest first |
//!
//! `POST /_sim/reset` resets this surface too (buckets full, new log,
//! counters and requests cleared; key and limits kept). Faults aimed at it
//! use the region `anthropic` in `POST /_sim/faults`.
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
use crate::quota::{peak_usage, QuotaLimits};
use crate::ratelimit::{replay_admissions, AnthropicLimits};
use crate::state::SharedState;

/// Body of `PUT /_sim/quota`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaUpdate {
    region: String,
    model: String,
    requests_per_min: u32,
    #[serde(default)]
    tokens_per_min: Option<u64>,
    #[serde(default)]
    input_tokens_per_min: Option<u64>,
    #[serde(default)]
    output_tokens_per_min: Option<u64>,
}

/// Body of `POST /_sim/models/refuse` and `/allow`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelRef {
    region: String,
    model: String,
}

/// Body of `PUT /_sim/anthropic/limits`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnthropicLimitsUpdate {
    model: String,
    #[serde(default)]
    requests_per_min: Option<u64>,
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
        .route("/_sim/buckets", get(buckets))
        .route("/_sim/models/refuse", post(refuse_model))
        .route("/_sim/models/allow", post(allow_model))
        .route("/_sim/models/refused", get(refused_models))
        .route("/_sim/rotate-token", post(rotate_token))
        .route("/_sim/anthropic/counters", get(anthropic_counters))
        .route(
            "/_sim/anthropic/limits",
            get(anthropic_limits).put(set_anthropic_limits),
        )
        .route("/_sim/anthropic/log", get(anthropic_log))
        .route("/_sim/anthropic/report", get(anthropic_report))
        .route("/_sim/anthropic/requests", get(anthropic_requests))
}

fn no_anthropic() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "anthropic mode is not configured"})),
    )
        .into_response()
}

async fn anthropic_counters(State(st): State<SharedState>) -> Response {
    let Some(a) = &st.anthropic else {
        return no_anthropic();
    };
    let (total, models) = a.all_counters();
    Json(json!({"total": total, "models": models})).into_response()
}

async fn anthropic_limits(State(st): State<SharedState>) -> Response {
    let Some(a) = &st.anthropic else {
        return no_anthropic();
    };
    let out: serde_json::Map<String, serde_json::Value> = a
        .levels()
        .into_iter()
        .map(|(m, (limits, levels))| (m, json!({"limits": limits, "levels": levels})))
        .collect();
    Json(out).into_response()
}

async fn set_anthropic_limits(
    State(st): State<SharedState>,
    body: Result<Json<AnthropicLimitsUpdate>, JsonRejection>,
) -> Response {
    let Some(a) = &st.anthropic else {
        return no_anthropic();
    };
    match body {
        Ok(Json(u)) => {
            a.set_limits(
                &u.model,
                AnthropicLimits {
                    requests_per_min: u.requests_per_min,
                    input_tokens_per_min: u.input_tokens_per_min,
                    output_tokens_per_min: u.output_tokens_per_min,
                },
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => bad_request(e),
    }
}

async fn anthropic_log(State(st): State<SharedState>) -> Response {
    match &st.anthropic {
        Some(a) => Json(a.log()).into_response(),
        None => no_anthropic(),
    }
}

async fn anthropic_report(State(st): State<SharedState>) -> Response {
    match &st.anthropic {
        Some(a) => Json(replay_admissions(&a.log())).into_response(),
        None => no_anthropic(),
    }
}

async fn anthropic_requests(State(st): State<SharedState>) -> Response {
    match &st.anthropic {
        Some(a) => Json(a.recent()).into_response(),
        None => no_anthropic(),
    }
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
                .map(|(id, (bucket, l))| {
                    (
                        id,
                        json!({
                            "requests_per_min": l.requests_per_min,
                            "tokens_per_min": l.tokens_per_min,
                            "input_tokens_per_min": l.input_tokens_per_min,
                            "output_tokens_per_min": l.output_tokens_per_min,
                            "bucket": bucket,
                            "base_model": bucket.base_model(),
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

async fn buckets(State(st): State<SharedState>) -> Response {
    let out: Vec<serde_json::Value> = st
        .buckets()
        .iter()
        .map(|b| {
            let (log, dropped) = b.log();
            json!({
                "id": b.id,
                "location_kind": b.id.location_kind(),
                "base_model": b.id.base_model(),
                "models": st.bucket_models(&b.id),
                "limits": b.limits(),
                "admitted": log.len() as u64 + dropped,
                "log_truncated": dropped > 0,
                "usage": b.usage(st.window),
                "peak": peak_usage(&log, st.window),
            })
        })
        .collect();
    Json(out).into_response()
}

async fn refuse_model(
    State(st): State<SharedState>,
    body: Result<Json<ModelRef>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(m)) => {
            st.refuse(&m.region, &m.model);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => bad_request(e),
    }
}

async fn allow_model(
    State(st): State<SharedState>,
    body: Result<Json<ModelRef>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(m)) => Json(json!({"was_refused": st.allow(&m.region, &m.model)})).into_response(),
        Err(e) => bad_request(e),
    }
}

async fn refused_models(State(st): State<SharedState>) -> Response {
    let out: Vec<serde_json::Value> = st
        .refused()
        .into_iter()
        .map(|(region, model)| json!({"region": region, "model": model}))
        .collect();
    Json(out).into_response()
}

async fn rotate_token(State(st): State<SharedState>) -> Response {
    Json(json!({"bearer_token": st.rotate_token()})).into_response()
}
