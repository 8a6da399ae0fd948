//! `rediss://`: how the client trusts the server, and telling an untrusted
//! certificate from an outage.
//!
//! The redis crate verifies a TLS server against the system's roots, or,
//! given a bundle, against that bundle alone. Spillway's rule is the same
//! for both stores (PostgreSQL's client adds `sslrootcert` to the system's
//! roots): a configured CA file is trusted *beside* the system's roots, so
//! a managed Redis with a public certificate and a private one with its
//! own CA are configured alike. So with a CA file the bundle is the
//! system's roots, re-encoded as PEM, followed by the file. There is no way
//! to turn verification off (no `#insecure`, and the crate is built
//! without that feature).
//!
//! A connection the server's certificate failed is not an outage to ride
//! out on the local share: it will fail the same way every time, and
//! sharing budgets silently stops. [`certificate_problem`] finds rustls's
//! verdict inside the client's error, so the store can stop start-up with
//! a message that says so.

use std::error::Error;
use std::path::Path;

use base64::Engine;

/// The PEM bundle of the system's roots and `ca_file`'s certificates.
pub(crate) fn roots_with(ca_file: &Path) -> Result<Vec<u8>, String> {
    let extra = std::fs::read(ca_file)
        .map_err(|e| format!("cannot read the CA file {}: {e}", ca_file.display()))?;
    let mut bundle = Vec::new();
    // Roots that do not load (a broken file in the system store) are left
    // out, as the system's own clients do.
    for cert in rustls_native_certs::load_native_certs().certs {
        let body = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        bundle.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for line in body.as_bytes().chunks(64) {
            bundle.extend_from_slice(line);
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    bundle.extend_from_slice(&extra);
    Ok(bundle)
}

/// rustls's reason for refusing the server's certificate, found anywhere
/// in `error`'s chain (clients wrap it in an I/O error). The gateway uses
/// it for PostgreSQL's client too.
pub fn certificate_problem(error: &(dyn Error + 'static)) -> Option<String> {
    let mut at: Option<&(dyn Error + 'static)> = Some(error);
    while let Some(e) = at {
        if let Some(tls @ rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>()
        {
            return Some(tls.to_string());
        }
        // An I/O error's `source` skips the error it wraps.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            at = Some(inner);
            continue;
        }
        at = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_certificate_is_found_inside_io_errors() {
        let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, refused);
        let redis = redis::RedisError::from(io);
        let problem = certificate_problem(&redis).expect("found");
        assert!(problem.contains("UnknownIssuer"), "{problem}");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(certificate_problem(&redis::RedisError::from(refused)), None);
    }

    #[test]
    fn the_bundle_ends_with_the_configured_ca() {
        let dir = std::env::temp_dir().join(format!("spillway-redis-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ca.pem");
        std::fs::write(
            &file,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let bundle = String::from_utf8(roots_with(&file).unwrap()).unwrap();
        assert!(bundle.ends_with("AA==\n-----END CERTIFICATE-----\n"));
        assert!(roots_with(&dir.join("missing.pem"))
            .unwrap_err()
            .contains("missing.pem"));
    }
}
