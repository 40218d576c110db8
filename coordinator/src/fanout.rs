//! Fan-out dedup for chunk frames on MQTT.
//!
//! Chunk frames go to a topic shared by every node staging the release, so when many nodes ask
//! for the same chunk at once one publish serves them all. [`FanoutDedup`] decides, per
//! (release, digest), whether a request should queue the chunk:
//! - not while it is *pending* (queued, being read, or waiting for room in the MQTT client):
//!   the publish to come serves this asker too, however long the queue is;
//! - not if it was published under a sequence number at or after the asker's
//!   `ChunkRequest::receiving_from`: the frame is on its way to the asker, queued in the
//!   broker behind the others (a slow subscriber can be seconds behind);
//! - not within the window after it was *published*: a node that asked at the same moment
//!   gets that frame. The window starts when the frame is handed to the MQTT client, not when
//!   it was queued, so a long queue cannot make a chunk go out twice. It is shorter than the
//!   agents' first retry (`ChunkRequest::RETRY_FIRST`), so a node that missed the frame (it
//!   subscribed just after) is served when it asks again.
//!
//! It also numbers the frames: each publish takes the next sequence number.
//!
//! Pure: the caller passes `now`. Memory is bounded: pending entries by the caller's queue
//! limits (each is released by [`FanoutDedup::published`] or [`FanoutDedup::abandoned`]),
//! published ones by the number of frames published within the memory span
//! (`ChunkRequest::SEQUENCE_MEMORY`; expired ones are dropped, oldest first, on every call).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use protocol::{Digest, ReleaseId};
use tokio::time::Instant;

type Key = (ReleaseId, Digest);

/// Whether a requested chunk should be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Queue it; it is pending until published or abandoned.
    Queue,
    /// Already queued and not yet published.
    Pending,
    /// Published after the asker started receiving the shared topic: on its way to it.
    OnTheWay,
    /// Published less than the window ago.
    RecentlySent,
}

/// When a chunk was last published, and under which sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    at: Instant,
    seq: u64,
}

#[derive(Debug)]
pub struct FanoutDedup {
    window: Duration,
    memory: Duration,
    next_seq: u64,
    pending: HashSet<Key>,
    /// The last publish of each chunk published within the memory span (and the expired
    /// ones not yet pruned).
    last_sent: HashMap<Key, Sent>,
    /// The same publishes in time order, to prune `last_sent` oldest first. A key sent again
    /// appears twice; only the entry matching `last_sent` removes it.
    sent_order: VecDeque<(Sent, Key)>,
}

impl FanoutDedup {
    /// `window` as above; publishes are remembered for `memory` (at least the window);
    /// the first frame is numbered `first_seq`.
    pub fn new(window: Duration, memory: Duration, first_seq: u64) -> FanoutDedup {
        FanoutDedup {
            window,
            memory: memory.max(window),
            next_seq: first_seq,
            pending: HashSet::new(),
            last_sent: HashMap::new(),
            sent_order: VecDeque::new(),
        }
    }

    /// Whether `digest` of `release`, asked for at `now` by a node receiving the shared
    /// topic since frame `receiving_from` (if it says so), should be queued; if so, it is
    /// pending from now on.
    pub fn admit(
        &mut self,
        release: &ReleaseId,
        digest: Digest,
        now: Instant,
        receiving_from: Option<u64>,
    ) -> Admission {
        self.prune(now);
        let key = (release.clone(), digest);
        if self.pending.contains(&key) {
            return Admission::Pending;
        }
        if let Some(sent) = self.last_sent.get(&key) {
            if receiving_from.is_some_and(|from| sent.seq >= from) {
                return Admission::OnTheWay;
            }
            if now.saturating_duration_since(sent.at) < self.window {
                return Admission::RecentlySent;
            }
        }
        self.pending.insert(key);
        Admission::Queue
    }

