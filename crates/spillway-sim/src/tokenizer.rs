//! The simulator's tokenizer: the "truth" the gateway's token estimates are
//! tested against.
//!
//! Real Claude tokenizers are not public, and gateways usually estimate
//! tokens as `chars / 3.5`. To test such an estimator against a *different*
//! truth, the simulator counts tokens with its own deterministic rule:
//!
//! * **Text.** Every piece of text in the request is scanned once. Each
//!   maximal run of alphanumeric characters (Unicode `char::is_alphanumeric`,
//!   length measured in chars) costs `ceil(len / 4)` tokens. Every other
//!   character that is not whitespace costs 1 token. Whitespace is free.
//!   So `"Hello, world!"` costs `2 + 1 + 2 + 1 = 6` tokens. CJK characters
//!   (Han ideographs, kana, Hangul) are not part of runs: each costs 1
//!   token, as they roughly do in real tokenizers (3.5× what `chars / 3.5`
//!   would guess), so `"日本語のテキスト"` costs 8.
//! * **Which text.** The `system` prompt (string, or the `text` of its
//!   blocks); every message's content (a string, or its blocks: `text`,
//!   `thinking`, `tool_use` = name + input serialized as JSON, `tool_result`
//!   = its content recursively, `image` as below; any other block type is
//!   serialized to JSON and counted as text); every tool definition
//!   (`name` + `description` + `input_schema` serialized as JSON).
//! * **Overheads.** 3 tokens per message and 5 per request.
//! * **Images** (`{"type":"image","source":{"type":"base64","data":..}}`).
//!   The width and height are read from the PNG, JPEG, GIF or WebP header
//!   (only a prefix of the base64 data is decoded). The image is scaled
//!   down so its long edge is at most 1568 px, keeping the aspect ratio,
//!   and costs `ceil(w * h / 750)` tokens. An image whose size cannot be
//!   read (URL source, unknown format, bad base64) costs 1600 tokens.
//!
//! Every other field (`max_tokens`, `model`, `tool_choice`, `metadata`, ...)
//! is free. Malformed shapes are never an error here: whatever is not
//! understood costs nothing (or, for unknown blocks, its JSON text).

use base64::Engine as _;
use serde_json::Value;

/// Tokens charged per request, on top of the content.
pub const REQUEST_OVERHEAD: u64 = 5;
/// Tokens charged per message, on top of its content.
pub const MESSAGE_OVERHEAD: u64 = 3;
/// Tokens for an image whose dimensions cannot be determined.
pub const UNKNOWN_IMAGE_TOKENS: u64 = 1600;
/// Images are scaled so that their long edge is at most this many pixels.
pub const MAX_IMAGE_EDGE: u64 = 1568;

/// Only this many base64 characters of an image are decoded to find its
/// size (JPEG headers can sit behind a large EXIF block).
const IMAGE_PREFIX_B64: usize = 1 << 20;

/// Counts the input tokens of a Messages request body (rawPredict,
/// streamRawPredict or count-tokens), following the rule in the module docs.
pub fn count_tokens(body: &Value) -> u64 {
    let mut total = REQUEST_OVERHEAD;
    match body.get("system") {
        Some(Value::String(s)) => total += count_text(s),
        Some(Value::Array(blocks)) => {
            for b in blocks {
                total = total.saturating_add(count_block(b));
            }
        }
        _ => {}
    }
    if let Some(Value::Array(messages)) = body.get("messages") {
        for m in messages {
            total = total.saturating_add(MESSAGE_OVERHEAD);
            total = total.saturating_add(count_content(m.get("content")));
        }
    }
    if let Some(Value::Array(tools)) = body.get("tools") {
        for t in tools {
            if let Some(Value::String(name)) = t.get("name") {
                total = total.saturating_add(count_text(name));
            }
            if let Some(Value::String(d)) = t.get("description") {
                total = total.saturating_add(count_text(d));
            }
            if let Some(schema) = t.get("input_schema") {
                total = total.saturating_add(count_json(schema));
            }
        }
    }
    total
}

