//! Fan-out dedup for chunk frames on MQTT.
//!
//! Chunk frames go to a topic shared by every node staging the release, so when many nodes ask
//! for the same chunk at once one publish serves them all. [`FanoutDedup`] remembers when each
//! (release, digest) was last sent and admits it again only after the window has passed.
//!
//! Pure: the caller passes `now`. Memory is bounded by pruning entries older than the window.

use std::collections::HashMap;
use std::time::Duration;

use protocol::{Digest, ReleaseId};
use tokio::time::Instant;

/// Entries kept before old ones are pruned.
const PRUNE_AT: usize = 4096;

#[derive(Debug)]
pub struct FanoutDedup {
    window: Duration,
    last_sent: HashMap<(ReleaseId, Digest), Instant>,
}

impl FanoutDedup {
    pub fn new(window: Duration) -> FanoutDedup {
        FanoutDedup {
            window,
            last_sent: HashMap::new(),
        }
    }

    /// Whether `digest` of `release` should be published at `now`; if so, records it as sent.
    pub fn admit(&mut self, release: &ReleaseId, digest: Digest, now: Instant) -> bool {
        if self.last_sent.len() >= PRUNE_AT {
            let window = self.window;
            self.last_sent
                .retain(|_, sent| now.saturating_duration_since(*sent) < window);
        }
        let key = (release.clone(), digest);
        match self.last_sent.get(&key) {
            Some(sent) if now.saturating_duration_since(*sent) < self.window => false,
            _ => {
                self.last_sent.insert(key, now);
                true
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.last_sent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{AppName, Version};

    fn release(version: &str) -> ReleaseId {
        ReleaseId::new(
            AppName::new("web").expect("app"),
            Version::new(version).expect("version"),
        )
    }

    #[test]
    fn a_chunk_asked_for_twice_within_the_window_is_sent_once() {
        let mut dedup = FanoutDedup::new(Duration::from_secs(2));
        let t0 = Instant::now();
        let d = Digest::of(b"a");
        assert!(dedup.admit(&release("1"), d, t0));
        assert!(!dedup.admit(&release("1"), d, t0 + Duration::from_millis(1999)));
        assert!(dedup.admit(&release("1"), d, t0 + Duration::from_secs(2)));
    }

    #[test]
    fn the_window_is_per_release_and_per_digest() {
        let mut dedup = FanoutDedup::new(Duration::from_secs(2));
        let t0 = Instant::now();
        assert!(dedup.admit(&release("1"), Digest::of(b"a"), t0));
        assert!(dedup.admit(&release("2"), Digest::of(b"a"), t0));
        assert!(dedup.admit(&release("1"), Digest::of(b"b"), t0));
    }

    #[test]
    fn old_entries_are_pruned_so_memory_stays_bounded() {
        let mut dedup = FanoutDedup::new(Duration::from_secs(2));
        let t0 = Instant::now();
        for i in 0..PRUNE_AT as u32 {
            assert!(dedup.admit(&release("1"), Digest::of(&i.to_le_bytes()), t0));
        }
        let later = t0 + Duration::from_secs(3);
        assert!(dedup.admit(&release("1"), Digest::of(b"new"), later));
        assert_eq!(dedup.len(), 1);
    }
}
