//! What a client may cost before it has said anything useful.
//!
//! A connection is cheap for a client and costs Spillway a file descriptor
//! and some memory, so a slow or hostile client must not hold one forever.
//! The HTTP library bounds the header phase (`server.header_read_timeout_ms`,
//! set by [`crate::connections`]); this layer bounds the rest, in Spillway's
//! own terms so every refusal is Anthropic-shaped, carries a `request-id`
//! and is logged once by the observer:
//!
//! - **Headers**: more than `server.max_headers` fields, or more than
//!   `server.max_header_bytes` of names and values, is a 431; a target past
//!   `server.max_uri_bytes` is a 414. The count and the target are checked
//!   here before hyper's own (higher) limits; the whole head's size is also
//!   hyper's read-buffer limit (`connections`), and past it hyper's 431 is
//!   reshaped on the way out.
//! - **Body**: a body that sends no byte for `server.body_idle_timeout_ms`,
//!   or is not whole after `server.body_timeout_ms`, fails with
//!   [`BodyTimedOut`]; the handler reading it answers 408 and the request
//!   never reaches upstream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::config::ServerSettings;
use crate::error::ApiError;

/// The limits in force, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    pub body_idle: Duration,
    pub body_total: Duration,
}

impl ClientLimits {
    pub fn from_settings(s: &ServerSettings) -> Self {
        Self {
            max_headers: s.max_headers,
            max_header_bytes: s.max_header_bytes,
            max_uri_bytes: s.max_uri_bytes,
            body_idle: Duration::from_millis(s.body_idle_timeout_ms),
            body_total: Duration::from_millis(s.body_timeout_ms),
        }
    }

    /// Whether a request's head is within the limits; the refusal if not.
    fn check_head(&self, request: &Request) -> Result<(), ApiError> {
        let target = request
            .uri()
            .path_and_query()
            .map_or(0, |p| p.as_str().len());
        if target > self.max_uri_bytes {
            return Err(ApiError::UriTooLong {
                limit: self.max_uri_bytes,
            });
        }
        let headers = request.headers();
        // `len()` counts values, so a repeated field counts each time.
        if headers.len() > self.max_headers {
            return Err(ApiError::HeadersTooLarge(format!(
                "{} header fields; at most {} are accepted",
                headers.len(),
                self.max_headers
            )));
        }
        let bytes: usize = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        if bytes > self.max_header_bytes {
            return Err(ApiError::HeadersTooLarge(format!(
                "{bytes} bytes of header fields; at most {} are accepted",
                self.max_header_bytes
            )));
        }
        Ok(())
    }
}

/// The layer: refuses an oversized head, and paces the body.
pub async fn limit_clients(
    State(limits): State<ClientLimits>,
    request: Request,
    next: Next,
) -> Response {
    if let Err(refusal) = limits.check_head(&request) {
        // Such a client is unlikely to send a better next request on the
        // same connection: close it.
        let mut response = refusal.into_response();
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        return response;
    }
    let request = request.map(|body| Body::new(PacedBody::new(body, limits)));
    next.run(request).await
}

/// Why a body stopped: the client stalled, or took too long in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyTimedOut {
    #[error("the request body stalled: no byte arrived for {0:?}")]
    Idle(Duration),
    #[error("the request body did not arrive whole within {0:?}")]
    Total(Duration),
}

impl BodyTimedOut {
    /// The timeout behind a body-reading error, if that is what it was.
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<BodyTimedOut> {
        let mut cause = Some(error);
        while let Some(e) = cause {
            if let Some(t) = e.downcast_ref::<BodyTimedOut>() {
                return Some(*t);
            }
            cause = e.source();
        }
        None
    }
}

