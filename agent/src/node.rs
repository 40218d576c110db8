//! The node's deploy state and its transitions. Methods here only change the value: they do
//! no I/O and read no clock (`now` is a parameter), so the whole state machine is tested
//! without a broker, a disk or a timer.
//!
//! A target moves through journaled phases. A `Deploy` stages and switches; a `Stage` stages
//! and holds, and a later `Deploy` of the same manifest switches to the held slot:
//!
//! ```text
//!   accept_deploy ──► Staging ──staged()───────────────────────► Switching ──switched()──► current
//!   accept_stage  ──► Staging, held ──staged()──► Staged ──accept_deploy()──┘
//! ```
//!
//! While a target is still staging, a command for the same manifest only changes whether it
//! is held (a `Deploy` lifts the hold, a `Stage` sets it); the staging goes on.
//!
//! The caller persists the state after every transition and before acting on it (see
//! `journal`), which is what makes each phase safe to resume after a crash: `Staging` is
//! resumed from the chunks already verified on disk, `Staged` stays held (its slot is
//! complete and kept), `Switching` re-points the active symlink (an idempotent rename) and
//! completes.
//!
//! The latest accepted command decides where the node is heading: a `Deploy` or `Stage` of
//! another release replaces the target (a held slot becomes garbage), one of the current
//! release drops the target, and a rollback drops it too. Every accepted command consumes
//! its seq, even when there is nothing to do.

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
    /// Held: the slot is complete and durable, and waits for a `Deploy` of the same manifest
    /// to switch to it. Nothing visible has changed.
    Staged,
    /// The slot is complete and durable; the active pointer is being moved to it.
    Switching,
}

/// The deploy (or held stage) in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The command that made this the target.
    pub seq: u64,
    pub installed: Installed,
    pub phase: Phase,
    pub started_at: UnixSeconds,
    /// HTTP(S) base URLs the command listed, tried in order before MQTT; kept so a staging
    /// resumed after a restart uses the same sources.
    #[serde(default)]
    pub http_sources: Vec<String>,
    /// Asked by a `Stage`: once the slot is complete, wait in [`Phase::Staged`] instead of
    /// switching. Absent in journals written before holding existed, which only knew deploys.
    #[serde(default)]
    pub hold: bool,
    /// What staging cost, recorded when the slot was complete, so that the report of a
    /// switch made later (perhaps after a restart) still says what the update fetched.
    #[serde(default)]
    pub staging_cost: Option<StagingCost>,
}

/// The figures of one staging, as they go into the [`UpdateReport`] of the switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagingCost {
    pub bytes_fetched_mqtt: u64,
    pub bytes_fetched_http: u64,
    pub bytes_reused: u64,
    pub chunks_fetched: u64,
    pub chunks_rejected: u64,
    pub staging_ms: u64,
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

/// What the agent should do about an accepted deploy or stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployPlan {
    /// Already running it: nothing to do (any other target was dropped).
    AlreadyCurrent,
    /// A new target: stage it (fetch + assemble, replacing any staging under way), then
    /// switch or hold as the target says.
    Stage(Box<Target>),
    /// The release is already the target: carry on with what is under way (a staging keeps
    /// running, with its hold changed as the command asked; a held slot stays held).
    Continue,
    /// The held slot of the release is complete: switch to it now, with no download. The
    /// target is in [`Phase::Switching`].
    Switch,
}

/// What an accepted command asks of its release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    /// Stage and switch.
    Deploy,
    /// Stage and hold.
    Stage,
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

