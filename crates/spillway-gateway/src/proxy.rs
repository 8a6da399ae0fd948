//! The plain service at the centre: take one validated call, get it a
//! quota reservation in some region, send it to Vertex, relay the answer,
//! and settle the reservation to what was really used.
//!
//! Everything HTTP-specific about the *client* (paths, auth, body limits)
//! happened before this point, in `routes` and the layers; everything
//! specific to *Vertex* (URLs, credentials) lives in `upstream`; budgets
//! and waiting live in the `scheduler` and the quota store. What is left
//! here is one request's life:
//!
//! 1. **Estimate**: input tokens from the body (corrected per model by what
//!    past responses taught), output reserved as `max_tokens`.
//! 2. **Refuse early** what can never fit: over the context window, or over
//!    every eligible region's budget (400, `x-should-retry: false`).
//! 3. **Admit**: the scheduler reserves in the region with the most room,
//!    waiting up to the request's deadline, or answers 429 with when room
//!    is expected.
//! 4. **Send**, and on a 429, 529, 503, connect failure or timeout before
//!    any byte reached the client, settle that attempt (the store cools the
//!    region down) and go back to 3: another region, or the same one after
//!    its cooldown, within the deadline. Nothing is replayed once streamed.
//! 5. **Settle** to actual usage: the unary body's `usage`, or for a stream
//!    `message_start` plus the last `message_delta`; a broken stream is
//!    charged what was observed, and at least the input estimate.
//!
//! `count_tokens` is free on Vertex, so it skips quota entirely.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde_json::{Map, Value};
use spillway_core::estimate::{estimate_input, ImageRule};
use spillway_core::ledger::Charge;
use spillway_core::store::{Grant, Outcome};
use spillway_core::{adaptive::Exhausted, ModelSpec};
use spillway_vertex::{
    normalize_upstream_error, to_vertex_body, usage_from_message_body, Operation, Usage,
};

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::passthrough::{SsePassthrough, StreamOutcome};
use crate::request_id::RequestId;
use crate::scheduler::{Demand, Priority, Rejection};
use crate::server::AppState;

/// One client call, validated and resolved to a model.
pub struct Call<'a> {
    pub op: Operation,
    pub model: &'a ModelSpec,
    pub body: Map<String, Value>,
    pub stream: bool,
    pub max_tokens: u64,
    pub beta: Option<HeaderValue>,
    /// Set when the client named the model by an unversioned alias.
    pub alias_warning: Option<String>,
    /// `x-spillway-regions`, if the client narrowed the regions.
    pub region_hint: Option<Vec<String>>,
    /// `x-spillway-max-wait-ms`, if given.
    pub max_wait: Option<Duration>,
    pub priority: Priority,
    pub tenant: Tenant,
    pub request_id: RequestId,
}

