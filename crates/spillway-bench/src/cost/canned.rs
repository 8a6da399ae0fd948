//! The canned upstream: the cheapest Vertex that answers like one.
//!
//! The simulator (`spillway-sim`) keeps quota windows, tokenizes, injects
//! faults and renders each answer; measured as the upstream of a cost
//! benchmark, its own work would be counted on the same two cores as the
//! gateway's. This server does nothing a benchmark does not need: it reads
//! the request body (so the gateway's upload is real), and answers
//! `:rawPredict` with one fixed message and `:streamRawPredict` with one fixed
//! event stream, both built once at start. The bodies are shaped like
//! Vertex's (usage in `message_start` and `message_delta`), so the gateway
//! parses and settles them as it would a real answer.
//!
//! It runs as `spillway-bench canned-upstream` in a process of its own, so
//! its CPU time can be read apart from the gateway's and shown beside it: a
//! one-hop HTTP/1.1 server's cost is the floor under each of the gateway's
//! two hops.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// `spillway-bench canned-upstream` (see the module docs).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Address to listen on; the bound one is printed on stdout as
    /// `listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Worker threads (1 keeps it off the gateway's core as far as it can).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// The unary answer: what Vertex returns for a short Haiku reply.
pub const MESSAGE: &str = r#"{"id":"msg_vrtx_01canned","type":"message","role":"assistant","model":"claude-3-haiku-20240307","content":[{"type":"text","text":"Hello! How can I help you today?"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":12}}"#;

/// The streamed answer: the same reply as Anthropic's event sequence.
pub fn event_stream() -> String {
    let mut s = String::new();
    let mut event = |name: &str, data: &str| {
        s.push_str("event: ");
        s.push_str(name);
        s.push_str("\ndata: ");
        s.push_str(data);
        s.push_str("\n\n");
    };
    event(
        "message_start",
        r#"{"type":"message_start","message":{"id":"msg_vrtx_01canned","type":"message","role":"assistant","model":"claude-3-haiku-20240307","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1}}}"#,
    );
    event(
        "content_block_start",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    );
    event("ping", r#"{"type": "ping"}"#);
    for piece in [
        "Hello", "!", " How", " can", " I", " help", " you", " today", "?",
    ] {
        event(
            "content_block_delta",
            &format!(
                r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{piece}"}}}}"#
            ),
        );
    }
    event(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    );
    event(
        "message_delta",
        r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":12}}"#,
    );
    event("message_stop", r#"{"type":"message_stop"}"#);
    s
}

#[derive(Clone)]
struct Answers {
    message: Bytes,
    events: Bytes,
}

async fn answer(
    answers: Answers,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let streaming = request.uri().path().ends_with(":streamRawPredict");
    let unary = request.uri().path().ends_with(":rawPredict");
    // Read the whole upload, as Vertex does before it answers.
    let read = request.into_body().collect().await.is_ok();
    let (status, content_type, body) = match (read, streaming, unary) {
        (true, true, _) => (StatusCode::OK, "text/event-stream", answers.events),
        (true, false, true) => (StatusCode::OK, "application/json", answers.message),
        _ => (
            StatusCode::NOT_FOUND,
            "application/json",
            Bytes::from_static(br#"{"error":{"code":404,"message":"not a Vertex rawPredict path","status":"NOT_FOUND"}}"#),
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    Ok(response)
}

/// Serves until the process is killed.
pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.listen).await?;
        println!("listening on {}", listener.local_addr()?);
        let answers = Answers {
            message: Bytes::from_static(MESSAGE.as_bytes()),
            events: Bytes::from(event_stream()),
        };
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let answers = answers.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |r| answer(answers.clone(), r));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
