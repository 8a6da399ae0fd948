//! The accept loop: how many connections, for how long, and how they end.
//!
//! Spillway serves connections itself (hyper's auto builder: HTTP/1.1, and
//! HTTP/2 with prior knowledge) rather than through `axum::serve`, because
//! the defences a gateway needs live at this level:
//!
//! - **At most `server.max_connections`** are served at once. Past it a new
//!   connection gets a 503 `overloaded_error` with `retry-after` and is
//!   closed, so a flood costs a descriptor for a moment, not for good. The
//!   limit is lowered at start to what the open-file limit allows (a
//!   proxied stream holds two descriptors). Accept errors (`EMFILE`) back
//!   off instead of spinning.
//! - **A request head must arrive within `server.header_read_timeout_ms`**
//!   of its first byte: a client that stops mid-head gets a 408 and is
//!   closed. A connection with nothing in flight that sends
//!   nothing for `server.idle_timeout_ms` is closed silently ([`idle`]). Bodies are paced one
//!   layer up ([`crate::client_limits`]).
//! - **Shutdown follows the [`Lifecycle`]**: accepting stops at *closing*;
//!   every connection is then told to finish the request in hand and close;
//!   at *stopped* the cut answers get [`FLUSH_AFTER_STOP`] to be written and
//!   whatever remains is dropped. [`serve`] returns when no connection is left.
//! - **Over TLS** (`server.tls_cert`, [`crate::listener_tls`]) the same holds,
//!   inside the session: the handshake runs in the connection's task, on its
//!   slot, and must be done within `server.header_read_timeout_ms` of the
//!   accept; the 503 past the limit is written after a handshake of its own
//!   (bounded like the plain one); a client that speaks plain HTTP to the
//!   TLS port gets a plain 400 saying to use `https://`. The verified client
//!   certificate, if any, goes to every request as a request extension.

pub(crate) mod answers;
mod idle;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use spillway_vertex::ErrorKind;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::{ServerSettings, MAX_HEADERS_LIMIT};
use crate::lifecycle::Lifecycle;
use crate::listener_tls::{looks_like_tls, peer_certificate, ClientCertificate, ListenerTls};
use crate::metrics::Metrics;
use answers::{raw_answer, ShapedIo, Socket};
use idle::{ConnService, Expiry, Watch};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;

/// How long cut answers (a stream's `event: error`, a unary 503) get to
/// reach their clients once the grace is over.
pub const FLUSH_AFTER_STOP: Duration = Duration::from_millis(500);

/// Refusals written at once, at most; past it a connection is just closed.
const MAX_REFUSING: usize = 64;

/// Descriptors kept for everything but client connections and their
/// upstream halves: listeners, Redis, PostgreSQL, logs, the runtime.
const RESERVED_FDS: u64 = 256;

/// The connection limit the process can honour: each served connection may
/// hold an upstream one too.
pub fn max_connections(configured: usize, open_files: Option<u64>) -> usize {
    match open_files {
        Some(limit) => {
            let fit = (limit.saturating_sub(RESERVED_FDS) / 2).max(1) as usize;
            configured.min(fit)
        }
        None => configured,
    }
}

/// Raises the soft open-file limit to the hard one, where the OS allows,
/// and returns the soft limit in force.
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct given.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return None;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit.rlim_cur = limit.rlim_max;
                }
            }
        }
        // rlim_t is u64 on Linux, not on every unix.
        #[allow(clippy::unnecessary_cast)]
        Some(limit.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    None
}

/// hyper's read buffer limit. Its buffer starts at 8 KiB and, whenever it
/// reads while bytes are still buffered, doubles to 16 KiB if the limit
/// allows: the second 8 KiB an open stream would hold for its whole life
/// (BENCHMARKS.md, "where the 51 KiB per stream goes"). At 8 KiB it
/// reuses its buffer instead. The limit must still hold a whole request
/// head, so a larger `server.max_header_bytes` raises it.
fn read_buffer_bytes(max_header_bytes: usize) -> usize {
    const HYPER_MIN: usize = 8192;
    max_header_bytes.max(HYPER_MIN)
}

/// What every connection task needs.
struct Shared {
    builder: Builder<TokioExecutor>,
    router: Router,
    idle: Duration,
    head: Duration,
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    tls: Option<Arc<ListenerTls>>,
}

