//! Faults during a transfer cost time, never correctness, and never a byte fetched twice:
//!
//! - an agent SIGKILLed at random points of a large transfer and restarted each time ends
//!   with a byte-identical slot, and never again asks for a chunk that was in its fetch
//!   store when it was killed (observed on the wire: chunk requests over MQTT, or the
//!   requests a test mirror receives over HTTP);
//! - a node whose network link is cut mid-transfer (a veth link into a network namespace,
//!   taken down and up again) finishes byte for byte once the link is back;
//! - a node whose disk fills up mid-stage fails the update with "disk full", leaves no
//!   partial slot and no fetched chunks behind, and keeps running its current version; a
//!   release that cannot fit fails at once with "not enough disk space".
//!
//! The namespace and tmpfs tests need root: in CI (`CI=true`) they fail without it, elsewhere
//! they are skipped with a loud message.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _, Result};
use protocol::messages::{ChunkRequest, Outcome, Presence, UpdateReport};
use protocol::{ChunkRef, Digest, NodeTopic};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use system_tests::chunks::{image_chunks, store_digests};
use system_tests::wait::Fatal;
use system_tests::{
    assert_tree_eq, release, require_root, write_tree, Agent, AgentOptions, Behaviour, Bins,
    Broker, Fleet, FleetOptions, Mirror, NetNs, TestClient,
};

/// The large transfer the kill tests interrupt.
const BIG_TREE: u64 = 64_000_000;
/// Agent fetch rate for the kill tests: slow enough that the kills land mid-transfer.
const KILL_RATE: u64 = 12_000_000;
/// How many times the agent is SIGKILLed (fewer if two random points coincide).
const KILLS: usize = 5;
/// How long the whole interrupted transfer may take.
const BIG_ROLLOUT: Duration = Duration::from_secs(240);
const ROLLOUT: Duration = Duration::from_secs(120);
/// How long an agent may take to announce itself online, and the broker to publish a killed
/// agent's last will.
const PRESENCE: Duration = Duration::from_secs(20);

#[test]
fn agents_killed_at_random_points_over_mqtt_and_http_finish_and_never_fetch_a_stored_chunk_again(
) -> Result<()> {
    // The mirror is the coordinator's own HTTP source, so it sees every HTTP request.
    let mirror = Mirror::start()?;
    let fleet = Fleet::start_with_options(
        Broker::Embedded,
        Bins::of_this_build().clone(),
        &FleetOptions {
            public_url: Some(mirror.url(Behaviour::Serve)),
            ..FleetOptions::default()
        },
    )?;
    mirror.serve_from(&fleet.chunks_dir())?;
    let slow = AgentOptions {
        max_fetch_rate: Some(KILL_RATE),
        ..AgentOptions::default()
    };
    let [over_mqtt] = fleet.agents_with(
        ["over-mqtt"],
        &AgentOptions {
            no_http: true,
            ..slow.clone()
        },
    )?;
    let [over_http] = fleet.agents_with(["over-http"], &slow)?;

    let seed = seed();
    let src = fleet.scratch("big")?;
    write_tree(&src, 51, BIG_TREE)?;
    fleet.publish(&src, "big", "1")?;
    // A fresh coordinator: its store holds exactly this release's chunks.
    let needed = store_digests(&fleet.chunks_dir())?;

    // Each node's own requests: over MQTT (the HTTP node falls back to MQTT last) and, for
    // the HTTP node, at the mirror (the MQTT-only node never asks it).
    let mut rng = StdRng::seed_from_u64(seed);
    let mut victims = [
        Victim::new(
            &over_mqtt,
            vec![Box::new(MqttRequests::watch(&fleet, &over_mqtt)?)],
            &mut rng,
            needed.len(),
        ),
        Victim::new(
            &over_http,
            vec![
                Box::new(MirrorRequests(&mirror)),
                Box::new(MqttRequests::watch(&fleet, &over_http)?),
            ],
            &mut rng,
            needed.len(),
        ),
    ];
    eprintln!(
        "seed {seed} (rerun with FLEET_TEST_SEED={seed}), {} chunks: {}",
        needed.len(),
        victims
            .iter()
            .map(|v| format!("killing {} at {:?} chunks", v.agent.node(), v.points))
            .collect::<Vec<_>>()
            .join(", ")
    );
    fleet.rollout("big", "1")?;
    for v in &mut victims {
        v.started()?;
    }

    let target = release("big", "1")?;
    while victims.iter().any(|v| !v.points.is_empty()) {
        let due = fleet.wait_for(BIG_ROLLOUT, "the next kill point", || {
            for (i, v) in victims.iter().enumerate() {
                let Some(point) = v.points.first() else {
                    continue;
                };
                if v.agent.current_release()?.as_ref() == Some(&target) {
                    return Err(Fatal(format!(
                        "{} finished the transfer before its kill at {point} chunks: it is too fast for this test",
                        v.agent.node()
                    ))
                    .into());
                }
                if v.agent.fetch_store()?.len() >= *point {
                    return Ok(Some(i));
                }
            }
            Ok(None)
        })?;
        victims[due].kill_and_restart()?;
    }

    fleet.wait_all_on("big", "1", BIG_ROLLOUT)?;
    let mut asked = BTreeSet::new();
    for v in &mut victims {
        assert_tree_eq(&src, &v.agent.current_slot()?);
        asked.extend(v.assert_no_repeats(seed)?);
    }
    // A node also takes frames another node asked for, so only together must the requests
    // cover the release.
    let never: Vec<_> = needed.difference(&asked).collect();
    assert!(
        never.is_empty(),
        "{} chunks of the release were never seen requested (first: {}): the test did not observe the transfer",
        never.len(),
        never[0]
    );
    Ok(())
}