/// The regions this call may use: the model's, narrowed by tenant policy and
/// the request's header, in configured order.
fn eligible_regions(call: &Call<'_>) -> Result<Vec<Arc<str>>, ApiError> {
    let model = call.model;
    if model.regions.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "model {:?} is not served in any configured region",
            model.id
        )));
    }
    if let Some(hint) = &call.region_hint {
        if let Some(unknown) = hint
            .iter()
            .find(|h| !model.regions.iter().any(|r| &r.region == *h))
        {
            return Err(ApiError::BadRequest(format!(
                "x-spillway-regions: {unknown:?} does not serve {}; it is served in {}",
                model.id,
                model
                    .regions
                    .iter()
                    .map(|r| r.region.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let regions: Vec<Arc<str>> = model
        .regions
        .iter()
        .map(|r| r.region.as_str())
        .filter(|r| call.tenant.policy.allows_region(r))
        .filter(|r| {
            call.region_hint
                .as_ref()
                .is_none_or(|h| h.iter().any(|x| x == r))
        })
        .map(Arc::from)
        .collect();
    if regions.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "no region allowed for this request serves {} (tenant policy and x-spillway-regions leave none)",
            model.id
        )));
    }
    Ok(regions)
}

/// What to reserve, and the request refused if it can never fit.
struct Plan {
    raw_input: u64,
    charge: Charge,
}

fn plan(state: &AppState, call: &Call<'_>, regions: &[Arc<str>]) -> Result<Plan, ApiError> {
    let model = call.model;
    let estimate = estimate_input(&call.body, model.chars_per_token, ImageRule::default());
    let factor = state.estimates.factor(&model.id);
    let input = (estimate.tokens as f64 * factor).ceil() as u64;
    let charge = Charge {
        input,
        output: call.max_tokens,
    };
    if estimate.tokens.saturating_add(call.max_tokens) > model.context_window {
        return Err(ApiError::BadRequest(format!(
            "prompt is too long: an estimated {} input tokens plus max_tokens {} is {}, over the {}-token context window of {}",
            estimate.tokens,
            call.max_tokens,
            estimate.tokens + call.max_tokens,
            model.context_window,
            model.id
        )));
    }
    let largest = model
        .regions
        .iter()
        .filter(|r| regions.iter().any(|e| **e == *r.region))
        .map(|r| state.quota_ceiling(&r.limits))
        .max_by_key(|l| l.token_capacity())
        .expect("regions is non-empty");
    if !largest.admits(charge) {
        return Err(ApiError::BadRequest(format!(
            "request can never fit the quota: an estimated {} input tokens plus max_tokens {} exceeds the largest per-minute token budget of any eligible region ({} tokens); lower max_tokens or split the prompt",
            charge.input,
            charge.output,
            largest.token_capacity()
        )));
    }
    Ok(Plan {
        raw_input: estimate.tokens,
        charge,
    })
}

/// The checks [`forward`] makes before asking for quota (regions allowed,
/// context window, can ever fit), for work validated now and sent later
/// (batch items are checked at submit).
pub fn precheck(state: &AppState, call: &Call<'_>) -> Result<(), ApiError> {
    let regions = eligible_regions(call)?;
    plan(state, call, &regions).map(|_| ())
}

fn rejection_error(rejection: Rejection, model: &str) -> ApiError {
    match rejection {
        Rejection::NoRoom { retry_after } => ApiError::RateLimited {
            message: format!(
                "no quota for {model} in any eligible region before this request's deadline; room is expected in {:.1} s",
                retry_after.as_secs_f64()
            ),
            retry_after,
        },
        Rejection::QueueFull { retry_after } => ApiError::RateLimited {
            message: format!("too many requests are waiting for {model}; try again later"),
            retry_after,
        },
        Rejection::NeverFits => ApiError::BadRequest(format!(
            "request can never fit the current quota of {model} in any eligible region"
        )),
    }
}

/// What an attempt's upstream failure means for retrying and for the budget.
fn attempt_failure(error: &ApiError) -> Option<Outcome> {
    match error {
        ApiError::Upstream(e) if e.status == 429 => {
            Some(Outcome::RateLimited(Exhausted::from_message(&e.message)))
        }
        ApiError::Upstream(e) if e.status == 529 || e.status == 503 => Some(Outcome::Unavailable),
        ApiError::UpstreamUnavailable { .. } | ApiError::UpstreamTimeout { .. } => {
            Some(Outcome::Unavailable)
        }
        _ => None,
    }
}

pub async fn forward(state: &Arc<AppState>, call: Call<'_>) -> Result<Response, ApiError> {
    let started = Instant::now();
    let model = call.model;
    let mut log = RequestLog {
        metrics: Arc::clone(&state.metrics),
        request_id: call.request_id.clone(),
        tenant: call.tenant.name.clone(),
        model: model.id.clone(),
        region: Arc::from(""),
        started,
        attempts: 0,
        estimated: Charge::default(),
        queue_wait: Duration::ZERO,
        upstream_latency: Duration::ZERO,
    };
    let stream = call.op == Operation::Messages && call.stream;
    let (op, beta) = (call.op, call.beta.clone());
    let regions = match eligible_regions(&call) {
        Ok(regions) => regions,
        Err(e) => return Err(log.refuse(e)),
    };
    if call.op == Operation::CountTokens {
        let region = regions[0].clone();
        log.region = region.clone();
        let body = Bytes::from(to_vertex_body(call.body, op, &model.id));
        let response = send(state, &mut log, &region, op, false, body, beta).await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                log.emit(e.kind_and_status().1.as_u16(), None, "error");
                return Err(e);
            }
        };
        return relay_unary(response, &mut log, None, &call.alias_warning).await;
    }

    let plan = match plan(state, &call, &regions) {
        Ok(plan) => plan,
        Err(e) => return Err(log.refuse(e)),
    };
    log.estimated = plan.charge;
    if let Err(cap) = call.tenant.policy.check_caps(plan.charge.total()) {
        return Err(log.refuse(match cap {
            crate::tenants::CapExceeded::Later(retry_after) => ApiError::RateLimited {
                message: format!("tenant {} is over its own rate cap", call.tenant.name),
                retry_after,
            },
            crate::tenants::CapExceeded::Never { cap } => ApiError::BadRequest(format!(
                "request's estimated {} tokens exceed tenant {}'s cap of {cap} tokens per minute",
                plan.charge.total(),
                call.tenant.name
            )),
        }));
    }
    let max_wait = call
        .max_wait
        .or(call.tenant.policy.max_wait)
        .unwrap_or(state.max_wait)
        .min(state.max_wait_cap);
    let demand = Demand {
        model: Arc::from(model.quota_group.as_str()),
        regions,
        charge: plan.charge,
        strategy: state.strategy,
        priority: call.priority,
        tenant: call.tenant.name.clone(),
        weight: call.tenant.policy.weight,
        deadline: tokio::time::Instant::now() + max_wait,
    };
    let body = Bytes::from(to_vertex_body(call.body, op, &model.id));
    let mut last_error = None;
    let mut failed_region: Option<Arc<str>> = None;
    let primary = model.regions[0].region.as_str();
    while log.attempts < state.max_attempts {
        let waited = tokio::time::Instant::now();
        let grant = match state.scheduler.admit(&demand).await {
            Ok(grant) => grant,
            Err(rejection) => {
                // An upstream error with nowhere left to retry is still the
                // truest answer; otherwise say when quota frees.
                let error = match (last_error.take(), rejection) {
                    (Some(ApiError::Upstream(e)), Rejection::NoRoom { retry_after })
                        if e.status == 429 =>
                    {
                        ApiError::RateLimited {
                            message: e.message,
                            retry_after,
                        }
                    }
                    (Some(e), Rejection::NoRoom { .. }) => e,
                    (_, rejection) => rejection_error(rejection, &model.id),
                };
                log.emit(error.kind_and_status().1.as_u16(), None, "rejected");
                return Err(error);
            }
        };
        let wait = waited.elapsed();
        log.queue_wait += wait;
        log.attempts += 1;
        log.region = grant.region.clone();
        record_admission(
            &state.metrics,
            &model.id,
            primary,
            &grant,
            wait,
            demand.priority,
            failed_region.take(),
            plan.raw_input,
        );
        let response = send(
            state,
            &mut log,
            &grant.region,
            op,
            stream,
            body.clone(),
            beta.clone(),
        )
        .await;
        match response {
            Ok(response) if response.status().is_success() => {
                let settle = Settle {
                    state: Arc::clone(state),
                    model: Arc::from(model.id.as_str()),
                    grant,
                    raw_input: plan.raw_input,
                };
                return if stream {
                    Ok(relay_stream(
                        state,
                        response,
                        log,
                        settle,
                        &call.alias_warning,
                    ))
                } else {
                    relay_unary(response, &mut log, Some(settle), &call.alias_warning).await
                };
            }
            Ok(response) => {
                let status = response.status().as_u16();
                let bytes = response.bytes().await.unwrap_or_default();
                let error = ApiError::Upstream(normalize_upstream_error(status, &bytes));
                match attempt_failure(&error) {
                    Some(outcome) => {
                        failed_region = Some(grant.region.clone());
                        tracing::info!(request_id = %log.request_id.id, region = %grant.region, status, "upstream refused; trying again");
                        state.scheduler.settle(&grant, outcome).await;
                        last_error = Some(error);
                    }
                    None => {
                        // A definite answer (400, 404, ...): upstream spent nothing.
                        state
                            .scheduler
                            .settle(&grant, Outcome::Used(Charge::default()))
                            .await;
                        log.emit(status, None, "upstream_error");
                        return Err(error);
                    }
                }
            }
            Err(error) => {
                failed_region = Some(grant.region.clone());
                let outcome = attempt_failure(&error).unwrap_or(Outcome::NotSent);
                state.scheduler.settle(&grant, outcome).await;
                if matches!(error, ApiError::Credentials) {
                    log.emit(500, None, "credentials");
                    return Err(error);
                }
                last_error = Some(error);
            }
        }
    }
    let error = last_error.unwrap_or(ApiError::UpstreamUnavailable {
        region: log.region.to_string(),
        reason: "no attempt left".into(),
    });
    log.emit(
        error.kind_and_status().1.as_u16(),
        None,
        "attempts_exhausted",
    );
    Err(error)
}

