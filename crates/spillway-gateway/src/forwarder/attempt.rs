//! Admit, send, and fall back: the attempts of one call.
//!
//! Each attempt takes a grant from the scheduler, sends the call to the
//! granted location's provider and reads the status. A success is relayed
//! ([`super::relay`]). A refusal that another location (or the same one
//! later) may not repeat — 429, 529, 503, a transport failure or timeout,
//! before any byte reached the client — settles the attempt so the store
//! learns from it, and the next attempt asks the scheduler again. Any other
//! answer is the call's answer. Nothing is replayed once streamed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use serde_json::{Map, Value};
use spillway_core::adaptive::Exhausted;
use spillway_core::ledger::Charge;
use spillway_core::store::{Grant, Outcome};
use spillway_core::ModelSpec;
use spillway_vertex::{normalize_upstream_error, Operation};

use super::call::{Call, Plan};
use super::relay::{self, Settle};
use super::Forwarder;
use crate::answer::{Answer, ForwardError, Served};
use crate::metrics::status_label;
use crate::observer::{Admission, Trace};
use crate::scheduler::{Demand, Rejection};
use crate::telemetry::AttemptStatus;
use crate::upstream::{ModelMissing, Provider, ProviderRequest};

/// The client's body, encoded for each provider the call may reach. Most
/// models are served by one provider: its body is encoded once, from the
/// client's map itself, with no copy.
struct Bodies {
    source: Option<Map<String, Value>>,
    single_provider: bool,
    encoded: Vec<(String, Bytes)>,
}

impl Bodies {
    fn new(model: &ModelSpec, source: Map<String, Value>) -> Self {
        let first = model.regions.first().map(|r| r.provider.as_str());
        Self {
            source: Some(source),
            single_provider: model
                .regions
                .iter()
                .chain(&model.overflow)
                .all(|r| Some(r.provider.as_str()) == first),
            encoded: Vec::new(),
        }
    }

    fn for_provider(
        &mut self,
        name: &str,
        provider: &dyn Provider,
        op: Operation,
        model: &ModelSpec,
    ) -> Bytes {
        if let Some((_, body)) = self.encoded.iter().find(|(n, _)| n == name) {
            return body.clone();
        }
        let source = if self.single_provider {
            self.source.take().unwrap_or_default()
        } else {
            self.source.clone().unwrap_or_default()
        };
        let body = provider.encode(source, op, &model.id);
        self.encoded.push((name.to_string(), body.clone()));
        body
    }
}

/// What an attempt's failure means for retrying and for the budget. A 429
/// teaches the budget only the quota metric it names; one that names none
/// (Google's shared capacity ran short) cools the location down like a 529
/// and leaves the learned limits alone.
fn attempt_failure(error: &ForwardError) -> Option<Outcome> {
    match error {
        ForwardError::Upstream(e) if e.status == 429 => {
            Some(exhausted(&e.message).map_or(Outcome::Unavailable, Outcome::RateLimited))
        }
        ForwardError::Upstream(e) if e.status == 529 || e.status == 503 => {
            Some(Outcome::Unavailable)
        }
        ForwardError::UpstreamUnavailable { .. } | ForwardError::UpstreamTimeout { .. } => {
            Some(Outcome::Unavailable)
        }
        _ => None,
    }
}

/// How an attempt answered, for its span.
fn attempt_status(result: &Result<reqwest::Response, ForwardError>) -> AttemptStatus {
    match result {
        Ok(response) => AttemptStatus::Http(response.status().as_u16()),
        Err(ForwardError::UpstreamTimeout { .. }) => AttemptStatus::Timeout,
        Err(ForwardError::Credentials) => AttemptStatus::Credentials,
        Err(_) => AttemptStatus::Transport,
    }
}

/// A 429 that names no quota metric.
fn outcome_is_capacity(error: &ForwardError) -> bool {
    matches!(error, ForwardError::Upstream(e)
        if e.status == 429 && exhausted(&e.message).is_none())
}

/// Which limit a 429 names: Vertex's quota metric, or Anthropic's "Number
/// of requests / request tokens / output tokens has exceeded your
/// per-minute rate limit".
fn exhausted(message: &str) -> Option<Exhausted> {
    Exhausted::from_message(message).or_else(|| {
        let rest = message.strip_prefix("Number of ")?;
        if rest.starts_with("requests ") {
            Some(Exhausted::Requests)
        } else if rest.starts_with("request tokens ") || rest.starts_with("input tokens ") {
            Some(Exhausted::InputTokens)
        } else if rest.starts_with("output tokens ") {
            Some(Exhausted::OutputTokens)
        } else {
            None
        }
    })
}

