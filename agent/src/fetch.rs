//! Staging a release: fetch the chunks the node lacks over MQTT, verify each, then assemble
//! the slot from fetched and local chunks.
//!
//! Requests go out on the node's own chunk-request topic; the coordinator answers on the
//! release's shared chunk topic, where every node staging that release listens, so one frame
//! serves all of them (frames for chunks other nodes asked for are taken too, if wanted).
//!
//! **Invariants**: a chunk enters the fetch store only after `images` verified its digest
//! and size, so a transfer interrupted anywhere (link, broker, SIGKILL) resumes from the
//! store and never fetches a verified chunk twice. At most a window of requests is
//! outstanding, so memory stays bounded whatever the image size. Nothing here touches the
//! active slot.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use images::assemble::{self, ChunkSource, LocalChunks};
use images::store::ChunkStore;
use protocol::messages::{ChunkFrame, ChunkRequest, StagingProgress};
use protocol::{ChunkRef, Digest, Manifest, ReleaseId, PROTOCOL_VERSION};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

/// Most compressed bytes requested and not yet received.
const WINDOW_BYTES: u64 = 4 * 1024 * 1024;
/// First wait before asking again for chunks that did not come; doubles while nothing
/// arrives, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(3);
const RETRY_MAX: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

pub struct StageJob {
    pub release: ReleaseId,
    pub manifest: Arc<Manifest>,
    pub slot_dir: PathBuf,
    pub store: Arc<ChunkStore>,
    pub local: Arc<LocalChunks>,
    /// Bytes per second; `None` is unlimited.
    pub max_rate: Option<u64>,
}

/// The MQTT side of a staging task: where requests go and where frames come from.
pub struct FetchLink {
    pub client: AsyncClient,
    pub request_topic: String,
    pub frames: mpsc::Receiver<bytes::Bytes>,
    pub notes: mpsc::Sender<FetchNote>,
}

/// What the staging task tells the daemon while it runs.
#[derive(Debug)]
pub enum FetchNote {
    Progress(StagingProgress),
    Rejected { digest: Digest, reason: String },
}