/// Serves `router` on `listener` (over TLS with `tls`) until the lifecycle
/// closes, then until the last connection ends. Returns how many
/// connections were still open when the grace ran out (and were cut).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: &ServerSettings,
    lifecycle: Lifecycle,
    metrics: Arc<Metrics>,
    tls: Option<Arc<ListenerTls>>,
) -> usize {
    let open_files = raise_open_file_limit();
    let limit = max_connections(settings.max_connections, open_files);
    if limit < settings.max_connections {
        tracing::warn!(
            configured = settings.max_connections,
            open_file_limit = open_files,
            max_connections = limit,
            "server.max_connections lowered to what the open-file limit allows"
        );
    }
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Not hyper's header timeout: see `idle`.
        .header_read_timeout(None)
        // One above Spillway's own limit, so that its 431 (which names the
        // limit) is the one a client just past it sees; further past,
        // hyper's 431 is reshaped. Not higher: hyper sets up this many header
        // slots for every request it parses (500 cost 2% of a request).
        .max_headers(settings.max_headers.min(MAX_HEADERS_LIMIT) + 1)
        .max_buf_size(read_buffer_bytes(settings.max_header_bytes));
    builder.http2().timer(TokioTimer::new());
    let shared = Arc::new(Shared {
        builder,
        router,
        idle: Duration::from_millis(settings.idle_timeout_ms),
        head: Duration::from_millis(settings.header_read_timeout_ms),
        lifecycle: lifecycle.clone(),
        metrics,
        slots: Arc::new(Semaphore::new(limit)),
        refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
        tls,
    });
    let tasks = TaskTracker::new();
    let mut accept_errors = 0u64;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = lifecycle.closing() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, _peer)) => {
                accept_errors = 0;
                // Small SSE events must not wait for the client's delayed
                // ACK (Nagle): that cost ~40 ms per stream (BENCHMARKS.md).
                let _ = tcp.set_nodelay(true);
                match Arc::clone(&shared.slots).try_acquire_owned() {
                    Ok(slot) => {
                        tasks.spawn(connection(Arc::clone(&shared), tcp, slot));
                    }
                    Err(_) => refuse(&shared, &tasks, tcp),
                }
            }
            Err(e) => {
                // Out of descriptors (or a transient accept error): wait
                // for connections to end rather than spinning on accept.
                accept_errors += 1;
                if accept_errors == 1 || accept_errors.is_power_of_two() {
                    tracing::warn!(error = %e, times = accept_errors, "cannot accept a connection");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    tasks.close();
    tokio::select! {
        _ = tasks.wait() => 0,
        _ = async {
            lifecycle.stopped().await;
            tokio::time::sleep(FLUSH_AFTER_STOP).await;
        } => {
            let cut = tasks.len();
            tracing::warn!(connections = cut, "shutdown: dropping connections still open after the grace");
            cut
        }
    }
}

/// One connection, served until it ends or the lifecycle ends it.
async fn connection(shared: Arc<Shared>, tcp: TcpStream, slot: OwnedSemaphorePermit) {
    let _slot = slot;
    shared.metrics.open_connections.inc();
    match &shared.tls {
        None => serve_io(&shared, tcp, None).await,
        Some(tls) => {
            if let Some((stream, peer)) = handshake(&shared, tls, tcp).await {
                serve_io(&shared, stream, peer).await;
            }
        }
    }
    shared.metrics.open_connections.dec();
    // Returning drops the slot.
}

/// The TLS handshake of a connection, within the head timeout of its
/// accept; `None` when it failed, timed out, was plain HTTP (answered) or
/// the listener is closing.
async fn handshake(
    shared: &Shared,
    tls: &ListenerTls,
    tcp: TcpStream,
) -> Option<(TlsStream<TcpStream>, Option<ClientCertificate>)> {
    let refused = |reason: &str| {
        shared
            .metrics
            .connections_refused
            .with_label_values(&[reason])
            .inc();
    };
    let deadline = tokio::time::Instant::now() + shared.head;
    let life = &shared.lifecycle;
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        _ = life.closing() => return None,
        peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut first)) => peeked,
    };
    match peeked {
        Err(_) => {
            refused("tls_timeout");
            tracing::debug!("TLS handshake: nothing sent within server.header_read_timeout_ms");
            return None;
        }
        Ok(Ok(0)) | Ok(Err(_)) => return None,
        Ok(Ok(_)) if !looks_like_tls(first[0]) => {
            refused("plain_http");
            answer_plain_http(tcp).await;
            return None;
        }
        Ok(Ok(_)) => {}
    }
    let accepted = tokio::select! {
        _ = life.closing() => return None,
        accepted = tokio::time::timeout_at(deadline, tls.acceptor().accept(tcp)) => accepted,
    };
    match accepted {
        Ok(Ok(stream)) => {
            let peer = peer_certificate(stream.get_ref().1);
            Some((stream, peer))
        }
        Ok(Err(e)) => {
            refused("tls_handshake");
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            refused("tls_timeout");
            tracing::debug!("TLS handshake did not finish within server.header_read_timeout_ms");
            None
        }
    }
}

