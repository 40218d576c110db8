//! The coordinator's one event loop: everything that talks MQTT goes through here.
//!
//! It owns the inventory updates (node state, presence, events), the MQTT outbox (retained
//! commands, subscriptions, chunk frames) and the chunk fan-out. HTTP handlers do not publish
//! themselves: they write the desired command to sled, flush, and send an [`ApiRequest`].
//!
//! Invariants:
//! - The loop never awaits the MQTT client: it hands requests to rumqttc with `try_*` and
//!   keeps what does not fit in its own bounded outbox, retried when rumqttc makes room.
//! - A command is read from sled's `desired` tree when it is sent, never held in memory, so
//!   whatever is sent for a node is its newest desired command. Every ConnAck re-subscribes
//!   and re-sends every desired command retained, so a restarted broker gets them back.
//! - Memory is bounded: queued chunk requests, chunk reads in flight and frames waiting for
//!   rumqttc each have a cap; past it a request is dropped (the agent asks again).
//! - A chunk is queued at most once however many nodes ask for it: from the request that
//!   queues it until its frame is handed to rumqttc it is pending, for
//!   `ChunkRequest::FANOUT_WINDOW` after that it counts as just sent, and a node that was
//!   receiving the shared topic when it went out is not sent it again ([`FanoutDedup`]).
//!   Frames are numbered as they are handed to rumqttc, so the numbers follow publish order.
//! - Chunk files are read and framed on the blocking pool, up to `MAX_READS` at a time and
//!   while fewer than `MAX_FRAMES` frames are read or waiting, also while rumqttc is full,
//!   so frames are ready the moment it makes room.
//!
//! - Metric batches go to the ingester task (`metrics::ingest`) with `try_send`; the loop
//!   publishes only the acks it hands back, which it made durable first.
//!
//! Every chunk request, fan-out decision and frame handed to rumqttc is counted in [`Stats`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;

use images::StoreError;
use protocol::messages::{
    ChunkFrame, ChunkRequest, Event as NodeEvent, EventKind, NodeState, Presence,
};
use protocol::{ChunkRef, Digest, NodeId, NodeTopic, ReleaseId, Topics, PROTOCOL_VERSION};
use rumqttc::{ClientError, QoS, Request, SubscribeFilter};
use tokio::sync::mpsc;
use tokio::task::{self, JoinError, JoinSet};
use tokio::time::Instant;

use crate::db::{Db, NodeRecord};
use crate::fanout::{Admission, FanoutDedup};
use crate::metrics::ingest::Acks;
use crate::metrics::{IngestLink, PendingAcks};
use crate::mqtt::{Link, LinkEvent};
use crate::release;
use crate::rollout::NodeObserver;
use crate::stats::{DigestOutcome, Stats};
use crate::unix_now;

/// Chunk digests waiting to be read and sent.
const MAX_WANTED: usize = 8192;
/// Chunk file reads in flight.
const MAX_READS: usize = 4;
/// Chunk frames read or being read but not yet handed to rumqttc (each up to ~260 KiB).
const MAX_FRAMES: usize = 16;
/// Releases whose chunk index is kept in memory.
const MAX_CACHED_MANIFESTS: usize = 16;

/// What HTTP handlers ask of the loop.
#[derive(Debug)]
pub enum ApiRequest {
    /// Send these nodes' desired commands (already stored and flushed), retained.
    PublishCommands(Vec<NodeId>),
}

/// A finished read of one chunk file, framed for the wire on the blocking pool.
struct ChunkRead {
    release: ReleaseId,
    chunk: ChunkRef,
    outcome: ReadOutcome,
}

/// What a chunk read produced.
enum ReadOutcome {
    /// The encoded [`ChunkFrame`].
    Frame(Vec<u8>),
    /// The stored file is not the size the release lists.
    WrongSize(usize),
    Missing,
    Failed(StoreError),
}

/// A chunk frame waiting for room in rumqttc.
struct PendingFrame {
    release: ReleaseId,
    digest: Digest,
    payload: Vec<u8>,
}