/// Where the test sees which chunks an agent asks for.
trait RequestLog {
    /// What the requests travel over, for messages.
    fn name(&self) -> &'static str;
    /// Called after the agent was (re)started; returns once the log can tell this process's
    /// requests from the next one's.
    fn started(&mut self) -> Result<()>;
    /// Called once the agent was SIGKILLed and reaped: how many requests were recorded
    /// before it, every request of the dead process included.
    fn boundary_after_kill(&mut self) -> Result<usize>;
    /// Every request recorded, in order, once the agent has finished.
    fn all(&mut self) -> Result<Vec<Digest>>;
}

/// Chunk requests on the node's MQTT chunk-request topic, and its presence: the broker
/// publishes the node's last will (offline) once it has read everything the killed process
/// sent, which marks where that process's requests end. A process has a will only once it
/// is connected, so a kill waits for the process to have announced itself online.
struct MqttRequests {
    client: TestClient,
    requests_topic: String,
    presence_topic: String,
    seen: Vec<Digest>,
}

impl MqttRequests {
    fn watch(fleet: &Fleet, agent: &Agent) -> Result<MqttRequests> {
        let mut client = fleet.mqtt_client()?;
        let requests_topic = fleet.topics().node(agent.node(), NodeTopic::ChunkRequests);
        let presence_topic = fleet.topics().node(agent.node(), NodeTopic::Presence);
        client.subscribe(&requests_topic)?;
        client.subscribe(&presence_topic)?;
        Ok(MqttRequests {
            client,
            requests_topic,
            presence_topic,
            seen: Vec::new(),
        })
    }

    /// Records messages until the node's presence says `online`.
    fn wait_presence(&mut self, online: bool) -> Result<()> {
        let deadline = Instant::now() + PRESENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left)? {
                Some(Some(seen)) if seen == online => return Ok(()),
                Some(_) => {}
                None => bail!(
                    "the node's presence did not turn {} within {PRESENCE:?}",
                    if online {
                        "online"
                    } else {
                        "offline (its last will)"
                    }
                ),
            }
        }
    }

    /// Records the next message: `Some(Some(online))` for a presence message, `Some(None)`
    /// for anything else, `None` if nothing arrived within `timeout`.
    fn next(&mut self, timeout: Duration) -> Result<Option<Option<bool>>> {
        let Some(m) = self.client.next_message(timeout, |_| true)? else {
            return Ok(None);
        };
        if m.topic == self.requests_topic {
            let request: ChunkRequest = serde_json::from_slice(&m.payload)
                .with_context(|| format!("a chunk request that does not parse on {}", m.topic))?;
            self.seen.extend(request.digests);
            Ok(Some(None))
        } else if m.topic == self.presence_topic {
            let presence: Presence = serde_json::from_slice(&m.payload)?;
            Ok(Some(Some(presence.online)))
        } else {
            Ok(Some(None))
        }
    }
}

