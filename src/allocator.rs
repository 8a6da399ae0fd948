//! The process's memory allocator: jemalloc, tuned to hand memory back.
//!
//! An open stream holds buffers on two connections (client and upstream),
//! and streams come in bursts. glibc's malloc keeps what a burst used, and
//! its RSS climbs burst after burst with the same live set; jemalloc with
//! background purging returns freed pages within a fraction of a second, so RSS
//! follows the streams actually open (BENCHMARKS.md, "Memory").
//!
//! `_RJEM_MALLOC_CONF` in the environment still overrides these defaults.

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Read by jemalloc at its first allocation: purge freed pages after 0.2 s
/// (default 10 s) on a background thread, skipping the "muzzy" stage so
/// RSS drops rather than lingering as lazily-freed pages.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:200,muzzy_decay_ms:0\0";
