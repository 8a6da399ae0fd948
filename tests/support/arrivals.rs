//! Reading the simulator's arrival log the way Vertex's quota does: the
//! most requests any sliding window held is what decides a 429.

use std::time::Duration;

use tokio::time::Instant;

/// The most arrivals any window of length `window` holds: a count only
/// changes as a window's edge crosses an arrival, so windows starting at
/// arrivals cover them all.
pub fn busiest_window(arrivals: &[Instant], window: Duration) -> usize {
    arrivals
        .iter()
        .map(|&start| {
            arrivals
                .iter()
                .filter(|&&t| t >= start && t < start + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}
