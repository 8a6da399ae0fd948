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

/// Read by jemalloc at its first allocation:
/// - purge freed pages after 0.2 s (default 10 s) on a background thread,
///   skipping the "muzzy" stage so RSS drops rather than lingering as
///   lazily-freed pages;
/// - one arena (default four per CPU): the gateway's threads allocate the
///   same kinds of objects, and with eight arenas the few that outlive a peak
///   pin partly-used slabs in each of them;
/// - slabs of 8 to 20 pages for the 4, 6, 8 and 10 KiB classes (default 1 to
///   5 pages, one or two objects each): every open connection holds 8-KiB
///   buffers, and a slab per buffer is a jemalloc extent whose metadata is
///   never given back, so a peak of 9,000 streams left ~3 MiB of it behind.
///
/// Measured in BENCHMARKS.md ("Soak: the allocator after a peak"), at the
/// same CPU per request: RSS after a 4,000-stream peak +20–22% over idle
/// instead of +31–34%, after 9,000 streams +41% instead of +53%.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:200,muzzy_decay_ms:0,narenas:1,slab_sizes:4096-4096:8|6144-6144:12|8192-8192:16|10240-10240:20\0";

/// `spillway_allocator_bytes{kind}`: jemalloc's own account of the heap, read
/// at each scrape. `allocated` is what the gateway holds live; `active` the
/// pages those allocations sit on; `resident` what jemalloc has in RAM
/// (including its `metadata`); `retained` address space kept whose pages were
/// returned to the OS. RSS minus `resident` is code, stacks and the rest; `resident`
/// well above `allocated` is fragmentation, not a leak.
struct AllocatorBytes {
    bytes: prometheus::IntGaugeVec,
}

/// The statistics jemalloc keeps, in the order exported.
const KINDS: [&str; 5] = ["allocated", "active", "resident", "metadata", "retained"];

fn read_stats() -> Option<[usize; 5]> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // Statistics are a snapshot refreshed by advancing the epoch.
    epoch::advance().ok()?;
    Some([
        stats::allocated::read().ok()?,
        stats::active::read().ok()?,
        stats::resident::read().ok()?,
        stats::metadata::read().ok()?,
        stats::retained::read().ok()?,
    ])
}

impl prometheus::core::Collector for AllocatorBytes {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.bytes.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        if let Some(values) = read_stats() {
            for (kind, value) in KINDS.iter().zip(values) {
                self.bytes
                    .with_label_values(&[kind])
                    .set(i64::try_from(value).unwrap_or(i64::MAX));
            }
        }
        self.bytes.collect()
    }
}

/// Adds `spillway_allocator_bytes` to the gateway's registry.
pub fn register(registry: &prometheus::Registry) -> prometheus::Result<()> {
    let bytes = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "spillway_allocator_bytes",
            "The memory allocator's own statistics, by kind: allocated (live), active, resident, metadata, retained.",
        ),
        &["kind"],
    )?;
    registry.register(Box::new(AllocatorBytes { bytes }))
}
