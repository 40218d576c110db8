//! Which chunks a staging still needs, which source each is to be fetched from next, and
//! which are asked for and not yet here. Pure bookkeeping: no I/O, `now` passed in.
//!
//! Sources are numbered in the order they are tried: the release's HTTP sources `0..n`, then
//! MQTT as `n`. A chunk moves to the next source when its current one fails or serves bad
//! bytes; a source that fails [`GIVE_UP_AFTER`] times in a row is skipped for the rest of the
//! staging. MQTT is never skipped: it is the transport of last resort.
//!
//! Invariant: `in_flight_bytes` is the sum of the compressed sizes of the chunks in flight
//! on either transport, so the window bounds them together.
//!
//! [`Follow`] decides when a node may ask over MQTT at all: not while other nodes' requests
//! already bring it the chunks it wants (see its doc).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use protocol::messages::ChunkRequest;
use protocol::{ChunkRef, Digest};

/// Consecutive failures after which an HTTP source is skipped for the rest of the staging.
pub const GIVE_UP_AFTER: u32 = 3;
/// How long a node listens on the shared chunk topic before its first MQTT request, and the
/// span over which [`Follow`] measures the frames other nodes' requests bring it.
pub const FOLLOW_SPAN: Duration = Duration::from_millis(300);
/// Wanted bytes that must pass by within [`FOLLOW_SPAN`] for a node to keep following
/// (about 0.85 MB/s): a node that fetches slowly (rate-limited, or starved) cannot hold
/// the others back below this.
pub const FOLLOW_MIN_BYTES: u64 = 256 * 1024;

/// Whether a node may ask for chunks over MQTT now, or should take what passes by.
///
/// Nodes of a rollout start fetching at slightly different moments. A node that starts late
/// has missed the frames already published; if it asked for them at once, every late node
/// would ask at its own moment and the coordinator would send the same chunks once per
/// moment (its dedup window is short so that a lost frame is sent again). Instead a late
/// node takes the frames the others' requests bring while they keep coming, and asks only
/// once they stop: then the late nodes all ask at about the same time, and their requests
/// for the chunks they all missed share one frame. The first node, finding nothing on the
/// topic after [`FOLLOW_SPAN`], asks at once.
///
/// Pure: `now` is passed in; memory is bounded by the frames of one span.
#[derive(Debug, Default)]
pub struct Follow {
    listening_since: Option<Instant>,
    /// Wanted frames this node did not ask for, within the last span: (arrival, bytes).
    passed_by: VecDeque<(Instant, u64)>,
    passed_bytes: u64,
}

impl Follow {
    /// A frame of `bytes` for a chunk this node wants but had not asked for arrived.
    pub fn passed_by(&mut self, now: Instant, bytes: u64) {
        self.prune(now);
        self.passed_by.push_back((now, bytes));
        self.passed_bytes += bytes;
    }

    /// Whether the node may send requests: it has listened for a span, and less than
    /// [`FOLLOW_MIN_BYTES`] it wants passed by within the last one. Called once the node is
    /// subscribed to the shared topic; the first call starts the listening.
    pub fn may_ask(&mut self, now: Instant) -> bool {
        self.prune(now);
        let since = *self.listening_since.get_or_insert(now);
        now.saturating_duration_since(since) >= FOLLOW_SPAN && self.passed_bytes < FOLLOW_MIN_BYTES
    }