/// The prompt-cache breakpoints of a body: for each element carrying
/// `cache_control` (a tool, a system block, a message's content block), in
/// Anthropic's prefix order (tools, system, messages), a fingerprint of the
/// prefix up to and including it and its tokens by [`count_tokens`]'s rule.
pub fn cache_prefixes(body: &Value) -> Vec<(u64, u64)> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut tokens = REQUEST_OVERHEAD;
    let mut out = Vec::new();
    let mut mark = |v: &Value, hasher: &std::collections::hash_map::DefaultHasher, tokens: u64| {
        if v.get("cache_control").is_some() {
            out.push((hasher.finish(), tokens));
        }
    };
    if let Some(Value::Array(tools)) = body.get("tools") {
        for t in tools {
            t.get("name").map(Value::to_string).hash(&mut hasher);
            t.get("description").map(Value::to_string).hash(&mut hasher);
            t.get("input_schema")
                .map(Value::to_string)
                .hash(&mut hasher);
            let text = |k: &str| t.get(k).and_then(Value::as_str).map_or(0, count_text);
            tokens +=
                text("name") + text("description") + t.get("input_schema").map_or(0, count_json);
            mark(t, &hasher, tokens);
        }
    }
    match body.get("system") {
        Some(Value::String(s)) => {
            s.hash(&mut hasher);
            tokens += count_text(s);
        }
        Some(Value::Array(blocks)) => {
            for b in blocks {
                b.get("text").map(Value::to_string).hash(&mut hasher);
                tokens = tokens.saturating_add(count_block(b));
                mark(b, &hasher, tokens);
            }
        }
        _ => {}
    }
    if let Some(Value::Array(messages)) = body.get("messages") {
        for m in messages {
            tokens = tokens.saturating_add(MESSAGE_OVERHEAD);
            "message".hash(&mut hasher);
            match m.get("content") {
                Some(Value::Array(blocks)) => {
                    for b in blocks {
                        let mut b_plain = b.clone();
                        if let Some(o) = b_plain.as_object_mut() {
                            o.remove("cache_control");
                        }
                        b_plain.to_string().hash(&mut hasher);
                        tokens = tokens.saturating_add(count_block(b));
                        mark(b, &hasher, tokens);
                    }
                }
                content => {
                    content.map(Value::to_string).hash(&mut hasher);
                    tokens = tokens.saturating_add(count_content(content));
                }
            }
        }
    }
    out
}

/// Counts a plain text with the run/char rule.
pub fn count_text(text: &str) -> u64 {
    let mut tokens: u64 = 0;
    let mut run: u64 = 0;
    for c in text.chars() {
        if c.is_alphanumeric() && !is_cjk(c) {
            run += 1;
            continue;
        }
        tokens += run.div_ceil(4);
        run = 0;
        if !c.is_whitespace() {
            tokens += 1;
        }
    }
    tokens + run.div_ceil(4)
}

/// Han ideographs, Hiragana, Katakana, Hangul and their punctuation and
/// full-width forms: one token a character.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3000..=0x30FF      // CJK punctuation, Hiragana, Katakana
        | 0x3400..=0x4DBF    // Han extension A
        | 0x4E00..=0x9FFF    // Han
        | 0xAC00..=0xD7AF    // Hangul syllables
        | 0xF900..=0xFAFF    // Han compatibility
        | 0xFF00..=0xFFEF    // full-width forms
        | 0x20000..=0x2FA1F) // Han extensions B–F
}

fn count_json(v: &Value) -> u64 {
    count_text(&v.to_string())
}

fn count_content(content: Option<&Value>) -> u64 {
    match content {
        Some(Value::String(s)) => count_text(s),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .fold(0u64, |acc, b| acc.saturating_add(count_block(b))),
        _ => 0,
    }
}

fn count_block(block: &Value) -> u64 {
    let Some(obj) = block.as_object() else {
        return match block {
            Value::String(s) => count_text(s),
            _ => 0,
        };
    };
    match obj.get("type").and_then(Value::as_str) {
        Some("text") => obj
            .get("text")
            .and_then(Value::as_str)
            .map_or(0, count_text),
        Some("thinking") => obj
            .get("thinking")
            .and_then(Value::as_str)
            .map_or(0, count_text),
        Some("redacted_thinking") => 0,
        Some("tool_use") => {
            let name = obj
                .get("name")
                .and_then(Value::as_str)
                .map_or(0, count_text);
            let input = obj.get("input").map_or(0, count_json);
            name + input
        }
        Some("tool_result") => count_content(obj.get("content")),
        Some("image") => image_tokens(obj.get("source")),
        _ => count_json(block),
    }
}

