//! Streaming passthrough: upstream SSE bytes go to the client as they
//! arrive, event by event, while a side parser reads usage for accounting.
//!
//! Bytes are forwarded unchanged (Vertex's padded JSON included); parsing is
//! only to find event boundaries, drop `vertex_event` (strict clients reject
//! it) and read `message_start` / `message_delta` usage. An event is held
//! only until its terminating blank line, never the whole response.
//!
//! The stream ends in one of four ways, each reported once to the
//! `on_finish` hook as a [`StreamOutcome`]:
//! - `message_stop` arrived: complete;
//! - the upstream connection failed or ended early: the client gets an
//!   Anthropic `event: error` and the stream closes;
//! - the upstream sent its own `event: error`: forwarded as is;
//! - the client went away: the body is dropped and the hook runs from
//!   `Drop`, so a reservation can always be released.
//!
//! A fifth, from Spillway itself: the shutdown grace ran out
//! ([`SsePassthrough::cut_at`]); the client gets an `overloaded_error`
//! event and can retry against another replica.
//!
//! An ending that is the upstream's fault — its connection reset, it
//! stopped sending, it ended early, or it sent `event: error` with an
//! overloaded or internal error — is marked [`StreamOutcome::upstream_fault`]
//! so the location cools down as it would for a failure before any byte.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use spillway_vertex::{
    is_vertex_event, sse_error_event, ErrorKind, SseSplitter, StopReason, StreamUsage, Usage,
};

/// Largest single SSE event accepted from upstream.
const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// How a stream ended, for accounting and the request log.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamOutcome {
    pub usage: Usage,
    pub saw_message_start: bool,
    /// `message_stop` was forwarded.
    pub completed: bool,
    /// Why the stream ended early, if it did.
    pub failure: Option<String>,
    /// The client disconnected before the end.
    pub client_gone: bool,
    /// The upstream broke the stream (see the module docs).
    pub upstream_fault: bool,
    /// When the first bytes went to the client.
    pub first_event_at: Option<std::time::Instant>,
    /// The last `message_delta`'s stop reason, if one came.
    pub stop_reason: Option<StopReason>,
}

type UpstreamBytes = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;
type FinishHook = Box<dyn FnOnce(StreamOutcome) + Send>;
type Stop = Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>;

pub struct SsePassthrough {
    upstream: UpstreamBytes,
    splitter: SseSplitter,
    usage: StreamUsage,
    drop_vertex_events: bool,
    finished: bool,
    first_event_at: Option<std::time::Instant>,
    on_finish: Option<FinishHook>,
    stop: Option<Stop>,
}

impl SsePassthrough {
    pub fn new(
        upstream: impl Stream<Item = Result<Bytes, reqwest::Error>> + Send + 'static,
        drop_vertex_events: bool,
        on_finish: impl FnOnce(StreamOutcome) + Send + 'static,
    ) -> Self {
        Self {
            upstream: Box::pin(upstream),
            splitter: SseSplitter::new(MAX_EVENT_BYTES),
            usage: StreamUsage::default(),
            drop_vertex_events,
            finished: false,
            first_event_at: None,
            on_finish: Some(Box::new(on_finish)),
            stop: None,
        }
    }

    /// Ends the stream with an `overloaded_error` event once `stop` resolves
    /// (the shutdown grace is over).
    pub fn cut_at(mut self, stop: tokio_util::sync::WaitForCancellationFutureOwned) -> Self {
        self.stop = Some(Box::pin(stop));
        self
    }

    fn report(&mut self, failure: Option<String>, client_gone: bool, upstream_fault: bool) {
        if let Some(hook) = self.on_finish.take() {
            hook(StreamOutcome {
                usage: self.usage.usage(),
                saw_message_start: self.usage.saw_message_start(),
                completed: self.usage.completed(),
                failure,
                client_gone,
                upstream_fault,
                first_event_at: self.first_event_at,
                stop_reason: self.usage.stop_reason(),
            });
        }
    }

    /// Ends the stream with an Anthropic error event for the client.
    fn fail(
        &mut self,
        kind: ErrorKind,
        message: String,
        upstream_fault: bool,
    ) -> Poll<Option<Result<Bytes, Infallible>>> {
        self.finished = true;
        let event = sse_error_event(kind, &message);
        self.report(Some(message), false, upstream_fault);
        Poll::Ready(Some(Ok(event)))
    }
}

impl Stream for SsePassthrough {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            if let Some(stop) = &mut this.stop {
                if stop.as_mut().poll(cx).is_ready() {
                    return this.fail(
                        ErrorKind::Overloaded,
                        "Spillway is shutting down and cut this stream after its grace period; retry".to_string(),
                        false,
                    );
                }
            }
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    let events = match this.splitter.push(&chunk) {
                        Ok(events) => events,
                        Err(e) => {
                            return this.fail(ErrorKind::Api, format!("upstream sent {e}"), true)
                        }
                    };
                    let mut out: Option<Bytes> = None;
                    let mut joined: Option<BytesMut> = None;
                    for event in events {
                        this.usage.observe(&event);
                        if this.drop_vertex_events && is_vertex_event(&event) {
                            continue;
                        }
                        // One event (the common case) is forwarded without a copy.
                        match (&mut joined, out.take()) {
                            (Some(buf), _) => buf.extend_from_slice(&event.raw),
                            (None, None) => out = Some(event.raw),
                            (None, Some(first)) => {
                                let mut buf =
                                    BytesMut::with_capacity(first.len() + event.raw.len());
                                buf.extend_from_slice(&first);
                                buf.extend_from_slice(&event.raw);
                                joined = Some(buf);
                            }
                        }
                    }
                    let out = joined.map(BytesMut::freeze).or(out);
                    if let Some(bytes) = out {
                        this.first_event_at
                            .get_or_insert_with(std::time::Instant::now);
                        return Poll::Ready(Some(Ok(bytes)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let (kind, what) = if e.is_timeout() {
                        (
                            ErrorKind::Timeout,
                            "upstream stopped sending (read timeout)",
                        )
                    } else {
                        (ErrorKind::Api, "upstream connection lost mid-stream")
                    };
                    tracing::warn!(error = %e.without_url(), "{what}");
                    return this.fail(kind, what.to_string(), true);
                }
                Poll::Ready(None) => {
                    let truncated = this.splitter.finish().is_some();
                    if this.usage.completed() || (this.usage.error().is_some() && !truncated) {
                        this.finished = true;
                        let error = this.usage.error();
                        let fault = error.as_ref().is_some_and(|(t, _)| is_upstream_fault(t));
                        let failure = error.map(|(t, m)| format!("{t}: {m}"));
                        this.report(failure, false, fault && !this.usage.completed());
                        return Poll::Ready(None);
                    }
                    return this.fail(
                        ErrorKind::Api,
                        "upstream stream ended before message_stop".to_string(),
                        true,
                    );
                }
            }
        }
    }
}

/// Error types in an upstream `event: error` that say the location, not
/// the request, is in trouble.
fn is_upstream_fault(error_type: &str) -> bool {
    matches!(
        error_type,
        "overloaded_error" | "api_error" | "timeout_error"
    )
}

impl Drop for SsePassthrough {
    fn drop(&mut self) {
        if self.on_finish.is_some() {
            self.report(Some("client disconnected".into()), true, false);
        }
    }
}
