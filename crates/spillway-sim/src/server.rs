//! The simulated Vertex AI HTTP surface and its request pipeline.
//!
//! One listener serves every region; the region is the `{location}` path
//! segment (the real service has one host per region, a test double does not
//! need that). Routes:
//!
//! ```text
//! POST /v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model}:rawPredict
//! POST /v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model}:streamRawPredict
//! POST /v1/projects/{project}/locations/{location}/publishers/anthropic/models/count-tokens:rawPredict
//! POST /token                      (OAuth, see `oauth`)
//! GET|POST|PUT|DELETE /_sim/...    (control API, see `control`)
//! POST /v1/messages                (only with an Anthropic section: see `anthropic`)
//! POST /v1/messages/count_tokens   (idem)
//! ```
//!
//! axum's router (matchit 0.8) cannot match `{model}:rawPredict` inside one
//! path segment, so the route captures `{model_action}` and splits it on the
//! last `:`.
//!
//! A predict request goes through these steps, each of which may answer:
//!
//! 1. **auth**: when a bearer token is required (`SimConfig::bearer_token`,
//!    or after `SimHandle::rotate_token`), `Authorization: Bearer` must
//!    carry the current one or a live token from `/token` → else 401
//!    `UNAUTHENTICATED`;
//! 2. **routing**: the model must be offered in the location and not
//!    refused there (`SimHandle::refuse_model`) → else 404 `NOT_FOUND`
//!    (Google-shaped, naming the publisher model path);
//! 3. **validation**: JSON object, no `model`, `anthropic_version` (any
//!    string), `max_tokens` (integer >= 1), `messages` (non-empty list of
//!    user/assistant messages with content) → else 400 (Anthropic-shaped);
//! 4. **pre-quota faults**: `Status`, `Capacity`, `Reset`, `Hang` (see
//!    `faults`);
//! 5. **quota**: strict sliding window of the model's bucket (see `quota`),
//!    charged with the input tokens that count (cache rule, see `message`)
//!    and the output tokens → else 429 naming the metric of the location's
//!    kind and the bucket's base model;
//! 6. **answer**: the Message JSON, or the SSE stream (with the optional
//!    `DropMidStream` and `Delay` faults).
//!
//! Google-shaped errors are JSON objects on `:rawPredict` and one-element
//! arrays on `:streamRawPredict`, as on the real service.
//!
//! **`"stream": true` on `:rawPredict`.** What Vertex does when the body's
//! flag and the endpoint disagree is undocumented (reference §1.2 marks it
//! `[?]`). The simulator's reading: the body wins. From the moment the body
//! is parsed, such a request is handled exactly as `:streamRawPredict`
//! would handle it: the answer is the SSE stream, and Google errors from
//! then on (faults, quota) are array-wrapped. Errors decided before the
//! body is read (401, 404) keep `:rawPredict`'s object form. The recorded
//! action stays `rawPredict`. (`:streamRawPredict` always streams, whatever
//! the body says.)

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use serde_json::Value;

use crate::counters::ModelCounters;
use crate::errors::SimError;
use crate::faults::{lock, FaultGroup, FaultKind};
use crate::message::{self, InputUsage};
use crate::recorder::{RecordedRequest, MAX_RECORDED_BODY};
use crate::sse::{self, StreamPlan};
use crate::state::SharedState;
use crate::tokenizer::count_tokens;

/// Largest accepted request body (Anthropic's documented limit).
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

const MODEL_ROUTE: &str =
    "/v1/projects/{project}/locations/{location}/publishers/anthropic/models/{model_action}";

/// Builds the whole router (Vertex surface, OAuth and control API).
pub(crate) fn router(state: SharedState) -> Router {
    let mut router = Router::new();
    // Only a configured first-party surface has routes: without one these
    // paths fall through to the 404 below, as they always did.
    if state.anthropic.is_some() {
        router = router
            .route("/v1/messages", post(crate::anthropic::messages_route))
            .route(
                "/v1/messages/count_tokens",
                post(crate::anthropic::count_tokens_route),
            );
    }
    router
        .route(MODEL_ROUTE, post(model_route))
        .route("/token", post(crate::oauth::token_endpoint))
        .merge(crate::control::routes())
        .fallback(any(not_found))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

pub(crate) async fn not_found() -> Response {
    SimError::Google {
        code: 404,
        status: "NOT_FOUND",
        message: "Requested entity was not found.".into(),
    }
    .into_response(false)
}

/// Which Vertex method a request calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Raw,
    Stream,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Raw => "rawPredict",
            Action::Stream => "streamRawPredict",
        }
    }
}

