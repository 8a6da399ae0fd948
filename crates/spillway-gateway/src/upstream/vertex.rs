//! The Vertex provider: Vertex AI's Anthropic endpoints, reached over pooled
//! connections with Google credentials.
//!
//! Three facts shape this module:
//! - **Hosts come only from config.** A URL is built from the configured
//!   template, a configured region and a catalog model id; nothing a client
//!   sends can name a host, and redirects are never followed.
//! - **No total timeout.** A stream may legitimately run for many minutes,
//!   so only connecting and each read are bounded.
//! - **Credentials stay here.** The bearer token is attached at the last
//!   moment and never logged; a client's own key was already stripped by the
//!   auth layer and nothing of the client's headers is forwarded except
//!   `anthropic-beta`, which Vertex understands.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use serde_json::{Map, Value};
use spillway_core::ModelId;
use spillway_vertex::{to_vertex_body, vertex_path, Operation};

use super::client::{SendError, UpstreamClient};
use super::{ModelMissing, Provider, ProviderFuture, ProviderRequest};
use crate::answer::ForwardError;
use crate::config::{UpstreamAuth, UpstreamSettings};

/// OAuth scope Vertex AI requires.
const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Start-up failures of the upstream client.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamInitError {
    #[error("Google credentials: {0}")]
    Credentials(String),
    #[error("upstream.project is empty and no project could be found (set upstream.project or GOOGLE_CLOUD_PROJECT)")]
    NoProject,
    #[error("HTTP client: {0}")]
    Client(String),
}

/// Where upstream bearer tokens come from.
#[derive(Clone)]
pub enum TokenSource {
    /// gcp_auth providers cache and refresh tokens themselves.
    Gcp(Arc<dyn gcp_auth::TokenProvider>),
    Static(HeaderValue),
    None,
}

impl std::fmt::Debug for TokenSource {
    // Deliberately opaque: a Debug print must never show a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenSource::Gcp(_) => "TokenSource::Gcp",
            TokenSource::Static(_) => "TokenSource::Static(<redacted>)",
            TokenSource::None => "TokenSource::None",
        })
    }
}

impl TokenSource {
    pub async fn authorization(&self) -> Result<Option<HeaderValue>, ForwardError> {
        match self {
            TokenSource::Gcp(provider) => {
                let token = provider.token(&[CLOUD_PLATFORM_SCOPE]).await.map_err(|e| {
                    tracing::error!(error = %e, "could not get a Google access token");
                    ForwardError::Credentials
                })?;
                let mut value = HeaderValue::try_from(format!("Bearer {}", token.as_str()))
                    .map_err(|_| ForwardError::Credentials)?;
                value.set_sensitive(true);
                Ok(Some(value))
            }
            TokenSource::Static(value) => Ok(Some(value.clone())),
            TokenSource::None => Ok(None),
        }
    }
}

/// What credentials are made from. Opaque in `Debug`: it may hold a token.
#[derive(Clone)]
struct CredentialSettings {
    auth: UpstreamAuth,
    token: String,
    key_file: String,
}

impl std::fmt::Debug for CredentialSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialSettings(<redacted>)")
    }
}

/// The Vertex client: one connection pool for every location.
#[derive(Debug, Clone)]
pub struct Vertex {
    client: UpstreamClient,
    /// Replaced when Vertex rejects a token ([`Provider::refresh_credentials`]).
    tokens: Arc<RwLock<TokenSource>>,
    credentials: CredentialSettings,
    project: String,
    regional_url: String,
    global_url: String,
    multi_region_urls: BTreeMap<String, String>,
    endpoints: Arc<Endpoints>,
}

/// Parsed endpoint URLs by location, model and method, each built and
/// parsed on first use: formatting and parsing the URL was a tenth of the
/// gateway's instructions per request. Bounded: locations and models come
/// from the catalog, never from a request.
#[derive(Debug, Default)]
struct Endpoints(RwLock<HashMap<String, ModelEndpoints>>);

/// One location's endpoints by model; per model, one slot per
/// ([`Operation`], streaming) pair ([`Endpoints::slot`]).
type ModelEndpoints = HashMap<String, [Option<http::Uri>; 4]>;

impl Endpoints {
    fn slot(op: Operation, stream: bool) -> usize {
        let op = match op {
            Operation::Messages => 0,
            Operation::CountTokens => 2,
        };
        op + usize::from(stream)
    }