/// One upstream attempt, timed and counted.
async fn send(
    state: &AppState,
    log: &mut RequestLog,
    region: &str,
    op: Operation,
    stream: bool,
    body: Bytes,
    beta: Option<HeaderValue>,
) -> Result<reqwest::Response, ApiError> {
    let sent = Instant::now();
    let result = state
        .upstream
        .send(region, &log.model, op, stream, body, beta)
        .await;
    log.upstream_latency = sent.elapsed();
    let m = &state.metrics;
    let status = match &result {
        Ok(response) => crate::metrics::status_label(response.status().as_u16()),
        Err(ApiError::UpstreamTimeout { .. }) => "timeout",
        Err(ApiError::Credentials) => "credentials",
        Err(_) => "transport",
    };
    m.upstream_requests
        .with_label_values(&[region, &log.model, status])
        .inc();
    if status == "429" {
        m.upstream_rate_limited
            .with_label_values(&[region, &log.model])
            .inc();
    }
    if result.is_ok() {
        m.upstream_latency_seconds
            .with_label_values(&[region, &log.model])
            .observe(log.upstream_latency.as_secs_f64());
    }
    result
}

/// Metrics for one admission: wait, routing (spillover, fallback) and tokens.
#[allow(clippy::too_many_arguments)]
fn record_admission(
    m: &Metrics,
    model: &str,
    primary: &str,
    grant: &Grant,
    wait: Duration,
    priority: Priority,
    failed_region: Option<Arc<str>>,
    raw_input: u64,
) {
    let priority = match priority {
        Priority::Interactive => "interactive",
        Priority::Batch => "batch",
    };
    m.queue_wait_seconds
        .with_label_values(&[model, priority])
        .observe(wait.as_secs_f64());
    let region = &*grant.region;
    if region != primary {
        m.spillovers
            .with_label_values(&[model, primary, region])
            .inc();
    }
    if let Some(from) = failed_region {
        m.fallbacks.with_label_values(&[model, &from, region]).inc();
    }
    let tokens = |kind: &str, n: u64| m.tokens.with_label_values(&[model, region, kind]).inc_by(n);
    tokens("estimated_input", raw_input);
    tokens("reserved_input", grant.charge.input);
    tokens("reserved_output", grant.charge.output);
}

