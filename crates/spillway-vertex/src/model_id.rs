//! Model ids: Anthropic spells a dated model `claude-3-haiku-20240307`, Vertex spells the same
//! model `claude-3-haiku@20240307` (the date becomes a version after `@`).
//!
//! Newer models (`claude-opus-4-6`, `claude-sonnet-4-6`...) have no date on either side, so there is
//! nothing to translate; [`anthropic_to_vertex_id`] returns `None` and the caller looks the id up in
//! its own configuration instead. Vertex responses report the Anthropic spelling in `model`
//! (`"model":"claude-3-7-sonnet-20250219"`), never the `@` form.
//!
//! The id lands in an upstream URL path segment (`.../models/{MODEL}:rawPredict`), so
//! [`is_valid_model_id`] restricts it to a conservative character set. `@` is allowed: the Python
//! SDK sends it literally (httpx does not percent-encode it).

/// Maximum accepted model id length, in bytes.
pub const MAX_MODEL_ID_LEN: usize = 128;

/// True if the 8 ASCII digits look like a real `YYYYMMDD` release date (years 2020-2099).
fn plausible_date(d: &[u8]) -> bool {
    if d.len() != 8 || !d.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let num = |r: std::ops::Range<usize>| {
        d[r].iter()
            .fold(0u32, |acc, &b| acc * 10 + u32::from(b - b'0'))
    };
    let (year, month, day) = (num(0..4), num(4..6), num(6..8));
    (2020..=2099).contains(&year) && (1..=12).contains(&month) && (1..=31).contains(&day)
}

/// `"claude-3-haiku-20240307"` → `Some("claude-3-haiku@20240307")` (a trailing `-YYYYMMDD` with a
/// plausible date); anything else (no date, already an `@` id, invalid characters) → `None`.
pub fn anthropic_to_vertex_id(id: &str) -> Option<String> {
    if !is_valid_model_id(id) || id.contains('@') {
        return None;
    }
    let (base, date) = id.rsplit_once('-')?;
    if base.is_empty() || base.ends_with('-') || !plausible_date(date.as_bytes()) {
        return None;
    }
    Some(format!("{base}@{date}"))
}

/// `"claude-3-haiku@20240307"` → `"claude-3-haiku-20240307"`. Ids without `@` come back unchanged.
pub fn vertex_to_anthropic_id(id: &str) -> String {
    match id.rsplit_once('@') {
        Some((base, version)) => format!("{base}-{version}"),
        None => id.to_owned(),
    }
}

/// True if `id` is safe to put in a URL path segment: non-empty, <= 128 chars, only
/// `[A-Za-z0-9._@-]`, and not a dot segment (`.` / `..`).
pub fn is_valid_model_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_MODEL_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
        && id != "."
        && id != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_to_vertex() {
        let cases = [
            ("claude-3-haiku-20240307", Some("claude-3-haiku@20240307")),
            (
                "claude-sonnet-4-5-20250929",
                Some("claude-sonnet-4-5@20250929"),
            ),
            (
                "claude-3-7-sonnet-20250219",
                Some("claude-3-7-sonnet@20250219"),
            ),
            ("claude-opus-4-6", None),
            ("claude-sonnet-4-5@20250929", None),
            ("claude-3-haiku-2024030", None),
            ("claude-3-haiku-202403070", None),
            ("claude-3-haiku-20241307", None),
            ("claude-3-haiku-20240300", None),
            ("claude-3-haiku-19990307", None),
            ("-20240307", None),
            ("claude--20240307", None),
            ("20240307", None),
            ("claude 3-20240307", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(anthropic_to_vertex_id(input).as_deref(), want, "{input}");
        }
    }

    #[test]
    fn vertex_to_anthropic() {
        assert_eq!(
            vertex_to_anthropic_id("claude-3-haiku@20240307"),
            "claude-3-haiku-20240307"
        );
        assert_eq!(vertex_to_anthropic_id("claude-opus-4-6"), "claude-opus-4-6");
        let v = anthropic_to_vertex_id("claude-haiku-4-5-20251001").unwrap();
        assert_eq!(vertex_to_anthropic_id(&v), "claude-haiku-4-5-20251001");
    }

    #[test]
    fn validity() {
        assert!(is_valid_model_id("claude-sonnet-4-5@20250929"));
        assert!(is_valid_model_id("count-tokens"));
        assert!(is_valid_model_id("a.b_c"));
        assert!(is_valid_model_id(&"a".repeat(128)));
        assert!(!is_valid_model_id(&"a".repeat(129)));
        assert!(!is_valid_model_id(""));
        assert!(!is_valid_model_id("."));
        assert!(!is_valid_model_id(".."));
        for bad in ["a/b", "a:b", "a b", "a%2F", "a?b", "a#b", "é", "a\n"] {
            assert!(!is_valid_model_id(bad), "{bad:?}");
        }
    }
}
