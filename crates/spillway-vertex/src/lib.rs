//! The Anthropic-on-Vertex wire protocol, as pure functions (no I/O).
//!
//! Spillway sits between backend services and Claude on Google Vertex AI. It serves **two client
//! surfaces** onto **one upstream**:
//!
//! * **Vertex-style**, for `AnthropicVertex` SDK clients pointed at the gateway
//!   (`base_url = http://gateway/v1`, `access_token = <gateway key>`):
//!   `POST /v1/projects/{p}/locations/{l}/publishers/anthropic/models/{model}:rawPredict`
//!   (or `:streamRawPredict`, or `count-tokens:rawPredict`). The body already has Vertex's shape:
//!   no `model` (it is in the URL, `claude-sonnet-4-5@20250929` style) and an `anthropic_version`.
//! * **Anthropic-style**, for plain `Anthropic` SDK clients (`base_url = http://gateway`):
//!   `POST /v1/messages` and `POST /v1/messages/count_tokens`, with `model` in the body and an
//!   `anthropic-version` header that must not be forwarded.
//!
//! The **upstream** is Vertex's `rawPredict` / `streamRawPredict` ([`endpoint`]), whose body is the
//! Messages body minus `model`, plus `"anthropic_version": "vertex-2023-10-16"`
//! ([`request::to_vertex_body`]); count-tokens keeps the model in the body. Responses are
//! Anthropic's `Message` / SSE stream unchanged, forwarded byte for byte ([`sse::SseSplitter`])
//! while usage is side-parsed ([`usage::StreamUsage`]). Errors come back either Google-shaped
//! (sometimes wrapped in an array) or Anthropic-shaped and are normalized to Anthropic's shape
//! ([`error::normalize_upstream_error`]).
//!
//! Modules:
//! * [`request`]: parse, validate and translate client bodies;
//! * [`model_id`]: `claude-x-20240307` ⇄ `claude-x@20240307`, and model-id hygiene;
//! * [`endpoint`]: Vertex hosts, paths and the `{model}:{specifier}` segment;
//! * [`sse`]: incremental, byte-exact SSE framing;
//! * [`usage`]: token usage from unary bodies and streams, `vertex_event` detection;
//! * [`error`]: Anthropic error bodies and upstream error normalization.

pub mod endpoint;
pub mod error;
pub mod model_id;
pub mod request;
pub mod sse;
pub mod usage;

/// The `anthropic_version` Vertex requires in every request body (the SDK's default).
pub const VERTEX_ANTHROPIC_VERSION: &str = "vertex-2023-10-16";

pub use endpoint::{parse_model_action, vertex_path, Specifier, COUNT_TOKENS_MODEL};
pub use error::{error_body, normalize_upstream_error, sse_error_event, ErrorKind, UpstreamError};
pub use model_id::{anthropic_to_vertex_id, is_valid_model_id, vertex_to_anthropic_id};
pub use request::{parse_body, to_vertex_body, validate, Operation, RequestError, RequestSummary};
pub use sse::{SseError, SseEvent, SseSplitter};
pub use usage::{
    is_vertex_event, message_end_from_body, usage_from_message_body, MessageEnd, StopReason,
    StreamUsage, Usage,
};
