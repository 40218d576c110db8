//! Stage, then switch: a signed `Stage` makes a node fetch and assemble a release and hold
//! it, still serving the version it had; a later `Deploy` of the same manifest switches to
//! the held slot at once, with nothing fetched. A held release survives a SIGKILL of the
//! agent.
//!
//! The coordinator has no stage endpoint of its own here, so the test signs its commands
//! with the fleet's key and publishes them retained on the node's command topic, as the
//! coordinator does. The chunks come from the coordinator, which both releases were
//! published to.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use ed25519_dalek::SigningKey;
use images::ChunkStore;
use protocol::messages::{Action, Command, EventKind, NodeState, Presence, UpdateReport};
use protocol::{Envelope, NodeTopic, ReleaseKind, PROTOCOL_VERSION};
use system_tests::fleet::node_entry;
use system_tests::sign::open_command;
use system_tests::{
    assert_tree_eq, change_tree, copy_tree, now, release, write_tree, Agent, Broker, Fleet,
    TestClient,
};

const ROLLOUT: Duration = Duration::from_secs(120);
const REACTION: Duration = Duration::from_secs(30);
/// A switch to a held files-only slot is a symlink rename and a journal flush; this bound
/// leaves room for a loaded machine while still failing a switch that downloads.
const QUICK_SWITCH_MS: u64 = 3_000;

/// One node running web@1, with web@2 published to the coordinator but not rolled out.
struct Node {
    fleet: Fleet,
    agent: Agent,
    events: TestClient,
    key: SigningKey,
    v1: PathBuf,
    v2: PathBuf,
    /// The coordinator-signed web@1 deploy's chunk sources (the coordinator's own URL).
    http_sources: Vec<String>,
}

/// What the coordinator says it sent: compared before and after a switch to prove it fetched
/// nothing.
#[derive(Debug, PartialEq, Eq)]
struct Delivered {
    http_chunks: u64,
    http_bytes: u64,
    mqtt_frames: u64,
    chunk_requests: u64,
}

impl Node {
    fn on_v1() -> Result<Node> {
        let fleet = Fleet::start(Broker::Embedded)?;
        let [agent] = fleet.agents(["n1"])?;
        let v1 = fleet.scratch("v1")?;
        write_tree(&v1, 61, 3_000_000)?;
        let v2 = fleet.scratch("v2")?;
        copy_tree(&v1, &v2)?;
        change_tree(&v2, 62)?;
        fleet.publish(&v1, "web", "1")?;
        fleet.publish(&v2, "web", "2")?;
        fleet.rollout("web", "1")?;
        fleet.wait_all_on("web", "1", ROLLOUT)?;

        let topic = fleet.topics().node(agent.node(), NodeTopic::Command);
        let retained = fleet
            .mqtt_client()?
            .retained(&topic)?
            .context("no retained command for n1 after rolling out web@1")?;
        let Action::Deploy { http_sources, .. } =
            open_command(&retained, &fleet.trusted_keys()?)?.action
        else {
            anyhow::bail!("the coordinator's retained command for n1 is not a deploy");
        };
        ensure!(
            !http_sources.is_empty(),
            "the coordinator's deploy lists no HTTP chunk source"
        );

        let mut events = fleet.mqtt_client()?;
        events.subscribe(&fleet.topics().node(agent.node(), NodeTopic::Events))?;
        let key = fleet.signing_key()?;
        Ok(Node {
            fleet,
            agent,
            events,
            key,
            v1,
            v2,
            http_sources,
        })
    }

    /// Signs `action` for n1 with the next seq it accepts and publishes it retained on its
    /// command topic. Returns the seq.
    fn send(&self, action: Action) -> Result<u64> {
        let seq = self.agent.status()?.last_seq + 1;
        let issued_at = now();
        let command = Command {
            protocol: PROTOCOL_VERSION,
            node: self.agent.node().clone(),
            seq,
            issued_at,
            expires_at: issued_at + 3600,
            action,
        };
        let topic = self
            .fleet
            .topics()
            .node(self.agent.node(), NodeTopic::Command);
        self.fleet.mqtt_client()?.publish(
            &topic,
            Envelope::seal(&command, &self.key).to_bytes(),
            true,
        )?;
        Ok(seq)
    }

    /// Sends a signed stage of web@2 and waits until the node holds it.
    fn stage_v2(&mut self, manifest: &Envelope) -> Result<()> {
        let seq = self.send(Action::Stage {
            manifest: manifest.clone(),
            http_sources: self.http_sources.clone(),
        })?;
        let want = release("web", "2")?;
        self.events
            .expect_event(
                REACTION,
                "web@2 starts staging",
                |e| matches!(&e.kind, EventKind::StagingStarted { release } if *release == want),
            )
            .with_context(|| self.fleet.report())?;
        let state = self
            .fleet
            .wait_for(ROLLOUT, "n1 to hold web@2 staged", || {
                let state = self.agent.status()?;
                Ok(state
                    .staged
                    .as_ref()
                    .is_some_and(|s| s.release == want)
                    .then_some(state))
            })?;
        assert_eq!(state.last_seq, seq, "the stage did not consume its seq");
        self.assert_holding_v2(&state)
    }

