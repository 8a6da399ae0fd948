//! Incremental Server-Sent Events framing for byte-exact passthrough.
//!
//! Vertex's `:streamRawPredict` answers `text/event-stream` where every event is
//! `event: <name>\n` + `data: <one-line JSON>\n` + `\n`, the JSON `type` matching the event name
//! (reference §1.4). The gateway forwards the **bytes unchanged** and only side-parses them, so
//! [`SseSplitter`] hands back each event's exact bytes ([`SseEvent::raw`], a zero-copy slice of
//! the receive buffer) alongside the decoded `event` name and `data`.
//!
//! Framing rules (WHATWG SSE): lines end in `\n`, `\r\n` or a lone `\r`; a blank line dispatches
//! the event; `data:` lines join with `\n`; one space after the colon is stripped; lines starting
//! with `:` are comments; `id:`/`retry:`/unknown fields are ignored. Network chunks may split
//! anywhere, including inside a `\r\n` pair or a multi-byte UTF-8 character, so a line is only
//! interpreted once its terminator is known; a `\r` at the very end of the buffer waits for the
//! next byte to learn whether a `\n` follows. Each byte is scanned once (no rescans per chunk).
//!
//! Unlike a browser, every blank-line-terminated block is yielded, even one with no data
//! (comments, stray blank lines), so the caller can forward every byte. Bytes after the last
//! blank line at end of stream are a truncated event, returned by [`SseSplitter::finish`].
//! Memory is bounded: a pending event larger than `max_event_bytes` is an error.

use bytes::{Bytes, BytesMut};

