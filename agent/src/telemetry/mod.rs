//! Health telemetry: a task that takes one sample per interval (host metrics, and the
//! serving version's own metrics derived from its Prometheus endpoint), keeps it in a
//! durable buffer and delivers the buffer to the coordinator in order.
//!
//! - [`host`]: CPU, memory, load and disk, from one long-lived `sysinfo::System`.
//! - [`scrape`] and [`prom`]: the app's metrics page, fetched within bounds and parsed.
//! - [`mod@derive`]: per-interval app values from two consecutive scrapes of one process.
//! - [`buffer`]: the durable, bounded FIFO of unacknowledged samples (a journal tree).
//! - [`delivery`]: when a batch goes out and what it holds.
//!
//! The daemon owns a [`Telemetry`] handle and tells it, through `watch` channels that never
//! block, what takes traffic ([`Traffic`], after every change of what serves), whether the
//! broker link is up, and the coordinator's acknowledgements. The task publishes batches on
//! the node's metrics topic with `try_publish` (QoS 1, not retained) and never waits on the
//! daemon, nor the daemon on it.
//!
//! **Invariants**:
//! - a sample is numbered and on disk before it is ever sent; it leaves the buffer only when
//!   the coordinator acknowledges it or, the buffer being full, as the oldest one, counted in
//!   `dropped_total`;
//! - samples are sent oldest first, one batch in flight, only while the link is up; a batch
//!   is sent again after [`delivery::RESEND_AFTER`] without an ack (doubling while no ack
//!   comes, up to [`delivery::MAX_RESEND_AFTER`]), and at once after a reconnection;
//! - sampling goes on whether or not the broker is reachable;
//! - the buffer's disk I/O (a flush per sample) runs on the blocking pool: the agent's
//!   runtime has one thread, which also moves the front door's traffic.

pub mod buffer;
pub mod delivery;
pub mod derive;
pub mod host;
pub mod prom;
pub mod scrape;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use protocol::telemetry::{MetricAck, MAX_SAMPLES_PER_BATCH, MAX_VALUES_PER_SAMPLE};
use protocol::{NodeId, NodeTopic, ReleaseId};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::daemon::Config;
use crate::journal::{Journal, JournalError};
use crate::serving::Serving;
use buffer::{BufferError, SampleBuffer};
use delivery::Delivery;
use derive::{Derived, Deriver, ProcessKey, Snapshot};
use host::HostProbe;

/// How often a sample is taken unless the operator says otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// The shortest interval accepted; below a second is meant for tests.
pub const MIN_INTERVAL: Duration = Duration::from_millis(200);
/// Samples buffered unless the operator says otherwise: a day at the default interval.
pub const DEFAULT_BUFFER: u64 = 24 * 60 * 60 / DEFAULT_INTERVAL.as_secs();
/// The most samples a buffer may be configured to hold.
pub const MAX_BUFFER: u64 = 10_000_000;
/// The longest a scrape may take (and at most half the interval).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `stop` waits for the task to finish what it is writing.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The operator's telemetry settings (`--metrics-interval`, `--metrics-buffer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub interval: Duration,
    /// Most samples kept while the coordinator cannot be reached.
    pub buffer_capacity: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            interval: DEFAULT_INTERVAL,
            buffer_capacity: DEFAULT_BUFFER,
        }
    }
}

/// What takes traffic on the node, as the daemon last said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Traffic {
    /// The current version (also for a files-only release, which runs nothing).
    pub version: Option<ReleaseId>,
    /// The running version that takes traffic, if it has a metrics endpoint.
    pub app: Option<AppEndpoint>,
}

/// Where the serving version's metrics are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppEndpoint {
    pub release: ReleaseId,
    /// Its private port on 127.0.0.1.
    pub port: u16,
    pub metrics_path: String,
}

