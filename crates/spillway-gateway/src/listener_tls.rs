//! TLS on the listener: the server's certificate, its reload, and client
//! certificates as a credential.
//!
//! Spillway can terminate TLS itself (`server.tls_cert` / `server.tls_key`)
//! rather than only behind a proxy, so the hop from a client to the gateway
//! is encrypted even where no mesh or load balancer does it. The pieces:
//!
//! - **One rustls `ServerConfig`, on *ring*** (the provider the rest of the
//!   process uses: see [`crate::tls`]), offering HTTP/2 and HTTP/1.1 by
//!   ALPN. hyper's auto builder still tells the two apart by the bytes the
//!   client sends, so ALPN only lets clients pick `h2` without guessing.
//! - **The certificate is reloaded without a restart.** The config does not
//!   hold the certificate: a [`ResolvesServerCert`] hands every new
//!   handshake the `Arc<CertifiedKey>` in force, and a reload swaps that
//!   `Arc`. Connections already open keep the keys they agreed; new ones
//!   get the new certificate. The files are read again every
//!   `server.tls_reload_ms` (their bytes compared, so a symlink swap as
//!   Kubernetes does it counts) and on SIGHUP. A pair that does not load
//!   (a half-written file, a key that does not match the certificate) is
//!   logged once and the pair in use is kept: a bad rotation never takes
//!   the listener down, and the next good one is picked up. (A read lock
//!   per handshake, not `arc-swap`: beside a handshake it costs nothing.)
//! - **Client certificates (mTLS) are a tenant credential.** With
//!   `server.tls_client_ca`, clients are asked for a certificate
//!   (`server.client_cert = "optional"`) or must present one (`"required"`:
//!   the handshake fails otherwise); rustls verifies it against that CA
//!   only (chain, validity, client-auth usage) during the handshake. The
//!   accept loop hands the verified leaf's SHA-256 to every request of the
//!   connection as a [`ClientCertificate`] request extension, and `auth`
//!   maps it to a tenant by `tenants.NAME.client_cert_sha256`. The CA file
//!   is read at start (a new CA needs a restart).
//!
//! Why fingerprints and not subjects: a subject (`CN=search`) is only as
//! unique as the CA's issuing discipline — every certificate the CA ever
//! signs with that name is that tenant — and a distinguished name has
//! several renderings (attribute order, escaping, multi-valued names), so
//! matching its text is fragile. A fingerprint names one certificate
//! exactly, is checked like a key digest (hashed, then compared in constant
//! time), and needs no X.509 parser. The price is one config line per
//! renewal: list the old and the new fingerprint while rotating (SIGHUP
//! applies tenant changes).
//!
//! The defences of `connections` hold over TLS too: a handshake holds a
//! connection slot and must finish within `server.header_read_timeout_ms`
//! (so a slow handshake cannot pin a slot), the connection-limit 503 and the
//! 408/431 answers are written inside the TLS session, and plain HTTP sent
//! to the TLS port gets a plain-text 400 that says to use `https://`
//! ([`looks_like_tls`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::config::{ClientCertMode, ServerSettings};

/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Whether the first byte a client sent opens a TLS handshake. Anything
/// else on the TLS port (an HTTP method's letters, most likely) is answered
/// in plain text that it needs `https://`.
pub fn looks_like_tls(first: u8) -> bool {
    first == TLS_HANDSHAKE_RECORD
}

/// The verified client certificate of a connection, as every request on it
/// carries it (a request extension set by the accept loop).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ClientCertificate {
    /// SHA-256 of the leaf certificate's DER.
    pub sha256: [u8; 32],
}

impl ClientCertificate {
    fn of(der: &[u8]) -> Self {
        Self {
            sha256: Sha256::digest(der).into(),
        }
    }

    /// Lower-case hex, as `client_cert_sha256` may list it.
    pub fn fingerprint(&self) -> String {
        hex::encode(self.sha256)
    }
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientCertificate(sha256:{})", self.fingerprint())
    }
}

/// Why the listener's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct TlsSetupError {
    key: &'static str,
    problem: String,
}