fn image_tokens(source: Option<&Value>) -> u64 {
    let data = source
        .filter(|s| s.get("type").and_then(Value::as_str) == Some("base64"))
        .and_then(|s| s.get("data"))
        .and_then(Value::as_str);
    match data.and_then(image_size_from_base64) {
        Some((w, h)) => image_tokens_for_size(w, h),
        None => UNKNOWN_IMAGE_TOKENS,
    }
}

/// Tokens for an image of `w` x `h` pixels: scale the long edge down to
/// [`MAX_IMAGE_EDGE`], then `ceil(w * h / 750)` (at least 1).
pub fn image_tokens_for_size(w: u32, h: u32) -> u64 {
    let (mut w, mut h) = (u64::from(w), u64::from(h));
    let long = w.max(h);
    if long > MAX_IMAGE_EDGE {
        w = (w * MAX_IMAGE_EDGE / long).max(1);
        h = (h * MAX_IMAGE_EDGE / long).max(1);
    }
    (w * h).div_ceil(750).max(1)
}

fn image_size_from_base64(data: &str) -> Option<(u32, u32)> {
    let data = data.trim();
    // Decode a prefix whose length is a multiple of 4, so no padding is needed.
    let prefix = if data.len() > IMAGE_PREFIX_B64 {
        data.get(..IMAGE_PREFIX_B64)?
    } else {
        data.get(..data.len() - data.len() % 4)?
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(prefix)
        .ok()?;
    image_size(&bytes)
}

/// Reads `(width, height)` from the header of a PNG, GIF, WebP or JPEG image.
pub fn image_size(b: &[u8]) -> Option<(u32, u32)> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        // IHDR is always the first chunk: width and height are big-endian u32.
        let w = be32(b, 16)?;
        let h = be32(b, 20)?;
        return Some((w, h));
    }
    if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        let w = u32::from(le16(b, 6)?);
        let h = u32::from(le16(b, 8)?);
        return Some((w, h));
    }
    if b.len() >= 30 && &b[0..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        return webp_size(b);
    }
    if b.starts_with(&[0xFF, 0xD8]) {
        return jpeg_size(b);
    }
    None
}

fn webp_size(b: &[u8]) -> Option<(u32, u32)> {
    match b.get(12..16)? {
        b"VP8 " => {
            // Lossy: frame tag (3 bytes) + start code (3 bytes) at 20, then sizes.
            let w = u32::from(le16(b, 26)? & 0x3FFF);
            let h = u32::from(le16(b, 28)? & 0x3FFF);
            Some((w, h))
        }
        b"VP8L" => {
            // Lossless: signature byte 0x2F at 20, then 14-bit (w-1), 14-bit (h-1).
            let bits = u32::from_le_bytes(b.get(21..25)?.try_into().ok()?);
            let w = (bits & 0x3FFF) + 1;
            let h = ((bits >> 14) & 0x3FFF) + 1;
            Some((w, h))
        }
        b"VP8X" => {
            // Extended: 24-bit (w-1) at 24 and 24-bit (h-1) at 27.
            let w = le24(b, 24)? + 1;
            let h = le24(b, 27)? + 1;
            Some((w, h))
        }
        _ => None,
    }
}

