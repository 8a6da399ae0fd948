//! Parsing a batch upload as it arrives, one request at a time.
//!
//! Two shapes are accepted:
//! - Anthropic's JSON, `{"requests": [{"custom_id": .., "params": {..}}, ..]}`,
//!   walked with a serde visitor that hands over each element of `requests`
//!   as soon as it is parsed, never building the array;
//! - JSONL, one `{"custom_id": .., "params": {..}}` per line (blank lines
//!   skipped), for batch jobs that produce files.
//!
//! Both read from a blocking [`Read`] (the HTTP body bridged from async, on a
//! blocking thread), so at most one request is held here at a time. The
//! byte limit is enforced while reading, so an oversized upload is cut off
//! at the limit, not after.

use std::fmt;
use std::io::{BufRead, BufReader, Read};

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::BatchError;

/// How the upload is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"requests": [...]}`
    Json,
    /// One request object per line.
    Jsonl,
}

impl Format {
    /// From a `content-type` value; `None` if neither.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        let essence = essence.to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => Some(Self::Json),
            "application/x-ndjson"
            | "application/jsonl"
            | "application/x-jsonl"
            | "application/jsonlines"
            | "application/x-jsonlines" => Some(Self::Jsonl),
            _ => None,
        }
    }
}

/// One request as uploaded, before validation.
#[derive(Debug)]
pub struct RawRequest {
    /// Position in the batch, from 0.
    pub index: usize,
    /// Where it is, for error messages: `requests[3]` or `line 4`.
    pub location: String,
    pub custom_id: String,
    pub params: Map<String, Value>,
}

/// Limits applied while parsing.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes in the whole upload.
    pub max_bytes: u64,
    /// Requests in the batch.
    pub max_requests: usize,
}

/// Counts bytes and fails the read once past the limit.
struct Counting<R> {
    inner: R,
    read: u64,
    limit: u64,
    exceeded: bool,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("upload exceeds the size limit"));
        }
        Ok(n)
    }
}

/// Parses the whole upload, calling `each` for every request in order.
/// Stops at the first problem, from the upload or from `each`. Returns the
/// number of requests.
pub fn parse<R: Read>(
    reader: R,
    format: Format,
    limits: Limits,
    mut each: impl FnMut(RawRequest) -> Result<(), BatchError>,
) -> Result<usize, BatchError> {
    let mut counting = Counting {
        inner: reader,
        read: 0,
        limit: limits.max_bytes,
        exceeded: false,
    };
    let result = match format {
        Format::Json => parse_json(&mut counting, limits, &mut each),
        Format::Jsonl => parse_jsonl(&mut counting, limits, &mut each),
    };
    if counting.exceeded {
        return Err(BatchError::TooLarge {
            limit: limits.max_bytes,
        });
    }
    let count = result?;
    if count == 0 {
        return Err(BatchError::Invalid(
            "requests: a batch needs at least one request".into(),
        ));
    }
    Ok(count)
}

/// Checks an element's shape and splits it into id and params.
fn raw_request(index: usize, location: String, value: Value) -> Result<RawRequest, BatchError> {
    let Value::Object(mut object) = value else {
        return Err(BatchError::Invalid(format!(
            "{location}: expected an object with custom_id and params"
        )));
    };
    if let Some(extra) = object.keys().find(|k| *k != "custom_id" && *k != "params") {
        return Err(BatchError::Invalid(format!(
            "{location}.{extra}: unexpected field (a request has custom_id and params)"
        )));
    }
    let custom_id = match object.remove("custom_id") {
        Some(Value::String(id)) => id,
        Some(_) => {
            return Err(BatchError::Invalid(format!(
                "{location}.custom_id: must be a string"
            )))
        }
        None => {
            return Err(BatchError::Invalid(format!(
                "{location}.custom_id: field required"
            )))
        }
    };
    let params = match object.remove("params") {
        Some(Value::Object(params)) => params,
        Some(_) => {
            return Err(BatchError::Invalid(format!(
                "{location}.params: must be an object"
            )))
        }
        None => {
            return Err(BatchError::Invalid(format!(
                "{location}.params: field required"
            )))
        }
    };
    Ok(RawRequest {
        index,
        location,
        custom_id,
        params,
    })
}