/// A request body with an idle timer and a deadline. The timer exists only
/// while the body is waited on, and is armed lazily: a body that arrives in
/// one read (most of them) never allocates one.
pub struct PacedBody {
    inner: Body,
    idle: Duration,
    total: Duration,
    started: Instant,
    last_byte: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl PacedBody {
    fn new(inner: Body, limits: ClientLimits) -> Self {
        let now = Instant::now();
        Self {
            inner,
            idle: limits.body_idle,
            total: limits.body_total,
            started: now,
            last_byte: now,
            timer: None,
        }
    }

    fn deadline(&self) -> (Instant, BodyTimedOut) {
        let idle = self.last_byte + self.idle;
        let total = self.started + self.total;
        if idle <= total {
            (idle, BodyTimedOut::Idle(self.idle))
        } else {
            (total, BodyTimedOut::Total(self.total))
        }
    }
}

impl HttpBody for PacedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.last_byte = Instant::now();
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let (at, why) = this.deadline();
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(why)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn limits() -> ClientLimits {
        ClientLimits {
            max_headers: 4,
            max_header_bytes: 64,
            max_uri_bytes: 16,
            body_idle: Duration::from_secs(30),
            body_total: Duration::from_secs(300),
        }
    }

    /// A body fed by hand, a chunk at a time.
    fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let stream = tokio_stream_from(rx).map(Ok::<_, std::io::Error>);
        (tx, Body::from_stream(stream))
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Bytes>,
    ) -> impl futures::Stream<Item = Bytes> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_after_the_idle_timeout_not_before() {
        let (tx, body) = channel_body();
        let mut paced = Body::new(PacedBody::new(body, limits())).into_data_stream();
        tx.send(Bytes::from_static(b"{\"a\":")).await.unwrap();
        assert_eq!(paced.next().await.unwrap().unwrap(), "{\"a\":");
        let started = Instant::now();
        let err = paced.next().await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(
            BodyTimedOut::find(&err),
            Some(BodyTimedOut::Idle(Duration::from_secs(30)))
        );
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_is_cut_at_the_total_deadline() {
        let (tx, body) = channel_body();
        let mut paced = Body::new(PacedBody::new(body, limits())).into_data_stream();
        let feeder = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(29)).await;
                if tx.send(Bytes::from_static(b" ")).await.is_err() {
                    break;
                }
            }
        });
        let started = Instant::now();
        let err = loop {
            match paced.next().await.unwrap() {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(started.elapsed(), Duration::from_secs(300));
        assert_eq!(
            BodyTimedOut::find(&err),
            Some(BodyTimedOut::Total(Duration::from_secs(300)))
        );
        drop(paced);
        feeder.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_body_arrives_whole() {
        let (tx, body) = channel_body();
        let paced = Body::new(PacedBody::new(body, limits()));
        let feeder = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                tx.send(Bytes::from_static(b"ab")).await.unwrap();
            }
        });
        let bytes = axum::body::to_bytes(paced, 1024).await.unwrap();
        assert_eq!(bytes, "ababababab");
        feeder.await.unwrap();
    }

    #[test]
    fn heads_past_a_limit_are_refused_with_the_right_status() {
        let l = limits();
        let ok = Request::builder()
            .uri("/v1/messages")
            .header("x-api-key", "k")
            .body(Body::empty())
            .unwrap();
        assert!(l.check_head(&ok).is_ok());
        let long_uri = Request::builder()
            .uri("/v1/messages?aaaaaaaaaaaa")
            .body(Body::empty())
            .unwrap();
        let status = |r: Result<(), ApiError>| r.unwrap_err().kind_and_status().1.as_u16();
        assert_eq!(status(l.check_head(&long_uri)), 414);
        let mut many = Request::builder().uri("/");
        for i in 0..5 {
            many = many.header(format!("x-{i}"), "v");
        }
        assert_eq!(
            status(l.check_head(&many.body(Body::empty()).unwrap())),
            431
        );
        let big = Request::builder()
            .uri("/")
            .header("x-big", "v".repeat(80))
            .body(Body::empty())
            .unwrap();
        assert_eq!(status(l.check_head(&big)), 431);
    }
}
