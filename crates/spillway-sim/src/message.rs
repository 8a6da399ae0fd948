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
//! Responses use the Anthropic model id (`claude-3-haiku-20240307`: the
//! Vertex `@` becomes `-`) and a `msg_vrtx_` + 24 alphanumerics id, as
//! Vertex does.

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

/// The Anthropic form of a Vertex model id (`@` → `-`).
pub fn anthropic_model_id(vertex_id: &str) -> String {
    vertex_id.replace('@', "-")
}

/// Finds `SIM_OUTPUT_TOKENS=<n>` in the last user message, if any.
pub fn requested_output_tokens(body: &Value) -> Option<u64> {
    let messages = body.get("messages")?.as_array()?;
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))?;
    match last_user.get("content")? {
        Value::String(s) => parse_directive(s),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .find_map(parse_directive),
        _ => None,
    }
}

fn parse_directive(text: &str) -> Option<u64> {
    const KEY: &str = "SIM_OUTPUT_TOKENS=";
    let at = text.find(KEY)? + KEY.len();
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

/// Usage as Vertex reports it (cache fields always present, zero here).
#[derive(Serialize)]
pub(crate) struct Usage {
    pub input_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub output_tokens: u64,
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

/// The rawPredict body: an Anthropic `Message`, field order as Vertex.
pub fn message_json(model: &str, input_tokens: u64, plan: OutputPlan) -> Vec<u8> {
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
        usage: Usage {
            input_tokens,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
            output_tokens: plan.tokens,
        },
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
}
