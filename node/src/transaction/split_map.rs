//! A hash map in 256 parts, for the transaction layer's tables. Under sustained load each
//! table holds every transaction of the last 32 s (Timers J, L and M), hundreds of
//! thousands of entries. A single map doubles when it is 7/8 full and moves every entry
//! while the SIP thread waits: at 16,000 registrations/s such a move at 448,000 entries
//! held the thread long enough for the socket to overflow, and about 1.4 s of
//! registrations went over 100 ms. Each part here grows on its own, so a growth moves at
//! most a 256th of the table.
//!
//! A key's part comes from bits 48–55 of its hash. The parts' own maps use the low bits
//! (the bucket) and the top seven (the control byte), so the bits that pick the part leave
//! both as random as before.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

const PARTS: usize = 256;

pub struct SplitMap<K, V, S> {
    hasher: S,
    parts: Box<[HashMap<K, V, S>]>,
}

impl<K: Hash + Eq, V, S: BuildHasher + Clone + Default> Default for SplitMap<K, V, S> {
    fn default() -> Self {
        let hasher = S::default();
        let parts = (0..PARTS)
            .map(|_| HashMap::with_hasher(hasher.clone()))
            .collect();
        SplitMap { hasher, parts }
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> SplitMap<K, V, S> {
    fn part(&self, key: &K) -> usize {
        (self.hasher.hash_one(key) >> 48) as usize % PARTS
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.parts[self.part(key)].get(key)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let part = self.part(key);
        self.parts[part].get_mut(key)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let part = self.part(&key);
        self.parts[part].insert(key, value)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let part = self.part(key);
        self.parts[part].remove(key)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.parts.iter().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::hash_map::RandomState;

    use rustc_hash::FxBuildHasher;

    use super::*;

    #[test]
    fn behaves_as_one_map() {
        let mut m: SplitMap<u64, u64, FxBuildHasher> = SplitMap::default();
        for i in 0..10_000u64 {
            assert_eq!(m.insert(i, i * 2), None);
        }
        assert_eq!(m.insert(7, 1), Some(14));
        assert_eq!(m.get(&7), Some(&1));
        *m.get_mut(&8).unwrap() += 1;
        assert_eq!(m.get(&8), Some(&17));
        assert_eq!(m.remove(&9), Some(18));
        assert_eq!(m.remove(&9), None);
        assert_eq!(m.get(&9), None);
        assert_eq!(m.get(&10_000), None);
        assert_eq!(m.len(), 9_999);
    }

    /// Sequential ids (as the layer's are) and keyed hashes both spread over every part, so
    /// no part grows to the size of the whole.
    #[test]
    fn keys_spread_over_the_parts() {
        fn largest_part<S: BuildHasher>(m: &SplitMap<u64, (), S>) -> usize {
            m.parts.iter().map(HashMap::len).max().unwrap()
        }
        let mut fx: SplitMap<u64, (), FxBuildHasher> = SplitMap::default();
        let mut sip: SplitMap<u64, (), RandomState> = SplitMap::default();
        for i in 0..256_000u64 {
            fx.insert(i * 64 + 3, ());
            sip.insert(i, ());
        }
        // 1,000 per part on average.
        assert!(largest_part(&fx) < 1_500, "{}", largest_part(&fx));
        assert!(largest_part(&sip) < 1_500, "{}", largest_part(&sip));
    }
}