/// Everything the loop reacts to.
enum Event {
    Link(Option<LinkEvent>),
    Api(ApiRequest),
    ChunkRead(Result<(task::Id, ChunkRead), JoinError>),
    /// Metric acks the ingester made durable.
    MetricAcks(Acks),
    Room,
    Shutdown,
}

pub struct MainLoop {
    db: Db,
    chunks: images::ChunkStore,
    topics: Topics,
    client: rumqttc::AsyncClient,
    connected: bool,
    /// Subscriptions must be (re)sent: set on every ConnAck.
    need_subscribe: bool,
    /// Nodes whose desired command is to be sent, in order, each at most once.
    commands: VecDeque<NodeId>,
    queued_commands: HashSet<NodeId>,
    /// Chunks admitted by the fan-out dedup, waiting to be read.
    wanted: VecDeque<(ReleaseId, ChunkRef)>,
    reads: JoinSet<ChunkRead>,
    /// The chunk each read task is for, so a task that fails still releases its chunk.
    reading: HashMap<task::Id, (ReleaseId, Digest)>,
    /// Encoded frames waiting for room in rumqttc, in order.
    frames: VecDeque<PendingFrame>,
    /// rumqttc's request channel was full: wait for it to make room.
    stalled: bool,
    dedup: FanoutDedup,
    manifests: HashMap<ReleaseId, Arc<HashMap<Digest, ChunkRef>>>,
    stats: Arc<Stats>,
    /// Where metric batches go, and durable acks come from.
    ingest: IngestLink,
    /// Durable metric acks waiting for room in rumqttc, the newest per node.
    metric_acks: PendingAcks,
    /// Told of every inventory change (the rollout driver's mailbox; never blocks).
    observer: Option<NodeObserver>,
}

impl MainLoop {
    pub fn new(
        db: Db,
        chunks: images::ChunkStore,
        topics: Topics,
        client: rumqttc::AsyncClient,
        stats: Arc<Stats>,
        ingest: IngestLink,
    ) -> MainLoop {
        MainLoop {
            db,
            chunks,
            topics,
            client,
            connected: false,
            need_subscribe: false,
            commands: VecDeque::new(),
            queued_commands: HashSet::new(),
            wanted: VecDeque::new(),
            reads: JoinSet::new(),
            reading: HashMap::new(),
            frames: VecDeque::new(),
            stalled: false,
            dedup: FanoutDedup::new(
                ChunkRequest::FANOUT_WINDOW,
                ChunkRequest::SEQUENCE_MEMORY,
                first_frame_seq(),
            ),
            manifests: HashMap::new(),
            stats,
            ingest,
            metric_acks: PendingAcks::default(),
            observer: None,
        }
    }

    /// Hands every inventory change (state, presence, event) to `observer` as well.
    pub fn observe_nodes(mut self, observer: NodeObserver) -> MainLoop {
        self.observer = Some(observer);
        self
    }

    /// Runs until `shutdown` completes or the MQTT link task dies (an error).
    pub async fn run(
        mut self,
        link: &mut Link,
        mut api: mpsc::Receiver<ApiRequest>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        loop {
            let event = tokio::select! {
                // Connects, disconnects and messages from nodes, via the link task.
                event = link.events.recv() => Event::Link(event),
                // HTTP handlers asking for commands to be sent.
                Some(request) = api.recv() => Event::Api(request),
                // A chunk file read finished; its frame can be queued.
                Some(read) = self.reads.join_next_with_id(), if !self.reads.is_empty() => Event::ChunkRead(read),
                // Metric batches were flushed; their acks can go out.
                acks = self.ingest.durable_acks() => Event::MetricAcks(acks),
                // rumqttc sent something, so there is room for what did not fit before.
                () = link.room.notified(), if self.stalled => Event::Room,
                // Ctrl-C or SIGTERM.
                () = &mut shutdown => Event::Shutdown,
            };
            match event {
                Event::Link(None) => anyhow::bail!("the MQTT connection task stopped unexpectedly"),
                Event::Link(Some(LinkEvent::Connected)) => self.on_connected(),
                Event::Link(Some(LinkEvent::Disconnected)) => self.connected = false,
                Event::Link(Some(LinkEvent::Message(publish))) => {
                    self.on_message(&publish.topic, &publish.payload, !publish.retain)
                }
                Event::Api(ApiRequest::PublishCommands(nodes)) => {
                    for node in nodes {
                        self.queue_command(node);
                    }
                }
                Event::ChunkRead(read) => self.on_chunk_read(read),
                Event::MetricAcks(acks) => self.metric_acks.add(acks),
                Event::Room => {}
                Event::Shutdown => return Ok(()),
            }
            self.pump();
        }
    }

