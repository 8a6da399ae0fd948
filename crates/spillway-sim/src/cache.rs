//! Prompt caching as Vertex does it, per location and model.
//!
//! A request's `cache_control` breakpoints name prefixes of its prompt
//! ([`crate::tokenizer::cache_prefixes`]). The longest prefix cached in the
//! same location for the same model within [`CACHE_TTL`] is a **read**; the
//! rest of the prompt up to the last breakpoint is **written**; the rest is
//! plain input. A read refreshes its entry, a write creates entries for
//! every breakpoint. Prefixes shorter than [`MIN_CACHEABLE_TOKENS`] are not
//! cached (Anthropic's minimum). A location's cache is its own: a request
//! sent to another location finds nothing there.
//!
//! Entries are written only when a request is admitted: a refused request
//! caches nothing. Tests that want to dictate the split use the
//! `SIM_CACHE_READ=`/`SIM_CACHE_WRITE=` directives instead
//! ([`crate::message`]), which take precedence.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::faults::lock;
use crate::message::InputUsage;

/// How long an entry lives after its last use (Anthropic's 5-minute cache).
pub const CACHE_TTL: Duration = Duration::from_secs(300);
/// The shortest prefix that is cached.
pub const MIN_CACHEABLE_TOKENS: u64 = 1024;

#[derive(Debug, Default)]
pub struct PromptCache {
    /// (location, model, prefix fingerprint) → when it was last used.
    entries: Mutex<HashMap<(String, String, u64), Instant>>,
}

/// What a request found in the cache, and what admitting it will store.
pub struct CacheLookup {
    pub usage: InputUsage,
    keys: Vec<u64>,
}

impl PromptCache {
    /// Splits a prompt of `total` tokens with breakpoints `prefixes`
    /// (fingerprint, tokens) into reads, writes and plain input.
    pub fn lookup(
        &self,
        location: &str,
        model: &str,
        prefixes: &[(u64, u64)],
        total: u64,
    ) -> CacheLookup {
        let now = Instant::now();
        let entries = lock(&self.entries);
        let fresh = |fp: u64| {
            entries
                .get(&(location.to_string(), model.to_string(), fp))
                .is_some_and(|at| now.duration_since(*at) <= CACHE_TTL)
        };
        let cacheable: Vec<(u64, u64)> = prefixes
            .iter()
            .copied()
            .filter(|(_, t)| *t >= MIN_CACHEABLE_TOKENS)
            .collect();
        let read = cacheable
            .iter()
            .rev()
            .find(|(fp, _)| fresh(*fp))
            .map_or(0, |(_, t)| *t)
            .min(total);
        let last = cacheable.last().map_or(0, |(_, t)| *t).min(total);
        let write = last.saturating_sub(read);
        CacheLookup {
            usage: InputUsage {
                input_tokens: total - read - write,
                cache_creation_input_tokens: write,
                cache_read_input_tokens: read,
                cache_creation_1h_input_tokens: 0,
            },
            keys: cacheable.iter().map(|(fp, _)| *fp).collect(),
        }
    }

    /// Stores (or refreshes) what an admitted request cached.
    pub fn admitted(&self, location: &str, model: &str, lookup: &CacheLookup) {
        if lookup.keys.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut entries = lock(&self.entries);
        entries.retain(|_, at| now.duration_since(*at) <= CACHE_TTL);
        for fp in &lookup.keys {
            entries.insert((location.to_string(), model.to_string(), *fp), now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reads_the_longest_fresh_prefix_per_location() {
        let cache = PromptCache::default();
        let prefixes = [(1, 2_000), (2, 5_000)];
        let first = cache.lookup("us-east5", "m", &prefixes, 6_000);
        assert_eq!(
            (
                first.usage.cache_read_input_tokens,
                first.usage.cache_creation_input_tokens,
                first.usage.input_tokens
            ),
            (0, 5_000, 1_000)
        );
        cache.admitted("us-east5", "m", &first);
        // Same system prompt, new last turn: the shared prefix is read.
        let next = cache.lookup("us-east5", "m", &[(1, 2_000), (3, 5_500)], 6_500);
        assert_eq!(
            (
                next.usage.cache_read_input_tokens,
                next.usage.cache_creation_input_tokens
            ),
            (2_000, 3_500)
        );
        // Another location has its own cache.
        let elsewhere = cache.lookup("europe-west1", "m", &prefixes, 6_000);
        assert_eq!(elsewhere.usage.cache_read_input_tokens, 0);
        // Too short to cache, and entries expire.
        let short = cache.lookup("us-east5", "m", &[(9, 500)], 600);
        assert_eq!(short.usage.cache_creation_input_tokens, 0);
        tokio::time::advance(CACHE_TTL + Duration::from_secs(1)).await;
        assert_eq!(
            cache
                .lookup("us-east5", "m", &prefixes, 6_000)
                .usage
                .cache_read_input_tokens,
            0
        );
    }
}
