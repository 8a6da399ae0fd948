//! The Vertex path's HTTP client: hyper-util's pooled client over rustls,
//! with the bounds reqwest used to give it.
//!
//! Why not reqwest, which every other client in the workspace is: on this
//! path it cost more than the hop it makes. Per request it parsed the
//! already-parsed URL twice more (its pending request and its redirect layer,
//! even with redirects off) and ran a tower stack around hyper's client:
//! ~54k of the gateway's ~240k instructions, where hyper-util's client alone
//! is ~13k (BENCHMARKS.md, "Per-request cost"). This client takes a prebuilt
//! [`http::Uri`] and goes straight to the pool.
//!
//! What it keeps from the reqwest client it replaces (`[upstream]`):
//! - the connect timeout, and TCP no-delay;
//! - the read timeout, on the wait for the response head and then on every
//!   read of the body (no total timeout: streams run for minutes);
//! - the pool's idle timeout and size;
//! - TLS through rustls with the platform's verifier and the process's
//!   *ring* provider ([`crate::tls`]), HTTP/2 by ALPN where the host offers it;
//! - no redirects and no proxy (hosts come only from config).
//!
//! Answers leave as [`reqwest::Response`] (built from the `http` response),
//! so the provider seam and everything that reads an answer are unchanged,
//! and a timed-out read still says [`reqwest::Error::is_timeout`].

use std::future::Future as _;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::{Instant, Sleep};

use super::vertex::UpstreamInitError;
use crate::config::UpstreamSettings;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No response head within the read timeout (or no connection within
    /// the connect timeout).
    #[error("timed out")]
    Timeout,
    /// The connection could not be made (refused, unreachable, TLS).
    #[error("connection failed")]
    Connect(#[source] hyper_util::client::legacy::Error),
    /// The connection broke while the request was sent or the head read.
    #[error("connection error")]
    Transport(#[source] hyper_util::client::legacy::Error),
}

/// A pooled HTTP/1.1 and HTTP/2 client for the upstream hosts in config.
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    inner: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
    read_timeout: Duration,
}

impl UpstreamClient {
    /// The client `[upstream]` describes.
    pub fn new(settings: &UpstreamSettings) -> Result<Self, UpstreamInitError> {
        use rustls_platform_verifier::BuilderVerifierExt as _;
        crate::tls::install_crypto_provider();
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .ok_or_else(|| UpstreamInitError::Client("no rustls crypto provider".into()))?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_platform_verifier())
            .map_err(|e| UpstreamInitError::Client(e.to_string()))?
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(settings.pool_idle_timeout_ms))
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            inner,
            read_timeout: Duration::from_millis(settings.read_timeout_ms),
        })
    }

    /// Sends `request` and waits for the response head; the body is read
    /// later, each read bounded by the read timeout.
    pub async fn send(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<reqwest::Response, SendError> {
        let sent = tokio::time::timeout(self.read_timeout, self.inner.request(request)).await;
        let response = match sent {
            Err(_) => return Err(SendError::Timeout),
            Ok(Err(e)) if e.is_connect() => {
                return Err(if timed_out(&e) {
                    SendError::Timeout
                } else {
                    SendError::Connect(e)
                })
            }
            Ok(Err(e)) => return Err(SendError::Transport(e)),
            Ok(Ok(response)) => response,
        };
        let timeout = self.read_timeout;
        Ok(reqwest::Response::from(response.map(|body| {
            reqwest::Body::wrap(ReadTimeout {
                inner: body,
                timeout,
                last_read: Instant::now(),
                timer: None,
            })
        })))
    }
}

/// Whether a connect error comes down to the connect timeout.
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A body whose every read must make progress within `timeout`. As the
/// client's request body ([`crate::client_limits::PacedBody`]), the timer
/// is armed only when a read has to wait: a unary answer that is already in
/// the socket never registers one.
struct ReadTimeout<B> {
    inner: B,
    timeout: Duration,
    last_read: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<B> Body for ReadTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.last_read = Instant::now();
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let at = this.last_read + this.timeout;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Some(Err(Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "upstream read timed out",
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// The shipped `[upstream]` defaults with this read timeout.
    pub(in crate::upstream) fn settings(read_timeout_ms: u64) -> UpstreamSettings {
        let mut upstream = crate::Settings::load_layers(
            &["[server]\nauth = \"none\"\n"],
            &[],
            Some(Default::default()),
        )
        .expect("the shipped defaults load")
        .upstream;
        upstream.read_timeout_ms = read_timeout_ms;
        upstream
    }

    /// A server that reads one request and then writes `answer`, and then
    /// holds the connection open without another byte.
    async fn stalling_server(answer: &'static [u8]) -> http::Uri {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            socket.write_all(answer).await.unwrap();
            std::future::pending::<()>().await;
            drop(socket);
        });
        format!("http://{addr}/v1/x:rawPredict").parse().unwrap()
    }

    fn post(uri: http::Uri) -> http::Request<Full<Bytes>> {
        http::Request::post(uri)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn no_response_head_within_the_read_timeout_is_a_timeout() {
        let client = UpstreamClient::new(&settings(30_000)).unwrap();
        let uri = stalling_server(b"").await;
        let started = Instant::now();
        let sent = client.send(post(uri)).await;
        assert!(matches!(sent, Err(SendError::Timeout)), "{sent:?}");
        assert!(started.elapsed() >= Duration::from_secs(30));
    }

    // On the real clock: with a paused one, the runtime could skip ahead to
    // the deadline while the answer's head is still in the socket.
    #[tokio::test]
    async fn a_body_read_that_stalls_past_the_read_timeout_is_a_reqwest_timeout() {
        let client = UpstreamClient::new(&settings(300)).unwrap();
        let uri = stalling_server(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await;
        let response = client.send(post(uri)).await.expect("the head arrives");
        assert_eq!(response.status(), 200);
        let started = Instant::now();
        // The outer bound only turns a missing read timeout into a failure
        // rather than a hang.
        let error = tokio::time::timeout(Duration::from_secs(20), response.bytes())
            .await
            .expect("the read timeout ends the read")
            .expect_err("the body never ends");
        assert!(error.is_timeout(), "{error:?}");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_whole_answer_arrives_with_its_status_headers_and_body() {
        let client = UpstreamClient::new(&settings(30_000)).unwrap();
        let uri = stalling_server(
            b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        )
        .await;
        let response = client.send(post(uri)).await.unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(&response.bytes().await.unwrap()[..], b"{}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_failure() {
        let client = UpstreamClient::new(&settings(30_000)).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let uri: http::Uri = format!("http://127.0.0.1:{port}/x").parse().unwrap();
        let sent = client.send(post(uri)).await;
        assert!(matches!(sent, Err(SendError::Connect(_))), "{sent:?}");
    }
}