#[derive(Debug, Default, Clone)]
pub struct StageReport {
    pub bytes_fetched_mqtt: u64,
    pub bytes_reused: u64,
    pub chunks_fetched: u64,
    pub chunks_rejected: u64,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("assembling the slot failed: {0}")]
    Assemble(#[from] assemble::AssembleError),
    #[error("the staging worker stopped unexpectedly: {0}")]
    Worker(#[from] tokio::task::JoinError),
}

/// Which chunks are wanted and which of those are requested and not yet here.
struct Wanted {
    chunks: HashMap<Digest, ChunkRef>,
    queue: VecDeque<Digest>,
    in_flight: HashMap<Digest, u64>,
    in_flight_bytes: u64,
}

impl Wanted {
    fn new(missing: Vec<ChunkRef>) -> Wanted {
        Wanted {
            queue: missing.iter().map(|c| c.digest).collect(),
            chunks: missing.into_iter().map(|c| (c.digest, c)).collect(),
            in_flight: HashMap::new(),
            in_flight_bytes: 0,
        }
    }

    /// Takes up to `budget` compressed bytes of chunks to request (at least one if any).
    fn next_batch(&mut self, budget: u64) -> Vec<Digest> {
        let mut batch = Vec::new();
        while let Some(digest) = self.queue.front().copied() {
            let Some(chunk) = self.chunks.get(&digest) else {
                self.queue.pop_front();
                continue;
            };
            let size = u64::from(chunk.zsize);
            let fits = self.in_flight_bytes + size <= budget
                || self.in_flight.is_empty() && batch.is_empty();
            if !fits || batch.len() == ChunkRequest::MAX_DIGESTS {
                break;
            }
            self.queue.pop_front();
            if self.in_flight.insert(digest, size).is_none() {
                self.in_flight_bytes += size;
            }
            batch.push(digest);
        }
        batch
    }

    fn arrived(&mut self, digest: &Digest) {
        self.chunks.remove(digest);
        if let Some(size) = self.in_flight.remove(digest) {
            self.in_flight_bytes -= size;
        }
    }

    /// Puts every outstanding request back at the front of the queue, to be asked again.
    fn retry_in_flight(&mut self) {
        for digest in self.in_flight.keys() {
            self.queue.push_front(*digest);
        }
        self.in_flight.clear();
        self.in_flight_bytes = 0;
    }
}

/// Fetches what is missing, then assembles the slot. Cancel-safe: dropping the future
/// leaves only verified chunks in the store and at most a partial slot directory, which the
/// next assembly removes.
pub async fn stage(job: StageJob, mut link: FetchLink) -> Result<StageReport, StageError> {
    let started = Instant::now();
    let mut report = StageReport::default();
    let (store, local) = (job.store.clone(), job.local.clone());
    let missing =
        assemble::missing_chunks(&job.manifest, |d| store.contains(d) || local.contains(d));
    let chunks_total = job.manifest.chunks().count() as u64;
    let bytes_total = job.manifest.total_size();
    let missing_bytes: u64 = missing.iter().map(|c| u64::from(c.size)).sum();
    let mut have = (
        chunks_total - missing.len() as u64,
        bytes_total.saturating_sub(missing_bytes),
    );
    let mut wanted = Wanted::new(missing);
    let window = match job.max_rate {
        // A window of half a second of the allowed rate keeps bursts small.
        Some(rate) => (rate / 2).clamp(
            protocol::format::MAX_COMPRESSED_CHUNK_SIZE as u64,
            WINDOW_BYTES,
        ),
        None => WINDOW_BYTES,
    };
    let progress = |have: (u64, u64)| StagingProgress {
        release: job.release.clone(),
        chunks_total,
        chunks_have: have.0,
        bytes_total,
        bytes_have: have.1,
    };
    let _ = link.notes.try_send(FetchNote::Progress(progress(have)));

    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut retry_after = RETRY_FIRST;
    let mut last_arrival = Instant::now();
    let mut last_note = Instant::now();
    let mut requested_bytes: u64 = 0;

    while !wanted.chunks.is_empty() {
        // Ask for more while the window (and the rate limit, if any) allows.
        let allowed = match job.max_rate {
            Some(rate) => (started.elapsed().as_secs_f64() * rate as f64) as u64 + window,
            None => u64::MAX,
        };
        if requested_bytes < allowed {
            let budget = window.min(allowed - requested_bytes + wanted.in_flight_bytes);
            let batch = wanted.next_batch(budget);
            if !batch.is_empty() {
                requested_bytes += batch
                    .iter()
                    .filter_map(|d| wanted.chunks.get(d))
                    .map(|c| u64::from(c.zsize))
                    .sum::<u64>();
                let request = ChunkRequest {
                    protocol: PROTOCOL_VERSION,
                    release: job.release.clone(),
                    digests: batch,
                };
                let payload = serde_json::to_vec(&request).expect("requests always serialize");
                // Offline or backed up: the retry timer asks again later.
                if link
                    .client
                    .try_publish(&link.request_topic, QoS::AtMostOnce, false, payload)
                    .is_err()
                {
                    tracing::debug!("chunk request not queued; will retry");
                }
            }
        }

        tokio::select! {
            // A chunk frame from the release's shared topic.
            Some(bytes) = link.frames.recv() => {
                let Ok(frame) = ChunkFrame::decode(&bytes) else {
                    report.chunks_rejected += 1;
                    continue;
                };
                let Some(chunk) = wanted.chunks.get(&frame.digest).copied() else {
                    continue; // not ours, or already here
                };
                let store = job.store.clone();
                let verified = tokio::task::spawn_blocking(move || {
                    let frame = ChunkFrame::decode(&bytes).expect("decoded above");
                    store.put_verified(&chunk, frame.compressed).map(|()| frame.compressed.len() as u64)
                })
                .await?;
                match verified {
                    Ok(zsize) => {
                        wanted.arrived(&chunk.digest);
                        report.chunks_fetched += 1;
                        report.bytes_fetched_mqtt += zsize;
                        have = (have.0 + 1, have.1 + u64::from(chunk.size));
                        last_arrival = Instant::now();
                        retry_after = RETRY_FIRST;
                    }
                    Err(e) => {
                        report.chunks_rejected += 1;
                        tracing::warn!(digest = %chunk.digest, error = %e, "rejected a chunk; will fetch it again");
                        let _ = link.notes.try_send(FetchNote::Rejected { digest: chunk.digest, reason: e.to_string() });
                    }
                }
            }
            // Timers: progress reports, and asking again for what did not come.
            _ = tick.tick() => {
                if last_arrival.elapsed() >= retry_after && !wanted.in_flight.is_empty() {
                    tracing::info!(outstanding = wanted.in_flight.len(), after_s = retry_after.as_secs(), "chunks did not arrive; asking again");
                    requested_bytes = requested_bytes.saturating_sub(wanted.in_flight_bytes);
                    wanted.retry_in_flight();
                    last_arrival = Instant::now();
                    retry_after = (retry_after * 2).min(RETRY_MAX);
                }
            }
        }
        if last_note.elapsed() >= PROGRESS_EVERY {
            last_note = Instant::now();
            let _ = link.notes.try_send(FetchNote::Progress(progress(have)));
        }
    }
    let _ = link.notes.try_send(FetchNote::Progress(progress(have)));

    let (manifest, slot_dir, store, local) = (
        job.manifest.clone(),
        job.slot_dir.clone(),
        job.store.clone(),
        job.local.clone(),
    );
    let stats = tokio::task::spawn_blocking(move || {
        let sources: [&dyn ChunkSource; 2] = [&*store, &*local];
        assemble::assemble(&manifest, &slot_dir, &sources)
    })
    .await??;
    report.bytes_reused = stats.bytes_from.get(1).copied().unwrap_or(0);
    report.elapsed = started.elapsed();
    Ok(report)
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

    #[test]
    fn the_window_bounds_outstanding_bytes_and_retries_go_first() {
        let mut w = Wanted::new((0..10).map(|n| chunk(n, 100)).collect());
        assert_eq!(w.next_batch(350).len(), 3);
        assert_eq!(w.next_batch(350).len(), 0, "window full");
        w.arrived(&Digest::from_bytes([0; 32]));
        assert_eq!(w.next_batch(350), vec![Digest::from_bytes([3; 32])]);
        w.retry_in_flight();
        assert_eq!(w.in_flight_bytes, 0);
        let again = w.next_batch(1000);
        assert_eq!(again.len(), 9);
        assert!(again[..3].contains(&Digest::from_bytes([1; 32])));
    }

    #[test]
    fn a_chunk_larger_than_the_window_is_still_requested_alone() {
        let mut w = Wanted::new(vec![chunk(1, 500), chunk(2, 10)]);
        assert_eq!(w.next_batch(100).len(), 1);
        assert_eq!(w.next_batch(100).len(), 0);
    }
}