    fn get(&self, region: &str, model: &str, op: Operation, stream: bool) -> Option<http::Uri> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        map.get(region)?.get(model)?[Self::slot(op, stream)].clone()
    }

    fn insert(&self, region: &str, model: &str, op: Operation, stream: bool, url: http::Uri) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        map.entry(region.to_string())
            .or_default()
            .entry(model.to_string())
            .or_default()[Self::slot(op, stream)] = Some(url);
    }
}

impl Vertex {
    /// Where tokens come from, as configured. Called again when Vertex
    /// rejects the token in hand: a fresh provider has no cached token, so
    /// a rotated key or a revoked token is replaced by a new one.
    async fn token_source(settings: &CredentialSettings) -> Result<TokenSource, UpstreamInitError> {
        let source = match settings.auth {
            UpstreamAuth::None => TokenSource::None,
            UpstreamAuth::Static => {
                let mut value = HeaderValue::try_from(format!("Bearer {}", settings.token))
                    .map_err(|_| {
                        UpstreamInitError::Credentials(
                            "upstream.token contains characters not allowed in a header".into(),
                        )
                    })?;
                value.set_sensitive(true);
                TokenSource::Static(value)
            }
            UpstreamAuth::Gcp => {
                let provider: Arc<dyn gcp_auth::TokenProvider> = if settings.key_file.is_empty() {
                    gcp_auth::provider().await.map_err(|e| {
                            UpstreamInitError::Credentials(format!(
                                "{e}; set upstream.key_file or GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`"
                            ))
                        })?
                } else {
                    Arc::new(
                        gcp_auth::CustomServiceAccount::from_file(&settings.key_file).map_err(
                            |e| {
                                UpstreamInitError::Credentials(format!(
                                    "upstream.key_file {:?}: {e}",
                                    settings.key_file
                                ))
                            },
                        )?,
                    )
                };
                TokenSource::Gcp(provider)
            }
        };
        Ok(source)
    }

