//! JSON log lines, one per event, in the shape `tracing-subscriber`'s
//! `json()` writes:
//!
//! ```text
//! {"timestamp":"2026-12-02T17:15:06.593868Z","level":"INFO","fields":{"message":"request","tenant":"chat",...},"target":"spillway::request"}
//! ```
//!
//! Why not `json()` itself: it serializes each field through serde into an
//! `io::Write` adaptor that re-checks UTF-8 on every fragment, and the
//! request line has seventeen fields. Measured with callgrind, that line was
//! ~31,000 instructions, an eighth of all the gateway spent on a request.
//! Here the line is appended to the layer's string buffer directly, numbers
//! are written as numbers, and strings are escaped in runs.
//!
//! Spillway records no spans, so none are written (the `json()` format
//! would add `span` and `spans` only inside one).

use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use spillway_gateway::rfc3339::Civil;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut writer, SystemTime::now())?;
        writer.write_str("\",\"level\":\"")?;
        writer.write_str(meta.level().as_str())?;
        writer.write_str("\",\"fields\":{")?;
        let mut fields = Fields {
            out: &mut writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str("},\"target\":")?;
        write_string(&mut writer, meta.target())?;
        writer.write_str("}\n")
    }
}

/// RFC 3339 in UTC with microseconds, as `tracing-subscriber` writes it.
fn write_timestamp(out: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    let c = Civil::from_unix_secs(secs);
    let mut digits = [0u8; 26];
    let mut put = |at: usize, width: usize, mut n: i64| {
        for i in (0..width).rev() {
            digits[at + i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, c.year);
    put(5, 2, c.month);
    put(8, 2, c.day);
    put(11, 2, c.hour);
    put(14, 2, c.minute);
    put(17, 2, c.second);
    put(20, 6, i64::from(since.subsec_micros()));
    for (at, sep) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
    ] {
        digits[at] = sep;
    }
    // Only ASCII digits and separators were written.
    out.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)?;
    out.write_char('Z')
}

/// A JSON string literal: quotes, and escapes for `"`, `\` and controls.
fn write_string(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(s)?;
    out.write_char('"')
}

/// Writes what it is given as the inside of a JSON string literal.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        let mut run = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let escape: Option<&str> = match b {
                b'"' => Some("\\\""),
                b'\\' => Some("\\\\"),
                b'\n' => Some("\\n"),
                b'\r' => Some("\\r"),
                b'\t' => Some("\\t"),
                0..=0x1f => None,
                _ => continue,
            };
            // Every byte escaped is ASCII, so `run..i` ends on a char boundary.
            self.0.write_str(&s[run..i])?;
            match escape {
                Some(e) => self.0.write_str(e)?,
                None => write!(self.0, "\\u{b:04x}")?,
            }
            run = i + 1;
        }
        self.0.write_str(&s[run..])
    }
}

/// Writes an event's fields as JSON members.
struct Fields<'a, 'w> {
    out: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.out.write_char(',')?;
            }
            write_string(self.out, field.name())?;
            self.out.write_char(':')?;
            value(self.out)
        })();
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |out| write_string(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |out| {
            out.write_char('"')?;
            write!(Escaped(out), "{value:?}")?;
            out.write_char('"')
        });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.member(field, |out| {
            out.write_char('"')?;
            write!(Escaped(out), "{value}")?;
            out.write_char('"')
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |out| {
            out.write_str(itoa::Buffer::new().format(value))
        });
    }

    // u128 and i128 fall to `record_debug`: a quoted string, as in `json()`.

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |out| {
            out.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity; serde_json writes them as null too.
        if value.is_finite() {
            // ryu's shortest form, as serde_json (and so `json()`) writes it.
            self.member(field, |out| {
                out.write_str(ryu::Buffer::new().format_finite(value))
            });
        } else {
            self.member(field, |out| out.write_str("null"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use serde_json::Value;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The lines both formatters write for the same events.
    fn lines(ours: bool, emit: impl Fn()) -> Vec<Value> {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let builder = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE);
        if ours {
            tracing::subscriber::with_default(builder.event_format(JsonLines).finish(), &emit);
        } else {
            tracing::subscriber::with_default(builder.json().finish(), &emit);
        }
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[derive(Debug)]
    struct Odd;
    impl fmt::Display for Odd {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("quote \" backslash \\ newline \n tab \t bell \u{7} é ✓")
        }
    }

    fn emit() {
        tracing::info!(
            target: "spillway::request",
            request_id = %"req_1",
            tenant = "chat",
            attempts = 2u32,
            status = 200u16,
            delta = -3i64,
            big = u128::MAX,
            ok = true,
            latency_ms = 1.25f64,
            // A whole number stays a float (`0.0`), as serde_json writes it.
            cost_usd = 0.0f64,
            tokens = 1e21f64,
            nan = f64::NAN,
            odd = %Odd,
            debug = ?vec!["a", "b"],
            "request"
        );
        tracing::warn!(error = %io::Error::other("disk \"full\""), "cannot write");
        tracing::error!(err = &io::Error::other("as error") as &(dyn std::error::Error + 'static));
        tracing::debug!("formatted {} message", 42);
    }

    #[test]
    fn lines_match_tracing_subscribers_json_but_for_the_time() {
        let (ours, theirs) = (lines(true, emit), lines(false, emit));
        assert_eq!(ours.len(), 4);
        assert_eq!(ours.len(), theirs.len());
        for (mut a, mut b) in ours.into_iter().zip(theirs) {
            let (ta, tb) = (a["timestamp"].take(), b["timestamp"].take());
            assert!(
                ta.as_str()
                    .is_some_and(|t| t.len() == 27 && t.ends_with('Z')),
                "{ta}"
            );
            assert!(tb.is_string());
            assert_eq!(a, b);
        }
    }

    #[test]
    fn timestamps_are_rfc3339_with_microseconds() {
        let mut s = String::new();
        let t = UNIX_EPOCH + Duration::from_micros(1_724_179_044_100_007);
        write_timestamp(&mut s, t).unwrap();
        assert_eq!(s, "2024-08-20T18:37:24.100007Z");
    }

    #[test]
    fn every_control_character_is_escaped() {
        let all: String = (0u8..0x80).map(char::from).collect();
        let mut s = String::new();
        write_string(&mut s, &all).unwrap();
        let back: String = serde_json::from_str(&s).unwrap();
        assert_eq!(back, all);
        assert!(!s.bytes().any(|b| b < 0x20));
    }
}
