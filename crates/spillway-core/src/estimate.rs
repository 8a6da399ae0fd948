//! Input-token estimation: how many tokens a Messages (or `count_tokens`)
//! body will cost, computed locally before the request is sent.
//!
//! # Why estimate before sending
//!
//! Vertex grants each (region, model) a per-minute budget of input tokens,
//! and learns a request's real size only after it has accepted it. To keep a
//! region under its budget (and to spill to another region instead of
//! collecting a 429) the gateway must *reserve* quota before the call, so it
//! needs a number up front. Asking Vertex's `count_tokens` for every request
//! would add a round trip to each one; this module gives a fast, local,
//! deliberately conservative estimate instead. The reservation is reconciled
//! with the `usage` the answer reports.
//!
//! This estimate covers the **input side only**. The output side is reserved
//! separately by the caller, from the request's `max_tokens` (which is
//! exactly what Vertex charges up front too), so a pre-admission cost is
//! `estimate.tokens + max_tokens`.
//!
//! # Text: the 3.5 rule
//!
//! Anthropic documents that "a token approximately represents 3.5 English
//! characters", so text costs `ceil(chars / 3.5)`, with `chars` counted as
//! Unicode scalar values (`str::chars`). It is a rule of thumb, not a
//! tokenizer: English prose usually lands within about ±15%, but code, JSON,
//! non-Latin scripts and long digit strings can be off by 2× either way, and
//! newer-tokenizer models (Opus 4.7+) use up to ~35% more tokens (about 2.7
//! characters per token). The ratio is per model (`ModelSpec::chars_per_token`
//! in the catalog) so it can be tuned; a ratio that is not a positive finite
//! number falls back to 3.5. When accuracy matters, call `count_tokens`.
//!
//! What counts as text:
//! - `system`: a string, or the `text` of its `text` blocks;
//! - each message's `content`: a string, or its blocks: `text` → `text`;
//!   `tool_use` → `name` plus the serialized `input`; `tool_result` → its
//!   `content` (a string, or nested blocks counted the same way, images
//!   included); `document` with a `text` source → `source.data` (and with a
//!   `content` source → its nested blocks); `thinking` → `thinking`. Other
//!   blocks (`redacted_thinking`, PDF documents, …) are not counted;
//! - each tool in `tools`: `name` + `description` + serialized `input_schema`;
//! - [`MESSAGE_OVERHEAD_CHARS`] per element of `messages`, standing for the
//!   role and turn markers the model sees, so an empty turn is not free and
//!   appending a message always raises (never lowers) the estimate.
//!
//! Serialized sub-values (tool inputs and schemas) are measured by streaming
//! them through a counting writer: nothing proportional to the body is
//! allocated, and the whole body is never re-serialized.
//!
//! # Images: Claude's pixel rule
//!
//! An image costs about `width * height / 750` tokens: 1000×1000 ≈ 1,334,
//! 200×200 ≈ 54. Before that, Claude downscales (keeping the aspect ratio)
//! any image whose long edge is over 1568 px or which would cost over ~1,600
//! tokens, so up to Claude 4.6 one image costs at most ~1,600 tokens (~1.15
//! megapixels): a 4000×3000 photo is scaled to about 1264×948 and costs
//! ≈1,600, not 16,000. The newest models allow a 2576 px long edge; pass the
//! matching [`ImageRule`].
//!
//! The pixel size comes from the image header (PNG IHDR, GIF logical screen,
//! WebP VP8/VP8L/VP8X, JPEG SOFn), read from the base64 data without decoding
//! it all: only the 4-character groups holding the bytes the parser asks for
//! are decoded, a small block at a time. JPEG segments before the frame
//! header (EXIF, ICC profiles, tables) are skipped by seeking past them.
//! An image whose size cannot be read (URL or file sources, unknown or
//! corrupt data) costs [`ImageRule::unknown_image_tokens`].

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde_json::{Map, Value};

/// Characters charged for each element of `messages`, on top of its content:
/// roughly one token for the role and turn separators the model is given.
/// Four characters keeps empty turns from being free while staying small
/// next to real content (it is ~1.1 tokens at 3.5 characters per token).
pub const MESSAGE_OVERHEAD_CHARS: u64 = 4;

/// The characters-per-token ratio used when the caller's is unusable.
pub const DEFAULT_CHARS_PER_TOKEN: f64 = 3.5;

/// Estimated input tokens of a Messages (or count_tokens) body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InputEstimate {
    /// Characters of text counted (including per-message overhead).
    pub text_chars: u64,
    /// Tokens charged for images.
    pub image_tokens: u64,
    /// Number of image blocks seen (including inside tool results).
    pub images: u32,
    /// `ceil(text_chars / chars_per_token) + image_tokens`.
    pub tokens: u64,
}