/// Records the request when dropped, so that requests abandoned by the
/// client (hung, then disconnected) are recorded too (status 499).
struct Recording {
    state: SharedState,
    rec: Option<RecordedRequest>,
}

impl Recording {
    fn finish(&mut self, status: u16, body: Option<Value>) {
        if let Some(rec) = self.rec.as_mut() {
            rec.status = status;
            rec.body = body;
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(rec) = self.rec.take() {
            self.state.recorder.push(rec);
        }
    }
}

fn header_string(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn authorized(st: &SharedState, headers: &HeaderMap) -> bool {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    st.authorized(token)
}

async fn model_route(
    State(st): State<SharedState>,
    Path((project, location, model_action)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some((model, action)) = model_action.rsplit_once(':') else {
        return not_found().await;
    };
    let action = match action {
        "rawPredict" => Action::Raw,
        "streamRawPredict" => Action::Stream,
        _ => return not_found().await,
    };
    let mut recording = Recording {
        state: st.clone(),
        rec: Some(RecordedRequest {
            project: project.clone(),
            region: location.clone(),
            model: model.to_owned(),
            action: action.name().to_owned(),
            anthropic_version_header: header_string(
                &headers,
                header::HeaderName::from_static("anthropic-version"),
            ),
            has_x_api_key: headers.contains_key("x-api-key"),
            authorization: header_string(&headers, header::AUTHORIZATION),
            anthropic_beta: header_string(
                &headers,
                header::HeaderName::from_static("anthropic-beta"),
            ),
            body_len: body.len(),
            body: None,
            status: 499,
        }),
    };
    if model == "count-tokens" {
        if action != Action::Raw {
            recording.finish(404, None);
            return not_found().await;
        }
        return count_tokens_route(&st, &project, &location, &headers, &body, recording);
    }
    st.total_requests.fetch_add(1, Ordering::Relaxed);
    st.count(&location, model, |c| c.requests += 1);
    st.arrived(&location, model);
    // The endpoint decides the error form until the body says otherwise
    // (see the module docs on `"stream": true` sent to rawPredict).
    let mut stream = action == Action::Stream;
    let fail = |recording: &mut Recording, stream: bool, e: SimError, body: Option<Value>| {
        let code = e.code();
        let capacity = e.is_capacity_exhausted();
        st.count(&location, model, |c| {
            c.record_status(code);
            if capacity {
                c.capacity_limited += 1;
            }
        });
        recording.finish(code, body);
        e.into_response(stream)
    };

    // 1. auth
    if !authorized(&st, &headers) {
        return fail(&mut recording, stream, SimError::unauthenticated(), None);
    }
    // 2. routing
    let slot = match st.slot(&location, model) {
        Some(slot) if !st.is_refused(&location, model) => slot,
        _ => {
            let e = SimError::model_not_found(&project, &location, model);
            return fail(&mut recording, stream, e, None);
        }
    };
    // 3. validation
    let json = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => v,
        Err(e) => {
            let e = SimError::invalid_request(format!("Invalid JSON in request body: {e}"));
            return fail(&mut recording, stream, e, None);
        }
    };
    if json.get("stream").and_then(Value::as_bool) == Some(true) {
        stream = true;
    }
    let keep = |v: Value| (body.len() <= MAX_RECORDED_BODY).then_some(v);
    let max_tokens = match validate_predict(&json) {
        Ok(m) => m,
        Err(e) => return fail(&mut recording, stream, e, keep(json)),
    };
    let total = count_tokens(&json);
    let dictated = ["SIM_CACHE_READ=", "SIM_CACHE_WRITE="]
        .iter()
        .any(|k| message::directive(&json, k).is_some());
    let cached = (!dictated).then(|| {
        let prefixes = crate::tokenizer::cache_prefixes(&json);
        st.cache.lookup(&location, model, &prefixes, total)
    });
    let input = match &cached {
        Some(lookup) => lookup.usage,
        None => message::plan_input(&json, total),
    };
    let counted_input = input.counted(slot.cache_reads_count);
    let default_out = st.default_output_tokens.load(Ordering::Relaxed);
    let out = message::plan_output(&json, max_tokens, default_out);
    let json = keep(json);

    // 4. faults that act before quota
    match st.faults.take(&location, model, FaultGroup::PreQuota) {
        Some(FaultKind::Status(code)) => {
            let e = SimError::for_status_in(code, &location, &slot.bucket.id.base_model());
            return fail(&mut recording, stream, e, json);
        }
        Some(FaultKind::Capacity) => {
            return fail(&mut recording, stream, SimError::capacity_exhausted(), json);
        }
        Some(FaultKind::Reset) => {
            st.count(&location, model, |c| c.resets += 1);
            recording.finish(0, json);
            return reset_response();
        }
        Some(FaultKind::Hang(d)) if !st.shutting_down.load(Ordering::Relaxed) => {
            hang(&st, d).await;
        }
        _ => {}
    }

    // 5. quota
    let admitted = slot
        .bucket
        .try_admit(st.window, &slot.model, counted_input, out.tokens);
    if let Err(metric) = admitted {
        let e = SimError::quota_exceeded_in(metric, &location, &slot.bucket.id.base_model());
        return fail(&mut recording, stream, e, json);
    }
    if let Some(lookup) = &cached {
        st.cache.admitted(&location, model, lookup);
    }

    // 6. answer
    let (drop_after, error_after) = if stream {
        match st.faults.take(&location, model, FaultGroup::Drop) {
            Some(FaultKind::DropMidStream { after_events }) => (Some(after_events), None),
            Some(FaultKind::ErrorMidStream { after_events }) => (None, Some(after_events)),
            _ => (None, None),
        }
    } else {
        (None, None)
    };
    let (first_token, per_token) = match st.faults.take(&location, model, FaultGroup::Delay) {
        Some(FaultKind::Delay {
            first_token,
            per_token,
        }) => (first_token, per_token),
        _ => (Duration::ZERO, Duration::ZERO),
    };
    recording.finish(200, json);
    drop(recording);

    if !stream {
        let per_all = u32::try_from(out.tokens)
            .ok()
            .and_then(|n| per_token.checked_mul(n))
            .unwrap_or(Duration::MAX);
        sleep(first_token.saturating_add(per_all)).await;
        {
            let mut c = lock(&slot.counters);
            c.succeeded += 1;
            add_input(&mut c, input);
            c.output_tokens += out.tokens;
        }
        let bytes = message::message_json_with_input(model, input, out);
        return (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response();
    }

    {
        let mut c = lock(&slot.counters);
        add_input(&mut c, input);
        c.streams_started += 1;
    }
    let plan = StreamPlan {
        model: model.to_owned(),
        input_tokens: input.input_tokens,
        cache_creation_input_tokens: input.cache_creation_input_tokens,
        cache_read_input_tokens: input.cache_read_input_tokens,
        cache_creation_1h_input_tokens: input.cache_creation_1h_input_tokens,
        output_tokens: out.tokens,
        stop_reason: out.stop_reason,
        emit_vertex_event: st.emit_vertex_event,
        first_token_delay: first_token,
        per_token_delay: per_token,
        drop_after_events: drop_after,
        error_after_events: error_after,
        flavor: sse::Flavor::Vertex,
    };
    let events = sse::event_stream(plan, move |outcome| {
        let mut c = lock(&slot.counters);
        c.output_tokens += outcome.tokens_sent;
        if outcome.completed {
            c.succeeded += 1;
            c.streams_completed += 1;
        }
    });
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        )],
        Body::from_stream(events),
    )
        .into_response()
}

