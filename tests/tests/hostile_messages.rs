//! Hostile input: whoever controls the broker can publish anything on a node's command
//! topic. Each forged, altered, malformed, replayed, expired, misaddressed or path-escaping
//! command is refused: the node reports a `rejected` event that names the reason, stays on
//! its version and keeps running. The coordinator refuses to publish a tree that escapes.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use protocol::messages::{Action, EventKind};
use protocol::{Digest, Envelope, NodeId, NodeTopic};
use system_tests::sign::{
    deploy_command, harmless_manifest, manifest_json, open_command, sign_raw_manifest,
    stranger_key, with_payload,
};
use system_tests::{now, release, write_tree, Agent, Broker, Fleet, TestClient};

const ROLLOUT: Duration = Duration::from_secs(120);
const REACTION: Duration = Duration::from_secs(30);

/// One node running web@1, and a test client listening to its events.
struct OneNode {
    fleet: Fleet,
    node: Agent,
    client: TestClient,
}

impl OneNode {
    fn on_v1() -> Result<OneNode> {
        let fleet = Fleet::start(Broker::Embedded)?;
        let [node] = fleet.agents(["n1"])?;
        deploy(&fleet, "1", 11)?;
        let mut client = fleet.mqtt_client()?;
        client.subscribe(&fleet.topics().node(node.node(), NodeTopic::Events))?;
        Ok(OneNode {
            fleet,
            node,
            client,
        })
    }

    fn command_topic(&self) -> String {
        self.fleet
            .topics()
            .node(self.node.node(), NodeTopic::Command)
    }

    /// The next seq the node would accept.
    fn next_seq(&self) -> Result<u64> {
        Ok(self.node.status()?.last_seq + 1)
    }

    /// Publishes `payload` (retained, as a broker-side attacker would) on the node's command
    /// topic and checks that the node refuses it: a `rejected` event whose reason contains
    /// one of `reason_words` (case-insensitive), the same current release and `last_seq`, and a
    /// live process.
    fn assert_refused(&mut self, payload: Vec<u8>, reason_words: &[&str]) -> Result<()> {
        let before = self.node.status()?;
        let topic = self.command_topic();
        self.client.publish(&topic, payload, true)?;
        let event = self
            .client
            .expect_event(REACTION, "a `rejected` event", |e| {
                matches!(e.kind, EventKind::Rejected { .. })
            })
            .with_context(|| self.fleet.report())?;
        let EventKind::Rejected { what, reason } = &event.kind else {
            unreachable!("filtered above")
        };
        eprintln!("{} rejected {what}: {reason}", self.node.node());
        let lower = reason.to_lowercase();
        assert!(
            reason_words.iter().any(|w| lower.contains(&w.to_lowercase())),
            "the rejection of {what} does not name the reason (want one of {reason_words:?}): {reason}"
        );
        let after = self.node.status()?;
        assert_eq!(
            after.current.as_ref().map(|c| &c.release),
            before.current.as_ref().map(|c| &c.release),
            "the refused command changed the node's version"
        );
        assert_eq!(
            after.last_seq, before.last_seq,
            "the refused command moved last_seq"
        );
        assert!(
            self.node.is_running(),
            "the agent died:\n{}",
            self.node.log_tail(40)
        );
        Ok(())
    }
}

/// Publishes a fresh tree as web@VERSION and waits until every agent runs it.
fn deploy(fleet: &Fleet, version: &str, seed: u64) -> Result<()> {
    let src = fleet.scratch(&format!("v{version}"))?;
    write_tree(&src, seed, 300_000)?;
    fleet.publish(&src, "web", version)?;
    fleet.rollout("web", version)?;
    fleet.wait_all_on("web", version, ROLLOUT)
}

#[test]
fn a_command_signed_by_an_unknown_key_is_rejected() -> Result<()> {
    let mut n = OneNode::on_v1()?;
    let stranger = stranger_key();
    let command = deploy_command(
        n.node.node(),
        n.next_seq()?,
        harmless_manifest("web", "evil", &stranger)?,
    );
    let forged = Envelope::seal(&command, &stranger);
    n.assert_refused(
        forged.to_bytes(),
        &["trusted key", "unknown key", "untrusted"],
    )
}

#[test]
fn a_command_whose_payload_was_altered_after_signing_is_rejected() -> Result<()> {
    let mut n = OneNode::on_v1()?;
    let key = n.fleet.signing_key()?;
    let seq = n.next_seq()?;
    let signed = Envelope::seal(
        &deploy_command(n.node.node(), seq, harmless_manifest("web", "evil", &key)?),
        &key,
    );
    let mut altered = deploy_command(
        n.node.node(),
        seq + 1,
        harmless_manifest("web", "evil", &key)?,
    );
    altered.expires_at += 1;
    let tampered = with_payload(&signed, &serde_json::to_vec(&altered)?);
    n.assert_refused(
        tampered.to_bytes(),
        &["does not verify", "altered", "forged", "bad signature"],
    )
}

