//! A bounded memory of what happened recently, which never stops to grow or to forget.
//!
//! A pool remembers each attempt it ran, to answer a redelivery with the same report. A
//! `HashMap` grown on demand rehashes every entry at each doubling, under the pool's lock: at
//! 28,672 entries that pause was long enough to show as the tail of a half-load run. Cleared
//! when full, it forgot every attempt but the one it had just run. Here entries live in two
//! generations, each allocated once at its full size: when the current one is full it becomes
//! the previous one, and the previous one is handed back to be dropped outside the lock. So
//! the newest `generation` entries are always remembered, at most twice that are held, and an
//! insert never rehashes.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// The latest entries, at least `generation` of them and at most twice that.
#[derive(Debug)]
pub struct Recent<K, V> {
    current: HashMap<K, V>,
    previous: HashMap<K, V>,
    generation: usize,
}

impl<K: Eq + Hash, V> Recent<K, V> {
    /// A memory keeping at least the latest `generation` entries (at least one).
    pub fn new(generation: usize) -> Self {
        let generation = generation.max(1);
        Self {
            current: HashMap::with_capacity(generation),
            previous: HashMap::new(),
            generation,
        }
    }

    /// The entry for `key`, if it is recent enough to be remembered.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.current.get(key).or_else(|| self.previous.get(key))
    }

    /// Remembers `value` for `key`. When that starts a new generation, the oldest one is
    /// returned: drop it after releasing any lock around this memory, as freeing its entries
    /// takes a while.
    #[must_use = "the retired generation is returned to be dropped outside the lock"]
    pub fn insert(&mut self, key: K, value: V) -> Option<HashMap<K, V>> {
        let mut retired = None;
        if self.current.len() >= self.generation && !self.current.contains_key(&key) {
            let full =
                std::mem::replace(&mut self.current, HashMap::with_capacity(self.generation));
            retired = Some(std::mem::replace(&mut self.previous, full));
        }
        self.current.insert(key, value);
        retired
    }

    /// How many entries are held (the previous generation's included).
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_generation_of_entries_is_always_remembered() {
        let mut recent = Recent::new(100);
        for i in 0..1_000u32 {
            drop(recent.insert(i, i * 2));
            // Every one of the latest 100 inserts is still there, whatever the moment.
            for back in 0..100.min(i + 1) {
                assert_eq!(recent.get(&(i - back)), Some(&((i - back) * 2)), "at {i}");
            }
            assert!(recent.len() <= 200, "at {i}: {} held", recent.len());
        }
        assert_eq!(recent.get(&0), None, "the oldest are forgotten");
    }

    #[test]
    fn a_generation_is_never_rehashed_and_the_oldest_is_handed_back() {
        let mut recent = Recent::new(1_000);
        let capacity = recent.current.capacity();
        let mut retired = Vec::new();
        for i in 0..2_500u32 {
            if let Some(old) = recent.insert(i, ()) {
                retired.push(old.len());
            }
            assert_eq!(
                recent.current.capacity(),
                capacity,
                "the current generation was reallocated at {i}"
            );
        }
        // The first switch retires the empty initial previous, the second the first thousand.
        assert_eq!(retired, vec![0, 1_000]);
    }

    #[test]
    fn replacing_a_remembered_entry_does_not_start_a_generation() {
        let mut recent = Recent::new(2);
        assert!(recent.insert("a", 1).is_none());
        assert!(recent.insert("b", 1).is_none());
        assert!(recent.insert("b", 2).is_none(), "b was already there");
        assert_eq!(recent.get("b"), Some(&2));
        assert!(recent.insert("c", 1).is_some());
        assert_eq!(recent.get("a"), Some(&1), "a is in the previous generation");
    }
}