    fn on_connected(&mut self) {
        self.connected = true;
        self.need_subscribe = true;
        match self.db.desired_nodes() {
            Ok(nodes) => {
                tracing::info!(commands = nodes.len(), "republishing retained commands");
                for node in nodes {
                    self.queue_command(node);
                }
            }
            Err(error) => tracing::error!(%error, "cannot list desired commands to republish"),
        }
    }

    fn queue_command(&mut self, node: NodeId) {
        if self.queued_commands.insert(node.clone()) {
            self.commands.push_back(node);
        }
    }

    /// Hands queued work to rumqttc while it has room (when connected), then starts chunk
    /// reads while the frame buffer has room.
    fn pump(&mut self) {
        self.stalled = false;
        // Nothing goes to rumqttc while disconnected: it would be discarded at the next
        // ConnAck (clean session). The outbox waits instead.
        if self.connected {
            self.send();
        }
        self.start_reads();
    }

    /// Hands queued work to rumqttc in priority order: subscriptions, commands, metric acks,
    /// chunk frames.
    /// Stops at the first request that does not fit and sets `stalled`.
    fn send(&mut self) {
        if self.need_subscribe {
            let filters = [
                NodeTopic::State,
                NodeTopic::Presence,
                NodeTopic::Events,
                NodeTopic::ChunkRequests,
                NodeTopic::Metrics,
            ]
            .map(|which| SubscribeFilter::new(self.topics.all_nodes(which), QoS::AtLeastOnce));
            if self.client.try_subscribe_many(filters).is_err() {
                self.stalled = true;
                return;
            }
            self.need_subscribe = false;
        }
        while let Some(node) = self.commands.front().cloned() {
            let envelope = match self.db.desired(&node) {
                Ok(Some(envelope)) => envelope,
                Ok(None) => {
                    self.commands.pop_front();
                    self.queued_commands.remove(&node);
                    continue;
                }
                Err(error) => {
                    tracing::error!(node = %node, %error, "cannot read the node's desired command");
                    self.commands.pop_front();
                    self.queued_commands.remove(&node);
                    continue;
                }
            };
            let topic = self.topics.node(&node, NodeTopic::Command);
            if self
                .client
                .try_publish(topic, QoS::AtLeastOnce, true, envelope)
                .is_err()
            {
                self.stalled = true;
                return;
            }
            tracing::debug!(node = %node, "command handed to MQTT");
            self.commands.pop_front();
            self.queued_commands.remove(&node);
        }
        while let Some((node, up_to, payload)) = self.metric_acks.pop() {
            let topic = self.topics.node(&node, NodeTopic::MetricsAck);
            if self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
                .is_err()
            {
                self.metric_acks.put_back(node, up_to);
                self.stalled = true;
                return;
            }
        }
        let now = Instant::now();
        while let Some(PendingFrame {
            release,
            digest,
            mut payload,
        }) = self.frames.pop_front()
        {
            let bytes = payload.len();
            ChunkFrame::number(&mut payload, self.dedup.next_seq());
            let topic = self.topics.chunks(&release);
            match self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
            {
                Ok(()) => {
                    self.dedup.published(&release, digest, now);
                    self.stats.frame_published(bytes);
                }
                Err(ClientError::TryRequest(Request::Publish(publish)))
                | Err(ClientError::Request(Request::Publish(publish))) => {
                    // rumqttc hands the request back: keep it first in line, uncopied.
                    self.frames.push_front(PendingFrame {
                        release,
                        digest,
                        payload: Vec::from(publish.payload),
                    });
                    self.stalled = true;
                    return;
                }
                Err(error) => {
                    // Only when the link task is gone, which also ends the loop.
                    tracing::error!(%error, "cannot hand a chunk frame to the MQTT client");
                    self.dedup.abandoned(&release, digest);
                    self.stalled = true;
                    return;
                }
            }
        }
    }

