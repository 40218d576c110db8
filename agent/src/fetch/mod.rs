//! Staging a release: check the disk has room, fetch the chunks the node lacks, verify each,
//! then assemble the slot from fetched and local chunks (unchanged files are hard-linked from
//! the installed slots).
//!
//! Sources are tried per chunk in the order the deploy lists them: its HTTP(S) sources
//! (mirrors, then the coordinator), then MQTT. Over MQTT, requests go out on the node's own
//! chunk-request topic and the coordinator answers on the release's shared chunk topic, where
//! every node fetching that release over MQTT listens, so one frame serves all of them
//! (frames other nodes asked for are taken too, if wanted, and while they keep coming the
//! node asks for nothing itself: [`wanted::Follow`]). Each request says from which frame
//! number on the node has been receiving the topic, so the coordinator does not send again
//! a frame still queued for a slow node in the broker. A node subscribes to that topic
//! only once it first needs MQTT: in a fleet-wide rollout most nodes fetch over HTTP, and a
//! subscriber is sent every frame, which the broker buffers per connection. Bad bytes from
//! any source are rejected, counted, and the chunk is fetched from the next source.
//!
//! **Invariants**: a chunk enters the fetch store only after `images` verified its digest
//! and size, so a transfer interrupted anywhere (link, broker, SIGKILL) resumes from the
//! store and never fetches a verified chunk twice. At most a window of bytes is outstanding
//! and a few chunks are being verified, so memory stays bounded whatever the image size;
//! frames beyond that wait in the broker connection (the daemon forwards them with
//! backpressure, never dropping one). Nothing here touches the active slot.

pub(crate) mod http;
mod wanted;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use images::assemble::{self, AssembleError, ChunkSource, LocalChunks};
use images::chunk::ChunkError;
use images::store::{ChunkStore, StoreError};
use protocol::messages::{ChunkFrame, ChunkRequest, StagingProgress};
use protocol::{human_bytes, ChunkRef, Digest, Manifest, ReleaseId, PROTOCOL_VERSION};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

pub use http::client as http_client;
use wanted::{Follow, SourceHealth, Wanted};