fn too_many(limits: Limits) -> BatchError {
    BatchError::Invalid(format!(
        "requests: a batch holds at most {} requests",
        limits.max_requests
    ))
}

fn parse_jsonl<R: Read>(
    reader: R,
    limits: Limits,
    each: &mut impl FnMut(RawRequest) -> Result<(), BatchError>,
) -> Result<usize, BatchError> {
    let mut reader = BufReader::with_capacity(256 * 1024, reader);
    let mut line = Vec::new();
    let mut line_no = 0u64;
    let mut index = 0usize;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| BatchError::reading(&e))?;
        if n == 0 {
            return Ok(index);
        }
        line_no += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if index >= limits.max_requests {
            return Err(too_many(limits));
        }
        let location = format!("line {line_no} (requests[{index}])");
        let value: Value = serde_json::from_slice(&line)
            .map_err(|e| BatchError::Invalid(format!("{location}: invalid JSON: {e}")))?;
        each(raw_request(index, location, value)?)?;
        index += 1;
    }
}

fn parse_json<R: Read>(
    reader: R,
    limits: Limits,
    each: &mut impl FnMut(RawRequest) -> Result<(), BatchError>,
) -> Result<usize, BatchError> {
    let reader = BufReader::with_capacity(256 * 1024, reader);
    let mut de = serde_json::Deserializer::from_reader(reader);
    let mut failure = None;
    let mut count = 0usize;
    let top = Top {
        each,
        limits,
        failure: &mut failure,
        count: &mut count,
    };
    let parsed = top.deserialize(&mut de).and_then(|()| de.end());
    if let Some(error) = failure {
        return Err(error);
    }
    match parsed {
        Ok(()) => Ok(count),
        Err(e) if e.io_error_kind() == Some(std::io::ErrorKind::TimedOut) => {
            Err(BatchError::TimedOut(e.to_string()))
        }
        Err(e) if e.is_io() => Err(BatchError::Body(format!("reading the upload: {e}"))),
        Err(e) => Err(BatchError::Invalid(format!("invalid batch body: {e}"))),
    }
}

/// The top-level object: only `requests`, walked element by element.
struct Top<'a, F> {
    each: &'a mut F,
    limits: Limits,
    failure: &'a mut Option<BatchError>,
    count: &'a mut usize,
}

impl<'de, F: FnMut(RawRequest) -> Result<(), BatchError>> DeserializeSeed<'de> for Top<'_, F> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(RawRequest) -> Result<(), BatchError>> Visitor<'de> for Top<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(r#"an object {"requests": [...]}"#)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = false;
        while let Some(key) = map.next_key::<String>()? {
            if key != "requests" {
                *self.failure = Some(BatchError::Invalid(format!(
                    "{key}: unexpected field (the body is {{\"requests\": [...]}})"
                )));
                return Err(de::Error::custom("unexpected field"));
            }
            if seen {
                return Err(de::Error::custom("duplicate field `requests`"));
            }
            seen = true;
            map.next_value_seed(Requests {
                each: &mut *self.each,
                limits: self.limits,
                failure: &mut *self.failure,
                count: &mut *self.count,
            })?;
        }
        if !seen {
            *self.failure = Some(BatchError::Invalid("requests: field required".into()));
            return Err(de::Error::custom("missing requests"));
        }
        Ok(())
    }
}

struct Requests<'a, F> {
    each: &'a mut F,
    limits: Limits,
    failure: &'a mut Option<BatchError>,
    count: &'a mut usize,
}

