//! `[telemetry]`: OpenTelemetry traces, off unless `otlp_endpoint` is set.
//! What is exported and how is `crate::telemetry`'s business; this is the
//! settings and the rules they must meet.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Problems;

/// `[telemetry]`: where and how spans are exported.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// OTLP/HTTP base URL (`http://collector:4318`); spans are posted to
    /// `{otlp_endpoint}/v1/traces` as protobuf. Empty: traces are off and
    /// the request path builds nothing.
    pub otlp_endpoint: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// Fraction of new traces recorded (a client's `traceparent` decides
    /// for its own: parent-based).
    pub sample_ratio: f64,
    /// Spans waiting for export at most; past it new spans are dropped and
    /// counted (`spillway_trace_spans_dropped_total{reason="queue_full"}`).
    pub queue_size: usize,
    /// Spans per export request, at most.
    pub batch_size: usize,
    /// The longest a span waits for a batch to fill before it is sent.
    pub export_interval_ms: u64,
    /// The longest one export may take, retries included; past it its spans
    /// are dropped and counted (`reason="export_failed"`).
    pub export_timeout_ms: u64,
    /// Headers sent with every export (collector auth): secrets, redacted
    /// when the configuration is shown.
    pub headers: BTreeMap<String, String>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "spillway".into(),
            sample_ratio: 1.0,
            queue_size: 2048,
            batch_size: 512,
            export_interval_ms: 1000,
            export_timeout_ms: 10_000,
            headers: BTreeMap::new(),
        }
    }
}

/// The most spans a queue may hold (each is a few hundred bytes).
pub const MAX_QUEUE_SIZE: usize = 1_000_000;

impl TelemetrySettings {
    /// Whether traces are exported.
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.trim().is_empty()
    }

    /// Where spans are posted: `{otlp_endpoint}/v1/traces`.
    pub fn traces_url(&self) -> String {
        format!(
            "{}/v1/traces",
            self.otlp_endpoint.trim().trim_end_matches('/')
        )
    }

    /// The `[telemetry]` rules (checked whether or not traces are on, so a
    /// config is not refused only once someone turns them on).
    pub fn check(&self, p: &mut Problems) {
        if self.enabled() {
            check_endpoint(self.otlp_endpoint.trim(), p);
        }
        if self.service_name.trim().is_empty() {
            p.add(
                "telemetry.service_name",
                "must name the service (the service.name of every span), e.g. \"spillway\"",
            );
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            p.add(
                "telemetry.sample_ratio",
                format!(
                    "{} is not a fraction in [0, 1]: it is the share of new traces recorded (1 records all, 0.1 one in ten; a client's traceparent decides for its own)",
                    self.sample_ratio
                ),
            );
        }
        if self.queue_size == 0 || self.queue_size > MAX_QUEUE_SIZE {
            p.add(
                "telemetry.queue_size",
                format!("must be 1 to {MAX_QUEUE_SIZE} spans (each request makes one, plus one per upstream attempt)"),
            );
        }
        if self.batch_size == 0 || self.batch_size > self.queue_size.max(1) {
            p.add(
                "telemetry.batch_size",
                format!(
                    "must be 1 to telemetry.queue_size ({}) spans per export",
                    self.queue_size
                ),
            );
        }
        for (key, ms) in [
            ("telemetry.export_interval_ms", self.export_interval_ms),
            ("telemetry.export_timeout_ms", self.export_timeout_ms),
        ] {
            if ms == 0 {
                p.add(key, "must be positive");
            }
        }
        for (name, value) in &self.headers {
            let key = format!("telemetry.headers.{name}");
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                p.add(key, "not a valid HTTP header name");
            } else if http::HeaderValue::from_str(value).is_err() {
                // Never echo the value: it is usually a credential.
                p.add(
                    key,
                    "the value is not a valid HTTP header value (printable ASCII, no line breaks)",
                );
            }
        }
    }

    /// The same settings with header values replaced.
    pub fn redacted(&self) -> Self {
        let mut shown = self.clone();
        for value in shown.headers.values_mut() {
            *value = "<redacted>".into();
        }
        shown
    }
}