/// The refusal when the scheduler gives no grant: an upstream error with
/// nowhere left to retry is still the truest answer; otherwise say when
/// quota frees.
fn refusal(last_error: Option<ForwardError>, rejection: Rejection, model: &str) -> ForwardError {
    match (last_error, rejection) {
        (Some(ForwardError::Upstream(e)), Rejection::NoRoom { retry_after }) if e.status == 429 => {
            ForwardError::RateLimited {
                message: e.message,
                retry_after,
            }
        }
        (Some(e), Rejection::NoRoom { .. }) => e,
        (_, Rejection::NoRoom { retry_after }) => ForwardError::RateLimited {
            message: format!(
                "no quota for {model} in any eligible region before this request's deadline; room is expected in {:.1} s",
                retry_after.as_secs_f64()
            ),
            retry_after,
        },
        (_, Rejection::QueueFull { retry_after }) => ForwardError::RateLimited {
            message: format!("too many requests are waiting for {model}; try again later"),
            retry_after,
        },
        (_, Rejection::NeverFits) => ForwardError::Invalid(format!(
            "request can never fit the current quota of {model} in any eligible region"
        )),
    }
}

/// Of two rejections, the one that frees sooner: what a client told to come
/// back should hear when either Vertex or the overflow has room again.
fn sooner(vertex: Rejection, overflow: Rejection) -> Rejection {
    let after = |r: &Rejection| match r {
        Rejection::NoRoom { retry_after } | Rejection::QueueFull { retry_after } => {
            Some(*retry_after)
        }
        Rejection::NeverFits => None,
    };
    match (after(&vertex), after(&overflow)) {
        (Some(v), Some(o)) if o < v => overflow,
        (None, Some(_)) => overflow,
        _ => vertex,
    }
}

/// A grant whose request is on its way upstream. Dropped while held, it
/// settles to the reservation (the upstream may have served it).
struct Held {
    forwarder: Arc<Forwarder>,
    grant: Option<Grant>,
}

impl Held {
    fn new(forwarder: &Arc<Forwarder>, grant: Grant) -> Self {
        Self {
            forwarder: Arc::clone(forwarder),
            grant: Some(grant),
        }
    }

    fn grant(&self) -> &Grant {
        self.grant.as_ref().expect("held until released")
    }

    fn release(mut self) -> Grant {
        self.grant.take().expect("held until released")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(grant) = self.grant.take() {
            let reserved = Outcome::Used(grant.charge);
            self.forwarder.settle_in_background(grant, reserved);
        }
    }
}

impl Forwarder {
    pub(super) async fn attempts(
        self: &Arc<Self>,
        call: Call<'_>,
        mut demand: Demand,
        plan: Plan,
        trace: &mut Trace,
    ) -> Result<Answer, ForwardError> {
        let Call {
            model,
            alias_warning,
            request,
        } = call;
        let mut overflow = self.overflow_demand(model, &request, &demand, plan);
        let (op, endpoint, beta) = (request.op, request.stream_endpoint, request.beta);
        let mut bodies = Bodies::new(model, request.body);
        let mut last_error = None;
        let mut failed_region: Option<Arc<str>> = None;
        while trace.attempts < self.policy.max_attempts && !demand.regions.is_empty() {
            let failed = failed_region.take();
            let grant = match self
                .admit(&demand, model, plan, failed.clone(), trace)
                .await
            {
                Ok(grant) => grant,
                // No Vertex location can admit it in time: overflow, for
                // the calls that may.
                Err(rejection) => match &overflow {
                    Some(overflow) => self
                        .admit(overflow, model, plan, failed, trace)
                        .await
                        .map_err(|other| {
                            trace.outcome = "rejected";
                            refusal(
                                last_error.take(),
                                sooner(rejection, other),
                                model.id.as_str(),
                            )
                        })?,
                    None => {
                        trace.outcome = "rejected";
                        return Err(refusal(last_error.take(), rejection, model.id.as_str()));
                    }
                },
            };
            let (name, provider) = match self.provider_for(model, &grant) {
                Ok(found) => found,
                Err(e) => {
                    self.scheduler.settle(&grant, Outcome::NotSent).await;
                    return Err(e);
                }
            };
            let body = bodies.for_provider(name, provider.as_ref(), op, model);
            // From here the call may be dropped at an await (client gone,
            // shutdown): the guard settles the grant to its reservation.
            let held = Held::new(self, grant);
            let sent = self
                .send_checked(provider, trace, op, endpoint, body, beta.clone())
                .await;
            if let Some(report) = sent
                .as_ref()
                .ok()
                .and_then(|r| provider.rate_limits(r.headers()))
            {
                self.scheduler.store().learn(held.grant(), &report).await;
            }
            let error = match sent {
                Ok(response) if response.status().is_success() => {
                    let grant = held.release();
                    self.setup.served(&model.id, &grant.region);
                    let settle = Settle::new(Arc::clone(self), model, grant, plan, &trace.tenant);
                    let served = Served {
                        region: Arc::clone(&trace.region),
                        provider: crate::upstream::provider_label(name),
                        budget: Some(settle.grant().view),
                        alias_warning,
                    };
                    return if endpoint || relay::is_event_stream(&response) {
                        Ok(relay::stream(self, response, trace, settle, served))
                    } else {
                        relay::unary(response, trace, Some(settle), served).await
                    };
                }
                Ok(response) => {
                    let status = response.status().as_u16();
                    let bytes = response.bytes().await.unwrap_or_default();
                    ForwardError::Upstream(normalize_upstream_error(status, &bytes))
                }
                Err(error) => error,
            };
            let grant = held.release();
            failed_region = Some(Arc::clone(&grant.region));
            let missing = match &error {
                ForwardError::Upstream(e) => provider.model_missing(e),
                _ => None,
            };
            if let Some(missing) = missing {
                // The budget is fine; the model is not there: refund, and
                // route this call and the next ones elsewhere.
                self.scheduler.settle(&grant, Outcome::NotSent).await;
                last_error = Some(self.not_enabled(model, &grant.region, trace, missing));
                demand.regions.retain(|r| *r != grant.region);
                if let Some(o) = overflow.as_mut() {
                    o.regions.retain(|r| *r != grant.region);
                    if o.regions.is_empty() {
                        overflow = None;
                    }
                }
                continue;
            }
            last_error = Some(self.failed(&grant, error, trace).await?);
        }
        trace.outcome = "attempts_exhausted";
        Err(last_error.unwrap_or(ForwardError::UpstreamUnavailable {
            region: trace.region.to_string(),
            reason: "no attempt left".into(),
        }))
    }

