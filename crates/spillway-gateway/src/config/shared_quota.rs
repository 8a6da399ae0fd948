//! The `quota.store`, `quota.redis_*` and `quota.replicas` settings: where
//! the ledgers live, and the rules a shared store's settings must meet
//! (a `rediss://` server is always verified: no `#insecure`).
//! Opening the store is `quota_store`'s job.

use serde::{Deserialize, Serialize};

use super::{Problems, QuotaDefaults};

/// Where the ledgers live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaStoreKind {
    /// In this process: exact for one replica.
    #[default]
    Memory,
    /// In Redis, shared by every replica that names the same URL and prefix.
    Redis,
}

pub fn default_key_prefix() -> String {
    "spillway:".into()
}

pub fn default_redis_timeout_ms() -> u64 {
    50
}

pub fn default_redis_lease_ms() -> u64 {
    50
}

/// The `quota.store`, `quota.redis_*` and `quota.replicas` rules.
pub fn check(q: &QuotaDefaults, p: &mut Problems) {
    if q.store == QuotaStoreKind::Redis {
        let url = q.redis_url.as_str();
        if !["redis://", "rediss://", "unix://", "redis+unix://"]
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            p.add(
                "quota.redis_url",
                "quota.store is \"redis\": must be a redis://host:port[/db] URL (or rediss://, unix://)",
            );
        }
        if url.starts_with("rediss://") && url.contains('#') {
            // The client's `#insecure` would skip verifying the server.
            p.add(
                "quota.redis_url",
                "rediss:// URLs take no #fragment: the server's certificate is always verified (trust a private CA with quota.redis_ca_file)",
            );
        } else if let Err(e) = spillway_redis::check_url(url) {
            p.add("quota.redis_url", format!("not a valid Redis URL: {e}"));
        }
    }
    if !q.redis_ca_file.is_empty() {
        if q.store != QuotaStoreKind::Redis || !q.redis_url.starts_with("rediss://") {
            p.add(
                "quota.redis_ca_file",
                "is only used with quota.store = \"redis\" and a rediss:// (TLS) redis_url",
            );
        } else if let Err(e) = std::fs::metadata(&q.redis_ca_file) {
            p.add(
                "quota.redis_ca_file",
                format!("cannot read {:?}: {e}", q.redis_ca_file),
            );
        }
    }
    let prefix = &q.redis_key_prefix;
    if prefix.is_empty()
        || prefix.len() > 64
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_:.".contains(c))
    {
        p.add(
            "quota.redis_key_prefix",
            "must be 1-64 of A-Z a-z 0-9 - _ : .",
        );
    }
    if !(1..=10_000).contains(&q.redis_timeout_ms) {
        p.add("quota.redis_timeout_ms", "must be between 1 and 10000");
    }
    if q.redis_lease_ms > 1_000 {
        p.add(
            "quota.redis_lease_ms",
            "must be at most 1000 (0 turns leases off)",
        );
    }
    if q.replicas > 1_000 {
        p.add(
            "quota.replicas",
            "must be 0 (count live replicas) or at most 1000",
        );
    }
}