impl Traffic {
    /// What takes traffic on a node whose journal names `current` as the current version,
    /// with `serving` running what it runs.
    pub fn of(current: Option<&ReleaseId>, serving: &Serving) -> Traffic {
        let app = serving.active().and_then(|active| {
            Some(AppEndpoint {
                release: active.release.clone(),
                port: active.port,
                metrics_path: active.spec.metrics_path.clone()?,
            })
        });
        Traffic {
            version: current.cloned(),
            app,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Buffer(#[from] BufferError),
}

/// The daemon's handle on the telemetry task. Every method returns at once.
pub struct Telemetry {
    traffic: watch::Sender<Traffic>,
    link: watch::Sender<bool>,
    acks: watch::Sender<u64>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Telemetry {
    /// Opens the sample buffer in `journal` and starts the task, which publishes through
    /// `client`. The link counts as down until [`Telemetry::link_up`].
    pub fn start(
        config: &Config,
        client: AsyncClient,
        journal: &Journal,
    ) -> Result<Telemetry, TelemetryError> {
        let settings = &config.telemetry;
        let buffer = SampleBuffer::open(journal.telemetry_tree()?, settings.buffer_capacity)?;
        tracing::info!(
            interval = %protocol::human_duration(settings.interval),
            buffered = buffer.len(),
            next_seq = buffer.next_seq(),
            dropped_total = buffer.dropped_total(),
            "telemetry started"
        );
        Ok(Telemetry::spawn(Parts {
            node: config.node.clone(),
            labels: config.labels.clone(),
            metrics_topic: config.topics.node(&config.node, NodeTopic::Metrics),
            data_dir: config.data_dir.clone(),
            interval: settings.interval,
            resend_after: delivery::RESEND_AFTER,
            client,
            buffer,
        }))
    }

    fn spawn(parts: Parts) -> Telemetry {
        let (traffic_tx, traffic_rx) = watch::channel(Traffic::default());
        let (link_tx, link_rx) = watch::channel(false);
        let (acks_tx, acks_rx) = watch::channel(0);
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = Task {
            node: parts.node,
            labels: parts.labels,
            metrics_topic: parts.metrics_topic,
            client: parts.client,
            interval: parts.interval,
            host: HostProbe::new(parts.data_dir),
            deriver: Deriver::default(),
            scrape_failing: false,
            buffer: Some(parts.buffer),
            buffer_failing: false,
            delivery: Delivery::new(parts.resend_after),
            acked: 0,
            traffic: traffic_rx,
            link: link_rx,
            acks: acks_rx,
        };
        Telemetry {
            traffic: traffic_tx,
            link: link_tx,
            acks: acks_tx,
            stop: Some(stop_tx),
            task: Some(tokio::spawn(task.run(stop_rx))),
        }
    }

    /// Records what takes traffic now; the task notices at its next sample.
    pub fn set_traffic(&self, traffic: Traffic) {
        self.traffic.send_if_modified(|current| {
            let changed = *current != traffic;
            *current = traffic;
            changed
        });
    }

    /// The broker link is (again) up: unacknowledged samples are sent at once.
    pub fn link_up(&self) {
        // Always a notification, even if the task never saw the link go down in between:
        // a batch in flight on the old connection may be lost.
        self.link.send_modify(|up| *up = true);
    }

    pub fn link_down(&self) {
        self.link.send_modify(|up| *up = false);
    }

    /// A message on the node's metrics-ack topic.
    pub fn on_ack(&self, payload: &[u8]) {
        let ack: MetricAck = match serde_json::from_slice(payload) {
            Ok(ack) => ack,
            Err(error) => {
                tracing::warn!(%error, "ignoring an unreadable metrics acknowledgement");
                return;
            }
        };
        if ack.protocol > protocol::PROTOCOL_VERSION {
            tracing::warn!(
                protocol = ack.protocol,
                "ignoring a metrics acknowledgement of a newer protocol; upgrade the agent"
            );
            return;
        }
        // Only the highest ack matters: it covers every lower one.
        self.acks.send_if_modified(|up_to| {
            let newer = ack.up_to > *up_to;
            *up_to = (*up_to).max(ack.up_to);
            newer
        });
    }

    /// Stops the task, letting it finish a buffer write under way.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
                tracing::warn!("telemetry did not stop in time");
                task.abort();
            }
        }
    }
}

/// What the task is made of.
struct Parts {
    node: NodeId,
    labels: BTreeMap<String, String>,
    metrics_topic: String,
    data_dir: PathBuf,
    interval: Duration,
    resend_after: Duration,
    client: AsyncClient,
    buffer: SampleBuffer,
}

/// The telemetry task's state.
struct Task {
    node: NodeId,
    labels: BTreeMap<String, String>,
    metrics_topic: String,
    client: AsyncClient,
    interval: Duration,
    host: HostProbe,
    deriver: Deriver,
    /// Whether the last scrape failed, so a lasting failure is logged once.
    scrape_failing: bool,
    /// `None` only while lent to the blocking pool.
    buffer: Option<SampleBuffer>,
    buffer_failing: bool,
    delivery: Delivery,
    /// The highest ack applied to the buffer.
    acked: u64,
    traffic: watch::Receiver<Traffic>,
    link: watch::Receiver<bool>,
    acks: watch::Receiver<u64>,
}

impl Task {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        // The first sample comes one interval after the start, so its CPU figure covers a
        // whole interval from the reading the host probe took when it was created.
        let mut tick = tokio::time::interval_at(Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let resend_at = self.delivery.resend_at();
            tokio::select! {
                // The daemon is shutting down (or dropped the handle).
                _ = &mut stop => break,
                // Time for a sample.
                _ = tick.tick() => self.sample().await,
                // The coordinator acknowledged samples.
                Ok(()) = self.acks.changed() => self.apply_ack().await,
                // The broker link went up or down.
                Ok(()) = self.link.changed() => {
                    if *self.link.borrow_and_update() {
                        self.delivery.link_up();
                    } else {
                        self.delivery.link_down();
                    }
                }
                // The batch in flight was not acknowledged in time.
                () = tokio::time::sleep_until(resend_at.unwrap_or_else(Instant::now)), if resend_at.is_some() => {}
            }
            if self.buffer.is_none() {
                tracing::error!("telemetry stopped: its buffer was lost with a failed worker");
                break;
            }
            self.send().await;
        }
    }

