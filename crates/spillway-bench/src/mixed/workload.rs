//! The offered traffic: which tenant sends what, when, and what it will
//! really cost by the simulator's tokenizer.
//!
//! Three tenants, each with its own mix, each offering a third of the load:
//! a chat app (one-line turns, short English questions, CJK prose), a coding
//! agent (source code to review, JSON tool use) and a document pipeline
//! (long English prompts, 100k+-character documents). In every window each
//! tenant sends requests until their actual tokens (input + output) reach
//! its share of `overload ×` the pool of both Haiku regions, at uniformly
//! random times inside the window; all tenants' requests interleave.

use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use super::content::{self, Rng, HAIKU};

/// What the bench generated (its own label, independent of the gateway's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Tiny,
    EnglishShort,
    EnglishLong,
    Cjk,
    Code,
    JsonTools,
    Document,
}

impl Class {
    pub const ALL: [Class; 7] = [
        Class::Tiny,
        Class::EnglishShort,
        Class::EnglishLong,
        Class::Cjk,
        Class::Code,
        Class::JsonTools,
        Class::Document,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Class::Tiny => "tiny chat turn",
            Class::EnglishShort => "English, short",
            Class::EnglishLong => "English, long",
            Class::Cjk => "CJK prose",
            Class::Code => "source code",
            Class::JsonTools => "JSON tool use",
            Class::Document => "document 100k+ chars",
        }
    }
}

pub struct Tenant {
    pub name: &'static str,
    pub key: &'static str,
    /// (class, weight): the share of this tenant's requests.
    mix: &'static [(Class, u64)],
}

pub const TENANTS: [Tenant; 3] = [
    Tenant {
        name: "chat",
        key: "sk-spw-bench-chat",
        mix: &[
            (Class::Tiny, 40),
            (Class::EnglishShort, 35),
            (Class::Cjk, 25),
        ],
    },
    Tenant {
        name: "agent",
        key: "sk-spw-bench-agent",
        mix: &[(Class::Code, 45), (Class::JsonTools, 45), (Class::Tiny, 10)],
    },
    Tenant {
        name: "docs",
        key: "sk-spw-bench-docs",
        mix: &[(Class::EnglishLong, 55), (Class::Document, 45)],
    },
];

/// One request to send.
pub struct Planned {
    pub tenant: usize,
    pub class: Class,
    /// When to send it, from the start of the run.
    pub at: Duration,
    pub stream: bool,
    /// The serialized body.
    pub body: String,
    /// Input tokens as the simulator counts them.
    pub actual_input: u64,
    /// Output tokens the simulator will write (`SIM_OUTPUT_TOKENS`, or its
    /// default of 12, capped by `max_tokens`).
    pub actual_output: u64,
}

/// The simulator's answer length when a request names none.
const SIM_DEFAULT_OUTPUT: u64 = 12;

fn max_tokens_for(rng: &mut Rng, output: u64) -> u64 {
    let choices: Vec<u64> = [1024u64, 2048, 4096]
        .into_iter()
        .filter(|m| *m >= 2 * output)
        .collect();
    rng.pick(&choices)
}

fn user(text: String, max_tokens: u64) -> Value {
    json!({"model": HAIKU, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}]})
}

/// A body of `class` and the output the simulator will write for it.
fn generate(class: Class, rng: &mut Rng) -> (Value, u64) {
    let directive = |n: u64| format!("SIM_OUTPUT_TOKENS={n}");
    match class {
        Class::Tiny => {
            let max = max_tokens_for(rng, SIM_DEFAULT_OUTPUT);
            (
                user(content::tiny(rng).to_string(), max),
                SIM_DEFAULT_OUTPUT,
            )
        }
        Class::EnglishShort => {
            let out = rng.range(100, 400);
            let chars = rng.range(300, 3_000) as usize;
            let text = content::english_prose(rng, chars);
            let max = max_tokens_for(rng, out);
            (user(format!("{text}\n\n{}", directive(out)), max), out)
        }
        Class::EnglishLong => {
            let out = rng.range(300, 900);
            let chars = rng.range(8_000, 40_000) as usize;
            let text = content::english_prose(rng, chars);
            let max = max_tokens_for(rng, out);
            (
                user(
                    format!(
                        "Rewrite the following notes as a short report.\n\n{text}\n\n{}",
                        directive(out)
                    ),
                    max,
                ),
                out,
            )
        }
        Class::Cjk => {
            let out = rng.range(200, 600);
            let chars = rng.range(1_000, 6_000) as usize;
            let text = content::cjk_prose(rng, chars);
            let max = max_tokens_for(rng, out);
            (user(format!("{text}\n{}", directive(out)), max), out)
        }
        Class::Code => {
            let out = rng.range(300, 1_500);
            let chars = rng.range(4_000, 30_000) as usize;
            let (lang, code) = content::source_code(rng, chars);
            let max = max_tokens_for(rng, out);
            (
                user(
                    format!(
                        "Review this {lang} code and fix the bug in it.\n\n```{lang}\n{code}```\n{}",
                        directive(out)
                    ),
                    max,
                ),
                out,
            )
        }
        Class::JsonTools => {
            let out = rng.range(100, 400);
            let records = rng.range(10, 120);
            let max = max_tokens_for(rng, out);
            (content::tool_use(rng, records, &directive(out), max), out)
        }
        Class::Document => {
            let out = rng.range(500, 1_500);
            let chars = rng.range(100_000, 150_000) as usize;
            let text = content::document(rng, chars);
            let max = max_tokens_for(rng, out);
            (
                user(
                    format!(
                        "Summarise the following document in ten bullet points. {}\n\n{text}",
                        directive(out)
                    ),
                    max,
                ),
                out,
            )
        }
    }
}

fn pick_class(rng: &mut Rng, mix: &[(Class, u64)]) -> Class {
    let total: u64 = mix.iter().map(|(_, w)| w).sum();
    let mut x = rng.below(total);
    for (class, w) in mix {
        if x < *w {
            return *class;
        }
        x -= w;
    }
    mix[mix.len() - 1].0
}

/// The whole run's requests, sorted by send time: `windows` windows of
/// `window`, each tenant offering `tokens_per_window / tenants` actual tokens
/// in each (up to one request's worth, carried to the next window).
pub fn plan(seed: u64, windows: u32, window: Duration, tokens_per_window: u64) -> Vec<Planned> {
    let mut root = Rng::new(seed);
    let share = tokens_per_window / TENANTS.len() as u64;
    let mut planned = Vec::new();
    // Each tenant's running total: a large request that overshoots one
    // window's share is made up for in the next, so the run offers
    // `tokens_per_window` per window on average.
    let mut offered = [0u64; TENANTS.len()];
    for w in 0..windows {
        for (t, tenant) in TENANTS.iter().enumerate() {
            let mut rng = root.fork();
            let offered = &mut offered[t];
            while *offered < share * u64::from(w + 1) {
                let class = pick_class(&mut rng, tenant.mix);
                let mut content = rng.fork();
                let (mut body, actual_output) = generate(class, &mut content);
                let stream = rng.below(5) == 0;
                if stream {
                    body["stream"] = json!(true);
                }
                let actual_input = spillway_sim::count_tokens(&body);
                *offered += actual_input + actual_output;
                let at = window.mul_f64(f64::from(w) + rng.unit());
                planned.push(Planned {
                    tenant: t,
                    class,
                    at,
                    stream,
                    body: body.to_string(),
                    actual_input,
                    actual_output,
                });
            }
        }
    }
    planned.sort_by_key(|p| p.at);
    planned
}
