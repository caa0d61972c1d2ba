//! A small bounded cache with a time-to-live, for verified API keys and live sessions.
//!
//! Deliberately simple: a mutex around a hash map. When full, expired entries go first, then
//! arbitrary ones (a miss only costs a store look-up). Entries are removed on revocation, and
//! the whole cache is cleared when the store's revocation epoch moves.

use std::{borrow::Borrow, collections::HashMap, hash::Hash, sync::Mutex, time::Duration};

use crate::clock::Coarse;

pub struct TtlCache<K, V> {
    inner: Mutex<HashMap<K, (Coarse, V)>>,
    ttl: Duration,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            inner: Mutex::new(HashMap::new()),
            ttl,
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (Coarse, V)>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value, by any borrowed form of the key (a `&str` for a `String` key: no copy).
    pub fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let mut map = self.lock();
        match map.get(key) {
            Some((at, v)) if at.elapsed() < self.ttl => Some(v.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, key: K, value: V) {
        let mut map = self.lock();
        if map.len() >= self.capacity && !map.contains_key(&key) {
            let ttl = self.ttl;
            map.retain(|_, (at, _)| at.elapsed() < ttl);
            while map.len() >= self.capacity {
                let Some(k) = map.keys().next().cloned() else {
                    break;
                };
                map.remove(&k);
            }
        }
        map.insert(key, (Coarse::now(), value));
    }

    pub fn remove<Q: Hash + Eq + ?Sized>(&self, key: &Q)
    where
        K: Borrow<Q>,
    {
        self.lock().remove(key);
    }

    /// Removes every entry whose value matches.
    pub fn remove_where(&self, pred: impl Fn(&V) -> bool) {
        self.lock().retain(|_, (_, v)| !pred(v));
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_expiring() {
        let c = TtlCache::new(2, Duration::from_millis(50));
        c.insert(1, "a");
        c.insert(2, "b");
        c.insert(3, "c");
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&3), Some("c"));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(c.get(&3), None);
        c.insert(4, "d");
        c.remove_where(|v| *v == "d");
        assert!(c.get(&4).is_none());
    }
}
