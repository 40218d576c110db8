//! The agent's run loop: one `select!` over broker events, staging-task notes, the staging
//! task's completion and shutdown. It owns the node state and is the only writer of the
//! journal, the slots and the reports.
//!
//! Save points, in order (each flushed before the step it guards is acted on):
//! 1. a verified deploy or stage is accepted: seq consumed, manifest stored, target =
//!    Staging (held for a stage);
//! 2. the slot is assembled and renamed into place, with what staging cost: target =
//!    Switching, or Staged for a held target, which stops here (reported as `staged`)
//!    until a deploy of the same manifest moves it to Switching, saved before the switch;
//! 3. the active pointer names the new slot: current/previous rotated, target cleared.
//!
//! Staging does not wait for the disk: from point 2 the slot's durability barrier
//! ([`images::make_durable`]) runs in the background, and the switch waits for it before
//! traffic moves, so no slot becomes current before it is on disk.
//!
//! Then old slots are collected (a held slot is kept; fetched chunks go once no slot is
//! being assembled). A crash between any two points is resumed by [`Daemon::recover`]:
//! Staging restarts the fetch from the verified chunks on disk, Staged stays held (staged
//! again if its slot has gone), Switching re-points (idempotent) and completes. A Staged or
//! Switching slot is verified again first: a power loss may have cut its writeback short.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often probation probes and grace periods are looked at.
const TICK: Duration = Duration::from_millis(100);
/// How often the state is published again when nothing changed. A state report can be lost
/// with nothing to tell: the client's queue was full when it changed, or a broker dropped
/// it from a subscriber's queue (Mosquitto's `max_queued_messages`, the embedded broker's
/// bounded queues) while a thousand nodes reported at once. The coordinator waits on these reports
/// (a node staged, switched, failed), so a lost one must not stall a rollout for good.
const STATE_REFRESH: Duration = Duration::from_secs(30);

use anyhow::Context as _;
use images::assemble::LocalChunks;
use images::store::ChunkStore;
use protocol::messages::{
    self, Event, EventKind, Outcome, SlotReport, StagingProgress, UpdateReport,
};
use protocol::{Manifest, NodeId, NodeTopic, Topics, TrustedKeys, UnixSeconds};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::fault;
use crate::fetch::{self, FetchLink, FetchNote, Inbound, StageJob, StageReport};
use crate::journal::{write_atomic, Journal};
use crate::link::{self, LinkEvent};
use crate::node::{self, DeployPlan, Installed, NodeState, Phase, Refusal, StagingCost};
use crate::serving::{Serving, Verdict};
use crate::slots::Slots;
use crate::telemetry::{self, Telemetry};

/// Validated settings for `agent run`.
pub struct Config {
    pub data_dir: PathBuf,
    pub node: NodeId,
    pub broker: protocol::BrokerAddr,
    pub trust: TrustedKeys,
    pub labels: BTreeMap<String, String>,
    pub topics: Topics,
    pub max_fetch_rate: Option<u64>,
    /// Whether to use the HTTP(S) chunk sources a deploy lists (MQTT is always the last).
    pub use_http: bool,
    pub telemetry: telemetry::Settings,
}

/// The figures of a finished staging, as journaled with its target.
fn staging_cost(report: &StageReport) -> StagingCost {
    StagingCost {
        bytes_fetched_mqtt: report.bytes_fetched_mqtt,
        bytes_fetched_http: report.bytes_fetched_http,
        bytes_reused: report.bytes_reused,
        chunks_fetched: report.chunks_fetched,
        chunks_rejected: report.chunks_rejected,
        staging_ms: report.elapsed.as_millis() as u64,
    }
}

