//! Deterministic request content for the mixed workload: every generator
//! takes a seeded [`Rng`], so a seed always yields the same bodies.
//!
//! Each kind of content has its own ratio of characters to (simulator)
//! tokens: English prose about 3.9, CJK 1, source code and JSON 2–3, a
//! one-line chat turn mostly per-message overhead. That spread is what a
//! single learned correction per model cannot follow.

use serde_json::{json, Map, Value};

pub const HAIKU: &str = "claude-3-haiku@20240307";

/// SplitMix64: small, seeded, the same on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// A child generator, so one piece of content does not shift the next.
    pub fn fork(&mut self) -> Rng {
        Rng(self.next_u64())
    }
}

const FUNCTION_WORDS: &[&str] = &[
    "the", "of", "and", "to", "a", "in", "is", "it", "for", "on", "as", "by", "at", "or", "an",
    "be", "we", "not", "but",
];
pub const SHORT_WORDS: &[&str] = &[
    "that", "with", "have", "this", "from", "they", "were", "been", "more", "when", "will", "time",
    "work", "year", "some", "only", "over", "also", "most", "made", "many", "must", "back", "much",
    "well", "each", "just", "into", "than", "what", "your", "said", "them", "then", "like", "long",
    "make", "know", "take", "come", "good", "give", "city", "road", "land", "hand", "part", "life",
    "case", "week", "fact", "area", "team", "idea", "body", "book", "word", "home", "line", "name",
    "form", "side", "kind", "head", "food", "door", "face", "plan", "rule", "past", "view", "role",
    "data", "rate", "once", "both", "very", "same", "next", "main", "free", "open", "real", "full",
    "hard", "easy", "help", "move", "show", "turn", "keep", "need", "feel", "seem", "find", "tell",
    "call", "last", "high", "late", "near",
];
const MEDIUM_WORDS: &[&str] = &[
    "between",
    "because",
    "through",
    "another",
    "without",
    "children",
    "language",
    "building",
    "question",
    "problems",
    "research",
    "evidence",
    "together",
    "possible",
    "students",
    "business",
    "economic",
    "national",
    "response",
    "approach",
    "material",
    "everyone",
    "increase",
    "included",
    "probably",
    "personal",
    "security",
    "customer",
    "although",
    "decision",
    "analysis",
    "strategy",
    "practice",
    "hospital",
    "mountain",
    "thousand",
    "interest",
    "position",
    "standard",
    "evening",
    "medicine",
    "continue",
    "therefore",
    "directly",
    "recently",
    "families",
    "majority",
    "attended",
    "training",
    "software",
    "computer",
    "reported",
    "shortage",
    "planning",
];
const LONG_WORDS: &[&str] = &[
    "information",
    "development",
    "relationship",
    "environment",
    "significant",
    "particularly",
    "organization",
    "understanding",
    "neighborhood",
    "construction",
    "intelligence",
    "contribution",
    "professional",
    "requirements",
];

/// Function words 30%, short 40%, medium 25%, long 5%: plain English runs
/// about 3.9 characters a simulator token (chars/3.5 guesses ~12% high).
fn english_word(rng: &mut Rng) -> &'static str {
    let list = match rng.below(100) {
        0..30 => FUNCTION_WORDS,
        30..70 => SHORT_WORDS,
        70..95 => MEDIUM_WORDS,
        _ => LONG_WORDS,
    };
    rng.pick(list)
}

fn capitalized(out: &mut String, word: &str) {
    let mut c = word.chars();
    if let Some(first) = c.next() {
        out.push(first.to_ascii_uppercase());
        out.push_str(c.as_str());
    }
}

/// One sentence of 6 to 22 words, with the odd comma.
fn sentence(rng: &mut Rng, out: &mut String) {
    let words = rng.range(6, 22);
    for i in 0..words {
        let w = english_word(rng);
        if i == 0 {
            capitalized(out, w);
        } else {
            out.push(' ');
            out.push_str(w);
        }
        if i + 1 < words && i > 1 && rng.below(9) == 0 {
            out.push(',');
        }
    }
    out.push(if rng.below(12) == 0 { '?' } else { '.' });
}

/// English prose of at least `chars` characters, in paragraphs of 3 to 7
/// sentences.
pub fn english_prose(rng: &mut Rng, chars: usize) -> String {
    let mut out = String::with_capacity(chars + 200);
    let mut left = rng.range(3, 7);
    while out.len() < chars {
        sentence(rng, &mut out);
        left -= 1;
        if left == 0 {
            out.push_str("\n\n");
            left = rng.range(3, 7);
        } else {
            out.push(' ');
        }
    }
    out.truncate(out.trim_end().len());
    out
}