impl<'de, F: FnMut(RawRequest) -> Result<(), BatchError>> DeserializeSeed<'de> for Requests<'_, F> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(RawRequest) -> Result<(), BatchError>> Visitor<'de> for Requests<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of requests")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            if index >= self.limits.max_requests {
                // One more element means too many; the end of the array is fine.
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    *self.failure = Some(too_many(self.limits));
                    return Err(de::Error::custom("too many requests"));
                }
                break;
            }
            let Some(value) = seq.next_element::<Value>()? else {
                break;
            };
            let location = format!("requests[{index}]");
            let outcome = raw_request(index, location, value).and_then(&mut *self.each);
            if let Err(e) = outcome {
                *self.failure = Some(e);
                return Err(de::Error::custom("invalid request"));
            }
            index += 1;
        }
        *self.count = index;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bytes: 1 << 20,
        max_requests: 3,
    };

    fn ids(format: Format, text: &str, limits: Limits) -> Result<Vec<String>, BatchError> {
        let mut seen = Vec::new();
        parse(text.as_bytes(), format, limits, |r| {
            assert_eq!(r.index, seen.len());
            seen.push(r.custom_id);
            Ok(())
        })
        .map(|n| {
            assert_eq!(n, seen.len());
            seen
        })
    }

    #[test]
    fn json_requests_are_handed_over_one_by_one() {
        let body =
            r#"{"requests":[{"custom_id":"a","params":{"x":1}},{"params":{},"custom_id":"b"}]}"#;
        assert_eq!(ids(Format::Json, body, LIMITS).unwrap(), ["a", "b"]);
    }

    #[test]
    fn jsonl_skips_blank_lines_and_names_lines() {
        let body = "{\"custom_id\":\"a\",\"params\":{}}\n\n{\"custom_id\":\"b\",\"params\":{}}\r\n";
        assert_eq!(ids(Format::Jsonl, body, LIMITS).unwrap(), ["a", "b"]);
        let bad = "{\"custom_id\":\"a\",\"params\":{}}\n\n{\"custom_id\":\"b\"}\n";
        let e = ids(Format::Jsonl, bad, LIMITS).unwrap_err().to_string();
        assert_eq!(e, "line 3 (requests[1]).params: field required");
    }

    #[test]
    fn shape_errors_name_the_index() {
        let e = ids(
            Format::Json,
            r#"{"requests":[{"custom_id":"a","params":{}},{"custom_id":5,"params":{}}]}"#,
            LIMITS,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "requests[1].custom_id: must be a string");
        let e = ids(Format::Json, r#"{"requests":[], "extra": 1}"#, LIMITS)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("requests: a batch needs at least one request") || e.contains("extra"),
            "{e}"
        );
        let e = ids(Format::Json, r#"{"nope": []}"#, LIMITS)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("nope: unexpected field"), "{e}");
        let e = ids(
            Format::Json,
            r#"{"requests": [{"custom_id":"a","params":{}}"#,
            LIMITS,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("invalid batch body"), "{e}");
    }

    #[test]
    fn callback_errors_stop_the_parse() {
        let body = r#"{"requests":[{"custom_id":"a","params":{}},{"custom_id":"b","params":{}}]}"#;
        let mut n = 0;
        let e = parse(body.as_bytes(), Format::Json, LIMITS, |r| {
            n += 1;
            Err(BatchError::Invalid(format!("{}: nope", r.location)))
        })
        .unwrap_err();
        assert_eq!((n, e.to_string()), (1, "requests[0]: nope".to_string()));
    }

    #[test]
    fn limits_apply_while_reading() {
        let one = r#"{"custom_id":"a","params":{}}"#;
        let four = [one; 4].join(",");
        let e = ids(Format::Json, &format!("{{\"requests\":[{four}]}}"), LIMITS).unwrap_err();
        assert!(e.to_string().contains("at most 3"), "{e}");
        let three = [one; 3].join(",");
        assert_eq!(
            ids(Format::Json, &format!("{{\"requests\":[{three}]}}"), LIMITS)
                .unwrap()
                .len(),
            3
        );
        let small = Limits {
            max_bytes: 40,
            max_requests: 10,
        };
        let e = ids(Format::Jsonl, &format!("{one}\n{one}\n"), small).unwrap_err();
        assert!(matches!(e, BatchError::TooLarge { limit: 40 }), "{e:?}");
        let e = ids(
            Format::Json,
            &format!("{{\"requests\":[{one},{one}]}}"),
            small,
        )
        .unwrap_err();
        assert!(matches!(e, BatchError::TooLarge { limit: 40 }), "{e:?}");
    }

    #[test]
    fn content_types() {
        assert_eq!(
            Format::from_content_type("application/json; charset=utf-8"),
            Some(Format::Json)
        );
        assert_eq!(
            Format::from_content_type("application/x-ndjson"),
            Some(Format::Jsonl)
        );
        assert_eq!(Format::from_content_type("text/plain"), None);
    }
}