pub fn now() -> UnixSeconds {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A staging task under way and how to reach it.
struct Staging {
    target: Installed,
    chunk_topic: String,
    inbound: mpsc::Sender<Inbound>,
    task: JoinHandle<Result<StageReport, fetch::StageError>>,
    progress: Option<StagingProgress>,
    rejected: u64,
}

pub struct Daemon {
    config: Config,
    journal: Journal,
    slots: Slots,
    store: Arc<ChunkStore>,
    state: NodeState,
    client: AsyncClient,
    staging: Option<Staging>,
    notes_tx: mpsc::Sender<FetchNote>,
    http: reqwest::Client,
    serving: Serving,
    telemetry: Telemetry,
    durability: Option<Durability>,
}

/// The durability barrier of the slot staged last, running since save point 2 so the disk
/// writes the slot back while the node waits for its switch.
struct Durability {
    slot: String,
    task: tokio::task::JoinHandle<Result<(), images::AssembleError>>,
}

/// Everything the run loop reacts to.
enum Wake {
    Link(LinkEvent),
    Note(FetchNote),
    Staged(Result<Result<StageReport, fetch::StageError>, tokio::task::JoinError>),
    /// Time to probe a version on probation or retire a warm one.
    Tick,
    /// Time to publish the state again (see [`STATE_REFRESH`]).
    Refresh,
    Shutdown,
}

pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let journal = Journal::open(&config.data_dir)?;
    let state = journal.load()?;
    let slots = Slots::open(&config.data_dir)
        .with_context(|| format!("cannot create slots under {}", config.data_dir.display()))?;
    let store = Arc::new(
        ChunkStore::open_cache(config.data_dir.join("fetch")).with_context(|| {
            format!(
                "cannot open the fetch store under {}",
                config.data_dir.display()
            )
        })?,
    );
    let options = link::options(&config.node, &config.broker, &config.topics);
    let (client, eventloop) = link::connect(options);
    let (link_tx, mut link_rx) = mpsc::channel(64);
    let link_task = tokio::spawn(link::drive(eventloop, link_tx));
    let (notes_tx, mut notes_rx) = mpsc::channel(64);
    let http = fetch::http_client().context("cannot set up the HTTP client")?;
    let serving = Serving::new(&config.data_dir).await;
    let telemetry =
        Telemetry::start(&config, client.clone(), &journal).context("cannot start telemetry")?;

    let mut daemon = Daemon {
        config,
        journal,
        slots,
        store,
        state,
        client,
        staging: None,
        notes_tx,
        http,
        serving,
        telemetry,
        durability: None,
    };
    daemon.recover().await?;
    tracing::info!(node = %daemon.config.node, current = ?daemon.state.current.as_ref().map(|c| c.release.to_string()), "agent started");

    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh =
        tokio::time::interval_at(tokio::time::Instant::now() + STATE_REFRESH, STATE_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wake = tokio::select! {
            // Broker traffic: (re)connections and losses, commands, chunk frames, metric acks.
            Some(event) = link_rx.recv() => Wake::Link(event),
            // Progress and rejected chunks from the staging task.
            Some(note) = notes_rx.recv() => Wake::Note(note),
            // The staging task finished (or failed, or panicked).
            result = async { (&mut daemon.staging.as_mut().expect("guarded").task).await }, if daemon.staging.is_some() => Wake::Staged(result),
            // Probation probes and the end of a grace period.
            _ = tick.tick(), if daemon.serving.needs_tick() => Wake::Tick,
            _ = refresh.tick() => Wake::Refresh,
            // SIGTERM / ctrl-c: nothing is mid-flip here, since flips complete within one branch.
            () = &mut shutdown => Wake::Shutdown,
        };
        match wake {
            Wake::Link(LinkEvent::Connected) => daemon.on_connected(),
            Wake::Link(LinkEvent::Disconnected) => daemon.telemetry.link_down(),
            Wake::Link(LinkEvent::Message { topic, payload }) => {
                match daemon.staging.as_ref().filter(|s| s.chunk_topic == topic) {
                    // Awaited, not dropped when full: the staging task takes frames as fast
                    // as it verifies them and the wait flows back to the broker connection.
                    // It never waits on this loop, and a finished task fails the send at once.
                    Some(staging) => {
                        let inbound = staging.inbound.clone();
                        let _ = inbound.send(Inbound::Frame(payload)).await;
                    }
                    None => daemon.on_message(&topic, payload).await?,
                }
            }
            Wake::Note(note) => daemon.on_note(note),
            Wake::Staged(result) => daemon.on_staged(result).await?,
            Wake::Tick => daemon.on_tick().await?,
            Wake::Refresh => daemon.publish_state(daemon.state_json()),
            Wake::Shutdown => break,
        }
    }
    tracing::info!("shutting down");
    daemon.telemetry.stop().await;
    if let Some(staging) = daemon.staging.take() {
        staging.task.abort();
    }
    daemon.serving.stop_all().await;
    let presence = serde_json::to_vec(&messages::Presence { online: false }).expect("serializes");
    let presence_topic = daemon
        .config
        .topics
        .node(&daemon.config.node, NodeTopic::Presence);
    let _ = daemon
        .client
        .publish(presence_topic, QoS::AtLeastOnce, true, presence)
        .await;
    let _ = daemon.client.disconnect().await;
    // Give the event loop a moment to send the goodbye; it is best effort (the will covers it).
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), link_task).await;
    Ok(())
}

