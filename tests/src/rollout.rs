//! Staged rollouts from a test: start one with plan flags, read and wait for its status, read
//! the deploy log, and count what every node did from its events.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use protocol::messages::{Event, EventKind};
use protocol::{NodeId, NodeTopic, ReleaseId};
use serde_json::Value;

use crate::fleet::Fleet;
use crate::mqtt::TestClient;

impl Fleet {
    /// `coordinator rollout start --app APP --version VER FLAGS… --json`, parsed; returns the
    /// rollout's id with the answer.
    pub fn rollout_with(&self, app: &str, version: &str, flags: &[&str]) -> Result<(u64, Value)> {
        let mut args = vec!["rollout", "start", "--app", app, "--version", version];
        args.extend_from_slice(flags);
        args.push("--json");
        let out = self.cli(&args)?;
        let answer: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`rollout start --json` printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        let id = answer["rollout"]
            .as_u64()
            .with_context(|| format!("no rollout id in {answer}"))?;
        Ok((id, answer))
    }

    /// `coordinator rollout status ID --json`, parsed.
    pub fn rollout_status(&self, id: u64) -> Result<Value> {
        let out = self.cli(&["rollout", "status", &id.to_string(), "--json"])?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`rollout status --json` printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Polls `rollout status ID` until `ready` holds; returns that status.
    pub fn wait_rollout(
        &self,
        id: u64,
        timeout: Duration,
        what: &str,
        ready: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let mut last = Value::Null;
        let found = self.wait_for(timeout, format_args!("rollout {id}: {what}"), || {
            let status = self.rollout_status(id)?;
            if ready(&status) {
                return Ok(Some(status));
            }
            last = status;
            Ok(None)
        });
        found.with_context(|| format!("the last status of rollout {id}: {last:#}"))
    }

    /// Waits until rollout `id` is no longer running or paused; returns its status.
    pub fn wait_rollout_ended(&self, id: u64, timeout: Duration) -> Result<Value> {
        self.wait_rollout(id, timeout, "to end", |s| {
            !matches!(s["status"].as_str(), Some("running" | "paused"))
        })
    }

    /// The deploy log (`coordinator log --json`), oldest first.
    pub fn deploy_log(&self) -> Result<Vec<Value>> {
        let out = self.cli(&["log", "--json"])?;
        let log: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "`log --json` printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        match log {
            Value::Array(entries) => Ok(entries),
            other => bail!("`log --json` is not a list: {other}"),
        }
    }

    /// The log entries a rollout wrote (target `rollout ID`), oldest first.
    pub fn rollout_log(&self, id: u64) -> Result<Vec<Value>> {
        let target = format!("rollout {id}");
        Ok(self
            .deploy_log()?
            .into_iter()
            .filter(|e| e["target"].as_str() == Some(target.as_str()))
            .collect())
    }

    /// A test MQTT client subscribed to every node's events, to see what nodes did.
    pub fn watch_events(&self) -> Result<EventWatch> {
        let mut client = self.mqtt_client()?;
        client.subscribe(&self.topics().all_nodes(NodeTopic::Events))?;
        Ok(EventWatch {
            client,
            events: Vec::new(),
        })
    }
}

/// Node events in the order the broker delivered them.
pub struct EventWatch {
    client: TestClient,
    events: Vec<Event>,
}

impl EventWatch {
    /// Takes in every event that arrives within `quiet` of the one before.
    pub fn drain(&mut self, quiet: Duration) -> Result<&[Event]> {
        while let Some(message) = self.client.next_message(quiet, |_| true)? {
            if let Ok(event) = serde_json::from_slice::<Event>(&message.payload) {
                self.events.push(event);
            }
        }
        Ok(&self.events)
    }

    /// How many times each node switched to `release`, from the events drained so far.
    pub fn switches_to(&self, release: &ReleaseId) -> BTreeMap<NodeId, usize> {
        let mut counts = BTreeMap::new();
        for event in &self.events {
            if matches!(&event.kind, EventKind::Switched { release: r, .. } if r == release) {
                *counts.entry(event.node.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The position (in delivery order) of each node's first event of `kind` for `release`.
    pub fn first(&self, release: &ReleaseId, kind: &str) -> BTreeMap<NodeId, usize> {
        let mut at = BTreeMap::new();
        for (i, event) in self.events.iter().enumerate() {
            let matches = match (&event.kind, kind) {
                (EventKind::StagingStarted { release: r }, "staging") => r == release,
                (EventKind::Switched { release: r, .. }, "switched") => r == release,
                _ => false,
            };
            if matches {
                at.entry(event.node.clone()).or_insert(i);
            }
        }
        at
    }
}