/// How a model charges for images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageRule {
    /// Longest edge, in pixels, before the model downscales: 1568 for
    /// Claude 3.x to 4.6, 2576 for the newest models.
    pub max_long_edge: u32,
    /// Most tokens one image may cost before it is downscaled (1,600).
    pub max_tokens_per_image: u64,
    /// Charged when the size can't be read (e.g. URL sources or corrupt
    /// data); normally equal to `max_tokens_per_image`.
    pub unknown_image_tokens: u64,
}

impl Default for ImageRule {
    fn default() -> Self {
        Self {
            max_long_edge: 1568,
            max_tokens_per_image: 1600,
            unknown_image_tokens: 1600,
        }
    }
}

/// Pixels per image token.
const PIXELS_PER_TOKEN: u64 = 750;

/// Estimates the input tokens of a Messages (or count_tokens) body.
///
/// Never panics, whatever the JSON: fields of the wrong type are skipped.
/// `chars_per_token` that is not a positive finite number means 3.5.
pub fn estimate_input(
    body: &Map<String, Value>,
    chars_per_token: f64,
    image: ImageRule,
) -> InputEstimate {
    let mut acc = Acc {
        rule: image,
        ..Acc::default()
    };

    match body.get("system") {
        Some(Value::String(text)) => acc.text(text),
        Some(Value::Array(blocks)) => {
            for block in blocks {
                if block_type(block) == Some("text") {
                    acc.text_field(block, "text");
                }
            }
        }
        _ => {}
    }

    if let Some(Value::Array(messages)) = body.get("messages") {
        for message in messages {
            acc.chars = acc.chars.saturating_add(MESSAGE_OVERHEAD_CHARS);
            match message.get("content") {
                Some(Value::String(text)) => acc.text(text),
                Some(Value::Array(blocks)) => {
                    for block in blocks {
                        acc.block(block, true);
                    }
                }
                _ => {}
            }
        }
    }

    if let Some(Value::Array(tools)) = body.get("tools") {
        for tool in tools {
            acc.text_field(tool, "name");
            acc.text_field(tool, "description");
            if let Some(schema) = tool.get("input_schema") {
                acc.serialized(schema);
            }
        }
    }

    let cpt = if chars_per_token.is_finite() && chars_per_token > 0.0 {
        chars_per_token
    } else {
        DEFAULT_CHARS_PER_TOKEN
    };
    // `as` saturates: an absurdly small ratio gives u64::MAX, not a panic.
    let text_tokens = (acc.chars as f64 / cpt).ceil() as u64;
    InputEstimate {
        text_chars: acc.chars,
        image_tokens: acc.image_tokens,
        images: acc.images,
        tokens: text_tokens.saturating_add(acc.image_tokens),
    }
}

/// Running totals while walking a body.
#[derive(Default)]
struct Acc {
    rule: ImageRule,
    chars: u64,
    image_tokens: u64,
    images: u32,
}

impl Acc {
    fn text(&mut self, text: &str) {
        self.chars = self.chars.saturating_add(text.chars().count() as u64);
    }

    /// Counts `value[key]` if it is a string.
    fn text_field(&mut self, value: &Value, key: &str) {
        if let Some(Value::String(text)) = value.get(key) {
            self.text(text);
        }
    }

    /// Counts the characters of `value` serialized as compact JSON, without
    /// building the string.
    fn serialized(&mut self, value: &Value) {
        let mut counter = CharCounter(0);
        // Writing to a counter cannot fail, and serializing a `Value`
        // cannot either (its map keys are strings).
        let _ = serde_json::to_writer(&mut counter, value);
        self.chars = self.chars.saturating_add(counter.0);
    }