impl Daemon {
    /// Brings the node to a consistent state after a start or a crash; see the module doc.
    async fn recover(&mut self) -> anyhow::Result<()> {
        if let Some(target) = self.state.target.clone() {
            match target.phase {
                Phase::Switching if !self.slot_intact(&target.installed).await? => {
                    tracing::warn!(release = %target.installed.release, slot = %target.installed.slot, "the slot of an interrupted switch is damaged or gone; staging it again");
                    self.restage().await?;
                }
                Phase::Switching => {
                    tracing::info!(release = %target.installed.release, "completing an interrupted switch");
                    self.switch(Instant::now()).await?;
                }
                Phase::Staged => self.keep_held(target).await?,
                Phase::Staging => {
                    tracing::info!(release = %target.installed.release, "resuming an interrupted staging");
                    self.start_staging(target).await?;
                }
            }
        }
        // The pointer is the truth of what serves; make it agree with the journal.
        if let Some(current) = &self.state.current {
            if self.slots.active().as_deref() != Some(current.slot.as_str()) {
                tracing::warn!(slot = %current.slot, "active pointer disagreed with the journal; re-pointing");
                self.slots.activate(&current.slot)?;
            }
        }
        self.serve_current().await?;
        self.collect_garbage();
        self.report();
        Ok(())
    }

    fn on_connected(&mut self) {
        let me = &self.config.node;
        // Commands and metrics acks. The session may not have survived (a broker restart):
        // subscribe every time.
        let inbox = self.config.topics.node_inbox(me);
        let _ = self.client.try_subscribe(inbox, QoS::AtLeastOnce);
        self.telemetry.link_up();
        if let Some(staging) = &self.staging {
            // The task subscribes to its chunk topic again if it uses MQTT. If the queue is
            // full, frames are flowing and the task is not waiting anyway.
            let _ = staging.inbound.try_send(Inbound::Reconnected);
        }
        let presence =
            serde_json::to_vec(&messages::Presence { online: true }).expect("serializes");
        let _ = self.client.try_publish(
            self.config.topics.node(me, NodeTopic::Presence),
            QoS::AtLeastOnce,
            true,
            presence,
        );
        self.report();
    }

    async fn on_message(&mut self, topic: &str, payload: bytes::Bytes) -> anyhow::Result<()> {
        match self.config.topics.parse_node_topic(topic) {
            Some((node, NodeTopic::Command)) if node == self.config.node => {
                self.on_command(&payload).await
            }
            Some((node, NodeTopic::MetricsAck)) if node == self.config.node => {
                self.telemetry.on_ack(&payload);
                Ok(())
            }
            _ => {
                tracing::debug!(topic, "ignoring a message on an unexpected topic");
                Ok(())
            }
        }
    }

    async fn on_command(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        // A switch to a held slot is timed from here: the operator's view of its speed.
        let received = Instant::now();
        let now = now();
        let command = match node::open_command(
            payload,
            &self.config.trust,
            &self.config.node,
            self.state.last_seq,
            now,
        ) {
            Ok(command) => command,
            // The broker hands back the retained command we already acted on at every
            // reconnect: that is not an attack, so say nothing.
            Err(Refusal::Replay { seq, last_seq }) if seq == last_seq => return Ok(()),
            Err(refusal) => {
                self.reject("command", &refusal);
                return Ok(());
            }
        };
        let Some(envelope) = node::deploy_manifest(&command) else {
            tracing::info!(
                seq = command.seq,
                action = command.action.name(),
                "command accepted"
            );
            let reason = "asked by the operator".to_owned();
            return self.roll_back(Some(command.seq), reason, Vec::new()).await;
        };
        let (manifest, digest) = match node::open_manifest(envelope, &self.config.trust) {
            Ok(opened) => opened,
            Err(refusal) => {
                self.reject("manifest", &refusal);
                return Ok(());
            }
        };
        let release = manifest.release_id();
        tracing::info!(seq = command.seq, %release, action = command.action.name(), "command accepted");
        self.journal.put_manifest(&digest, envelope)?;
        // Save point 1.
        let sources = if self.config.use_http {
            node::deploy_http_sources(&command)
        } else {
            Vec::new()
        };
        let plan = match &command.action {
            messages::Action::Stage { .. } => {
                self.state
                    .accept_stage(command.seq, release, digest, sources, now)
            }
            _ => self
                .state
                .accept_deploy(command.seq, release, digest, sources, now),
        };
        self.journal.save(&self.state)?;
        fault::point("accepted");
        match plan {
            DeployPlan::AlreadyCurrent => {
                self.cancel_staging();
                // A held slot it replaced is garbage now.
                self.collect_garbage();
                self.report();
            }
            DeployPlan::Stage(target) => {
                self.cancel_staging();
                // A held slot it replaced is garbage now, and its room may be needed. The
                // fetch store stays: the new target is being assembled.
                self.collect_garbage();
                self.start_staging(*target).await?;
            }
            // The staging under way goes on (held or not, as the command said).
            DeployPlan::Continue => self.report(),
            DeployPlan::Switch => self.switch_to_held(received).await?,
        }
        Ok(())
    }

