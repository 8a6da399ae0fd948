//! Input-token estimates: what a Messages (or `count_tokens`) body will cost,
//! measured locally, in one pass, before the request is sent.
//!
//! # Why estimate before sending
//!
//! Vertex grants each (location, model) a per-minute budget of input tokens,
//! and learns a request's real size only after it has accepted it. To keep a
//! location under its budget (and spill elsewhere instead of collecting a
//! 429) the gateway must *reserve* quota before the call, so it needs a
//! number up front. Asking Vertex's `count_tokens` for every request would
//! add a round trip to each one; this module measures the body instead, and
//! the gateway turns the measure into tokens with rates it learns from the
//! `usage` every answer reports ([`crate::learn`]).
//!
//! # Features, not one ratio
//!
//! One characters-per-token ratio cannot describe a prompt: a request pays a
//! fixed overhead and a per-message one, English prose runs about 3.5
//! characters a token, CJK text about one token a character, code and JSON
//! spend a token on most punctuation, and base64 tokenizes badly. So the
//! walk counts [`Features`] — how many of each kind of unit the body holds —
//! and the estimate is linear in them: `Σ rate(feature) × count(feature)`.
//! With the rates learned per model and feature, a few "Hello!" turns teach
//! the overheads (which dominate them) and leave the prose rate alone, and
//! CJK traffic teaches the CJK rate without touching anybody's English.
//!
//! The [`Rates::prior`] start honest: English prose at the design card's ~3.5
//! characters a token, CJK at one token a character, punctuation near a
//! token each, images by Claude's pixel rule ([`crate::image`]).
//!
//! What counts as text:
//! - `system`: a string, or the `text` of its `text` blocks;
//! - each message's `content`: a string, or its blocks: `text` → `text`;
//!   `tool_use` → `name` plus the serialized `input` (as JSON); `tool_result`
//!   → its `content` (a string — as JSON when it looks like JSON — or nested
//!   blocks counted the same way, images included); `document` with a `text`
//!   source → `source.data` (and with a `content` source → its nested
//!   blocks); `thinking` → `thinking`. Other blocks (`redacted_thinking`,
//!   PDF documents, …) are not counted;
//! - each tool in `tools`: `name` + `description` + serialized
//!   `input_schema` (as JSON).
//!
//! Serialized sub-values are measured by streaming them through a counting
//! writer: nothing proportional to the body is allocated, and the whole body
//! is never re-serialized. Each character is looked at once.
//!
//! # A floor for refusals
//!
//! A learned, padded estimate is a guess; refusing a request for good (a
//! 400 that says "never retry") must not rest on one. [`InputEstimate::floor`]
//! is a lower bound no tokenizer undercuts: the non-whitespace bytes of the
//! counted text over [`MAX_BYTES_PER_TOKEN`]. Only it decides that a request
//! can never fit.

use serde_json::{Map, Value};

pub use crate::image::ImageRule;
use crate::image::{base64_image_dimensions, image_tokens};

/// Bytes of non-whitespace text one token can cover at most, generously:
/// real tokenizers average 3–4 bytes a token on English and fewer on
/// anything else, and their longest ordinary tokens are far below this.
pub const MAX_BYTES_PER_TOKEN: u64 = 16;

/// The characters-per-token ratio the text priors are calibrated to.
pub const DEFAULT_CHARS_PER_TOKEN: f64 = 3.5;

/// A base64-alphabet run at least this long, with letters and digits in it,
/// is counted as base64 rather than as words (no English word is so long).
const BASE64_MIN_RUN: u32 = 32;

/// The kinds of unit a body is measured in. Each has its own learned rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Feature {
    /// The request itself (always 1): the framing every request pays.
    Request,
    /// One per element of `messages`: role and turn markers.
    Message,
    /// ASCII letters.
    Letter,
    /// Runs of ASCII letters (words): the part of a word's cost that does
    /// not grow with its length.
    Word,
    /// ASCII digits.
    Digit,
    /// ASCII punctuation and symbols in text.
    Punct,
    /// Whitespace characters.
    Space,
    /// Han ideographs, kana, Hangul and CJK punctuation.
    Cjk,
    /// Every other non-ASCII character (accented Latin, Cyrillic, Arabic,
    /// emoji, ...).
    OtherScript,
    /// Characters of base64-looking runs (long runs of `[A-Za-z0-9+/=_-]`).
    Base64,
    /// JSON's structural characters (`{}[]":,`) in tool schemas, tool inputs
    /// and JSON tool results.
    JsonPunct,
    /// Tokens by Claude's image rule.
    Image,
}

/// How many [`Feature`]s there are.
pub const FEATURES: usize = 12;

