//! Command-line interface: raw arguments, validated into a [`Config`] before anything starts,
//! and the `status` command, which reads the snapshot a running (or stopped) agent left.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use protocol::messages::{NodeState, Outcome};
use protocol::{BrokerAddr, NodeId, Topics, TrustedKeys};

use crate::daemon::Config;

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
    let slot = |s: &Option<protocol::messages::SlotReport>| match s {
        Some(s) => format!("{}  ({})", s.release, s.slot_dir),
        None => "-".to_owned(),
    };
    println!("node      {}", state.node);
    println!("current   {}", slot(&state.current));
    println!("previous  {}", slot(&state.previous));
    println!("staged    {}", slot(&state.staged));
    if let Some(p) = &state.staging {
        println!(
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
        println!("last      {}  {outcome}", u.release);
        println!(
            "          fetched {} B over MQTT, {} B over HTTP, reused {} B locally, {} chunks ({} rejected); staging {} ms, switch {} ms",
            u.bytes_fetched_mqtt, u.bytes_fetched_http, u.bytes_reused, u.chunks_fetched, u.chunks_rejected, u.staging_ms, u.switch_ms
        );
    }
    Ok(())
}