/// A long document: a title, then sections with headings and paragraphs.
pub fn document(rng: &mut Rng, chars: usize) -> String {
    let mut out = String::with_capacity(chars + 400);
    out.push_str("# ");
    sentence(rng, &mut out);
    out.push_str("\n\n");
    let mut section = 1;
    while out.len() < chars {
        out.push_str(&format!("## {section}. "));
        capitalized(&mut out, rng.pick(MEDIUM_WORDS));
        out.push(' ');
        out.push_str(rng.pick(SHORT_WORDS));
        out.push_str("\n\n");
        let size = rng.range(2_000, 6_000) as usize;
        out.push_str(&english_prose(rng, size));
        out.push_str("\n\n");
        section += 1;
    }
    out.truncate(out.trim_end().len());
    out
}

const CJK_PHRASES: &[&str] = &[
    "今日は",
    "天気が",
    "とても",
    "良いので",
    "公園を",
    "散歩しました",
    "会議の",
    "資料を",
    "準備して",
    "ください",
    "新しい",
    "技術の",
    "開発は",
    "重要です",
    "私たちは",
    "東京で",
    "働いています",
    "問題を",
    "解決する",
    "ために",
    "データを",
    "分析した",
    "結果",
    "情報",
    "システムの",
    "設計について",
    "説明します",
    "我们今天",
    "讨论了",
    "这个项目的",
    "进展",
    "非常重要",
    "文化と",
    "歴史を",
    "学ぶ",
    "ことは",
    "大切です",
];

/// Japanese and Chinese prose of about `chars` characters (a token each).
pub fn cjk_prose(rng: &mut Rng, chars: usize) -> String {
    let mut out = String::new();
    let mut n = 0;
    while n < chars {
        let phrases = rng.range(3, 8);
        for i in 0..phrases {
            let p = rng.pick(CJK_PHRASES);
            out.push_str(p);
            n += p.chars().count();
            if i + 1 < phrases && rng.below(3) == 0 {
                out.push('、');
                n += 1;
            }
        }
        out.push('。');
        n += 1;
        if rng.below(6) == 0 {
            out.push('\n');
        }
    }
    out
}

fn ident(rng: &mut Rng) -> String {
    let parts = rng.range(1, 3);
    (0..parts)
        .map(|_| {
            let list = if rng.below(3) == 0 {
                MEDIUM_WORDS
            } else {
                SHORT_WORDS
            };
            rng.pick(list)
        })
        .collect::<Vec<_>>()
        .join("_")
}

fn type_name(rng: &mut Rng) -> String {
    let mut out = String::new();
    for _ in 0..rng.range(1, 2) {
        capitalized(&mut out, rng.pick(SHORT_WORDS));
    }
    capitalized(
        &mut out,
        rng.pick(&["Config", "State", "Error", "Index", "Record", "Table"]),
    );
    out
}

fn rust_function(rng: &mut Rng, out: &mut String) {
    let (f, arg, list, field, ty, ret) = (
        ident(rng),
        ident(rng),
        ident(rng),
        ident(rng),
        type_name(rng),
        type_name(rng),
    );
    let n = rng.range(2, 512);
    out.push_str(&format!("/// {}\n", english_prose(rng, 60)));
    out.push_str(&format!(
        "pub fn {f}(&self, {arg}: &{ty}, limit: usize) -> Result<{ret}, Error> {{\n"
    ));
    out.push_str(&format!(
        "    let mut {list} = Vec::with_capacity(limit.min({n}));\n"
    ));
    out.push_str(&format!(
        "    for item in self.{field}.iter().filter(|x| x.{field} > {n}) {{\n"
    ));
    out.push_str(&format!(
        "        if let Some(value) = {arg}.get(&item.{field}) {{\n            {list}.push(value.clone());\n        }} else {{\n            return Err(Error::Missing(format!(\"{field} {{}}\", item.id)));\n        }}\n"
    ));
    out.push_str("    }\n");
    out.push_str(&format!(
        "    {list}.sort_by(|a, b| b.{field}.cmp(&a.{field}));\n    Ok({ret}::new({list}))\n}}\n\n"
    ));
}

fn python_function(rng: &mut Rng, out: &mut String) {
    let (f, arg, field, other) = (ident(rng), ident(rng), ident(rng), ident(rng));
    let n = rng.range(2, 512);
    out.push_str(&format!("def {f}(self, {arg}, {other}=None):\n"));
    out.push_str(&format!("    \"\"\"{}\"\"\"\n", english_prose(rng, 60)));
    out.push_str("    result = []\n");
    out.push_str(&format!(
        "    for item in self.{field}:\n        if item.{field} is not None and item.{field} > {n}:\n            result.append({{\"id\": item.id, \"{field}\": item.{field}}})\n"
    ));
    out.push_str(&format!(
        "        elif {other} is not None:\n            result.append({other}(item))\n"
    ));
    out.push_str(&format!(
        "    return sorted(result, key=lambda r: r[\"{field}\"], reverse=True)[:{n}]\n\n"
    ));
}

