//! A stand-in for Google's OAuth token endpoint (`https://oauth2.googleapis.com/token`).
//!
//! A service account authenticates with the **JWT-bearer grant** (RFC 7523):
//! it signs a JWT with its private key and posts it as a form:
//!
//! ```text
//! POST /token
//! Content-Type: application/x-www-form-urlencoded
//!
//! grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=<header>.<claims>.<signature>
//! ```
//!
//! The claims must contain `iss` (the service account email), `scope`
//! (space-separated OAuth scopes), `aud` (the token URI) and `exp` (Unix
//! seconds, at most an hour ahead). Google answers
//! `{"access_token":"ya29...","expires_in":3599,"token_type":"Bearer"}`.
//!
//! The simulator decodes the claims (base64url, padded or not) and checks
//! that those four fields are there with the right types and that `exp` is
//! not in the past, but does **not** verify the signature: there is no key
//! registry to check against. A malformed assertion gets Google's
//! `400 {"error":"invalid_grant",...}`; a wrong grant type gets
//! `400 {"error":"unsupported_grant_type",...}`. Good assertions get a fresh
//! `sim-oauth-<random>` token, valid for 3600 s, which the predict routes
//! then accept in addition to `SimConfig::bearer_token`.
//!
//! **Revocation.** `SimHandle::rotate_token` (control API `POST
//! /_sim/rotate-token`) forgets every token issued so far, as if Google had
//! revoked them: they then get Google's 401 `UNAUTHENTICATED`. Tokens issued
//! afterwards are valid, so a client that refreshes its token recovers.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use rand::distr::{Alphanumeric, SampleString};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::faults::lock;
use crate::state::SharedState;

/// The grant type of the service-account flow.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Issued tokens kept valid; beyond this the set is cleared (a benchmark
/// hammering `/token` must not grow memory without bound).
const MAX_VALID_TOKENS: usize = 100_000;

const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Debug, Default)]
pub(crate) struct OAuthState {
    valid: Mutex<HashSet<String>>,
    issued: AtomicU64,
}

impl OAuthState {
    pub(crate) fn issue(&self) -> String {
        let mut token = String::from("sim-oauth-");
        Alphanumeric.append_string(&mut rand::rng(), &mut token, 32);
        {
            let mut valid = lock(&self.valid);
            if valid.len() >= MAX_VALID_TOKENS {
                valid.clear();
            }
            valid.insert(token.clone());
        }
        self.issued.fetch_add(1, Ordering::Relaxed);
        token
    }

    pub(crate) fn is_valid(&self, token: &str) -> bool {
        token.starts_with("sim-oauth-") && lock(&self.valid).contains(token)
    }

    pub(crate) fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Revokes every token issued so far (later ones are valid).
    pub(crate) fn revoke_all(&self) {
        let old = std::mem::take(&mut *lock(&self.valid));
        drop(old);
    }

    /// Resets the issued count; already issued tokens stay valid.
    pub(crate) fn reset_count(&self) {
        self.issued.store(0, Ordering::Relaxed);
    }
}

/// Why an assertion was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum JwtError {
    /// Not three base64url parts with JSON header and claims.
    Malformed(&'static str),
    /// A required claim is missing or has the wrong type.
    MissingClaim(&'static str),
    /// `exp` is in the past.
    Expired,
}

/// Checks a JWT-bearer assertion's shape and claims (not its signature).
/// `now` is Unix seconds. Returns the claims.
pub fn check_assertion(jwt: &str, now: i64) -> Result<Value, JwtError> {
    let mut parts = jwt.split('.');
    let (Some(header), Some(claims), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("a JWT has three dot-separated parts"));
    };
    let decode = |part: &str| -> Option<Value> {
        let bytes = B64URL.decode(part).ok()?;
        serde_json::from_slice::<Value>(&bytes).ok()
    };
    let header = decode(header).ok_or(JwtError::Malformed("header is not base64url JSON"))?;
    if !header.is_object() {
        return Err(JwtError::Malformed("header is not a JSON object"));
    }
    let claims = decode(claims).ok_or(JwtError::Malformed("claims are not base64url JSON"))?;
    for name in ["iss", "scope", "aud"] {
        if !claims.get(name).is_some_and(Value::is_string) {
            return Err(JwtError::MissingClaim(name));
        }
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_f64)
        .ok_or(JwtError::MissingClaim("exp"))?;
    // Allow a little clock skew, as Google does.
    if exp < (now - 300) as f64 {
        return Err(JwtError::Expired);
    }
    Ok(claims)
}

