//! `spillway demo`, as a newcomer runs it: the real binary, its printed
//! `spillway status` line run as printed, its printed live page and key,
//! and `--load` traffic counted per tenant.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::binary::metrics_text;

mod support;

struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Demo {
    fn start(args: &[&str]) -> Demo {
        let mut command = Command::new(env!("CARGO_BIN_EXE_spillway"));
        command
            .args(["demo", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("SPILLWAY_ADMIN_KEY")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("SPILLWAY__")) {
            command.env_remove(name);
        }
        let mut child = command.spawn().expect("spillway demo starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Demo { child, lines }
    }

    /// The next printed line that satisfies `want`, within `secs`.
    fn line(&self, secs: u64, want: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if want(&line) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!(
            "no such line within {secs} s; printed:\n{}",
            seen.join("\n")
        );
    }
}

/// The printed status line, split into its words (`EXE status --url URL --admin-key KEY`).
fn status_line(demo: &Demo) -> Vec<String> {
    let line = demo.line(30, |l| l.contains(" status --url "));
    line.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn the_printed_status_line_works_as_pasted() {
    let demo = Demo::start(&[]);
    let words = status_line(&demo);
    assert_eq!(words[1], "status", "{words:?}");
    assert!(words[4].starts_with("--admin-key"), "{words:?}");
    let out = Command::new(&words[0])
        .args(&words[1..])
        .arg("--once")
        .output()
        .expect("the printed binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("claude-3-haiku@20240307") && stdout.contains("europe-west4"),
        "{stdout}"
    );

    // The key is this run's own: another one is refused.
    let out = Command::new(&words[0])
        .args([
            "status",
            "--url",
            &words[3],
            "--admin-key",
            "sk-spw-not-this-one",
            "--once",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// The printed live page answers, and the printed key opens its data.
#[tokio::test]
async fn the_printed_page_url_serves_the_page_and_its_key_signs_in() {
    let demo = Demo::start(&[]);
    let prefix = "Watch the budgets live in a browser: ";
    let page = demo.line(30, |l| l.starts_with(prefix))[prefix.len()..].to_owned();
    let prefix = "  sign in there with this run's admin key: ";
    let key = demo.line(5, |l| l.starts_with(prefix))[prefix.len()..].to_owned();
    assert!(
        page.starts_with("http://127.0.0.1:") && page.ends_with("/admin/"),
        "{page}"
    );
    let http = spillway_gateway::tls::http_client();
    let r = http.get(&page).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("content-security-policy"));
    assert!(r.text().await.unwrap().contains("id=\"signin\""));
    let overview = |key: String| {
        http.get(format!("{page}overview"))
            .header("authorization", format!("Bearer {key}"))
            .send()
    };
    let r = overview(key).await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["budgets"].as_array().is_some_and(|b| !b.is_empty()),
        "{body}"
    );
    let r = overview("sk-spw-not-this-one".into()).await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_traffic_is_counted_per_tenant_and_drains_a_batch() {
    let demo = Demo::start(&["--load", "--load-secs", "6", "--load-batch-items", "6"]);
    let words = status_line(&demo);
    let url = words[3].clone();
    let submitted = demo.line(30, |l| l.starts_with("load: 3 tenants for 6 s"));
    assert!(submitted.contains("batch msgbatch_"), "{submitted}");
    let report = demo.line(30, |l| l.starts_with("load +"));
    assert!(report.contains(" ok ("), "{report}");
    demo.line(30, |l| l.starts_with("load: stopped"));
    let ended = demo.line(120, |l| l.contains(" ended: "));
    assert!(ended.ends_with("6/6 items done"), "{ended}");

    let metrics = metrics_text(&spillway_gateway::tls::http_client(), &url).await;
    for tenant in ["chat", "search", "reports"] {
        let ok = metrics.lines().any(|l| {
            l.starts_with("spillway_requests_total{")
                && l.contains(&format!("tenant=\"{tenant}\""))
                && l.contains("outcome=\"ok\"")
        });
        assert!(ok, "no ok requests for {tenant}:\n{metrics}");
    }
}
