//! Whether a connection is idle, so it can be closed.
//!
//! hyper times out a request head only once its first byte has arrived; a
//! connection that sends nothing at all (a keep-alive connection between
//! requests, or one opened and left) would stay open for good. So each
//! connection keeps a [`Watch`]: requests in flight (counted by
//! [`ConnService`] from the call until the response body is dropped, so a
//! stream is in flight while it runs), whether a request has begun to
//! arrive, and when the client last sent a byte. A connection with nothing
//! in flight and nothing begun for `server.header_read_timeout_ms` is idle.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::future::RouteFuture;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

/// What a connection's task, its socket and its requests share.
#[derive(Debug)]
pub(crate) struct Watch {
    created: Instant,
    /// Milliseconds after `created` of the last activity: a byte from the
    /// client, or the end of a response.
    last_activity_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Bytes of a request arrived since the last answer was written.
    partial: AtomicBool,
    /// Set by the task when hyper gave up waiting for a request head.
    header_timed_out: AtomicBool,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            created: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            partial: AtomicBool::new(false),
            header_timed_out: AtomicBool::new(false),
        }
    }
}

impl Watch {
    fn touch(&self) {
        let now = self.created.elapsed().as_millis() as u64;
        self.last_activity_ms.store(now, Ordering::Relaxed);
    }

    /// The client sent bytes.
    pub(crate) fn read(&self) {
        self.partial.store(true, Ordering::Relaxed);
        self.touch();
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

    /// How much longer until the connection is idle for `limit`; `None`
    /// once it is.
    pub(crate) fn idle_in(&self, limit: Duration) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 || self.is_partial() {
            return Some(limit);
        }
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        let quiet = self.created.elapsed().saturating_sub(last);
        limit.checked_sub(quiet).filter(|left| !left.is_zero())
    }
}

/// Resolves once the connection has been idle for `limit`.
pub(crate) async fn idle_for(watch: &Watch, limit: Duration) {
    while let Some(left) = watch.idle_in(limit) {
        tokio::time::sleep(left).await;
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

/// The router as one connection's hyper service, counting its requests.
#[derive(Clone)]
pub(crate) struct ConnService {
    pub(crate) router: Router,
    pub(crate) watch: Arc<Watch>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = TrackedFuture;

    fn call(&self, request: Request<Incoming>) -> TrackedFuture {
        let guard = InFlight::new(&self.watch);
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

    #[test]
    fn a_connection_is_idle_only_with_nothing_in_flight_or_begun() {
        let w = Arc::new(Watch::default());
        let limit = Duration::from_secs(10);
        assert!(w.idle_in(limit).is_some(), "just opened: not idle yet");
        // Pretend the last activity was long ago.
        w.last_activity_ms.store(0, Ordering::Relaxed);
        let old = Watch {
            created: Instant::now() - Duration::from_secs(60),
            ..Watch::default()
        };
        assert_eq!(old.idle_in(limit), None, "quiet for a minute: idle");
        old.in_flight.store(1, Ordering::Relaxed);
        assert_eq!(old.idle_in(limit), Some(limit), "a request in flight");
        old.in_flight.store(0, Ordering::Relaxed);
        old.partial.store(true, Ordering::Relaxed);
        assert_eq!(
            old.idle_in(limit),
            Some(limit),
            "a head begun: hyper's timeout"
        );
        let guard = InFlight::new(&w);
        assert_eq!(w.in_flight.load(Ordering::Relaxed), 1);
        drop(guard);
        assert_eq!(w.in_flight.load(Ordering::Relaxed), 0);
    }
}