    /// Starts reading (and framing) queued chunks on the blocking pool, within the caps.
    fn start_reads(&mut self) {
        while self.reads.len() < MAX_READS && self.frames.len() + self.reads.len() < MAX_FRAMES {
            let Some((release, chunk)) = self.wanted.pop_front() else {
                break;
            };
            let store = self.chunks.clone();
            let key = (release.clone(), chunk.digest);
            let task = self.reads.spawn_blocking(move || {
                let outcome = match store.get(&chunk.digest) {
                    Ok(Some(compressed)) if compressed.len() == chunk.zsize as usize => {
                        ReadOutcome::Frame(ChunkFrame::encode(&chunk.digest, &compressed))
                    }
                    Ok(Some(compressed)) => ReadOutcome::WrongSize(compressed.len()),
                    Ok(None) => ReadOutcome::Missing,
                    Err(error) => ReadOutcome::Failed(error),
                };
                ChunkRead {
                    release,
                    chunk,
                    outcome,
                }
            });
            self.reading.insert(task.id(), key);
        }
    }

    /// A message on a node topic. `live` is false for a retained message replayed by the
    /// broker, which says nothing about when the node was last heard from.
    fn on_message(&mut self, topic: &str, payload: &[u8], live: bool) {
        let Some((node, which)) = self.topics.parse_node_topic(topic) else {
            tracing::debug!(topic, "ignoring a message on an unexpected topic");
            return;
        };
        if payload.is_empty() {
            // A cleared retained message.
            return;
        }
        match which {
            NodeTopic::State => self.on_state(node, payload, live),
            NodeTopic::Presence => self.on_presence(node, payload, live),
            NodeTopic::Events => self.on_event(node, payload, live),
            NodeTopic::ChunkRequests => self.on_chunk_request(node, payload),
            NodeTopic::Metrics => self.ingest.offer(node, payload),
            NodeTopic::Command | NodeTopic::MetricsAck => {}
        }
    }

    /// Reads, changes and writes back one node's record. Inventory writes are not flushed:
    /// agents re-send their state (retained) and sled flushes on its own within a second.
    fn update_node(&self, node: &NodeId, change: impl FnOnce(&mut NodeRecord)) {
        let mut record = match self.db.node(node) {
            Ok(record) => record.unwrap_or_default(),
            Err(error) => {
                tracing::warn!(node = %node, %error, "replacing an unreadable inventory record");
                NodeRecord::default()
            }
        };
        change(&mut record);
        if let Err(error) = self.db.put_node(node, &record) {
            tracing::error!(node = %node, %error, "cannot store the node's inventory record");
        }
        if let Some(observer) = &self.observer {
            observer.observe(node, &record);
        }
    }

