//! The node's deploy state and its transitions. Methods here only change the value: they do
//! no I/O and read no clock (`now` is a parameter), so the whole state machine is tested
//! without a broker, a disk or a timer.
//!
//! A deploy moves through two journaled phases:
//!
//! ```text
//!   accept_deploy ──► Staging ──staged()──► Switching ──switched()──► (current = target)
//! ```
//!
//! The caller persists the state after every transition and before acting on it (see
//! `journal`), which is what makes each phase safe to resume after a crash: `Staging` is
//! resumed from the chunks already verified on disk, `Switching` re-points the active symlink
//! (an idempotent rename) and completes.

use protocol::messages::{Action, Command, Outcome, UpdateReport};
use protocol::{Digest, Envelope, Manifest, NodeId, ReleaseId, TrustedKeys, UnixSeconds};
use serde::{Deserialize, Serialize};

/// A release installed in a slot directory under `slots/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub release: ReleaseId,
    pub manifest_digest: Digest,
    /// The slot's directory name under the agent's `slots/` directory.
    pub slot: String,
}

impl Installed {
    pub fn new(release: ReleaseId, manifest_digest: Digest) -> Installed {
        let slot = format!(
            "{}-{}-{}",
            release.app,
            release.version,
            manifest_digest.short()
        );
        Installed {
            release,
            manifest_digest,
            slot,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Fetching and assembling the slot; nothing visible has changed yet.
    Staging,
    /// The slot is complete and durable; the active pointer is being moved to it.
    Switching,
}

/// The deploy in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub seq: u64,
    pub installed: Installed,
    pub phase: Phase,
    pub started_at: UnixSeconds,
    /// HTTP(S) base URLs the deploy listed, tried in order before MQTT; kept so a staging
    /// resumed after a restart uses the same sources.
    #[serde(default)]
    pub http_sources: Vec<String>,
}

/// Everything the agent must remember across restarts. The journal stores exactly this.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// Highest command seq acted on; anything at or below it is a replay.
    pub last_seq: u64,
    pub current: Option<Installed>,
    pub previous: Option<Installed>,
    pub target: Option<Target>,
    pub last_update: Option<UpdateReport>,
    /// While the current version is on probation: when it ends. A failure before then
    /// returns the node to the previous version; an agent restart resumes the probation.
    #[serde(default)]
    pub probation_until: Option<UnixSeconds>,
}

/// Why a message was refused. Shown to operators in the node's events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Envelope(#[from] protocol::EnvelopeError),
    #[error("command is for node {for_node}, not this node")]
    WrongNode { for_node: NodeId },
    #[error("command speaks protocol {0}, this agent speaks {1}; upgrade the agent")]
    Protocol(u32, u32),
    #[error("command expired at {expires_at} (now {now}); the coordinator must re-issue it")]
    Expired {
        expires_at: UnixSeconds,
        now: UnixSeconds,
    },
    #[error(
        "command seq {seq} is not above the last accepted seq {last_seq}: replayed or out of date"
    )]
    Replay { seq: u64, last_seq: u64 },
    #[error("manifest refused: {0}")]
    Manifest(String),
    #[error("there is no previous version to roll back to")]
    NoPrevious,
}

/// What the agent should do about an accepted deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployPlan {
    /// Already running it: nothing to do.
    AlreadyCurrent,
    /// Stage (fetch + assemble), then switch.
    Stage(Target),
}

/// Verifies a command's envelope and checks that it is for this node, fresh and in date.
/// Pure: the seq is only consumed when the caller acts on the command.
pub fn open_command(
    bytes: &[u8],
    trust: &TrustedKeys,
    me: &NodeId,
    last_seq: u64,
    now: UnixSeconds,
) -> Result<Command, Refusal> {
    let command: Command = Envelope::open_bytes(bytes, trust)?;
    if command.protocol > protocol::PROTOCOL_VERSION {
        return Err(Refusal::Protocol(
            command.protocol,
            protocol::PROTOCOL_VERSION,
        ));
    }
    if &command.node != me {
        return Err(Refusal::WrongNode {
            for_node: command.node,
        });
    }
    if command.expires_at <= now {
        return Err(Refusal::Expired {
            expires_at: command.expires_at,
            now,
        });
    }
    if command.seq <= last_seq {
        return Err(Refusal::Replay {
            seq: command.seq,
            last_seq,
        });
    }
    Ok(command)
}

/// Opens and validates the manifest a deploy carries. Returns it with the digest that names
/// it ([`Envelope::payload_digest`]).
pub fn open_manifest(
    envelope: &Envelope,
    trust: &TrustedKeys,
) -> Result<(Manifest, Digest), Refusal> {
    let manifest: Manifest = envelope.open(trust)?;
    manifest
        .validate()
        .map_err(|e| Refusal::Manifest(e.to_string()))?;
    Ok((manifest, envelope.payload_digest()))
}

