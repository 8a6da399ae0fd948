//! Client authentication: who is calling, as a layer in front of the API.
//!
//! Keys are configured only as SHA-256 digests (`spillway hash-key` prints
//! one), so a leaked config file leaks no key. A presented key — from
//! `x-api-key` (the Anthropic SDK) or `Authorization: Bearer` (the Vertex
//! SDK's `access_token`) — is hashed and looked up by digest. The map lookup
//! compares digests, not keys: learning a digest's prefix from timing gives
//! no way to build a key that hashes to it. The final equality check is
//! still done in constant time with `subtle`, so no comparison on the path
//! depends on secret bytes.
//!
//! The key is consumed here: the headers that carried it are removed from
//! the request, so nothing downstream (logs, the upstream call) can see it.
//!
//! A TLS client certificate is a credential too (`listener_tls`): the
//! accept loop attaches the verified certificate's SHA-256 to each request,
//! and a tenant listing it in `client_cert_sha256` is found the same way a
//! key is, by digest with a constant-time check. A key that authenticates
//! names the tenant (it is the per-request credential; a shared proxy's
//! certificate must not override it); otherwise a mapped certificate does,
//! whatever key came with it (the SDKs insist on sending some key). A
//! certificate that maps to no tenant, with no valid key, is a 401.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{parse_fingerprint, ClientAuth, Settings};
use crate::error::ApiError;
use crate::listener_tls::ClientCertificate;
use crate::tenants::{Tenant, TenantPolicy};

/// Hex SHA-256 of a client key, the form stored in config.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random client key: `sk-spw-` and 40 base-62 characters.
pub fn new_client_key() -> String {
    crate::ids::random_id("sk-spw-", 40)
}

/// The configured credentials: keys by digest, client certificates by
/// fingerprint.
#[derive(Debug, Clone)]
pub struct KeyRing {
    mode: ClientAuth,
    tenants: Vec<Tenant>,
    by_digest: HashMap<[u8; 32], Tenant>,
    by_certificate: HashMap<[u8; 32], Tenant>,
    anonymous: Tenant,
    failures: Option<prometheus::IntCounter>,
}

impl KeyRing {
    pub fn from_settings(settings: &Settings) -> Self {
        let mut ring = Self {
            mode: settings.server.auth,
            tenants: Vec::new(),
            by_digest: HashMap::new(),
            by_certificate: HashMap::new(),
            anonymous: Tenant::anonymous(),
            failures: None,
        };
        for (name, configured) in &settings.tenants {
            let tenant = Tenant {
                name: Arc::from(name.as_str()),
                policy: Arc::new(TenantPolicy::from_settings(configured)),
            };
            let key = hex::decode(&configured.key_sha256)
                .ok()
                .and_then(|d| <[u8; 32]>::try_from(d).ok());
            if let Some(digest) = key {
                ring.by_digest.insert(digest, tenant.clone());
            }
            for fingerprint in &configured.client_cert_sha256 {
                if let Some(fingerprint) = parse_fingerprint(fingerprint) {
                    ring.by_certificate.insert(fingerprint, tenant.clone());
                }
            }
            ring.tenants.push(tenant);
        }
        ring
    }

    /// Counts refused keys in `counter`.
    pub fn with_failure_counter(mut self, counter: prometheus::IntCounter) -> Self {
        self.failures = Some(counter);
        self
    }

    /// The tenant that submitted work earlier under `name`, as configured
    /// now: a configured tenant, or the anonymous one while client auth is off.
    pub fn tenant_named(&self, name: &str) -> Option<Tenant> {
        let configured = self.tenants.iter().find(|t| &*t.name == name);
        configured.cloned().or_else(|| {
            (self.mode == ClientAuth::None && *self.anonymous.name == *name)
                .then(|| self.anonymous.clone())
        })
    }

    /// Every configured tenant.
    pub fn tenants(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.iter()
    }

    /// Finds the tenant a presented key belongs to.
    pub fn authenticate(&self, presented: &str) -> Option<&Tenant> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let (stored, tenant) = self.by_digest.get_key_value(&digest)?;
        bool::from(stored.ct_eq(&digest)).then_some(tenant)
    }

    /// Finds the tenant a verified client certificate belongs to.
    pub fn authenticate_certificate(&self, certificate: &ClientCertificate) -> Option<&Tenant> {
        let (stored, tenant) = self.by_certificate.get_key_value(&certificate.sha256)?;
        bool::from(stored.ct_eq(&certificate.sha256)).then_some(tenant)
    }

    /// The tenant a request's credentials name: a key that authenticates,
    /// else a mapped certificate (see the module docs).
    fn identify(
        &self,
        key: Option<&str>,
        certificate: Option<&ClientCertificate>,
    ) -> Option<&Tenant> {
        key.and_then(|k| self.authenticate(k))
            .or_else(|| certificate.and_then(|c| self.authenticate_certificate(c)))
    }
}