/// One SSE event (a block of lines ended by a blank line).
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n` (empty if none).
    pub data: String,
    /// The exact bytes of the event, including its terminating blank line.
    pub raw: Bytes,
}

impl SseEvent {
    /// True if the block carried neither an event name nor data (only comments or blank lines).
    pub fn is_empty(&self) -> bool {
        self.event.is_none() && self.data.is_empty()
    }
}

/// Why [`SseSplitter::push`] gave up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    /// A single event grew past the configured limit.
    #[error("SSE event larger than {0} bytes")]
    EventTooLarge(usize),
}

/// Splits a byte stream into [`SseEvent`]s as chunks arrive.
#[derive(Debug)]
pub struct SseSplitter {
    max_event_bytes: usize,
    /// Bytes of the pending event (from its first byte) plus not-yet-interpreted bytes.
    buf: BytesMut,
    /// Offset in `buf` where the current (unterminated) line starts.
    line_start: usize,
    /// Offset in `buf` where the search for the next line terminator resumes.
    scan: usize,
    event: Option<String>,
    data: String,
    has_data: bool,
    failed: bool,
}

impl SseSplitter {
    /// A splitter that refuses events larger than `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Self {
        SseSplitter {
            max_event_bytes,
            buf: BytesMut::new(),
            line_start: 0,
            scan: 0,
            event: None,
            data: String::new(),
            has_data: false,
            failed: false,
        }
    }

    /// Feeds a chunk; returns the events it completed, in order. After an error the splitter is
    /// poisoned: its buffer is dropped and every later push fails the same way.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        if self.failed {
            return Err(SseError::EventTooLarge(self.max_event_bytes));
        }
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        loop {
            let Some(rel) = self.buf[self.scan..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
            else {
                self.scan = self.buf.len();
                break;
            };
            let term_at = self.scan + rel;
            let term_len = if self.buf[term_at] == b'\r' {
                match self.buf.get(term_at + 1) {
                    // A lone `\r` at the end: wait for the next byte to size the terminator.
                    None => {
                        self.scan = term_at;
                        break;
                    }
                    Some(b'\n') => 2,
                    Some(_) => 1,
                }
            } else {
                1
            };
            let next = term_at + term_len;
            if term_at == self.line_start {
                let raw = self.buf.split_to(next).freeze();
                self.line_start = 0;
                self.scan = 0;
                if raw.len() > self.max_event_bytes {
                    return Err(self.fail());
                }
                self.has_data = false;
                out.push(SseEvent {
                    event: self.event.take(),
                    data: std::mem::take(&mut self.data),
                    raw,
                });
            } else {
                self.process_line(self.line_start, term_at);
                self.line_start = next;
                self.scan = next;
            }
        }
        if self.buf.len() > self.max_event_bytes {
            return Err(self.fail());
        }
        if self.buf.is_empty() {
            // Between events hold no memory: the emptied buffer still shares
            // the allocation of the events just split off, and a stream idle
            // between tokens would otherwise keep a chunk's worth per stream.
            self.buf = BytesMut::new();
        }
        Ok(out)
    }

    /// Leftover bytes at end of stream (a truncated event: no terminating blank line), if any.
    /// Resets the splitter. A stream whose final blank line is a lone `\r` also ends up here,
    /// since the splitter cannot tell it from the first half of `\r\n`.
    pub fn finish(&mut self) -> Option<Bytes> {
        self.line_start = 0;
        self.scan = 0;
        self.event = None;
        self.data.clear();
        self.has_data = false;
        if self.buf.is_empty() {
            None
        } else {
            Some(self.buf.split().freeze())
        }
    }

    /// Bytes currently held for the pending event.
    pub fn pending_len(&self) -> usize {
        self.buf.len()
    }

    fn fail(&mut self) -> SseError {
        self.failed = true;
        self.buf = BytesMut::new();
        self.data = String::new();
        self.event = None;
        SseError::EventTooLarge(self.max_event_bytes)
    }

    /// Interprets one complete, non-empty line `buf[start..end]`.
    fn process_line(&mut self, start: usize, end: usize) {
        let line = &self.buf[start..end];
        if line[0] == b':' {
            return; // comment
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        match name {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&String::from_utf8_lossy(value));
                self.has_data = true;
            }
            b"event" => {
                self.event = if value.is_empty() {
                    None
                } else {
                    Some(String::from_utf8_lossy(value).into_owned())
                };
            }
            _ => {} // id, retry, unknown fields
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> (Vec<SseEvent>, Option<Bytes>) {
        let mut s = SseSplitter::new(1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            out.extend(s.push(c).unwrap());
        }
        (out, s.finish())
    }

    fn ev(event: Option<&str>, data: &str, raw: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_owned),
            data: data.to_owned(),
            raw: Bytes::copy_from_slice(raw.as_bytes()),
        }
    }

    #[test]
    fn basic_event() {
        let (evs, rest) = all(&[b"event: ping\ndata: {\"type\": \"ping\"}\n\n"]);
        assert_eq!(
            evs,
            vec![ev(
                Some("ping"),
                "{\"type\": \"ping\"}",
                "event: ping\ndata: {\"type\": \"ping\"}\n\n"
            )]
        );
        assert_eq!(rest, None);
    }

    #[test]
    fn line_endings() {
        for sep in ["\n", "\r\n", "\r"] {
            let text = format!("event: a{sep}data: 1{sep}data:2{sep}{sep}data: x{sep}{sep}");
            let bytes = text.as_bytes();
            // Feed whole, then byte by byte.
            let whole = all(&[bytes]);
            let pieces: Vec<&[u8]> = bytes.chunks(1).collect();
            let split = all(&pieces);
            assert_eq!(whole, split, "{sep:?}");
            let (evs, rest) = whole;
            let first_len = text.find(&format!("{sep}{sep}")).unwrap() + 2 * sep.len();
            if sep == "\r" {
                // The final `\r` can't be told from half a `\r\n` until the stream ends.
                assert_eq!(evs.len(), 1);
                assert_eq!(rest.as_deref(), Some(&bytes[first_len..]));
            } else {
                assert_eq!(evs.len(), 2);
                assert_eq!(rest, None);
                assert_eq!(evs[1].data, "x");
                assert_eq!(&evs[1].raw[..], &bytes[first_len..]);
            }
            assert_eq!(evs[0].event.as_deref(), Some("a"));
            assert_eq!(evs[0].data, "1\n2");
            assert_eq!(&evs[0].raw[..], &bytes[..first_len]);
        }
    }

    #[test]
    fn crlf_split_across_chunks() {
        let (evs, rest) = all(&[b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n"]);
        assert_eq!(
            evs,
            vec![
                ev(None, "a", "data: a\r\n\r\n"),
                ev(None, "b", "data: b\r\n\r\n")
            ]
        );
        assert_eq!(rest, None);
    }

    #[test]
    fn comments_and_blank_blocks() {
        let (evs, _) = all(&[b": keepalive\n\n\nevent: x\n: note\ndata: 1\n\n"]);
        assert_eq!(
            evs,
            vec![
                ev(None, "", ": keepalive\n\n"),
                ev(None, "", "\n"),
                ev(Some("x"), "1", "event: x\n: note\ndata: 1\n\n"),
            ]
        );
        assert!(evs[0].is_empty() && evs[1].is_empty() && !evs[2].is_empty());
    }

    #[test]
    fn field_parsing_details() {
        let (evs, _) = all(&[b"data\ndata:  two spaces\nid: 7\nretry: 10\nevent:\nfoo: bar\n\n"]);
        assert_eq!(evs[0].data, "\n two spaces");
        assert_eq!(evs[0].event, None);
        // Invalid UTF-8 is replaced, never a panic.
        let (evs, _) = all(&[b"data: \xff\xfe\n\n"]);
        assert_eq!(evs[0].data, "\u{fffd}\u{fffd}");
    }

    #[test]
    fn utf8_split_inside_character() {
        let text = "data: Olá!\n\n".as_bytes();
        let idx = text.iter().position(|&b| b == 0xC3).unwrap() + 1;
        let (evs, _) = all(&[&text[..idx], &text[idx..]]);
        assert_eq!(evs[0].data, "Olá!");
    }

    #[test]
    fn truncated_tail() {
        let (evs, rest) = all(&[b"data: 1\n\nevent: message_delta\ndata: {\"ty"]);
        assert_eq!(evs.len(), 1);
        assert_eq!(
            rest.as_deref(),
            Some(&b"event: message_delta\ndata: {\"ty"[..])
        );
        let mut s = SseSplitter::new(100);
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn event_too_large() {
        let mut s = SseSplitter::new(16);
        assert_eq!(s.push(b"data: 0123456789").unwrap(), vec![]);
        assert_eq!(s.pending_len(), 16);
        assert_eq!(s.push(b"x"), Err(SseError::EventTooLarge(16)));
        // Poisoned afterwards.
        assert_eq!(s.push(b"\n\n"), Err(SseError::EventTooLarge(16)));
        assert_eq!(s.finish(), None);

        // A complete event over the limit inside one chunk is refused too.
        let mut s = SseSplitter::new(16);
        assert_eq!(
            s.push(b"data: 0123456789abcdef\n\n"),
            Err(SseError::EventTooLarge(16))
        );
        // Many small events in one big chunk are fine.
        let mut s = SseSplitter::new(16);
        let chunk = b"data: 1\n\n".repeat(100);
        assert_eq!(s.push(&chunk).unwrap().len(), 100);
        assert_eq!(
            SseError::EventTooLarge(16).to_string(),
            "SSE event larger than 16 bytes"
        );
    }

    #[test]
    fn long_event_in_many_chunks_is_linear() {
        // 1 MiB of data in 16-byte chunks: must finish quickly (each byte is scanned once).
        let mut s = SseSplitter::new(4 << 20);
        let mut body = b"data: ".to_vec();
        body.extend(std::iter::repeat_n(b'a', 1 << 20));
        body.extend_from_slice(b"\n\n");
        let mut n = 0;
        for c in body.chunks(16) {
            n += s.push(c).unwrap().len();
        }
        assert_eq!(n, 1);
    }
}