#[test]
fn a_malformed_command_is_rejected() -> Result<()> {
    let mut n = OneNode::on_v1()?;
    n.assert_refused(
        b"{\"payloadType\": this is not json".to_vec(),
        &["json", "malformed"],
    )
}

#[test]
fn a_replayed_old_command_is_rejected_and_the_node_stays_on_the_newer_release() -> Result<()> {
    let mut n = OneNode::on_v1()?;
    let topic = n.command_topic();
    let captured = n
        .fleet
        .mqtt_client()?
        .retained(&topic)?
        .context("no retained command for n1 after rolling out v1")?;
    let v1_command = open_command(&captured, &n.fleet.trusted_keys()?)?;
    ensure!(matches!(v1_command.action, Action::Deploy { .. }));

    deploy(&n.fleet, "2", 12)?;
    n.assert_refused(captured, &["seq", "replay", "old", "stale"])?;
    assert_eq!(n.node.current_release()?, Some(release("web", "2")?));
    Ok(())
}

#[test]
fn an_expired_command_is_rejected() -> Result<()> {
    let mut n = OneNode::on_v1()?;
    let key = n.fleet.signing_key()?;
    let mut command = deploy_command(
        n.node.node(),
        n.next_seq()?,
        harmless_manifest("web", "evil", &key)?,
    );
    command.issued_at = now() - 7200;
    command.expires_at = now() - 3600;
    n.assert_refused(Envelope::seal(&command, &key).to_bytes(), &["expire"])
}

#[test]
fn a_command_addressed_to_another_node_is_rejected() -> Result<()> {
    let mut n = OneNode::on_v1()?;
    let key = n.fleet.signing_key()?;
    let other = NodeId::new("n2")?;
    let command = deploy_command(
        &other,
        n.next_seq()?,
        harmless_manifest("web", "evil", &key)?,
    );
    n.assert_refused(
        Envelope::seal(&command, &key).to_bytes(),
        &["n2", "another node", "other node", "addressed"],
    )
}

#[test]
fn a_signed_manifest_with_a_parent_dir_path_is_rejected() -> Result<()> {
    let mut n = OneNode::on_v1()?;
    let key = n.fleet.signing_key()?;
    let content = b"evil!";
    let manifest = manifest_json(
        "web",
        "evil",
        serde_json::json!([{
            "type": "file",
            "path": "../evil",
            "mode": 0o644,
            "size": content.len(),
            "chunks": [{ "digest": Digest::of(content), "size": content.len(), "zsize": 14 }],
        }]),
    );
    let command = deploy_command(
        n.node.node(),
        n.next_seq()?,
        sign_raw_manifest(&manifest, &key),
    );
    n.assert_refused(Envelope::seal(&command, &key).to_bytes(), &[".."])
}

#[test]
fn a_signed_manifest_with_a_symlink_escaping_the_slot_is_rejected() -> Result<()> {
    let mut n = OneNode::on_v1()?;
    let key = n.fleet.signing_key()?;
    let manifest = manifest_json(
        "web",
        "evil",
        serde_json::json!([
            { "type": "dir", "path": "d", "mode": 0o755 },
            { "type": "symlink", "path": "d/etc", "target": "../../etc" },
        ]),
    );
    let command = deploy_command(
        n.node.node(),
        n.next_seq()?,
        sign_raw_manifest(&manifest, &key),
    );
    n.assert_refused(
        Envelope::seal(&command, &key).to_bytes(),
        &["outside", "escap", "symlink"],
    )
}

#[test]
fn publishing_a_tree_with_an_escaping_symlink_fails_and_publishes_nothing() -> Result<()> {
    let fleet = Fleet::start(Broker::Embedded)?;
    let src = fleet.scratch("escaping")?;
    write_tree(&src, 13, 200_000)?;
    std::os::unix::fs::symlink("../../etc", src.join("x"))?;

    let out = fleet.try_cli(&[
        "release",
        "publish",
        src.to_str().context("UTF-8 path")?,
        "--app",
        "web",
        "--version",
        "1",
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        !out.status.success(),
        "publishing an escaping symlink succeeded: {stderr}"
    );
    assert!(
        stderr.contains("symlink") || stderr.contains("outside") || stderr.contains("escap"),
        "the error does not say what is wrong: {stderr}"
    );
    assert_eq!(
        fleet.chunk_files()?,
        Vec::<std::path::PathBuf>::new(),
        "chunks were stored"
    );
    let rollout = fleet.try_cli(&["rollout", "start", "--app", "web", "--version", "1"])?;
    assert!(
        !rollout.status.success(),
        "a rollout of the refused release started"
    );
    Ok(())
}
