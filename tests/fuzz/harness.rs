//! Running a fuzz target for a wall-clock budget, and keeping what it finds.
//!
//! A target is a set of proptest properties. [`Fuzz::run`] runs them in
//! turn, a batch of [`BATCH`] random cases each, until the target's budget
//! (`SPILLWAY_FUZZ_SECS`, 3 s by default) is spent, so the bound is honest
//! time rather than a case count tuned to one machine. Each batch is a fresh
//! `TestRunner` with a random seed, so a longer budget explores further
//! instead of repeating itself.
//!
//! When a property fails, proptest shrinks the input; the shrunk input is
//! written to `tests/fuzz-corpus/<target>/<kind>-found-<hash>.<ext>` before
//! the test fails, so the case outlives the run and [`replay`] checks it on
//! every `cargo test` from then on. A corpus file's name says which
//! property replays it: the word before the first `-` is its kind.
//! Proptest's own seed persistence stays off: a seed only means something
//! to one version of one strategy, a file of bytes means the same forever.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestCaseResult, TestError, TestRunner};

/// Cases per batch: small enough that the budget is overshot by little.
pub const BATCH: u32 = 32;

/// The budget of one target, from `SPILLWAY_FUZZ_SECS` (seconds, may be
/// fractional; 3 when unset or unreadable).
pub fn budget() -> Duration {
    std::env::var("SPILLWAY_FUZZ_SECS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(3), Duration::from_secs_f64)
}

/// Where a target's corpus lives.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target)
}

/// One file of a corpus.
pub struct Stored {
    pub kind: String,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// A target's corpus, in file-name order.
pub fn stored(target: &str) -> Vec<Stored> {
    let dir = corpus_dir(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let stem = name.split('.').next().unwrap_or_default();
            let kind = stem.split('-').next().unwrap_or_default().to_owned();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            Stored { kind, path, bytes }
        })
        .collect()
}

/// The bytes of every corpus file of these kinds: seeds for mutation.
pub fn seeds(target: &str, kinds: &[&str]) -> Vec<Vec<u8>> {
    stored(target)
        .into_iter()
        .filter(|s| kinds.contains(&s.kind.as_str()))
        .map(|s| s.bytes)
        .collect()
}

/// Checks every corpus file of `target` with `check(kind, bytes)`; fails
/// listing every file that does not pass (a panic counts as a failure).
pub fn replay(target: &str, check: impl Fn(&str, &[u8]) -> TestCaseResult) {
    let cases = stored(target);
    assert!(!cases.is_empty(), "the {target} corpus is empty");
    let mut failures = Vec::new();
    for case in &cases {
        let outcome = catch_unwind(AssertUnwindSafe(|| check(&case.kind, &case.bytes)));
        let problem = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!("panicked: {}", panic_message(&panic)),
        };
        failures.push(format!("{}: {problem}", case.path.display()));
    }
    println!("fuzz corpus {target}: {} cases replayed", cases.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "(no message)".into())
}

type Batch = Box<dyn FnMut() -> Result<(), String>>;

struct Property {
    kind: &'static str,
    cases: u64,
    batch: Batch,
}

/// A target: its properties, run in turn until its budget is spent.
pub struct Fuzz {
    target: &'static str,
    properties: Vec<Property>,
}

impl Fuzz {
    pub fn new(target: &'static str) -> Self {
        Self {
            target,
            properties: Vec::new(),
        }
    }

