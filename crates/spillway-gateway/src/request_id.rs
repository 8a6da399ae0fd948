//! Request ids: `req_` and 24 random base-62 characters, as Anthropic's API
//! gives them. The [`observer`](crate::observer) layer assigns one to every
//! request and returns it as `request-id`; batch items get one per attempt.

use std::fmt;
use std::sync::Arc;

/// The id of the request being served (a request extension for handlers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(Arc<str>);

impl RequestId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for RequestId {
    fn from(id: String) -> Self {
        Self(Arc::from(id))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `req_` and 24 random base-62 characters (about 143 bits).
pub fn new_request_id() -> String {
    crate::ids::random_id("req_", 24)
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