impl RequestLog for MqttRequests {
    fn name(&self) -> &'static str {
        "MQTT"
    }

    fn started(&mut self) -> Result<()> {
        self.wait_presence(true)
    }

    fn boundary_after_kill(&mut self) -> Result<usize> {
        self.wait_presence(false)?;
        Ok(self.seen.len())
    }

    fn all(&mut self) -> Result<Vec<Digest>> {
        // Requests still on their way are collected until the topic has been quiet a
        // moment; one that came later could only hide a repeat, never invent one.
        while self.next(Duration::from_millis(500))?.is_some() {}
        Ok(self.seen.clone())
    }
}

/// Requests a test mirror received. A request the killed process sent is received before
/// the chunk it asks for can be stored, so every request for a chunk in the killed
/// process's store is logged before the kill.
struct MirrorRequests<'a>(&'a Mirror);

impl RequestLog for MirrorRequests<'_> {
    fn name(&self) -> &'static str {
        "HTTP"
    }

    fn started(&mut self) -> Result<()> {
        Ok(())
    }

    fn boundary_after_kill(&mut self) -> Result<usize> {
        Ok(self.0.requested(Behaviour::Serve).len())
    }

    fn all(&mut self) -> Result<Vec<Digest>> {
        Ok(self.0.requested(Behaviour::Serve))
    }
}

/// An agent the test kills at chosen points of its transfer, and what it saw at each kill.
struct Victim<'a> {
    agent: &'a Agent,
    logs: Vec<Box<dyn RequestLog + 'a>>,
    /// Fetch-store sizes at which to kill it, ascending; consumed as they pass. A point the
    /// store already passed when the agent comes back kills it as soon as it is online.
    points: Vec<usize>,
    /// Per kill: how many requests each log had recorded before it, and the chunks in the
    /// fetch store at that moment.
    kills: Vec<(Vec<usize>, BTreeSet<Digest>)>,
}

impl<'a> Victim<'a> {
    fn new(
        agent: &'a Agent,
        logs: Vec<Box<dyn RequestLog + 'a>>,
        rng: &mut StdRng,
        chunks: usize,
    ) -> Victim<'a> {
        let mut points: Vec<usize> = (0..KILLS)
            .map(|_| rng.gen_range(chunks / 20..chunks * 17 / 20))
            .collect();
        points.sort_unstable();
        points.dedup();
        Victim {
            agent,
            logs,
            points,
            kills: Vec::new(),
        }
    }

    fn started(&mut self) -> Result<()> {
        self.logs.iter_mut().try_for_each(|log| log.started())
    }

    fn kill_and_restart(&mut self) -> Result<()> {
        self.points.remove(0);
        self.agent.kill();
        let stored = self.agent.fetch_store()?;
        if let Some((_, before)) = self.kills.last() {
            let lost: Vec<_> = before.difference(&stored).collect();
            assert!(
                lost.is_empty(),
                "{}: {} verified chunks in the fetch store at one kill were gone at the next (first: {})",
                self.agent.node(),
                lost.len(),
                lost[0]
            );
        }
        let boundaries = self
            .logs
            .iter_mut()
            .map(|log| log.boundary_after_kill())
            .collect::<Result<Vec<_>>>()?;
        eprintln!(
            "killed {} holding {} chunks after {boundaries:?} requests",
            self.agent.node(),
            stored.len()
        );
        self.kills.push((boundaries, stored));
        self.agent.restart()?;
        self.started()
    }

    /// No request recorded after a kill asks for a chunk that was stored at that kill.
    /// Returns every chunk the node asked for.
    fn assert_no_repeats(&mut self, seed: u64) -> Result<BTreeSet<Digest>> {
        let node = self.agent.node().clone();
        ensure!(
            !self.kills.is_empty(),
            "{node} was never killed: the test tested nothing"
        );
        let mut asked = BTreeSet::new();
        let mut repeats = Vec::new();
        for (l, log) in self.logs.iter_mut().enumerate() {
            let requested = log.all()?;
            for (i, digest) in requested.iter().enumerate() {
                let kill = self
                    .kills
                    .iter()
                    .position(|(boundaries, stored)| i >= boundaries[l] && stored.contains(digest));
                if let Some(kill) = kill {
                    repeats.push(format!(
                        "{} request #{i} for {digest}, stored at kill #{}",
                        log.name(),
                        kill + 1
                    ));
                }
            }
            asked.extend(requested);
        }
        assert!(
            repeats.is_empty(),
            "seed {seed}: {node} asked again, after a kill, for {} chunks it had verified and stored:\n  {}",
            repeats.len(),
            repeats.iter().take(20).cloned().collect::<Vec<_>>().join("\n  ")
        );
        Ok(asked)
    }
}