    fn on_state(&mut self, node: NodeId, payload: &[u8], live: bool) {
        let state: NodeState = match serde_json::from_slice(payload) {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(node = %node, %error, "ignoring a malformed state report");
                return;
            }
        };
        if state.node != node {
            tracing::warn!(node = %node, named = %state.node, "ignoring a state report that names another node");
            return;
        }
        if state.protocol > PROTOCOL_VERSION {
            tracing::warn!(node = %node, protocol = state.protocol, "ignoring a state report from a newer protocol; upgrade the coordinator");
            return;
        }
        let now = unix_now();
        self.update_node(&node, |record| {
            let before = record
                .state
                .as_ref()
                .and_then(|s| s.current.as_ref())
                .map(|c| c.release.clone());
            let after = state.current.as_ref().map(|c| c.release.clone());
            if before != after {
                match &after {
                    Some(release) => {
                        tracing::info!(node = %node, release = %release, "node runs a new version")
                    }
                    None => tracing::info!(node = %node, "node reports no current version"),
                }
            }
            record.last_seen = if live {
                Some(now)
            } else {
                record.last_seen.or(Some(state.reported_at))
            };
            record.state = Some(state);
        });
    }

    fn on_presence(&mut self, node: NodeId, payload: &[u8], live: bool) {
        let presence: Presence = match serde_json::from_slice(payload) {
            Ok(presence) => presence,
            Err(error) => {
                tracing::warn!(node = %node, %error, "ignoring a malformed presence message");
                return;
            }
        };
        let now = unix_now();
        self.update_node(&node, |record| {
            if record.online != Some(presence.online) {
                tracing::info!(node = %node, online = presence.online, "node presence changed");
            }
            record.online = Some(presence.online);
            if live && presence.online {
                record.last_seen = Some(now);
            }
        });
    }

    fn on_event(&mut self, node: NodeId, payload: &[u8], live: bool) {
        let event: NodeEvent = match serde_json::from_slice(payload) {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(node = %node, %error, "ignoring a malformed event");
                return;
            }
        };
        if event.node != node {
            tracing::warn!(node = %node, named = %event.node, "ignoring an event that names another node");
            return;
        }
        log_event(&event);
        let now = unix_now();
        self.update_node(&node, |record| {
            if live {
                record.last_seen = Some(now);
            }
            record.last_event = Some(event);
        });
    }

    fn on_chunk_request(&mut self, node: NodeId, payload: &[u8]) {
        let request: ChunkRequest = match serde_json::from_slice(payload) {
            Ok(request) => request,
            Err(error) => {
                self.stats.chunk_request(true);
                tracing::warn!(node = %node, %error, "ignoring a malformed chunk request");
                return;
            }
        };
        let release = request.release;
        if request.digests.len() > ChunkRequest::MAX_DIGESTS {
            self.stats.chunk_request(true);
            tracing::warn!(
                node = %node, release = %release, digests = request.digests.len(),
                limit = ChunkRequest::MAX_DIGESTS, "refusing an oversized chunk request"
            );
            return;
        }
        let Some(index) = self.chunk_index(&release) else {
            self.stats.chunk_request(true);
            tracing::warn!(node = %node, release = %release, "chunk request for a release that was never published");
            return;
        };
        self.stats.chunk_request(false);
        let now = Instant::now();
        let (mut queued, mut deduped, mut unknown, mut dropped) = (0usize, 0usize, 0usize, 0usize);
        for digest in request.digests {
            let Some(chunk) = index.get(&digest) else {
                unknown += 1;
                continue;
            };
            match self
                .dedup
                .admit(&release, digest, now, request.receiving_from)
            {
                Admission::Pending | Admission::OnTheWay | Admission::RecentlySent => deduped += 1,
                Admission::Queue if self.wanted.len() >= MAX_WANTED => {
                    self.dedup.abandoned(&release, digest);
                    dropped += 1;
                }
                Admission::Queue => {
                    self.wanted.push_back((release.clone(), *chunk));
                    queued += 1;
                }
            }
        }
        for (outcome, count) in [
            (DigestOutcome::Queued, queued),
            (DigestOutcome::Deduped, deduped),
            (DigestOutcome::Unknown, unknown),
            (DigestOutcome::Dropped, dropped),
        ] {
            self.stats.digests(outcome, count);
        }
        if unknown > 0 {
            tracing::warn!(node = %node, release = %release, unknown, "chunk request names digests the release does not list; dropped them");
        }
        if dropped > 0 {
            tracing::warn!(node = %node, release = %release, dropped, "chunk send queue is full; the agent will ask again");
        }
        tracing::debug!(node = %node, release = %release, queued, deduped, "chunk request");
    }

    /// The chunks a release lists, loaded from sled once and cached.
    fn chunk_index(&mut self, release: &ReleaseId) -> Option<Arc<HashMap<Digest, ChunkRef>>> {
        if let Some(index) = self.manifests.get(release) {
            return Some(index.clone());
        }
        let envelope = match self.db.release_envelope(release) {
            Ok(Some(envelope)) => envelope,
            Ok(None) => return None,
            Err(error) => {
                tracing::error!(release = %release, %error, "cannot read the release");
                return None;
            }
        };
        let manifest = match release::stored_manifest(&envelope) {
            Ok((_, manifest)) => manifest,
            Err(error) => {
                tracing::error!(release = %release, %error, "stored release is unreadable");
                return None;
            }
        };
        if self.manifests.len() >= MAX_CACHED_MANIFESTS {
            self.manifests.clear();
        }
        let index = Arc::new(release::chunk_index(&manifest));
        self.manifests.insert(release.clone(), index.clone());
        Some(index)
    }

    fn on_chunk_read(&mut self, read: Result<(task::Id, ChunkRead), JoinError>) {
        let read = match read {
            Ok((id, read)) => {
                self.reading.remove(&id);
                read
            }
            Err(error) => {
                tracing::error!(%error, "a chunk read task failed");
                if let Some((release, digest)) = self.reading.remove(&error.id()) {
                    self.dedup.abandoned(&release, digest);
                }
                return;
            }
        };
        let ChunkRead {
            release,
            chunk,
            outcome,
        } = read;
        let digest = chunk.digest;
        match outcome {
            ReadOutcome::Frame(payload) => {
                self.frames.push_back(PendingFrame {
                    release,
                    digest,
                    payload,
                });
                return;
            }
            ReadOutcome::WrongSize(size) => tracing::error!(
                release = %release, digest = %digest, size, expected = chunk.zsize,
                "stored chunk has the wrong size; not sending it (the chunk store may be damaged)"
            ),
            ReadOutcome::Missing => tracing::error!(
                release = %release, digest = %digest,
                "a published release's chunk is missing from the chunk store"
            ),
            ReadOutcome::Failed(error) => {
                tracing::error!(release = %release, digest = %digest, %error, "cannot read a chunk")
            }
        }
        self.dedup.abandoned(&release, digest);
    }
}

