//! A closed-loop HTTP/1.1 load driver: `conns` keep-alive connections, each
//! sending its next request as soon as the last answer's body is read.
//!
//! It speaks hyper's client connection directly (no pool, no URL parsing,
//! no redirects), so that what it spends per request is as small as a
//! client can make it: the driver shares the machine with the gateway and
//! the upstream, and every cycle it saves is one the measured path can use.
//!
//! A run has two phases on one clock: a warm-up, whose requests are thrown
//! away, then the measured span. The caller reads the processes' CPU time at
//! the boundary and at the end ([`Run::measure`]), so the requests counted
//! and the CPU time divided by them cover the same span.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One kind of request, sent the same way every time.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
    pub body: Bytes,
    /// `authorization` header value, if any.
    pub authorization: Option<String>,
    /// A streamed answer must contain this to count as complete.
    pub must_contain: Option<&'static [u8]>,
}

/// What a measured span produced.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Time to the full body, sorted, in nanoseconds.
    pub latencies_ns: Vec<u64>,
    pub first_error: Option<String>,
}

impl Outcome {
    pub fn per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The q-quantile (0..=1) latency in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_ns.len() - 1) as f64 * q).round() as usize;
        self.latencies_ns[i] as f64 / 1000.0
    }
}

struct Shared {
    measuring: AtomicBool,
    stop: AtomicBool,
    requests: AtomicU64,
    errors: AtomicU64,
}

/// A load running in the background; see the module docs.
pub struct Run {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<u64>, Option<String>)>>,
}

impl Run {
    /// Opens `conns` connections and starts the loop on each (the warm-up).
    pub async fn start(target: Target, conns: usize) -> anyhow::Result<Run> {
        let shared = Arc::new(Shared {
            measuring: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        });
        let target = Arc::new(target);
        let mut tasks = Vec::with_capacity(conns);
        for _ in 0..conns {
            let stream = TcpStream::connect(target.addr)
                .await
                .with_context(|| format!("connecting to {}", target.addr))?;
            stream.set_nodelay(true)?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            tasks.push(tokio::spawn(drive(
                sender,
                Arc::clone(&target),
                Arc::clone(&shared),
            )));
        }
        Ok(Run { shared, tasks })
    }

    /// Ends the warm-up, calls `at_start` (e.g. read CPU times), lets the
    /// load run for `span`, calls `at_end` and stops every connection.
    pub async fn measure<S, E>(
        self,
        span: Duration,
        at_start: impl FnOnce() -> S,
        at_end: impl FnOnce() -> E,
    ) -> anyhow::Result<(Outcome, S, E)> {
        let start_figures = at_start();
        let started = Instant::now();
        let before = (
            self.shared.requests.load(Ordering::Relaxed),
            self.shared.errors.load(Ordering::Relaxed),
        );
        self.shared.measuring.store(true, Ordering::Relaxed);
        tokio::time::sleep(span).await;
        let after = (
            self.shared.requests.load(Ordering::Relaxed),
            self.shared.errors.load(Ordering::Relaxed),
        );
        let elapsed = started.elapsed();
        let end_figures = at_end();
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        let mut first_error = None;
        for task in self.tasks {
            let (mut l, e) = task.await?;
            latencies.append(&mut l);
            first_error = first_error.or(e);
        }
        latencies.sort_unstable();
        Ok((
            Outcome {
                requests: after.0 - before.0,
                errors: after.1 - before.1,
                elapsed,
                latencies_ns: latencies,
                first_error,
            },
            start_figures,
            end_figures,
        ))
    }
}

async fn drive(
    mut sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    target: Arc<Target>,
    shared: Arc<Shared>,
) -> (Vec<u64>, Option<String>) {
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut first_error = None;
    let host = target.addr.to_string();
    while !shared.stop.load(Ordering::Relaxed) {
        let mut request = Request::post(target.path.as_str())
            .header(http::header::HOST, host.as_str())
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(auth) = &target.authorization {
            request = request.header(http::header::AUTHORIZATION, auth.as_str());
        }
        let request = request
            .body(Full::new(target.body.clone()))
            .expect("a fixed, valid request");
        let sent = Instant::now();
        let result = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        }
        .await;
        let took = sent.elapsed();
        let complete = match &result {
            Ok((status, body)) if status.is_success() => target
                .must_contain
                .is_none_or(|needle| body.windows(needle.len()).any(|w| w == needle)),
            _ => false,
        };
        if complete {
            shared.requests.fetch_add(1, Ordering::Relaxed);
            if shared.measuring.load(Ordering::Relaxed) {
                latencies.push(took.as_nanos() as u64);
            }
        } else {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            if first_error.is_none() {
                first_error = Some(match result {
                    Ok((status, body)) => {
                        format!("HTTP {status}: {}", String::from_utf8_lossy(&body))
                    }
                    Err(e) => format!("{e:#}"),
                });
            }
            // A broken connection stays broken; stop this one.
            if sender.is_closed() {
                break;
            }
        }
    }
    (latencies, first_error)
}
