//! The simulated model's answer: how long it is and what it says.
//!
//! The "model" writes `N` lorem-ipsum words, one output token per word,
//! where `N` comes from the request:
//!
//! * if the **last user message** contains `SIM_OUTPUT_TOKENS=<n>` (in a
//!   string content or any text block), `N = n`;
//! * otherwise `N` is the runtime default (`SimConfig::default_output_tokens`,
//!   12 unless changed with `SimHandle::set_default_output_tokens`).
//!
//! `N` is clamped to `1..=`[`MAX_OUTPUT_TOKENS`] so a hostile request cannot
//! make the simulator allocate gigabytes. The answer has
//! `output_tokens = min(max_tokens, N)` and `stop_reason` `"max_tokens"` if
//! `max_tokens` cut it short, else `"end_turn"`.
//!
//! ## Prompt caching
//!
//! The simulator caches prompt prefixes at their `cache_control`
//! breakpoints as Vertex does ([`crate::cache`]). A test may instead say
//! what the cache did, in the last user message (same places as above):
//!
//! * `SIM_CACHE_READ=<r>` makes `r` of the prompt's input tokens cache
//!   reads, reported in `usage.cache_read_input_tokens`;
//! * `SIM_CACHE_WRITE=<w>` makes `w` of them cache writes, reported in
//!   `usage.cache_creation_input_tokens`;
//! * `SIM_CACHE_WRITE_1H=<h>` makes `h` of those writes 1-hour ones: the
//!   usage then also carries `cache_creation: {ephemeral_5m_input_tokens,
//!   ephemeral_1h_input_tokens}`, as Vertex's does for writes with
//!   `ttl: "1h"` (billed at another price);
//!
//! and `usage.input_tokens` is what is left, so the three always add up to
//! the prompt's token count (reads are taken first, each figure is capped by
//! what remains). [`plan_input`] does the split. The same usage is sent in
//! rawPredict's body and in a stream's `message_start`. Whether the reads
//! then count against the input-token quota is the model's
//! `cache_reads_count` (see [`crate::config`]); writes always count.
//!
//! Responses use the Anthropic model id (`claude-3-haiku-20240307`: the
//! Vertex `@` becomes `-`) and a `msg_vrtx_` + 24 alphanumerics id, as
//! Vertex does. The first-party surface ([`crate::anthropic`]) uses
//! [`first_party_message_json`] instead: the model id as sent, a `msg_01`
//! id, Anthropic's field order; the same usage rules.

use rand::distr::{Alphanumeric, SampleString};
use serde::Serialize;
use serde_json::Value;

/// Upper bound on the words the simulated model writes.
pub const MAX_OUTPUT_TOKENS: u64 = 200_000;

const LOREM: &[&str] = &[
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
];

/// The `i`-th word of the answer, with its leading space (none for the first).
pub fn word(i: u64) -> (&'static str, &'static str) {
    let w = LOREM[(i % LOREM.len() as u64) as usize];
    (if i == 0 { "" } else { " " }, w)
}

/// The whole answer text of `n` words.
pub fn text(n: u64) -> String {
    let mut s = String::with_capacity(n as usize * 7);
    for i in 0..n {
        let (sep, w) = word(i);
        s.push_str(sep);
        s.push_str(w);
    }
    s
}

/// `msg_vrtx_` followed by 24 random alphanumerics.
pub fn message_id() -> String {
    let mut id = String::with_capacity(33);
    id.push_str("msg_vrtx_");
    Alphanumeric.append_string(&mut rand::rng(), &mut id, 24);
    id
}

/// A first-party message id: `msg_01` followed by 22 random alphanumerics
/// (Anthropic's own API; Vertex uses [`message_id`]).
pub fn first_party_message_id() -> String {
    let mut id = String::with_capacity(28);
    id.push_str("msg_01");
    Alphanumeric.append_string(&mut rand::rng(), &mut id, 22);
    id
}