fn jpeg_size(b: &[u8]) -> Option<(u32, u32)> {
    let mut i = 2;
    loop {
        // Skip to the next marker (0xFF, possibly padded with more 0xFF).
        while *b.get(i)? != 0xFF {
            i += 1;
        }
        while *b.get(i)? == 0xFF {
            i += 1;
        }
        let marker = *b.get(i)?;
        i += 1;
        match marker {
            // Standalone markers carry no length.
            0x01 | 0xD0..=0xD8 => continue,
            0xD9 | 0xDA => return None, // end of image / start of scan: no SOF seen
            _ => {}
        }
        let len = usize::from(be16(b, i)?);
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            let h = u32::from(be16(b, i + 3)?);
            let w = u32::from(be16(b, i + 5)?);
            return Some((w, h));
        }
        if len < 2 {
            return None;
        }
        i = i.checked_add(len)?;
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le24(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 3)?;
    Some(u32::from(s[0]) | (u32::from(s[1]) << 8) | (u32::from(s[2]) << 16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_rule() {
        assert_eq!(count_text(""), 0);
        assert_eq!(count_text("   \n\t"), 0);
        assert_eq!(count_text("Hello, world!"), 6);
        assert_eq!(count_text("abcd"), 1);
        assert_eq!(count_text("abcde"), 2);
        assert_eq!(count_text("a-b"), 3);
        assert_eq!(count_text("Olá"), 1);
        assert_eq!(count_text("日本語のテキスト"), 8);
        assert_eq!(count_text("東京 tokyo"), 4);
    }

    #[test]
    fn request_rule() {
        let body = json!({
            "anthropic_version": "vertex-2023-10-16",
            "max_tokens": 100,
            "system": "Be brief.",          // 1 + 2 + 1 = 4
            "messages": [
                {"role": "user", "content": "Hello, world!"},                  // 3 + 6
                {"role": "assistant", "content": [{"type": "text", "text": "Hi"}]}, // 3 + 1
            ],
        });
        assert_eq!(count_tokens(&body), 5 + 4 + 9 + 4);
    }

    #[test]
    fn tools_and_tool_blocks() {
        let body = json!({
            "messages": [
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get", "input": {"a": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
            ],
            "tools": [{"name": "get", "description": "Get it", "input_schema": {"type": "object"}}],
        });
        // tool_use: "get"=1, {"a":1} = { " a " : 1 } -> 1+1+1+1+1+1+1 = 7
        // tool_result: "ok" = 1
        // tool: get=1, "Get it"=2, {"type":"object"} = { " type " : " object " } = 1+1+1+1+1+1+2+1+1 = 10
        assert_eq!(count_tokens(&body), 5 + 3 + 8 + 3 + 1 + 1 + 2 + 10);
    }

    #[test]
    fn wrong_types_are_free_not_errors() {
        assert_eq!(count_tokens(&json!(null)), 5);
        assert_eq!(count_tokens(&json!([1, 2])), 5);
        assert_eq!(count_tokens(&json!({"messages": 7, "system": {"x": 1}})), 5);
        assert_eq!(
            count_tokens(&json!({"messages": [1, {"content": 3}]})),
            5 + 6
        );
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        v
    }

    #[test]
    fn image_headers() {
        assert_eq!(image_size(&png(640, 480)), Some((640, 480)));
        let gif = b"GIF89a\x20\x03\x58\x02\0\0\0".to_vec();
        assert_eq!(image_size(&gif), Some((800, 600)));
        let mut jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0, 0];
        jpeg.extend_from_slice(&[0xFF, 0xC0, 0, 11, 8, 0x01, 0xE0, 0x02, 0x80, 3, 0, 0]);
        assert_eq!(image_size(&jpeg), Some((640, 480)));
        let mut webp = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0".to_vec();
        webp.extend_from_slice(&[0x7F, 0x02, 0x00, 0xDF, 0x01, 0x00]);
        assert_eq!(image_size(&webp), Some((640, 480)));
        assert_eq!(image_size(b"\xFF\xD8\xFF"), None);
        assert_eq!(image_size(b"nonsense"), None);
    }

    #[test]
    fn image_tokens_scale_long_edge() {
        assert_eq!(image_tokens_for_size(750, 1), 1);
        assert_eq!(image_tokens_for_size(640, 480), 410);
        // 3136 x 1568 -> 1568 x 784
        assert_eq!(
            image_tokens_for_size(3136, 1568),
            (1568u64 * 784).div_ceil(750)
        );
        assert_eq!(image_tokens_for_size(0, 0), 1);
        assert_eq!(
            image_tokens_for_size(u32::MAX, u32::MAX),
            (1568u64 * 1568).div_ceil(750)
        );
    }

    #[test]
    fn image_blocks() {
        let data = base64::engine::general_purpose::STANDARD.encode(png(640, 480));
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "!!!"}},
            {"type": "image", "source": {"type": "url", "url": "https://x"}},
        ]}]});
        assert_eq!(count_tokens(&body), 5 + 3 + 410 + 1600 + 1600);
    }
}