/// Most compressed bytes requested and not yet received, over both transports.
const WINDOW_BYTES: u64 = 4 * 1024 * 1024;
/// HTTP requests in flight at once (across sources).
const HTTP_PARALLEL: usize = 4;
/// MQTT frames being verified and stored at once; more wait in the broker connection.
const VERIFY_PARALLEL: usize = 2;
/// Longest wait before asking again for MQTT chunks that did not come.
const RETRY_MAX: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Assemblies retried after a stored chunk turned out corrupt (it is removed and fetched
/// again); beyond this the disk itself is suspect.
const ASSEMBLY_ATTEMPTS: usize = 3;

pub struct StageJob {
    pub release: ReleaseId,
    pub manifest: Arc<Manifest>,
    pub slot_dir: PathBuf,
    pub store: Arc<ChunkStore>,
    pub local: Arc<LocalChunks>,
    /// Bytes per second; `None` is unlimited.
    pub max_rate: Option<u64>,
    /// Base URLs tried in order before MQTT; empty for MQTT only.
    pub http_sources: Vec<String>,
    pub http: reqwest::Client,
}

/// What the staging task receives from the daemon's broker connection.
#[derive(Debug)]
pub enum Inbound {
    /// A frame from the release's shared chunk topic.
    Frame(bytes::Bytes),
    /// The broker connection came back: outstanding requests were probably lost.
    Reconnected,
}

/// The MQTT side of a staging task: where requests go and where frames come from.
pub struct FetchLink {
    pub client: AsyncClient,
    pub request_topic: String,
    /// The release's shared chunk topic; the daemon forwards what arrives there as
    /// [`Inbound::Frame`]s.
    pub chunk_topic: String,
    pub inbound: mpsc::Receiver<Inbound>,
    pub notes: mpsc::Sender<FetchNote>,
}

/// The subscription to the release's chunk topic, taken when MQTT is first needed and
/// dropped with the fetch however it ends (done, failed, or aborted by a newer command).
struct ChunkSubscription {
    client: AsyncClient,
    topic: String,
    active: bool,
}

impl ChunkSubscription {
    fn new(link: &FetchLink) -> ChunkSubscription {
        ChunkSubscription {
            client: link.client.clone(),
            topic: link.chunk_topic.clone(),
            active: false,
        }
    }

    /// Subscribes if not yet done; false if the request could not be queued (offline or
    /// backed up), in which case nothing should be asked for over MQTT yet.
    fn ensure(&mut self) -> bool {
        if !self.active {
            self.active = self
                .client
                .try_subscribe(&self.topic, QoS::AtMostOnce)
                .is_ok();
        }
        self.active
    }

    /// After a reconnect the broker may have lost the session: subscribe again if needed.
    fn renew(&mut self) {
        if self.active {
            self.active = false;
            self.ensure();
        }
    }
}

impl Drop for ChunkSubscription {
    fn drop(&mut self) {
        if self.active {
            let _ = self.client.try_unsubscribe(&self.topic);
        }
    }
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
    pub bytes_fetched_http: u64,
    /// Bytes taken from installed slots: copied chunks and hard-linked files.
    pub bytes_reused: u64,
    pub chunks_fetched: u64,
    pub chunks_rejected: u64,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(
        "not enough disk space to stage {release} under {dir}: it needs {needed}, {free} is \
         free; free at least {short} there and deploy again",
        needed = human_bytes(*.needed), free = human_bytes(*.free),
        short = human_bytes(.needed.saturating_sub(*.free))
    )]
    NoSpace {
        release: ReleaseId,
        dir: PathBuf,
        needed: u64,
        free: u64,
    },
    #[error(
        "disk full while staging {release} under {dir} ({detail}); the partial slot and fetched \
         chunks are removed and the current version is untouched: free space and deploy again"
    )]
    DiskFull {
        release: ReleaseId,
        dir: PathBuf,
        detail: String,
    },
    #[error("cannot check free space under {dir}: {source}")]
    SpaceCheck {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("storing a fetched chunk failed: {0}")]
    Store(StoreError),
    #[error("assembling the slot failed: {0}")]
    Assemble(AssembleError),
    #[error("the staging worker stopped unexpectedly: {0}")]
    Worker(#[from] tokio::task::JoinError),
}

impl StageJob {
    fn data_dir(&self) -> PathBuf {
        self.store
            .dir()
            .parent()
            .unwrap_or(self.store.dir())
            .to_owned()
    }

    fn disk_full(&self, detail: impl ToString) -> StageError {
        StageError::DiskFull {
            release: self.release.clone(),
            dir: self.data_dir(),
            detail: detail.to_string(),
        }
    }

    fn store_error(&self, error: StoreError) -> StageError {
        if error.is_storage_full() {
            self.disk_full(error)
        } else {
            StageError::Store(error)
        }
    }

    fn assemble_error(&self, error: AssembleError) -> StageError {
        if error.is_storage_full() {
            self.disk_full(error)
        } else {
            StageError::Assemble(error)
        }
    }

    fn missing(&self) -> Vec<ChunkRef> {
        assemble::missing_chunks(&self.manifest, |d| {
            self.store.contains(d) || self.local.contains(d)
        })
    }

    /// Refuses to start when the fetched chunks and the new slot cannot both fit.
    fn check_space(&self, missing: &[ChunkRef]) -> Result<(), StageError> {
        let fetch: u64 = missing.iter().map(|c| u64::from(c.zsize)).sum();
        let needed = fetch + assemble::slot_bytes_needed(&self.manifest, &self.local);
        let dir = self.data_dir();
        let free =
            images::disk::available_space(&dir).map_err(|source| StageError::SpaceCheck {
                dir: dir.clone(),
                source,
            })?;
        if needed > free {
            return Err(StageError::NoSpace {
                release: self.release.clone(),
                dir,
                needed,
                free,
            });
        }
        Ok(())
    }
}