/// Settles a reservation once the response's usage is known.
struct Settle {
    state: Arc<AppState>,
    /// The model id (the grant names the quota group).
    model: Arc<str>,
    grant: Grant,
    raw_input: u64,
}

impl Settle {
    fn charge_for(&self, usage: Option<Usage>, complete: bool) -> Charge {
        match usage {
            Some(u) if complete => Charge {
                input: u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens,
                output: u.output_tokens,
            },
            // A broken stream: what was observed, and at least the input estimate.
            Some(u) => Charge {
                input: (u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens)
                    .max(self.grant.charge.input),
                output: u.output_tokens,
            },
            None if complete => self.grant.charge,
            None => Charge {
                input: self.grant.charge.input,
                output: 0,
            },
        }
    }

    async fn run(self, usage: Option<Usage>, complete: bool) {
        if let Some(u) = usage.filter(|_| complete) {
            let ratio = self
                .state
                .estimates
                .observe(&self.model, self.raw_input, u.total_input());
            if let Some(ratio) = ratio {
                self.state
                    .metrics
                    .estimate_ratio
                    .with_label_values(&[&self.model])
                    .observe(ratio);
            }
        }
        let charge = self.charge_for(usage, complete);
        self.state
            .scheduler
            .settle(&self.grant, Outcome::Used(charge))
            .await;
    }
}

fn success_headers(
    headers: &mut HeaderMap,
    region: &str,
    alias_warning: &Option<String>,
    grant: Option<&Grant>,
) {
    if let Ok(v) = HeaderValue::from_str(region) {
        headers.insert("x-spillway-region", v);
    }
    if let Some(warning) = alias_warning
        .as_deref()
        .and_then(|w| HeaderValue::from_str(w).ok())
    {
        headers.insert(header::WARNING, warning);
    }
    if let Some(grant) = grant {
        crate::ratelimit::add_budget_headers(headers, &grant.view);
    }
}

async fn relay_unary(
    response: reqwest::Response,
    log: &mut RequestLog,
    settle: Option<Settle>,
    alias_warning: &Option<String>,
) -> Result<Response, ApiError> {
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/json"));
    let bytes = match response.bytes().await {
        Ok(bytes) => bytes,
        Err(e) => {
            if let Some(settle) = settle {
                settle.run(None, false).await;
            }
            let error = crate::upstream::classify_send_error(&log.region, e);
            log.emit(error.kind_and_status().1.as_u16(), None, "transport");
            return Err(error);
        }
    };
    if !status.is_success() {
        let error = normalize_upstream_error(status.as_u16(), &bytes);
        log.emit(error.status, None, "upstream_error");
        return Err(ApiError::Upstream(error));
    }
    let usage = usage_from_message_body(&bytes);
    let grant = settle.as_ref().map(|s| s.grant.clone());
    if let Some(settle) = settle {
        // Off the response path: with a shared store a settle is another
        // round trip to Redis, and nothing in the response depends on it.
        tokio::spawn(settle.run(usage, true));
    }
    log.emit(200, usage, "ok");
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type);
    success_headers(
        builder.headers_mut().expect("fresh builder"),
        &log.region,
        alias_warning,
        grant.as_ref(),
    );
    Ok(builder.body(Body::from(bytes)).expect("headers are valid"))
}

