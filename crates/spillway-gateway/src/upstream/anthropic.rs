//! The Anthropic provider: Anthropic's own Messages API, as an overflow for
//! models whose Vertex locations have no room.
//!
//! What differs from Vertex, and why each difference lives here:
//! - **One host, one path per operation.** `POST {url}/v1/messages` (the
//!   body says whether it streams) and `POST {url}/v1/messages/count_tokens`.
//!   The base URL comes only from `[providers.anthropic] url`; both
//!   endpoints are parsed once, at start.
//! - **The model is in the body**, under Anthropic's own id
//!   (`claude-3-haiku-20240307`, or the model's configured `overflow.model`);
//!   `anthropic_version` is Vertex's body field and Anthropic refuses it, so
//!   the version goes in the `anthropic-version` header instead.
//! - **The key is a secret.** `x-api-key` is built once, marked sensitive
//!   (so `Debug` prints of a request redact it) and attached only to calls
//!   to this host. Nothing else in the gateway ever sees it: it is not in
//!   `Debug` output, errors, logs or metrics.
//!
//! Anthropic answers every call with `anthropic-ratelimit-*` headers; the
//! forwarder hands them to the overflow store ([`Provider::rate_limits`]),
//! which learns the real limits and levels from them.

use std::collections::HashMap;

use bytes::Bytes;
use http::HeaderValue;
use serde_json::{Map, Value};
use spillway_core::bucket::RateLimitReport;
use spillway_core::{Catalog, ModelId};
use spillway_vertex::Operation;

use super::vertex::{classify_send_error, upstream_client, UpstreamInitError};
use super::{ModelMissing, Provider, ProviderFuture, ProviderRequest};
use crate::answer::ForwardError;
use crate::config::{AnthropicSettings, Settings, UpstreamSettings, ANTHROPIC_PROVIDER};

/// The client for Anthropic's API.
pub struct Anthropic {
    client: reqwest::Client,
    messages: reqwest::Url,
    count_tokens: reqwest::Url,
    key: HeaderValue,
    version: HeaderValue,
    /// Vertex model id → Anthropic's id, for every model that overflows here.
    models: HashMap<ModelId, Value>,
}

impl std::fmt::Debug for Anthropic {
    // Deliberately without the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Anthropic")
            .field("messages", &self.messages.as_str())
            .field("models", &self.models.len())
            .finish_non_exhaustive()
    }
}

impl Anthropic {
    /// The provider `[providers.anthropic]` describes, for the models of
    /// `catalog` that overflow to it; `None` when it is not configured.
    pub fn from_settings(
        settings: &Settings,
        catalog: &Catalog,
    ) -> Result<Option<Self>, UpstreamInitError> {
        let Some(anthropic) = &settings.providers.anthropic else {
            return Ok(None);
        };
        let models = settings
            .models
            .iter()
            .flat_map(|(id, m)| {
                m.overflow
                    .iter()
                    .filter(|o| o.provider == ANTHROPIC_PROVIDER)
                    .map(move |o| (id, o.provider_model(id)))
            })
            .filter_map(|(id, theirs)| {
                let ours = catalog.resolve(id)?.model.id.clone();
                Some((ours, Value::String(theirs)))
            })
            .collect();
        Self::new(anthropic, &settings.upstream, models).map(Some)
    }

    fn new(
        settings: &AnthropicSettings,
        upstream: &UpstreamSettings,
        models: HashMap<ModelId, Value>,
    ) -> Result<Self, UpstreamInitError> {
        let mut key = HeaderValue::try_from(settings.key()).map_err(|_| {
            UpstreamInitError::Credentials(
                "providers.anthropic: the API key contains characters not allowed in a header"
                    .into(),
            )
        })?;
        key.set_sensitive(true);
        let version = HeaderValue::try_from(settings.version.as_str()).map_err(|_| {
            UpstreamInitError::Client("providers.anthropic.version is not a header value".into())
        })?;
        let base = settings.url.trim_end_matches('/');
        let parse = |path: &str| {
            reqwest::Url::parse(&format!("{base}{path}")).map_err(|e| {
                UpstreamInitError::Client(format!("providers.anthropic.url {base:?}: {e}"))
            })
        };
        Ok(Self {
            client: upstream_client(upstream)?,
            messages: parse("/v1/messages")?,
            count_tokens: parse("/v1/messages/count_tokens")?,
            key,
            version,
            models,
        })
    }

    /// Anthropic's id for a catalog model.
    fn model_id(&self, model: &ModelId) -> Value {
        self.models.get(model).cloned().unwrap_or_else(|| {
            Value::String(spillway_vertex::vertex_to_anthropic_id(model.as_str()))
        })
    }