impl Feature {
    pub const ALL: [Feature; FEATURES] = [
        Feature::Request,
        Feature::Message,
        Feature::Letter,
        Feature::Word,
        Feature::Digit,
        Feature::Punct,
        Feature::Space,
        Feature::Cjk,
        Feature::OtherScript,
        Feature::Base64,
        Feature::JsonPunct,
        Feature::Image,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::Request => "request",
            Feature::Message => "message",
            Feature::Letter => "letter",
            Feature::Word => "word",
            Feature::Digit => "digit",
            Feature::Punct => "punct",
            Feature::Space => "space",
            Feature::Cjk => "cjk",
            Feature::OtherScript => "other_script",
            Feature::Base64 => "base64",
            Feature::JsonPunct => "json_punct",
            Feature::Image => "image",
        }
    }

    /// Tokens per unit before anything is learned, for a tokenizer of
    /// [`DEFAULT_CHARS_PER_TOKEN`]. English prose — 4.7-letter words, a
    /// space each and some punctuation — lands at about 3.4 characters a
    /// token: the card's 3.5, rounded to the safe side.
    pub fn prior(self) -> f64 {
        match self {
            Feature::Request => 4.0,
            Feature::Message => 3.0,
            Feature::Letter => 0.25,
            Feature::Word => 0.35,
            Feature::Digit => 0.4,
            Feature::Punct => 0.8,
            Feature::Space => 0.05,
            Feature::Cjk => 1.0,
            Feature::OtherScript => 0.5,
            Feature::Base64 => 0.75,
            Feature::JsonPunct => 0.6,
            Feature::Image => 1.0,
        }
    }

    /// Whether the prior scales with a model's characters-per-token ratio
    /// (text measured in characters does; overheads and images do not).
    fn scales_with_text(self) -> bool {
        !matches!(
            self,
            Feature::Request | Feature::Message | Feature::Image | Feature::Cjk
        )
    }
}

/// How many of each [`Feature`] a body holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features(pub [u64; FEATURES]);

impl Features {
    pub fn get(&self, feature: Feature) -> u64 {
        self.0[feature as usize]
    }

    fn add(&mut self, feature: Feature, n: u64) {
        let slot = &mut self.0[feature as usize];
        *slot = slot.saturating_add(n);
    }
}

/// Tokens per unit of each feature: a model's learned rates, or the priors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates(pub [f64; FEATURES]);

impl Rates {
    /// The priors, with text rates scaled for a tokenizer of
    /// `chars_per_token` (3.5 when it is not a positive finite number).
    pub fn prior(chars_per_token: f64) -> Self {
        let cpt = if chars_per_token.is_finite() && chars_per_token > 0.0 {
            chars_per_token
        } else {
            DEFAULT_CHARS_PER_TOKEN
        };
        let mut rates = [0.0; FEATURES];
        for f in Feature::ALL {
            let scale = if f.scales_with_text() {
                DEFAULT_CHARS_PER_TOKEN / cpt
            } else {
                1.0
            };
            rates[f as usize] = f.prior() * scale;
        }
        Rates(rates)
    }

    pub fn get(&self, feature: Feature) -> f64 {
        self.0[feature as usize]
    }

    /// The estimate of `features` at these rates, in (fractional) tokens.
    pub fn tokens(&self, features: &Features) -> f64 {
        self.0
            .iter()
            .zip(features.0.iter())
            .map(|(r, &n)| r * n as f64)
            .sum()
    }
}

/// What kind of content dominates a request, for learning margins and for
/// the estimate-accuracy metrics. A small fixed set (metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum ContentClass {
    /// Overheads are most of it: a one-line chat turn.
    Tiny,
    Prose,
    /// Punctuation and digits carry a large share: source code, tables.
    Code,
    Cjk,
    OtherScript,
    Base64,
    /// Mostly JSON: tool definitions, tool inputs and results.
    Json,
    Image,
}

pub const CONTENT_CLASSES: usize = 8;

impl ContentClass {
    pub const ALL: [ContentClass; CONTENT_CLASSES] = [
        ContentClass::Tiny,
        ContentClass::Prose,
        ContentClass::Code,
        ContentClass::Cjk,
        ContentClass::OtherScript,
        ContentClass::Base64,
        ContentClass::Json,
        ContentClass::Image,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ContentClass::Tiny => "tiny",
            ContentClass::Prose => "prose",
            ContentClass::Code => "code",
            ContentClass::Cjk => "cjk",
            ContentClass::OtherScript => "other_script",
            ContentClass::Base64 => "base64",
            ContentClass::Json => "json",
            ContentClass::Image => "image",
        }
    }
}

/// The measure of one body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InputEstimate {
    pub features: Features,
    /// Characters of text counted (excluding overheads and images).
    pub text_chars: u64,
    /// Of those, characters read as JSON.
    pub json_chars: u64,
    /// Non-whitespace bytes of text, for [`InputEstimate::floor`].
    pub dense_bytes: u64,
    /// Number of image blocks seen (including inside tool results).
    pub images: u32,
    /// The prompt-cache breakpoints (`cache_control`), in Anthropic's prefix
    /// order (tools, system, messages); the first `breakpoint_count` are set.
    pub breakpoints: [Breakpoint; MAX_BREAKPOINTS],
    pub breakpoint_count: u8,
}

/// Anthropic allows four cache breakpoints a request.
pub const MAX_BREAKPOINTS: usize = 4;

/// The prompt up to and including one `cache_control` block: its measure,
/// and a fingerprint of its content (equal prefixes, equal fingerprints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Breakpoint {
    pub features: Features,
    pub fingerprint: u64,
}