fn relay_stream(
    state: &AppState,
    response: reqwest::Response,
    log: RequestLog,
    settle: Settle,
    alias_warning: &Option<String>,
) -> Response {
    let grant = settle.grant.clone();
    let region = log.region.clone();
    // The stream logs itself when it ends (from `Drop` if need be): the
    // outer layer, which sees only the headers, must not log it as well.
    log.request_id.mark_logged();
    let drop_vertex_events = state.settings.upstream.drop_vertex_events;
    let metrics = Arc::clone(&state.metrics);
    metrics.open_streams.inc();
    let body = SsePassthrough::new(
        response.bytes_stream(),
        drop_vertex_events,
        move |outcome: StreamOutcome| {
            metrics.open_streams.dec();
            if let Some(first) = outcome.first_event_at {
                metrics
                    .time_to_first_token_seconds
                    .with_label_values(&[&*log.region, log.model.as_str()])
                    .observe(first.duration_since(log.started).as_secs_f64());
            }
            let result = if outcome.completed {
                "ok"
            } else if outcome.client_gone {
                "client_gone"
            } else {
                "stream_error"
            };
            log.emit(200, Some(outcome.usage), result);
            let usage = outcome.saw_message_start.then_some(outcome.usage);
            // The hook may run from Drop, outside any await: settle on a task.
            tokio::spawn(settle.run(usage, outcome.completed));
        },
    );
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache");
    success_headers(
        builder.headers_mut().expect("fresh builder"),
        &region,
        alias_warning,
        Some(&grant),
    );
    builder
        .body(Body::from_stream(body))
        .expect("headers are valid")
}

/// What the one log line per request says.
struct RequestLog {
    metrics: Arc<Metrics>,
    request_id: RequestId,
    tenant: Arc<str>,
    model: String,
    region: Arc<str>,
    started: Instant,
    attempts: u32,
    estimated: Charge,
    queue_wait: Duration,
    /// Time to response headers of the last upstream attempt.
    upstream_latency: Duration,
}

impl RequestLog {
    /// Logs a refusal made before any upstream call and hands the error back.
    fn refuse(&self, error: ApiError) -> ApiError {
        let (_, status) = error.kind_and_status();
        let outcome = if status == StatusCode::TOO_MANY_REQUESTS {
            "rejected"
        } else {
            "invalid"
        };
        self.emit(status.as_u16(), None, outcome);
        error
    }

    fn emit(&self, status: u16, usage: Option<Usage>, outcome: &'static str) {
        let usage = usage.unwrap_or_default();
        self.request_id.mark_logged();
        self.metrics
            .requests
            .with_label_values(&[&*self.tenant, self.model.as_str(), outcome])
            .inc();
        if usage.total() > 0 && !self.region.is_empty() {
            let tokens = |kind: &str, n: u64| {
                self.metrics
                    .tokens
                    .with_label_values(&[self.model.as_str(), &*self.region, kind])
                    .inc_by(n)
            };
            tokens("actual_input", usage.total_input());
            tokens("actual_output", usage.output_tokens);
            let by_tenant = |kind: &str, n: u64| {
                self.metrics
                    .tenant_tokens
                    .with_label_values(&[&*self.tenant, self.model.as_str(), kind])
                    .inc_by(n)
            };
            by_tenant("input", usage.total_input());
            by_tenant("output", usage.output_tokens);
        }
        tracing::info!(
            target: "spillway::request",
            request_id = %self.request_id.id,
            tenant = %self.tenant,
            model = %self.model,
            region = %self.region,
            attempts = self.attempts,
            status,
            outcome,
            estimated_input_tokens = self.estimated.input,
            reserved_output_tokens = self.estimated.output,
            input_tokens = usage.total_input(),
            output_tokens = usage.output_tokens,
            queue_wait_ms = self.queue_wait.as_secs_f64() * 1000.0,
            upstream_latency_ms = self.upstream_latency.as_secs_f64() * 1000.0,
            latency_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
}
