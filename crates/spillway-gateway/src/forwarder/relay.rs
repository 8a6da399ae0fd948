//! Relaying a successful answer and settling its reservation.
//!
//! A unary answer is read whole (its `usage` settles the grant, on a task of
//! its own: with a shared store a settle is another round trip, and nothing
//! in the answer depends on it). A stream is handed on as it arrives through
//! [`SsePassthrough`]; when it ends — completed, failed, or dropped by the
//! client — its end hook settles the grant to what was observed and fills the
//! answer's [`StreamEnd`] for the request's record. A stream the upstream
//! broke settles as [`Outcome::Broken`], so the location cools down as for a
//! failure before any byte.
//!
//! A [`Settle`] dropped before it ran (the client went away while a unary
//! body was read, the shutdown grace cut the request) settles anyway, to its
//! reservation: every grant ends settled or refunded. Settlements run on the
//! forwarder's tracker, which shutdown waits for.

use std::sync::Arc;

use http::{header, HeaderValue};
use spillway_core::ledger::Charge;
use spillway_core::store::{Grant, Outcome};
use spillway_core::{ModelId, ModelSpec};
use spillway_vertex::{message_end_from_body, normalize_upstream_error, Usage};

use super::call::Plan;
use super::Forwarder;
use crate::answer::{Answer, ForwardError, Served, StreamEnd};
use crate::estimates::Observed;
use crate::observer::Trace;
use crate::passthrough::{SsePassthrough, StreamOutcome};
use crate::upstream::vertex::classify_send_error;

/// Settles a reservation once the response's usage is known.
pub(super) struct Settle {
    forwarder: Arc<Forwarder>,
    model: ModelId,
    /// Whether this model's cache reads count toward its input quota.
    cache_reads_count: bool,
    grant: Grant,
    plan: Plan,
    tenant: Arc<str>,
    /// Not yet settled: dropping it settles to the reservation.
    armed: bool,
}

/// How a served request ended, for its settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// The whole answer arrived.
    Complete,
    /// Cut on the client's side (gone, or Spillway's shutdown).
    Cut,
    /// The upstream broke it part-way.
    Broken,
}

impl Settle {
    pub(super) fn new(
        forwarder: Arc<Forwarder>,
        model: &ModelSpec,
        grant: Grant,
        plan: Plan,
        tenant: &Arc<str>,
    ) -> Self {
        Self {
            forwarder,
            model: model.id.clone(),
            cache_reads_count: model.cache_reads_count,
            grant,
            plan,
            tenant: Arc::clone(tenant),
            armed: true,
        }
    }

    /// The input tokens the quota counts: new input and cache writes, and
    /// cache reads only for models whose quota counts them.
    fn counted_input(&self, u: &Usage) -> u64 {
        let reads = if self.cache_reads_count {
            u.cache_read_input_tokens
        } else {
            0
        };
        u.input_tokens
            .saturating_add(u.cache_creation_input_tokens)
            .saturating_add(reads)
    }

    pub(super) fn grant(&self) -> &Grant {
        &self.grant
    }

    fn charge_for(&self, usage: Option<Usage>, complete: bool) -> Charge {
        match usage {
            Some(u) if complete => Charge {
                input: self.counted_input(&u),
                output: u.output_tokens,
            },
            // A broken stream: what was observed, and at least the input estimate.
            Some(u) => Charge {
                input: self.counted_input(&u).max(self.grant.charge.input),
                output: u.output_tokens,
            },
            None if complete => self.grant.charge,
            None => Charge {
                input: self.grant.charge.input,
                output: 0,
            },
        }
    }

    async fn run(mut self, usage: Option<Usage>, ending: Ending) {
        self.armed = false;
        let complete = ending == Ending::Complete;
        if let Some(u) = usage.filter(|_| complete) {
            let (f, plan) = (&self.forwarder, &self.plan);
            let (actual, counted) = (u.total_input(), self.counted_input(&u));
            if counted > 0 {
                let ratio = plan.charge.input as f64 / counted as f64;
                f.observer
                    .estimate_ratio(self.model.as_str(), plan.input.class.name(), ratio);
            }
            f.estimates.observe(
                &self.model,
                &self.tenant,
                Observed {
                    estimate: &plan.estimate,
                    max_tokens: plan.max_tokens,
                    input: actual,
                    output: u.output_tokens,
                    cached: u
                        .cache_read_input_tokens
                        .saturating_add(u.cache_creation_input_tokens),
                    location: &self.grant.region,
                },
            );
        }
        let charge = self.charge_for(usage, complete);
        let outcome = match ending {
            Ending::Broken => Outcome::Broken(charge),
            Ending::Complete | Ending::Cut => Outcome::Used(charge),
        };
        self.forwarder.scheduler.settle(&self.grant, outcome).await;
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        if self.armed {
            let reserved = Outcome::Used(self.grant.charge);
            self.forwarder
                .settle_in_background(self.grant.clone(), reserved);
        }
    }
}

/// Whether an answer is a stream of server-sent events (Vertex answers
/// `"stream": true` with one even on `:rawPredict`).
pub(super) fn is_event_stream(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

pub(super) async fn unary(
    response: reqwest::Response,
    trace: &mut Trace,
    settle: Option<Settle>,
    served: Served,
) -> Result<Answer, ForwardError> {
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/json"));
    let body = match response.bytes().await {
        Ok(bytes) => bytes,
        Err(e) => {
            if let Some(settle) = settle {
                settle.run(None, Ending::Broken).await;
            }
            return Err(classify_send_error(&trace.region, e));
        }
    };
    if !status.is_success() {
        return Err(ForwardError::Upstream(normalize_upstream_error(
            status.as_u16(),
            &body,
        )));
    }
    let end = message_end_from_body(&body);
    let usage = end.usage;
    if let Some(span) = trace.span.as_mut() {
        span.body_read(end.stop_reason);
    }
    if let Some(settle) = settle {
        let settlements = settle.forwarder.settlements.clone();
        settlements.spawn(settle.run(usage, Ending::Complete));
    }
    trace.outcome = "ok";
    Ok(Answer::Unary {
        body,
        content_type,
        usage,
        served,
    })
}

pub(super) fn stream(
    forwarder: &Forwarder,
    response: reqwest::Response,
    trace: &Trace,
    settle: Settle,
    served: Served,
) -> Answer {
    let end = StreamEnd::default();
    let observer = forwarder.observer.clone();
    observer.stream_opened(trace.model.as_str());
    let (region, model, started) = (
        Arc::clone(&trace.region),
        trace.model.clone(),
        trace.started,
    );
    let ended = end.clone();
    let events = SsePassthrough::new(
        response.bytes_stream(),
        forwarder.policy.drop_vertex_events,
        move |outcome: StreamOutcome| {
            let first_event_after = outcome.first_event_at.map(|t| t.duration_since(started));
            observer.stream_closed(&region, model.as_str(), first_event_after);
            let label = if outcome.completed {
                "ok"
            } else if outcome.client_gone {
                "client_gone"
            } else {
                "stream_error"
            };
            ended.set(outcome.usage, label, outcome.stop_reason);
            let usage = outcome.saw_message_start.then_some(outcome.usage);
            let ending = if outcome.completed {
                Ending::Complete
            } else if outcome.upstream_fault {
                Ending::Broken
            } else {
                Ending::Cut
            };
            // The hook may run from Drop, outside any await: settle on a task.
            let settlements = settle.forwarder.settlements.clone();
            settlements.spawn(settle.run(usage, ending));
        },
    )
    .cut_at(forwarder.lifecycle.stopped_owned());
    Answer::Stream {
        events,
        end,
        served,
    }
}