/// The Anthropic form of a Vertex model id (`@` → `-`).
pub fn anthropic_model_id(vertex_id: &str) -> String {
    vertex_id.replace('@', "-")
}

/// Finds `SIM_OUTPUT_TOKENS=<n>` in the last user message, if any.
pub fn requested_output_tokens(body: &Value) -> Option<u64> {
    directive(body, "SIM_OUTPUT_TOKENS=")
}

/// Finds `<key><n>` (e.g. `SIM_CACHE_READ=` and a number) in the last user
/// message: in its string content, or the first text block that has it.
pub fn directive(body: &Value, key: &str) -> Option<u64> {
    let messages = body.get("messages")?.as_array()?;
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))?;
    match last_user.get("content")? {
        Value::String(s) => parse_directive(s, key),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .find_map(|t| parse_directive(t, key)),
        _ => None,
    }
}

fn parse_directive(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits: &str = &text[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    let digits = &digits[..end];
    if digits.is_empty() {
        return None;
    }
    // Too many digits for u64 means "a lot": saturate, the clamp handles it.
    Some(digits.parse::<u64>().unwrap_or(u64::MAX))
}

/// Output length and stop reason for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputPlan {
    /// Output tokens (= words) of the answer.
    pub tokens: u64,
    /// `"end_turn"` or `"max_tokens"`.
    pub stop_reason: &'static str,
}

/// `min(max_tokens, N)` with `N` from the request or the default.
pub fn plan_output(body: &Value, max_tokens: u64, default_tokens: u32) -> OutputPlan {
    let wanted = requested_output_tokens(body)
        .unwrap_or(u64::from(default_tokens))
        .clamp(1, MAX_OUTPUT_TOKENS);
    if max_tokens < wanted {
        OutputPlan {
            tokens: max_tokens,
            stop_reason: "max_tokens",
        }
    } else {
        OutputPlan {
            tokens: wanted,
            stop_reason: "end_turn",
        }
    }
}

#[derive(Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

/// How a prompt's input tokens split between fresh input and the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct InputUsage {
    /// `usage.input_tokens`: neither read from nor written to the cache.
    pub input_tokens: u64,
    /// `usage.cache_creation_input_tokens`: written to the cache.
    pub cache_creation_input_tokens: u64,
    /// `usage.cache_read_input_tokens`: read from the cache.
    pub cache_read_input_tokens: u64,
    /// Of the writes, those with the 1-hour TTL
    /// (`usage.cache_creation.ephemeral_1h_input_tokens`).
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_creation_1h_input_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `usage.cache_creation`: the writes by TTL, sent only when some are 1-hour ones.
#[derive(Serialize)]
pub(crate) struct CacheCreation {
    pub ephemeral_5m_input_tokens: u64,
    pub ephemeral_1h_input_tokens: u64,
}

impl CacheCreation {
    pub(crate) fn of(writes: u64, writes_1h: u64) -> Option<Self> {
        (writes_1h > 0).then(|| Self {
            ephemeral_5m_input_tokens: writes - writes_1h,
            ephemeral_1h_input_tokens: writes_1h,
        })
    }
}

impl InputUsage {
    /// All of `total` as fresh input.
    pub fn uncached(total: u64) -> Self {
        InputUsage {
            input_tokens: total,
            ..InputUsage::default()
        }
    }

    /// The input tokens charged to the input-token quota: fresh input and
    /// cache writes always, cache reads only if `reads_count`.
    pub fn counted(&self, reads_count: bool) -> u64 {
        let reads = if reads_count {
            self.cache_read_input_tokens
        } else {
            0
        };
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens)
            .saturating_add(reads)
    }
}

