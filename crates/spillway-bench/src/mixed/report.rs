//! The mixed workload's figures: built from the bench's own plan, what each
//! client got, the gateway's log lines and the simulator's records; shown
//! as markdown tables or JSON.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::Serialize;
use spillway_sim::SimHandle;
use tokio::time::Instant;

use super::capture::{number, Line};
use super::content::HAIKU;
use super::workload::{Class, Planned};
use super::{Options, Outcome, REGIONS};

pub struct Inputs<'a> {
    pub options: Options,
    pub window: Duration,
    pub start: Instant,
    pub tokens_per_min: u64,
    pub requests_per_min: u64,
    pub sim: &'a SimHandle,
    pub planned: &'a [Planned],
    pub outcomes: &'a [Outcome],
    pub lines: &'a HashMap<String, Line>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub windows: u32,
    pub overload: f64,
    pub seed: u64,
    pub regions: Vec<&'static str>,
    pub tokens_per_min: u64,
    pub requests_per_min: u64,
    pub offered: Offered,
    /// After the first window (warm-up).
    pub classes: Vec<ClassRow>,
    pub upstream: Vec<RegionRow>,
    pub any_window_over_budget: bool,
    pub goodput: Goodput,
    /// The whole run.
    pub clients: Clients,
    pub wall_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Offered {
    pub requests: usize,
    /// Actual input + output tokens of everything sent.
    pub tokens: u64,
    /// Offered tokens per window over the pool (both regions' tokens/min).
    pub times_pool: f64,
}

#[derive(Debug, Serialize)]
pub struct ClassRow {
    pub class: Class,
    pub label: &'static str,
    /// The `content_class` the gateway logged most often for it, if any.
    pub gateway_class: Option<String>,
    pub sent: usize,
    pub ok: usize,
    pub rate_limited: usize,
    pub never_fits: usize,
    pub other: usize,
    pub actual_input_p50: Option<u64>,
    /// reserved input / actual input, over served requests with a log line.
    pub samples: usize,
    pub input_ratio_p50: Option<f64>,
    pub input_ratio_p95: Option<f64>,
    /// reserved output / actual output, p50.
    pub output_ratio_p50: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct RegionRow {
    pub region: &'static str,
    pub upstream_requests: u64,
    pub upstream_429s: u64,
    /// `count-tokens` calls the gateway made before admission.
    pub count_tokens_calls: u64,
    /// The most tokens (input + output) any window held at the simulator.
    pub peak_window_tokens: u64,
    pub peak_window_requests: u64,
    pub within_limits: bool,
}

#[derive(Debug, Serialize)]
pub struct Goodput {
    /// Windows 2..N: from the end of the first window to the end of the last.
    pub from_window: u32,
    pub to_window: u32,
    pub tokens_served: u64,
    pub tokens_capacity: u64,
    pub tokens_fraction: f64,
    pub requests_served: u64,
    pub requests_capacity: u64,
    pub requests_fraction: f64,
}

#[derive(Debug, Serialize)]
pub struct Clients {
    pub ok: usize,
    pub rate_limited_429: usize,
    pub never_fits_400: usize,
    pub other_400: usize,
    pub other: usize,
}

fn is_never_fits(o: &Outcome) -> bool {
    o.status == 400 && o.error.contains("never fit")
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

const RESERVED_INPUT: &[&str] = &["reserved_input_tokens", "estimated_input_tokens"];

fn class_row(class: Class, rows: &[(&Planned, &Outcome, Option<&Line>)]) -> ClassRow {
    let mine: Vec<_> = rows.iter().filter(|(p, _, _)| p.class == class).collect();
    let served: Vec<_> = mine
        .iter()
        .filter(|(_, o, _)| o.status == 200 && o.completed)
        .collect();
    let mut input_ratios = Vec::new();
    let mut output_ratios = Vec::new();
    for (_, _, line) in &served {
        let Some(line) = line else { continue };
        let actual = number(line, &["input_tokens"]).unwrap_or(0);
        if let (Some(reserved), true) = (number(line, RESERVED_INPUT), actual > 0) {
            input_ratios.push(reserved as f64 / actual as f64);
        }
        let (reserved, actual) = (
            number(line, &["reserved_output_tokens"]),
            number(line, &["output_tokens"]).unwrap_or(0),
        );
        if let (Some(reserved), true) = (reserved, actual > 0) {
            output_ratios.push(reserved as f64 / actual as f64);
        }
    }
    let mut gateway_classes: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, _, line) in &mine {
        if let Some(c) = line.and_then(|l| l.get("content_class")) {
            *gateway_classes.entry(c.as_str()).or_default() += 1;
        }
    }
    let input_ratios = sorted(input_ratios);
    let output_ratios = sorted(output_ratios);
    let mut inputs: Vec<u64> = mine.iter().map(|(p, _, _)| p.actual_input).collect();
    inputs.sort_unstable();
    let count = |f: &dyn Fn(&Outcome) -> bool| mine.iter().filter(|(_, o, _)| f(o)).count();
    let ok = served.len();
    let rate_limited = count(&|o| o.status == 429);
    let never_fits = count(&is_never_fits);
    ClassRow {
        class,
        label: class.label(),
        gateway_class: gateway_classes
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(c, _)| c.to_string()),
        sent: mine.len(),
        ok,
        rate_limited,
        never_fits,
        other: mine.len() - ok - rate_limited - never_fits,
        actual_input_p50: inputs.get(inputs.len().saturating_sub(1) / 2).copied(),
        samples: input_ratios.len(),
        input_ratio_p50: percentile(&input_ratios, 0.5),
        input_ratio_p95: percentile(&input_ratios, 0.95),
        output_ratio_p50: percentile(&output_ratios, 0.5),
    }
}

