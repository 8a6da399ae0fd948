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

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ClientAuth, Settings};
use crate::error::ApiError;
use crate::tenants::{Tenant, TenantPolicy};

/// Hex SHA-256 of a client key, the form stored in config.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random client key: `sk-spw-` and 40 base-62 characters.
pub fn new_client_key() -> String {
    crate::ids::random_id("sk-spw-", 40)
}

/// The configured keys, by digest.
#[derive(Debug, Clone)]
pub struct KeyRing {
    mode: ClientAuth,
    by_digest: HashMap<[u8; 32], Tenant>,
    anonymous: Tenant,
    failures: Option<prometheus::IntCounter>,
}

impl KeyRing {
    pub fn from_settings(settings: &Settings) -> Self {
        let by_digest = settings
            .tenants
            .iter()
            .filter_map(|(name, tenant)| {
                let bytes: [u8; 32] = hex::decode(&tenant.key_sha256).ok()?.try_into().ok()?;
                let tenant = Tenant {
                    name: Arc::from(name.as_str()),
                    policy: Arc::new(TenantPolicy::from_settings(tenant)),
                };
                Some((bytes, tenant))
            })
            .collect();
        Self {
            mode: settings.server.auth,
            by_digest,
            anonymous: Tenant::anonymous(),
            failures: None,
        }
    }

    /// Counts refused keys in `counter`.
    pub fn with_failure_counter(mut self, counter: prometheus::IntCounter) -> Self {
        self.failures = Some(counter);
        self
    }

    /// The tenant that submitted work earlier under `name`, as configured
    /// now: a keyed tenant, or the anonymous one while client auth is off.
    pub fn tenant_named(&self, name: &str) -> Option<Tenant> {
        let keyed = self.by_digest.values().find(|t| &*t.name == name);
        keyed.cloned().or_else(|| {
            (self.mode == ClientAuth::None && *self.anonymous.name == *name)
                .then(|| self.anonymous.clone())
        })
    }

    /// Every configured tenant.
    pub fn tenants(&self) -> impl Iterator<Item = &Tenant> {
        self.by_digest.values()
    }

    /// Finds the tenant a presented key belongs to.
    pub fn authenticate(&self, presented: &str) -> Option<&Tenant> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let (stored, tenant) = self.by_digest.get_key_value(&digest)?;
        bool::from(stored.ct_eq(&digest)).then_some(tenant)
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
    let tenant = match keys.mode {
        // No key is required, but a configured tenant's key still names
        // its tenant: the demo's synthetic tenants, or a team trying its
        // key against a local gateway, are counted as who they are.
        ClientAuth::None => presented_key(request.headers())
            .and_then(|k| keys.authenticate(k))
            .unwrap_or(&keys.anonymous)
            .clone(),
        ClientAuth::ApiKey => {
            let found = presented_key(request.headers()).and_then(|k| keys.authenticate(k));
            match found {
                Some(tenant) => tenant.clone(),
                None => {
                    let problem = if presented_key(request.headers()).is_some() {
                        "invalid x-api-key"
                    } else {
                        "missing API key: send it as x-api-key or Authorization: Bearer"
                    };
                    tracing::info!(problem, "client authentication failed");
                    if let Some(failures) = &keys.failures {
                        failures.inc();
                    }
                    return ApiError::Unauthenticated(problem).into_response();
                }
            }
        }
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
        KeyRing {
            mode: ClientAuth::ApiKey,
            by_digest: keys
                .iter()
                .map(|(name, key)| {
                    let d: [u8; 32] = Sha256::digest(key.as_bytes()).into();
                    let tenant = Tenant {
                        name: Arc::from(*name),
                        policy: Arc::default(),
                    };
                    (d, tenant)
                })
                .collect(),
            anonymous: Tenant::anonymous(),
            failures: None,
        }
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
