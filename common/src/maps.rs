//! Maps that live as long as the process and hold one entry per connected peer.

use std::collections::HashMap;
use std::hash::Hash;

/// Gives back most of a map's table once it holds under a quarter of what it
/// has room for: after thousands of agents left, their slots would otherwise stay
/// allocated for the life of the process.
pub fn shrink_sparse<K: Eq + Hash, V>(map: &mut HashMap<K, V>) {
    const KEEP: usize = 64;
    if map.capacity() > KEEP && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len().saturating_mul(2).max(KEEP));
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