    /// Records that `region` does not serve `model` to the gateway: out of
    /// routing for a while, a metric, and a log line saying what to fix
    /// (the provider's [`Provider::model_missing`]).
    fn not_enabled(
        &self,
        model: &ModelSpec,
        region: &Arc<str>,
        trace: &Trace,
        missing: ModelMissing,
    ) -> ForwardError {
        let out_for = self.setup.model_not_enabled(&model.id, region);
        self.observer
            .setup_error(region, model.id.as_str(), "model_not_enabled");
        tracing::error!(
            request_id = %trace.request_id,
            model = %model.id,
            %region,
            out_for_s = out_for.as_secs(),
            "{}; routing around it meanwhile",
            missing.fix
        );
        ForwardError::UpstreamUnavailable {
            region: region.to_string(),
            reason: format!("{} {}", model.id, missing.reason),
        }
    }

    /// One attempt; if the provider rejects the gateway's own credentials
    /// (401/403), they are refreshed and the attempt is made once more. A
    /// second rejection is the gateway's problem, never the client's: it
    /// becomes [`ForwardError::Credentials`] (a 5xx), with a metric and a log
    /// line saying what to check.
    async fn send_checked(
        &self,
        provider: &Arc<dyn Provider>,
        trace: &mut Trace,
        op: Operation,
        endpoint: bool,
        body: Bytes,
        beta: Option<HeaderValue>,
    ) -> Result<reqwest::Response, ForwardError> {
        let mut refreshed = false;
        loop {
            let response = self
                .send(provider, trace, op, endpoint, body.clone(), beta.clone())
                .await?;
            let status = response.status().as_u16();
            if !matches!(status, 401 | 403) {
                return Ok(response);
            }
            self.observer
                .setup_error(&trace.region, trace.model.as_str(), "credentials_rejected");
            tracing::error!(
                request_id = %trace.request_id,
                region = %trace.region,
                status,
                refreshed,
                "{}",
                provider.credentials_rejected()
            );
            if refreshed {
                return Err(ForwardError::Credentials);
            }
            provider.refresh_credentials().await?;
            refreshed = true;
        }
    }