/// Fetches what is missing, then assembles the slot. Cancel-safe: dropping the future
/// leaves only verified chunks in the store and at most a partial slot directory, which the
/// next assembly removes.
pub async fn stage(job: StageJob, mut link: FetchLink) -> Result<StageReport, StageError> {
    let started = Instant::now();
    let mut report = StageReport::default();
    job.check_space(&job.missing())?;
    for attempt in 1..=ASSEMBLY_ATTEMPTS {
        fetch_missing(&job, &mut link, &mut report, started).await?;
        let (manifest, slot_dir, store, local) = (
            job.manifest.clone(),
            job.slot_dir.clone(),
            job.store.clone(),
            job.local.clone(),
        );
        let mut assembly = tokio::task::spawn_blocking(move || {
            let sources: [&dyn ChunkSource; 2] = [&*store, &*local];
            assemble::assemble(&manifest, &slot_dir, &sources)
        });
        // Keep taking frames while assembling so the daemon never waits on a full queue.
        let assembled = loop {
            tokio::select! {
                result = &mut assembly => break result?,
                Some(_) = link.inbound.recv() => {}
            }
        };
        match assembled {
            Ok(stats) => {
                report.bytes_reused =
                    stats.bytes_from.get(1).copied().unwrap_or(0) + stats.bytes_linked;
                report.elapsed = started.elapsed();
                return Ok(report);
            }
            Err(AssembleError::CorruptStoredChunk { digest, .. })
                if attempt < ASSEMBLY_ATTEMPTS =>
            {
                tracing::warn!(%digest, attempt, "a fetched chunk went bad on disk; fetching it again");
            }
            Err(error) => return Err(job.assemble_error(error)),
        }
    }
    unreachable!("the last attempt returns")
}

/// Result of one HTTP fetch task: the chunk, the source index, and what came of it.
struct HttpFetched {
    chunk: ChunkRef,
    source: usize,
    outcome: Result<u64, HttpFailure>,
}

enum HttpFailure {
    /// No proper answer, or a body too large to be any chunk.
    Transport(http::HttpError),
    /// An answer that is not the chunk.
    BadBytes(ChunkError),
    /// The chunk verified but could not be stored: a local problem, fatal to the staging.
    Store(StoreError),
    Worker(tokio::task::JoinError),
}

async fn fetch_http(
    client: reqwest::Client,
    base: String,
    chunk: ChunkRef,
    source: usize,
    store: Arc<ChunkStore>,
) -> HttpFetched {
    let outcome = match http::get_chunk(&client, &base, &chunk).await {
        Err(error) => Err(HttpFailure::Transport(error)),
        Ok(body) => {
            let zsize = body.len() as u64;
            match tokio::task::spawn_blocking(move || store.put_verified(&chunk, &body)).await {
                Ok(Ok(())) => Ok(zsize),
                Ok(Err(StoreError::Chunk(error))) => Err(HttpFailure::BadBytes(error)),
                Ok(Err(error)) => Err(HttpFailure::Store(error)),
                Err(join) => Err(HttpFailure::Worker(join)),
            }
        }
    };
    HttpFetched {
        chunk,
        source,
        outcome,
    }
}

/// Counts a verified chunk into the report and the progress.
fn tally(report: &mut StageReport, have: &mut (u64, u64), chunk: &ChunkRef) {
    report.chunks_fetched += 1;
    *have = (have.0 + 1, have.1 + u64::from(chunk.size));
}