    /// Adds a property. `kind` names it (and the corpus files it replays);
    /// `encode` turns a failing input into a corpus file's bytes, `ext` is
    /// that file's extension.
    pub fn property<S>(
        mut self,
        kind: &'static str,
        ext: &'static str,
        strategy: S,
        encode: fn(&S::Value) -> Vec<u8>,
        check: fn(S::Value) -> TestCaseResult,
    ) -> Self
    where
        S: Strategy + 'static,
    {
        let target = self.target;
        let batch = move || {
            let config = Config {
                cases: BATCH,
                failure_persistence: None,
                max_shrink_time: 30_000,
                ..Config::default()
            };
            let mut runner = TestRunner::new(config);
            match runner.run(&strategy, check) {
                Ok(()) => Ok(()),
                Err(TestError::Fail(reason, input)) => {
                    let path = keep(target, kind, ext, &encode(&input));
                    let mut shown = format!("{input:?}");
                    if shown.len() > 2000 {
                        let cut = (0..=2000).rev().find(|&i| shown.is_char_boundary(i));
                        shown.truncate(cut.unwrap_or(0));
                        shown.push('…');
                    }
                    Err(format!(
                        "{target}/{kind}: {reason}\nshrunk input kept as {}\n{shown}",
                        path.display()
                    ))
                }
                Err(TestError::Abort(reason)) => Err(format!("{target}/{kind}: aborted: {reason}")),
            }
        };
        self.properties.push(Property {
            kind,
            cases: 0,
            batch: Box::new(batch),
        });
        self
    }

    /// Runs every property, a batch at a time in turn, until the budget is
    /// spent (each at least one batch); prints the cases each one ran.
    pub fn run(mut self) {
        let budget = budget();
        let start = Instant::now();
        loop {
            for p in &mut self.properties {
                if let Err(failure) = (p.batch)() {
                    panic!("{failure}");
                }
                p.cases += u64::from(BATCH);
            }
            if start.elapsed() >= budget {
                break;
            }
        }
        let total: u64 = self.properties.iter().map(|p| p.cases).sum();
        // Properties of one kind are told apart by their place among them.
        let each: Vec<String> = self
            .properties
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let same = self.properties.iter().filter(|q| q.kind == p.kind).count();
                let nth = self.properties[..i]
                    .iter()
                    .filter(|q| q.kind == p.kind)
                    .count();
                match same {
                    1 => format!("{} {}", p.kind, p.cases),
                    _ => format!("{}#{} {}", p.kind, nth + 1, p.cases),
                }
            })
            .collect();
        println!(
            "fuzz {}: {total} cases in {:.1} s (budget {:.1} s): {}",
            self.target,
            start.elapsed().as_secs_f64(),
            budget.as_secs_f64(),
            each.join(", ")
        );
    }
}

/// Writes a found case into the corpus, named by its content.
fn keep(target: &str, kind: &str, ext: &str, bytes: &[u8]) -> PathBuf {
    // FNV-1a: a stable name, so finding the same case twice keeps one file.
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let dir = corpus_dir(target);
    let path = dir.join(format!("{kind}-found-{hash:016x}.{ext}"));
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, bytes)) {
        eprintln!("could not keep {}: {e}", path.display());
    }
    path
}

/// `Err` with `message` unless `condition`: `prop_assert!` for helpers
/// that return a `Result` of their own.
pub fn ensure(condition: bool, message: impl FnOnce() -> String) -> TestCaseResult {
    if condition {
        Ok(())
    } else {
        Err(TestCaseError::fail(message()))
    }
}

/// A corpus file may open with one header line of `key=value` pairs,
/// `#! status=429 cuts=3,17\n`, before its payload: the parts of an input
/// that are not bytes.
pub fn with_header(pairs: &[(&str, String)], payload: &[u8]) -> Vec<u8> {
    let mut out = b"#!".to_vec();
    for (key, value) in pairs {
        out.extend_from_slice(format!(" {key}={value}").as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(payload);
    out
}

/// The header's pairs (none if the file has no header) and the payload.
pub fn split_header(bytes: &[u8]) -> (Vec<(String, String)>, &[u8]) {
    let Some(rest) = bytes.strip_prefix(b"#!") else {
        return (Vec::new(), bytes);
    };
    let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let pairs = String::from_utf8_lossy(&rest[..end])
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (pairs, rest.get(end + 1..).unwrap_or_default())
}

/// A header value, parsed.
pub fn header<T: std::str::FromStr>(pairs: &[(String, String)], key: &str) -> Option<T> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
}