/// Whether `presented` hashes to `digest`, compared in constant time (the
/// admin key's check; tenants are found by digest in [`KeyRing`]).
pub fn key_matches(presented: &str, digest: &[u8; 32]) -> bool {
    let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    bool::from(presented.ct_eq(digest))
}

/// The key ring in force, replaceable while serving (SIGHUP reloads tenants).
#[derive(Debug)]
pub struct Keys(std::sync::RwLock<Arc<KeyRing>>);

impl Keys {
    pub fn new(ring: KeyRing) -> Self {
        Self(std::sync::RwLock::new(Arc::new(ring)))
    }

    pub fn current(&self) -> Arc<KeyRing> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn replace(&self, ring: KeyRing) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring);
    }
}

/// Where a caller put its key: `x-api-key` first (the Anthropic SDK), then
/// `Authorization: Bearer` (the Vertex SDK's `access_token`; the scheme in
/// any case, as RFC 7235 says). The one parser for client and admin keys.
pub fn presented_key(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-api-key") {
        return v.to_str().ok();
    }
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The auth layer: attaches a [`Tenant`] or answers 401.
pub async fn require_tenant(
    State(keys): State<Arc<Keys>>,
    mut request: Request,
    next: Next,
) -> Response {
    let keys = keys.current();
    let certificate = request.extensions().get::<ClientCertificate>().copied();
    let key = presented_key(request.headers());
    let found = keys.identify(key, certificate.as_ref());
    let tenant = match keys.mode {
        // No key is required, but a configured tenant's key (or
        // certificate) still names its tenant: the demo's synthetic
        // tenants, or a team trying its key against a local gateway, are
        // counted as who they are.
        ClientAuth::None => found.unwrap_or(&keys.anonymous).clone(),
        ClientAuth::ApiKey => match found {
            Some(tenant) => tenant.clone(),
            None => {
                let problem: std::borrow::Cow<'static, str> = match (certificate, key) {
                    (Some(c), _) => format!(
                        "the client certificate (sha256 {}) is not mapped to a tenant (tenants.NAME.client_cert_sha256), and no valid API key was sent",
                        c.fingerprint()
                    )
                    .into(),
                    (None, Some(_)) => "invalid x-api-key".into(),
                    (None, None) => {
                        "missing API key: send it as x-api-key or Authorization: Bearer".into()
                    }
                };
                tracing::info!(problem = %problem, "client authentication failed");
                if let Some(failures) = &keys.failures {
                    failures.inc();
                }
                return ApiError::Unauthenticated(problem).into_response();
            }
        },
    };
    let headers = request.headers_mut();
    headers.remove("x-api-key");
    headers.remove(AUTHORIZATION);
    request.extensions_mut().insert(tenant);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn ring(keys: &[(&str, &str)]) -> KeyRing {
        let by_digest: HashMap<[u8; 32], Tenant> = keys
            .iter()
            .map(|(name, key)| {
                let d: [u8; 32] = Sha256::digest(key.as_bytes()).into();
                let tenant = Tenant {
                    name: Arc::from(*name),
                    policy: Arc::default(),
                };
                (d, tenant)
            })
            .collect();
        KeyRing {
            mode: ClientAuth::ApiKey,
            tenants: by_digest.values().cloned().collect(),
            by_certificate: HashMap::new(),
            by_digest,
            anonymous: Tenant::anonymous(),
            failures: None,
        }
    }

    #[test]
    fn a_valid_key_names_the_tenant_before_a_certificate() {
        let mut keys = ring(&[("a", "key-a"), ("b", "key-b")]);
        let cert = ClientCertificate { sha256: [7; 32] };
        let b = keys.authenticate("key-b").unwrap().clone();
        keys.by_certificate.insert(cert.sha256, b);
        assert_eq!(
            &*keys.identify(Some("key-a"), Some(&cert)).unwrap().name,
            "a"
        );
        assert_eq!(
            &*keys.identify(Some("wrong"), Some(&cert)).unwrap().name,
            "b"
        );
        assert_eq!(&*keys.identify(None, Some(&cert)).unwrap().name, "b");
        let unmapped = ClientCertificate { sha256: [8; 32] };
        assert!(keys.identify(None, Some(&unmapped)).is_none());
        assert!(keys.identify(Some("wrong"), None).is_none());
    }

    #[test]
    fn hash_key_is_hex_sha256() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn authenticates_by_digest() {
        let keys = ring(&[("a", "key-a"), ("b", "key-b")]);
        assert_eq!(&*keys.authenticate("key-b").unwrap().name, "b");
        assert!(keys.authenticate("key-c").is_none());
        assert!(keys.authenticate("").is_none());
    }

    #[test]
    fn key_comes_from_x_api_key_or_bearer() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert(AUTHORIZATION, "Bearer tok".parse().unwrap());
        assert_eq!(presented_key(&h), Some("tok"));
        h.insert(AUTHORIZATION, "Basic tok".parse().unwrap());
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", "k".parse().unwrap());
        assert_eq!(presented_key(&h), Some("k"));
    }
}