impl InputEstimate {
    /// The breakpoints that are set.
    pub fn breakpoints(&self) -> &[Breakpoint] {
        &self.breakpoints[..usize::from(self.breakpoint_count)]
    }

    /// Input tokens the request costs at least, whatever the tokenizer:
    /// the basis of every "can never fit" refusal. Images count nothing here
    /// (their rule is Claude's, but the floor trusts only bytes).
    pub fn floor(&self) -> u64 {
        self.dense_bytes.div_ceil(MAX_BYTES_PER_TOKEN)
    }

    /// The estimate at `rates`, rounded up.
    pub fn tokens(&self, rates: &Rates) -> u64 {
        // `as` saturates: absurd rates give u64::MAX, not a panic.
        rates.tokens(&self.features).ceil() as u64
    }

    /// What dominates this body at `rates`.
    pub fn class(&self, rates: &Rates) -> ContentClass {
        let f = &self.features;
        let part = |features: &[Feature]| -> f64 {
            features
                .iter()
                .map(|&x| rates.get(x) * f.get(x) as f64)
                .sum()
        };
        let total = rates.tokens(f);
        if total <= 0.0 || part(&[Feature::Request, Feature::Message]) * 2.0 >= total {
            return ContentClass::Tiny;
        }
        if part(&[Feature::Image]) * 2.0 >= total {
            return ContentClass::Image;
        }
        if self.json_chars * 2 >= self.text_chars.max(1) {
            return ContentClass::Json;
        }
        let shares = [
            (ContentClass::Cjk, part(&[Feature::Cjk])),
            (ContentClass::OtherScript, part(&[Feature::OtherScript])),
            (ContentClass::Base64, part(&[Feature::Base64])),
        ];
        if let Some((class, _)) = shares.iter().find(|(_, p)| p * 2.0 >= total) {
            return *class;
        }
        let symbols = part(&[Feature::Punct, Feature::Digit, Feature::JsonPunct]);
        let words = part(&[Feature::Letter, Feature::Word]);
        if symbols >= words * 0.5 {
            ContentClass::Code
        } else {
            ContentClass::Prose
        }
    }
}

/// Measures a Messages (or count_tokens) body.
///
/// Never panics, whatever the JSON: fields of the wrong type are skipped.
pub fn estimate_input(body: &Map<String, Value>, image: ImageRule) -> InputEstimate {
    let mut acc = Acc {
        rule: image,
        est: InputEstimate::default(),
        fingerprint: Fingerprint::default(),
        breakpoints_left: count_breakpoints(body),
    };
    acc.est.features.add(Feature::Request, 1);

    // Anthropic's prefix order, so a breakpoint's measure is its prefix's.
    if let Some(Value::Array(tools)) = body.get("tools") {
        for tool in tools {
            acc.text_field(tool, "name");
            acc.text_field(tool, "description");
            if let Some(schema) = tool.get("input_schema") {
                acc.serialized(schema);
            }
            acc.maybe_breakpoint(tool);
        }
    }

    match body.get("system") {
        Some(Value::String(text)) => acc.text(text, false),
        Some(Value::Array(blocks)) => {
            for block in blocks {
                if block_type(block) == Some("text") {
                    acc.text_field(block, "text");
                }
                acc.maybe_breakpoint(block);
            }
        }
        _ => {}
    }

    if let Some(Value::Array(messages)) = body.get("messages") {
        for message in messages {
            acc.est.features.add(Feature::Message, 1);
            acc.fingerprint.mix(b"\x1emessage");
            match message.get("content") {
                Some(Value::String(text)) => acc.text(text, false),
                Some(Value::Array(blocks)) => {
                    for block in blocks {
                        acc.block(block, true);
                        acc.maybe_breakpoint(block);
                    }
                }
                _ => {}
            }
        }
    }
    acc.est
}

/// How many blocks carry `cache_control` (at most [`MAX_BREAKPOINTS`]):
/// a walk over blocks, not characters, so bodies without any pay nothing
/// for fingerprints.
fn count_breakpoints(body: &Map<String, Value>) -> usize {
    let marked = |v: &Value| v.get("cache_control").is_some();
    let in_array = |v: Option<&Value>| match v {
        Some(Value::Array(items)) => items.iter().filter(|i| marked(i)).count(),
        _ => 0,
    };
    let mut n = in_array(body.get("tools")) + in_array(body.get("system"));
    if let Some(Value::Array(messages)) = body.get("messages") {
        n += messages
            .iter()
            .map(|m| in_array(m.get("content")))
            .sum::<usize>();
    }
    n.min(MAX_BREAKPOINTS)
}

/// A fast, non-cryptographic fingerprint of the text a prefix holds: it
/// only has to tell one prompt prefix from another, and a collision only
/// misjudges a cache hit (which settlement corrects).
#[derive(Default)]
struct Fingerprint(u64);

