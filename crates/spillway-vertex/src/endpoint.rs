//! Vertex URLs for Claude (reference §1.1, §1.5, §2.1).
//!
//! ```text
//! POST {BASE}/projects/{P}/locations/{L}/publishers/anthropic/models/{MODEL}:rawPredict        (unary)
//! POST {BASE}/projects/{P}/locations/{L}/publishers/anthropic/models/{MODEL}:streamRawPredict  (SSE)
//! POST {BASE}/projects/{P}/locations/{L}/publishers/anthropic/models/count-tokens:rawPredict   (model in body)
//! ```
//!
//! `{BASE}` is `{scheme}://{host}/v1`; which host serves a location (`r-aiplatform...`,
//! `aiplatform...` for `global`, `aiplatform.us.rep...` for `us`) is the gateway's config,
//! the only place upstream hosts come from, so it is not decided here.
//! The specifier must agree with the body's `stream` flag: the SDK picks `streamRawPredict` iff
//! `stream` is true and leaves the flag in the body.
//!
//! The last path segment is `{MODEL}:{specifier}` as one segment, which routers cannot split into
//! a parameter plus a literal; [`parse_model_action`] does it.

use crate::request::Operation;

/// The pseudo-model used in the count-tokens URL (the real model goes in the body).
pub const COUNT_TOKENS_MODEL: &str = "count-tokens";

/// The action after the `:` in a Vertex model path segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Specifier {
    /// `rawPredict`: a unary JSON response (also used for count-tokens).
    RawPredict,
    /// `streamRawPredict`: an SSE response.
    StreamRawPredict,
}

impl Specifier {
    /// The wire spelling (`rawPredict` / `streamRawPredict`).
    pub fn as_str(self) -> &'static str {
        match self {
            Specifier::RawPredict => "rawPredict",
            Specifier::StreamRawPredict => "streamRawPredict",
        }
    }

    /// The specifier for an operation: count-tokens is always `rawPredict`; messages follow `stream`.
    pub fn for_request(op: Operation, stream: bool) -> Specifier {
        match op {
            Operation::Messages if stream => Specifier::StreamRawPredict,
            _ => Specifier::RawPredict,
        }
    }
}

/// Splits a Vertex path segment `"{model}:{specifier}"` (e.g. `claude-sonnet-4-5@20250929:rawPredict`)
/// at its last `:`. Returns `None` for unknown specifiers or an empty model.
pub fn parse_model_action(segment: &str) -> Option<(&str, Specifier)> {
    let (model, action) = segment.rsplit_once(':')?;
    if model.is_empty() {
        return None;
    }
    let spec = match action {
        "rawPredict" => Specifier::RawPredict,
        "streamRawPredict" => Specifier::StreamRawPredict,
        _ => return None,
    };
    Some((model, spec))
}

/// The path under the base URL (starting with `/projects/`) for a request. For
/// [`Operation::CountTokens`] `model` is ignored and the literal `count-tokens` is used.
pub fn vertex_path(
    project: &str,
    location: &str,
    model: &str,
    op: Operation,
    stream: bool,
) -> String {
    let model = match op {
        Operation::Messages => model,
        Operation::CountTokens => COUNT_TOKENS_MODEL,
    };
    format!(
        "/projects/{project}/locations/{location}/publishers/anthropic/models/{model}:{}",
        Specifier::for_request(op, stream).as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            vertex_path("p", "global", "claude-sonnet-4-5@20250929", Operation::Messages, true),
            "/projects/p/locations/global/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict"
        );
        assert_eq!(
            vertex_path("p", "us-east5", "m", Operation::Messages, false),
            "/projects/p/locations/us-east5/publishers/anthropic/models/m:rawPredict"
        );
        assert_eq!(
            vertex_path("p", "us-east5", "m", Operation::CountTokens, true),
            "/projects/p/locations/us-east5/publishers/anthropic/models/count-tokens:rawPredict"
        );
    }

    #[test]
    fn model_action() {
        assert_eq!(
            parse_model_action("claude-sonnet-4-5@20250929:streamRawPredict"),
            Some(("claude-sonnet-4-5@20250929", Specifier::StreamRawPredict))
        );
        assert_eq!(
            parse_model_action("count-tokens:rawPredict"),
            Some(("count-tokens", Specifier::RawPredict))
        );
        assert_eq!(parse_model_action("m:predict"), None);
        assert_eq!(parse_model_action(":rawPredict"), None);
        assert_eq!(parse_model_action("m"), None);
    }
}
