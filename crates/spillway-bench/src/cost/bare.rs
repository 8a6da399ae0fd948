//! `spillway-bench bare-proxy`: the least a Rust HTTP/1.1 proxy can do for
//! one of the gateway's requests, as a floor to measure the gateway against.
//!
//! Why: the cost targets (CPU µs per request, added latency, throughput) are
//! absolute numbers, and on a VM much of a request's cost is the kernel's:
//! two loopback hops, each a `writev` that runs the receiver's TCP stack and
//! wakes it, often on the other CPU. This proxy pays exactly those hops and
//! nothing a gateway adds. It reads the request body whole (the gateway must,
//! to estimate it), picks `:rawPredict` or `:streamRawPredict` by one byte
//! search, sends the body unchanged with Vertex's bearer to a prebuilt URI on
//! hyper-util's pooled client (no-delay, the gateway's pool limits), and
//! streams the answer back as it comes. No auth, quota, parsing, metrics or
//! logs. What the gateway costs above this floor is its own work; what this
//! costs is the box's.
//!
//! `spillway-bench cost --floor` runs it as a third path beside the direct
//! one and the gateway's, on the same CPUs as the gateway.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::{UPSTREAM_TOKEN, VERTEX_PATH};

/// `spillway-bench bare-proxy` (see the module docs).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The canned upstream's address.
    #[arg(long)]
    pub upstream: SocketAddr,
}

type Client = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;
type Answer = Response<BoxBody<Bytes, hyper::Error>>;

struct Proxy {
    client: Client,
    unary: http::Uri,
    stream: http::Uri,
    bearer: http::HeaderValue,
}

fn plain(status: StatusCode, body: &'static str) -> Answer {
    let mut response = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

impl Proxy {
    async fn answer(&self, request: Request<Incoming>) -> Result<Answer, Infallible> {
        if request.uri().path() == "/healthz" {
            return Ok(plain(StatusCode::OK, "ok"));
        }
        let Ok(body) = request.into_body().collect().await else {
            return Ok(plain(StatusCode::BAD_REQUEST, "body"));
        };
        let body = body.to_bytes();
        let stream = body.windows(13).any(|w| w == br#""stream":true"#);
        let uri = if stream { &self.stream } else { &self.unary };
        let mut upstream = Request::post(uri.clone());
        if let Some(headers) = upstream.headers_mut() {
            headers.insert(http::header::AUTHORIZATION, self.bearer.clone());
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        let Ok(upstream) = upstream.body(Full::new(body)) else {
            return Ok(plain(StatusCode::INTERNAL_SERVER_ERROR, "request"));
        };
        Ok(match self.client.request(upstream).await {
            Ok(answer) => answer.map(BodyExt::boxed),
            Err(_) => plain(StatusCode::BAD_GATEWAY, "upstream"),
        })
    }
}

/// Serves until the process is killed, on a runtime sized to its CPUs (as
/// the gateway's is).
pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(4096)
            .build(connector);
        let base = format!("http://{}{VERTEX_PATH}", args.upstream);
        let proxy: &'static Proxy = Box::leak(Box::new(Proxy {
            client,
            unary: format!("{base}:rawPredict").parse()?,
            stream: format!("{base}:streamRawPredict").parse()?,
            bearer: http::HeaderValue::from_str(&format!("Bearer {UPSTREAM_TOKEN}"))?,
        }));
        let listener = TcpListener::bind(args.listen).await?;
        println!("listening on {}", listener.local_addr()?);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |r| proxy.answer(r));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