    /// Takes one sample and buffers it.
    async fn sample(&mut self) {
        let mut values = BTreeMap::new();
        self.host.measure(&mut values);
        // A change of what serves starts the app figures afresh: deltas across it would mix
        // two processes (and the key check below would catch most, but not a version that
        // went away and came back on the same port).
        if self.traffic.has_changed().unwrap_or(false) {
            self.deriver.reset();
        }
        let traffic = self.traffic.borrow_and_update().clone();
        match &traffic.app {
            Some(app) => self.sample_app(app, &mut values).await,
            None => self.deriver.reset(),
        }
        let at = crate::daemon::now();
        let version = traffic.version;
        let pushed = self
            .with_buffer(move |buffer| buffer.push(at, version, values))
            .await;
        match pushed {
            Some(Ok(seq)) => {
                if std::mem::take(&mut self.buffer_failing) {
                    tracing::info!(seq, "telemetry buffer writable again");
                }
                tracing::debug!(seq, "sample taken");
            }
            Some(Err(error)) => {
                // Once per run of failures (a full disk fails every interval).
                let newly_failing = !std::mem::replace(&mut self.buffer_failing, true);
                if newly_failing {
                    tracing::warn!(%error, "cannot buffer samples; this interval's sample is lost");
                }
            }
            None => {}
        }
    }

    async fn sample_app(&mut self, app: &AppEndpoint, values: &mut BTreeMap<String, f64>) {
        let timeout = (self.interval / 2).min(SCRAPE_TIMEOUT);
        match scrape::scrape(app.port, &app.metrics_path, timeout).await {
            Ok(exposition) => {
                if std::mem::take(&mut self.scrape_failing) {
                    tracing::info!(release = %app.release, "app metrics readable again");
                }
                let key = ProcessKey {
                    release: app.release.clone(),
                    port: app.port,
                };
                let room = MAX_VALUES_PER_SAMPLE.saturating_sub(values.len());
                let snapshot = Snapshot::new(&exposition);
                match self.deriver.observe(key, snapshot, Instant::now(), room) {
                    Derived::Values(app_values) => values.extend(app_values),
                    Derived::Rebaselined(why) => {
                        tracing::debug!(release = %app.release, ?why, "app metrics baseline taken");
                    }
                }
            }
            Err(error) => {
                if !std::mem::replace(&mut self.scrape_failing, true) {
                    tracing::warn!(release = %app.release, %error, "cannot read the app's metrics; reporting host metrics only");
                }
            }
        }
    }

    async fn apply_ack(&mut self) {
        let up_to = *self.acks.borrow_and_update();
        self.delivery.acked(up_to);
        if up_to <= self.acked {
            return;
        }
        match self.with_buffer(move |buffer| buffer.ack(up_to)).await {
            Some(Ok(removed)) => {
                self.acked = up_to;
                tracing::debug!(up_to, removed, "samples acknowledged");
            }
            // Left in the buffer: sent again, and ignored by the coordinator.
            Some(Err(error)) => tracing::warn!(%error, up_to, "cannot forget acknowledged samples"),
            None => {}
        }
    }

    /// Sends the oldest samples if a batch may go now.
    async fn send(&mut self) {
        let now = Instant::now();
        if !self.delivery.may_send(now) || self.buffer.as_ref().is_none_or(SampleBuffer::is_empty) {
            return;
        }
        let oldest = self
            .with_buffer(|buffer| {
                let samples = buffer.oldest(MAX_SAMPLES_PER_BATCH)?;
                Ok::<_, BufferError>((samples, buffer.dropped_total()))
            })
            .await;
        let (samples, dropped_total) = match oldest {
            Some(Ok(oldest)) => oldest,
            Some(Err(error)) => {
                tracing::warn!(%error, "cannot read buffered samples");
                return;
            }
            None => return,
        };
        let Some(batch) = delivery::encode(&self.node, &self.labels, dropped_total, &samples)
        else {
            return;
        };
        // Queued for the connection, never awaited: a full queue means the link is busy or
        // stalled, and the resend timer tries again.
        let queued =
            self.client
                .try_publish(&self.metrics_topic, QoS::AtLeastOnce, false, batch.payload);
        if let Err(error) = queued {
            tracing::debug!(%error, "metrics batch not queued");
        } else {
            tracing::debug!(
                first = batch.first_seq,
                last = batch.last_seq,
                samples = batch.samples,
                "metrics batch sent"
            );
        }
        self.delivery.sent(batch.last_seq, now);
    }

    /// Runs `op` on the buffer on the blocking pool. `None` if the worker panicked, which
    /// loses the buffer (the run loop then stops).
    async fn with_buffer<T: Send + 'static>(
        &mut self,
        op: impl FnOnce(&mut SampleBuffer) -> T + Send + 'static,
    ) -> Option<T> {
        let mut buffer = self.buffer.take()?;
        let worker = tokio::task::spawn_blocking(move || {
            let out = op(&mut buffer);
            (buffer, out)
        });
        match worker.await {
            Ok((buffer, out)) => {
                self.buffer = Some(buffer);
                Some(out)
            }
            Err(error) => {
                tracing::error!(%error, "the telemetry buffer's worker failed");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