/// `FLEET_TEST_SEED` if set, else fresh.
fn seed() -> u64 {
    std::env::var("FLEET_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        })
}

#[test]
fn a_node_whose_link_is_cut_mid_transfer_finishes_byte_identical_once_the_link_is_back(
) -> Result<()> {
    if !require_root("the link-cut test", &["ip"])? {
        return Ok(());
    }
    let link = NetNs::create()?;
    let fleet = Fleet::start_with_options(
        Broker::Embedded,
        Bins::of_this_build().clone(),
        &FleetOptions {
            listen_ip: Some(link.host_ip()),
            ..FleetOptions::default()
        },
    )?;
    let [n1] = fleet.agents_with(
        ["n1"],
        &AgentOptions {
            netns: Some(link.name().to_owned()),
            max_fetch_rate: Some(2_000_000),
            ..AgentOptions::default()
        },
    )?;
    let src = fleet.scratch("v1")?;
    write_tree(&src, 61, 12_000_000)?;
    let needed = image_chunks(&src)?;
    fleet.publish(&src, "web", "1")?;
    fleet.rollout("web", "1")?;

    let some = needed.len() / 5;
    fleet.wait_until(
        ROLLOUT,
        format_args!("n1 to hold {some} of {} chunks", needed.len()),
        || Ok(n1.fetch_store()?.len() >= some),
    )?;
    link.cut()?;
    let held = n1.fetch_store()?.len();
    eprintln!("cut the link of n1 holding {held} chunks");
    // Down for a while, as a real outage would be; nothing is asserted on timing.
    std::thread::sleep(Duration::from_secs(4));
    let v1 = release("web", "1")?;
    assert_ne!(
        n1.current_release()?,
        Some(v1.clone()),
        "n1 finished while its link was cut: the cut did not cut anything"
    );
    link.restore()?;

    fleet.wait_all_on("web", "1", Duration::from_secs(180))?;
    assert_tree_eq(&src, &n1.current_slot()?);
    let report = fleet.wait_update(&n1, "web", "1", ROLLOUT)?;
    assert_eq!(report.outcome, Outcome::Switched, "{report:?}");
    Ok(())
}

/// A node on web@1 whose data directory is a tmpfs of `disk` bytes.
struct SmallDisk {
    fleet: Fleet,
    node: Agent,
    v1: std::path::PathBuf,
}

impl SmallDisk {
    fn on_v1(disk: u64, max_fetch_rate: Option<u64>) -> Result<SmallDisk> {
        let fleet = Fleet::start(Broker::Embedded)?;
        let [node] = fleet.agents_with(
            ["n1"],
            &AgentOptions {
                data_tmpfs: Some(disk),
                max_fetch_rate,
                ..AgentOptions::default()
            },
        )?;
        let v1 = fleet.scratch("v1")?;
        write_tree(&v1, 71, 500_000)?;
        fleet.publish(&v1, "web", "1")?;
        fleet.rollout("web", "1")?;
        fleet.wait_all_on("web", "1", ROLLOUT)?;
        assert_tree_eq(&v1, &node.current_slot()?);
        Ok(SmallDisk { fleet, node, v1 })
    }

    /// The update to web@2 failed with a reason containing `words`, and left the node as it
    /// was: no partial slot, no fetched chunks, web@1 current and intact.
    fn assert_failed_cleanly(&self, report: &UpdateReport, words: &str) -> Result<()> {
        let Outcome::Failed { reason } = &report.outcome else {
            panic!("the update to web@2 did not fail: {report:?}");
        };
        eprintln!("n1 failed web@2: {reason}");
        assert!(
            reason.to_lowercase().contains(words),
            "the failure does not say {words:?}: {reason}"
        );
        let partial = self.node.partial_dirs()?;
        assert!(partial.is_empty(), "partial slots left behind: {partial:?}");
        let fetched = self.node.fetch_store()?;
        assert!(
            fetched.is_empty(),
            "{} fetched chunks left in the fetch store",
            fetched.len()
        );
        assert_eq!(self.node.current_release()?, Some(release("web", "1")?));
        assert_tree_eq(&self.v1, &self.node.current_slot()?);
        assert_eq!(
            self.node.current_link()?,
            self.node.current_slot()?.canonicalize()?,
            "DATA/current does not point at web@1's slot"
        );
        ensure!(
            self.node.is_running(),
            "the agent died:\n{}",
            self.node.log_tail(40)
        );
        Ok(())
    }
}

#[test]
fn a_disk_that_fills_up_mid_stage_fails_the_update_cleanly_and_keeps_the_current_version(
) -> Result<()> {
    if !require_root("the disk-full test", &["mount", "umount", "df"])? {
        return Ok(());
    }
    let disk = SmallDisk::on_v1(48 * 1024 * 1024, Some(1_500_000))?;
    let (fleet, node) = (&disk.fleet, &disk.node);
    let tmpfs = node.tmpfs().context("the agent has no tmpfs")?;
    let v2 = fleet.scratch("v2")?;
    write_tree(&v2, 72, 8_000_000)?;
    let needed = image_chunks(&v2)?;
    let free = tmpfs.available()?;
    ensure!(
        free > 2 * needed
            .values()
            .map(|c| u64::from(c.size) + u64::from(c.zsize))
            .sum::<u64>(),
        "the tmpfs has only {free} bytes free: web@2 would not pass the agent's space check"
    );
    fleet.publish(&v2, "web", "2")?;
    fleet.rollout("web", "2")?;

    // Mid-stage: a third of the chunks are in. The filler takes every byte left; what the
    // node then frees by removing its fetched chunks is room to record the failure.
    let some = needed.len() / 3;
    fleet.wait_until(
        ROLLOUT,
        format_args!("n1 to hold {some} of the {} chunks of web@2", needed.len()),
        || Ok(node.fetch_store()?.len() >= some),
    )?;
    let filler = tmpfs.fill("filler", 0)?;
    eprintln!("filled n1's disk with {filler} bytes while it staged web@2");
    let report = fleet.wait_update(node, "web", "2", ROLLOUT)?;
    disk.assert_failed_cleanly(&report, "disk full")
}

#[test]
fn a_release_bigger_than_the_free_disk_fails_at_once_with_not_enough_disk_space() -> Result<()> {
    if !require_root("the disk-space check test", &["mount", "umount", "df"])? {
        return Ok(());
    }
    let disk = SmallDisk::on_v1(8 * 1024 * 1024, None)?;
    let (fleet, node) = (&disk.fleet, &disk.node);
    let v2 = fleet.scratch("v2")?;
    write_tree(&v2, 73, 12_000_000)?;
    let chunks: BTreeMap<Digest, ChunkRef> = image_chunks(&v2)?;
    let size: u64 = chunks.values().map(|c| u64::from(c.size)).sum();
    let disk_size = node.tmpfs().context("the agent has no tmpfs")?.size();
    ensure!(
        size > disk_size,
        "web@2 ({size} bytes) fits on the {disk_size}-byte disk"
    );
    fleet.publish(&v2, "web", "2")?;
    fleet.rollout("web", "2")?;

    let report = fleet.wait_update(node, "web", "2", ROLLOUT)?;
    disk.assert_failed_cleanly(&report, "not enough disk space")?;
    assert_eq!(
        (
            report.bytes_fetched_mqtt,
            report.bytes_fetched_http,
            report.chunks_fetched
        ),
        (0, 0, 0),
        "the node fetched chunks before finding the release cannot fit: {report:?}"
    );
    Ok(())
}