/// The HTTP(S) chunk sources of a deploy or stage that look usable, in order. The command is signed, so
/// this guards against a coordinator misconfiguration, not an attacker: anything that is not
/// an absolute http(s) URL is left out with a warning, and MQTT remains as the last resort.
pub fn deploy_http_sources(command: &Command) -> Vec<String> {
    let (Action::Deploy { http_sources, .. } | Action::Stage { http_sources, .. }) =
        &command.action
    else {
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

/// The manifest envelope of a deploy or stage action.
pub fn deploy_manifest(command: &Command) -> Option<&Envelope> {
    match &command.action {
        Action::Deploy { manifest, .. } | Action::Stage { manifest, .. } => Some(manifest),
        Action::Rollback {} => None,
    }
}

impl NodeState {
    /// Accepts a verified deploy: consumes its seq and, unless the release is already
    /// current, makes it the target to stage and switch to. A release already staged and
    /// held switches at once ([`DeployPlan::Switch`]); one still staging is no longer held
    /// ([`DeployPlan::Continue`]); any other target is replaced.
    pub fn accept_deploy(
        &mut self,
        seq: u64,
        release: ReleaseId,
        manifest_digest: Digest,
        http_sources: Vec<String>,
        now: UnixSeconds,
    ) -> DeployPlan {
        self.accept(
            Intent::Deploy,
            seq,
            release,
            manifest_digest,
            http_sources,
            now,
        )
    }

    /// Accepts a verified stage: consumes its seq and, unless the release is already
    /// current, makes it the target to stage and hold. The target already being this
    /// release (staging, or held) just continues, held from now on; any other target is
    /// replaced.
    pub fn accept_stage(
        &mut self,
        seq: u64,
        release: ReleaseId,
        manifest_digest: Digest,
        http_sources: Vec<String>,
        now: UnixSeconds,
    ) -> DeployPlan {
        self.accept(
            Intent::Stage,
            seq,
            release,
            manifest_digest,
            http_sources,
            now,
        )
    }

    fn accept(
        &mut self,
        intent: Intent,
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
        if let Some(target) = self
            .target
            .as_mut()
            .filter(|t| t.installed.manifest_digest == manifest_digest)
        {
            return match (target.phase, intent) {
                (Phase::Staging, Intent::Deploy) => {
                    target.hold = false;
                    DeployPlan::Continue
                }
                (Phase::Staging, Intent::Stage) => {
                    target.hold = true;
                    DeployPlan::Continue
                }
                (Phase::Staged, Intent::Deploy) => {
                    target.hold = false;
                    target.phase = Phase::Switching;
                    DeployPlan::Switch
                }
                // Already held, or already past the point where holding could stop it.
                (Phase::Staged, Intent::Stage) | (Phase::Switching, _) => DeployPlan::Continue,
            };
        }
        let target = Target {
            seq,
            installed: Installed::new(release, manifest_digest),
            phase: Phase::Staging,
            started_at: now,
            http_sources,
            hold: intent == Intent::Stage,
            staging_cost: None,
        };
        self.target = Some(target.clone());
        DeployPlan::Stage(Box::new(target))
    }

    /// The target's slot is complete and durable, having cost `cost`: a held target waits
    /// in [`Phase::Staged`], any other moves on to [`Phase::Switching`]. Returns the phase
    /// reached, `None` without a target.
    pub fn staged(&mut self, cost: StagingCost) -> Option<Phase> {
        let target = self.target.as_mut()?;
        if target.phase == Phase::Staging {
            target.phase = if target.hold {
                Phase::Staged
            } else {
                Phase::Switching
            };
            target.staging_cost = Some(cost);
        }
        Some(target.phase)
    }

    /// The held target's slot is gone or damaged (found on a restart or before a switch):
    /// it has to be staged again, keeping whether it is held.
    pub fn restage(&mut self) {
        if let Some(t) = &mut self.target {
            t.phase = Phase::Staging;
            t.staging_cost = None;
        }
    }

    /// The target whose slot is complete, held or being switched to: what the node reports
    /// as staged.
    pub fn staged_target(&self) -> Option<&Target> {
        self.target
            .as_ref()
            .filter(|t| matches!(t.phase, Phase::Staged | Phase::Switching))
    }

    /// Whether fetched chunks may still be needed: only while a slot is being assembled.
    /// Once the target's slot is complete (held or switching) or there is no target, the
    /// fetch store can be cleared.
    pub fn needs_fetched_chunks(&self) -> bool {
        self.target
            .as_ref()
            .is_some_and(|t| t.phase == Phase::Staging)
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

    /// Slot directories that must be kept: current, previous and the target (held or not).
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
            s.staged(StagingCost::default());
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
            assert!(!t.hold);
            assert_eq!(s.staged(StagingCost::default()), Some(Phase::Switching));
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
        s.staged(StagingCost::default());
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
            s.staged(StagingCost::default());
            s.switched(report(v));
        }
        s.accept_deploy(3, release("3"), Digest::of(b"3"), vec![], 0);
        let live: Vec<&str> = s.live_slots().collect();
        assert_eq!(live.len(), 3);
        assert!(live.iter().all(|slot| slot.starts_with("web-")));
    }

    fn command(key: &SigningKey, node: &str, seq: u64, expires_at: u64) -> Vec<u8> {
        signed_command(key, node, seq, expires_at, |manifest| Action::Deploy {
            manifest,
            http_sources: vec![],
        })
    }

    fn signed_command(
        key: &SigningKey,
        node: &str,
        seq: u64,
        expires_at: u64,
        action: impl FnOnce(Envelope) -> Action,
    ) -> Vec<u8> {
        let manifest =
            Envelope::sign_bytes(<Manifest as protocol::Signed>::PAYLOAD_TYPE, b"{}", key);
        let cmd = Command {
            protocol: 1,
            node: NodeId::new(node).unwrap(),
            seq,
            issued_at: 0,
            expires_at,
            action: action(manifest),
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

    fn cost(fetched: u64) -> StagingCost {
        StagingCost {
            bytes_fetched_http: fetched,
            chunks_fetched: 3,
            staging_ms: 250,
            ..StagingCost::default()
        }
    }

    /// A node running web@1 (seq 1).
    fn on_v1() -> NodeState {
        let mut s = NodeState::default();
        s.accept_deploy(1, release("1"), Digest::of(b"1"), vec![], 0);
        s.staged(StagingCost::default());
        s.switched(report("1"));
        s
    }

    /// A node running web@1 with web@2 staged and held (seq 2).
    fn holding_v2() -> NodeState {
        let mut s = on_v1();
        s.accept_stage(2, release("2"), Digest::of(b"2"), vec![], 5);
        assert_eq!(s.staged(cost(1000)), Some(Phase::Staged));
        s
    }

    fn phase(s: &NodeState) -> Option<Phase> {
        s.target.as_ref().map(|t| t.phase)
    }

    #[test]
    fn a_stage_holds_the_complete_slot_instead_of_switching() {
        let mut s = on_v1();
        let DeployPlan::Stage(t) = s.accept_stage(
            2,
            release("2"),
            Digest::of(b"2"),
            vec!["http://c".into()],
            5,
        ) else {
            panic!("a new release is staged");
        };
        assert!(t.hold);
        assert_eq!(t.phase, Phase::Staging);
        assert_eq!(t.http_sources, ["http://c"]);
        assert!(s.needs_fetched_chunks());
        assert_eq!(s.staged_target(), None, "nothing is staged while fetching");

        assert_eq!(s.staged(cost(1000)), Some(Phase::Staged));
        let held = s.staged_target().expect("the held slot is reported");
        assert_eq!(held.installed.release, release("2"));
        assert_eq!(held.staging_cost, Some(cost(1000)));
        assert_eq!(s.current.as_ref().unwrap().release, release("1"));
        assert_eq!(s.last_seq, 2);
        assert!(
            !s.needs_fetched_chunks(),
            "a complete held slot needs no fetched chunks"
        );
        let live: Vec<&str> = s.live_slots().collect();
        assert!(live.contains(&held.installed.slot.as_str()), "{live:?}");
    }

    #[test]
    fn a_deploy_of_the_held_release_switches_at_once_keeping_the_staging_cost() {
        let mut s = holding_v2();
        assert_eq!(
            s.accept_deploy(3, release("2"), Digest::of(b"2"), vec![], 9),
            DeployPlan::Switch
        );
        let t = s.target.clone().expect("still the target");
        assert_eq!(t.phase, Phase::Switching);
        assert!(!t.hold);
        assert_eq!(t.staging_cost, Some(cost(1000)));
        assert_eq!(t.seq, 2, "the target is still the one the stage made");
        assert_eq!(s.last_seq, 3);
        assert!(s.staged_target().is_some(), "reported while switching too");
        s.switched(report("2"));
        assert_eq!(s.current.as_ref().unwrap().release, release("2"));
        assert_eq!(s.previous.as_ref().unwrap().release, release("1"));
        assert_eq!(s.target, None);
    }

    #[test]
    fn a_deploy_while_the_stage_is_still_fetching_lifts_the_hold() {
        let mut s = on_v1();
        s.accept_stage(2, release("2"), Digest::of(b"2"), vec![], 5);
        assert_eq!(
            s.accept_deploy(3, release("2"), Digest::of(b"2"), vec![], 6),
            DeployPlan::Continue
        );
        assert_eq!(s.last_seq, 3);
        assert_eq!(phase(&s), Some(Phase::Staging));
        assert_eq!(s.staged(cost(10)), Some(Phase::Switching));
        assert_eq!(s.target.as_ref().unwrap().staging_cost, Some(cost(10)));
    }

    #[test]
    fn a_stage_while_a_deploy_of_the_same_release_is_fetching_holds_it() {
        let mut s = on_v1();
        s.accept_deploy(2, release("2"), Digest::of(b"2"), vec![], 5);
        assert_eq!(
            s.accept_stage(3, release("2"), Digest::of(b"2"), vec![], 6),
            DeployPlan::Continue
        );
        assert_eq!(s.staged(cost(10)), Some(Phase::Staged));
        assert_eq!(s.last_seq, 3);
    }

    #[test]
    fn staging_the_held_release_again_changes_nothing_but_the_seq() {
        let mut s = holding_v2();
        let before = s.target.clone();
        assert_eq!(
            s.accept_stage(3, release("2"), Digest::of(b"2"), vec![], 9),
            DeployPlan::Continue
        );
        assert_eq!(s.target, before);
        assert_eq!(s.last_seq, 3);
    }

    #[test]
    fn a_stage_of_a_release_being_switched_to_cannot_hold_it_back() {
        let mut s = holding_v2();
        s.accept_deploy(3, release("2"), Digest::of(b"2"), vec![], 9);
        assert_eq!(
            s.accept_stage(4, release("2"), Digest::of(b"2"), vec![], 9),
            DeployPlan::Continue
        );
        assert_eq!(phase(&s), Some(Phase::Switching));
        assert_eq!(s.last_seq, 4);
    }

    #[test]
    fn a_deploy_or_stage_of_another_release_replaces_a_held_target() {
        for stage in [false, true] {
            let mut s = holding_v2();
            let held_slot = s.target.as_ref().unwrap().installed.slot.clone();
            let plan = if stage {
                s.accept_stage(3, release("3"), Digest::of(b"3"), vec![], 9)
            } else {
                s.accept_deploy(3, release("3"), Digest::of(b"3"), vec![], 9)
            };
            let DeployPlan::Stage(t) = plan else {
                panic!("another release is staged from scratch");
            };
            assert_eq!(t.installed.release, release("3"));
            assert_eq!(t.hold, stage);
            assert_eq!(t.staging_cost, None);
            assert_eq!(s.last_seq, 3);
            assert!(
                !s.live_slots().any(|slot| slot == held_slot),
                "the replaced held slot is garbage"
            );
        }
    }

    #[test]
    fn staging_the_current_release_does_nothing_but_consume_the_seq() {
        let mut s = on_v1();
        assert_eq!(
            s.accept_stage(2, release("1"), Digest::of(b"1"), vec![], 5),
            DeployPlan::AlreadyCurrent
        );
        assert_eq!(s.last_seq, 2);
        assert_eq!(s.target, None);
        assert_eq!(s.previous, None);
        assert_eq!(s.current.as_ref().unwrap().release, release("1"));
    }

    #[test]
    fn a_command_for_the_current_release_drops_a_held_target() {
        // The latest command says where the node is heading: staying on web@1.
        let mut s = holding_v2();
        assert_eq!(
            s.accept_stage(3, release("1"), Digest::of(b"1"), vec![], 9),
            DeployPlan::AlreadyCurrent
        );
        assert_eq!(s.target, None);
        assert_eq!(s.last_seq, 3);
    }

    #[test]
    fn a_rollback_drops_a_held_target() {
        let mut s = holding_v2();
        // Give the node a previous version to return to, then hold web@3.
        s.accept_deploy(3, release("2"), Digest::of(b"2"), vec![], 9);
        s.switched(report("2"));
        s.accept_stage(4, release("3"), Digest::of(b"3"), vec![], 9);
        s.staged(cost(1));
        s.roll_back(Some(5)).expect("has a previous version");
        assert_eq!(s.target, None);
        assert_eq!(s.current.as_ref().unwrap().release, release("1"));
        assert_eq!(s.last_seq, 5);
    }

    #[test]
    fn a_lost_held_slot_is_staged_again_and_still_held() {
        let mut s = holding_v2();
        s.restage();
        assert_eq!(phase(&s), Some(Phase::Staging));
        assert!(s.target.as_ref().unwrap().hold);
        assert_eq!(s.target.as_ref().unwrap().staging_cost, None);
        assert!(s.needs_fetched_chunks());
        assert_eq!(s.staged(cost(7)), Some(Phase::Staged));
    }

    #[test]
    fn a_failed_staging_drops_a_held_target() {
        let mut s = on_v1();
        s.accept_stage(2, release("2"), Digest::of(b"2"), vec![], 5);
        s.failed(UpdateReport {
            outcome: Outcome::Failed {
                reason: "disk full".into(),
            },
            ..report("2")
        });
        assert_eq!(s.target, None);
        assert_eq!(s.current.as_ref().unwrap().release, release("1"));
    }

    #[test]
    fn a_held_target_survives_the_journal_round_trip() {
        let s = holding_v2();
        let bytes = serde_json::to_vec(&s).unwrap();
        let back: NodeState = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, s);
        assert_eq!(phase(&back), Some(Phase::Staged));
    }

    #[test]
    fn journals_written_before_holding_existed_still_load() {
        let digest = Digest::of(b"2");
        let old = format!(
            r#"{{"last_seq":2,"current":null,"previous":null,"target":{{"seq":2,"installed":{{"release":{{"app":"web","version":"2"}},"manifest_digest":"{digest}","slot":"web-2-x"}},"phase":"Switching","started_at":5,"http_sources":[]}},"last_update":null}}"#
        );
        let s: NodeState = serde_json::from_str(&old).unwrap();
        let t = s.target.expect("the target is kept");
        assert_eq!(t.phase, Phase::Switching);
        assert!(!t.hold, "old targets were deploys");
        assert_eq!(t.staging_cost, None);
    }

    #[test]
    fn a_replayed_stage_is_refused_and_a_deploy_above_it_is_accepted() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let trust = TrustedKeys::new([key.verifying_key()]);
        let me = NodeId::new("n1").unwrap();
        let stage = |seq| {
            signed_command(&key, "n1", seq, 100, |manifest| Action::Stage {
                manifest,
                http_sources: vec!["http://mirror/".into(), "ftp://nope".into()],
            })
        };
        let opened = open_command(&stage(2), &trust, &me, 1, 50).expect("fresh stage");
        assert_eq!(opened.action.name(), "stage");
        assert!(deploy_manifest(&opened).is_some());
        assert_eq!(deploy_http_sources(&opened), ["http://mirror"]);

        let mut s = on_v1();
        s.accept_stage(opened.seq, release("2"), Digest::of(b"2"), vec![], 5);
        // The retained stage comes back at every reconnect: a replay, never a second stage.
        assert!(matches!(
            open_command(&stage(2), &trust, &me, s.last_seq, 50),
            Err(Refusal::Replay {
                seq: 2,
                last_seq: 2
            })
        ));
        assert!(open_command(&command(&key, "n1", 3, 100), &trust, &me, s.last_seq, 50).is_ok());
    }
}
