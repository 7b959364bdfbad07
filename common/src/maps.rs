//! Maps and sets that live as long as the process and hold one entry per
//! connected peer.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// A hash table that can give room back.
pub trait Table {
    /// Entries held.
    fn held(&self) -> usize;
    /// Entries there is room for.
    fn room(&self) -> usize;
    /// Keeps room for at least `n` entries.
    fn shrink_to(&mut self, n: usize);
}

impl<K: Eq + Hash, V> Table for HashMap<K, V> {
    fn held(&self) -> usize {
        HashMap::len(self)
    }
    fn room(&self) -> usize {
        HashMap::capacity(self)
    }
    fn shrink_to(&mut self, n: usize) {
        HashMap::shrink_to(self, n);
    }
}

impl<K: Eq + Hash> Table for HashSet<K> {
    fn held(&self) -> usize {
        HashSet::len(self)
    }
    fn room(&self) -> usize {
        HashSet::capacity(self)
    }
    fn shrink_to(&mut self, n: usize) {
        HashSet::shrink_to(self, n);
    }
}

/// Gives back most of a table's room once it holds under a quarter of what it
/// has room for: after thousands of agents left, their slots would otherwise stay
/// allocated for the life of the process.
pub fn shrink_sparse(table: &mut impl Table) {
    const KEEP: usize = 64;
    if table.room() > KEEP && table.held() < table.room() / 4 {
        table.shrink_to(table.held().saturating_mul(2).max(KEEP));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_most_left_gives_its_room_back() {
        let mut m: HashMap<u32, u32> = (0..10_000).map(|i| (i, i)).collect();
        let full = m.capacity();
        m.retain(|k, _| *k < 100);
        shrink_sparse(&mut m);
        assert!(m.capacity() < full / 10, "{} of {full}", m.capacity());
        assert_eq!(m.len(), 100);
        let before = m.capacity();
        shrink_sparse(&mut m);
        assert_eq!(m.capacity(), before, "a map in use keeps its room");
    }
}
