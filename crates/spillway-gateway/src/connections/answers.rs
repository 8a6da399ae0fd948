//! Answers written below the router, in Anthropic's shape.
//!
//! A few answers cannot come from a handler: a connection past the limit
//! (there is no request yet), a request head that never finished (hyper's
//! header timeout), and the HTTP parser's own refusals of a head it cannot
//! read (400 for malformed framing, 414, 431 past its limits). The first two
//! are written here from raw bytes. The parser's are written by hyper with
//! an empty body; [`ShapedIo`], the socket hyper writes through, recognizes
//! them (a 400/414/431 head with no `request-id`, which every answer of ours
//! carries) and puts an Anthropic-shaped one in their place, so a client
//! never sees an answer Spillway did not shape. Each is counted in
//! `spillway_connections_refused_total` and logged once, with its id.
//! Over TLS the same holds: [`ShapedIo`] sits above the TLS session (it
//! sees the HTTP bytes) and writes its answers into it ([`Socket`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus::IntCounterVec;
use spillway_vertex::{error_body, ErrorKind};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::idle::Watch;
use crate::request_id::new_request_id;

/// A whole HTTP/1.1 answer that closes the connection.
pub(crate) fn raw_answer(
    status: u16,
    reason: &str,
    kind: ErrorKind,
    message: &str,
    retry_after_secs: Option<u64>,
) -> (String, Vec<u8>) {
    let id = new_request_id();
    let body = error_body(kind, message, None);
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nrequest-id: {id}\r\nconnection: close\r\n",
        body.len()
    );
    match retry_after_secs {
        Some(secs) => head.push_str(&format!("retry-after: {secs}\r\n")),
        None => head.push_str("x-should-retry: false\r\n"),
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    (id, out)
}

/// The parser refusal a head is, if it is one hyper wrote on its own.
fn library_refusal(head: &[u8]) -> Option<(u16, &'static str, &'static str)> {
    let refusal = if head.starts_with(b"HTTP/1.1 400 ") {
        (
            400,
            "Bad Request",
            "malformed HTTP request: its request line, headers or framing could not be parsed",
        )
    } else if head.starts_with(b"HTTP/1.1 414 ") {
        (414, "URI Too Long", "request target is too long")
    } else if head.starts_with(b"HTTP/1.1 431 ") {
        (
            431,
            "Request Header Fields Too Large",
            "request headers too large",
        )
    } else {
        return None;
    };
    // Ours carry a request id; hyper's own carry none and have no body.
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = &head[..end];
    let ours = head
        .windows(13)
        .any(|w| w.eq_ignore_ascii_case(b"\r\nrequest-id:"));
    (!ours).then_some(refusal)
}

/// A client connection's byte stream: the TCP socket, or a TLS session
/// over it. Besides reading and writing, it can hand a short last answer
/// to the kernel without waiting (the 408 written as a connection drops).
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Writes `answer` (and, for TLS, a close_notify) only as far as the
    /// send buffer takes it now.
    fn write_now(&mut self, answer: &[u8]);
}

impl Socket for TcpStream {
    fn write_now(&mut self, answer: &[u8]) {
        let _ = self.try_write(answer);
    }
}

impl Socket for TlsStream<TcpStream> {
    fn write_now(&mut self, answer: &[u8]) {
        use std::io::Write;
        /// The socket as `std::io::Write`, never waiting.
        struct Now<'a>(&'a TcpStream);
        impl Write for Now<'_> {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.try_write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (tcp, session) = self.get_mut();
        if session.writer().write_all(answer).is_err() {
            return;
        }
        session.send_close_notify();
        while session.wants_write() {
            if session.write_tls(&mut Now(tcp)).is_err() {
                return;
            }
        }
    }
}

/// The client socket as hyper sees it. See the module docs.
pub(crate) struct ShapedIo<S: Socket = TcpStream> {
    tcp: S,
    watch: Arc<Watch>,
    refused: IntCounterVec,
    /// A replacement answer still to be written, from this offset.
    pending: Option<(Vec<u8>, usize)>,
}

impl<S: Socket> ShapedIo<S> {
    pub(crate) fn new(tcp: S, watch: Arc<Watch>, refused: IntCounterVec) -> Self {
        Self {
            tcp,
            watch,
            refused,
            pending: None,
        }
    }

    /// Writes what is pending; `Ready(Ok)` once nothing is.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, at)) = &mut self.pending {
            match Pin::new(&mut self.tcp).poll_write(cx, &bytes[*at..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    *at += n;
                    if *at == bytes.len() {
                        self.pending = None;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Puts an Anthropic-shaped answer in place of hyper's own `head`.
    fn replace(&mut self, status: u16, reason: &str, message: &str) {
        let (id, answer) = raw_answer(status, reason, ErrorKind::InvalidRequest, message, None);
        let label = if status == 400 {
            "malformed"
        } else {
            "too_large"
        };
        self.refused.with_label_values(&[label]).inc();
        tracing::info!(request_id = %id, status, "refused by the HTTP parser: {message}");
        self.pending = Some((answer, 0));
    }
}

impl<S: Socket> AsyncRead for ShapedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.watch.read();
        }
        polled
    }
}

impl<S: Socket> AsyncWrite for ShapedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_some() {
            // After a replaced answer hyper only closes; anything else it
            // writes is dropped with the connection.
            return match this.poll_pending(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            };
        }
        if let Some((status, reason, message)) = library_refusal(buf) {
            this.replace(status, reason, message);
            return match this.poll_pending(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Ready(Ok(buf.len())),
            };
        }
        this.watch.wrote();
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let first = bufs.iter().find(|b| !b.is_empty());
        let special = self.pending.is_some() || first.is_some_and(|b| library_refusal(b).is_some());
        match first {
            Some(first) if special => {
                let first: &[u8] = first;
                self.poll_write(cx, first)
            }
            _ => {
                self.watch.wrote();
                Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl<S: Socket> Drop for ShapedIo<S> {
    /// hyper closes a connection whose head timed out without answering;
    /// a client that had started a request gets a 408 instead, written
    /// without waiting (a few hundred bytes into an idle send buffer).
    fn drop(&mut self) {
        if self.watch.is_partial() && self.watch.did_header_time_out() {
            let (id, answer) = raw_answer(
                408,
                "Request Timeout",
                ErrorKind::Timeout,
                "the request head did not arrive in time (server.header_read_timeout_ms)",
                None,
            );
            tracing::info!(request_id = %id, status = 408, "request head timed out");
            self.tcp.write_now(&answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hyper_s_own_refusals_are_recognized() {
        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(library_refusal(hyper_400).map(|r| r.0), Some(400));
        let hyper_431 =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(library_refusal(hyper_431).map(|r| r.0), Some(431));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nRequest-Id: req_x\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(library_refusal(ours), None);
        assert_eq!(library_refusal(b"HTTP/1.1 200 OK\r\n\r\n"), None);
        assert_eq!(
            library_refusal(b"HTTP/1.1 400 Bad Req"),
            None,
            "an unfinished head is not judged"
        );
    }

    #[test]
    fn raw_answers_are_whole_and_anthropic_shaped() {
        let (id, bytes) = raw_answer(
            503,
            "Service Unavailable",
            ErrorKind::Overloaded,
            "busy",
            Some(1),
        );
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(head.contains(&format!("request-id: {id}")));
        assert!(head.contains("retry-after: 1"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "overloaded_error");
    }
}