/// Most HTTP sources taken from one deploy; more would only slow down a failing chunk.
pub const MAX_HTTP_SOURCES: usize = 8;

/// The deploy's HTTP(S) chunk sources that look usable, in order. The command is signed, so
/// this guards against a coordinator misconfiguration, not an attacker: anything that is not
/// an absolute http(s) URL is left out with a warning, and MQTT remains as the last resort.
pub fn deploy_http_sources(command: &Command) -> Vec<String> {
    let Action::Deploy { http_sources, .. } = &command.action else {
        return Vec::new();
    };
    let mut usable = Vec::new();
    for source in http_sources {
        let parsed = reqwest::Url::parse(source);
        match parsed {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
                if usable.len() < MAX_HTTP_SOURCES {
                    usable.push(source.trim_end_matches('/').to_owned());
                }
            }
            _ => tracing::warn!(%source, "ignoring a chunk source that is not an http(s) URL"),
        }
    }
    usable
}

/// The manifest envelope of a deploy action.
pub fn deploy_manifest(command: &Command) -> Option<&Envelope> {
    match &command.action {
        Action::Deploy { manifest, .. } | Action::Stage { manifest, .. } => Some(manifest),
        Action::Rollback {} => None,
    }
}

impl NodeState {
    /// Accepts a verified deploy: consumes its seq and, unless the release is already
    /// current, makes it the target (replacing any unfinished target).
    pub fn accept_deploy(
        &mut self,
        seq: u64,
        release: ReleaseId,
        manifest_digest: Digest,
        http_sources: Vec<String>,
        now: UnixSeconds,
    ) -> DeployPlan {
        debug_assert!(seq > self.last_seq, "open_command checks the seq");
        self.last_seq = seq;
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.manifest_digest == manifest_digest)
        {
            self.target = None;
            return DeployPlan::AlreadyCurrent;
        }
        let target = Target {
            seq,
            installed: Installed::new(release, manifest_digest),
            phase: Phase::Staging,
            started_at: now,
            http_sources,
        };
        self.target = Some(target.clone());
        DeployPlan::Stage(target)
    }

    /// The target's slot is complete and durable.
    pub fn staged(&mut self) {
        if let Some(t) = &mut self.target {
            t.phase = Phase::Switching;
        }
    }

    /// The active pointer now names the target: it becomes current, current becomes previous.
    pub fn switched(&mut self, report: UpdateReport) {
        if let Some(t) = self.target.take() {
            let old = self.current.replace(t.installed);
            if old.as_ref() != self.current.as_ref() {
                self.previous = old;
            }
        }
        self.last_update = Some(report);
    }

    /// Staging failed for good (e.g. the image does not fit): drop the target and record why.
    pub fn failed(&mut self, report: UpdateReport) {
        debug_assert!(matches!(report.outcome, Outcome::Failed { .. }));
        self.target = None;
        self.last_update = Some(report);
    }

    /// Returns to the previous version (asked by an operator, or after the current one failed
    /// its probation): previous and current swap, so the version left behind can be returned
    /// to in turn, and any unfinished deploy is dropped. `seq` is the rollback command's, or
    /// `None` when the agent decides by itself.
    /// The command's seq is consumed even when refused, so its retained copy is not refused
    /// again at every reconnect.
    pub fn roll_back(&mut self, seq: Option<u64>) -> Result<(), Refusal> {
        if let Some(seq) = seq {
            debug_assert!(seq > self.last_seq, "open_command checks the seq");
            self.last_seq = seq;
        }
        let Some(previous) = self.previous.take() else {
            return Err(Refusal::NoPrevious);
        };
        self.target = None;
        self.probation_until = None;
        self.previous = self.current.replace(previous);
        Ok(())
    }

    /// Records how the last update or rollback ended.
    pub fn finished(&mut self, report: UpdateReport) {
        self.last_update = Some(report);
    }

    /// Slot directories that must be kept: current, previous and the target.
    pub fn live_slots(&self) -> impl Iterator<Item = &str> {
        [
            self.current.as_ref(),
            self.previous.as_ref(),
            self.target.as_ref().map(|t| &t.installed),
        ]
        .into_iter()
        .flatten()
        .map(|i| i.slot.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use protocol::{AppName, Version};

    fn release(v: &str) -> ReleaseId {
        ReleaseId::new(AppName::new("web").unwrap(), Version::new(v).unwrap())
    }

    fn report(v: &str) -> UpdateReport {
        UpdateReport {
            release: release(v),
            bytes_fetched_mqtt: 0,
            bytes_fetched_http: 0,
            bytes_reused: 0,
            chunks_fetched: 0,
            chunks_rejected: 0,
            staging_ms: 0,
            switch_ms: 0,
            outcome: Outcome::Switched,
            finished_at: 0,
            app_output: Vec::new(),
        }
    }

    #[test]
    fn a_rollback_swaps_current_and_previous_and_drops_an_unfinished_deploy() {
        let mut s = NodeState::default();
        for (seq, v) in [(1, "1"), (2, "2")] {
            s.accept_deploy(seq, release(v), Digest::of(v.as_bytes()), vec![], 0);
            s.staged();
            s.switched(report(v));
        }
        s.accept_deploy(3, release("3"), Digest::of(b"3"), vec![], 0);
        s.roll_back(Some(4)).expect("has a previous version");
        assert_eq!(
            s.current.as_ref().map(|c| c.release.clone()),
            Some(release("1"))
        );
        assert_eq!(
            s.previous.as_ref().map(|c| c.release.clone()),
            Some(release("2"))
        );
        assert_eq!(s.target, None);
        assert_eq!(s.last_seq, 4);
        // And back again: the version left behind stays one rollback away.
        s.roll_back(None).expect("has a previous version");
        assert_eq!(
            s.current.as_ref().map(|c| c.release.clone()),
            Some(release("2"))
        );
        assert_eq!(s.last_seq, 4);
    }

    #[test]
    fn a_rollback_without_a_previous_version_is_refused_but_its_seq_is_used() {
        let mut s = NodeState::default();
        assert_eq!(s.roll_back(Some(7)), Err(Refusal::NoPrevious));
        assert_eq!(s.last_seq, 7);
        assert_eq!(s.current, None);
    }

    #[test]
    fn a_deploy_rotates_current_into_previous() {
        let mut s = NodeState::default();
        for (seq, v) in [(1, "1"), (2, "2"), (3, "3")] {
            let DeployPlan::Stage(t) =
                s.accept_deploy(seq, release(v), Digest::of(v.as_bytes()), vec![], 0)
            else {
                panic!("v{v} should be staged");
            };
            assert_eq!(t.phase, Phase::Staging);
            s.staged();
            assert_eq!(s.target.as_ref().unwrap().phase, Phase::Switching);
            s.switched(report(v));
        }
        assert_eq!(s.current.as_ref().unwrap().release, release("3"));
        assert_eq!(s.previous.as_ref().unwrap().release, release("2"));
        assert_eq!(s.last_seq, 3);
        assert!(s.target.is_none());
    }

    #[test]
    fn deploying_the_current_release_again_changes_nothing_but_the_seq() {
        let mut s = NodeState::default();
        s.accept_deploy(1, release("1"), Digest::of(b"1"), vec![], 0);
        s.staged();
        s.switched(report("1"));
        assert_eq!(
            s.accept_deploy(2, release("1"), Digest::of(b"1"), vec![], 0),
            DeployPlan::AlreadyCurrent
        );
        assert_eq!(s.last_seq, 2);
        assert!(s.previous.is_none());
    }

    #[test]
    fn live_slots_cover_current_previous_and_target() {
        let mut s = NodeState::default();
        for (seq, v) in [(1, "1"), (2, "2")] {
            s.accept_deploy(seq, release(v), Digest::of(v.as_bytes()), vec![], 0);
            s.staged();
            s.switched(report(v));
        }
        s.accept_deploy(3, release("3"), Digest::of(b"3"), vec![], 0);
        let live: Vec<&str> = s.live_slots().collect();
        assert_eq!(live.len(), 3);
        assert!(live.iter().all(|slot| slot.starts_with("web-")));
    }

    fn command(key: &SigningKey, node: &str, seq: u64, expires_at: u64) -> Vec<u8> {
        let manifest =
            Envelope::sign_bytes(<Manifest as protocol::Signed>::PAYLOAD_TYPE, b"{}", key);
        let cmd = Command {
            protocol: 1,
            node: NodeId::new(node).unwrap(),
            seq,
            issued_at: 0,
            expires_at,
            action: Action::Deploy {
                manifest,
                http_sources: vec![],
            },
        };
        Envelope::seal(&cmd, key).to_bytes()
    }

    #[test]
    fn commands_must_be_signed_addressed_fresh_and_in_date() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let trust = TrustedKeys::new([key.verifying_key()]);
        let me = NodeId::new("n1").unwrap();
        assert!(open_command(&command(&key, "n1", 5, 100), &trust, &me, 4, 50).is_ok());
        assert!(matches!(
            open_command(&command(&key, "n2", 5, 100), &trust, &me, 4, 50),
            Err(Refusal::WrongNode { .. })
        ));
        assert!(matches!(
            open_command(&command(&key, "n1", 4, 100), &trust, &me, 4, 50),
            Err(Refusal::Replay { .. })
        ));
        assert!(matches!(
            open_command(&command(&key, "n1", 5, 50), &trust, &me, 4, 50),
            Err(Refusal::Expired { .. })
        ));
        let stranger = SigningKey::from_bytes(&[8; 32]);
        assert!(matches!(
            open_command(&command(&stranger, "n1", 5, 100), &trust, &me, 4, 50),
            Err(Refusal::Envelope(
                protocol::EnvelopeError::UnknownKey { .. }
            ))
        ));
    }
}
