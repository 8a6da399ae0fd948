//! TLS to the stores, against the real binary and real servers started
//! here: a `redis-server` that speaks only TLS (`rediss://`), and a
//! PostgreSQL instance of the test's own with `ssl=on`, each with a server
//! certificate made at test time. Verified connections work; a server whose
//! certificate the gateway does not trust stops start-up at once, with one
//! line naming the store and the untrusted certificate, and no password.

use std::net::TcpStream as StdTcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use spillway_sim::{SimConfig, SimHandle, Simulator};
use support::binary::{free_port, serve, wait_healthy};
use support::certs::Ca;
use support::{hello, HAIKU};

mod support;

const TOKEN: &str = "tls-stores-upstream-token";

/// A child process killed (and reaped) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let started = Instant::now();
    while StdTcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited: {status}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what} did not start on {port}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `redis-server` on a free port, TLS only (`--port 0`), serving a
/// certificate `ca` signed; clients are not asked for certificates.
fn redis_tls(dir: &Path, ca: &Ca) -> (Killed, u16) {
    let (cert, key) = ca.server("redis", 1).write(dir, "redis");
    let ca_file = ca.write(dir, "redis-ca.pem");
    let port = free_port();
    let mut child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&ca_file)
        .args(["--tls-auth-clients", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (apt-get install redis-server), built with TLS");
    wait_for_port(port, "redis-server --tls-port", &mut child);
    (Killed(child), port)
}

async fn simulator() -> SimHandle {
    let mut sim_config = SimConfig::vertex_defaults();
    sim_config.bearer_token = Some(TOKEN.into());
    Simulator::start(sim_config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// A `spillway serve` config on `port` in front of `sim`, plus `rest`.
fn config(dir: &Path, port: u16, sim: &SimHandle, rest: &str) -> PathBuf {
    let path = dir.join("spillway.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
auth = "none"
[upstream]
project = "spillway-tls"
regional_url = "{sim}"
global_url = "{sim}"
auth = "static"
token = "{TOKEN}"
{rest}"#,
            sim = sim.base_url()
        ),
    )
    .unwrap();
    path
}

/// Runs `spillway serve` expecting it to refuse to start: its exit status
/// and what it printed.
fn refused_start(config: &Path, log: &Path) -> (std::process::ExitStatus, String) {
    let mut child = serve(config, log);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "spillway kept running (a hang or a retry loop)\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, std::fs::read_to_string(log).unwrap_or_default())
}

/// The one line `spillway: …` the binary prints when it cannot start.
fn start_error(output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("spillway: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{output}");
    lines[0].to_string()
}

#[tokio::test]
async fn the_quota_store_runs_over_rediss_and_refuses_an_untrusted_server() {
    spillway_gateway::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("redis CA");
    let (_redis, redis_port) = redis_tls(dir.path(), &ca);
    let sim = simulator().await;
    let prefix = format!("tls{}:", std::process::id());
    let port = free_port();
    let ca_file = dir.path().join("redis-ca.pem");
    let path = config(
        dir.path(),
        port,
        &sim,
        &format!(
            "[quota]\nstore = \"redis\"\nredis_url = \"rediss://127.0.0.1:{redis_port}\"\nredis_ca_file = \"{}\"\nredis_key_prefix = \"{prefix}\"\n[batch]\nenabled = false\n",
            ca_file.display()
        ),
    );
    let log = dir.path().join("spillway.log");
    let mut child = Killed(serve(&path, &log));
    let url = format!("http://127.0.0.1:{port}");
    let http = spillway_gateway::tls::http_client();
    wait_healthy(&http, &url, &mut child.0).await;
    for _ in 0..3 {
        let r = http
            .post(format!("{url}/v1/messages"))
            .json(&hello(HAIKU))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let metrics = support::binary::metrics_text(&http, &url).await;
    assert!(
        metrics.contains("spillway_quota_store_degraded 0"),
        "{metrics}"
    );

    // The admissions are in Redis: read them back over TLS.
    let client = redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{redis_port}"),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.pem.clone().into_bytes()),
        },
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let entries = format!("{prefix}{{{HAIKU}}}:us-central1:entries");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Leases are stamped when they close: wait for the entries to land.
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let in_window: u64 = redis::cmd("ZCARD")
            .arg(&entries)
            .query_async(&mut conn)
            .await
            .unwrap();
        if in_window >= 1 && keys.iter().any(|k| k.ends_with(":state")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no admission in Redis: {keys:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(child);

    // A Redis serving a certificate from a CA the gateway does not trust:
    // start-up stops, naming the store, with no password in sight.
    let other = tempfile::tempdir().unwrap();
    let (_untrusted, untrusted_port) = redis_tls(other.path(), &Ca::new("someone else's CA"));
    let port = free_port();
    let path = config(
        other.path(),
        port,
        &sim,
        &format!(
            "[quota]\nstore = \"redis\"\nredis_url = \"rediss://:redis-secret-password@127.0.0.1:{untrusted_port}\"\nredis_ca_file = \"{}\"\n[batch]\nenabled = false\n",
            ca_file.display()
        ),
    );
    let (status, output) = refused_start(&path, &other.path().join("spillway.log"));
    assert!(!status.success());
    let line = start_error(&output);
    assert!(
        line.starts_with(&format!("spillway: quota store: Redis at 127.0.0.1:{untrusted_port}: the server's TLS certificate was not trusted")),
        "{line}"
    );
    assert!(
        line.contains("UnknownIssuer") && line.contains("quota.redis_ca_file"),
        "{line}"
    );
    assert!(!output.contains("redis-secret-password"), "{output}");
}

/// A PostgreSQL instance of the test's own: a fresh cluster in a temp
/// directory, `ssl = on` with a certificate `ca` signed, trust auth, on a
/// free port. `initdb` refuses root, so as root it runs as `postgres`.
struct Postgres {
    _child: Killed,
    port: u16,
    _dir: tempfile::TempDir,
}

fn postgres_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)")
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .unwrap_or_else(|| panic!("no {name} under /usr/lib/postgresql/*/bin"))
}

fn as_postgres_user(program: &Path) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    fn start(ca: &Ca) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = unsafe { libc::geteuid() } == 0;
        let owner = |path: &Path| {
            if root {
                let status = Command::new("chown")
                    .args(["-R", "postgres"])
                    .arg(path)
                    .status()
                    .unwrap();
                assert!(status.success());
            }
        };
        owner(dir.path());
        let data = dir.path().join("data");
        let out = as_postgres_user(&postgres_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (cert, key) = ca.server("postgres", 1).write(dir.path(), "server");
        owner(dir.path());
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let port = free_port();
        let mut child = as_postgres_user(&postgres_bin("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "ssl=on", "-c", "fsync=off"])
            .arg("-c")
            .arg(format!("ssl_cert_file={}", cert.display()))
            .arg("-c")
            .arg(format!("ssl_key_file={}", key.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port, "postgres", &mut child);
        Self {
            _child: Killed(child),
            port,
            _dir: dir,
        }
    }

    /// Waits for a killed gateway's connections to end.
    async fn wait_until_no_tls_connections(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.tls_connections().await > 0 {
            assert!(
                Instant::now() < deadline,
                "TLS connections outlived their gateway"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Connections from clients (not the test's own) that use TLS.
    async fn tls_connections(&self) -> i64 {
        use sqlx::Connection;
        let url = format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        );
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE ssl AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
        n
    }
}

/// Starts the gateway on `postgres_url` and checks the batch store works:
/// a batch is created and read back.
async fn batches_work(sim: &SimHandle, postgres_url: &str) -> Killed {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = config(
        dir.path(),
        port,
        sim,
        &format!("[batch]\nstore = \"postgres\"\npostgres_url = \"{postgres_url}\"\npostgres_max_connections = 2\n"),
    );
    let log = dir.path().join("spillway.log");
    let mut child = Killed(serve(&path, &log));
    let url = format!("http://127.0.0.1:{port}");
    let http = spillway_gateway::tls::http_client();
    wait_healthy(&http, &url, &mut child.0).await;
    let batch = serde_json::json!({"requests": [{"custom_id": "one", "params": hello(HAIKU)}]});
    let r = http
        .post(format!("{url}/v1/messages/batches"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    let read = support::binary::batch(&http, &url, id).await;
    assert_eq!(read["id"], id, "{read}");
    child
}

#[tokio::test]
async fn the_batch_store_runs_over_verified_tls_and_refuses_an_untrusted_server() {
    let ca = Ca::new("postgres CA");
    let pg = Postgres::start(&ca);
    let sim = simulator().await;
    let files = tempfile::tempdir().unwrap();
    let ca_file = ca.write(files.path(), "pg-ca.pem");
    let wrong_ca = Ca::new("someone else's CA").write(files.path(), "wrong-ca.pem");
    let base = format!(
        "postgres://postgres:pg-secret-password@127.0.0.1:{}/postgres",
        pg.port
    );

    // verify-full: the CA and the host name (127.0.0.1 is in the certificate).
    let gateway = batches_work(
        &sim,
        &format!(
            "{base}?sslmode=verify-full&sslrootcert={}",
            ca_file.display()
        ),
    )
    .await;
    assert!(
        pg.tls_connections().await >= 1,
        "the gateway's connections use TLS"
    );
    drop(gateway);
    pg.wait_until_no_tls_connections().await;
    // require: encrypted, unverified (libpq's meaning).
    let gateway = batches_work(&sim, &format!("{base}?sslmode=require")).await;
    assert!(pg.tls_connections().await >= 1, "sslmode=require uses TLS");
    drop(gateway);

    // A CA that did not sign the server's certificate: start-up stops.
    for mode in ["verify-full", "verify-ca", "require"] {
        let dir = tempfile::tempdir().unwrap();
        let path = config(
            dir.path(),
            free_port(),
            &sim,
            &format!(
                "[batch]\nstore = \"postgres\"\npostgres_url = \"{base}?sslmode={mode}&sslrootcert={}\"\n",
                wrong_ca.display()
            ),
        );
        let (status, output) = refused_start(&path, &dir.path().join("spillway.log"));
        assert!(!status.success(), "{mode}");
        let line = start_error(&output);
        assert!(
            line.starts_with(&format!("spillway: batch store: PostgreSQL at 127.0.0.1:{}: the server's TLS certificate was not trusted", pg.port)),
            "{mode}: {line}"
        );
        assert!(line.contains("sslrootcert"), "{line}");
        assert!(!output.contains("pg-secret-password"), "{output}");
    }
}