    /// n1 serves web@1 and holds a complete web@2 slot.
    fn assert_holding_v2(&self, state: &NodeState) -> Result<()> {
        let staged = state.staged.as_ref().context("nothing staged")?;
        assert_eq!(staged.release, release("web", "2")?);
        assert_eq!(
            state.current.as_ref().map(|c| &c.release),
            Some(&release("web", "1")?),
            "holding web@2 changed the current version"
        );
        assert_eq!(
            state.last_update.as_ref().map(|u| &u.release),
            Some(&release("web", "1")?),
            "holding web@2 reported an update"
        );
        assert_eq!(
            self.agent.current_link()?,
            self.agent.current_slot()?.canonicalize()?,
            "DATA/current moved while web@2 was only staged"
        );
        assert_tree_eq(&self.v1, &self.agent.current_slot()?);
        assert_tree_eq(&self.v2, &self.agent.data_dir().join(&staged.slot_dir));
        assert_eq!(
            self.agent.fetch_store()?.len(),
            0,
            "fetched chunks were kept after the held slot was complete"
        );
        Ok(())
    }

    /// The coordinator sees n1 report web@2 as staged.
    fn wait_coordinator_sees_v2_staged(&self) -> Result<()> {
        self.fleet.wait_until(
            REACTION,
            "`coordinator nodes` to show web@2 staged on n1",
            || {
                let nodes = self.fleet.nodes()?;
                let staged = node_entry(&nodes, "n1")
                    .and_then(|n| n.get("staged"))
                    .and_then(|s| s.get("release"))
                    .cloned();
                Ok(staged == Some(serde_json::json!({ "app": "web", "version": "2" })))
            },
        )
    }

    fn delivered(&self) -> Result<Delivered> {
        let out = self.fleet.cli(&["stats", "--json"])?;
        let stats: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let field = |name: &str| {
            stats
                .get(name)
                .and_then(|v| v.as_u64())
                .with_context(|| format!("`coordinator stats --json` has no {name}: {stats}"))
        };
        Ok(Delivered {
            http_chunks: field("http_chunks_served")?,
            http_bytes: field("http_chunk_bytes")?,
            mqtt_frames: field("mqtt_frames_published")?,
            chunk_requests: field("chunk_requests")?,
        })
    }

    /// Sends a signed deploy of web@2 and checks the node switches to its held slot without
    /// staging again or fetching anything. Returns the update report.
    fn deploy_held_v2(&mut self, manifest: &Envelope) -> Result<UpdateReport> {
        let before = self.delivered()?;
        self.send(Action::Deploy {
            manifest: manifest.clone(),
            http_sources: self.http_sources.clone(),
        })?;

        let want = release("web", "2")?;
        let mut restaged = false;
        let mut refused = Vec::new();
        self.events
            .expect_event(REACTION, "a switch to web@2", |e| match &e.kind {
                EventKind::StagingStarted { .. } => {
                    restaged = true;
                    false
                }
                // Also a retained stage handed back at a reconnect: a replay must pass in
                // silence.
                EventKind::Rejected { what, reason } => {
                    refused.push(format!("{what}: {reason}"));
                    false
                }
                EventKind::Switched { release, .. } => *release == want,
                _ => false,
            })
            .with_context(|| self.fleet.report())?;
        assert!(!restaged, "the deploy of the held release staged it again");
        assert!(refused.is_empty(), "n1 refused commands: {refused:?}");
        let report = self.fleet.wait_update(&self.agent, "web", "2", REACTION)?;
        assert_eq!(
            self.delivered()?,
            before,
            "the coordinator sent chunks for the switch to a held release"
        );

        let state = self.agent.status()?;
        assert_eq!(state.current.as_ref().map(|c| &c.release), Some(&want));
        assert_eq!(
            state.previous.as_ref().map(|c| &c.release),
            Some(&release("web", "1")?)
        );
        assert_eq!(state.staged, None, "still reports a staged release");
        assert_tree_eq(&self.v2, &self.agent.current_slot()?);
        assert_eq!(
            self.agent.current_link()?,
            self.agent.current_slot()?.canonicalize()?
        );
        assert!(
            report.switch_ms < QUICK_SWITCH_MS,
            "switching to a held slot took {} ms",
            report.switch_ms
        );
        // The report keeps what staging cost, back when the stage was received.
        assert!(
            report.bytes_fetched_http + report.bytes_fetched_mqtt > 0 && report.chunks_fetched > 0,
            "the switch report lost the staging figures: {report:?}"
        );
        eprintln!(
            "switched to held web@2 in {} ms; its staging fetched {} B over HTTP, {} B over MQTT in {} ms",
            report.switch_ms,
            report.bytes_fetched_http,
            report.bytes_fetched_mqtt,
            report.staging_ms
        );
        Ok(report)
    }
}