    fn reject(&self, what: &str, refusal: &Refusal) {
        tracing::warn!(what, reason = %refusal, "refused a message; keeping the current version");
        self.event(EventKind::Rejected {
            what: what.to_owned(),
            reason: refusal.to_string(),
        });
    }

    fn cancel_staging(&mut self) {
        if let Some(staging) = self.staging.take() {
            tracing::info!(release = %staging.target.release, "staging superseded");
            // Dropping the task drops its chunk-topic subscription.
            staging.task.abort();
        }
    }

    fn manifest_of(&self, installed: &Installed) -> anyhow::Result<Manifest> {
        let envelope = self
            .journal
            .manifest(&installed.manifest_digest)?
            .with_context(|| format!("the journal lost the manifest of {}", installed.release))?;
        let (manifest, _) = node::open_manifest(&envelope, &self.config.trust).map_err(|e| {
            anyhow::anyhow!(
                "stored manifest of {} no longer verifies: {e}",
                installed.release
            )
        })?;
        Ok(manifest)
    }

    /// Starts fetching and assembling `target`'s slot, reusing chunks from the installed slots.
    async fn start_staging(&mut self, target: node::Target) -> anyhow::Result<()> {
        let node::Target {
            installed: target,
            http_sources,
            ..
        } = target;
        let manifest = Arc::new(self.manifest_of(&target)?);
        let slot_dir = self.slots.dir(&target.slot);
        // A crash after the slot was renamed into place but before save point 2. What that
        // staging cost died with it.
        if slot_dir.exists() {
            match images::assemble::verify_slot(&manifest, &slot_dir) {
                Ok(()) => return self.slot_complete(StagingCost::default()).await,
                Err(e) => {
                    tracing::warn!(slot = %target.slot, error = %e, "found an unverifiable slot; staging it again");
                    self.slots
                        .collect_garbage(self.state.live_slots().filter(|s| *s != target.slot))?;
                }
            }
        }
        let mut installed = Vec::new();
        for slot in [&self.state.current, &self.state.previous]
            .into_iter()
            .flatten()
        {
            match self.manifest_of(slot) {
                Ok(m) => installed.push((self.slots.dir(&slot.slot), m)),
                Err(e) => {
                    tracing::warn!(slot = %slot.slot, error = %e, "not reusing chunks from this slot")
                }
            }
        }
        let refs: Vec<(PathBuf, &Manifest)> =
            installed.iter().map(|(p, m)| (p.clone(), m)).collect();
        let local = Arc::new(LocalChunks::index(&refs));

        let chunk_topic = self.config.topics.chunks(&target.release);
        // Small: the staging task verifies as frames come and the rest wait in the broker
        // connection, so this only smooths bursts.
        let (inbound_tx, inbound_rx) = mpsc::channel(16);
        let job = StageJob {
            release: target.release.clone(),
            manifest,
            slot_dir,
            store: self.store.clone(),
            local,
            max_rate: self.config.max_fetch_rate,
            http_sources,
            http: self.http.clone(),
        };
        let link = FetchLink {
            client: self.client.clone(),
            request_topic: self
                .config
                .topics
                .node(&self.config.node, NodeTopic::ChunkRequests),
            chunk_topic: chunk_topic.clone(),
            inbound: inbound_rx,
            notes: self.notes_tx.clone(),
        };
        tracing::info!(release = %target.release, slot = %target.slot, "staging");
        self.event(EventKind::StagingStarted {
            release: target.release.clone(),
        });
        self.staging = Some(Staging {
            target,
            chunk_topic,
            inbound: inbound_tx,
            task: tokio::spawn(fetch::stage(job, link)),
            progress: None,
            rejected: 0,
        });
        self.report();
        Ok(())
    }

    fn on_note(&mut self, note: FetchNote) {
        let Some(staging) = &mut self.staging else {
            return;
        };
        match note {
            FetchNote::Progress(progress) => {
                if progress.release == staging.target.release {
                    staging.progress = Some(progress);
                    self.report();
                }
            }
            FetchNote::Rejected { digest, reason } => {
                staging.rejected += 1;
                let release = staging.target.release.clone();
                self.event(EventKind::ChunkRejected {
                    release,
                    digest,
                    reason,
                });
            }
        }
    }

