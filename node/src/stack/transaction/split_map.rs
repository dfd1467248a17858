//! A hash map in 256 parts, for the transaction layer's tables. Under sustained load each
//! table holds every transaction of the last 32 s (Timers J, L and M), hundreds of
//! thousands of entries. A single map doubles when it is 7/8 full and moves every entry
//! while the SIP thread waits: at 16,000 registrations/s such a move at 448,000 entries
//! held the thread long enough for the socket to overflow, and about 1.5 s of
//! registrations went over 100 ms. Each part here grows on its own, so a growth moves at
//! most a 256th of the table.
//!
//! A key's part comes from bits 48–55 of its hash. The parts' own tables use the low bits
//! (the bucket) and the top seven (the control byte) of the same hash, so the bits that
//! pick the part leave both as random as before.

use std::hash::{BuildHasher, Hash};

use hashbrown::HashTable;

const PARTS: usize = 256;

pub struct SplitMap<K, V, S> {
    hasher: S,
    /// Each key is hashed once, to pick its part and its place in that part.
    parts: Box<[HashTable<(K, V)>]>,
}

impl<K, V, S: Default> Default for SplitMap<K, V, S> {
    fn default() -> Self {
        SplitMap {
            hasher: S::default(),
            parts: (0..PARTS).map(|_| HashTable::new()).collect(),
        }
    }
}

impl<K: Hash + Eq, V, S: BuildHasher> SplitMap<K, V, S> {
    /// The key's hash, and its part.
    fn locate(&self, key: &K) -> (u64, usize) {
        let hash = self.hasher.hash_one(key);
        (hash, (hash >> 48) as usize % PARTS)
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        let (hash, part) = self.locate(key);
        self.parts[part]
            .find(hash, |(k, _)| k == key)
            .map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let (hash, part) = self.locate(key);
        self.parts[part]
            .find_mut(hash, |(k, _)| k == key)
            .map(|(_, v)| v)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let (hash, part) = self.locate(&key);
        let hasher = &self.hasher;
        match self.parts[part].entry(hash, |(k, _)| *k == key, |(k, _)| hasher.hash_one(k)) {
            hashbrown::hash_table::Entry::Occupied(mut e) => {
                Some(std::mem::replace(&mut e.get_mut().1, value))
            }
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert((key, value));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (hash, part) = self.locate(key);
        self.parts[part]
            .find_entry(hash, |(k, _)| k == key)
            .ok()
            .map(|e| e.remove().0 .1)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.parts.iter().map(HashTable::len).sum()
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
            m.parts.iter().map(HashTable::len).max().unwrap()
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
