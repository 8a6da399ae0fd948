//! TLS to PostgreSQL, as `batch.postgres_url` asks for it: libpq's
//! `sslmode` and `sslrootcert` query parameters, read here so a missing CA
//! file is a configuration problem (named by its key) rather than an I/O
//! error at start, and so the store can apply libpq's rule that `require`
//! with a root certificate verifies the CA (see `batch::store`).

use super::Problems;

/// The value of the first of `names` in `url`'s query, percent-decoded.
fn query_param(url: &str, names: &[&str]) -> Option<String> {
    let query = url.split_once('?')?.1;
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        names.contains(&name).then(|| percent_decode(value))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The CA file the URL names (`sslrootcert`, or sqlx's `ssl-root-cert` /
/// `ssl-ca`).
pub fn postgres_root_cert(url: &str) -> Option<String> {
    query_param(url, &["sslrootcert", "ssl-root-cert", "ssl-ca"]).filter(|p| !p.is_empty())
}

/// The `batch.postgres_url` TLS rules: a named CA file must be readable.
pub(super) fn check(url: &str, p: &mut Problems) {
    if let Some(path) = postgres_root_cert(url) {
        if let Err(e) = std::fs::metadata(&path) {
            p.add(
                "batch.postgres_url",
                format!("sslrootcert names {path:?}, which cannot be read: {e}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_certificates_are_read_from_the_query() {
        let url = "postgres://u:p@db:5432/x?sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20x.pem";
        assert_eq!(postgres_root_cert(url).as_deref(), Some("/etc/ca x.pem"));
        assert_eq!(
            postgres_root_cert("postgres://db/x?ssl-ca=/c.pem").as_deref(),
            Some("/c.pem")
        );
        assert_eq!(postgres_root_cert("postgres://db/x?sslmode=require"), None);
        assert_eq!(postgres_root_cert("postgres://db/x"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