    pub async fn from_settings(settings: &UpstreamSettings) -> Result<Self, UpstreamInitError> {
        let credentials = CredentialSettings {
            auth: settings.auth,
            token: settings.token.clone(),
            key_file: settings.key_file.clone(),
        };
        let tokens = Self::token_source(&credentials).await?;
        let project = if !settings.project.is_empty() {
            settings.project.clone()
        } else if let Some(p) = std::env::var("GOOGLE_CLOUD_PROJECT")
            .ok()
            .filter(|p| !p.is_empty())
        {
            p
        } else if let TokenSource::Gcp(provider) = &tokens {
            provider
                .project_id()
                .await
                .map(|p| p.to_string())
                .map_err(|_| UpstreamInitError::NoProject)?
        } else {
            return Err(UpstreamInitError::NoProject);
        };
        let client = UpstreamClient::new(settings)?;
        Ok(Self {
            client,
            tokens: Arc::new(RwLock::new(tokens)),
            credentials,
            project,
            regional_url: settings.regional_url.trim_end_matches('/').to_string(),
            global_url: settings.global_url.trim_end_matches('/').to_string(),
            multi_region_urls: settings
                .multi_region_urls
                .iter()
                .map(|(k, v)| (k.clone(), v.trim_end_matches('/').to_string()))
                .collect(),
            endpoints: Arc::default(),
        })
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    /// Scheme and host for a Vertex location, by the SDK's rule.
    pub fn base_url(&self, region: &str) -> String {
        if region == "global" {
            self.global_url.clone()
        } else if let Some(url) = self.multi_region_urls.get(region) {
            url.clone()
        } else {
            self.regional_url.replace("{region}", region)
        }
    }

    /// The full endpoint URL. `region` and `model` come from config only.
    pub fn url(&self, region: &str, model: &str, op: Operation, stream: bool) -> String {
        format!(
            "{}/v1{}",
            self.base_url(region),
            vertex_path(&self.project, region, model, op, stream)
        )
    }

    /// [`Vertex::url`], parsed, from the cache when it was built before.
    fn endpoint(
        &self,
        region: &str,
        model: &str,
        op: Operation,
        stream: bool,
    ) -> Result<http::Uri, ForwardError> {
        if let Some(url) = self.endpoints.get(region, model, op, stream) {
            return Ok(url);
        }
        let url = http::Uri::try_from(self.url(region, model, op, stream)).map_err(|_| {
            // The URL names the project: say only that it is malformed.
            tracing::error!(%region, "the configured upstream URL does not parse");
            ForwardError::UpstreamUnavailable {
                region: region.to_string(),
                reason: "invalid upstream URL".into(),
            }
        })?;
        self.endpoints
            .insert(region, model, op, stream, url.clone());
        Ok(url)
    }

    fn current_tokens(&self) -> TokenSource {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends one request; the caller interprets status and body.
    async fn send_one(&self, r: ProviderRequest<'_>) -> Result<reqwest::Response, ForwardError> {
        use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
        let (region, stream) = (r.location, r.stream);
        let uri = self.endpoint(region, r.model.as_str(), r.op, stream)?;
        let mut request = http::Request::new(http_body_util::Full::new(r.body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            ACCEPT,
            // What reqwest sent by default, so Vertex sees the same request.
            HeaderValue::from_static(if stream { "text/event-stream" } else { "*/*" }),
        );
        if let Some(beta) = r.beta {
            headers.insert("anthropic-beta", beta);
        }
        if let Some(authorization) = self.current_tokens().authorization().await? {
            request.headers_mut().insert(AUTHORIZATION, authorization);
        }
        self.client
            .send(request)
            .await
            .map_err(|e| classify_client_error(region, e))
    }
}

impl Provider for Vertex {
    /// Vertex's body: no `model` (the URL names it), `anthropic_version`
    /// added; for `count_tokens`, the model in the body and no `max_tokens`.
    fn encode(&self, body: Map<String, Value>, op: Operation, model: &ModelId) -> Bytes {
        Bytes::from(to_vertex_body(body, op, model.as_str()))
    }

    fn send<'a>(&'a self, request: ProviderRequest<'a>) -> ProviderFuture<'a, reqwest::Response> {
        Box::pin(self.send_one(request))
    }

    /// Google credentials: a fresh token source (service-account key,
    /// application-default credentials or metadata server) whose first
    /// token is new. A static token cannot be refreshed.
    fn refresh_credentials(&self) -> ProviderFuture<'_, ()> {
        Box::pin(async move {
            if self.credentials.auth != UpstreamAuth::Gcp {
                return Ok(());
            }
            let fresh = Self::token_source(&self.credentials).await.map_err(|e| {
                tracing::error!(error = %e, "could not renew the Google credentials");
                ForwardError::Credentials
            })?;
            *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = fresh;
            Ok(())
        })
    }

    /// Vertex's 404 when the project cannot use a model in a region.
    fn model_missing(&self, e: &spillway_vertex::UpstreamError) -> Option<ModelMissing> {
        (e.status == 404
            && (e.message.contains("Publisher Model")
                || e.google_status.as_deref() == Some("NOT_FOUND")))
        .then_some(ModelMissing {
            reason: "is not enabled for the gateway's project there (Vertex AI Model Garden)",
            fix: "Vertex says this project cannot use the model in this region: enable it in Vertex AI Model Garden for that region (or remove the region from the model's config)",
        })
    }

    fn credentials_rejected(&self) -> &'static str {
        "Vertex rejected the gateway's Google credential: check that the service account has roles/aiplatform.user on the project and that its key or token is current"
    }

    /// Readiness: can we produce credentials right now?
    fn ready(&self) -> ProviderFuture<'_, ()> {
        Box::pin(async move {
            tokio::time::timeout(
                Duration::from_secs(5),
                self.current_tokens().authorization(),
            )
            .await
            .map_err(|_| ForwardError::Credentials)?
            .map(|_| ())
        })
    }
}

/// The reqwest client the other providers (Anthropic) send with, from
/// `[upstream]`: connect and read timeouts but no total one (streams run
/// for minutes), pooled, no redirects followed and no proxy from the
/// environment (hosts come only from config). Vertex itself sends on
/// [`UpstreamClient`], built from the same settings.
pub fn upstream_client(settings: &UpstreamSettings) -> Result<reqwest::Client, UpstreamInitError> {
    crate::tls::http_client_builder()
        .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .read_timeout(Duration::from_millis(settings.read_timeout_ms))
        .pool_idle_timeout(Duration::from_millis(settings.pool_idle_timeout_ms))
        .pool_max_idle_per_host(settings.pool_max_idle_per_host)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|e| UpstreamInitError::Client(e.to_string()))
}

/// Turns a transport failure into a client-facing error without leaking
/// the URL (which names the project) or any header.
pub fn classify_send_error(region: &str, error: reqwest::Error) -> ForwardError {
    let region = region.to_string();
    if error.is_timeout() {
        ForwardError::UpstreamTimeout { region }
    } else {
        let reason = if error.is_connect() {
            "connection failed"
        } else {
            "connection error"
        };
        transport_failure(region, reason, &error.without_url())
    }
}