/// The first frame's sequence number: the time in microseconds, so a restarted coordinator
/// numbers on from above its predecessor's frames (a claim about those it cannot check; a
/// lower number would only make it send a chunk again).
fn first_frame_seq() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |since| since.as_micros() as u64)
}

/// One log line per node event, with its fields.
fn log_event(event: &NodeEvent) {
    let node = &event.node;
    match &event.kind {
        EventKind::Rejected { what, reason } => {
            tracing::warn!(node = %node, what, reason, "node rejected a message")
        }
        EventKind::StagingStarted { release } => {
            tracing::info!(node = %node, release = %release, "node started staging")
        }
        EventKind::ChunkRejected {
            release,
            digest,
            reason,
        } => {
            tracing::warn!(node = %node, release = %release, digest = %digest, reason, "node rejected a chunk")
        }
        EventKind::Switched { release, from } => match from {
            Some(from) => {
                tracing::info!(node = %node, release = %release, from = %from, "node switched")
            }
            None => tracing::info!(node = %node, release = %release, "node switched"),
        },
        EventKind::UpdateFailed { release, reason } => {
            tracing::warn!(node = %node, release = %release, reason, "node update failed")
        }
        EventKind::RolledBack {
            release,
            from,
            reason,
        } => match from {
            Some(from) => {
                tracing::warn!(node = %node, release = %release, from = %from, reason, "node rolled back")
            }
            None => tracing::warn!(node = %node, release = %release, reason, "node rolled back"),
        },
    }
}