fn setup_error(key: &'static str, problem: impl Into<String>) -> TlsSetupError {
    TlsSetupError {
        key,
        problem: problem.into(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, from PEM.
fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsSetupError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            setup_error(
                "server.tls_cert",
                format!("not a PEM certificate chain: {e}"),
            )
        })?;
    if chain.is_empty() {
        return Err(setup_error(
            "server.tls_cert",
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        setup_error(
            "server.tls_key",
            format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) found: {e}"),
        )
    })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => setup_error(
            "server.tls_key",
            "the private key does not match the certificate in server.tls_cert",
        ),
        e => setup_error("server.tls_key", format!("cannot use the key pair: {e}")),
    })
}

/// Hands every handshake the certificate in force.
struct Current(RwLock<Arc<CertifiedKey>>);

impl Current {
    fn get(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn set(&self, key: CertifiedKey) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
    }
}

impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Current(CertifiedKey)")
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The files' bytes: the pair in force, and what was read last (`None`:
/// a file could not be read), so a change is acted on (and logged) once.
struct LastRead {
    in_use: (Vec<u8>, Vec<u8>),
    seen: Option<(Vec<u8>, Vec<u8>)>,
}

/// What one look at the certificate files found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files hold the pair in use, or what was refused last time.
    Unchanged,
    /// A new pair is in use for new connections.
    Loaded { sha256: String },
    /// The files changed but do not load; the pair in use is kept.
    Refused(String),
}

/// The listener's TLS: acceptors for new connections and the certificate
/// in force.
pub struct ListenerTls {
    serving: TlsAcceptor,
    refusing: TlsAcceptor,
    current: Arc<Current>,
    cert_path: PathBuf,
    key_path: PathBuf,
    last: Mutex<LastRead>,
    reloads: Option<prometheus::IntCounterVec>,
}

impl fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerTls")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path)
        .map_err(|e| setup_error(key, format!("cannot read {}: {e}", path.display())))
}

