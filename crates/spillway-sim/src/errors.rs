//! Error bodies, byte for byte as Vertex AI sends them.
//!
//! Vertex answers with two families of error (reference §1.6):
//!
//! 1. **Google platform errors** (auth, routing, quota, availability):
//!    `{"error":{"code":N,"message":"...","status":"STATUS"}}`. On
//!    `:rawPredict` this is a JSON object; on `:streamRawPredict` the *same
//!    object is wrapped in a JSON array* `[{"error":{...}}]`. Gateways that
//!    parse only the object form break on streaming errors, which is why the
//!    simulator reproduces the quirk.
//! 2. **Anthropic model-layer errors** (validation, overload), forwarded
//!    unchanged: `{"type":"error","error":{"type":"...","message":"..."}}`.
//!
//! [`SimError`] is one error answer; [`SimError::into_response`] renders it
//! for a given action (object vs array).
//!
//! ## The three 429s
//!
//! Vertex says "429 `RESOURCE_EXHAUSTED`" for two different things, and a
//! gateway must tell them apart because only one of them is *its* fault:
//!
//! * **Quota** (reference §1.6, §5): the project went over a per-minute
//!   budget. The message names the metric and the `base_model` dimension:
//!   ``"Quota exceeded for aiplatform.googleapis.com/{metric} with base model: {base_model}. Please submit a quota increase request. https://..."``.
//!   The metric depends on the *kind of location* ([`LocationKind`]):
//!   `online_prediction_{requests,input_tokens_per_minute,output_tokens_per_minute}_per_base_model`
//!   on a regional endpoint, the same with a `global_` prefix on `global`,
//!   and with a `{location}_multi_region_` prefix on `us` / `eu` (the
//!   simulator writes the location in lower case, as metric names are).
//!   See [`QuotaMetric::name_in`] and [`SimError::quota_exceeded_in`].
//! * **Capacity** (dynamic shared quota): Google ran out of capacity for
//!   everyone. No metric, no dimension: `Resource exhausted. Please try
//!   again later.` ([`SimError::capacity_exhausted`]). Waiting for one's
//!   own window to slide does not help; another region might.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::quota::LocationKind;

/// Which quota metric a 429 names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMetric {
    /// `online_prediction_requests_per_base_model`
    Requests,
    /// `online_prediction_input_tokens_per_minute_per_base_model`
    InputTokens,
    /// `online_prediction_output_tokens_per_minute_per_base_model`
    OutputTokens,
}

impl QuotaMetric {
    /// The metric name as it appears in Vertex's 429 message.
    pub fn name(self) -> &'static str {
        match self {
            QuotaMetric::Requests => "online_prediction_requests_per_base_model",
            QuotaMetric::InputTokens => "online_prediction_input_tokens_per_minute_per_base_model",
            QuotaMetric::OutputTokens => {
                "online_prediction_output_tokens_per_minute_per_base_model"
            }
        }
    }

    /// The metric name for a request to `location` (reference §5):
    /// regional locations use [`QuotaMetric::name`] as is, `global` prefixes
    /// it with `global_`, multi-regions (`us`, `eu`) with
    /// `{location}_multi_region_`.
    pub fn name_in(self, location: &str) -> String {
        match LocationKind::of(location) {
            LocationKind::Regional => self.name().to_owned(),
            LocationKind::Global => format!("global_{}", self.name()),
            LocationKind::MultiRegion => {
                format!(
                    "{}_multi_region_{}",
                    location.to_ascii_lowercase(),
                    self.name()
                )
            }
        }
    }
}

/// The exact message of a capacity 429 (no metric: Google's shared pool
/// ran dry, not the project's quota).
pub const CAPACITY_EXHAUSTED_MESSAGE: &str = "Resource exhausted. Please try again later.";

/// The quota dimension for a Vertex model id: `"anthropic-"` + the id
/// without its `@date` suffix (`claude-3-haiku@20240307` →
/// `anthropic-claude-3-haiku`).
pub fn base_model(model: &str) -> String {
    let id = model.split('@').next().unwrap_or(model);
    format!("anthropic-{id}")
}

/// One error answer of the simulated upstream.
#[derive(Debug, Clone)]
pub enum SimError {
    /// A Google-shaped error (`{"error":{code,message,status}}`), array-wrapped on streams.
    Google {
        /// HTTP status.
        code: u16,
        /// Google's `status` string (e.g. `UNAVAILABLE`).
        status: &'static str,
        /// Human-readable message.
        message: String,
    },
    /// An Anthropic-shaped error (`{"type":"error","error":{type,message}}`).
    Anthropic {
        /// HTTP status.
        code: u16,
        /// Anthropic error type (e.g. `invalid_request_error`).
        kind: &'static str,
        /// Human-readable message.
        message: String,
    },
}