impl Fingerprint {
    fn mix(&mut self, bytes: &[u8]) {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut h = self.0 ^ (bytes.len() as u64).wrapping_mul(K);
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            h = (h ^ word).wrapping_mul(K).rotate_left(29);
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.0 = (h ^ u64::from_le_bytes(tail))
            .wrapping_mul(K)
            .rotate_left(29);
    }
}

/// Running totals while walking a body.
struct Acc {
    rule: ImageRule,
    est: InputEstimate,
    fingerprint: Fingerprint,
    /// Breakpoints not yet reached: fingerprints are taken only while some
    /// are ahead.
    breakpoints_left: usize,
}

impl Acc {
    /// Records a breakpoint after `block` if it carries `cache_control`.
    fn maybe_breakpoint(&mut self, block: &Value) {
        if self.breakpoints_left == 0 || block.get("cache_control").is_none() {
            return;
        }
        let i = usize::from(self.est.breakpoint_count);
        self.est.breakpoints[i] = Breakpoint {
            features: self.est.features,
            fingerprint: self.fingerprint.0,
        };
        self.est.breakpoint_count += 1;
        self.breakpoints_left -= 1;
    }

    fn text(&mut self, text: &str, json: bool) {
        if self.breakpoints_left > 0 {
            self.fingerprint.mix(text.as_bytes());
        }
        let mut scan = TextScan::new(json);
        scan.scan(text);
        scan.finish(&mut self.est);
    }

    /// Counts `value[key]` if it is a string.
    fn text_field(&mut self, value: &Value, key: &str) {
        if let Some(Value::String(text)) = value.get(key) {
            self.text(text, false);
        }
    }

    /// A tool result's text: JSON when it looks like JSON.
    fn result_text(&mut self, text: &str) {
        let json = matches!(text.trim_start().as_bytes().first(), Some(b'{' | b'['));
        self.text(text, json);
    }

    /// Measures `value` serialized as compact JSON, without building the
    /// string.
    fn serialized(&mut self, value: &Value) {
        let mut writer = ScanWriter {
            scan: TextScan::new(true),
            pending: [0; 4],
            pending_len: 0,
            fingerprint: (self.breakpoints_left > 0).then(Fingerprint::default),
        };
        // Writing to the scanner cannot fail, and serializing a `Value`
        // cannot either (its map keys are strings).
        let _ = serde_json::to_writer(&mut writer, value);
        if let Some(f) = writer.fingerprint {
            self.fingerprint.mix(&f.0.to_le_bytes());
        }
        writer.scan.finish(&mut self.est);
    }

    fn image(&mut self, block: &Value) {
        self.est.images = self.est.images.saturating_add(1);
        let source = block.get("source");
        let data = match (
            source.and_then(|s| s.get("type")),
            source.and_then(|s| s.get("data")),
        ) {
            (Some(Value::String(kind)), Some(Value::String(data))) if kind == "base64" => {
                Some(data.as_str())
            }
            _ => None,
        };
        if let (Some(data), true) = (data, self.breakpoints_left > 0) {
            self.fingerprint.mix(data.as_bytes());
        }
        let tokens = match data.and_then(base64_image_dimensions) {
            Some((w, h)) => image_tokens(w, h, self.rule),
            None => self.rule.unknown_image_tokens,
        };
        self.est.features.add(Feature::Image, tokens);
    }

