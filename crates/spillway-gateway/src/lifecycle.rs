//! The phases of a shutdown, as one shared value every part can watch.
//!
//! A gateway behind a load balancer must leave without cutting what it
//! can finish, and without staying forever for a client that never does:
//!
//! 1. **Draining** (on SIGTERM or SIGINT): `/readyz` answers 503 at once,
//!    so the balancer stops sending; connections are still accepted for
//!    `server.shutdown_delay_ms`, while it notices.
//! 2. **Closing**: no new connection; each open one finishes the request in
//!    hand and closes (no keep-alive); the batch runner gives its leases back.
//! 3. **Stopped** (`server.shutdown_grace_ms` after the signal): what is
//!    still running is cut, in a form the client understands: a stream ends
//!    with an Anthropic `event: error` (`overloaded_error`), a unary request
//!    gets a 503. Reservations are settled or refunded on the way out
//!    (the forwarder's settlements are awaited before the process exits).
//!
//! Each phase is a [`CancellationToken`], so a task waits for one with a
//! plain `select!` and a check is one atomic load.

use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Shared by the server loop, `/readyz`, the unary-cut layer and every
/// stream relay. Cloning is cheap (three `Arc`s).
#[derive(Clone, Debug, Default)]
pub struct Lifecycle {
    draining: CancellationToken,
    closing: CancellationToken,
    stopped: CancellationToken,
}

impl Lifecycle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Phase 1: stop being ready.
    pub fn drain(&self) {
        self.draining.cancel();
    }

    /// Phase 2: stop taking connections and requests.
    pub fn close(&self) {
        self.drain();
        self.closing.cancel();
    }

    /// Phase 3: cut what is still running.
    pub fn stop(&self) {
        self.close();
        self.stopped.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.is_cancelled()
    }

    pub async fn closing(&self) {
        self.closing.cancelled().await
    }

    pub async fn stopped(&self) {
        self.stopped.cancelled().await
    }

    /// Resolves at phase 3; owned, so a stream can keep it in its state.
    pub fn stopped_owned(&self) -> WaitForCancellationFutureOwned {
        self.stopped.clone().cancelled_owned()
    }

    /// Runs the phases on their schedule once `signal` resolves: drain at
    /// once, close after `delay`, stop at `grace` (both from the signal).
    /// `finished` resolving (nothing left in flight) skips ahead to the end.
    pub async fn run(
        &self,
        signal: impl std::future::Future<Output = ()>,
        delay: Duration,
        grace: Duration,
    ) {
        signal.await;
        self.drain();
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            grace_ms = grace.as_millis() as u64,
            "shutting down: not ready; finishing in-flight requests"
        );
        tokio::time::sleep(delay).await;
        self.close();
        tokio::time::sleep(grace.saturating_sub(delay)).await;
        if !self.is_stopped() {
            tracing::warn!(
                "shutdown grace over: cutting the requests still in flight (streams end with event: error)"
            );
        }
        self.stop();
    }
}

/// The layer that answers a unary request still running when the grace
/// is over with a 503 `overloaded_error` (dropping the handler; its
/// reservation settles on the way out). A stream's response has left by
/// then; its body is cut by the relay.
pub async fn cut_at_stop(
    axum::extract::State(life): axum::extract::State<Lifecycle>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let shutting_down = || {
        crate::error::ApiError::Overloaded {
            message: "Spillway is shutting down; retry (another replica will answer)".into(),
            retry_after: Duration::from_secs(1),
        }
        .into_response()
    };
    if life.is_stopped() {
        return shutting_down();
    }
    tokio::select! {
        response = next.run(request) => response,
        _ = life.stopped() => shutting_down(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn phases_follow_the_signal_on_schedule() {
        let life = Lifecycle::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let runner = {
            let life = life.clone();
            tokio::spawn(async move {
                life.run(
                    async {
                        let _ = rx.await;
                    },
                    Duration::from_secs(2),
                    Duration::from_secs(30),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!life.is_draining(), "nothing before the signal");
        tx.send(()).unwrap();
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(life.is_draining());
        assert!(!life.closing.is_cancelled(), "connections still accepted");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(life.closing.is_cancelled());
        assert!(!life.is_stopped());
        tokio::time::sleep(Duration::from_secs(27)).await;
        assert!(!life.is_stopped(), "the grace counts from the signal");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(life.is_stopped());
        runner.await.unwrap();
    }

    #[test]
    fn a_later_phase_implies_the_earlier_ones() {
        let life = Lifecycle::new();
        life.stop();
        assert!(life.is_draining() && life.closing.is_cancelled() && life.is_stopped());
    }
}