    /// The sequence number the next published frame carries.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The pending chunk was handed to the MQTT client at `now`, numbered
    /// [`FanoutDedup::next_seq`]: the window starts, and the next frame takes the next
    /// number.
    pub fn published(&mut self, release: &ReleaseId, digest: Digest, now: Instant) {
        self.prune(now);
        let key = (release.clone(), digest);
        let sent = Sent {
            at: now,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.pending.remove(&key);
        self.last_sent.insert(key.clone(), sent);
        self.sent_order.push_back((sent, key));
    }

    /// The pending chunk will not be published (it could not be read); the next request
    /// queues it again.
    pub fn abandoned(&mut self, release: &ReleaseId, digest: Digest) {
        self.pending.remove(&(release.clone(), digest));
    }

    /// Forgets publishes older than the memory span.
    fn prune(&mut self, now: Instant) {
        while let Some((sent, _)) = self.sent_order.front() {
            if now.saturating_duration_since(sent.at) < self.memory {
                break;
            }
            let Some((sent, key)) = self.sent_order.pop_front() else {
                break;
            };
            if self.last_sent.get(&key) == Some(&sent) {
                self.last_sent.remove(&key);
            }
        }
    }

    #[cfg(test)]
    fn remembered(&self) -> (usize, usize, usize) {
        (
            self.pending.len(),
            self.last_sent.len(),
            self.sent_order.len(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::messages::ChunkRequest;
    use protocol::{AppName, Version};

    const WINDOW: Duration = ChunkRequest::FANOUT_WINDOW;
    const MEMORY: Duration = ChunkRequest::SEQUENCE_MEMORY;

    fn release(version: &str) -> ReleaseId {
        ReleaseId::new(
            AppName::new("web").expect("app"),
            Version::new(version).expect("version"),
        )
    }

    #[test]
    fn the_window_is_shorter_than_the_agents_first_retry() {
        assert!(WINDOW < ChunkRequest::RETRY_FIRST);
    }

    #[test]
    fn a_chunk_asked_for_again_while_queued_is_not_queued_twice_however_long_the_queue() {
        let mut dedup = FanoutDedup::new(WINDOW, MEMORY, 1);
        let (r, d, t0) = (release("1"), Digest::of(b"a"), Instant::now());
        assert_eq!(dedup.admit(&r, d, t0, None), Admission::Queue);
        // Fifty nodes ask, some long after the first, while the chunk waits in the queue.
        for i in 0..50 {
            let at = t0 + Duration::from_millis(100 * i);
            assert_eq!(dedup.admit(&r, d, at, None), Admission::Pending);
        }
        dedup.published(&r, d, t0 + Duration::from_secs(5));
        assert_eq!(
            dedup.admit(&r, d, t0 + Duration::from_secs(5) + WINDOW / 2, None),
            Admission::RecentlySent
        );
    }

    #[test]
    fn the_window_starts_when_the_frame_is_published_and_a_later_retry_is_served() {
        let mut dedup = FanoutDedup::new(WINDOW, MEMORY, 1);
        let (r, d, t0) = (release("1"), Digest::of(b"a"), Instant::now());
        assert_eq!(dedup.admit(&r, d, t0, None), Admission::Queue);
        let sent = t0 + Duration::from_millis(300);
        dedup.published(&r, d, sent);
        assert_eq!(
            dedup.admit(&r, d, sent + WINDOW - Duration::from_millis(1), None),
            Admission::RecentlySent
        );
        // An agent that missed the frame asks again after RETRY_FIRST: it is sent again.
        assert_eq!(
            dedup.admit(&r, d, t0 + ChunkRequest::RETRY_FIRST, None),
            Admission::Queue
        );
    }

    #[test]
    fn an_abandoned_chunk_is_queued_again_on_the_next_request() {
        let mut dedup = FanoutDedup::new(WINDOW, MEMORY, 1);
        let (r, d, t0) = (release("1"), Digest::of(b"a"), Instant::now());
        assert_eq!(dedup.admit(&r, d, t0, None), Admission::Queue);
        dedup.abandoned(&r, d);
        assert_eq!(dedup.admit(&r, d, t0, None), Admission::Queue);
    }

    #[test]
    fn the_window_is_per_release_and_per_digest() {
        let mut dedup = FanoutDedup::new(WINDOW, MEMORY, 1);
        let t0 = Instant::now();
        assert_eq!(
            dedup.admit(&release("1"), Digest::of(b"a"), t0, None),
            Admission::Queue
        );
        assert_eq!(
            dedup.admit(&release("2"), Digest::of(b"a"), t0, None),
            Admission::Queue
        );
        assert_eq!(
            dedup.admit(&release("1"), Digest::of(b"b"), t0, None),
            Admission::Queue
        );
    }

    #[test]
    fn a_node_receiving_since_before_the_publish_is_not_sent_the_chunk_again() {
        let mut dedup = FanoutDedup::new(WINDOW, MEMORY, 100);
        let (r, d, t0) = (release("1"), Digest::of(b"a"), Instant::now());
        assert_eq!(dedup.admit(&r, d, t0, None), Admission::Queue);
        assert_eq!(dedup.next_seq(), 100);
        dedup.published(&r, d, t0);
        assert_eq!(dedup.next_seq(), 101);
        // Long past the window, a node that has received the topic since frame 100 (or
        // earlier) still has this frame queued for it in the broker.
        let late = t0 + MEMORY - Duration::from_millis(1);
        assert_eq!(dedup.admit(&r, d, late, Some(100)), Admission::OnTheWay);
        assert_eq!(dedup.admit(&r, d, late, Some(3)), Admission::OnTheWay);
        // One that started receiving after it went out missed it, and so does one that
        // makes no claim (it asks again for what never came).
        assert_eq!(dedup.admit(&r, d, late, Some(101)), Admission::Queue);
        dedup.abandoned(&r, d);
        assert_eq!(dedup.admit(&r, d, late, None), Admission::Queue);
    }

    #[test]
    fn a_claim_does_not_outlast_the_memory_span_or_the_window_rule() {
        let mut dedup = FanoutDedup::new(WINDOW, MEMORY, 1);
        let (r, d, t0) = (release("1"), Digest::of(b"a"), Instant::now());
        assert_eq!(dedup.admit(&r, d, t0, None), Admission::Queue);
        dedup.published(&r, d, t0);
        // A node that subscribed after the publish, asking at once, shares the next frame
        // with the others asking at that moment only through the window.
        assert_eq!(
            dedup.admit(&r, d, t0 + WINDOW / 2, Some(2)),
            Admission::RecentlySent
        );
        assert_eq!(dedup.admit(&r, d, t0 + MEMORY, Some(1)), Admission::Queue);
    }

    #[test]
    fn publishes_older_than_the_memory_span_are_forgotten_so_memory_stays_bounded() {
        let mut dedup = FanoutDedup::new(WINDOW, MEMORY, 1);
        let (r, t0) = (release("1"), Instant::now());
        for i in 0..10_000u32 {
            let d = Digest::of(&i.to_le_bytes());
            assert_eq!(dedup.admit(&r, d, t0, None), Admission::Queue);
            dedup.published(&r, d, t0);
        }
        // The same chunk published twice within the span is remembered once.
        let d = Digest::of(b"again");
        dedup.published(&r, d, t0 + WINDOW / 2);
        dedup.published(&r, d, t0 + WINDOW / 2 + Duration::from_millis(1));
        assert_eq!(dedup.remembered(), (0, 10_001, 10_002));
        // Past the window all are still remembered for claims; the window rule lapses.
        let after_window = t0 + WINDOW + Duration::from_millis(2);
        assert_eq!(
            dedup.admit(&r, Digest::of(&7u32.to_le_bytes()), after_window, Some(1)),
            Admission::OnTheWay
        );
        let first = Digest::of(&8u32.to_le_bytes());
        assert_eq!(dedup.admit(&r, first, after_window, None), Admission::Queue);
        dedup.abandoned(&r, first);
        // Past the first batch's span only `d` is left (both of its publishes, in order).
        let after_span = t0 + MEMORY + Duration::from_millis(1);
        assert_eq!(
            dedup.admit(&r, Digest::of(b"new"), after_span, None),
            Admission::Queue
        );
        assert_eq!(dedup.remembered(), (1, 1, 2));
        assert_eq!(dedup.admit(&r, d, after_span, Some(1)), Admission::OnTheWay);
    }
}
