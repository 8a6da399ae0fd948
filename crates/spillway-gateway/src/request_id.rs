//! Every response carries a `request-id` header, as Anthropic's API does, so
//! a client's error report can be matched to Spillway's log line.
//!
//! The id is made here, in the outermost layer, and handlers read it from
//! the request extensions.

use std::sync::Arc;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderValue;
use rand::Rng;

/// The id of the request being served.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `req_` and 24 random base-62 characters (about 143 bits).
pub fn new_request_id() -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(28);
    id.push_str("req_");
    for _ in 0..24 {
        id.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    id
}

pub async fn assign_request_id(mut request: Request, next: Next) -> Response {
    let id = new_request_id();
    let header = HeaderValue::from_str(&id).expect("request ids are ASCII");
    request.extensions_mut().insert(RequestId(Arc::from(id)));
    let mut response = next.run(request).await;
    response.headers_mut().insert("request-id", header);
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_unique_and_well_formed() {
        let a = super::new_request_id();
        let b = super::new_request_id();
        assert_ne!(a, b);
        assert!(a.starts_with("req_") && a.len() == 28);
        assert!(a[4..].bytes().all(|c| c.is_ascii_alphanumeric()));
    }
}