    /// The provider of the granted location, and its name.
    fn provider_for<'m>(
        &self,
        model: &'m ModelSpec,
        grant: &Grant,
    ) -> Result<(&'m str, &Arc<dyn Provider>), ForwardError> {
        let location = model
            .regions
            .iter()
            .chain(&model.overflow)
            .find(|r| *r.region == *grant.region)
            .expect("grants name the model's locations");
        Ok((&location.provider, self.provider(&location.provider)?))
    }

    /// Settles an attempt that failed with `error`: `Ok(error)` when another
    /// attempt may succeed (the store learned from this one), `Err(error)`
    /// when it is the call's answer.
    async fn failed(
        &self,
        grant: &Grant,
        error: ForwardError,
        trace: &Trace,
    ) -> Result<ForwardError, ForwardError> {
        if outcome_is_capacity(&error) {
            self.observer
                .capacity_limited(&grant.region, trace.model.as_str());
        }
        match attempt_failure(&error) {
            Some(outcome) => {
                tracing::info!(request_id = %trace.request_id, region = %grant.region, error = %error, "upstream refused; trying again");
                self.scheduler.settle(grant, outcome).await;
                Ok(error)
            }
            None => {
                // A definite answer (400, 404, credentials...): upstream
                // spent nothing on it.
                let outcome = match error {
                    ForwardError::Upstream(_) => Outcome::Used(Charge::default()),
                    _ => Outcome::NotSent,
                };
                self.scheduler.settle(grant, outcome).await;
                Err(error)
            }
        }
    }

    /// What this call asks of its model's overflow locations, if it may
    /// overflow at all: a Messages call (counting tokens never spills), a
    /// model with `overflow`, a tenant that allows it (and, pinned to
    /// regions, lists the provider), a region hint that names the provider
    /// if there is one. It queues apart (the overflow requester), at the
    /// call's priority and deadline; it reserves `max_tokens` of output,
    /// since Anthropic debits that much when the request arrives.
    fn overflow_demand(
        &self,
        model: &ModelSpec,
        request: &super::call::CallRequest,
        demand: &Demand,
        plan: Plan,
    ) -> Option<Demand> {
        if model.overflow.is_empty()
            || request.op != Operation::Messages
            || request.stream != request.stream_endpoint
        {
            return None;
        }
        let policy = &request.tenant.policy;
        let regions: Vec<Arc<str>> = model
            .overflow
            .iter()
            .map(|r| r.region.as_str())
            .filter(|r| policy.allows_overflow(r) && !self.setup.is_out(&model.id, r))
            .filter(|r| {
                request
                    .region_hint
                    .as_ref()
                    .is_none_or(|hint| hint.iter().any(|h| h == r))
            })
            .map(Arc::from)
            .collect();
        let limits = model
            .overflow
            .iter()
            .find(|r| regions.iter().any(|e| **e == *r.region))?
            .limits;
        let charge = Charge {
            input: plan.charge.input,
            output: plan.max_tokens,
        };
        let part = |used: u64, limit: Option<u64>| {
            limit
                .filter(|l| *l > 0)
                .map_or(0.0, |l| used as f64 / l as f64)
        };
        let floor = 1.0 / f64::from(limits.requests.max(1));
        Some(Demand {
            group: model.overflow_requester(),
            regions,
            charge,
            strategy: spillway_core::store::Strategy::Ordered,
            share_cost: floor
                .max(part(charge.input, limits.input_tokens))
                .max(part(charge.output, limits.output_tokens)),
            share_floor: floor,
            ..demand.clone()
        })
    }

    /// One admission, timed and counted.
    async fn admit(
        &self,
        demand: &Demand,
        model: &ModelSpec,
        plan: Plan,
        failed_region: Option<Arc<str>>,
        trace: &mut Trace,
    ) -> Result<Grant, Rejection> {
        let waited = tokio::time::Instant::now();
        let grant = self.scheduler.admit(demand).await?;
        let wait = waited.elapsed();
        trace.queue_wait += wait;
        trace.attempts += 1;
        trace.region = Arc::clone(&grant.region);
        self.observer.admitted(Admission {
            model: model.id.as_str(),
            primary: model.regions[0].region.as_str(),
            region: &grant.region,
            failed_region: failed_region.as_deref(),
            wait,
            priority: demand.priority,
            point_input: plan.input.point,
            reserved: grant.charge,
        });
        Ok(grant)
    }

    /// One upstream attempt to `trace.region`, timed and counted.
    pub(super) async fn send(
        &self,
        provider: &Arc<dyn Provider>,
        trace: &mut Trace,
        op: Operation,
        stream: bool,
        body: Bytes,
        beta: Option<HeaderValue>,
    ) -> Result<reqwest::Response, ForwardError> {
        let sent = Instant::now();
        let result = provider
            .send(ProviderRequest {
                location: &trace.region,
                model: &trace.model,
                op,
                stream,
                body,
                beta,
            })
            .await;
        trace.upstream_latency = sent.elapsed();
        if let Some(span) = trace.span.as_mut() {
            span.attempted(&trace.region, sent, attempt_status(&result));
        }
        let status = match &result {
            Ok(response) => status_label(response.status().as_u16()),
            Err(ForwardError::UpstreamTimeout { .. }) => "timeout",
            Err(ForwardError::Credentials) => "credentials",
            Err(_) => "transport",
        };
        let latency: Option<Duration> = result.is_ok().then_some(trace.upstream_latency);
        self.observer
            .attempted(&trace.region, trace.model.as_str(), status, latency);
        result
    }
}