    fn image(&mut self, block: &Value) {
        self.images = self.images.saturating_add(1);
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
        let tokens = match data.and_then(base64_image_dimensions) {
            Some((w, h)) => image_tokens(w, h, self.rule),
            None => self.rule.unknown_image_tokens,
        };
        self.image_tokens = self.image_tokens.saturating_add(tokens);
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
                Some(Value::String(text)) => self.text(text),
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
                        Some(Value::String(text)) => self.text(text),
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

/// An `io::Write` that only counts the UTF-8 characters written to it.
struct CharCounter(u64);

impl std::io::Write for CharCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Every character has exactly one byte that is not a continuation
        // byte (0b10xx_xxxx); serde_json writes whole, valid UTF-8.
        let chars = buf.iter().filter(|&&b| b & 0xC0 != 0x80).count();
        self.0 = self.0.saturating_add(chars as u64);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Tokens Claude charges for a `width` × `height` image: scaled down
/// (keeping the aspect ratio, to whole pixels) until the long edge is at most
/// `rule.max_long_edge` and `w * h / 750` is at most
/// `rule.max_tokens_per_image`, then `ceil(w * h / 750)`.
///
/// 1000×1000 → 1,334; 200×200 → 54; 4000×3000 → 1,598 (scaled to 1264×948).
/// A zero-sized image costs 0.
pub fn image_tokens(width: u32, height: u32, rule: ImageRule) -> u64 {
    if width == 0 || height == 0 {
        return 0;
    }
    let (mut w, mut h) = (u64::from(width), u64::from(height));
    let long_edge = u64::from(rule.max_long_edge).max(1);
    if w.max(h) > long_edge {
        // Exact integer scaling: the long edge becomes `long_edge`.
        let long = w.max(h);
        let edge = |x: u64| (x * long_edge / long).max(1);
        (w, h) = (edge(w), edge(h));
    }
    let max_pixels = rule.max_tokens_per_image.saturating_mul(PIXELS_PER_TOKEN);
    if w * h > max_pixels {
        let scale = (max_pixels as f64 / (w * h) as f64).sqrt();
        (w, h) = scaled(w, h, scale);
    }
    // The clamp only absorbs floating-point rounding at the boundary.
    (w * h)
        .div_ceil(PIXELS_PER_TOKEN)
        .min(rule.max_tokens_per_image)
}

/// Scales both edges by `scale` (< 1), rounding down, never below 1 px.
fn scaled(w: u64, h: u64, scale: f64) -> (u64, u64) {
    let edge = |x: u64| ((x as f64 * scale).floor() as u64).clamp(1, x);
    (edge(w), edge(h))
}

/// Random access to the bytes of an image, possibly decoded on demand.
trait ByteSource {
    /// The byte at `pos`, or `None` past the end (or if it can't be read).
    fn byte(&mut self, pos: usize) -> Option<u8>;

    fn array<const N: usize>(&mut self, pos: usize) -> Option<[u8; N]> {
        let mut out = [0u8; N];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.byte(pos.checked_add(i)?)?;
        }
        Some(out)
    }

    fn u16_be(&mut self, pos: usize) -> Option<u16> {
        self.array(pos).map(u16::from_be_bytes)
    }
}

impl ByteSource for &[u8] {
    fn byte(&mut self, pos: usize) -> Option<u8> {
        self.get(pos).copied()
    }
}

/// Width and height from the first bytes of a PNG (IHDR), GIF (logical
/// screen), WebP (VP8 / VP8L / VP8X) or JPEG (first SOFn marker, walking
/// segments) file. `None` for anything else, for a truncated header, and for
/// a zero width or height.
pub fn image_dimensions(prefix: &[u8]) -> Option<(u32, u32)> {
    let mut source = prefix;
    dimensions(&mut source)
}

/// Decodes just enough of a standard base64 string to read image dimensions.
///
/// Decoding is lazy and block-wise: the parser asks for bytes at offsets,
/// and only the [`B64_BLOCK_CHARS`]-character block holding each one is
/// decoded (4 characters are exactly 3 bytes, so any offset maps to a known
/// place in the string). PNG, GIF and WebP need only the first block. JPEG
/// headers may sit after EXIF data and other segments: the walk seeks over
/// segment bodies without decoding them and stops at the first SOF, so the
/// work is bounded by the string's length and memory by one block. Padding
/// is optional; whitespace, data-URL prefixes and invalid characters in a
/// block that is needed give `None`.
pub fn base64_image_dimensions(b64: &str) -> Option<(u32, u32)> {
    let mut source = Base64Source::new(b64.as_bytes());
    dimensions(&mut source)
}

/// Base64 characters decoded at a time (a multiple of 4).
const B64_BLOCK_CHARS: usize = 1024;
const B64_BLOCK_BYTES: usize = B64_BLOCK_CHARS / 4 * 3;

/// Standard alphabet, padding optional, lenient about trailing bits.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// A base64 string read as bytes, one decoded block cached at a time.
struct Base64Source<'a> {
    b64: &'a [u8],
    buf: [u8; B64_BLOCK_BYTES],
    /// Which block `buf` holds, and how many bytes of it are valid.
    block: Option<(usize, usize)>,
}

impl<'a> Base64Source<'a> {
    fn new(b64: &'a [u8]) -> Self {
        Self {
            b64,
            buf: [0; B64_BLOCK_BYTES],
            block: None,
        }
    }
}

