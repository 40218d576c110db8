//! The chunks the HTTP chunk server handed out last, kept in memory and shared.
//!
//! In a rollout every node of a wave fetches the same few new chunks at about the same
//! time: a thousand nodes, fifteen chunks. Read once and shared as [`Bytes`], a chunk costs
//! one buffer however many connections are sending it, instead of one store read and one
//! 16–256 KiB buffer per request. Those per-request buffers were the coordinator's largest
//! allocations. Each was freed on whichever thread hyper finished with it, and together they
//! fragmented glibc's heaps: at a 1,000-node rollout the process stayed ~70 MB above the
//! memory it used.
//!
//! **Invariant:** the bytes held never exceed the budget given to [`HotChunks::new`]. The
//! chunk served least recently goes first. Only what the chunk store returned enters, so
//! a hit serves the bytes a read would have.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;
use protocol::Digest;

/// Chunk bytes by digest, bounded in total size, least recently served evicted first.
pub struct HotChunks {
    inner: Mutex<Lru>,
}

struct Lru {
    budget: usize,
    held: usize,
    /// Digest → its bytes and the tick it was last served at.
    entries: HashMap<Digest, (Bytes, u64)>,
    /// Tick → digest: the eviction order.
    by_use: BTreeMap<u64, Digest>,
    tick: u64,
}

impl HotChunks {
    /// Holds at most `budget` bytes of chunks.
    pub fn new(budget: usize) -> HotChunks {
        HotChunks {
            inner: Mutex::new(Lru {
                budget,
                held: 0,
                entries: HashMap::new(),
                by_use: BTreeMap::new(),
                tick: 0,
            }),
        }
    }

    /// The chunk's bytes if held; marks it recently served.
    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        let mut lru = self.lock();
        let Lru {
            entries,
            by_use,
            tick,
            ..
        } = &mut *lru;
        let (bytes, used) = entries.get_mut(digest)?;
        *tick += 1;
        by_use.remove(used);
        by_use.insert(*tick, *digest);
        *used = *tick;
        Some(bytes.clone())
    }

    /// Keeps `bytes` as the chunk `digest`, evicting the least recently served chunks to
    /// make room. A chunk larger than the whole budget is not kept.
    pub fn insert(&self, digest: Digest, bytes: Bytes) {
        let mut lru = self.lock();
        if bytes.len() > lru.budget || lru.entries.contains_key(&digest) {
            return;
        }
        while lru.held + bytes.len() > lru.budget {
            let Some((_, oldest)) = lru.by_use.pop_first() else {
                break;
            };
            if let Some((evicted, _)) = lru.entries.remove(&oldest) {
                lru.held -= evicted.len();
            }
        }
        let tick = lru.next_tick();
        lru.held += bytes.len();
        lru.entries.insert(digest, (bytes, tick));
        lru.by_use.insert(tick, digest);
    }

    /// Bytes held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().held
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // Nothing between the lock and its release can panic (map and counter updates
        // only), so a poisoned lock still guards consistent maps.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Lru {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn chunk(len: usize) -> Bytes {
        Bytes::from(vec![7u8; len])
    }

    #[test]
    fn a_held_chunk_is_served_from_memory() {
        let hot = HotChunks::new(100);
        assert!(hot.get(&digest(1)).is_none());
        hot.insert(digest(1), chunk(40));
        assert_eq!(hot.get(&digest(1)).map(|b| b.len()), Some(40));
        assert_eq!(hot.held(), 40);
    }

    #[test]
    fn the_budget_is_never_exceeded_and_the_least_recently_served_goes_first() {
        let hot = HotChunks::new(100);
        hot.insert(digest(1), chunk(40));
        hot.insert(digest(2), chunk(40));
        // Serving 1 makes 2 the least recently served.
        assert!(hot.get(&digest(1)).is_some());
        hot.insert(digest(3), chunk(40));
        assert!(hot.held() <= 100);
        assert!(hot.get(&digest(2)).is_none(), "2 was served least recently");
        assert!(hot.get(&digest(1)).is_some());
        assert!(hot.get(&digest(3)).is_some());
    }

    #[test]
    fn a_chunk_over_the_whole_budget_is_not_kept() {
        let hot = HotChunks::new(100);
        hot.insert(digest(1), chunk(60));
        hot.insert(digest(2), chunk(101));
        assert!(hot.get(&digest(2)).is_none());
        assert!(hot.get(&digest(1)).is_some(), "nothing was evicted for it");
        assert_eq!(hot.held(), 60);
    }

    #[test]
    fn inserting_a_held_chunk_again_counts_it_once() {
        let hot = HotChunks::new(100);
        hot.insert(digest(1), chunk(60));
        hot.insert(digest(1), chunk(60));
        assert_eq!(hot.held(), 60);
    }
}
