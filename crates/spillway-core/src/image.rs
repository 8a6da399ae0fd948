//! Images: what one costs, from its pixel size, read from its header.
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

/// Tiny real image headers, byte by byte, for tests here and in
/// [`crate::estimate`].
#[cfg(test)]
pub(crate) mod fixtures {

    pub fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        out.extend_from_slice(&13u32.to_be_bytes());
        out.extend_from_slice(b"IHDR");
        out.extend_from_slice(&w.to_be_bytes());
        out.extend_from_slice(&h.to_be_bytes());
        out.extend_from_slice(&[8, 6, 0, 0, 0]); // depth, RGBA, methods
        out.extend_from_slice(&[0xDE, 0xAD, 0xBE, 0xEF]); // CRC (unchecked)
        out
    }

    pub fn gif_header(w: u16, h: u16) -> Vec<u8> {
        let mut out = b"GIF89a".to_vec();
        out.extend_from_slice(&w.to_le_bytes());
        out.extend_from_slice(&h.to_le_bytes());
        out.extend_from_slice(&[0xF0, 0, 0]); // flags, background, aspect
        out
    }

    /// SOI, APP0 (JFIF), APP1 (EXIF, `exif_len` bytes of payload), DQT,
    /// then SOF (`sof` = 0xC0 baseline or 0xC2 progressive).
    pub fn jpeg_header(w: u16, h: u16, sof: u8, exif_len: usize) -> Vec<u8> {
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

    pub fn riff(chunk: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = b"RIFF".to_vec();
        out.extend_from_slice(&u32::try_from(4 + 8 + data.len()).unwrap().to_le_bytes());
        out.extend_from_slice(b"WEBP");
        out.extend_from_slice(chunk);
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
        out.extend_from_slice(data);
        out
    }

    pub fn webp_vp8(w: u16, h: u16) -> Vec<u8> {
        let mut data = vec![0x30, 0x01, 0x00, 0x9D, 0x01, 0x2A]; // frame tag, start code
        data.extend_from_slice(&w.to_le_bytes());
        data.extend_from_slice(&h.to_le_bytes());
        riff(b"VP8 ", &data)
    }

    pub fn webp_vp8l(w: u32, h: u32) -> Vec<u8> {
        let bits = (w - 1) | ((h - 1) << 14); // alpha and version bits 0
        let mut data = vec![0x2F];
        data.extend_from_slice(&bits.to_le_bytes());
        riff(b"VP8L", &data)
    }

    pub fn webp_vp8x(w: u32, h: u32) -> Vec<u8> {
        let mut data = vec![0x10, 0, 0, 0]; // alpha flag, reserved
        data.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
        data.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
        riff(b"VP8X", &data)
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use proptest::prelude::*;

    const RULE: ImageRule = ImageRule {
        max_long_edge: 1568,
        max_tokens_per_image: 1600,
        unknown_image_tokens: 1600,
    };

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

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_headers(
            garbage in ".*",
            raw in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let _ = base64_image_dimensions(&garbage);
            if let Some((w, h)) = image_dimensions(&raw) {
                prop_assert!(w > 0 && h > 0);
                prop_assert_eq!(base64_image_dimensions(&STANDARD.encode(&raw)), Some((w, h)));
            }
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