    async fn send_one(&self, r: ProviderRequest<'_>) -> Result<reqwest::Response, ForwardError> {
        let url = match r.op {
            Operation::Messages => &self.messages,
            Operation::CountTokens => &self.count_tokens,
        };
        let mut request = self
            .client
            .post(url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("x-api-key", self.key.clone())
            .header("anthropic-version", self.version.clone())
            .body(r.body);
        if r.stream {
            request = request.header(http::header::ACCEPT, "text/event-stream");
        }
        if let Some(beta) = r.beta {
            request = request.header("anthropic-beta", beta);
        }
        request
            .send()
            .await
            .map_err(|e| classify_send_error(r.location, e))
    }
}

impl Provider for Anthropic {
    /// Anthropic's body: the client's, with Anthropic's model id and
    /// without Vertex's `anthropic_version`; for `count_tokens`, also
    /// without `max_tokens` and `stream`, which that endpoint refuses.
    fn encode(&self, mut body: Map<String, Value>, op: Operation, model: &ModelId) -> Bytes {
        body.shift_remove("anthropic_version");
        if op == Operation::CountTokens {
            body.shift_remove("max_tokens");
            body.shift_remove("stream");
        }
        body.insert("model".to_owned(), self.model_id(model));
        Bytes::from(serde_json::to_vec(&body).expect("JSON object serializes"))
    }

    fn send<'a>(&'a self, request: ProviderRequest<'a>) -> ProviderFuture<'a, reqwest::Response> {
        Box::pin(self.send_one(request))
    }

    /// A static key: nothing to obtain.
    fn ready(&self) -> ProviderFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Anthropic's 404 `not_found_error` for a model id it does not know:
    /// the gateway's `overflow[].model`, not the client's request.
    fn model_missing(&self, e: &spillway_vertex::UpstreamError) -> Option<ModelMissing> {
        (e.status == 404 && e.message.starts_with("model:")).then_some(ModelMissing {
            reason: "is not known to Anthropic under the configured id (the model's overflow[].model)",
            fix: "Anthropic does not serve this model id to the key's organisation: set the model's overflow[].model to Anthropic's id for it (or remove the overflow)",
        })
    }

    fn credentials_rejected(&self) -> &'static str {
        "Anthropic rejected the gateway's API key: check providers.anthropic.api_key, or the variable providers.anthropic.api_key_env names, and that the key's organisation may use the model"
    }

    fn rate_limits(&self, headers: &http::HeaderMap) -> Option<RateLimitReport> {
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let pairs = headers
            .iter()
            .filter(|(name, _)| {
                let name = name.as_str();
                name.starts_with("anthropic-ratelimit-") || name == "retry-after"
            })
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
        Some(RateLimitReport::from_headers(pairs, now_unix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Anthropic {
        let settings = AnthropicSettings {
            url: "http://127.0.0.1:9/".into(),
            api_key: "sk-ant-test-secret".into(),
            api_key_env: "UNSET".into(),
            version: "2023-06-01".into(),
        };
        let upstream = crate::config::Settings::load_layers(&[crate::config::DEMO_TOML], &[], None)
            .unwrap()
            .upstream;
        let models = [(
            ModelId::from("claude-3-haiku@20240307"),
            Value::String("claude-3-haiku-custom".into()),
        )]
        .into_iter()
        .collect();
        Anthropic::new(&settings, &upstream, models).unwrap()
    }

    fn body(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_body_names_anthropics_model_and_not_vertexs_version() {
        let p = provider();
        let sent = p.encode(
            body(serde_json::json!({
                "model": "claude-3-haiku@20240307",
                "anthropic_version": "vertex-2023-10-16",
                "max_tokens": 5,
                "stream": true,
                "messages": [{"role": "user", "content": "hi"}],
            })),
            Operation::Messages,
            &ModelId::from("claude-3-haiku@20240307"),
        );
        let sent: Value = serde_json::from_slice(&sent).unwrap();
        assert_eq!(sent["model"], "claude-3-haiku-custom");
        assert!(sent.get("anthropic_version").is_none());
        assert_eq!(sent["stream"], true);
        assert_eq!(sent["max_tokens"], 5);
        // A model with no override: Anthropic's id derived from Vertex's.
        let counted = p.encode(
            body(serde_json::json!({"max_tokens": 5, "stream": false, "messages": []})),
            Operation::CountTokens,
            &ModelId::from("claude-sonnet-4-5@20250929"),
        );
        let counted: Value = serde_json::from_slice(&counted).unwrap();
        assert_eq!(counted["model"], "claude-sonnet-4-5-20250929");
        assert!(counted.get("max_tokens").is_none() && counted.get("stream").is_none());
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let p = provider();
        let shown = format!("{p:?}");
        assert!(!shown.contains("sk-ant-test-secret"), "{shown}");
        assert!(p.key.is_sensitive());
    }
}
