//! Anthropic's rate-limit headers, from Spillway's own ledger.
//!
//! Vertex sends no `anthropic-ratelimit-*` headers, so clients pointed at
//! Vertex cannot pace themselves. Spillway knows the budget of the region
//! that served each request and reports it the way Anthropic's API does:
//! `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`, with
//! `reset` an RFC 3339 time at which the window will be empty. On a 429,
//! `retry-after` (whole seconds, rounded up) and `retry-after-ms` say when
//! room is expected; both official SDKs honour them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use spillway_core::store::BudgetView;

fn put(headers: &mut HeaderMap, name: &'static str, value: impl ToString) {
    if let Ok(v) = HeaderValue::try_from(value.to_string()) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

/// The three headers of one limit: names checked at compile time, not per
/// request (these headers are on every answer).
struct LimitHeaders {
    limit: HeaderName,
    remaining: HeaderName,
    reset: HeaderName,
}

impl LimitHeaders {
    const fn named(limit: &'static str, remaining: &'static str, reset: &'static str) -> Self {
        Self {
            limit: HeaderName::from_static(limit),
            remaining: HeaderName::from_static(remaining),
            reset: HeaderName::from_static(reset),
        }
    }

    fn put(&self, headers: &mut HeaderMap, limit: u64, used: u64, reset: &HeaderValue) {
        headers.insert(self.limit.clone(), HeaderValue::from(limit));
        headers.insert(
            self.remaining.clone(),
            HeaderValue::from(limit.saturating_sub(used)),
        );
        headers.insert(self.reset.clone(), reset.clone());
    }
}

const REQUESTS: LimitHeaders = LimitHeaders::named(
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
);
const TOKENS: LimitHeaders = LimitHeaders::named(
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
);
const INPUT_TOKENS: LimitHeaders = LimitHeaders::named(
    "anthropic-ratelimit-input-tokens-limit",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-input-tokens-reset",
);
const OUTPUT_TOKENS: LimitHeaders = LimitHeaders::named(
    "anthropic-ratelimit-output-tokens-limit",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
);

/// Adds the `anthropic-ratelimit-*` headers for the budget a request used.
pub fn add_budget_headers(headers: &mut HeaderMap, view: &BudgetView) {
    let reset = rfc3339(SystemTime::now() + view.empty_at.saturating_sub(view.now));
    let Ok(reset) = HeaderValue::try_from(reset) else {
        return;
    };
    let (limits, usage) = (view.limits, view.usage);
    REQUESTS.put(
        headers,
        u64::from(limits.requests),
        u64::from(usage.requests),
        &reset,
    );
    TOKENS.put(headers, limits.token_capacity(), usage.tokens(), &reset);
    if let Some(input) = limits.input_tokens {
        INPUT_TOKENS.put(headers, input, usage.input, &reset);
    }
    if let Some(output) = limits.output_tokens {
        OUTPUT_TOKENS.put(headers, output, usage.output, &reset);
    }
}

/// `retry-after` (seconds, rounded up, at least 1) and `retry-after-ms`.
pub fn add_retry_after(headers: &mut HeaderMap, wait: Duration) {
    // Rounded up: coming back at the stated time must find room.
    let ms = wait.as_nanos().div_ceil(1_000_000).max(1);
    put(headers, "retry-after", ms.div_ceil(1000));
    put(headers, "retry-after-ms", ms);
}

/// Formats a time as RFC 3339 in UTC, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    crate::rfc3339::format_unix_millis(i64::try_from(ms).unwrap_or(i64::MAX) / 1000 * 1000, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_core::ledger::{Limits, Usage};

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_774_530);
        assert_eq!(rfc3339(t), "2026-11-27T10:15:30Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn headers_report_what_is_left() {
        let mut h = HeaderMap::new();
        let view = BudgetView {
            limits: Limits::new(60, 50_000),
            usage: Usage {
                requests: 10,
                input: 1_000,
                output: 500,
            },
            empty_at: Duration::from_secs(70),
            now: Duration::from_secs(10),
        };
        add_budget_headers(&mut h, &view);
        assert_eq!(h["anthropic-ratelimit-requests-limit"], "60");
        assert_eq!(h["anthropic-ratelimit-requests-remaining"], "50");
        assert_eq!(h["anthropic-ratelimit-tokens-remaining"], "48500");
        assert!(h["anthropic-ratelimit-tokens-reset"]
            .to_str()
            .unwrap()
            .ends_with('Z'));
        add_retry_after(&mut h, Duration::from_millis(1_200));
        assert_eq!(h["retry-after"], "2");
        assert_eq!(h["retry-after-ms"], "1200");
    }
}
