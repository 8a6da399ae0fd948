//! When a connection has had its time: idle, or too slow with its head.
//!
//! Each connection keeps a [`Watch`]: requests in flight (counted by
//! [`ConnService`] from the call until the response body is dropped, so a
//! stream is in flight while it runs), whether a request head has begun to
//! arrive (bytes read since the last answer was written, with nothing in
//! flight: hyper has not finished parsing it), and when the client last sent
//! a byte. [`expiry`] resolves when either limit passes:
//!
//! - a head begun and not finished after `server.header_read_timeout_ms`
//!   (checked every half of it, so cut between 1× and 1.5× of it): the
//!   client gets a 408;
//! - nothing in flight and nothing sent for `server.idle_timeout_ms`: the
//!   connection closes silently.
//!
//! This is done here rather than with hyper's own header timeout because
//! hyper starts that one on a kept-alive connection as soon as an answer is
//! done, so it would also close every idle keep-alive connection at the
//! header timeout — racing clients whose pools keep connections longer.
//! Times are tokio's, so the paused clock drives them in tests.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::routing::future::RouteFuture;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::listener_tls::ClientCertificate;

/// What a connection's task, its socket and its requests share.
#[derive(Debug)]
pub(crate) struct Watch {
    created: Instant,
    /// Milliseconds after `created` of the last activity: a byte from the
    /// client, or the end of a response.
    last_activity_ms: AtomicU64,
    /// Milliseconds after `created` when the head being read began.
    head_began_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Bytes of a request arrived since the last answer was written.
    partial: AtomicBool,
    /// Set by the task when the head timed out.
    header_timed_out: AtomicBool,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            created: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            head_began_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            partial: AtomicBool::new(false),
            header_timed_out: AtomicBool::new(false),
        }
    }
}

/// Why a connection's time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    Idle,
    HeadTimedOut,
}

impl Watch {
    fn now_ms(&self) -> u64 {
        self.created.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_activity_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// The client sent bytes.
    pub(crate) fn read(&self) {
        let now = self.now_ms();
        if !self.partial.swap(true, Ordering::Relaxed) {
            self.head_began_ms.store(now, Ordering::Relaxed);
        }
        self.last_activity_ms.store(now, Ordering::Relaxed);
    }

    /// An answer is being written: what the client sent was a request.
    pub(crate) fn wrote(&self) {
        self.partial.store(false, Ordering::Relaxed);
    }

    pub(crate) fn is_partial(&self) -> bool {
        self.partial.load(Ordering::Relaxed)
    }

    pub(crate) fn header_timed_out(&self) {
        self.header_timed_out.store(true, Ordering::Relaxed);
    }

    pub(crate) fn did_header_time_out(&self) -> bool {
        self.header_timed_out.load(Ordering::Relaxed)
    }

    /// Whether a limit has passed now, and if not, when to look again.
    fn check(&self, idle: Duration, head: Duration) -> Result<Expiry, Duration> {
        let now = self.now_ms();
        let since =
            |ms: &AtomicU64| Duration::from_millis(now.saturating_sub(ms.load(Ordering::Relaxed)));
        let look_again = (head / 2).max(Duration::from_millis(1));
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Err(look_again);
        }
        if self.is_partial() {
            return if since(&self.head_began_ms) >= head {
                Ok(Expiry::HeadTimedOut)
            } else {
                Err(look_again)
            };
        }
        match idle.checked_sub(since(&self.last_activity_ms)) {
            Some(left) if !left.is_zero() => Err(left.min(look_again)),
            _ => Ok(Expiry::Idle),
        }
    }
}

/// Resolves when the connection's time is up (see the module docs).
pub(crate) async fn expiry(watch: &Watch, idle: Duration, head: Duration) -> Expiry {
    loop {
        match watch.check(idle, head) {
            Ok(expiry) => return expiry,
            Err(wait) => tokio::time::sleep(wait).await,
        }
    }
}

/// One request in flight on a connection.
struct InFlight(Arc<Watch>);

impl InFlight {
    fn new(watch: &Arc<Watch>) -> Self {
        watch.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(watch))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The router as one connection's hyper service, counting its requests
/// and handing each the connection's verified client certificate, if any.
#[derive(Clone)]
pub(crate) struct ConnService {
    pub(crate) router: Router,
    pub(crate) watch: Arc<Watch>,
    pub(crate) peer: Option<ClientCertificate>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = TrackedFuture;

    fn call(&self, mut request: Request<Incoming>) -> TrackedFuture {
        let guard = InFlight::new(&self.watch);
        if let Some(peer) = self.peer {
            request.extensions_mut().insert(peer);
        }
        let mut router = self.router.clone();
        TrackedFuture {
            inner: tower_service::Service::call(&mut router, request),
            guard: Some(guard),
        }
    }
}

pin_project_lite::pin_project! {
    /// The router's future; its response carries the in-flight guard on.
    pub(crate) struct TrackedFuture {
        #[pin]
        inner: RouteFuture<Infallible>,
        guard: Option<InFlight>,
    }
}

impl Future for TrackedFuture {
    type Output = Result<Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = std::task::ready!(this.inner.poll(cx));
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|inner| TrackedBody {
            inner,
            _guard: guard,
        })))
    }
}

/// A response body that keeps its request in flight until it is dropped.
pub(crate) struct TrackedBody {
    inner: Body,
    _guard: Option<InFlight>,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
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

    const IDLE: Duration = Duration::from_secs(120);
    const HEAD: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_expires_at_the_idle_timeout() {
        let w = Watch::default();
        let started = Instant::now();
        assert_eq!(expiry(&w, IDLE, HEAD).await, Expiry::Idle);
        assert_eq!(started.elapsed(), IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_begun_head_times_out_between_one_and_one_and_a_half_times_the_limit() {
        let w = Watch::default();
        tokio::time::sleep(Duration::from_secs(3)).await;
        w.read();
        let began = Instant::now();
        assert_eq!(expiry(&w, IDLE, HEAD).await, Expiry::HeadTimedOut);
        let took = began.elapsed();
        assert!(took >= HEAD && took <= HEAD * 3 / 2, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_expires_while_a_request_is_in_flight() {
        let w = Arc::new(Watch::default());
        w.read();
        let guard = InFlight::new(&w);
        w.wrote();
        let waited = tokio::time::timeout(IDLE * 3, expiry(&w, IDLE, HEAD)).await;
        assert!(waited.is_err(), "a long stream keeps its connection");
        drop(guard);
        let ended = Instant::now();
        assert_eq!(expiry(&w, IDLE, HEAD).await, Expiry::Idle);
        assert_eq!(ended.elapsed(), IDLE, "idle counts from the answer's end");
    }
}
