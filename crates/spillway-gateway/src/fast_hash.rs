//! The hasher of the maps a request touches in the scheduler and the
//! estimator.
//!
//! std's `HashMap` hashes with SipHash-1-3, made to withstand collision
//! floods on keys an attacker picks, at a few hundred instructions a key.
//! These maps are keyed by what the gateway names itself (quota groups,
//! models, locations, tenants from config, store entry ids, prompt
//! fingerprints it computes), several times a request, so they take
//! foldhash's seeded fast hasher instead (BENCHMARKS.md, "Per-request
//! cost").

/// `HashMap<K, V, FastHash>`: build with `HashMap::default()`.
pub type FastHash = foldhash::fast::RandomState;
