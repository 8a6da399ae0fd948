//! Giving back what a peak grew.
//!
//! A log of requests (a ledger's window, a pool's spend, a scheduler's
//! unsettled admissions) grows to the most it ever held at once, and Rust's
//! collections never shrink on their own. After a peak of 9,000 open
//! streams the gateway kept ~1.5 MiB of empty capacity for good
//! (BENCHMARKS.md, "Soak"), a third of the memory it never returned.
//!
//! [`GiveBack::give_back`] hands it back once a collection is a quarter
//! full, shrinking it to twice what it holds. Growth doubles and a shrink
//! waits for a quarter, so a collection hovering around one size never
//! reallocates back and forth, and the copy a shrink makes is paid for by
//! the removals before it (amortized O(1) per removal).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};

/// Capacity below this is not worth a reallocation to give back.
const KEEP: usize = 64;

/// The capacity a collection holding `len` in `capacity` should shrink to,
/// if it should.
pub fn shrink_target(len: usize, capacity: usize) -> Option<usize> {
    (capacity > KEEP && len < capacity / 4).then(|| (len * 2).max(KEEP / 4))
}

/// A collection that can give back the capacity a peak left behind.
pub trait GiveBack {
    /// Shrinks when a quarter full or less (see the module's doc); call it
    /// after removing.
    fn give_back(&mut self);
}

impl<T> GiveBack for VecDeque<T> {
    fn give_back(&mut self) {
        if let Some(target) = shrink_target(self.len(), self.capacity()) {
            self.shrink_to(target);
        }
    }
}

impl<K: Eq + Hash, V, S: BuildHasher> GiveBack for HashMap<K, V, S> {
    fn give_back(&mut self) {
        if let Some(target) = shrink_target(self.len(), self.capacity()) {
            self.shrink_to(target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A shrink keeps room for what is held and at least halves the
        /// capacity, and the result is never shrunk again until half of it
        /// has been removed: no back-and-forth.
        #[test]
        fn a_shrink_halves_and_then_waits(len in 0usize..100_000, capacity in 0usize..400_000) {
            prop_assume!(len <= capacity);
            if let Some(target) = shrink_target(len, capacity) {
                prop_assert!(target >= len);
                prop_assert!(target <= capacity / 2);
                // The fewest it can hold before half is gone (shrinking needs
                // fewer held, so this one decides).
                let held = len / 2 + 1;
                if held <= len {
                    prop_assert_eq!(shrink_target(held, target), None);
                }
            } else {
                prop_assert!(capacity <= KEEP || len >= capacity / 4);
            }
        }
    }

    #[test]
    fn a_drained_peak_is_given_back() {
        let mut log: VecDeque<u64> = (0..10_000).collect();
        let mut map: HashMap<u64, u64> = (0..10_000).map(|i| (i, i)).collect();
        let (log_peak, map_peak) = (log.capacity(), map.capacity());
        for i in 0..9_990 {
            log.pop_front();
            log.give_back();
            map.remove(&i);
            map.give_back();
        }
        assert_eq!((log.len(), map.len()), (10, 10));
        assert!(log.capacity() <= KEEP, "{log_peak} -> {}", log.capacity());
        assert!(
            map.capacity() <= KEEP * 2,
            "{map_peak} -> {}",
            map.capacity()
        );
        assert!(log.iter().copied().eq(9_990..10_000));
        assert!((9_990..10_000).all(|i| map[&i] == i));
    }
}