fn check_endpoint(url: &str, p: &mut Problems) {
    let key = "telemetry.otlp_endpoint";
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
    if authority.split('/').next().is_some_and(|a| a.contains('@')) {
        // Never echo it: the user part is a credential.
        return p.add(
            key,
            "must not carry credentials (user:password@): put them in telemetry.headers, which are redacted",
        );
    }
    let parsed = match url.parse::<http::Uri>() {
        Ok(parsed) => parsed,
        Err(e) => return p.add(key, format!("{url:?} is not a URL: {e}")),
    };
    if !matches!(parsed.scheme_str(), Some("http" | "https")) {
        p.add(
            key,
            format!("{url:?} must start with http:// or https:// (OTLP over HTTP, e.g. \"http://otel-collector:4318\")"),
        );
    }
    if parsed.host().is_none_or(str::is_empty) {
        p.add(key, format!("{url:?} has no host"));
    }
    if parsed.query().is_some() || parsed.path().ends_with("/v1/traces") {
        p.add(
            key,
            "give the collector's base URL (scheme, host, port, optional path prefix): Spillway posts to {otlp_endpoint}/v1/traces itself",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(s: &TelemetrySettings) -> Vec<String> {
        let mut p = Problems::default();
        s.check(&mut p);
        p.iter()
            .map(|p| format!("{}: {}", p.key, p.problem))
            .collect()
    }

    #[test]
    fn off_by_default_and_valid() {
        let s = TelemetrySettings::default();
        assert!(!s.enabled());
        assert!(problems(&s).is_empty());
    }

    #[test]
    fn the_traces_path_is_added_to_the_base_url() {
        let mut s = TelemetrySettings {
            otlp_endpoint: "http://collector:4318/".into(),
            ..TelemetrySettings::default()
        };
        assert_eq!(s.traces_url(), "http://collector:4318/v1/traces");
        assert!(problems(&s).is_empty());
        s.otlp_endpoint = "https://otel.example.com/otlp".into();
        assert_eq!(s.traces_url(), "https://otel.example.com/otlp/v1/traces");
        assert!(problems(&s).is_empty());
    }

    #[test]
    fn bad_values_name_their_key_and_never_a_header_value() {
        let s = TelemetrySettings {
            otlp_endpoint: "collector:4318/v1/traces".into(),
            service_name: " ".into(),
            sample_ratio: 1.5,
            queue_size: 0,
            batch_size: 10,
            export_interval_ms: 0,
            export_timeout_ms: 0,
            headers: [
                ("bad name".to_string(), "x".to_string()),
                ("authorization".to_string(), "Bearer s3cret\n".to_string()),
            ]
            .into(),
        };
        let found = problems(&s);
        for key in [
            "telemetry.otlp_endpoint",
            "telemetry.service_name",
            "telemetry.sample_ratio",
            "telemetry.queue_size",
            "telemetry.batch_size",
            "telemetry.export_interval_ms",
            "telemetry.export_timeout_ms",
            "telemetry.headers.bad name",
            "telemetry.headers.authorization",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(&format!("{key}:"))),
                "{key} in {found:#?}"
            );
        }
        assert!(!found.iter().any(|p| p.contains("s3cret")), "{found:#?}");
        let with_user = TelemetrySettings {
            otlp_endpoint: "https://user:hunter2@collector:4318".into(),
            ..TelemetrySettings::default()
        };
        let found = problems(&with_user);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].starts_with("telemetry.otlp_endpoint: must not carry credentials"));
        assert!(!found[0].contains("hunter2"));
    }

    #[test]
    fn redaction_hides_header_values() {
        let s = TelemetrySettings {
            headers: [("authorization".to_string(), "Bearer s3cret".to_string())].into(),
            ..TelemetrySettings::default()
        };
        let shown = s.redacted();
        assert_eq!(shown.headers["authorization"], "<redacted>");
        assert_eq!(s.headers["authorization"], "Bearer s3cret");
    }
}