impl SimError {
    /// 400 `invalid_request_error` with the given message.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        SimError::Anthropic {
            code: 400,
            kind: "invalid_request_error",
            message: message.into(),
        }
    }

    /// 401 `UNAUTHENTICATED`, Google's exact text.
    pub fn unauthenticated() -> Self {
        SimError::Google {
            code: 401,
            status: "UNAUTHENTICATED",
            message: "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.".into(),
        }
    }

    /// 404 `NOT_FOUND` for a model not offered in a location.
    pub fn model_not_found(project: &str, location: &str, model: &str) -> Self {
        SimError::Google {
            code: 404,
            status: "NOT_FOUND",
            message: format!(
                "Publisher Model `projects/{project}/locations/{location}/publishers/anthropic/models/{model}` was not found or your project does not have access to it. Please ensure you are using a valid model version. For more information, see: https://cloud.google.com/vertex-ai/generative-ai/docs/model-reference/claude"
            ),
        }
    }

    /// 429 `RESOURCE_EXHAUSTED` naming the exceeded *regional* metric and
    /// the base model derived from `model` (see [`base_model`]). Kept for
    /// callers that predate location-aware metrics; the server uses
    /// [`SimError::quota_exceeded_in`].
    pub fn quota_exceeded(metric: QuotaMetric, model: &str) -> Self {
        Self::quota_message(metric.name(), &base_model(model))
    }

    /// 429 `RESOURCE_EXHAUSTED` as Vertex sends it for a request to
    /// `location`: the metric named for that kind of location
    /// ([`QuotaMetric::name_in`]) and `base_model` verbatim (a lineage
    /// group such as `anthropic-claude-sonnet`, or [`base_model`] of a
    /// model id).
    pub fn quota_exceeded_in(metric: QuotaMetric, location: &str, base_model: &str) -> Self {
        Self::quota_message(&metric.name_in(location), base_model)
    }

    fn quota_message(metric: &str, base_model: &str) -> Self {
        SimError::Google {
            code: 429,
            status: "RESOURCE_EXHAUSTED",
            message: format!(
                "Quota exceeded for aiplatform.googleapis.com/{metric} with base model: {base_model}. Please submit a quota increase request. https://cloud.google.com/vertex-ai/docs/generative-ai/quotas-genai."
            ),
        }
    }

    /// 429 `RESOURCE_EXHAUSTED` for lack of shared capacity: no metric, no
    /// base model ([`CAPACITY_EXHAUSTED_MESSAGE`]).
    pub fn capacity_exhausted() -> Self {
        SimError::Google {
            code: 429,
            status: "RESOURCE_EXHAUSTED",
            message: CAPACITY_EXHAUSTED_MESSAGE.into(),
        }
    }

    /// Whether this is a capacity 429 ([`SimError::capacity_exhausted`]).
    pub fn is_capacity_exhausted(&self) -> bool {
        matches!(self, SimError::Google { code: 429, message, .. } if message == CAPACITY_EXHAUSTED_MESSAGE)
    }

    /// Whether this is a quota 429 (one that names a metric), as opposed
    /// to a capacity 429 or any other error.
    pub fn is_quota_exceeded(&self) -> bool {
        matches!(self, SimError::Google { code: 429, message, .. } if message.starts_with("Quota exceeded for "))
    }

    /// 529 `overloaded_error` (Anthropic-shaped).
    pub fn overloaded() -> Self {
        SimError::Anthropic {
            code: 529,
            kind: "overloaded_error",
            message: "Overloaded".into(),
        }
    }

    /// The answer for an injected `Status(code)` fault on `model`.
    ///
    /// 429 is the request-quota body, 529 Anthropic's overload, 400 an
    /// Anthropic validation error; everything else is the Google object
    /// with the canonical status for that code.
    pub fn for_status(code: u16, model: &str) -> Self {
        Self::for_status_in(code, "us-central1", &base_model(model))
    }

    /// Like [`SimError::for_status`], for a request to `location` whose
    /// quota dimension is `base_model`: an injected 429 then names the
    /// request metric of that kind of location, as a real one would.
    pub fn for_status_in(code: u16, location: &str, base_model: &str) -> Self {
        match code {
            429 => Self::quota_exceeded_in(QuotaMetric::Requests, location, base_model),
            529 => Self::overloaded(),
            400 => Self::invalid_request("Injected invalid request"),
            _ => {
                let (status, message) = match code {
                    401 => return Self::unauthenticated(),
                    403 => ("PERMISSION_DENIED", "Permission 'aiplatform.endpoints.predict' denied on resource (or it may not exist)."),
                    404 => ("NOT_FOUND", "Requested entity was not found."),
                    409 => ("ABORTED", "The operation was aborted."),
                    499 => ("CANCELLED", "The operation was cancelled."),
                    500 => ("INTERNAL", "Internal error encountered."),
                    501 => ("UNIMPLEMENTED", "Operation is not implemented, or supported, or enabled."),
                    503 => ("UNAVAILABLE", "The service is currently unavailable."),
                    504 => ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
                    _ => ("UNKNOWN", "Unknown error."),
                };
                SimError::Google {
                    code,
                    status,
                    message: message.into(),
                }
            }
        }
    }

    /// HTTP status of this error.
    pub fn code(&self) -> u16 {
        match self {
            SimError::Google { code, .. } | SimError::Anthropic { code, .. } => *code,
        }
    }

    /// The JSON body text; Google errors are wrapped in an array when
    /// `stream`. Field order is fixed (Vertex's), whatever serde_json
    /// features other crates enable.
    pub fn body(&self, stream: bool) -> String {
        #[derive(Serialize)]
        struct GoogleInner<'a> {
            code: u16,
            message: &'a str,
            status: &'a str,
        }
        #[derive(Serialize)]
        struct Google<'a> {
            error: GoogleInner<'a>,
        }
        #[derive(Serialize)]
        struct AnthropicInner<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            message: &'a str,
        }
        #[derive(Serialize)]
        struct Anthropic<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            error: AnthropicInner<'a>,
        }
        let out = match self {
            SimError::Google {
                code,
                status,
                message,
            } => {
                let obj = Google {
                    error: GoogleInner {
                        code: *code,
                        message,
                        status,
                    },
                };
                if stream {
                    serde_json::to_string(&[obj])
                } else {
                    serde_json::to_string(&obj)
                }
            }
            SimError::Anthropic { kind, message, .. } => serde_json::to_string(&Anthropic {
                kind: "error",
                error: AnthropicInner { kind, message },
            }),
        };
        // Serializing plain strings and integers cannot fail.
        out.unwrap_or_default()
    }

    /// Renders the error as an HTTP response for rawPredict (`stream ==
    /// false`) or streamRawPredict (`stream == true`).
    pub fn into_response(self, stream: bool) -> Response {
        let status = StatusCode::from_u16(self.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let content_type = match self {
            SimError::Google { .. } => "application/json; charset=UTF-8",
            SimError::Anthropic { .. } => "application/json",
        };
        let body = self.body(stream);
        (
            status,
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            body,
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_body_is_vertex_exact() {
        let e = SimError::quota_exceeded(QuotaMetric::Requests, "claude-3-haiku@20240307");
        assert_eq!(
            e.body(false),
            r#"{"error":{"code":429,"message":"Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model with base model: anthropic-claude-3-haiku. Please submit a quota increase request. https://cloud.google.com/vertex-ai/docs/generative-ai/quotas-genai.","status":"RESOURCE_EXHAUSTED"}}"#
        );
        assert!(
            e.body(true).starts_with("[{\"error\":{\"code\":429,") && e.body(true).ends_with("}}]")
        );
    }

    #[test]
    fn metric_names_follow_the_location_kind() {
        use QuotaMetric::*;
        assert_eq!(
            Requests.name_in("us-east5"),
            "online_prediction_requests_per_base_model"
        );
        assert_eq!(
            InputTokens.name_in("global"),
            "global_online_prediction_input_tokens_per_minute_per_base_model"
        );
        assert_eq!(
            OutputTokens.name_in("eu"),
            "eu_multi_region_online_prediction_output_tokens_per_minute_per_base_model"
        );
        assert_eq!(
            Requests.name_in("us"),
            "us_multi_region_online_prediction_requests_per_base_model"
        );
        let e = SimError::quota_exceeded_in(InputTokens, "global", "anthropic-claude-sonnet");
        assert_eq!(
            e.body(false),
            r#"{"error":{"code":429,"message":"Quota exceeded for aiplatform.googleapis.com/global_online_prediction_input_tokens_per_minute_per_base_model with base model: anthropic-claude-sonnet. Please submit a quota increase request. https://cloud.google.com/vertex-ai/docs/generative-ai/quotas-genai.","status":"RESOURCE_EXHAUSTED"}}"#
        );
        assert!(e.is_quota_exceeded());
        // The old constructor is the regional form with the derived base model.
        assert_eq!(
            SimError::quota_exceeded(Requests, "claude-3-haiku@20240307").body(false),
            SimError::quota_exceeded_in(Requests, "europe-west4", "anthropic-claude-3-haiku")
                .body(false)
        );
    }

    #[test]
    fn capacity_429_names_no_metric() {
        let e = SimError::capacity_exhausted();
        assert_eq!(e.code(), 429);
        assert!(!e.is_quota_exceeded());
        assert!(e.is_capacity_exhausted());
        assert!(!SimError::for_status(429, "m").is_capacity_exhausted());
        assert_eq!(
            e.body(false),
            r#"{"error":{"code":429,"message":"Resource exhausted. Please try again later.","status":"RESOURCE_EXHAUSTED"}}"#
        );
        assert_eq!(
            e.body(true),
            r#"[{"error":{"code":429,"message":"Resource exhausted. Please try again later.","status":"RESOURCE_EXHAUSTED"}}]"#
        );
    }

    #[test]
    fn base_model_strips_date() {
        assert_eq!(
            base_model("claude-3-haiku@20240307"),
            "anthropic-claude-3-haiku"
        );
        assert_eq!(
            base_model("claude-sonnet-4-6"),
            "anthropic-claude-sonnet-4-6"
        );
    }

    #[test]
    fn anthropic_errors_are_never_wrapped() {
        let e = SimError::overloaded();
        assert_eq!(e.code(), 529);
        assert_eq!(
            e.body(true),
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
        );
    }
}