/// [`classify_send_error`] for the Vertex path's own client: the same
/// verdicts (timeout; connect failure; other transport error).
fn classify_client_error(region: &str, error: SendError) -> ForwardError {
    let reason = match &error {
        SendError::Timeout => {
            return ForwardError::UpstreamTimeout {
                region: region.to_string(),
            }
        }
        SendError::Connect(_) => "connection failed",
        SendError::Transport(_) => "connection error",
    };
    transport_failure(region.to_string(), reason, &error)
}

/// A transport failure, logged with what broke and turned into a
/// client-facing error. The causes say what broke (a refused connection,
/// an untrusted certificate) where the clients' own messages are only
/// "error sending request"; neither they nor `error` carry the URL (which
/// names the project) or a header.
fn transport_failure(
    region: String,
    reason: &'static str,
    error: &(dyn std::error::Error + 'static),
) -> ForwardError {
    tracing::warn!(%region, error = %error, cause = %causes(error), "upstream transport error");
    ForwardError::UpstreamUnavailable {
        region,
        reason: reason.into(),
    }
}

/// The chain of `error`'s sources, outermost first, joined by `: `.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = Vec::new();
    let mut cause = error.source();
    while let Some(e) = cause {
        chain.push(e.to_string());
        cause = e.source();
    }
    chain.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_name_every_source_outermost_first() {
        #[derive(Debug, thiserror::Error)]
        #[error("error sending request")]
        struct Request(#[source] Connect);
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect)")]
        struct Connect(#[source] std::io::Error);
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        );
        assert_eq!(
            causes(&Request(Connect(io))),
            "client error (Connect): invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(causes(&std::io::Error::other("alone")), "");
    }

    fn upstream() -> Vertex {
        Vertex {
            client: UpstreamClient::new(&super::super::client::tests::settings(30_000))
                .expect("the client builds"),
            tokens: Arc::new(RwLock::new(TokenSource::None)),
            credentials: CredentialSettings {
                auth: UpstreamAuth::None,
                token: String::new(),
                key_file: String::new(),
            },
            project: "my-proj".into(),
            regional_url: "https://{region}-aiplatform.googleapis.com".into(),
            global_url: "https://aiplatform.googleapis.com".into(),
            multi_region_urls: [(
                "us".to_string(),
                "https://aiplatform.us.rep.googleapis.com".to_string(),
            )]
            .into_iter()
            .collect(),
            endpoints: Arc::default(),
        }
    }

    #[test]
    fn urls_follow_the_vertex_host_rule() {
        let u = upstream();
        assert_eq!(
            u.url("us-central1", "claude-3-haiku@20240307", Operation::Messages, false),
            "https://us-central1-aiplatform.googleapis.com/v1/projects/my-proj/locations/us-central1/publishers/anthropic/models/claude-3-haiku@20240307:rawPredict"
        );
        assert_eq!(
            u.url("global", "m@1", Operation::Messages, true),
            "https://aiplatform.googleapis.com/v1/projects/my-proj/locations/global/publishers/anthropic/models/m@1:streamRawPredict"
        );
        assert_eq!(
            u.url("us", "m@1", Operation::CountTokens, false),
            "https://aiplatform.us.rep.googleapis.com/v1/projects/my-proj/locations/us/publishers/anthropic/models/count-tokens:rawPredict"
        );
    }

    #[test]
    fn endpoints_are_parsed_once_and_kept_apart_by_method() {
        let u = upstream();
        let unary = u
            .endpoint("us-central1", "m@1", Operation::Messages, false)
            .unwrap();
        let stream = u
            .endpoint("us-central1", "m@1", Operation::Messages, true)
            .unwrap();
        let count = u
            .endpoint("us-central1", "m@1", Operation::CountTokens, false)
            .unwrap();
        assert!(unary.to_string().ends_with("/models/m@1:rawPredict"));
        assert!(stream.to_string().ends_with("/models/m@1:streamRawPredict"));
        assert!(count
            .to_string()
            .ends_with("/models/count-tokens:rawPredict"));
        // The second lookup is the cached one, and the same URL.
        assert_eq!(
            u.endpoints
                .get("us-central1", "m@1", Operation::Messages, true),
            Some(stream)
        );
        assert_eq!(
            u.endpoints
                .get("europe-west4", "m@1", Operation::Messages, true),
            None
        );
    }

    #[test]
    fn token_sources_never_print_tokens() {
        let t = TokenSource::Static(HeaderValue::from_static("Bearer secret"));
        assert!(!format!("{t:?}").contains("secret"));
    }
}