    /// Counts one content block. `top_level` is false inside a
    /// `tool_result` or document, where another `tool_result` is not
    /// expected and is ignored (this also bounds the recursion).
    fn block(&mut self, block: &Value, top_level: bool) {
        match block_type(block) {
            Some("text") => self.text_field(block, "text"),
            Some("thinking") => self.text_field(block, "thinking"),
            Some("image") => self.image(block),
            Some("tool_use") => {
                self.text_field(block, "name");
                if let Some(input) = block.get("input") {
                    self.serialized(input);
                }
            }
            Some("tool_result") if top_level => match block.get("content") {
                Some(Value::String(text)) => self.result_text(text),
                Some(Value::Array(blocks)) => {
                    for inner in blocks {
                        self.block(inner, false);
                    }
                }
                _ => {}
            },
            Some("document") => {
                let Some(source) = block.get("source") else {
                    return;
                };
                match block_type(source) {
                    Some("text") => self.text_field(source, "data"),
                    Some("content") if top_level => match source.get("content") {
                        Some(Value::String(text)) => self.text(text, false),
                        Some(Value::Array(blocks)) => {
                            for inner in blocks {
                                self.block(inner, false);
                            }
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

fn block_type(block: &Value) -> Option<&str> {
    block.get("type").and_then(Value::as_str)
}

/// Han ideographs, kana, Hangul, CJK punctuation and full-width forms.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3000..=0x30FF
        | 0x3400..=0x4DBF
        | 0x4E00..=0x9FFF
        | 0xAC00..=0xD7AF
        | 0xF900..=0xFAFF
        | 0xFF00..=0xFFEF
        | 0x20000..=0x2FA1F)
}

/// One pass over one piece of text: every character classified once, with
/// the run state words and base64 detection need, and no allocation.
struct TextScan {
    json: bool,
    counts: Features,
    chars: u64,
    dense_bytes: u64,
    in_word: bool,
    /// The current run of base64-alphabet characters, and what it added to
    /// `counts` (taken back if the run turns out to be base64).
    run: Run,
}

#[derive(Default, Clone, Copy)]
struct Run {
    len: u32,
    letters: u64,
    words: u64,
    digits: u64,
    punct: u64,
}

impl TextScan {
    fn new(json: bool) -> Self {
        Self {
            json,
            counts: Features::default(),
            chars: 0,
            dense_bytes: 0,
            in_word: false,
            run: Run::default(),
        }
    }

    /// Scans `text`, a word at a time where it can: a run of ASCII letters
    /// is counted with one loop, everything else a character at a time.
    fn scan(&mut self, text: &str) {
        let bytes = text.as_bytes();
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            if b.is_ascii_alphabetic() {
                let start = i;
                while bytes.get(i).is_some_and(u8::is_ascii_alphabetic) {
                    i += 1;
                }
                let n = (i - start) as u64;
                self.chars += n;
                self.dense_bytes += n;
                self.counts.0[Feature::Letter as usize] += n;
                self.run.letters += n;
                self.run.len = self.run.len.saturating_add(n as u32);
                if !self.in_word {
                    self.in_word = true;
                    self.counts.0[Feature::Word as usize] += 1;
                    self.run.words += 1;
                }
            } else if b.is_ascii() {
                self.push(char::from(b));
                i += 1;
            } else if let Some(c) = text.get(i..).and_then(|rest| rest.chars().next()) {
                // `i` is always on a character boundary: it only moves by
                // whole ASCII bytes or whole characters.
                self.push(c);
                i += c.len_utf8();
            } else {
                break;
            }
        }
    }

    fn push(&mut self, c: char) {
        self.chars += 1;
        if c.is_ascii() {
            let b = c as u8;
            if b.is_ascii_whitespace() {
                self.end_run();
                self.in_word = false;
                self.counts.0[Feature::Space as usize] += 1;
                return;
            }
            self.dense_bytes += 1;
            if b.is_ascii_alphabetic() {
                self.counts.0[Feature::Letter as usize] += 1;
                self.run.letters += 1;
                if !self.in_word {
                    self.in_word = true;
                    self.counts.0[Feature::Word as usize] += 1;
                    self.run.words += 1;
                }
                self.run.len = self.run.len.saturating_add(1);
                return;
            }
            self.in_word = false;
            if b.is_ascii_digit() {
                self.counts.0[Feature::Digit as usize] += 1;
                self.run.digits += 1;
                self.run.len = self.run.len.saturating_add(1);
                return;
            }
            let structural =
                self.json && matches!(b, b'{' | b'}' | b'[' | b']' | b'"' | b':' | b',');
            let feature = if structural {
                Feature::JsonPunct
            } else {
                Feature::Punct
            };
            self.counts.0[feature as usize] += 1;
            if matches!(b, b'+' | b'/' | b'=' | b'_' | b'-') {
                self.run.punct += 1;
                self.run.len = self.run.len.saturating_add(1);
            } else {
                self.end_run();
            }
            return;
        }
        self.end_run();
        self.in_word = false;
        if c.is_whitespace() {
            self.counts.0[Feature::Space as usize] += 1;
            return;
        }
        self.dense_bytes += c.len_utf8() as u64;
        let feature = if is_cjk(c) {
            Feature::Cjk
        } else {
            Feature::OtherScript
        };
        self.counts.0[feature as usize] += 1;
    }

    /// Ends a base64-alphabet run: long, mixed runs are base64, and what
    /// they had counted as words, letters and digits moves to [`Feature::Base64`].
    fn end_run(&mut self) {
        let run = std::mem::take(&mut self.run);
        if run.len >= BASE64_MIN_RUN && run.letters > 0 && run.digits > 0 {
            let c = &mut self.counts.0;
            c[Feature::Letter as usize] -= run.letters;
            c[Feature::Word as usize] -= run.words;
            c[Feature::Digit as usize] -= run.digits;
            c[Feature::Punct as usize] -= run.punct.min(c[Feature::Punct as usize]);
            c[Feature::Base64 as usize] += u64::from(run.len);
        }
    }

    fn finish(mut self, est: &mut InputEstimate) {
        self.end_run();
        for f in Feature::ALL {
            est.features.add(f, self.counts.get(f));
        }
        est.text_chars = est.text_chars.saturating_add(self.chars);
        if self.json {
            est.json_chars = est.json_chars.saturating_add(self.chars);
        }
        est.dense_bytes = est.dense_bytes.saturating_add(self.dense_bytes);
    }
}

/// An `io::Write` that scans the UTF-8 text written to it, character by
/// character, holding back a character split across writes.
struct ScanWriter {
    scan: TextScan,
    pending: [u8; 4],
    pending_len: usize,
    fingerprint: Option<Fingerprint>,
}

impl std::io::Write for ScanWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(f) = &mut self.fingerprint {
            f.mix(buf);
        }
        let mut rest = buf;
        // Finish a character begun by the previous write.
        while self.pending_len > 0 && !rest.is_empty() {
            self.pending[self.pending_len] = rest[0];
            self.pending_len += 1;
            rest = &rest[1..];
            if let Ok(s) = std::str::from_utf8(&self.pending[..self.pending_len]) {
                self.scan.scan(s);
                self.pending_len = 0;
            } else if self.pending_len == 4 {
                self.pending_len = 0; // never valid: drop it
            }
        }
        let valid = match std::str::from_utf8(rest) {
            Ok(s) => s,
            Err(e) => {
                let (head, tail) = rest.split_at(e.valid_up_to());
                let keep = tail.len().min(4);
                self.pending[..keep].copy_from_slice(&tail[..keep]);
                self.pending_len = keep;
                // `head` is valid UTF-8 by `valid_up_to`.
                std::str::from_utf8(head).unwrap_or_default()
            }
        };
        self.scan.scan(valid);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::fixtures::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use proptest::prelude::*;
    use serde_json::json;

    const RULE: ImageRule = ImageRule {
        max_long_edge: 1568,
        max_tokens_per_image: 1600,
        unknown_image_tokens: 1600,
    };

    fn body(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("test bodies are objects"),
        }
    }

    fn estimate(value: Value) -> InputEstimate {
        estimate_input(&body(value), RULE)
    }

    fn f(e: &InputEstimate, feature: Feature) -> u64 {
        e.features.get(feature)
    }

    #[test]
    fn counts_each_kind_of_character_once() {
        // "Hi, 42 café 東京" : H i → 1 word, 2 letters; "," punct; 4 2 digits;
        // c a f → 1 word, 3 letters; é other; 東 京 cjk; 4 spaces.
        let e = estimate(json!({
            "messages": [{"role": "user", "content": "Hi, 42 café 東京"}],
        }));
        assert_eq!(f(&e, Feature::Request), 1);
        assert_eq!(f(&e, Feature::Message), 1);
        assert_eq!(f(&e, Feature::Letter), 5);
        assert_eq!(f(&e, Feature::Word), 2);
        assert_eq!(f(&e, Feature::Digit), 2);
        assert_eq!(f(&e, Feature::Punct), 1);
        assert_eq!(f(&e, Feature::Space), 3);
        assert_eq!(f(&e, Feature::OtherScript), 1);
        assert_eq!(f(&e, Feature::Cjk), 2);
        assert_eq!(e.text_chars, 14);
        // Dense bytes: 8 ASCII non-space + é (2) + 東京 (6).
        assert_eq!(e.dense_bytes, 8 + 2 + 6);
    }

    #[test]
    fn counts_system_messages_and_tools() {
        let e = estimate(json!({
            "system": [{"type": "text", "text": "You are terse"}, {"type": "other", "text": "xx"}],
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": []}],
            "tools": [{"name": "get", "description": "Fetch", "input_schema": {"type": "object"}}],
        }));
        assert_eq!(f(&e, Feature::Message), 2);
        // You are terse | Hi | get | Fetch | {"type":"object"}
        assert_eq!(f(&e, Feature::Word), 3 + 1 + 1 + 1 + 2);
        assert_eq!(f(&e, Feature::Letter), 11 + 2 + 3 + 5 + 10);
        // {"type":"object"}: { " " : " " } = 7 structural characters.
        assert_eq!(f(&e, Feature::JsonPunct), 7);
        assert_eq!(f(&e, Feature::Punct), 0);
        assert_eq!(e.json_chars, 17);
    }

    #[test]
    fn counts_each_block_kind() {
        let e = estimate(json!({"messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "abc"},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}},
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "tool_use", "id": "t1", "name": "get", "input": {"q": "é"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "result"},
                {"type": "tool_result", "tool_use_id": "t1", "content": "{\"a\": 1}"},
                {"type": "tool_result", "tool_use_id": "t1", "content": [
                    {"type": "text", "text": "ab"},
                ]},
            ]},
        ]}));
        // abc doc | hmm get {"q":"é"} | result {"a": 1} | ab
        assert_eq!(f(&e, Feature::Letter), 3 + 3 + 3 + 3 + 1 + 6 + 1 + 2);
        assert_eq!(f(&e, Feature::OtherScript), 1);
        assert_eq!(f(&e, Feature::Digit), 1);
        // {"q":"é"} has 7 structural characters, {"a": 1} has 5.
        assert_eq!(f(&e, Feature::JsonPunct), 7 + 5);
        assert_eq!(e.json_chars, 9 + 8);
        assert_eq!(e.images, 0);
    }

    #[test]
    fn base64_runs_are_not_words() {
        let blob = STANDARD.encode((0u8..=255).collect::<Vec<u8>>());
        let e =
            estimate(json!({"messages": [{"role": "user", "content": format!("see {blob} ok")}]}));
        assert_eq!(f(&e, Feature::Base64), blob.len() as u64);
        assert_eq!(f(&e, Feature::Word), 2);
        assert_eq!(f(&e, Feature::Letter), 5);
        assert_eq!(f(&e, Feature::Digit), 0);
        // A long word without digits, or a short code, stays text.
        let e = estimate(
            json!({"messages": [{"role": "user", "content": "abc123 well-known-state-of-the-art-thing-here"}]}),
        );
        assert_eq!(f(&e, Feature::Base64), 0);
        assert_eq!(f(&e, Feature::Digit), 3);
    }

    #[test]
    fn images_are_charged_from_their_headers() {
        let png = STANDARD.encode(png_header(1000, 1000));
        let jpeg = STANDARD.encode(jpeg_header(200, 200, 0xC2, 500));
        let e = estimate(json!({"messages": [
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                {"type": "tool_result", "tool_use_id": "t", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": jpeg}},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "!!garbage"}},
                ]},
            ]},
        ]}));
        assert_eq!(e.images, 4);
        assert_eq!(f(&e, Feature::Image), 1334 + 1600 + 54 + 1600);
        assert_eq!(e.text_chars, 0);
        assert_eq!(e.floor(), 0);
        assert_eq!(e.class(&Rates::prior(3.5)), ContentClass::Image);
    }

    fn prose(words: usize) -> String {
        const WORDS: [&str; 12] = [
            "the", "quota", "gateway", "routes", "every", "request", "to", "a", "region", "with",
            "spare", "capacity",
        ];
        let mut out = String::new();
        for i in 0..words {
            out.push_str(WORDS[(i * 7 + i / 3) % WORDS.len()]);
            out.push_str(if i % 11 == 10 {
                ". "
            } else if i % 5 == 4 {
                ", "
            } else {
                " "
            });
        }
        out
    }

    #[test]
    fn english_prose_costs_about_the_cards_three_and_a_half_characters_a_token() {
        let text = prose(30_000);
        let e = estimate(json!({"messages": [{"role": "user", "content": text}]}));
        let tokens = e.tokens(&Rates::prior(3.5)) as f64;
        let cpt = text.chars().count() as f64 / tokens;
        assert!((3.1..=3.6).contains(&cpt), "{cpt} characters a token");
        assert_eq!(e.class(&Rates::prior(3.5)), ContentClass::Prose);
        // A tokenizer of 2.7 characters a token raises the text rates.
        let newer = e.tokens(&Rates::prior(2.7)) as f64;
        assert!(newer > tokens * 1.25, "{newer} vs {tokens}");
    }

    #[test]
    fn classes_name_what_dominates() {
        let rates = Rates::prior(3.5);
        let class = |content: &str| {
            estimate(json!({"messages": [{"role": "user", "content": content}]})).class(&rates)
        };
        assert_eq!(class("Hi!"), ContentClass::Tiny);
        assert_eq!(
            class(&"東京は日本の首都です。".repeat(20)),
            ContentClass::Cjk
        );
        assert_eq!(
            class(&"Привет, как дела? ".repeat(20)),
            ContentClass::OtherScript
        );
        assert_eq!(
            class(&"fn main() { let x = vec![1, 2, 3]; println!(\"{:?}\", x); }\n".repeat(20)),
            ContentClass::Code
        );
        assert_eq!(class(&prose(200)), ContentClass::Prose);
        let blob = STANDARD.encode(vec![7u8; 3000]) + "A1";
        assert_eq!(class(&blob), ContentClass::Base64);
        let tools: Vec<Value> = (0..10)
            .map(|i| json!({"name": format!("tool_{i}"), "description": "Does one thing.", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}}}}))
            .collect();
        let e = estimate(json!({"tools": tools, "messages": [{"role": "user", "content": "go"}]}));
        assert_eq!(e.class(&rates), ContentClass::Json);
    }

    #[test]
    fn the_floor_counts_dense_bytes_generously() {
        let e = estimate(json!({"messages": [{"role": "user", "content": "x".repeat(170_000)}]}));
        assert_eq!(e.floor(), 170_000u64.div_ceil(MAX_BYTES_PER_TOKEN));
        // Whitespace never raises the floor.
        let e =
            estimate(json!({"messages": [{"role": "user", "content": " \n\t".repeat(10_000)}]}));
        assert_eq!(e.floor(), 0);
    }

    #[test]
    fn bad_ratios_fall_back_to_three_and_a_half() {
        for ratio in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(Rates::prior(ratio), Rates::prior(3.5));
        }
        let e = estimate(json!({"messages": [{"role": "user", "content": "word ".repeat(100)}]}));
        assert_eq!(e.tokens(&Rates([f64::MAX; FEATURES])), u64::MAX);
    }

    #[test]
    fn empty_turns_and_odd_shapes_are_not_free_and_do_not_panic() {
        let e = estimate(json!({"messages": [{"role": "user", "content": []}, {}, 7]}));
        assert_eq!(f(&e, Feature::Message), 3);
        assert_eq!(e.text_chars, 0);
        let e = estimate(json!({
            "system": 5, "messages": {"a": 1}, "tools": "x",
            "content": [{"type": "image"}],
        }));
        assert_eq!(e.features.0.iter().sum::<u64>(), 1); // the request alone
        let e = estimate(json!({"messages": [{"content": [{"type": "image"}]}]}));
        assert_eq!((e.images, f(&e, Feature::Image)), (1, 1600));
    }

    #[test]
    fn breakpoints_measure_and_fingerprint_their_prefixes() {
        let tools = json!([{"name": "read", "description": "Read a file", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}]);
        let turn = |system: &str, last: &str| {
            estimate(json!({
                "tools": tools,
                "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "first question"}]},
                    {"role": "user", "content": [{"type": "text", "text": last, "cache_control": {"type": "ephemeral"}}]},
                ],
            }))
        };
        let a = turn("You are a coding agent.", "second question");
        assert_eq!(a.breakpoints().len(), 3);
        let [tools_bp, system_bp, last_bp] = [a.breakpoints[0], a.breakpoints[1], a.breakpoints[2]];
        // Each breakpoint measures its prefix: tools, then + system, then all.
        assert_eq!(tools_bp.features.get(Feature::Message), 0);
        assert!(system_bp.features.get(Feature::Letter) > tools_bp.features.get(Feature::Letter));
        assert_eq!(last_bp.features, a.features);
        // The same prefix fingerprints the same; a changed turn only changes
        // the breakpoints after it.
        let b = turn("You are a coding agent.", "another question");
        assert_eq!(b.breakpoints[0], tools_bp);
        assert_eq!(b.breakpoints[1], system_bp);
        assert_ne!(b.breakpoints[2].fingerprint, last_bp.fingerprint);
        let c = turn("You are a careful coding agent.", "second question");
        assert_ne!(c.breakpoints[1].fingerprint, system_bp.fingerprint);
        // No cache_control: no breakpoints, no fingerprinting.
        let d = estimate(json!({"messages": [{"role": "user", "content": "hi"}]}));
        assert_eq!(d.breakpoint_count, 0);
    }

    #[test]
    fn split_characters_in_serialized_json_are_counted_once() {
        use std::io::Write as _;
        let text = "é東😀a";
        let mut w = ScanWriter {
            scan: TextScan::new(false),
            pending: [0; 4],
            pending_len: 0,
            fingerprint: None,
        };
        for b in text.as_bytes() {
            w.write_all(std::slice::from_ref(b)).unwrap();
        }
        let mut e = InputEstimate::default();
        w.scan.finish(&mut e);
        assert_eq!(e.text_chars, 4);
        assert_eq!(
            (
                f(&e, Feature::OtherScript),
                f(&e, Feature::Cjk),
                f(&e, Feature::Letter)
            ),
            (2, 1, 1)
        );
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            prop_oneof![
                Just("text"),
                Just("image"),
                Just("tool_use"),
                Just("tool_result"),
                Just("document"),
                Just("thinking"),
                Just("base64"),
                Just("content"),
                Just("iVBORw0KGgoAAAANSUhEUgAAA+gAAAPo"),
                Just("/9j/4AAQSkZJRg=="),
            ]
            .prop_map(Value::from),
            ".*".prop_map(Value::from),
            "[A-Za-z0-9+/=]{0,64}".prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            let key = prop_oneof![
                Just("type".to_string()),
                Just("text".to_string()),
                Just("source".to_string()),
                Just("data".to_string()),
                Just("content".to_string()),
                Just("input".to_string()),
                Just("name".to_string()),
                ".{0,4}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key, inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn arb_message() -> impl Strategy<Value = Value> {
        prop_oneof![
            arb_json(),
            prop::collection::vec(arb_json(), 0..4)
                .prop_map(|blocks| json!({"role": "user", "content": blocks})),
            ".*".prop_map(|text| json!({"role": "user", "content": text})),
        ]
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_json(value in arb_json()) {
            if let Value::Object(map) = &value {
                let _ = estimate_input(map, RULE);
            }
            let wrapped = body(json!({"system": value.clone(), "messages": [value.clone(), {"content": [value.clone()]}], "tools": [value]}));
            let e = estimate_input(&wrapped, RULE);
            let _ = e.class(&Rates::prior(3.5));
        }

        #[test]
        fn the_floor_never_exceeds_the_estimate_at_the_lowest_learned_rates(text in "[ -~]{0,400}") {
            // The learner keeps every rate at or above a quarter of its prior:
            // even there, ASCII text is estimated at no less than its floor.
            let e = estimate(json!({"messages": [{"role": "user", "content": text}]}));
            let lowest = Rates(Rates::prior(3.5).0.map(|r| r / 4.0));
            prop_assert!(e.floor() <= e.tokens(&lowest));
        }

        #[test]
        fn appending_a_message_never_lowers_the_estimate(
            messages in prop::collection::vec(arb_message(), 0..5),
            extra in arb_message(),
            system in arb_json(),
        ) {
            let before = body(json!({"system": system.clone(), "messages": messages.clone()}));
            let mut longer = messages;
            longer.push(extra);
            let after = body(json!({"system": system, "messages": longer}));
            let (a, b) = (estimate_input(&before, RULE), estimate_input(&after, RULE));
            let rates = Rates::prior(3.5);
            prop_assert!(b.tokens(&rates) >= a.tokens(&rates));
            prop_assert!(b.floor() >= a.floor());
            prop_assert_eq!(b.features.get(Feature::Message), a.features.get(Feature::Message) + 1);
        }
    }
}