    async fn on_staged(
        &mut self,
        result: Result<Result<StageReport, fetch::StageError>, tokio::task::JoinError>,
    ) -> anyhow::Result<()> {
        let Some(staging) = self.staging.take() else {
            return Ok(());
        };
        match result {
            Ok(Ok(report)) => {
                tracing::info!(
                    release = %staging.target.release,
                    fetched_mqtt = report.bytes_fetched_mqtt,
                    fetched_http = report.bytes_fetched_http,
                    reused = report.bytes_reused,
                    ms = report.elapsed.as_millis() as u64,
                    "staged"
                );
                self.slot_complete(staging_cost(&report)).await
            }
            Ok(Err(error)) => {
                let reason = error.to_string();
                self.fail(&staging.target, reason, staging.rejected, Vec::new())
            }
            Err(join) if join.is_cancelled() => Ok(()),
            Err(join) => self.fail(
                &staging.target,
                format!("staging task crashed: {join}"),
                staging.rejected,
                Vec::new(),
            ),
        }
    }

    /// Save point 2: the target's slot is complete and cost `cost`. A held target stops
    /// here, reported as staged (its fetched chunks are no longer needed); any other is
    /// switched to at once.
    async fn slot_complete(&mut self, cost: StagingCost) -> anyhow::Result<()> {
        let phase = self.state.staged(cost);
        self.journal.save(&self.state)?;
        fault::point("staged");
        if let Some(target) = self.state.target.clone() {
            self.start_durability(&target.installed)?;
        }
        match phase {
            Some(Phase::Switching) => self.switch(Instant::now()).await,
            Some(Phase::Staged) => {
                if let Some(target) = &self.state.target {
                    tracing::info!(release = %target.installed.release, slot = %target.installed.slot, "staged and held until deployed");
                }
                self.collect_garbage();
                self.report();
                Ok(())
            }
            Some(Phase::Staging) | None => Ok(()),
        }
    }

    /// Recovery of a held target: it stays held while its slot is there. A slot that has
    /// gone (removed by hand) is staged again, still held, rather than switched to later.
    async fn keep_held(&mut self, target: node::Target) -> anyhow::Result<()> {
        if self.slot_intact(&target.installed).await? {
            tracing::info!(release = %target.installed.release, slot = %target.installed.slot, "holding a staged release until it is deployed");
            self.start_durability(&target.installed)?;
            return Ok(());
        }
        tracing::warn!(release = %target.installed.release, slot = %target.installed.slot, "the held slot is damaged or gone; staging it again");
        self.restage().await
    }

    /// Whether `installed`'s slot is there and matches its manifest byte for byte. Used on
    /// a restart for a slot that was complete but maybe not yet on disk: after a power loss
    /// its files may be short or hold stale blocks.
    async fn slot_intact(&self, installed: &Installed) -> anyhow::Result<bool> {
        let dir = self.slots.dir(&installed.slot);
        if !dir.is_dir() {
            return Ok(false);
        }
        let manifest = self.manifest_of(installed)?;
        let verified =
            tokio::task::spawn_blocking(move || images::verify_slot(&manifest, &dir)).await?;
        if let Err(e) = &verified {
            tracing::warn!(slot = %installed.slot, error = %e, "slot does not match its manifest");
        }
        Ok(verified.is_ok())
    }

    /// Starts `installed`'s durability barrier in the background (see [`Durability`]).
    fn start_durability(&mut self, installed: &Installed) -> anyhow::Result<()> {
        let manifest = self.manifest_of(installed)?;
        let dir = self.slots.dir(&installed.slot);
        // A barrier still running for a slot no longer wanted finishes on its own.
        self.durability = Some(Durability {
            slot: installed.slot.clone(),
            task: tokio::task::spawn_blocking(move || images::make_durable(&manifest, &dir)),
        });
        Ok(())
    }

    /// Waits until `installed`'s slot is on disk: for the barrier started when it was
    /// staged, or for a new one (after a restart, or if another slot was staged since).
    async fn wait_durable(&mut self, installed: &Installed) -> anyhow::Result<()> {
        let started = Instant::now();
        let pending = self.durability.take().filter(|d| d.slot == installed.slot);
        let task = match pending {
            Some(durability) => durability.task,
            None => {
                self.start_durability(installed)?;
                self.durability.take().expect("just started").task
            }
        };
        task.await
            .context("the durability task crashed")?
            .with_context(|| {
                format!(
                    "cannot write slot {} to disk; the disk may be failing or full",
                    installed.slot
                )
            })?;
        tracing::debug!(slot = %installed.slot, ms = started.elapsed().as_millis() as u64, "slot durable");
        Ok(())
    }

    /// A deploy of the held release: switch to its slot with no download, timed from the
    /// command's arrival (`received`). The target is already saved as Switching.
    async fn switch_to_held(&mut self, received: Instant) -> anyhow::Result<()> {
        let Some(target) = self.state.target.clone() else {
            return Ok(());
        };
        if !self.slots.dir(&target.installed.slot).is_dir() {
            tracing::warn!(release = %target.installed.release, slot = %target.installed.slot, "the held slot is gone; staging it again before switching");
            return self.restage().await;
        }
        tracing::info!(release = %target.installed.release, "switching to the held slot");
        self.switch(received).await
    }