/// Splits a prompt of `total` input tokens by its `SIM_CACHE_READ=` and
/// `SIM_CACHE_WRITE=` directives (see the module docs).
pub fn plan_input(body: &Value, total: u64) -> InputUsage {
    let read = directive(body, "SIM_CACHE_READ=").unwrap_or(0).min(total);
    let write = directive(body, "SIM_CACHE_WRITE=")
        .unwrap_or(0)
        .min(total - read);
    InputUsage {
        input_tokens: total - read - write,
        cache_creation_input_tokens: write,
        cache_read_input_tokens: read,
        cache_creation_1h_input_tokens: directive(body, "SIM_CACHE_WRITE_1H=")
            .unwrap_or(0)
            .min(write),
    }
}

/// Usage as Vertex reports it (cache fields always present).
#[derive(Serialize)]
pub(crate) struct Usage {
    pub input_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub output_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_creation: Option<CacheCreation>,
}

impl Usage {
    /// An answer's usage: the input as planned, `output` tokens produced.
    fn of(input: InputUsage, output: u64) -> Self {
        Usage {
            input_tokens: input.input_tokens,
            cache_creation_input_tokens: input.cache_creation_input_tokens,
            cache_read_input_tokens: input.cache_read_input_tokens,
            output_tokens: output,
            cache_creation: CacheCreation::of(
                input.cache_creation_input_tokens,
                input.cache_creation_1h_input_tokens,
            ),
        }
    }
}

#[derive(Serialize)]
struct Message<'a> {
    model: &'a str,
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    content: [TextBlock<'a>; 1],
    stop_reason: &'static str,
    stop_sequence: Option<&'a str>,
    usage: Usage,
}

/// The rawPredict body: an Anthropic `Message`, field order as Vertex, with
/// no cache activity.
pub fn message_json(model: &str, input_tokens: u64, plan: OutputPlan) -> Vec<u8> {
    message_json_with_input(model, InputUsage::uncached(input_tokens), plan)
}

/// The rawPredict body with the given input split (cache reads and writes).
pub fn message_json_with_input(model: &str, input: InputUsage, plan: OutputPlan) -> Vec<u8> {
    let id = message_id();
    let text = text(plan.tokens);
    let msg = Message {
        model: &anthropic_model_id(model),
        id: &id,
        kind: "message",
        role: "assistant",
        content: [TextBlock {
            kind: "text",
            text: &text,
        }],
        stop_reason: plan.stop_reason,
        stop_sequence: None,
        usage: Usage::of(input, plan.tokens),
    };
    serde_json::to_vec(&msg).unwrap_or_default()
}