impl ByteSource for Base64Source<'_> {
    fn byte(&mut self, pos: usize) -> Option<u8> {
        let index = pos / B64_BLOCK_BYTES;
        let offset = pos % B64_BLOCK_BYTES;
        let len = match self.block {
            Some((cached, len)) if cached == index => len,
            _ => {
                let start = index.checked_mul(B64_BLOCK_CHARS)?;
                if start >= self.b64.len() {
                    return None;
                }
                let end = start.saturating_add(B64_BLOCK_CHARS).min(self.b64.len());
                // An undecodable block is cached as empty.
                let len = LENIENT_BASE64
                    .decode_slice(&self.b64[start..end], &mut self.buf)
                    .unwrap_or(0);
                self.block = Some((index, len));
                len
            }
        };
        (offset < len).then(|| self.buf[offset])
    }
}

fn dimensions<S: ByteSource>(src: &mut S) -> Option<(u32, u32)> {
    let (w, h) = match src.array::<4>(0)? {
        [0x89, b'P', b'N', b'G'] => png(src)?,
        [b'G', b'I', b'F', b'8'] => gif(src)?,
        [b'R', b'I', b'F', b'F'] => webp(src)?,
        [0xFF, 0xD8, ..] => jpeg(src)?,
        _ => return None,
    };
    (w > 0 && h > 0).then_some((w, h))
}

fn png<S: ByteSource>(src: &mut S) -> Option<(u32, u32)> {
    // Signature (8), IHDR length (4), "IHDR", width (BE), height (BE).
    if src.array::<8>(0)? != *b"\x89PNG\r\n\x1a\n" || src.array::<4>(12)? != *b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(src.array(16)?);
    let h = u32::from_be_bytes(src.array(20)?);
    Some((w, h))
}

fn gif<S: ByteSource>(src: &mut S) -> Option<(u32, u32)> {
    // "GIF87a" / "GIF89a", then the logical screen width and height (LE).
    let version = src.array::<2>(4)?;
    if version != *b"7a" && version != *b"9a" {
        return None;
    }
    let w = u16::from_le_bytes(src.array(6)?);
    let h = u16::from_le_bytes(src.array(8)?);
    Some((w.into(), h.into()))
}