#[derive(Deserialize)]
pub(crate) struct TokenForm {
    grant_type: Option<String>,
    assertion: Option<String>,
}

fn oauth_error(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

/// `POST /token`.
pub(crate) async fn token_endpoint(
    State(st): State<SharedState>,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return oauth_error("invalid_request", "Request body must be a form");
    };
    if form.grant_type.as_deref() != Some(JWT_BEARER_GRANT) {
        return oauth_error("unsupported_grant_type", "Invalid grant_type");
    }
    let Some(assertion) = form.assertion else {
        return oauth_error("invalid_request", "Missing required parameter: assertion");
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if let Err(e) = check_assertion(&assertion, now) {
        let description = match e {
            JwtError::Malformed(m) => format!("Invalid JWT: {m}"),
            JwtError::MissingClaim(c) => format!("Invalid JWT: missing claim {c}"),
            JwtError::Expired => "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.".into(),
        };
        return oauth_error("invalid_grant", &description);
    }
    let token = st.oauth.issue();
    Json(json!({"access_token": token, "expires_in": 3600, "token_type": "Bearer"})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &Value, padded: bool) -> String {
        let enc = |v: &str| {
            let s = base64::engine::general_purpose::URL_SAFE.encode(v);
            if padded {
                s
            } else {
                s.trim_end_matches('=').to_string()
            }
        };
        format!(
            "{}.{}.{}",
            enc(r#"{"alg":"RS256","typ":"JWT"}"#),
            enc(&claims.to_string()),
            enc("sig")
        )
    }

    #[test]
    fn assertion_checks() {
        let good = json!({"iss": "sa@p.iam.gserviceaccount.com", "scope": "https://www.googleapis.com/auth/cloud-platform", "aud": "http://x/token", "exp": 2000, "iat": 1000});
        assert!(check_assertion(&jwt(&good, true), 1500).is_ok());
        assert!(check_assertion(&jwt(&good, false), 1500).is_ok());
        assert_eq!(
            check_assertion(&jwt(&good, false), 9999),
            Err(JwtError::Expired)
        );
        let mut no_scope = good.clone();
        no_scope.as_object_mut().unwrap().remove("scope");
        assert_eq!(
            check_assertion(&jwt(&no_scope, false), 1500),
            Err(JwtError::MissingClaim("scope"))
        );
        assert!(matches!(
            check_assertion("a.b", 0),
            Err(JwtError::Malformed(_))
        ));
        assert!(matches!(
            check_assertion("a.b.c.d", 0),
            Err(JwtError::Malformed(_))
        ));
        assert!(matches!(
            check_assertion("!!.??.x", 0),
            Err(JwtError::Malformed(_))
        ));
        assert!(matches!(
            check_assertion("", 0),
            Err(JwtError::Malformed(_))
        ));
    }

    #[test]
    fn issued_tokens_are_valid() {
        let s = OAuthState::default();
        let t = s.issue();
        assert!(t.starts_with("sim-oauth-"));
        assert!(s.is_valid(&t));
        assert!(!s.is_valid("sim-oauth-nope"));
        assert_eq!(s.issued(), 1);
        s.revoke_all();
        assert!(!s.is_valid(&t));
        let t2 = s.issue();
        assert!(s.is_valid(&t2));
    }
}