/// Fetches every chunk neither the store nor the installed slots hold.
async fn fetch_missing(
    job: &StageJob,
    link: &mut FetchLink,
    report: &mut StageReport,
    started: Instant,
) -> Result<(), StageError> {
    let missing = job.missing();
    let chunks_total = job.manifest.chunks().count() as u64;
    let bytes_total = job.manifest.total_size();
    let missing_bytes: u64 = missing.iter().map(|c| u64::from(c.size)).sum();
    let mut have = (
        chunks_total - missing.len() as u64,
        bytes_total.saturating_sub(missing_bytes),
    );
    let mut wanted = Wanted::new(missing, job.http_sources.len());
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

    let mut http_tasks: JoinSet<HttpFetched> = JoinSet::new();
    let mut verifying: JoinSet<(ChunkRef, Result<u64, StoreError>)> = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut retry_after = ChunkRequest::RETRY_FIRST;
    let mut last_arrival = Instant::now();
    let mut last_note = Instant::now();
    let mut requested_bytes: u64 = 0;
    let mut subscription = ChunkSubscription::new(link);
    let mut follow = Follow::default();
    // The first frame number seen since subscribing (`ChunkRequest::receiving_from`);
    // forgotten when a frame may have been lost, learnt again from the next one.
    let mut receiving_from: Option<u64> = None;

    while !wanted.is_done() {
        // Ask for more while the window (and the rate limit, if any) allows.
        let allowed = match job.max_rate {
            Some(rate) => (started.elapsed().as_secs_f64() * rate as f64) as u64 + window,
            None => u64::MAX,
        };
        while http_tasks.len() < HTTP_PARALLEL && requested_bytes < allowed {
            let budget = window.min(allowed - requested_bytes + wanted.in_flight_bytes());
            let Some((chunk, source)) = wanted.next_http(budget) else {
                break;
            };
            requested_bytes += u64::from(chunk.zsize);
            http_tasks.spawn(fetch_http(
                job.http.clone(),
                job.http_sources[source].clone(),
                chunk,
                source,
                job.store.clone(),
            ));
        }
        if requested_bytes < allowed
            && wanted.wants_mqtt()
            && subscription.ensure()
            && follow.may_ask(Instant::now())
        {
            let budget = window.min(allowed - requested_bytes + wanted.in_flight_bytes());
            let batch = wanted.next_mqtt_batch(budget, Instant::now());
            if !batch.is_empty() {
                requested_bytes += batch.iter().map(|c| u64::from(c.zsize)).sum::<u64>();
                let request = ChunkRequest {
                    protocol: PROTOCOL_VERSION,
                    release: job.release.clone(),
                    digests: batch.iter().map(|c| c.digest).collect(),
                    receiving_from,
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
            // An HTTP fetch finished, verified and stored, or failed.
            Some(done) = http_tasks.join_next(), if !http_tasks.is_empty() => {
                let HttpFetched { chunk, source, outcome } = done?;
                match outcome {
                    Ok(zsize) => {
                        if wanted.get(&chunk.digest).is_some() {
                            wanted.http_arrived(&chunk.digest, source);
                            report.bytes_fetched_http += zsize;
                            tally(report, &mut have, &chunk);
                            last_arrival = Instant::now();
                            retry_after = ChunkRequest::RETRY_FIRST;
                        }
                    }
                    Err(HttpFailure::Store(error)) => return Err(job.store_error(error)),
                    Err(HttpFailure::Worker(join)) => return Err(StageError::Worker(join)),
                    Err(failure) => {
                        let base = &job.http_sources[source];
                        let (reason, bad_bytes) = match &failure {
                            HttpFailure::Transport(e) => (e.to_string(), e.is_bad_bytes()),
                            HttpFailure::BadBytes(e) => (format!("{base}: {e}"), true),
                            HttpFailure::Store(_) | HttpFailure::Worker(_) => unreachable!("handled above"),
                        };
                        if bad_bytes {
                            report.chunks_rejected += 1;
                            tracing::warn!(digest = %chunk.digest, %reason, "rejected a chunk; trying the next source");
                            let _ = link.notes.try_send(FetchNote::Rejected { digest: chunk.digest, reason: reason.clone() });
                        } else {
                            tracing::debug!(digest = %chunk.digest, %reason, "source failed a chunk; trying the next source");
                        }
                        if wanted.http_failed(&chunk.digest, source) == SourceHealth::GaveUp {
                            tracing::warn!(source = %base, %reason, "chunk source keeps failing; skipping it for this release");
                        }
                    }
                }
            }
            // A frame from the shared topic finished verifying.
            Some(done) = verifying.join_next(), if !verifying.is_empty() => {
                let (chunk, result) = done?;
                match result {
                    Ok(zsize) => {
                        if wanted.get(&chunk.digest).is_some() {
                            wanted.arrived(&chunk.digest);
                            report.bytes_fetched_mqtt += zsize;
                            tally(report, &mut have, &chunk);
                            last_arrival = Instant::now();
                            retry_after = ChunkRequest::RETRY_FIRST;
                        }
                    }
                    Err(StoreError::Chunk(error)) => {
                        report.chunks_rejected += 1;
                        tracing::warn!(digest = %chunk.digest, %error, "rejected a chunk; will fetch it again");
                        let _ = link.notes.try_send(FetchNote::Rejected { digest: chunk.digest, reason: error.to_string() });
                        wanted.mqtt_rejected(&chunk.digest);
                    }
                    Err(error) => return Err(job.store_error(error)),
                }
            }
            // Broker traffic, taken only while there is room to verify it.
            Some(inbound) = link.inbound.recv(), if verifying.len() < VERIFY_PARALLEL => match inbound {
                Inbound::Frame(bytes) => {
                    let Ok(frame) = ChunkFrame::decode(&bytes) else {
                        report.chunks_rejected += 1;
                        continue;
                    };
                    receiving_from.get_or_insert(frame.seq);
                    // Not ours, already here, or already being verified.
                    let Some(chunk) = wanted.get(&frame.digest) else { continue };
                    if !wanted.asked_over_mqtt(&frame.digest) {
                        follow.passed_by(Instant::now(), frame.compressed.len() as u64);
                    }
                    let store = job.store.clone();
                    verifying.spawn_blocking(move || {
                        let frame = ChunkFrame::decode(&bytes).expect("decoded above");
                        let zsize = frame.compressed.len() as u64;
                        (chunk, store.put_verified(&chunk, frame.compressed).map(|()| zsize))
                    });
                }
                Inbound::Reconnected => {
                    receiving_from = None;
                    subscription.renew();
                    let before = wanted.in_flight_bytes();
                    let asked = wanted.retry_mqtt_older_than(Duration::ZERO, Instant::now());
                    requested_bytes = requested_bytes.saturating_sub(before - wanted.in_flight_bytes());
                    if asked > 0 {
                        tracing::info!(outstanding = asked, "broker reconnected; asking again");
                    }
                    retry_after = ChunkRequest::RETRY_FIRST;
                }
            },
            // Timers: progress reports, and asking again for what did not come.
            // MQTT requests unanswered for `retry_after` are sent again once no frame has come
            // for as long (while frames flow, a slow fan-out to many nodes is still
            // delivering, and asking again would make the coordinator send it all twice).
            // While nothing at all arrives, the wait doubles so an outage is not met with a
            // request storm.
            _ = tick.tick() => {
                let now = Instant::now();
                let quiet = now.saturating_duration_since(last_arrival);
                if quiet >= retry_after {
                    let before = wanted.in_flight_bytes();
                    let asked = wanted.retry_mqtt_older_than(retry_after, now);
                    if asked > 0 {
                        // A frame it was sure to get never came: claim nothing in this retry.
                        receiving_from = None;
                        requested_bytes = requested_bytes.saturating_sub(before - wanted.in_flight_bytes());
                        tracing::info!(outstanding = asked, after_s = retry_after.as_secs(), "chunks did not arrive; asking again");
                        retry_after = (retry_after * 2).min(RETRY_MAX);
                    }
                }
            }
        }
        if last_note.elapsed() >= PROGRESS_EVERY {
            last_note = Instant::now();
            let _ = link.notes.try_send(FetchNote::Progress(progress(have)));
        }
    }
    let _ = link.notes.try_send(FetchNote::Progress(progress(have)));
    Ok(())
}