fn add_input(c: &mut ModelCounters, input: InputUsage) {
    c.input_tokens += input.input_tokens;
    c.cache_read_input_tokens += input.cache_read_input_tokens;
    c.cache_creation_input_tokens += input.cache_creation_input_tokens;
}

/// A response whose body fails before producing a byte. hyper (HTTP/1)
/// then closes the connection without flushing even the status line, so the
/// client sees the connection die with no response at all. (Over HTTP/2 the
/// client would see the headers and a reset stream instead.)
pub(crate) fn reset_response() -> Response {
    let failing = futures::stream::once(async {
        Err::<Bytes, io::Error>(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "simulated connection reset",
        ))
    });
    Response::new(Body::from_stream(failing))
}

/// A `Hang` fault: no answer for `d`, or until the simulator is told to
/// release every hang (shutdown, reset).
pub(crate) async fn hang(st: &SharedState, d: Duration) {
    let released = st.hang_release.notified();
    tokio::select! {
        _ = sleep(d) => {}
        _ = released => {}
    }
}

pub(crate) async fn sleep(d: Duration) {
    if d == Duration::MAX {
        std::future::pending::<()>().await;
    } else if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// Validates a rawPredict/streamRawPredict body like Vertex + Anthropic do.
/// Returns `max_tokens`.
fn validate_predict(v: &Value) -> Result<u64, SimError> {
    let Some(obj) = v.as_object() else {
        return Err(SimError::invalid_request(
            "Input should be a valid dictionary or object to extract fields from",
        ));
    };
    if obj.contains_key("model") {
        return Err(SimError::invalid_request(
            "model: Extra inputs are not permitted",
        ));
    }
    match obj.get("anthropic_version") {
        None => {
            return Err(SimError::invalid_request(
                "anthropic_version: Field required",
            ))
        }
        Some(Value::String(_)) => {}
        Some(_) => {
            return Err(SimError::invalid_request(
                "anthropic_version: Input should be a valid string",
            ))
        }
    }
    let max_tokens = validate_max_tokens(obj.get("max_tokens"))?;
    validate_messages(obj.get("messages"))?;
    Ok(max_tokens)
}

/// Validates `max_tokens` (present, an integer >= 1) and returns it.
pub(crate) fn validate_max_tokens(v: Option<&Value>) -> Result<u64, SimError> {
    let max_tokens = match v {
        None => return Err(SimError::invalid_request("max_tokens: Field required")),
        Some(m) => m.as_u64().ok_or_else(|| {
            SimError::invalid_request(if m.as_i64().is_some_and(|i| i < 1) {
                "max_tokens: Input should be greater than or equal to 1"
            } else {
                "max_tokens: Input should be a valid integer"
            })
        })?,
    };
    if max_tokens < 1 {
        return Err(SimError::invalid_request(
            "max_tokens: Input should be greater than or equal to 1",
        ));
    }
    Ok(max_tokens)
}

pub(crate) fn validate_messages(messages: Option<&Value>) -> Result<(), SimError> {
    let messages = match messages {
        None => return Err(SimError::invalid_request("messages: Field required")),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(SimError::invalid_request(
                "messages: Input should be a valid list",
            ))
        }
    };
    if messages.is_empty() {
        return Err(SimError::invalid_request(
            "messages: at least one message is required",
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        let Some(m) = m.as_object() else {
            return Err(SimError::invalid_request(format!(
                "messages.{i}: Input should be a valid dictionary"
            )));
        };
        match m.get("role").and_then(Value::as_str) {
            Some("user" | "assistant") => {}
            _ => {
                return Err(SimError::invalid_request(format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant'"
                )))
            }
        }
        match m.get("content") {
            Some(Value::String(_) | Value::Array(_)) => {}
            None => {
                return Err(SimError::invalid_request(format!(
                    "messages.{i}.content: Field required"
                )))
            }
            Some(_) => {
                return Err(SimError::invalid_request(format!(
                    "messages.{i}.content: Input should be a valid list"
                )))
            }
        }
    }
    Ok(())
}

/// `count-tokens:rawPredict`: free, unlimited, never faulted; `model` is in
/// the body here. Answers `{"input_tokens": N}` (with Vertex's space).
fn count_tokens_route(
    st: &SharedState,
    project: &str,
    location: &str,
    headers: &HeaderMap,
    body: &Bytes,
    mut recording: Recording,
) -> Response {
    let fail = |recording: &mut Recording, e: SimError, body: Option<Value>| {
        recording.finish(e.code(), body);
        e.into_response(false)
    };
    if !authorized(st, headers) {
        return fail(&mut recording, SimError::unauthenticated(), None);
    }
    // Only a fault aimed at the `count-tokens` model itself applies here.
    if let Some(FaultKind::Status(code)) =
        st.faults
            .take_named(location, "count-tokens", FaultGroup::PreQuota)
    {
        return fail(
            &mut recording,
            SimError::for_status_in(code, location, "count-tokens"),
            None,
        );
    }
    let json = match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => v,
        Ok(_) => {
            let e = SimError::invalid_request(
                "Input should be a valid dictionary or object to extract fields from",
            );
            return fail(&mut recording, e, None);
        }
        Err(e) => {
            let e = SimError::invalid_request(format!("Invalid JSON in request body: {e}"));
            return fail(&mut recording, e, None);
        }
    };
    let keep = |v: Value| (body.len() <= MAX_RECORDED_BODY).then_some(v);
    let Some(model) = json.get("model").and_then(Value::as_str).map(str::to_owned) else {
        return fail(
            &mut recording,
            SimError::invalid_request("model: Field required"),
            keep(json),
        );
    };
    if st.slot(location, &model).is_none() || st.is_refused(location, &model) {
        let e = SimError::model_not_found(project, location, &model);
        return fail(&mut recording, e, keep(json));
    }
    if let Err(e) = validate_messages(json.get("messages")) {
        return fail(&mut recording, e, keep(json));
    }
    let n = count_tokens(&json);
    st.count(location, &model, |c| c.count_tokens_requests += 1);
    recording.finish(200, keep(json));
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        format!("{{\"input_tokens\": {n}}}"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(e: SimError) -> String {
        match e {
            SimError::Anthropic { message, .. } | SimError::Google { message, .. } => message,
        }
    }

    #[test]
    fn validation_messages() {
        let ok = json!({"anthropic_version": "vertex-2023-10-16", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(validate_predict(&ok).unwrap(), 5);
        let with = |k: &str, v: Value| {
            let mut b = ok.clone();
            b[k] = v;
            msg(validate_predict(&b).unwrap_err())
        };
        let without = |k: &str| {
            let mut b = ok.clone();
            b.as_object_mut().unwrap().remove(k);
            msg(validate_predict(&b).unwrap_err())
        };
        assert_eq!(
            with("model", json!("x")),
            "model: Extra inputs are not permitted"
        );
        assert_eq!(
            without("anthropic_version"),
            "anthropic_version: Field required"
        );
        assert_eq!(without("max_tokens"), "max_tokens: Field required");
        assert_eq!(without("messages"), "messages: Field required");
        assert_eq!(
            with("max_tokens", json!(0)),
            "max_tokens: Input should be greater than or equal to 1"
        );
        assert_eq!(
            with("max_tokens", json!(-3)),
            "max_tokens: Input should be greater than or equal to 1"
        );
        assert_eq!(
            with("max_tokens", json!(1e300)),
            "max_tokens: Input should be a valid integer"
        );
        assert_eq!(
            with("max_tokens", json!("5")),
            "max_tokens: Input should be a valid integer"
        );
        assert_eq!(
            with("messages", json!([])),
            "messages: at least one message is required"
        );
        assert_eq!(
            with("messages", json!({})),
            "messages: Input should be a valid list"
        );
        assert_eq!(
            with("messages", json!([{"role": "system", "content": "x"}])),
            "messages.0.role: Input should be 'user' or 'assistant'"
        );
        assert!(validate_predict(&json!([1])).is_err());
        let mut any_version = ok.clone();
        any_version["anthropic_version"] = json!("2023-06-01");
        assert!(validate_predict(&any_version).is_ok());
        assert_eq!(
            with("anthropic_version", json!(1)),
            "anthropic_version: Input should be a valid string"
        );
    }
}