    /// Stages the target again from scratch (its complete slot was lost), keeping its hold.
    async fn restage(&mut self) -> anyhow::Result<()> {
        self.state.restage();
        self.journal.save(&self.state)?;
        match self.state.target.clone() {
            Some(target) => self.start_staging(target).await,
            None => Ok(()),
        }
    }

    fn fail(
        &mut self,
        target: &Installed,
        reason: String,
        rejected: u64,
        app_output: Vec<String>,
    ) -> anyhow::Result<()> {
        tracing::error!(release = %target.release, %reason, "update failed; keeping the current version");
        let report = UpdateReport {
            release: target.release.clone(),
            bytes_fetched_mqtt: 0,
            bytes_fetched_http: 0,
            bytes_reused: 0,
            chunks_fetched: 0,
            chunks_rejected: rejected,
            staging_ms: 0,
            switch_ms: 0,
            outcome: Outcome::Failed {
                reason: reason.clone(),
            },
            finished_at: now(),
            app_output,
        };
        self.state.failed(report);
        // Garbage first: on a full disk the fetched chunks are what frees the room the
        // journal write needs. A crash in between only means restaging from scratch.
        self.collect_garbage();
        self.journal.save(&self.state)?;
        self.event(EventKind::UpdateFailed {
            release: target.release.clone(),
            reason,
        });
        self.report();
        Ok(())
    }

    /// The run section of an installed release, if it has one.
    fn run_spec(&self, installed: &Installed) -> anyhow::Result<Option<protocol::RunSpec>> {
        Ok(self.manifest_of(installed)?.run)
    }

    /// Completes the deploy of the staged target: with a run section, starts the new
    /// version beside the old one and moves traffic once it is healthy (a version that does
    /// not become healthy fails the update and the old one keeps serving); then moves the
    /// active pointer and records the switch (save point 3), starting the probation.
    /// `started` is when the decision to switch was made; the staging figures come from the
    /// journaled target (zero if they were lost to a crash before save point 2).
    async fn switch(&mut self, started: Instant) -> anyhow::Result<()> {
        let Some(target) = self.state.target.clone() else {
            return Ok(());
        };
        debug_assert_eq!(target.phase, Phase::Switching);
        let staged = target.staging_cost.unwrap_or_default();
        let installed = &target.installed;
        let spec = self.run_spec(installed)?;
        match &spec {
            Some(spec) => {
                let dir = self.slots.dir(&installed.slot);
                let version = match self
                    .serving
                    .start(&installed.release, &installed.slot, &dir, spec)
                    .await
                {
                    Ok(version) => version,
                    Err(e) => return self.fail(installed, e.to_string(), 0, e.output()),
                };
                fault::point("started");
                // Traffic moves only to a slot that is on disk; the barrier ran (mostly)
                // while the new version started.
                if let Err(e) = self.wait_durable(installed).await {
                    self.serving.discard(version).await;
                    return self.fail(installed, format!("{e:#}"), 0, Vec::new());
                }
                let probation = Duration::from_secs(u64::from(spec.probation_secs));
                if let Err((e, version)) = self.serving.activate(version, probation).await {
                    self.serving.discard(version).await;
                    return self.fail(installed, e.to_string(), 0, e.output());
                }
            }
            // A files-only release: whatever ran before has no place in it.
            None => {
                if let Err(e) = self.wait_durable(installed).await {
                    return self.fail(installed, format!("{e:#}"), 0, Vec::new());
                }
                self.serving.stop_all().await
            }
        }
        self.slots
            .activate(&installed.slot)
            .with_context(|| format!("cannot point current at slot {}", installed.slot))?;
        fault::point("flipped");
        let from = self.state.current.as_ref().map(|c| c.release.clone());
        let report = UpdateReport {
            release: installed.release.clone(),
            bytes_fetched_mqtt: staged.bytes_fetched_mqtt,
            bytes_fetched_http: staged.bytes_fetched_http,
            bytes_reused: staged.bytes_reused,
            chunks_fetched: staged.chunks_fetched,
            chunks_rejected: staged.chunks_rejected,
            staging_ms: staged.staging_ms,
            switch_ms: started.elapsed().as_millis() as u64,
            outcome: Outcome::Switched,
            finished_at: now(),
            app_output: Vec::new(),
        };
        self.state.switched(report);
        self.state.probation_until = spec
            .as_ref()
            .filter(|s| s.probation_secs > 0)
            .map(|s| now() + u64::from(s.probation_secs));
        self.journal.save(&self.state)?;
        fault::point("switched");
        tracing::info!(release = %installed.release, from = ?from.as_ref().map(|r| r.to_string()), "switched");
        self.event(EventKind::Switched {
            release: installed.release.clone(),
            from,
        });
        self.collect_garbage();
        self.report();
        Ok(())
    }

