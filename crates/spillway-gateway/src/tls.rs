//! Outbound TLS: rustls with the *ring* crypto provider, installed once.
//!
//! gcp_auth already builds *ring* for its own HTTPS client, so reqwest uses
//! it too (`rustls-no-provider`) rather than compiling AWS-LC as a second
//! crypto library: that was ~48 s of CPU in every cold build
//! (BENCHMARKS.md, "First build"). reqwest then needs a process-wide
//! provider before its first client is built, and panics without one; so
//! every HTTP client in the workspace, tests included, comes from
//! [`http_client_builder`], which installs it first.
//!
//! The stores' TLS (`rediss://`, PostgreSQL's `sslmode`) uses the same
//! provider. A server certificate a store's client does not trust is a
//! setup error, not an outage: [`certificate_problem`] finds rustls's
//! verdict in a client's error so start-up can stop and say so.

use std::sync::Once;

/// Makes *ring* the process's rustls provider (idempotent; a provider
/// installed earlier by someone else is left in place).
pub fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// `reqwest::Client::builder()`, with the crypto provider installed.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
}

/// A default client (what `reqwest::Client::new()` would give).
pub fn http_client() -> reqwest::Client {
    http_client_builder()
        .build()
        .expect("rustls with ring initializes")
}

/// rustls's reason for refusing a server's certificate, if that is what
/// `error` (from any store's client) comes down to.
pub fn certificate_problem(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    spillway_redis::certificate_problem(error)
}

#[cfg(test)]
mod tests {
    #[test]
    fn clients_build_after_the_provider_is_installed() {
        let _client = super::http_client();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
