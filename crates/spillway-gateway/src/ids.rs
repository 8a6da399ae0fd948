//! Random identifiers: request ids (`req_…`), client keys (`sk-spw-…`) and
//! batch ids (`msgbatch_01…`) are a prefix plus base-62 characters from the
//! thread-local CSPRNG, so they are unguessable as well as unique.

use rand::Rng;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `prefix` followed by `len` random base-62 characters.
pub fn random_id(prefix: &str, len: usize) -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    for _ in 0..len {
        id.push(BASE62[rng.random_range(0..BASE62.len())] as char);
    }
    id
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_have_the_prefix_and_length_and_differ() {
        let a = super::random_id("x_", 24);
        assert!(a.starts_with("x_") && a.len() == 26);
        assert!(a[2..].bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, super::random_id("x_", 24));
    }
}