/// web@2's manifest, built from its tree the way `coordinator release publish` builds it
/// and signed with the fleet's key: the same chunks the coordinator holds.
fn signed_manifest(src: &Path, key: &SigningKey) -> Result<Envelope> {
    let scratch = tempfile::Builder::new().prefix("pre-staging-").tempdir()?;
    let store = ChunkStore::open(scratch.path().join("chunks"))?;
    let id = release("web", "2")?;
    let manifest = images::build_image(src, id.app, id.version, ReleaseKind::App, &store)
        .with_context(|| format!("building the image of {}", src.display()))?;
    Ok(Envelope::seal(&manifest, key))
}

#[test]
fn a_staged_release_is_held_until_a_deploy_switches_to_it_without_fetching() -> Result<()> {
    let mut n = Node::on_v1()?;
    let manifest = signed_manifest(&n.v2, &n.key)?;
    n.stage_v2(&manifest)?;
    n.wait_coordinator_sees_v2_staged()?;

    n.deploy_held_v2(&manifest)?;
    Ok(())
}

#[test]
fn a_held_release_survives_an_agent_sigkill_and_still_waits_for_its_deploy() -> Result<()> {
    let mut n = Node::on_v1()?;
    let manifest = signed_manifest(&n.v2, &n.key)?;
    n.stage_v2(&manifest)?;

    let mut presence = n.fleet.mqtt_client()?;
    presence.subscribe(&n.fleet.topics().node(n.agent.node(), NodeTopic::Presence))?;
    n.agent.kill();
    n.agent.restart()?;
    // The agent announces itself once it has recovered its journal and connected.
    let online = |m: &system_tests::mqtt::Message| {
        !m.retain && serde_json::from_slice::<Presence>(&m.payload).is_ok_and(|p| p.online)
    };
    presence
        .next_message(REACTION, online)?
        .with_context(|| format!("n1 did not come back online\n{}", n.fleet.report()))?;

    let state = n.agent.status()?;
    n.assert_holding_v2(&state)?;
    n.wait_coordinator_sees_v2_staged()?;

    n.deploy_held_v2(&manifest)?;
    Ok(())
}

/// A power loss can cut a held slot's writeback short, which a SIGKILL cannot show: the test
/// stands in for it by changing a file of the held slot while the agent is down. The agent
/// must find the damage when it starts again and stage the release again, not switch to it.
#[test]
fn a_held_slot_damaged_while_the_agent_was_down_is_staged_again() -> Result<()> {
    let mut n = Node::on_v1()?;
    let manifest = signed_manifest(&n.v2, &n.key)?;
    n.stage_v2(&manifest)?;
    let held = n
        .agent
        .data_dir()
        .join(&n.agent.status()?.staged.context("nothing staged")?.slot_dir);

    n.agent.kill();
    // A written file, not one hard-linked from web@1's slot: a linked file was on disk long
    // before (and damaging it would damage web@1 too).
    let damaged = first_written_file(&held)?.context("the held slot wrote no file")?;
    let mut bytes = std::fs::read(&damaged)?;
    bytes[0] ^= 0xff;
    std::fs::write(&damaged, &bytes)?;
    n.agent.restart()?;

    let want = release("web", "2")?;
    n.events
        .expect_event(
            REACTION,
            "web@2 staged again after the restart",
            |e| matches!(&e.kind, EventKind::StagingStarted { release } if *release == want),
        )
        .with_context(|| n.fleet.report())?;
    let state = n
        .fleet
        .wait_for(ROLLOUT, "n1 to hold web@2 staged again", || {
            let state = n.agent.status()?;
            Ok(state
                .staged
                .as_ref()
                .is_some_and(|s| s.release == want)
                .then_some(state))
        })?;
    n.assert_holding_v2(&state)?;
    n.deploy_held_v2(&manifest)?;
    Ok(())
}

/// Depth first, in name order: the first regular file under `dir` with at least one byte and
/// no other name (so not shared with another slot).
fn first_written_file(dir: &Path) -> Result<Option<PathBuf>> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let kind = entry.file_type()?;
        let meta = entry.metadata()?;
        if kind.is_file() && meta.len() > 0 && meta.nlink() == 1 {
            return Ok(Some(entry.path()));
        }
        if kind.is_dir() {
            if let Some(found) = first_written_file(&entry.path())? {
                return Ok(Some(found));
            }
        }
    }
    Ok(None)
}
