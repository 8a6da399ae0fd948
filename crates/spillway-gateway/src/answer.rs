//! What forwarding a call yields, in the gateway's own terms: an [`Answer`]
//! (a unary Message with its usage, or a stream of events whose usage is
//! known at its end) or a [`ForwardError`] (a typed refusal, a rate limit,
//! an upstream error).
//!
//! Neither is HTTP. The client surface (`routes`) renders them as responses
//! (`error` maps a [`ForwardError`] to Anthropic's error shape and status);
//! the batch runner stores them as results and decides from the variant
//! whether to try again. Nothing inside the process goes through an
//! `axum::Response` to learn what happened.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use spillway_core::store::BudgetView;
use spillway_vertex::{StopReason, UpstreamError, Usage};

use crate::passthrough::SsePassthrough;

/// Where and how a call was served: what the response headers say.
#[derive(Debug, Clone)]
pub struct Served {
    /// The location that answered (`x-spillway-region`).
    pub region: Arc<str>,
    /// The provider that answered (`x-spillway-provider`): `vertex`, or an
    /// overflow provider such as `anthropic`.
    pub provider: &'static str,
    /// The budget as admission saw it (`anthropic-ratelimit-*`); `None` for
    /// calls that spend no quota (`count_tokens`).
    pub budget: Option<BudgetView>,
    /// Set when the client named the model by an unversioned alias.
    pub alias_warning: Option<String>,
}

/// A successful call.
pub enum Answer {
    /// The whole body, already settled to `usage`.
    Unary {
        body: Bytes,
        content_type: HeaderValue,
        usage: Option<Usage>,
        served: Served,
    },
    /// Events as they arrive; settled, and `end` filled, when the stream
    /// ends (completed, failed, or dropped by the client).
    Stream {
        events: SsePassthrough,
        end: StreamEnd,
        served: Served,
    },
}

/// How a stream ended, readable once it has: the usage seen and the outcome
/// label for the request log (and why the model stopped, for its span).
#[derive(Debug, Clone, Default)]
pub struct StreamEnd(Arc<Mutex<Option<Ended>>>);

#[derive(Debug, Clone, Copy)]
struct Ended {
    usage: Usage,
    outcome: &'static str,
    stop_reason: Option<StopReason>,
}

impl StreamEnd {
    pub(crate) fn set(&self, usage: Usage, outcome: &'static str, stop_reason: Option<StopReason>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Ended {
            usage,
            outcome,
            stop_reason,
        });
    }

    /// The usage and outcome, once the stream has ended.
    pub fn get(&self) -> Option<(Usage, &'static str)> {
        let ended = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        ended.map(|e| (e.usage, e.outcome))
    }

    /// The stop reason of the stream's last `message_delta`, once it has ended.
    pub fn stop_reason(&self) -> Option<StopReason> {
        let ended = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        ended.and_then(|e| e.stop_reason)
    }
}

/// Why a call was not answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Spillway refuses it before spending anything: it can never be served
    /// as asked (context window, larger than every budget, no region left).
    #[error("{0}")]
    Invalid(String),
    /// The model is not one Spillway serves.
    #[error("{0}")]
    UnknownModel(String),
    /// No quota before the call's deadline: Spillway's own decision, or an
    /// upstream 429 with nowhere left to go.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Duration,
    },
    /// The upstream answered with an error, already normalized.
    #[error("{}", .0.message)]
    Upstream(UpstreamError),
    /// The upstream could not be reached, or its answer could not be read.
    #[error("upstream {region} unavailable: {reason}")]
    UpstreamUnavailable { region: String, reason: String },
    #[error("upstream {region} did not answer in time")]
    UpstreamTimeout { region: String },
    /// The gateway's own upstream credentials could not produce a token.
    #[error("upstream credentials are not usable; see the Spillway log")]
    Credentials,
}

impl ForwardError {
    /// Whether the same call may succeed later. Batch items are retried
    /// when it is; a client is told so by the status it gets.
    pub fn is_transient(&self) -> bool {
        match self {
            ForwardError::Invalid(_) | ForwardError::UnknownModel(_) => false,
            ForwardError::Upstream(e) => e.status == 429 || e.status >= 500,
            ForwardError::RateLimited { .. }
            | ForwardError::UpstreamUnavailable { .. }
            | ForwardError::UpstreamTimeout { .. }
            | ForwardError::Credentials => true,
        }
    }
}
