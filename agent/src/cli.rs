//! Command-line interface: raw arguments, validated into a [`Config`] before anything starts,
//! and the `status` command, which reads the snapshot a running (or stopped) agent left.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use protocol::messages::{NodeState, Outcome};
use protocol::{BrokerAddr, NodeId, Topics, TrustedKeys};

use crate::daemon::Config;
use crate::telemetry;

#[derive(Parser)]
#[command(
    name = "agent",
    version,
    about = "Deploy agent for an edge node: stages, verifies and switches signed releases."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the agent: connect to the broker and follow the coordinator's signed commands.
    Run(RunArgs),
    /// Show the current, previous and staged versions and the last update.
    Status(StatusArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// Directory for the journal, the slots and fetched chunks.
    #[arg(long)]
    pub data: PathBuf,
    /// This node's identity (MQTT client id and topic level).
    #[arg(long)]
    pub node_id: String,
    /// Broker URL, mqtt://HOST:PORT.
    #[arg(long)]
    pub broker: String,
    /// The trust.json written by `coordinator keygen`.
    #[arg(long)]
    pub trust: PathBuf,
    /// A label for rollout selection, KEY=VALUE; repeatable.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Topic prefix shared with the coordinator.
    #[arg(long, default_value = protocol::topics::DEFAULT_PREFIX)]
    pub topic_prefix: String,
    /// Cap on fetch bandwidth, in bytes per second.
    #[arg(long)]
    pub max_fetch_rate: Option<u64>,
    /// Ignore the HTTP(S) chunk sources a release lists and fetch over MQTT only (for nodes
    /// that can reach the broker but not the coordinator's or mirrors' HTTP).
    #[arg(long)]
    pub no_http: bool,
    /// How often to take a health sample (host metrics, and the serving version's own
    /// metrics when its release sets `metrics_path`): a whole number with a unit, e.g. 10s,
    /// 1m. At least 200ms (values under a second are meant for tests).
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub metrics_interval: String,
    /// How many samples to keep on disk while the coordinator cannot be reached; when full,
    /// the oldest are dropped (and counted). The default is a day at 10-second samples.
    #[arg(long, default_value_t = crate::telemetry::DEFAULT_BUFFER, value_name = "SAMPLES")]
    pub metrics_buffer: u64,
}

#[derive(Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub data: PathBuf,
    /// Print the state as JSON.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    pub fn validate(self) -> anyhow::Result<Config> {
        let node = NodeId::new(&self.node_id)?;
        let broker = BrokerAddr::parse(&self.broker)?;
        let trust_bytes = std::fs::read(&self.trust)
            .with_context(|| format!("cannot read the trust file {}", self.trust.display()))?;
        let trust = TrustedKeys::from_json(&trust_bytes)
            .with_context(|| format!("trust file {} is invalid", self.trust.display()))?;
        let mut labels = BTreeMap::new();
        for label in &self.labels {
            let Some((key, value)) = label.split_once('=') else {
                bail!("label {label:?} is not KEY=VALUE");
            };
            if key.is_empty()
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                bail!("label key {key:?} must be letters, digits, '.', '_' or '-'");
            }
            labels.insert(key.to_owned(), value.to_owned());
        }
        let topics = Topics::new(&self.topic_prefix)?;
        if self.max_fetch_rate == Some(0) {
            bail!("--max-fetch-rate must be above 0 bytes per second");
        }
        let metrics_interval =
            protocol::parse_duration(&self.metrics_interval).context("--metrics-interval")?;
        if metrics_interval < telemetry::MIN_INTERVAL {
            bail!(
                "--metrics-interval {} is too short: at least {}",
                self.metrics_interval,
                protocol::human_duration(telemetry::MIN_INTERVAL)
            );
        }
        if !(1..=telemetry::MAX_BUFFER).contains(&self.metrics_buffer) {
            bail!(
                "--metrics-buffer must be between 1 and {} samples",
                telemetry::MAX_BUFFER
            );
        }
        std::fs::create_dir_all(&self.data)
            .with_context(|| format!("cannot create the data directory {}", self.data.display()))?;
        Ok(Config {
            data_dir: self.data,
            node,
            broker,
            trust,
            labels,
            topics,
            max_fetch_rate: self.max_fetch_rate,
            use_http: !self.no_http,
            telemetry: telemetry::Settings {
                interval: metrics_interval,
                buffer_capacity: self.metrics_buffer,
            },
        })
    }
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let path = args.data.join("status.json");
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "no status at {}: has `agent run --data {}` ever started?",
            path.display(),
            args.data.display()
        )
    })?;
    let state: NodeState = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a valid status", path.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&state)?);
        return Ok(());
    }
    print!("{}", render(&state));
    Ok(())
}

/// The table `agent status` prints: one line per version the node has (current, previous,
/// and a complete slot staged for the next switch), the staging under way and the last
/// update.
fn render(state: &NodeState) -> String {
    use std::fmt::Write as _;
    let slot = |s: &Option<protocol::messages::SlotReport>| match s {
        Some(s) => format!("{}  ({})", s.release, s.slot_dir),
        None => "-".to_owned(),
    };
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "node      {}", state.node);
    let _ = writeln!(out, "current   {}", slot(&state.current));
    let _ = writeln!(out, "previous  {}", slot(&state.previous));
    let _ = writeln!(out, "staged    {}", slot(&state.staged));
    if let Some(p) = &state.staging {
        let _ = writeln!(
            out,
            "staging   {}  {}/{} chunks, {}/{} bytes",
            p.release, p.chunks_have, p.chunks_total, p.bytes_have, p.bytes_total
        );
    }
    if let Some(u) = &state.last_update {
        let outcome = match &u.outcome {
            Outcome::Switched => "switched".to_owned(),
            Outcome::Failed { reason } => format!("failed: {reason}"),
            Outcome::RolledBack { reason } => format!("rolled back: {reason}"),
        };
        let _ = writeln!(out, "last      {}  {outcome}", u.release);
        let _ = writeln!(
            out,
            "          fetched {} B over MQTT, {} B over HTTP, reused {} B locally, {} chunks ({} rejected); staging {} ms, switch {} ms",
            u.bytes_fetched_mqtt, u.bytes_fetched_http, u.bytes_reused, u.chunks_fetched, u.chunks_rejected, u.staging_ms, u.switch_ms
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::messages::SlotReport;
    use protocol::{AppName, Digest, ReleaseId, Version};

    fn slot(version: &str) -> SlotReport {
        SlotReport {
            release: ReleaseId::new(AppName::new("web").unwrap(), Version::new(version).unwrap()),
            manifest_digest: Digest::of(version.as_bytes()),
            slot_dir: format!("/data/slots/web-{version}"),
        }
    }

    #[test]
    fn status_shows_the_held_release_beside_the_current_one() {
        let state = NodeState {
            protocol: protocol::PROTOCOL_VERSION,
            node: NodeId::new("n1").unwrap(),
            labels: BTreeMap::new(),
            agent_version: "0".into(),
            current: Some(slot("1")),
            previous: None,
            staged: Some(slot("2")),
            staging: None,
            last_update: None,
            last_seq: 2,
            reported_at: 0,
        };
        let table = render(&state);
        assert!(
            table.contains("current   web@1  (/data/slots/web-1)"),
            "{table}"
        );
        assert!(
            table.contains("staged    web@2  (/data/slots/web-2)"),
            "{table}"
        );
        let nothing_staged = render(&NodeState {
            staged: None,
            ..state
        });
        assert!(nothing_staged.contains("staged    -"), "{nothing_staged}");
    }
}
