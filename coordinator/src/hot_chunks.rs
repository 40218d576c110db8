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
//! chunk served least recently goes first, and a chunk not served for the idle time given
//! there goes at the next get or insert: a wave's nodes ask for its chunks within seconds
//! of each other, and the last release's chunks would otherwise stay for as long as nothing
//! new pushes them out. Only what the chunk store returned enters, so a hit serves the
//! bytes a read would have.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::Digest;

/// Chunk bytes by digest, bounded in total size, least recently served evicted first.
pub struct HotChunks {
    inner: Mutex<Lru>,
}

struct Lru {
    budget: usize,
    idle: Duration,
    held: usize,
    /// Digest → its bytes and the tick it was last served at.
    entries: HashMap<Digest, (Bytes, u64)>,
    /// Tick → digest and when it was last served: the eviction order.
    by_use: BTreeMap<u64, (Digest, Instant)>,
    tick: u64,
}

impl HotChunks {
    /// Holds at most `budget` bytes of chunks, none of them unserved for longer than `idle`.
    pub fn new(budget: usize, idle: Duration) -> HotChunks {
        HotChunks {
            inner: Mutex::new(Lru {
                budget,
                idle,
                held: 0,
                entries: HashMap::new(),
                by_use: BTreeMap::new(),
                tick: 0,
            }),
        }
    }

    /// The chunk's bytes if held; marks it recently served.
    pub fn get(&self, digest: &Digest) -> Option<Bytes> {
        self.get_at(digest, Instant::now())
    }

    fn get_at(&self, digest: &Digest, now: Instant) -> Option<Bytes> {
        let mut lru = self.lock();
        lru.expire(now);
        let Lru {
            entries,
            by_use,
            tick,
            ..
        } = &mut *lru;
        let (bytes, used) = entries.get_mut(digest)?;
        *tick += 1;
        by_use.remove(used);
        by_use.insert(*tick, (*digest, now));
        *used = *tick;
        Some(bytes.clone())
    }

    /// Keeps `bytes` as the chunk `digest`, evicting the least recently served chunks to
    /// make room. A chunk larger than the whole budget is not kept.
    pub fn insert(&self, digest: Digest, bytes: Bytes) {
        self.insert_at(digest, bytes, Instant::now());
    }

    fn insert_at(&self, digest: Digest, bytes: Bytes, now: Instant) {
        let mut lru = self.lock();
        lru.expire(now);
        if bytes.len() > lru.budget || lru.entries.contains_key(&digest) {
            return;
        }
        while lru.held + bytes.len() > lru.budget && lru.evict_oldest() {}
        let tick = lru.next_tick();
        lru.held += bytes.len();
        lru.entries.insert(digest, (bytes, tick));
        lru.by_use.insert(tick, (digest, now));
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

    /// Drops the chunks not served for longer than `idle` before `now`.
    fn expire(&mut self, now: Instant) {
        while self
            .by_use
            .first_key_value()
            .is_some_and(|(_, (_, served))| now.saturating_duration_since(*served) > self.idle)
        {
            self.evict_oldest();
        }
    }

    /// Drops the chunk served least recently; false if none is held.
    fn evict_oldest(&mut self) -> bool {
        let Some((_, (oldest, _))) = self.by_use.pop_first() else {
            return false;
        };
        if let Some((evicted, _)) = self.entries.remove(&oldest) {
            self.held -= evicted.len();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Longer than any test takes: only the tests about idling see chunks expire.
    const IDLE: Duration = Duration::from_secs(3600);

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn chunk(len: usize) -> Bytes {
        Bytes::from(vec![7u8; len])
    }

    #[test]
    fn a_held_chunk_is_served_from_memory() {
        let hot = HotChunks::new(100, IDLE);
        assert!(hot.get(&digest(1)).is_none());
        hot.insert(digest(1), chunk(40));
        assert_eq!(hot.get(&digest(1)).map(|b| b.len()), Some(40));
        assert_eq!(hot.held(), 40);
    }

    #[test]
    fn the_budget_is_never_exceeded_and_the_least_recently_served_goes_first() {
        let hot = HotChunks::new(100, IDLE);
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
        let hot = HotChunks::new(100, IDLE);
        hot.insert(digest(1), chunk(60));
        hot.insert(digest(2), chunk(101));
        assert!(hot.get(&digest(2)).is_none());
        assert!(hot.get(&digest(1)).is_some(), "nothing was evicted for it");
        assert_eq!(hot.held(), 60);
    }

    #[test]
    fn inserting_a_held_chunk_again_counts_it_once() {
        let hot = HotChunks::new(100, IDLE);
        hot.insert(digest(1), chunk(60));
        hot.insert(digest(1), chunk(60));
        assert_eq!(hot.held(), 60);
    }

    #[test]
    fn a_chunk_not_served_for_longer_than_the_idle_time_goes() {
        let hot = HotChunks::new(100, Duration::from_secs(20));
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        hot.insert_at(digest(1), chunk(30), at(0));
        hot.insert_at(digest(2), chunk(30), at(0));
        // Served at 15 s: idle from then on, not from its insertion.
        assert!(hot.get_at(&digest(1), at(15)).is_some());
        assert!(hot.get_at(&digest(1), at(30)).is_some());
        assert!(
            hot.get_at(&digest(2), at(30)).is_none(),
            "unserved for 30 s"
        );
        assert_eq!(hot.held(), 30, "its bytes went with it");
        hot.insert_at(digest(3), chunk(30), at(51));
        assert!(hot.get_at(&digest(3), at(51)).is_some());
        assert!(
            hot.get_at(&digest(1), at(51)).is_none(),
            "unserved for 21 s"
        );
        assert_eq!(hot.held(), 30);
    }
}