    fn prune(&mut self, now: Instant) {
        while let Some(&(at, bytes)) = self.passed_by.front() {
            if now.saturating_duration_since(at) < FOLLOW_SPAN {
                break;
            }
            self.passed_by.pop_front();
            self.passed_bytes -= bytes;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Want {
    chunk: ChunkRef,
    source: usize,
}

#[derive(Debug)]
pub struct Wanted {
    chunks: HashMap<Digest, Want>,
    /// Waiting for an HTTP source, in manifest order.
    http_queue: VecDeque<Digest>,
    /// Waiting to be asked for over MQTT, in manifest order (retries go first).
    mqtt_queue: VecDeque<Digest>,
    http_in_flight: HashSet<Digest>,
    /// When each outstanding MQTT request was sent.
    mqtt_in_flight: HashMap<Digest, Instant>,
    in_flight_bytes: u64,
    http_sources: usize,
    failures: Vec<u32>,
}

/// What became of a source after a failure was recorded.
#[derive(Debug, PartialEq, Eq)]
pub enum SourceHealth {
    Usable,
    /// Just crossed [`GIVE_UP_AFTER`]: the caller says so once.
    GaveUp,
}

impl Wanted {
    pub fn new(missing: Vec<ChunkRef>, http_sources: usize) -> Wanted {
        let order = missing.iter().map(|c| c.digest);
        let (http_queue, mqtt_queue) = if http_sources > 0 {
            (order.collect(), VecDeque::new())
        } else {
            (VecDeque::new(), order.collect())
        };
        Wanted {
            chunks: missing
                .into_iter()
                .map(|chunk| (chunk.digest, Want { chunk, source: 0 }))
                .collect(),
            http_queue,
            mqtt_queue,
            http_in_flight: HashSet::new(),
            mqtt_in_flight: HashMap::new(),
            in_flight_bytes: 0,
            http_sources,
            failures: vec![0; http_sources],
        }
    }

    pub fn is_done(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn get(&self, digest: &Digest) -> Option<ChunkRef> {
        self.chunks.get(digest).map(|w| w.chunk)
    }

    /// Whether this node has an MQTT request out for `digest`.
    pub fn asked_over_mqtt(&self, digest: &Digest) -> bool {
        self.mqtt_in_flight.contains_key(digest)
    }

    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    fn fits(&self, size: u64, budget: u64) -> bool {
        // A chunk bigger than the whole budget still goes alone, or it would never go.
        self.in_flight_bytes + size <= budget || self.in_flight_bytes == 0
    }

    fn source_up(&self, source: usize) -> bool {
        source >= self.http_sources || self.failures[source] < GIVE_UP_AFTER
    }

    /// The next chunk to fetch over HTTP and the source to fetch it from, if the window has
    /// room. Chunks whose remaining HTTP sources are all given up move to the MQTT queue.
    pub fn next_http(&mut self, budget: u64) -> Option<(ChunkRef, usize)> {
        while let Some(digest) = self.http_queue.front().copied() {
            let Some(want) = self.chunks.get_mut(&digest) else {
                self.http_queue.pop_front();
                continue;
            };
            let mut source = want.source;
            while source < self.http_sources && self.failures[source] >= GIVE_UP_AFTER {
                source += 1;
            }
            want.source = source;
            let chunk = want.chunk;
            if source >= self.http_sources {
                self.http_queue.pop_front();
                self.mqtt_queue.push_back(digest);
                continue;
            }
            if !self.fits(u64::from(chunk.zsize), budget) {
                return None;
            }
            self.http_queue.pop_front();
            self.http_in_flight.insert(digest);
            self.in_flight_bytes += u64::from(chunk.zsize);
            return Some((chunk, source));
        }
        None
    }

    /// Whether any chunk waits to be asked for over MQTT (its HTTP sources failed, or there
    /// are none).
    pub fn wants_mqtt(&self) -> bool {
        !self.mqtt_queue.is_empty()
    }

    /// Up to [`ChunkRequest::MAX_DIGESTS`] chunks to ask for over MQTT within `budget`.
    pub fn next_mqtt_batch(&mut self, budget: u64, now: Instant) -> Vec<ChunkRef> {
        let mut batch = Vec::new();
        while let Some(digest) = self.mqtt_queue.front().copied() {
            if batch.len() == ChunkRequest::MAX_DIGESTS {
                break;
            }
            let Some(chunk) = self.get(&digest) else {
                self.mqtt_queue.pop_front();
                continue;
            };
            if self.mqtt_in_flight.contains_key(&digest) {
                self.mqtt_queue.pop_front();
                continue;
            }
            if !self.fits(u64::from(chunk.zsize), budget) {
                break;
            }
            self.mqtt_queue.pop_front();
            self.mqtt_in_flight.insert(digest, now);
            self.in_flight_bytes += u64::from(chunk.zsize);
            batch.push(chunk);
        }
        batch
    }

    /// A verified copy is in the store, whichever transport brought it.
    pub fn arrived(&mut self, digest: &Digest) {
        if let Some(want) = self.chunks.remove(digest) {
            self.settle(digest, want.chunk);
        }
    }

    /// `source` served `digest` and it verified: the source is healthy again.
    pub fn http_arrived(&mut self, digest: &Digest, source: usize) {
        if let Some(failures) = self.failures.get_mut(source) {
            *failures = 0;
        }
        self.arrived(digest);
    }

    /// Drops `digest` from the in-flight sets and the window.
    fn settle(&mut self, digest: &Digest, chunk: ChunkRef) {
        let was_http = self.http_in_flight.remove(digest);
        let was_mqtt = self.mqtt_in_flight.remove(digest).is_some();
        if was_http || was_mqtt {
            self.in_flight_bytes -= u64::from(chunk.zsize);
        }
    }

    /// `source` could not give `digest` (unreachable, error status, bad bytes): the chunk
    /// moves on to the next source.
    pub fn http_failed(&mut self, digest: &Digest, source: usize) -> SourceHealth {
        let mut health = SourceHealth::Usable;
        if source < self.http_sources {
            let was_up = self.source_up(source);
            self.failures[source] += 1;
            if was_up && !self.source_up(source) {
                health = SourceHealth::GaveUp;
            }
        }
        let Some(want) = self.chunks.get_mut(digest) else {
            return health;
        };
        let chunk = want.chunk;
        if want.source == source {
            want.source = source + 1;
        }
        let next = want.source;
        self.settle(digest, chunk);
        if next < self.http_sources {
            self.http_queue.push_front(*digest);
        } else {
            self.mqtt_queue.push_front(*digest);
        }
        health
    }

    /// MQTT bytes for `digest` did not verify: ask again.
    pub fn mqtt_rejected(&mut self, digest: &Digest) {
        if let Some(chunk) = self.get(digest) {
            self.settle(digest, chunk);
            self.mqtt_queue.push_front(*digest);
        }
    }

    /// Puts MQTT requests older than `after` back at the front of the queue; returns how many.
    pub fn retry_mqtt_older_than(&mut self, after: Duration, now: Instant) -> usize {
        let stale: Vec<Digest> = self
            .mqtt_in_flight
            .iter()
            .filter(|(_, asked)| now.saturating_duration_since(**asked) >= after)
            .map(|(d, _)| *d)
            .collect();
        for digest in &stale {
            if let Some(chunk) = self.get(digest) {
                self.settle(digest, chunk);
                self.mqtt_queue.push_front(*digest);
            }
        }
        stale.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, zsize: u32) -> ChunkRef {
        ChunkRef {
            digest: Digest::from_bytes([n; 32]),
            size: zsize,
            zsize,
        }
    }

    fn d(n: u8) -> Digest {
        Digest::from_bytes([n; 32])
    }

    #[test]
    fn the_window_bounds_outstanding_bytes_and_retries_go_first() {
        let t0 = Instant::now();
        let mut w = Wanted::new((0..10).map(|n| chunk(n, 100)).collect(), 0);
        assert_eq!(w.next_mqtt_batch(350, t0).len(), 3);
        assert!(w.next_mqtt_batch(350, t0).is_empty(), "window full");
        w.arrived(&d(0));
        assert_eq!(w.next_mqtt_batch(350, t0)[0].digest, d(3));
        let later = t0 + Duration::from_secs(2);
        assert_eq!(w.retry_mqtt_older_than(Duration::from_secs(2), later), 3);
        assert_eq!(w.in_flight_bytes(), 0);
        let again = w.next_mqtt_batch(1000, later);
        assert_eq!(again.len(), 9);
        assert!(again[..3].iter().any(|c| c.digest == d(1)));
    }

    #[test]
    fn a_chunk_larger_than_the_window_is_still_requested_alone() {
        let t0 = Instant::now();
        let mut w = Wanted::new(vec![chunk(1, 500), chunk(2, 10)], 0);
        assert_eq!(w.next_mqtt_batch(100, t0).len(), 1);
        assert!(w.next_mqtt_batch(100, t0).is_empty());
    }

    #[test]
    fn a_failed_chunk_moves_to_the_next_source_and_mqtt_comes_last() {
        let mut w = Wanted::new(vec![chunk(1, 10)], 2);
        assert_eq!(w.next_http(1000), Some((chunk(1, 10), 0)));
        assert_eq!(w.http_failed(&d(1), 0), SourceHealth::Usable);
        assert_eq!(w.next_http(1000), Some((chunk(1, 10), 1)));
        w.http_failed(&d(1), 1);
        assert_eq!(w.next_http(1000), None);
        let batch = w.next_mqtt_batch(1000, Instant::now());
        assert_eq!(batch, vec![chunk(1, 10)]);
        w.arrived(&d(1));
        assert!(w.is_done());
        assert_eq!(w.in_flight_bytes(), 0);
    }

    #[test]
    fn a_source_failing_repeatedly_is_skipped_for_every_chunk() {
        let mut w = Wanted::new((0..6).map(|n| chunk(n, 10)).collect(), 2);
        let first: Vec<_> = (0..GIVE_UP_AFTER)
            .map(|_| w.next_http(1000).expect("a chunk for source 0"))
            .collect();
        for (i, (c, source)) in first.iter().enumerate() {
            assert_eq!(*source, 0);
            let last = i + 1 == GIVE_UP_AFTER as usize;
            assert_eq!(
                w.http_failed(&c.digest, *source) == SourceHealth::GaveUp,
                last
            );
        }
        // Every chunk, including the untried ones, now goes to source 1 first.
        let mut seen = Vec::new();
        while let Some((c, source)) = w.next_http(1000) {
            assert_eq!(source, 1, "{c:?}");
            seen.push(c.digest);
            w.http_arrived(&c.digest, source);
        }
        assert_eq!(seen.len(), 6);
        assert!(w.is_done());
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut w = Wanted::new((0..4).map(|n| chunk(n, 10)).collect(), 1);
        for _ in 0..2 {
            let (c, s) = w.next_http(1000).expect("chunk");
            w.http_failed(&c.digest, s);
        }
        let (c, s) = w.next_http(1000).expect("chunk");
        w.http_arrived(&c.digest, s);
        let (c, s) = w.next_http(1000).expect("chunk");
        assert_eq!(w.http_failed(&c.digest, s), SourceHealth::Usable);
    }

    #[test]
    fn a_node_asks_after_listening_for_a_span_when_nothing_passes_by() {
        let t0 = Instant::now();
        let mut f = Follow::default();
        assert!(!f.may_ask(t0), "the first call starts the listening");
        assert!(!f.may_ask(t0 + FOLLOW_SPAN / 2));
        assert!(f.may_ask(t0 + FOLLOW_SPAN));
    }

    #[test]
    fn a_node_follows_while_wanted_frames_pass_by_fast_and_asks_once_they_stop() {
        let t0 = Instant::now();
        let mut f = Follow::default();
        assert!(!f.may_ask(t0));
        let step = Duration::from_millis(50);
        let mut now = t0;
        // 64 KiB every 50 ms: 384 KiB per span, above the minimum.
        for _ in 0..20 {
            now += step;
            f.passed_by(now, 64 * 1024);
            assert!(!f.may_ask(now));
        }
        assert!(!f.may_ask(now + step));
        assert!(f.may_ask(now + FOLLOW_SPAN), "the frames stopped");
    }

    #[test]
    fn a_slow_trickle_does_not_hold_a_node_back() {
        let t0 = Instant::now();
        let mut f = Follow::default();
        assert!(!f.may_ask(t0));
        let mut now = t0 + FOLLOW_SPAN;
        for _ in 0..10 {
            now += Duration::from_millis(100);
            f.passed_by(now, 32 * 1024);
            assert!(f.may_ask(now), "96 KiB per span is below the minimum");
        }
    }

    #[test]
    fn a_chunk_that_arrives_over_mqtt_while_on_http_is_done_once() {
        let mut w = Wanted::new(vec![chunk(1, 10), chunk(2, 10)], 1);
        let (c, _) = w.next_http(1000).expect("chunk");
        w.arrived(&c.digest);
        // The HTTP result comes back later: not wanted any more.
        assert_eq!(w.get(&c.digest), None);
        w.http_failed(&c.digest, 0);
        assert_eq!(w.in_flight_bytes(), 0);
    }
}