    /// Makes the journal's current version serve: after a start or a crash, nothing the
    /// agent ran survives it. A probation interrupted by the crash continues; a current
    /// version that no longer starts sends the node back to the previous one.
    async fn serve_current(&mut self) -> anyhow::Result<()> {
        let Some(current) = self.state.current.clone() else {
            return Ok(());
        };
        let Some(spec) = self.run_spec(&current)? else {
            return Ok(());
        };
        // Completing an interrupted switch already started it.
        if self.serving.active_release() == Some(&current.release) {
            return Ok(());
        }
        let dir = self.slots.dir(&current.slot);
        let failure = match self
            .serving
            .start(&current.release, &current.slot, &dir, &spec)
            .await
        {
            Ok(version) => {
                let left = self
                    .state
                    .probation_until
                    .map_or(0, |until| until.saturating_sub(now()));
                match self
                    .serving
                    .activate(version, Duration::from_secs(left))
                    .await
                {
                    Ok(()) => return Ok(()),
                    Err((e, version)) => {
                        self.serving.discard(version).await;
                        e
                    }
                }
            }
            Err(e) => e,
        };
        tracing::error!(release = %current.release, error = %failure, "the current version does not serve after a restart");
        if self.state.previous.is_some() {
            let reason = format!("{failure} (after the agent restarted)");
            self.roll_back(None, reason, failure.output()).await?;
        }
        Ok(())
    }

    /// Probation probes and the end of a grace period; a failed probation rolls back.
    async fn on_tick(&mut self) -> anyhow::Result<()> {
        match self.serving.tick().await {
            Verdict::Fine => Ok(()),
            Verdict::Kept => {
                tracing::info!(release = ?self.serving.active_release().map(|r| r.to_string()), "probation passed");
                self.state.probation_until = None;
                self.journal.save(&self.state)?;
                self.report();
                Ok(())
            }
            Verdict::Failed { reason, output } => {
                tracing::error!(%reason, "rolling back by itself");
                self.roll_back(None, reason, output).await
            }
        }
    }

    /// Returns to the previous version: save point first (the journal names the previous
    /// version as current), then traffic (a flip when it is still warm, a start from its
    /// slot otherwise), then the pointer. Needs no download: the slot is on disk. `seq` is
    /// the operator's command; `None` when the agent decides (failed probation).
    async fn roll_back(
        &mut self,
        seq: Option<u64>,
        reason: String,
        app_output: Vec<String>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        self.cancel_staging();
        let from = self.state.current.clone();
        if let Err(refusal) = self.state.roll_back(seq) {
            self.journal.save(&self.state)?;
            self.reject("rollback", &refusal);
            self.report();
            return Ok(());
        }
        self.journal.save(&self.state)?;
        fault::point("rollback-saved");
        let current = self
            .state
            .current
            .clone()
            .context("a rollback always leaves a current version")?;
        match self.run_spec(&current)? {
            // An operator's rollback leaves a healthy version: it stays warm.
            Some(_)
                if self
                    .serving
                    .flip_back_to(&current.release, seq.is_none())
                    .await => {}
            Some(spec) => {
                let dir = self.slots.dir(&current.slot);
                let started_old = self
                    .serving
                    .start(&current.release, &current.slot, &dir, &spec)
                    .await;
                let activated = match started_old {
                    Ok(version) => match self.serving.activate(version, Duration::ZERO).await {
                        Ok(()) => Ok(()),
                        Err((e, version)) => {
                            self.serving.discard(version).await;
                            Err(e)
                        }
                    },
                    Err(e) => Err(e),
                };
                if let Err(e) = activated {
                    // The old version cannot serve: stay on the one that does.
                    self.state.roll_back(None).context("undoing a rollback")?;
                    let report = UpdateReport {
                        outcome: Outcome::Failed {
                            reason: format!("rollback ({reason}) failed: {e}"),
                        },
                        app_output: e.output(),
                        ..self.bare_report(&current.release, started)
                    };
                    self.state.finished(report);
                    self.journal.save(&self.state)?;
                    tracing::error!(error = %e, "rollback failed; staying on the version that serves");
                    self.report();
                    return Ok(());
                }
            }
            None => self.serving.stop_all().await,
        }
        self.slots
            .activate(&current.slot)
            .with_context(|| format!("cannot point current at slot {}", current.slot))?;
        fault::point("rolled-back");
        let report = UpdateReport {
            outcome: Outcome::RolledBack {
                reason: reason.clone(),
            },
            app_output,
            ..self.bare_report(&current.release, started)
        };
        self.state.finished(report);
        self.journal.save(&self.state)?;
        let from = from.map(|f| f.release);
        tracing::info!(release = %current.release, from = ?from.as_ref().map(|r| r.to_string()), %reason, "rolled back");
        self.event(EventKind::RolledBack {
            release: current.release,
            from,
            reason,
        });
        self.collect_garbage();
        self.report();
        Ok(())
    }