fn webp<S: ByteSource>(src: &mut S) -> Option<(u32, u32)> {
    // "RIFF", size, "WEBP", then the first chunk: fourcc, size, data at 20.
    if src.array::<4>(8)? != *b"WEBP" {
        return None;
    }
    match &src.array::<4>(12)? {
        b"VP8 " => {
            // Lossy: 3-byte frame tag, start code 9D 01 2A, then 14-bit
            // width and height (LE; the top 2 bits are the scale).
            if src.array::<3>(23)? != [0x9D, 0x01, 0x2A] {
                return None;
            }
            let w = u16::from_le_bytes(src.array(26)?) & 0x3FFF;
            let h = u16::from_le_bytes(src.array(28)?) & 0x3FFF;
            Some((w.into(), h.into()))
        }
        b"VP8L" => {
            // Lossless: signature 0x2F, then width-1 and height-1 in 14
            // bits each, packed LSB first.
            if src.byte(20)? != 0x2F {
                return None;
            }
            let bits = u32::from_le_bytes(src.array(21)?);
            Some(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
        }
        b"VP8X" => {
            // Extended: flags and 3 reserved bytes, then canvas width-1 and
            // height-1 as 24-bit LE.
            let [a, b, c, d, e, f] = src.array::<6>(24)?;
            let w = u32::from_le_bytes([a, b, c, 0]) + 1;
            let h = u32::from_le_bytes([d, e, f, 0]) + 1;
            Some((w, h))
        }
        _ => None,
    }
}

fn jpeg<S: ByteSource>(src: &mut S) -> Option<(u32, u32)> {
    let mut pos = 2usize; // after SOI
    loop {
        if src.byte(pos)? != 0xFF {
            return None;
        }
        // Any number of 0xFF fill bytes may precede a marker.
        while src.byte(pos)? == 0xFF {
            pos = pos.checked_add(1)?;
        }
        let marker = src.byte(pos)?;
        pos = pos.checked_add(1)?;
        match marker {
            // Standalone markers: TEM, RSTn, a stray SOI.
            0x01 | 0xD0..=0xD8 => continue,
            // Start of scan or end of image before any frame header.
            0xD9 | 0xDA | 0x00 => return None,
            // SOFn, except DHT (C4), JPG (C8) and DAC (CC): length (2),
            // precision (1), height (2), width (2).
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                let h = src.u16_be(pos.checked_add(3)?)?;
                let w = src.u16_be(pos.checked_add(5)?)?;
                return Some((w.into(), h.into()));
            }
            _ => {
                let len = usize::from(src.u16_be(pos)?);
                if len < 2 {
                    return None;
                }
                pos = pos.checked_add(len)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
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
        estimate_input(&body(value), 3.5, RULE)
    }

    // --- tiny real headers, byte by byte ---

    fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        out.extend_from_slice(&13u32.to_be_bytes());
        out.extend_from_slice(b"IHDR");
        out.extend_from_slice(&w.to_be_bytes());
        out.extend_from_slice(&h.to_be_bytes());
        out.extend_from_slice(&[8, 6, 0, 0, 0]); // depth, RGBA, methods
        out.extend_from_slice(&[0xDE, 0xAD, 0xBE, 0xEF]); // CRC (unchecked)
        out
    }

    fn gif_header(w: u16, h: u16) -> Vec<u8> {
        let mut out = b"GIF89a".to_vec();
        out.extend_from_slice(&w.to_le_bytes());
        out.extend_from_slice(&h.to_le_bytes());
        out.extend_from_slice(&[0xF0, 0, 0]); // flags, background, aspect
        out
    }

    /// SOI, APP0 (JFIF), APP1 (EXIF, `exif_len` bytes of payload), DQT,
    /// then SOF (`sof` = 0xC0 baseline or 0xC2 progressive).
    fn jpeg_header(w: u16, h: u16, sof: u8, exif_len: usize) -> Vec<u8> {
        let mut out = vec![0xFF, 0xD8];
        out.extend_from_slice(&[0xFF, 0xE0, 0x00, 0x10]);
        out.extend_from_slice(b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0");
        let app1_len = u16::try_from(2 + 6 + exif_len).unwrap();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&app1_len.to_be_bytes());
        out.extend_from_slice(b"Exif\0\0");
        // EXIF payload that contains a fake SOF marker, which must be
        // skipped, not parsed.
        let fake = [0xFF, 0xC0, 0x00, 0x11, 0x08, 0x00, 0x01, 0x00, 0x01];
        out.extend((0..exif_len).map(|i| fake[i % fake.len()]));
        out.extend_from_slice(&[0xFF, 0xDB, 0x00, 0x43, 0x00]);
        out.extend_from_slice(&[1u8; 64]);
        out.extend_from_slice(&[0xFF, 0xFF]); // a fill byte before the marker
        out.extend_from_slice(&[sof, 0x00, 0x11, 0x08]);
        out.extend_from_slice(&h.to_be_bytes());
        out.extend_from_slice(&w.to_be_bytes());
        out.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        out.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08]);
        out
    }

    fn riff(chunk: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = b"RIFF".to_vec();
        out.extend_from_slice(&u32::try_from(4 + 8 + data.len()).unwrap().to_le_bytes());
        out.extend_from_slice(b"WEBP");
        out.extend_from_slice(chunk);
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
        out.extend_from_slice(data);
        out
    }

    fn webp_vp8(w: u16, h: u16) -> Vec<u8> {
        let mut data = vec![0x30, 0x01, 0x00, 0x9D, 0x01, 0x2A]; // frame tag, start code
        data.extend_from_slice(&w.to_le_bytes());
        data.extend_from_slice(&h.to_le_bytes());
        riff(b"VP8 ", &data)
    }

    fn webp_vp8l(w: u32, h: u32) -> Vec<u8> {
        let bits = (w - 1) | ((h - 1) << 14); // alpha and version bits 0
        let mut data = vec![0x2F];
        data.extend_from_slice(&bits.to_le_bytes());
        riff(b"VP8L", &data)
    }

    fn webp_vp8x(w: u32, h: u32) -> Vec<u8> {
        let mut data = vec![0x10, 0, 0, 0]; // alpha flag, reserved
        data.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
        data.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
        riff(b"VP8X", &data)
    }

    #[test]
    fn reads_png_gif_and_webp_headers() {
        assert_eq!(image_dimensions(&png_header(640, 480)), Some((640, 480)));
        assert_eq!(image_dimensions(&gif_header(320, 200)), Some((320, 200)));
        assert_eq!(image_dimensions(&webp_vp8(1024, 768)), Some((1024, 768)));
        assert_eq!(image_dimensions(&webp_vp8l(4000, 3)), Some((4000, 3)));
        assert_eq!(image_dimensions(&webp_vp8x(8000, 6000)), Some((8000, 6000)));
        // VP8 keeps the scale in the top two bits.
        let mut scaled = webp_vp8(100, 50);
        scaled[27] |= 0xC0;
        assert_eq!(image_dimensions(&scaled), Some((100, 50)));
        let gif87 = [b"GIF87a".as_slice(), &[1, 0, 2, 0]].concat();
        assert_eq!(image_dimensions(&gif87), Some((1, 2)));
    }

    #[test]
    fn reads_jpeg_sof_after_exif_baseline_and_progressive() {
        assert_eq!(
            image_dimensions(&jpeg_header(1920, 1080, 0xC0, 300)),
            Some((1920, 1080))
        );
        assert_eq!(
            image_dimensions(&jpeg_header(800, 600, 0xC2, 0)),
            Some((800, 600))
        );
        // DHT (C4) is not a frame header.
        let mut dht = jpeg_header(10, 20, 0xC0, 0);
        let sof_at = dht.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        dht.splice(sof_at..sof_at, [0xFF, 0xC4, 0x00, 0x03, 0x00]);
        assert_eq!(image_dimensions(&dht), Some((10, 20)));
    }

    #[test]
    fn rejects_truncated_unknown_and_zero_sized_headers() {
        let png = png_header(640, 480);
        assert_eq!(image_dimensions(&png[..23]), None);
        assert_eq!(image_dimensions(&png_header(0, 480)), None);
        let jpeg = jpeg_header(100, 100, 0xC0, 40);
        assert_eq!(image_dimensions(&jpeg[..jpeg.len() - 20]), None);
        assert_eq!(image_dimensions(b""), None);
        assert_eq!(image_dimensions(b"BM\0\0\0\0\0\0"), None);
        assert_eq!(image_dimensions(b"RIFF\0\0\0\0WAVEfmt "), None);
        // SOS before any SOF: no size.
        assert_eq!(
            image_dimensions(&[0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02]),
            None
        );
        // A segment length below 2 can't be walked.
        assert_eq!(
            image_dimensions(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x01, 0xFF, 0xC0]),
            None
        );
    }

    #[test]
    fn base64_dimensions_match_raw_ones() {
        for bytes in [
            png_header(1000, 1000),
            gif_header(200, 200),
            webp_vp8(300, 200),
            webp_vp8l(17, 9),
            webp_vp8x(2000, 1000),
            jpeg_header(4000, 3000, 0xC0, 10),
            jpeg_header(4000, 3000, 0xC2, 60_000),
        ] {
            let b64 = STANDARD.encode(&bytes);
            assert_eq!(
                base64_image_dimensions(&b64),
                image_dimensions(&bytes),
                "{b64:.40}"
            );
            assert!(base64_image_dimensions(&b64).is_some());
            // Padding is optional.
            assert_eq!(
                base64_image_dimensions(b64.trim_end_matches('=')),
                image_dimensions(&bytes)
            );
        }
    }

    #[test]
    fn base64_jpeg_after_large_exif_skips_segments_and_stops_at_sof() {
        // 60 kB of EXIF, then SOF, then garbage that is not base64 at all:
        // the walk must seek past the EXIF and never touch the garbage.
        let bytes = jpeg_header(3024, 4032, 0xC0, 60_000);
        // Scan data up to a block boundary, so the garbage starts a block.
        let mut padded = bytes.clone();
        padded.resize(bytes.len().next_multiple_of(B64_BLOCK_BYTES), 0x55);
        let mut b64 = STANDARD.encode(&padded);
        b64.push_str(&"!".repeat(10_000));
        assert_eq!(base64_image_dimensions(&b64), Some((3024, 4032)));
        // Corrupting the EXIF payload (never decoded) changes nothing...
        let mut corrupt = STANDARD.encode(&bytes).into_bytes();
        corrupt[4_000..8_000].fill(b'*');
        let corrupt = String::from_utf8(corrupt).unwrap();
        assert_eq!(base64_image_dimensions(&corrupt), Some((3024, 4032)));
        // ...but corrupting the header does.
        assert_eq!(base64_image_dimensions(&format!("*{}", &b64[1..])), None);
        assert_eq!(base64_image_dimensions(""), None);
        assert_eq!(
            base64_image_dimensions("data:image/png;base64,iVBORw0KGgo="),
            None
        );
    }

    #[test]
    fn image_tokens_follow_claudes_rule() {
        assert_eq!(image_tokens(1000, 1000, RULE), 1334);
        assert_eq!(image_tokens(200, 200, RULE), 54);
        assert_eq!(image_tokens(1092, 1092, RULE), 1590);
        // 4000x3000 → 1568x1176 (long edge) → 1264x948 (token cap).
        assert_eq!(image_tokens(4000, 3000, RULE), 1598);
        assert_eq!(image_tokens(3000, 4000, RULE), 1598);
        // Long edge alone: 3136x100 → 1568x50.
        assert_eq!(image_tokens(3136, 100, RULE), 105);
        // Extreme aspect ratios never go below one pixel per edge.
        assert_eq!(image_tokens(100_000, 1, RULE), 3);
        assert_eq!(image_tokens(0, 100, RULE), 0);
        assert_eq!(image_tokens(u32::MAX, u32::MAX, RULE), 1599);
        // The newest models: 2576 px long edge, higher cap.
        let newest = ImageRule {
            max_long_edge: 2576,
            max_tokens_per_image: 5000,
            unknown_image_tokens: 5000,
        };
        // 4000x3000 → 2576x1932 (long edge) → 2236x1677 (token cap).
        assert_eq!(image_tokens(4000, 3000, newest), 5000);
        assert_eq!(ImageRule::default(), RULE);
    }

    #[test]
    fn counts_system_messages_and_tools_exactly() {
        // "You are terse" = 13; "Hi" = 2, +4 overhead.
        let e = estimate(json!({
            "system": "You are terse",
            "messages": [{"role": "user", "content": "Hi"}],
        }));
        assert_eq!(e.text_chars, 13 + 2 + 4);
        assert_eq!(e.tokens, 6); // ceil(19 / 3.5)
        assert_eq!((e.images, e.image_tokens), (0, 0));

        // System blocks: only text blocks count. Characters, not bytes.
        let e = estimate(json!({
            "system": [{"type": "text", "text": "héllo"}, {"type": "other", "text": "xx"}],
        }));
        assert_eq!(e.text_chars, 5);

        // Tools: name + description + compact schema.
        let schema = json!({"type": "object"});
        let e = estimate(json!({"tools": [
            {"name": "get", "description": "Fetch", "input_schema": schema},
            {"type": "web_search_20250305", "name": "web_search"},
        ]}));
        assert_eq!(e.text_chars, 3 + 5 + 17 + 10);
    }

    #[test]
    fn counts_each_block_kind_exactly() {
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
                {"type": "tool_result", "tool_use_id": "t1", "content": [
                    {"type": "text", "text": "ab"},
                ]},
            ]},
        ]}));
        // abc 3 + doc 3 | hmm 3 + get 3 + {"q":"é"} 9 | result 6 + ab 2; 3 × 4 overhead.
        assert_eq!(e.text_chars, 3 + 3 + 3 + 3 + 9 + 6 + 2 + 12);
        assert_eq!(e.tokens, 12); // ceil(41 / 3.5)
        assert_eq!(e.images, 0);
    }

    #[test]
    fn charges_images_from_their_headers() {
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
        assert_eq!(e.image_tokens, 1334 + 1600 + 54 + 1600);
        assert_eq!(e.text_chars, 4);
        assert_eq!(e.tokens, 2 + 1334 + 1600 + 54 + 1600);
    }

    #[test]
    fn a_long_prompt_follows_the_three_and_a_half_rule() {
        let prompt = "x".repeat(170_000);
        let e = estimate(json!({"messages": [{"role": "user", "content": prompt}]}));
        assert_eq!(e.text_chars, 170_000 + MESSAGE_OVERHEAD_CHARS);
        // ceil(170004 / 3.5) = 48573 = ceil(170000 / 3.5) + 1 for the overhead.
        assert_eq!(e.tokens, 48_573);
        assert_eq!(170_000f64 / 3.5, 48_571.428_571_428_57);
    }

    #[test]
    fn bad_ratios_fall_back_to_three_and_a_half() {
        let b = body(json!({"messages": [{"role": "user", "content": "0123456789"}]}));
        let expected = estimate_input(&b, 3.5, RULE);
        assert_eq!(expected.tokens, 4); // ceil(14 / 3.5)
        for ratio in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(estimate_input(&b, ratio, RULE), expected);
        }
        assert_eq!(estimate_input(&b, 2.0, RULE).tokens, 7);
        assert_eq!(estimate_input(&b, f64::MIN_POSITIVE, RULE).tokens, u64::MAX);
    }

    #[test]
    fn empty_turns_and_odd_shapes_are_not_free_and_do_not_panic() {
        let e = estimate(json!({"messages": [{"role": "user", "content": []}, {}, 7]}));
        assert_eq!(e.text_chars, 12);
        assert_eq!(estimate(json!({})), InputEstimate::default());
        let e = estimate(json!({
            "system": 5, "messages": {"a": 1}, "tools": "x",
            "content": [{"type": "image"}],
        }));
        assert_eq!(e, InputEstimate::default());
        // An image block with no source is charged as unknown.
        let e = estimate(json!({"messages": [{"content": [{"type": "image"}]}]}));
        assert_eq!((e.images, e.image_tokens), (1, 1600));
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
                Just("R0lGODlh"),
                Just("UklGRgAAAABXRUJQVlA4"),
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

    /// A base64 image block whose data is a real header, a damaged one or
    /// arbitrary bytes.
    fn arb_image_block() -> impl Strategy<Value = Value> {
        let header = prop_oneof![
            (1u32..10_000, 1u32..10_000).prop_map(|(w, h)| png_header(w, h)),
            (1u16..10_000, 1u16..10_000).prop_map(|(w, h)| gif_header(w, h)),
            (1u16..10_000, 1u16..10_000, 0usize..3_000)
                .prop_map(|(w, h, exif)| jpeg_header(w, h, 0xC2, exif)),
            (1u16..0x3FFF, 1u16..0x3FFF).prop_map(|(w, h)| webp_vp8(w, h)),
            (1u32..0x3FFF, 1u32..0x3FFF).prop_map(|(w, h)| webp_vp8l(w, h)),
            prop::collection::vec(any::<u8>(), 0..200),
        ];
        (header, any::<u16>(), any::<u8>(), any::<bool>()).prop_map(
            |(mut bytes, at, with, damage)| {
                if damage && !bytes.is_empty() {
                    let i = usize::from(at) % bytes.len();
                    bytes[i] = with;
                }
                json!({"type": "image", "source": {"type": "base64", "data": STANDARD.encode(bytes)}})
            },
        )
    }

    fn arb_message() -> impl Strategy<Value = Value> {
        prop_oneof![
            arb_json(),
            prop::collection::vec(prop_oneof![arb_json(), arb_image_block()], 0..4)
                .prop_map(|blocks| json!({"role": "user", "content": blocks})),
            ".*".prop_map(|text| json!({"role": "user", "content": text})),
        ]
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_json(value in arb_json(), ratio in any::<f64>()) {
            if let Value::Object(map) = &value {
                let _ = estimate_input(map, ratio, RULE);
            }
            let wrapped = body(json!({"system": value.clone(), "messages": [value.clone(), {"content": [value.clone()]}], "tools": [value]}));
            let _ = estimate_input(&wrapped, ratio, RULE);
        }

        #[test]
        fn never_panics_on_arbitrary_image_data(
            block in arb_image_block(),
            garbage in ".*",
            raw in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let e = estimate(json!({"messages": [{"content": [block]}]}));
            prop_assert_eq!(e.images, 1);
            prop_assert!(e.image_tokens <= 1600);
            let _ = base64_image_dimensions(&garbage);
            let _ = image_dimensions(&raw);
            if let Some((w, h)) = image_dimensions(&raw) {
                prop_assert!(w > 0 && h > 0);
                prop_assert_eq!(base64_image_dimensions(&STANDARD.encode(&raw)), Some((w, h)));
            }
        }

        #[test]
        fn appending_a_message_never_lowers_the_estimate(
            messages in prop::collection::vec(arb_message(), 0..5),
            extra in arb_message(),
            system in arb_json(),
            ratio in any::<f64>(),
        ) {
            let before = body(json!({"system": system.clone(), "messages": messages.clone()}));
            let mut longer = messages;
            longer.push(extra);
            let after = body(json!({"system": system, "messages": longer}));
            let (a, b) = (estimate_input(&before, ratio, RULE), estimate_input(&after, ratio, RULE));
            prop_assert!(b.tokens >= a.tokens);
            prop_assert!(b.text_chars >= a.text_chars + MESSAGE_OVERHEAD_CHARS);
            prop_assert!(b.image_tokens >= a.image_tokens);
        }

        #[test]
        fn image_tokens_are_capped_and_close_to_the_pixel_rule(
            w in 1u32..20_000, h in 1u32..20_000,
        ) {
            let t = image_tokens(w, h, RULE);
            prop_assert!((1..=1600).contains(&t));
            // Unscaled images cost exactly ceil(w*h/750); scaled ones land
            // just under the cap (whole pixels lose at most an edge's worth),
            // unless the aspect ratio is so extreme the long edge binds first.
            let pixels = u64::from(w) * u64::from(h);
            if w.max(h) <= 1568 && pixels <= 1_200_000 {
                prop_assert_eq!(t, pixels.div_ceil(750));
            } else if w.min(h) * 2 >= w.max(h) {
                prop_assert!(t >= 1600 - 5, "{w}x{h} → {t}");
            }
        }
    }
}