pub fn build(i: Inputs<'_>) -> Report {
    let Inputs {
        options,
        window,
        start,
        tokens_per_min,
        requests_per_min,
        sim,
        planned,
        outcomes,
        lines,
    } = i;
    let rows: Vec<(&Planned, &Outcome, Option<&Line>)> = planned
        .iter()
        .zip(outcomes)
        .map(|(p, o)| (p, o, lines.get(&o.request_id)))
        .collect();
    let after_warm_up: Vec<_> = rows
        .iter()
        .filter(|(p, _, _)| p.at >= window)
        .copied()
        .collect();
    let classes = Class::ALL
        .iter()
        .map(|c| class_row(*c, &after_warm_up))
        .filter(|r| r.sent > 0)
        .collect();

    let reports = sim.bucket_reports(window);
    let upstream = REGIONS
        .iter()
        .map(|region| {
            let counters = sim.counters(region, HAIKU);
            let bucket = sim.bucket_of(region, HAIKU);
            let report = reports.iter().find(|r| Some(&r.id) == bucket.as_ref());
            RegionRow {
                region,
                upstream_requests: counters.requests,
                upstream_429s: counters.rate_limited,
                count_tokens_calls: counters.count_tokens_requests,
                peak_window_tokens: report.map_or(0, |r| r.peak.tokens),
                peak_window_requests: report.map_or(0, |r| r.peak.requests),
                within_limits: report.is_none_or(|r| r.within_limits()),
            }
        })
        .collect();

    // Goodput: what the simulator admitted from the end of the first window
    // to the end of the last, over what both regions could take then.
    let (from, to) = (start + window, start + window * options.windows);
    let (mut tokens_served, mut requests_served) = (0u64, 0u64);
    for region in REGIONS {
        let Some(bucket) = sim.bucket_of(region, HAIKU) else {
            continue;
        };
        for a in sim.admissions(&bucket) {
            if a.at >= from && a.at < to {
                tokens_served += a.input_tokens + a.output_tokens;
                requests_served += 1;
            }
        }
    }
    let spans = u64::from(options.windows - 1) * REGIONS.len() as u64;
    let tokens_capacity = tokens_per_min * spans;
    let requests_capacity = requests_per_min * spans;

    let count = |f: &dyn Fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    let ok = count(&|o| o.status == 200 && o.completed);
    let rate_limited_429 = count(&|o| o.status == 429);
    let never_fits_400 = count(&is_never_fits);
    let other_400 = count(&|o| o.status == 400) - never_fits_400;
    let offered_tokens: u64 = planned
        .iter()
        .map(|p| p.actual_input + p.actual_output)
        .sum();
    Report {
        windows: options.windows,
        overload: options.overload,
        seed: options.seed,
        regions: REGIONS.to_vec(),
        tokens_per_min,
        requests_per_min,
        offered: Offered {
            requests: planned.len(),
            tokens: offered_tokens,
            times_pool: offered_tokens as f64
                / f64::from(options.windows)
                / (tokens_per_min * REGIONS.len() as u64) as f64,
        },
        classes,
        any_window_over_budget: reports.iter().any(|r| !r.within_limits()),
        upstream,
        goodput: Goodput {
            from_window: 2,
            to_window: options.windows,
            tokens_served,
            tokens_capacity,
            tokens_fraction: tokens_served as f64 / tokens_capacity as f64,
            requests_served,
            requests_capacity,
            requests_fraction: requests_served as f64 / requests_capacity as f64,
        },
        clients: Clients {
            ok,
            rate_limited_429,
            never_fits_400,
            other_400,
            other: outcomes.len() - ok - rate_limited_429 - never_fits_400 - other_400,
        },
        wall_seconds: 0.0,
    }
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.2}"))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## mixed-workload: {} windows, {}× the pool offered, seed {}\n",
            self.windows, self.overload, self.seed
        );
        let _ = writeln!(
            s,
            "Pool: {} regions × {} tokens and {} requests per minute (Haiku). Offered: {} requests, {} actual tokens ({:.2}× the pool per window). Wall time {:.1} s.\n",
            self.regions.len(),
            self.tokens_per_min,
            self.requests_per_min,
            self.offered.requests,
            self.offered.tokens,
            self.offered.times_pool,
            self.wall_seconds
        );
        let _ = writeln!(s, "### Charges by content (requests sent after window 1)\n");
        let _ = writeln!(
            s,
            "| content (bench) | gateway class | sent | 200 | 429 | 400 never fits | other | actual input p50 | reserved/actual input p50 | p95 | reserved/actual output p50 |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &self.classes {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.label,
                r.gateway_class.as_deref().unwrap_or("–"),
                r.sent,
                r.ok,
                r.rate_limited,
                r.never_fits,
                r.other,
                r.actual_input_p50.map_or("–".into(), |v| v.to_string()),
                ratio(r.input_ratio_p50),
                ratio(r.input_ratio_p95),
                ratio(r.output_ratio_p50),
            );
        }
        let _ = writeln!(s, "\n### Upstream (simulator)\n");
        let _ = writeln!(
            s,
            "| region | requests | 429s | count-tokens calls | peak tokens in a {}-token window | peak requests | within limits |",
            self.tokens_per_min
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|");
        for r in &self.upstream {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.region,
                r.upstream_requests,
                r.upstream_429s,
                r.count_tokens_calls,
                r.peak_window_tokens,
                r.peak_window_requests,
                if r.within_limits { "yes" } else { "NO" }
            );
        }
        let _ = writeln!(
            s,
            "\nAny 60 s window over budget at the simulator: {}\n",
            if self.any_window_over_budget {
                "YES"
            } else {
                "no"
            }
        );
        let g = &self.goodput;
        let _ = writeln!(
            s,
            "### Goodput (windows {}..{})\n",
            g.from_window, g.to_window
        );
        let _ = writeln!(s, "| | served | capacity | fraction |");
        let _ = writeln!(s, "|---|---:|---:|---:|");
        let _ = writeln!(
            s,
            "| tokens (input + output) | {} | {} | {:.1}% |",
            g.tokens_served,
            g.tokens_capacity,
            g.tokens_fraction * 100.0
        );
        let _ = writeln!(
            s,
            "| requests | {} | {} | {:.1}% |",
            g.requests_served,
            g.requests_capacity,
            g.requests_fraction * 100.0
        );
        let c = &self.clients;
        let _ = writeln!(s, "\n### Client answers (whole run)\n");
        let _ = writeln!(
            s,
            "| 200 | 429 | 400 never fits | other 400 | other |\n|---:|---:|---:|---:|---:|\n| {} | {} | {} | {} | {} |",
            c.ok, c.rate_limited_429, c.never_fits_400, c.other_400, c.other
        );
        f.write_str(&s)
    }
}