fn client_verifier(
    settings: &ServerSettings,
) -> Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>, TlsSetupError> {
    if settings.client_cert == ClientCertMode::None || settings.tls_client_ca.is_empty() {
        return Ok(None);
    }
    let key = "server.tls_client_ca";
    let pem = read(key, Path::new(&settings.tls_client_ca))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| setup_error(key, format!("not a PEM certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| setup_error(key, format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(setup_error(key, "holds no PEM CA certificate"));
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    let builder = match settings.client_cert {
        ClientCertMode::Optional => builder.allow_unauthenticated(),
        _ => builder,
    };
    builder.build().map(Some).map_err(|e| {
        setup_error(
            key,
            format!("cannot verify client certificates with it: {e}"),
        )
    })
}

impl ListenerTls {
    /// The listener's TLS as configured, or `None` for plain HTTP.
    /// `reloads` counts certificate reloads by outcome.
    pub fn from_settings(
        settings: &ServerSettings,
        reloads: Option<prometheus::IntCounterVec>,
    ) -> Result<Option<Self>, TlsSetupError> {
        if !settings.tls() {
            return Ok(None);
        }
        let cert_path = PathBuf::from(&settings.tls_cert);
        let key_path = PathBuf::from(&settings.tls_key);
        let cert_pem = read("server.tls_cert", &cert_path)?;
        let key_pem = read("server.tls_key", &key_path)?;
        let current = Arc::new(Current(RwLock::new(Arc::new(certified_key(
            &cert_pem, &key_pem,
        )?))));
        let verifier = client_verifier(settings)?;
        let config = |alpn: &[&[u8]]| -> Result<Arc<ServerConfig>, TlsSetupError> {
            let builder = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| setup_error("server.tls_cert", e.to_string()))?;
            let builder = match &verifier {
                Some(v) => builder.with_client_cert_verifier(Arc::clone(v)),
                None => builder.with_no_client_auth(),
            };
            let mut config =
                builder.with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        let serving = TlsAcceptor::from(config(&[b"h2", b"http/1.1"])?);
        // The connection-limit 503 is HTTP/1.1 text: its handshake offers
        // only that (a client offering only h2 is refused by the handshake).
        let refusing = TlsAcceptor::from(config(&[b"http/1.1"])?);
        if let Some(reloads) = &reloads {
            for outcome in ["loaded", "refused"] {
                reloads.with_label_values(&[outcome]);
            }
        }
        let this = Self {
            serving,
            refusing,
            current,
            cert_path,
            key_path,
            last: Mutex::new(LastRead {
                seen: Some((cert_pem.clone(), key_pem.clone())),
                in_use: (cert_pem, key_pem),
            }),
            reloads,
        };
        tracing::info!(
            cert = %this.cert_path.display(),
            sha256 = %this.fingerprint(),
            client_cert = ?settings.client_cert,
            "listener TLS: HTTPS (HTTP/2 and HTTP/1.1)"
        );
        Ok(Some(this))
    }

    /// The acceptor for connections to serve.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.serving
    }

    /// The acceptor for a connection refused at the connection limit.
    pub fn refusing_acceptor(&self) -> &TlsAcceptor {
        &self.refusing
    }

    /// SHA-256 of the leaf certificate in force, lower-case hex.
    pub fn fingerprint(&self) -> String {
        let current = self.current.get();
        current
            .cert
            .first()
            .map(|c| hex::encode(Sha256::digest(c.as_ref())))
            .unwrap_or_default()
    }

    /// Whether the files are still the ones this was built from (a SIGHUP
    /// that names other files needs a restart to use them).
    pub fn serves(&self, settings: &ServerSettings) -> bool {
        Path::new(&settings.tls_cert) == self.cert_path
            && Path::new(&settings.tls_key) == self.key_path
    }

    /// Reads the files and, if they hold a new pair that loads, puts it in
    /// force for new connections. Logs what it did (a refused pair once).
    pub fn reload(&self) -> Reload {
        let files = read("server.tls_cert", &self.cert_path)
            .and_then(|c| Ok((c, read("server.tls_key", &self.key_path)?)));
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = match files {
            // A file being replaced may be missing for a moment: said once,
            // like a pair that does not load.
            Err(_) if last.seen.is_none() => return Reload::Unchanged,
            Err(e) => {
                last.seen = None;
                Reload::Refused(e.to_string())
            }
            Ok(files) if last.seen.as_ref() == Some(&files) => return Reload::Unchanged,
            Ok(files) => {
                last.seen = Some(files.clone());
                if files == last.in_use {
                    return Reload::Unchanged;
                }
                match certified_key(&files.0, &files.1) {
                    Ok(pair) => {
                        last.in_use = files;
                        self.current.set(pair);
                        Reload::Loaded {
                            sha256: self.fingerprint(),
                        }
                    }
                    Err(e) => Reload::Refused(e.to_string()),
                }
            }
        };
        drop(last);
        match &outcome {
            Reload::Loaded { sha256 } => {
                tracing::info!(cert = %self.cert_path.display(), sha256 = %sha256, "listener TLS: new certificate in force for new connections");
                self.count("loaded");
            }
            Reload::Refused(problem) => {
                tracing::error!(problem = %problem, sha256_in_use = %self.fingerprint(), "listener TLS: the new certificate files do not load; keeping the certificate in use");
                self.count("refused");
            }
            Reload::Unchanged => {}
        }
        outcome
    }

    fn count(&self, outcome: &str) {
        if let Some(reloads) = &self.reloads {
            reloads.with_label_values(&[outcome]).inc();
        }
    }

    /// Looks at the files every `every` until `stop` resolves.
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = ticks.tick() => {}
            }
            let this = Arc::clone(&self);
            // File reads block; a slow volume must not stall a runtime thread.
            let _ = tokio::task::spawn_blocking(move || this.reload()).await;
        }
    }
}

/// The verified client certificate of a TLS connection, if it sent one.
pub fn peer_certificate(conn: &rustls::ServerConnection) -> Option<ClientCertificate> {
    conn.peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| ClientCertificate::of(leaf.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_handshake_record_is_tls() {
        assert!(looks_like_tls(0x16));
        for plain in *b"GPHDOC" {
            assert!(!looks_like_tls(plain));
        }
    }

    #[test]
    fn fingerprints_print_as_lower_hex() {
        let c = ClientCertificate::of(b"der");
        assert_eq!(c.fingerprint(), hex::encode(Sha256::digest(b"der")));
        assert!(format!("{c:?}").contains(&c.fingerprint()));
    }

    #[test]
    fn a_pair_that_is_not_pem_names_its_key() {
        let err = certified_key(b"nothing", b"nothing")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("server.tls_cert: "), "{err}");
    }
}
