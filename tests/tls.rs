//! TLS on the listener, against the real binary in front of the simulator:
//! HTTPS with HTTP/1.1 and HTTP/2, plain HTTP told to use https://, the
//! connection defences inside TLS (handshake and head timeouts, 431, the
//! connection limit, shutdown), certificate reloads (files changed, SIGHUP)
//! that leave open connections alone, and client certificates as tenants.
//! Every certificate is made here (`support::certs`).

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;
use spillway_sim::{SimConfig, SimHandle, Simulator};
use support::binary::{free_port, serve, wait_healthy};
use support::certs::{get, https_client, peer_leaf, tls_connect, Ca, Leaf};
use support::{hello, HAIKU};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;

const TOKEN: &str = "tls-upstream-token";

/// A simulator and `spillway serve` with TLS in front of it.
struct Tls {
    _sim: SimHandle,
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    log: PathBuf,
    ca: Ca,
}

impl Tls {
    /// Serves with a certificate `server` signed by a CA of its own, plus
    /// the `[server]` keys in `server_keys` (auth included) and `rest`.
    async fn start(leaf_name: &str, server_keys: &str, rest: &str) -> Self {
        Self::start_in(
            tempfile::tempdir().unwrap(),
            Ca::new("spillway test CA"),
            leaf_name,
            server_keys,
            rest,
        )
        .await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        ca: Ca,
        leaf_name: &str,
        server_keys: &str,
        rest: &str,
    ) -> Self {
        let mut sim_config = SimConfig::vertex_defaults();
        sim_config.bearer_token = Some(TOKEN.into());
        let sim = Simulator::start(sim_config, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let leaf = ca.server(leaf_name, 1);
        let (cert, key) = leaf.write(dir.path(), "server");
        let port = free_port();
        let config = dir.path().join("spillway.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
listen = "127.0.0.1:{port}"
log_format = "json"
tls_cert = "{cert}"
tls_key = "{key}"
{server_keys}
[upstream]
project = "spillway-tls"
regional_url = "{sim}"
global_url = "{sim}"
auth = "static"
token = "{TOKEN}"
[batch]
enabled = false
{rest}"#,
                cert = cert.display(),
                key = key.display(),
                sim = sim.base_url(),
            ),
        )
        .unwrap();
        let log = dir.path().join("spillway.log");
        let mut child = serve(&config, &log);
        let this_url = format!("https://127.0.0.1:{port}");
        wait_healthy(&https_client(&ca, None), &this_url, &mut child).await;
        Self {
            _sim: sim,
            child,
            port,
            dir,
            log,
            ca,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn metrics(&self) -> String {
        https_client(&self.ca, None)
            .get(format!("{}/metrics", self.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sends `signal` to the process.
    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// The leaf a new connection is served.
    async fn served_leaf(&self) -> Vec<u8> {
        peer_leaf(&tls_connect(self.port, &self.ca, None).await.unwrap())
    }

    /// Polls new connections until they are served `leaf` (or panics).
    async fn wait_for_leaf(&self, leaf: &Leaf) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.served_leaf().await != leaf.der {
            assert!(
                Instant::now() < deadline,
                "the new certificate was never served\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `series` in a scrape (0 when absent).
fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Polls the metrics until `series` reaches `at_least`.
async fn wait_for_series(tls: &Tls, series: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if value(&tls.metrics().await, series) >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached {at_least}\n{}",
            tls.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until the peer closes (or errors); what was read, as text. A
/// peer that keeps the connection open past 10 s fails the test.
async fn read_to_close<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(n) = stream.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&out).into_owned()
}

/// An Anthropic-shaped error answer written below the router: status,
/// `request-id`, and the error's type; returns its message.
fn shaped(raw: &str, status: u16, kind: &str) -> String {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {raw:?}"));
    assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{raw}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nrequest-id: req_"),
        "{raw}"
    );
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    v["error"]["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn https_serves_http1_and_http2_and_plain_http_is_told_to_use_https() {
    let tls = Tls::start("spillway", "auth = \"none\"", "").await;
    // HTTP/2 by ALPN (reqwest offers h2 first), and HTTP/1.1.
    let h2 = https_client(&tls.ca, None);
    let r = h2
        .post(format!("{}/v1/messages", tls.url()))
        .json(&hello(HAIKU))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "message", "{body}");
    let h1 = spillway_gateway::tls::http_client_builder()
        .tls_certs_only([reqwest::Certificate::from_pem(tls.ca.pem.as_bytes()).unwrap()])
        .http1_only()
        .build()
        .unwrap();
    let r = h1
        .post(format!("{}/v1/messages", tls.url()))
        .json(&hello(HAIKU))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_11);
    assert_eq!(r.status(), 200);

    // Plain HTTP on the TLS port: a plain answer that says what to do.
    let mut tcp = TcpStream::connect(("127.0.0.1", tls.port)).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let raw = read_to_close(&mut tcp).await;
    let message = shaped(&raw, 400, "invalid_request_error");
    assert!(message.contains("https://"), "{message}");
    // And a client that does not trust the certificate is refused.
    let stranger = https_client(&Ca::new("someone else"), None);
    assert!(stranger
        .get(format!("{}/healthz", tls.url()))
        .send()
        .await
        .is_err());
    let metrics = tls.metrics().await;
    assert_eq!(
        value(
            &metrics,
            "spillway_connections_refused_total{reason=\"plain_http\"}"
        ),
        1.0
    );
    assert!(
        value(
            &metrics,
            "spillway_connections_refused_total{reason=\"tls_handshake\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn the_connection_defences_hold_inside_tls() {
    let tls = Tls::start(
        "spillway",
        "auth = \"none\"\nheader_read_timeout_ms = 600\nmax_connections = 2\nshutdown_grace_ms = 2000",
        "",
    )
    .await;
    // A handshake that never starts, and one that stalls, are cut at the
    // head timeout (and free their slots: the connections below get one).
    let started = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", tls.port)).await.unwrap();
    let mut stalled = TcpStream::connect(("127.0.0.1", tls.port)).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    assert_eq!(read_to_close(&mut silent).await, "");
    read_to_close(&mut stalled).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // A head that stops half-way gets a shaped 408, inside TLS.
    let mut slow = tls_connect(tls.port, &tls.ca, None).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-a: ")
        .await
        .unwrap();
    shaped(&read_to_close(&mut slow).await, 408, "timeout_error");
    drop(slow);

    // A head past the HTTP parser's limit: hyper's 431, reshaped, in TLS.
    let mut big = tls_connect(tls.port, &tls.ca, None).await.unwrap();
    let huge = "a".repeat(40 * 1024);
    big.write_all(format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {huge}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    shaped(&read_to_close(&mut big).await, 431, "invalid_request_error");
    drop(big);

    // Past max_connections: the 503 is written after a handshake of its
    // own. Two kept-alive connections hold both slots (a closing one may
    // still hold its slot for a moment: retried until both are served).
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "two connections were never served\n{}",
            tls.log()
        );
        let mut c = tls_connect(tls.port, &tls.ca, None).await.unwrap();
        let (status, _, _) = get(&mut c, "/healthz").await.unwrap();
        if status == 200 {
            held.push(c);
        } else {
            assert_eq!(status, 503);
        }
    }
    let mut third = tls_connect(tls.port, &tls.ca, None).await.unwrap();
    let raw = read_to_close(&mut third).await;
    let message = shaped(&raw, 503, "overloaded_error");
    assert!(message.contains("max_connections"), "{message}");
    assert!(raw.contains("retry-after: 1"), "{raw}");

    // Shutdown: an idle kept-alive TLS connection is closed and the
    // process exits within the grace.
    drop(third);
    let mut idle = held.pop().unwrap();
    tls.signal(libc::SIGTERM);
    read_to_close(&mut idle).await;
    let mut tls = tls;
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = tls.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "no exit after SIGTERM\n{}",
            tls.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}\n{}", tls.log());
}

#[tokio::test]
async fn changed_certificate_files_serve_new_connections_and_open_ones_keep_working() {
    let tls = Tls::start("spillway old", "auth = \"none\"\ntls_reload_ms = 100", "").await;
    let old = tls.served_leaf().await;
    let mut kept = tls_connect(tls.port, &tls.ca, None).await.unwrap();
    assert_eq!(get(&mut kept, "/healthz").await.unwrap().0, 200);

    let new = tls.ca.server("spillway new", 2);
    new.write(tls.dir.path(), "server");
    tls.wait_for_leaf(&new).await;
    assert_ne!(old, new.der);
    // The connection opened before still works, on the certificate it had.
    assert_eq!(get(&mut kept, "/healthz").await.unwrap().0, 200);
    assert_eq!(peer_leaf(&kept), old);
    wait_for_series(
        &tls,
        "spillway_tls_certificate_reloads_total{outcome=\"loaded\"}",
        1.0,
    )
    .await;

    // A key that does not match the certificate is refused; the pair in
    // use stays.
    let other = tls.ca.server("spillway other", 3);
    support::certs::replace(
        &tls.dir.path().join("server.pem"),
        other.cert_pem.as_bytes(),
    );
    wait_for_series(
        &tls,
        "spillway_tls_certificate_reloads_total{outcome=\"refused\"}",
        1.0,
    )
    .await;
    assert_eq!(tls.served_leaf().await, new.der);
    assert!(tls.log().contains("do not load"), "{}", tls.log());
    // ... and once the key follows, the pair loads.
    support::certs::replace(&tls.dir.path().join("server.key"), other.key_pem.as_bytes());
    tls.wait_for_leaf(&other).await;
    assert_eq!(get(&mut kept, "/healthz").await.unwrap().0, 200);
}

#[tokio::test]
async fn sighup_reloads_the_certificate() {
    // No polling: only the signal can load the new pair.
    let tls = Tls::start("spillway before", "auth = \"none\"\ntls_reload_ms = 0", "").await;
    let mut kept = tls_connect(tls.port, &tls.ca, None).await.unwrap();
    assert_eq!(get(&mut kept, "/healthz").await.unwrap().0, 200);
    let before = peer_leaf(&kept);
    let after = tls.ca.server("spillway after", 2);
    after.write(tls.dir.path(), "server");
    assert_eq!(
        tls.served_leaf().await,
        before,
        "not reloaded before the signal"
    );
    tls.signal(libc::SIGHUP);
    tls.wait_for_leaf(&after).await;
    assert_eq!(get(&mut kept, "/healthz").await.unwrap().0, 200);
    assert_eq!(peer_leaf(&kept), before);
}

/// `[server]` keys for client certificates, and tenants: `certified` by a
/// certificate (listed as openssl prints fingerprints), `keyed` by a key.
fn mtls_config(mode: &str, ca_file: &std::path::Path, mapped: &Leaf) -> (String, String) {
    (
        format!(
            "auth = \"api_key\"\ntls_client_ca = \"{}\"\nclient_cert = \"{mode}\"",
            ca_file.display()
        ),
        format!(
            "[tenants.certified]\nclient_cert_sha256 = [\"{}\"]\n[tenants.keyed]\nkey_sha256 = \"{}\"\n",
            mapped.openssl_fingerprint(),
            spillway_gateway::auth::hash_key("sk-spw-keyed"),
        ),
    )
}

async fn ask(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
) -> reqwest::Result<reqwest::Response> {
    let mut request = client
        .post(format!("{url}/v1/messages"))
        .json(&hello(HAIKU));
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    request.send().await
}

#[tokio::test]
async fn a_client_certificate_is_its_tenant_and_keys_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let clients = Ca::new("client CA");
    let ca_file = clients.write(dir.path(), "clients.pem");
    let mapped = clients.client("search-service", 10);
    let unmapped = clients.client("someone", 11);
    let (server, tenants) = mtls_config("optional", &ca_file, &mapped);
    // Health checks present no certificate: optional mode lets them in.
    let tls = Tls::start_in(dir, Ca::new("server CA"), "spillway", &server, &tenants).await;
    let url = tls.url();

    let r = ask(&https_client(&tls.ca, Some(&mapped)), &url, None)
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // The SDKs always send some key: with a mapped certificate, an unknown
    // one does not matter.
    let r = ask(
        &https_client(&tls.ca, Some(&mapped)),
        &url,
        Some("sk-ignored"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);

    let r = ask(&https_client(&tls.ca, Some(&unmapped)), &url, None)
        .await
        .unwrap();
    let message = support::expect_error(r, 401, "authentication_error").await;
    assert!(message.contains(&unmapped.sha256()), "{message}");
    // Keys keep working, with or without a certificate.
    let r = ask(&https_client(&tls.ca, None), &url, Some("sk-spw-keyed"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = ask(
        &https_client(&tls.ca, Some(&unmapped)),
        &url,
        Some("sk-spw-keyed"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let r = ask(&https_client(&tls.ca, None), &url, None).await.unwrap();
    support::expect_error(r, 401, "authentication_error").await;
    // A certificate from another CA fails the handshake.
    let forged = Ca::new("client CA").client("search-service", 10);
    assert!(ask(&https_client(&tls.ca, Some(&forged)), &url, None)
        .await
        .is_err());

    let metrics = tls.metrics().await;
    let ok = |tenant: &str| {
        value(
            &metrics,
            &format!(
                "spillway_requests_total{{model=\"{HAIKU}\",outcome=\"ok\",tenant=\"{tenant}\"}}"
            ),
        )
    };
    assert_eq!(ok("certified"), 2.0, "{metrics}");
    assert_eq!(ok("keyed"), 2.0, "{metrics}");
}

#[tokio::test]
async fn required_client_certificates_refuse_handshakes_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let clients = Ca::new("client CA");
    let ca_file = clients.write(dir.path(), "clients.pem");
    let mapped = clients.client("search-service", 10);
    let (server, tenants) = mtls_config("required", &ca_file, &mapped);
    // The start-up health check needs a certificate too: start with
    // optional, then restart the same config as required.
    let tls = Tls::start_in(
        dir,
        Ca::new("server CA"),
        "spillway",
        &server.replace("required", "optional"),
        &tenants,
    )
    .await;
    let config = tls.dir.path().join("spillway.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("client_cert = \"optional\"", "client_cert = \"required\""),
    )
    .unwrap();
    let mut tls = tls;
    let _ = tls.child.kill();
    let _ = tls.child.wait();
    tls.child = serve(&config, &tls.log);
    let url = tls.url();
    let with_cert = https_client(&tls.ca, Some(&mapped));
    wait_healthy(&with_cert, &url, &mut tls.child).await;

    assert_eq!(ask(&with_cert, &url, None).await.unwrap().status(), 200);
    // No certificate: the handshake is refused, no HTTP answer at all.
    let refused = ask(&https_client(&tls.ca, None), &url, Some("sk-spw-keyed")).await;
    assert!(refused.is_err(), "{:?}", refused.map(|r| r.status()));
    let mut raw = tls_connect(tls.port, &tls.ca, None).await;
    if let Ok(stream) = &mut raw {
        // TLS 1.3: the client finishes first; the refusal arrives as an alert.
        assert!(get(stream, "/healthz").await.is_err());
    }
    let metrics = read_answer_metrics(&with_cert, &url).await;
    assert!(
        value(
            &metrics,
            "spillway_connections_refused_total{reason=\"tls_handshake\"}"
        ) >= 1.0
    );
}

async fn read_answer_metrics(client: &reqwest::Client, url: &str) -> String {
    client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
