//! Counting how requests ended, from many client tasks at once.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Tally {
    pub ok: AtomicU64,
    pub refused: AtomicU64,
    pub other: AtomicU64,
}

impl Tally {
    /// Counts one answer: 200, 429, or anything else (printed).
    pub fn record(&self, sent: reqwest::Result<reqwest::Response>) {
        let counter = match sent.map(|r| r.status().as_u16()) {
            Ok(200) => &self.ok,
            Ok(429) => &self.refused,
            Ok(s) => {
                eprintln!("unexpected status {s}");
                &self.other
            }
            Err(e) => {
                eprintln!("request lost: {e}");
                &self.other
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
