//! The edge under hostile or unlucky conditions, against the real binary:
//! slow clients, floods, malformed requests, shutdown with clients still
//! attached, a batch store that stops answering, and a region that breaks
//! its streams mid-way. Every answer Spillway writes here must be
//! Anthropic-shaped, and nothing refused may reach upstream.

use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spillway_sim::{Fault, FaultKind, SimConfig, SimHandle, Simulator};
use support::binary::{free_port, serve, wait_healthy, write_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;

const HAIKU: &str = "claude-3-haiku@20240307";
const TOKEN: &str = "hardening-upstream-token";

/// A simulator and the release binary in front of it.
struct Running {
    sim: SimHandle,
    child: Child,
    addr: String,
    url: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(server: &str, rest: &str) -> Self {
        let mut sim_config = SimConfig::vertex_defaults();
        sim_config.bearer_token = Some(TOKEN.into());
        let sim = Simulator::start(sim_config, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("spillway.toml");
        let server = format!("log_format = \"json\"\n{server}");
        let batch = format!(
            "[batch]\nsqlite_path = \"{db}\"\n{rest}\n",
            db = dir.path().join("batches.sqlite3").display(),
        );
        write_config(
            &config,
            port,
            &sim.base_url(),
            "hardening",
            TOKEN,
            &server,
            &batch,
        );
        let log = dir.path().join("spillway.log");
        let mut child = serve(&config, &log);
        let url = format!("http://127.0.0.1:{port}");
        wait_healthy(&spillway_gateway::tls::http_client(), &url, &mut child).await;
        Self {
            sim,
            child,
            addr: format!("127.0.0.1:{port}"),
            url,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn upstream_requests(&self) -> u64 {
        self.sim.total_requests()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `bytes`, then reads until the server closes (or 20 s pass).
async fn exchange(addr: &str, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    read_to_close(&mut tcp).await
}

async fn read_to_close(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&out).into_owned()
}

/// The status, lower-cased head and JSON body of one raw HTTP answer.
fn parse_answer(raw: &str) -> (u16, String, Value) {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {raw:?}"));
    let status = head[9..12].parse().unwrap();
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, head.to_ascii_lowercase(), body)
}

/// Asserts an Anthropic-shaped error with a request id.
fn assert_shaped(raw: &str, status: u16, kind: &str) -> String {
    let (got, head, body) = parse_answer(raw);
    assert_eq!(got, status, "{raw}");
    assert!(
        head.contains("\r\nrequest-id: req_"),
        "no request id: {raw}"
    );
    assert!(head.contains("content-type: application/json"), "{raw}");
    assert_eq!(body["type"], "error", "{raw}");
    assert_eq!(body["error"]["type"], kind, "{raw}");
    assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_with_408_and_never_reach_upstream() {
    let gw = Running::start(
        "header_read_timeout_ms = 400\nidle_timeout_ms = 400\nbody_idle_timeout_ms = 400\nbody_timeout_ms = 2000",
        "",
    )
    .await;

    // A head that never ends: 408, then closed.
    let raw = exchange(&gw.addr, b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n").await;
    assert_shaped(&raw, 408, "timeout_error");

    // An idle connection (no byte sent) is closed without an answer.
    let raw = exchange(&gw.addr, b"").await;
    assert_eq!(raw, "", "an idle keep-alive connection closes silently");

    // A chunked body that stalls.
    let raw = exchange(
        &gw.addr,
        b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n8\r\n{\"model\"\r\n",
    )
    .await;
    assert_shaped(&raw, 408, "timeout_error");

    // A body that trickles forever: cut at body_timeout_ms.
    let mut tcp = TcpStream::connect(&gw.addr).await.unwrap();
    tcp.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{")
        .await
        .unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let trickle = tokio::spawn(async move {
        while writer.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut out)).await;
    trickle.abort();
    assert_shaped(&String::from_utf8_lossy(&out), 408, "timeout_error");

    assert_eq!(gw.upstream_requests(), 0, "nothing cut reached upstream");
    let metrics = spillway_gateway::tls::http_client()
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("spillway_connections_refused_total{reason=\"header_timeout\"}"),
        "{metrics}"
    );
    let log = gw.log();
    assert_eq!(
        log.matches("request head timed out").count(),
        1,
        "logged once: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_to_a_malformed_request_is_anthropic_shaped() {
    let gw = Running::start("", "").await;
    // Malformed framing: hyper's own 400, reshaped.
    let raw = exchange(&gw.addr, b"GARBAGE\r\n\r\n").await;
    assert_shaped(&raw, 400, "invalid_request_error");
    let raw = exchange(
        &gw.addr,
        b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\n",
    )
    .await;
    assert_shaped(&raw, 400, "invalid_request_error");
    // Too many headers, too large headers, too long a target: Spillway's
    // own limits, or the parser's read buffer (server.max_header_bytes).
    let mut many = String::from("GET /healthz HTTP/1.1\r\nhost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_shaped(
        &exchange(&gw.addr, many.as_bytes()).await,
        431,
        "invalid_request_error",
    );
    let big = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "v".repeat(100_000)
    );
    assert_shaped(
        &exchange(&gw.addr, big.as_bytes()).await,
        431,
        "invalid_request_error",
    );
    // Past hyper's own buffer: its 431, reshaped.
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "v".repeat(600_000)
    );
    assert_shaped(
        &exchange(&gw.addr, huge.as_bytes()).await,
        431,
        "invalid_request_error",
    );
    let long = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(5_000));
    assert_shaped(
        &exchange(&gw.addr, long.as_bytes()).await,
        414,
        "invalid_request_error",
    );
    // A target past the whole head's limit: the parser's 431, reshaped.
    let longest = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    assert_shaped(
        &exchange(&gw.addr, longest.as_bytes()).await,
        431,
        "invalid_request_error",
    );
    assert_eq!(gw.upstream_requests(), 0);
    // The connection still serves normal requests after all that.
    let ok = spillway_gateway::tls::http_client()
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_limit_a_client_gets_503_overloaded_and_room_comes_back() {
    let gw = Running::start("max_connections = 3", "").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        // An open keep-alive connection, proven served by a request.
        let mut tcp = TcpStream::connect(&gw.addr).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(tcp);
    }
    let raw = exchange(&gw.addr, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let head = assert_shaped(&raw, 503, "overloaded_error");
    assert!(head.contains("retry-after: 1"), "{raw}");
    drop(held.pop());
    // The slot frees once the server sees the close.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let raw = exchange(
            &gw.addr,
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        if raw.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back: {raw}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_cuts_in_flight_work_within_the_grace() {
    let mut gw = Running::start("shutdown_delay_ms = 800\nshutdown_grace_ms = 2500", "").await;
    // Streams that would last ~40 s.
    gw.sim.inject(
        Fault::region(
            "us-central1",
            FaultKind::Delay {
                first_token: Duration::ZERO,
                per_token: Duration::from_millis(200),
            },
        )
        .times(u32::MAX),
    );
    gw.sim.inject(
        Fault::region(
            "europe-west4",
            FaultKind::Delay {
                first_token: Duration::ZERO,
                per_token: Duration::from_millis(200),
            },
        )
        .times(u32::MAX),
    );
    let http = spillway_gateway::tls::http_client();
    let stream = http
        .post(format!("{}/v1/messages", gw.url))
        .json(&json!({"model": HAIKU, "max_tokens": 400, "stream": true,
            "messages": [{"role": "user", "content": "SIM_OUTPUT_TOKENS=200 tell me a long story"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let stream_text = tokio::spawn(async move { stream.text().await.unwrap_or_default() });
    // A client trickling its body (never idle long enough to be cut).
    let mut tcp = TcpStream::connect(&gw.addr).await.unwrap();
    tcp.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{")
        .await
        .unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let trickling = Arc::new(AtomicBool::new(true));
    let t = Arc::clone(&trickling);
    let trickle = tokio::spawn(async move {
        while t.load(Ordering::Relaxed) && writer.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    let pid = gw.child.id() as i32;
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Draining: not ready at once, still accepting for the delay.
    let ready = http.get(format!("{}/readyz", gw.url)).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let health = http
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        health.status(),
        200,
        "connections still accepted during the delay"
    );

    // At the grace: the stream ends with an overloaded error event, the
    // trickling request gets a 503.
    let text = tokio::time::timeout(Duration::from_secs(20), stream_text)
        .await
        .expect("the stream was cut")
        .unwrap();
    let events = support::parse_events(&text);
    let (last, data) = events.last().expect("events");
    assert_eq!(last, "error", "{text}");
    assert_eq!(data["error"]["type"], "overloaded_error");
    assert!(events.iter().any(|(e, _)| e == "content_block_delta"));
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut out)).await;
    trickling.store(false, Ordering::Relaxed);
    trickle.abort();
    assert_shaped(&String::from_utf8_lossy(&out), 503, "overloaded_error");

    let exited = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(status) = gw.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the process exits after the grace");
    let took = signalled.elapsed();
    assert!(exited.success(), "{exited}");
    // The deadline is grace + 1 s; the margin is for a loaded machine.
    assert!(
        took < Duration::from_millis(2500 + 1000 + 2000),
        "exited {took:?} after SIGTERM"
    );
    let log = gw.log();
    assert!(log.contains("shutdown: done"), "{log}");
    assert!(
        !log.contains("settlements_unfinished"),
        "every reservation settled: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_that_breaks_streams_mid_way_is_cooled_down() {
    let gw = Running::start("", "").await;
    gw.sim.inject(
        Fault::region("us-central1", FaultKind::ErrorMidStream { after_events: 3 }).times(u32::MAX),
    );
    let http = spillway_gateway::tls::http_client();
    let mut failed = 0;
    let mut regions = Vec::new();
    for i in 0..20 {
        let r = http
            .post(format!("{}/v1/messages", gw.url))
            .json(&json!({"model": HAIKU, "max_tokens": 32, "stream": true,
                "messages": [{"role": "user", "content": format!("SIM_OUTPUT_TOKENS=8 hello {i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        regions.push(
            r.headers()
                .get("x-spillway-region")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default(),
        );
        let events = support::read_events(r).await;
        if events.iter().any(|(e, _)| e == "error") {
            failed += 1;
        }
    }
    // Before: every stream routed to us-central1 failed, and routing kept
    // sending them there. Now the first failure cools it down.
    assert!(
        failed <= 1,
        "{failed} of 20 streams failed; regions {regions:?}"
    );
    assert!(
        regions.iter().filter(|r| *r == "europe-west4").count() >= 19,
        "{regions:?}"
    );
}

/// A TCP proxy in front of the machine's PostgreSQL that can go dark, as a
/// network partition does: nothing more is forwarded, and no socket is
/// closed (so nothing fails fast: every wait is a timeout's to end).
struct Partition {
    port: u16,
    out: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Partition {
    async fn start(target: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let out = Arc::new(AtomicBool::new(false));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let o = Arc::clone(&out);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let dark = o.load(Ordering::Relaxed);
                let mut cuts = cuts.clone();
                tokio::spawn(async move {
                    if !dark {
                        let Ok(mut server) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                            _ = cuts.changed() => {}
                        }
                        // Dark: hold both ends open, silent.
                        std::future::pending::<()>().await;
                        drop(server);
                    }
                    std::future::pending::<()>().await;
                    drop(client);
                });
            }
        });
        Self { port, out, cut }
    }

    fn go_dark(&self) {
        self.out.store(true, Ordering::Relaxed);
        self.cut.send_modify(|n| *n += 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_interactive_traffic_do_not_wait_on_a_dead_batch_store() {
    let db = support::postgres::TempDatabase::create("hardening").await;
    let proxy = Partition::start("127.0.0.1:5432").await;
    let url = db.url.replace(":5432/", &format!(":{}/", proxy.port));
    let gw = Running::start(
        "",
        &format!("store = \"postgres\"\npostgres_url = \"{url}\"\npostgres_max_connections = 2"),
    )
    .await;
    let http = spillway_gateway::tls::http_client_builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let list = http
        .get(format!("{}/v1/messages/batches", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 200);
    let metrics = http
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);

    proxy.go_dark();
    // Scrapes answer (from the last snapshot) while the store is dark.
    for _ in 0..3 {
        let scrape = http.get(format!("{}/metrics", gw.url)).send().await;
        let text = scrape.expect("a scrape answers").text().await.unwrap();
        assert!(
            text.contains("spillway_budget_limit"),
            "budgets still shown"
        );
        assert!(
            text.contains("spillway_state_age_seconds{source=\"batch_store\"}"),
            "{text}"
        );
    }
    // The batch API fails fast, with a 503 the SDKs retry.
    let started = Instant::now();
    let list = http
        .get(format!("{}/v1/messages/batches", gw.url))
        .send()
        .await
        .expect("the batch API answers while its store is dark");
    assert_eq!(list.status(), 503, "{:?}", started.elapsed());
    assert!(list.headers().contains_key("retry-after"));
    let body: Value = list.json().await.unwrap();
    assert_eq!(body["error"]["type"], "overloaded_error");
    // Interactive traffic is not touched.
    let message = http
        .post(format!("{}/v1/messages", gw.url))
        .json(&json!({"model": HAIKU, "max_tokens": 16,
            "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(message.status(), 200);
    drop(gw);
    db.drop_now().await;
}

/// The soak's memory figures split RSS into what the gateway holds live and
/// what the allocator keeps; the binary exports jemalloc's own account for
/// that (and for an operator telling a leak from kept pages).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_binary_exports_the_allocators_live_and_resident_bytes() {
    let gw = Running::start("", "").await;
    let text = support::binary::metrics_text(&spillway_gateway::tls::http_client(), &gw.url).await;
    let kind = |k: &str| {
        support::series(&text, &format!("spillway_allocator_bytes{{kind=\"{k}\"}}"))
            .unwrap_or_else(|| panic!("spillway_allocator_bytes{{kind=\"{k}\"}} is exported"))
    };
    let (allocated, active, resident) = (kind("allocated"), kind("active"), kind("resident"));
    assert!(allocated > 0.0, "a running gateway holds live memory");
    assert!(active >= allocated, "allocations sit on active pages");
    assert!(resident >= active, "active pages are resident");
    assert!(kind("metadata") > 0.0);
    // Exported too; zero is fine while nothing has been retained.
    kind("retained");
}