/// Rust- or Python-looking source of at least `chars` characters.
pub fn source_code(rng: &mut Rng, chars: usize) -> (&'static str, String) {
    let rust = rng.below(2) == 0;
    let mut out = String::with_capacity(chars + 600);
    if rust {
        out.push_str("use std::collections::HashMap;\n\nuse crate::error::Error;\n\n");
    } else {
        out.push_str("import json\nfrom dataclasses import dataclass\n\n\n");
    }
    while out.len() < chars {
        if rust {
            rust_function(rng, &mut out);
        } else {
            python_function(rng, &mut out);
        }
    }
    (if rust { "rust" } else { "python" }, out)
}

fn tool_definition(rng: &mut Rng, name: &str) -> Value {
    let mut properties = Map::new();
    for _ in 0..rng.range(2, 6) {
        let kind = rng.pick(&["string", "integer", "boolean", "array"]);
        let size = rng.range(40, 160) as usize;
        let description = english_prose(rng, size);
        let mut prop = json!({"type": kind, "description": description});
        if kind == "array" {
            prop["items"] = json!({"type": "string"});
        }
        properties.insert(ident(rng), prop);
    }
    let required: Vec<String> = properties.keys().take(1).cloned().collect();
    let size = rng.range(200, 800) as usize;
    let description = english_prose(rng, size);
    json!({
        "name": name,
        "description": description,
        "input_schema": {"type": "object", "properties": properties, "required": required}
    })
}

fn record(rng: &mut Rng, id: u64) -> Value {
    let name = format!("{} {}", rng.pick(SHORT_WORDS), rng.pick(MEDIUM_WORDS));
    json!({
        "id": id,
        "name": name,
        "email": format!("{}.{}@example.com", rng.pick(SHORT_WORDS), rng.range(1, 999)),
        "created_at": format!("2024-{:02}-{:02}T{:02}:{:02}:00Z", rng.range(1, 12), rng.range(1, 28), rng.below(24), rng.below(60)),
        "tags": [rng.pick(SHORT_WORDS), rng.pick(SHORT_WORDS)],
        "score": (rng.unit() * 1000.0).round() / 1000.0,
        "active": rng.below(2) == 0,
        "region": rng.pick(&["us-east", "eu-west", "ap-south"]),
    })
}

const TOOL_NAMES: &[&str] = &[
    "search_customers",
    "get_order",
    "list_invoices",
    "update_ticket",
    "run_query",
    "fetch_metrics",
    "send_email",
    "create_report",
];

/// A tool-use turn: tool definitions, the user's ask, the assistant's
/// `tool_use` with a JSON input, and a `tool_result` holding `records`
/// JSON records; `directive` goes in the last user message.
pub fn tool_use(rng: &mut Rng, records: u64, directive: &str, max_tokens: u64) -> Value {
    let tools: Vec<Value> = (0..rng.range(3, 8))
        .map(|i| tool_definition(rng, TOOL_NAMES[i as usize]))
        .collect();
    let name = tools[0]["name"].clone();
    let rows: Vec<Value> = (0..records).map(|i| record(rng, 1000 + i)).collect();
    let result = json!({"total": records, "page": 1, "results": rows}).to_string();
    let ask = english_prose(rng, 120);
    json!({
        "model": HAIKU,
        "max_tokens": max_tokens,
        "tools": tools,
        "messages": [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look that up."},
                {"type": "tool_use", "id": "toolu_01", "name": name,
                 "input": {"query": rng.pick(SHORT_WORDS), "filters": {"active": true, "region": "eu-west"}, "limit": records}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": result},
                {"type": "text", "text": directive}
            ]}
        ]
    })
}

const TINY: &[&str] = &[
    "Hi!",
    "Hello!",
    "Thanks!",
    "ok",
    "Thank you, that works.",
    "What time is it in Tokyo?",
    "Can you say that again?",
    "Great!",
];

pub fn tiny(rng: &mut Rng) -> &'static str {
    rng.pick(TINY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_sim::tokenizer::count_text;

    fn chars_per_token(text: &str) -> f64 {
        text.chars().count() as f64 / count_text(text) as f64
    }

    #[test]
    fn content_is_deterministic_and_shaped_like_its_kind() {
        let english = english_prose(&mut Rng::new(7), 50_000);
        assert_eq!(english, english_prose(&mut Rng::new(7), 50_000));
        assert_ne!(english, english_prose(&mut Rng::new(8), 50_000));
        let ratio = chars_per_token(&english);
        assert!((3.7..4.2).contains(&ratio), "English: {ratio}");

        let cjk = cjk_prose(&mut Rng::new(7), 5_000);
        let ratio = chars_per_token(&cjk);
        assert!((0.9..1.2).contains(&ratio), "CJK: {ratio}");

        for seed in [1, 2] {
            let (lang, code) = source_code(&mut Rng::new(seed), 20_000);
            let ratio = chars_per_token(&code);
            assert!(ratio < 3.5, "{lang}: {ratio}");
        }

        let body = tool_use(&mut Rng::new(7), 50, "SIM_OUTPUT_TOKENS=100", 1024);
        let json = body.to_string();
        let ratio = json.len() as f64 / spillway_sim::count_tokens(&body) as f64;
        assert!(ratio < 3.5, "JSON tool use: {ratio}");
    }
}
