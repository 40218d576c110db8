//! The command line: the operator contract of SPEC.md "Operator interface".
//!
//! Parsing only; nothing here touches the disk or the network. Flag names are a contract
//! (the whole-system tests and operators' scripts use them): rename nothing.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Publishes releases, drives rollouts, keeps the fleet inventory and serves chunks"
)]
pub struct Cli {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// How client commands find and authenticate to a running `coordinator serve`.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the coordinator's HTTP API (client commands)
    #[arg(long, global = true, default_value = "http://127.0.0.1:7070")]
    pub server: String,
    /// API token (client commands); `coordinator serve` writes the admin token to DATA/admin.token
    #[arg(long, global = true, env = "COORDINATOR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a signing key (DIR/signing.key) and the trust file for agents (DIR/trust.json)
    Keygen {
        /// Directory to write the keys to; existing keys are never overwritten
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the coordinator: HTTP API, chunk server, inventory; embeds an MQTT broker by default
    Serve(ServeArgs),
    /// Publish and list releases
    Release {
        #[command(subcommand)]
        command: ReleaseCommand,
    },
    /// Roll a release out to the fleet
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Act on single nodes
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Show the fleet inventory: versions, last update, last seen
    Nodes {
        /// Print the API's JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show chunk-delivery counters since the coordinator started (MQTT frames, chunk requests
    /// and fan-out dedup, HTTP chunks served)
    Stats {
        /// Print the API's JSON (GET /api/stats) instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Data directory: database, chunk store, admin token (created if missing)
    #[arg(long)]
    pub data: PathBuf,
    /// Directory holding signing.key (from `coordinator keygen`)
    #[arg(long)]
    pub keys: PathBuf,
    /// `embedded` to run the built-in MQTT broker, or `mqtt://HOST:PORT` for an external one
    #[arg(long, default_value = "embedded")]
    pub broker: String,
    /// Address the embedded broker listens on
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt_listen: SocketAddr,
    /// Address of the HTTP API and chunk server
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub http: SocketAddr,
    /// First level(s) of every MQTT topic
    #[arg(long, default_value = protocol::topics::DEFAULT_PREFIX)]
    pub topic_prefix: String,
    /// URL agents fetch chunks from (`{URL}/chunks/{digest}`); defaults to http://<--http>
    #[arg(long)]
    pub public_url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Build a release image from a directory and publish it (uploads only missing chunks)
    #[command(after_long_help = PUBLISH_LONG_HELP)]
    Publish {
        /// Directory holding the release's files, and optionally SRC_DIR/release.toml saying
        /// how the release runs (see "release.toml" in --help)
        src_dir: PathBuf,
        #[arg(long)]
        app: String,
        #[arg(long)]
        version: String,
        #[arg(long, value_enum, default_value_t = Kind::App)]
        kind: Kind,
        /// Base URL of a static mirror or CDN serving this release's chunks at
        /// URL/chunks/DIGEST, exactly as `GET /chunks/DIGEST` of the coordinator does
        /// (repeatable; agents try mirrors in the order given, then the coordinator, then MQTT).
        /// Publishing the same content again replaces the list (see "Mirrors" in --help)
        #[arg(long = "mirror", value_name = "URL")]
        mirrors: Vec<String>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// List published releases with their mirrors
    List {
        /// Print the API's JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

const PUBLISH_LONG_HELP: &str = "\
release.toml:
  If SRC_DIR/release.toml exists, its [run] table says how the release runs on a node and is
  signed into the manifest (the file also ships as a file of the release). No file, or no
  [run] table, is a files-only release: the switch flips the pointer and runs nothing.
  Unknown keys are refused. Example:

    [run]
    command = \"bin/server\"          # a program in the release, or an absolute path
    args = [\"--verbose\"]
    env = { RUST_LOG = \"info\" }
    port_env = \"PORT\"               # carries the private port the agent assigns
    start_timeout_secs = 30
    probation_secs = 10
    grace_secs = 30
    stop_timeout_secs = 10
    [run.health]                      # at most one of http, tcp, command; none: TCP connect
    http = \"/healthz\"
    interval_ms = 500
    timeout_ms = 2000
    [run.front_door]                  # exactly one of [run.front_door] and [run.hooks]
    listen = \"0.0.0.0:8080\"

Mirrors:
  A release's mirrors are not part of its signed manifest: they only say where agents may
  fetch chunks (every chunk is verified against the manifest whatever its source). So
  publishing a release again with the same content is allowed and replaces its mirror list
  with the --mirror flags given this time, in their order (no --mirror clears the list).
  Rollouts started afterwards send the new list; nodes already sent a command keep the list
  it carried until they are sent a new one (`coordinator rollout start`). A different content
  under the same app and version is refused: publish a new version.";

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Send nodes back to their previous version at once, with no download. All or nothing:
    /// if a node is unknown or has no previous version, no node is sent anything
    Rollback {
        /// Node ids, as `coordinator nodes` lists them
        #[arg(required = true, value_name = "NODE")]
        nodes: Vec<String>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Send a published release to every node in the inventory
    Start {
        #[arg(long)]
        app: String,
        #[arg(long)]
        version: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    App,
    Content,
}

impl From<Kind> for protocol::ReleaseKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::App => protocol::ReleaseKind::App,
            Kind::Content => protocol::ReleaseKind::Content,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn client_flags_are_accepted_before_and_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "coordinator",
            "--server",
            "http://a:1",
            "release",
            "publish",
            "src",
            "--app",
            "web",
            "--version",
            "2",
            "--token",
            "t",
        ])
        .expect("parses");
        assert_eq!(cli.client.server, "http://a:1");
        assert_eq!(cli.client.token.as_deref(), Some("t"));
    }

    #[test]
    fn the_release_toml_example_in_the_help_is_a_valid_file() {
        let example = PUBLISH_LONG_HELP
            .split_once("Example:\n")
            .and_then(|(_, rest)| rest.split_once("\nMirrors:"))
            .map(|(example, _)| example)
            .expect("the help has the example before Mirrors");
        let text: String = example
            .lines()
            .map(|line| format!("{}\n", line.trim_start()))
            .collect();
        let file = crate::release_file::parse(std::path::Path::new("help"), &text)
            .expect("the example parses and validates");
        assert_eq!(file.run.expect("a run section").command, "bin/server");
    }

    #[test]
    fn node_rollback_takes_one_or_more_nodes() {
        let cli = Cli::try_parse_from(["coordinator", "node", "rollback", "n1", "n2", "--json"])
            .expect("parses");
        let Command::Node {
            command: NodeCommand::Rollback { nodes, json },
        } = cli.command
        else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(
            (nodes.as_slice(), json),
            (["n1".to_owned(), "n2".to_owned()].as_slice(), true)
        );
        assert!(Cli::try_parse_from(["coordinator", "node", "rollback"]).is_err());
    }
}
