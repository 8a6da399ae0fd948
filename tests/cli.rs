//! The `spillway` binary's offline commands: `check-config` and `hash-key`.

use std::process::Command;

fn spillway(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(args)
        .env_remove("SPILLWAY__SERVER__LISTEN")
        .output()
        .expect("binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("spillway-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_config_prints_the_effective_config_without_secrets() {
    let path = temp_config(
        "good.toml",
        "[server]\nauth = \"none\"\n[upstream]\nproject = \"my-project-1\"\nauth = \"static\"\ntoken = \"very-secret-token\"\n",
    );
    let (ok, stdout, stderr) = spillway(&["check-config", path.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("valid"));
    assert!(
        stdout.contains("claude-3-haiku@20240307"),
        "defaults are shown"
    );
    assert!(stdout.contains("my-project-1"));
    assert!(!stdout.contains("very-secret-token"), "{stdout}");
    assert!(stdout.contains("<redacted>"));
}

#[test]
fn check_config_names_the_key_and_the_problem() {
    let path = temp_config(
        "bad.toml",
        "[server]\nauth = \"none\"\n[quota]\nrequests_per_min = \"lots\"\n",
    );
    let (ok, _, stderr) = spillway(&["check-config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("quota.requests_per_min"), "{stderr}");

    let path = temp_config(
        "open.toml",
        "[server]\nauth = \"none\"\nlisten = \"0.0.0.0:8080\"\n[upstream]\nproject = \"my-project-1\"\n",
    );
    let (ok, _, stderr) = spillway(&["check-config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("server.auth") && stderr.contains("loopback"),
        "{stderr}"
    );

    let (ok, _, stderr) = spillway(&["check-config", "/nonexistent/spillway.toml"]);
    assert!(!ok);
    assert!(
        stderr.contains("/nonexistent/spillway.toml") && stderr.contains("not found"),
        "{stderr}"
    );
}

/// The newcomer's config errors: printed once, all of them in one run,
/// enum values listed, and the same report from `serve` and `check-config`.
#[test]
fn serve_and_check_config_report_every_problem_once_and_alike() {
    let path = temp_config(
        "many.toml",
        "[server]\nauth = \"none\"\n[quota]\nstrategy = \"random\"\n[scheduler]\nmax_queue = 0.5\n\
         [models.\"claude-3-haiku@20240307\"]\nregions = []\n",
    );
    let file = path.to_str().unwrap();
    let (ok, _, checked) = spillway(&["check-config", file]);
    assert!(!ok);
    let (ok, _, served) = spillway(&["serve", "--config", file]);
    assert!(!ok);
    assert_eq!(checked, served, "check-config and serve disagree");
    let expected = [
        format!("quota.strategy: \"random\" is not one of most_headroom, ordered (set in {file})"),
        format!("scheduler.max_queue: invalid type: floating point `0.5`, expected usize (set in {file})"),
        format!("models.\"claude-3-haiku@20240307\".regions: must list at least one location, e.g. regions = [{{ name = \"us-central1\" }}] (set in {file})"),
    ];
    assert!(
        checked.starts_with("spillway: 3 problems in the configuration:\n"),
        "{checked}"
    );
    for line in &expected {
        assert_eq!(
            checked.matches(line.as_str()).count(),
            1,
            "{line:?} once in:\n{checked}"
        );
    }
    assert!(
        !checked.contains("RoutingStrategy") && !checked.contains("variant constructor"),
        "{checked}"
    );

    let path = temp_config(
        "headroom.toml",
        "[server]\nauth = \"none\"\n[quota]\nheadroom = 1.5\n",
    );
    let (ok, _, stderr) = spillway(&["check-config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.starts_with("spillway: quota.headroom: 1.5 is not in (0, 1]"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn hash_key_prints_a_sha256_digest() {
    let (ok, stdout, _) = spillway(&["hash-key", "abc"]);
    assert!(ok);
    assert_eq!(
        stdout.trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );

    let (ok, stdout, _) = spillway(&["hash-key"]);
    assert!(ok);
    let key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .unwrap()
        .trim();
    let digest = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key_sha256:"))
        .unwrap()
        .trim();
    assert!(key.starts_with("sk-spw-") && key.len() == 47, "{key}");
    let (_, again, _) = spillway(&["hash-key", key]);
    assert_eq!(again.trim(), digest);
}