    /// An update report for something that moved no bytes (a rollback), timed from `started`.
    fn bare_report(&self, release: &protocol::ReleaseId, started: Instant) -> UpdateReport {
        UpdateReport {
            release: release.clone(),
            bytes_fetched_mqtt: 0,
            bytes_fetched_http: 0,
            bytes_reused: 0,
            chunks_fetched: 0,
            chunks_rejected: 0,
            staging_ms: 0,
            switch_ms: started.elapsed().as_millis() as u64,
            outcome: Outcome::Switched,
            finished_at: now(),
            app_output: Vec::new(),
        }
    }

    /// Removes slots, fetched chunks and manifests nothing refers to any more.
    fn collect_garbage(&mut self) {
        match self.slots.collect_garbage(self.state.live_slots()) {
            Ok(removed) if !removed.is_empty() => tracing::info!(?removed, "removed old slots"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not remove old slots"),
        }
        let live: Vec<_> = [&self.state.current, &self.state.previous]
            .into_iter()
            .flatten()
            .chain(self.state.target.as_ref().map(|t| &t.installed))
            .map(|i| i.manifest_digest)
            .collect();
        if let Err(e) = self.journal.retain_manifests(&live) {
            tracing::warn!(error = %e, "could not prune stored manifests");
        }
        // Fetched chunks are only needed until their slot is assembled: a held slot is.
        if !self.state.needs_fetched_chunks() {
            let cleared = self
                .store
                .digests()
                .and_then(|all| all.iter().try_for_each(|d| self.store.remove(d)));
            if let Err(e) = cleared {
                tracing::warn!(error = %e, "could not clear the fetch store");
            }
        }
    }

    fn slot_report(&self, installed: &Installed) -> SlotReport {
        SlotReport {
            release: installed.release.clone(),
            manifest_digest: installed.manifest_digest,
            slot_dir: self.slots.dir(&installed.slot).display().to_string(),
        }
    }

    /// The node's state as reported: retained on the broker and snapshotted for `agent status`.
    fn wire_state(&self) -> messages::NodeState {
        let staged = self
            .state
            .staged_target()
            .map(|t| self.slot_report(&t.installed));
        messages::NodeState {
            protocol: protocol::PROTOCOL_VERSION,
            node: self.config.node.clone(),
            labels: self.config.labels.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            current: self.state.current.as_ref().map(|i| self.slot_report(i)),
            previous: self.state.previous.as_ref().map(|i| self.slot_report(i)),
            staged,
            staging: self.staging.as_ref().and_then(|s| s.progress.clone()),
            last_update: self.state.last_update.clone(),
            last_seq: self.state.last_seq,
            reported_at: now(),
        }
    }

    /// Publishes the node's state. Called after every change of state, which includes every
    /// change of what serves: telemetry learns of those here.
    fn report(&self) {
        let current = self.state.current.as_ref().map(|c| &c.release);
        self.telemetry
            .set_traffic(telemetry::Traffic::of(current, &self.serving));
        let state = self.state_json();
        if let Err(e) = write_atomic(&self.config.data_dir.join("status.json"), &state) {
            tracing::warn!(error = %e, "could not write status.json");
        }
        self.publish_state(state);
    }

    /// What `status.json` holds and the state topic carries.
    fn state_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&self.wire_state()).expect("state serializes")
    }

    /// Publishes `state` ([`Daemon::state_json`]), retained: on every change and every
    /// [`STATE_REFRESH`].
    fn publish_state(&self, state: Vec<u8>) {
        let topic = self.config.topics.node(&self.config.node, NodeTopic::State);
        // A full queue loses this one; the next change or refresh sends it again.
        let _ = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, true, state);
    }

    fn event(&self, kind: EventKind) {
        let event = Event::new(self.config.node.clone(), now(), kind);
        let topic = self
            .config
            .topics
            .node(&self.config.node, NodeTopic::Events);
        let payload = serde_json::to_vec(&event).expect("events serialize");
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .is_err()
        {
            tracing::debug!("event not queued (offline)");
        }
    }
}