/// The first-party `POST /v1/messages` body: Anthropic's field order
/// (`id`, `type`, `role`, `model`, ...), the model id exactly as the
/// request sent it and a `msg_01…` id; usage as in
/// [`message_json_with_input`].
pub fn first_party_message_json(model: &str, input: InputUsage, plan: OutputPlan) -> Vec<u8> {
    #[derive(Serialize)]
    struct FirstParty<'a> {
        id: &'a str,
        #[serde(rename = "type")]
        kind: &'static str,
        role: &'static str,
        model: &'a str,
        content: [TextBlock<'a>; 1],
        stop_reason: &'static str,
        stop_sequence: Option<&'a str>,
        usage: Usage,
    }
    let id = first_party_message_id();
    let text = text(plan.tokens);
    let msg = FirstParty {
        id: &id,
        kind: "message",
        role: "assistant",
        model,
        content: [TextBlock {
            kind: "text",
            text: &text,
        }],
        stop_reason: plan.stop_reason,
        stop_sequence: None,
        usage: Usage::of(input, plan.tokens),
    };
    serde_json::to_vec(&msg).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn directive_in_last_user_message_only() {
        let body = json!({"messages": [
            {"role": "user", "content": "SIM_OUTPUT_TOKENS=99"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "please SIM_OUTPUT_TOKENS=7 thanks"}]},
        ]});
        assert_eq!(requested_output_tokens(&body), Some(7));
        let body = json!({"messages": [
            {"role": "user", "content": "SIM_OUTPUT_TOKENS=99"},
            {"role": "user", "content": "nothing"},
        ]});
        assert_eq!(requested_output_tokens(&body), None);
        let huge = json!({"messages": [{"role": "user", "content": "SIM_OUTPUT_TOKENS=99999999999999999999999"}]});
        assert_eq!(plan_output(&huge, u64::MAX, 12).tokens, MAX_OUTPUT_TOKENS);
    }

    #[test]
    fn max_tokens_caps() {
        let body = json!({"messages": [{"role": "user", "content": "SIM_OUTPUT_TOKENS=30"}]});
        assert_eq!(
            plan_output(&body, 10, 12),
            OutputPlan {
                tokens: 10,
                stop_reason: "max_tokens"
            }
        );
        assert_eq!(plan_output(&body, 30, 12).stop_reason, "end_turn");
        assert_eq!(plan_output(&json!({}), 100, 12).tokens, 12);
    }

    #[test]
    fn message_shape() {
        let plan = OutputPlan {
            tokens: 3,
            stop_reason: "end_turn",
        };
        let v: Value =
            serde_json::from_slice(&message_json("claude-3-haiku@20240307", 16, plan)).unwrap();
        assert_eq!(v["model"], "claude-3-haiku-20240307");
        assert_eq!(v["content"][0]["text"], "lorem ipsum dolor");
        let id = v["id"].as_str().unwrap();
        assert!(id.starts_with("msg_vrtx_") && id.len() == 33);
        assert_eq!(
            v["usage"],
            json!({"input_tokens":16,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":3})
        );
        assert!(v["stop_sequence"].is_null());
    }

    #[test]
    fn cache_directives_split_the_prompt() {
        let body = |t: &str| json!({"messages": [{"role": "user", "content": t}]});
        assert_eq!(plan_input(&body("hi"), 50), InputUsage::uncached(50));
        assert_eq!(
            plan_input(&body("SIM_CACHE_READ=30 SIM_CACHE_WRITE=5"), 50),
            InputUsage {
                input_tokens: 15,
                cache_creation_input_tokens: 5,
                cache_read_input_tokens: 30,
                cache_creation_1h_input_tokens: 0,
            }
        );
        // Capped: reads first, writes get what is left.
        assert_eq!(
            plan_input(&body("SIM_CACHE_READ=40 SIM_CACHE_WRITE=40"), 50),
            InputUsage {
                input_tokens: 0,
                cache_creation_input_tokens: 10,
                cache_read_input_tokens: 40,
                cache_creation_1h_input_tokens: 0,
            }
        );
        assert_eq!(
            plan_input(&body("SIM_CACHE_READ=99999999999999999999999"), 7).cache_read_input_tokens,
            7
        );
        // 1-hour writes are a part of the writes, and split out in the body.
        let hour = plan_input(&body("SIM_CACHE_WRITE=8 SIM_CACHE_WRITE_1H=3"), 50);
        assert_eq!(
            (
                hour.cache_creation_input_tokens,
                hour.cache_creation_1h_input_tokens
            ),
            (8, 3)
        );
        let v: Value = serde_json::from_slice(&message_json_with_input(
            "claude-sonnet-4-6",
            hour,
            OutputPlan {
                tokens: 1,
                stop_reason: "end_turn",
            },
        ))
        .unwrap();
        assert_eq!(
            v["usage"]["cache_creation"],
            json!({"ephemeral_5m_input_tokens": 5, "ephemeral_1h_input_tokens": 3})
        );
        let u = plan_input(&body("SIM_CACHE_READ=30 SIM_CACHE_WRITE=5"), 50);
        assert_eq!(u.counted(true), 50);
        assert_eq!(u.counted(false), 20);
        let v: Value = serde_json::from_slice(&message_json_with_input(
            "claude-sonnet-4-6",
            u,
            OutputPlan {
                tokens: 1,
                stop_reason: "end_turn",
            },
        ))
        .unwrap();
        assert_eq!(
            v["usage"],
            json!({"input_tokens":15,"cache_creation_input_tokens":5,"cache_read_input_tokens":30,"output_tokens":1})
        );
    }
}