/// Plain HTTP on the TLS port: a plain-text 400 that says what to do.
async fn answer_plain_http(mut tcp: TcpStream) {
    let (id, answer) = raw_answer(
        400,
        "Bad Request",
        ErrorKind::InvalidRequest,
        "this port serves HTTPS only: connect with https:// (server.tls_cert is set)",
        None,
    );
    tracing::info!(request_id = %id, "plain HTTP on the TLS listener refused");
    let _ = tokio::time::timeout(Duration::from_secs(1), write_and_close(&mut tcp, &answer)).await;
}

/// Writes a whole answer, closes the write side, and reads what the client
/// still sends, so closing does not reset the connection before it has
/// read the answer. Callers bound it in time.
async fn write_and_close<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    answer: &[u8],
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(answer).await?;
    stream.shutdown().await?;
    let mut sink = [0u8; 4096];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

/// Serves one connection's HTTP over `io` (TCP, or TLS over it).
async fn serve_io<S: Socket>(shared: &Shared, io: S, peer: Option<ClientCertificate>) {
    let watch = Arc::new(Watch::default());
    let io = ShapedIo::new(
        io,
        Arc::clone(&watch),
        shared.metrics.connections_refused.clone(),
    );
    let service = ConnService {
        router: shared.router.clone(),
        watch: Arc::clone(&watch),
        peer,
    };
    let conn = shared
        .builder
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let life = &shared.lifecycle;
    // Idle, or shutting down: finish what is in hand, then close. A head
    // that timed out: the socket answers 408 as it is dropped.
    let ended = tokio::select! {
        ended = conn.as_mut() => Some(ended),
        _ = life.closing() => None,
        expired = idle::expiry(&watch, shared.idle, shared.head) => match expired {
            Expiry::Idle => None,
            Expiry::HeadTimedOut => {
                watch.header_timed_out();
                shared.metrics.connections_refused.with_label_values(&["header_timeout"]).inc();
                Some(Ok(()))
            }
        },
    };
    let ended = match ended {
        Some(ended) => ended,
        None => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                ended = conn.as_mut() => ended,
                _ = life.stopped() => {
                    tokio::time::timeout(FLUSH_AFTER_STOP, conn.as_mut())
                        .await
                        .unwrap_or(Ok(()))
                }
            }
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
    // Returning drops the connection and its socket (see `ShapedIo`'s
    // Drop, which answers a timed-out head).
}

/// Past the connection limit: a 503 the client can act on, then close.
fn refuse(shared: &Arc<Shared>, tasks: &TaskTracker, mut tcp: TcpStream) {
    shared
        .metrics
        .connections_refused
        .with_label_values(&["connection_limit"])
        .inc();
    let Ok(turn) = Arc::clone(&shared.refusing).try_acquire_owned() else {
        return; // dropped: closed at once
    };
    let tls = shared.tls.clone();
    tasks.spawn(async move {
        let _turn = turn;
        let (id, answer) = raw_answer(
            503,
            "Service Unavailable",
            ErrorKind::Overloaded,
            "Spillway is at its connection limit (server.max_connections); retry shortly",
            Some(1),
        );
        tracing::warn!(request_id = %id, "connection refused: at server.max_connections");
        let written = tokio::time::timeout(Duration::from_secs(1), async {
            match tls {
                None => write_and_close(&mut tcp, &answer).await,
                Some(tls) => {
                    let mut stream = tls.refusing_acceptor().accept(tcp).await?;
                    write_and_close(&mut stream, &answer).await
                }
            }
        })
        .await;
        if let Ok(Err(e)) = written {
            tracing::debug!(error = %e, "writing a connection-limit refusal");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_fits_the_open_file_limit() {
        assert_eq!(max_connections(10_000, None), 10_000);
        assert_eq!(max_connections(10_000, Some(20_000)), 9_872);
        assert_eq!(max_connections(100, Some(20_000)), 100);
        assert_eq!(max_connections(100, Some(10)), 1);
    }
}
