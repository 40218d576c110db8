//! The command line: the operator contract of SPEC.md "Operator interface".
//!
//! Parsing only; nothing here touches the disk or the network. Flag names are a contract
//! (the whole-system tests and operators' scripts use them): rename nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Canary judgments of rollouts
    Canary {
        #[command(subcommand)]
        command: CanaryCommand,
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
    /// Show the health samples agents reported (one row per sample), or with `drops` the
    /// metric input the coordinator refused, per node and reason
    Metrics(MetricsArgs),
    /// Create, list and revoke operator API tokens, each a separate identity in the deploy log
    /// (create and revoke need the admin token, DATA/admin.token)
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Show the deploy log: when, who (the token's identity), what, to which nodes, the outcome
    Log {
        /// Only entries from this long ago on, e.g. 30m, 12h, 7d (default: the whole log)
        #[arg(long, value_name = "DURATION", value_parser = protocol::parse_duration)]
        since: Option<Duration>,
        /// Print the API's JSON (GET /api/log) instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a named token and print its secret (shown this once; the coordinator keeps only
    /// a hash)
    Create {
        /// 1 to 64 of A-Z a-z 0-9 . _ - (not `admin` or `coordinator`)
        name: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// List the named tokens: who created them when, and whether they are revoked (no secrets)
    List {
        /// Print the API's JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Revoke a named token: its secret is refused (HTTP 401) from then on
    Revoke {
        name: String,
        /// Print the result as JSON
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
    /// How long health samples are kept, e.g. 12h, 7d (older ones are pruned every minute,
    /// and refused on arrival)
    #[arg(long, value_name = "DURATION", default_value = crate::metrics::DEFAULT_RETENTION, value_parser = protocol::parse_duration)]
    pub metrics_retention: Duration,
}

/// `coordinator metrics`: samples by default, or a subcommand.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MetricsArgs {
    #[command(subcommand)]
    pub command: Option<MetricsCommand>,
    #[command(flatten)]
    pub query: MetricsQueryArgs,
}

#[derive(Debug, Subcommand)]
pub enum MetricsCommand {
    /// Metric input refused since the coordinator started, per node and reason (unknown node,
    /// malformed, oversized, bad timestamp, bad values, …), and what each agent dropped
    Drops {
        /// Print the API's JSON (GET /api/metrics/drops) instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct MetricsQueryArgs {
    /// Only this node (repeatable)
    #[arg(long = "node", value_name = "NODE")]
    pub nodes: Vec<String>,
    /// Only samples taken while this release served traffic
    #[arg(long, value_name = "APP@VERSION")]
    pub version: Option<String>,
    /// How far back, e.g. 30s, 10m, 2h
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = protocol::parse_duration)]
    pub since: Duration,
    /// Print the API's JSON (GET /api/metrics) instead of a table
    #[arg(long)]
    pub json: bool,
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
    /// Roll a published release out in waves: each wave stages on all its nodes, then
    /// switches them (at most --max-parallel at a time, inside the --window spans), bakes and
    /// passes its gates (failure thresholds; after the first wave, the canary judgment)
    /// before the next wave starts. Flags not given come from the release's release.toml
    /// [rollout] section, then the built-in defaults (one wave of 100%, no bake)
    #[command(after_long_help = ROLLOUT_LONG_HELP)]
    Start(Box<RolloutStartArgs>),
    /// Show rollouts: progress per wave (staged, switched, failed), bake time left, gate
    /// results. Without ID: the running ones, else the latest
    Status {
        /// The rollout's number, as `rollout start` printed it
        id: Option<u64>,
        /// Keep watching until the rollout ends: a live progress display in a terminal, one
        /// line per change when piped. Exits non-zero if it does not succeed
        #[arg(long)]
        watch: bool,
        /// Print the API's JSON instead of text
        #[arg(long, conflicts_with = "watch")]
        json: bool,
    },
    /// Pause a running rollout: no new commands are sent; switches in flight finish
    Pause(RolloutIdArgs),
    /// Resume a paused rollout (after a marginal canary: accept it and go on)
    Resume(RolloutIdArgs),
    /// Stop a rollout where it is; nodes keep what they run
    Abort(RolloutIdArgs),
    /// Stop a rollout and send every node it switched (and that still runs the release) back
    /// to its previous version
    Rollback(RolloutIdArgs),
}

#[derive(Debug, Args)]
pub struct RolloutIdArgs {
    /// The rollout's number, as `rollout start` printed it
    pub id: u64,
    /// Print the rollout as JSON afterwards
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RolloutStartArgs {
    #[arg(long)]
    pub app: String,
    #[arg(long)]
    pub version: String,
    /// Only nodes whose labels hold every pair (repeatable; default: every node)
    #[arg(long = "select", value_name = "K=V,...")]
    pub select: Vec<String>,
    /// Cumulative wave targets: node counts or percentages of the selection, ending with 100%
    #[arg(long, value_name = "1,5%,25%,100%")]
    pub waves: Option<String>,
    /// How long each wave runs on the new version before its gates are checked, e.g. 10m
    #[arg(long, value_name = "DURATION")]
    pub bake: Option<String>,
    /// Most nodes switching at the same time (default: no limit)
    #[arg(long, value_name = "N")]
    pub max_parallel: Option<u32>,
    /// Halt when more than N nodes have failed (default: 0, unless --max-failure-pct is given)
    #[arg(long, value_name = "N")]
    pub max_failures: Option<u32>,
    /// Halt when more than P percent of the nodes reached so far have failed
    #[arg(long, value_name = "P")]
    pub max_failure_pct: Option<f64>,
    /// Switch only inside this daily UTC span (repeatable; staging happens at any time)
    #[arg(long = "window", value_name = "HH:MM-HH:MM")]
    pub windows: Vec<String>,
    /// How long a node may take to stage or switch, and how long an offline node is waited
    /// for, before it is given up (default: 10m)
    #[arg(long, value_name = "DURATION")]
    pub node_deadline: Option<String>,
    /// What a node given up while offline counts as: skip (not a failure) or fail
    #[arg(long, value_name = "skip|fail", value_parser = ["skip", "fail"])]
    pub offline: Option<String>,
    /// Do not roll back switched nodes when a gate fails (the rollout halts; nodes keep what
    /// they run)
    #[arg(long)]
    pub no_auto_rollback: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum CanaryCommand {
    /// Show a rollout's canary judgment: score and verdict, then each metric with its
    /// classification, canary/baseline ratio, bounds, means and sample counts, hottest first
    /// (computed now while the first wave bakes; the gate's judgment once it has judged)
    Report {
        /// The rollout's number
        rollout: u64,
        /// Print the API's JSON instead of text
        #[arg(long)]
        json: bool,
    },
}

const ROLLOUT_LONG_HELP: &str = "\
Waves:
  Each wave is a cumulative target over the selected nodes: a count (1) or a percentage
  (25%), increasing, the last 100%. `--waves 1,10%,100%` on 50 nodes: 1 node, then 4 more,
  then the other 45. Nodes are put in waves by a stable hash of app and node id, so a node
  keeps its place across rollouts of the app.

Gates (after each wave's bake):
  failures: more failed nodes than --max-failures (or more than --max-failure-pct of the
            nodes reached so far) halts the rollout at once, bake or not
  canary:   after the first wave (when more waves follow), its nodes' health metrics are
            judged against baseline nodes still on the old version (release.toml [canary]
            sets the window and thresholds). Fail halts; marginal pauses for a human
            (`rollout resume` accepts it, `rollout rollback` undoes)
  A halted rollout rolls back every node it switched unless --no-auto-rollback.

release.toml defaults (flags win):
    [rollout]
    waves = [1, \"10%\", \"50%\", \"100%\"]
    bake = \"10m\"
    max_parallel = 50
    max_failures = 2
    max_failure_pct = 5.0
    windows = [\"22:00-06:00\"]
    node_deadline = \"15m\"
    offline = \"skip\"
    auto_rollback = true";

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

    /// A `release.toml` example indented in a help text, parsed and validated.
    fn parse_help_example(example: &str) -> crate::release_file::ReleaseFile {
        let text: String = example
            .lines()
            .map(|line| format!("{}\n", line.trim_start()))
            .collect();
        crate::release_file::parse(std::path::Path::new("help"), &text)
            .expect("the example parses and validates")
    }

    #[test]
    fn the_release_toml_example_in_the_help_is_a_valid_file() {
        let example = PUBLISH_LONG_HELP
            .split_once("Example:\n")
            .and_then(|(_, rest)| rest.split_once("\nMirrors:"))
            .map(|(example, _)| example)
            .expect("the help has the example before Mirrors");
        let file = parse_help_example(example);
        assert_eq!(file.run.expect("a run section").command, "bin/server");
    }

    #[test]
    fn the_rollout_defaults_example_in_the_help_is_a_valid_release_file() {
        let example = ROLLOUT_LONG_HELP
            .split_once("release.toml defaults (flags win):\n")
            .map(|(_, rest)| rest)
            .expect("the help has the example");
        let file = parse_help_example(example);
        assert_eq!(file.rollout.and_then(|r| r.waves).map(|w| w.len()), Some(4));
    }

    #[test]
    fn rollout_start_takes_the_plan_flags() {
        let cli = Cli::try_parse_from([
            "coordinator",
            "rollout",
            "start",
            "--app",
            "web",
            "--version",
            "2",
            "--select",
            "region=eu",
            "--waves",
            "1,30%,100%",
            "--bake",
            "2s",
            "--window",
            "22:00-06:00",
            "--window",
            "12:00-13:00",
            "--offline",
            "fail",
            "--no-auto-rollback",
        ])
        .expect("parses");
        let Command::Rollout {
            command: RolloutCommand::Start(args),
        } = cli.command
        else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(args.windows.len(), 2);
        assert_eq!(args.offline.as_deref(), Some("fail"));
        assert!(args.no_auto_rollback);
        assert!(Cli::try_parse_from([
            "coordinator",
            "rollout",
            "start",
            "--app",
            "w",
            "--version",
            "1",
            "--offline",
            "maybe"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["coordinator", "rollout", "status", "3", "--watch"]).is_ok());
        assert!(Cli::try_parse_from(["coordinator", "canary", "report", "3", "--json"]).is_ok());
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

    #[test]
    fn metrics_shows_samples_by_default_and_drops_as_a_subcommand() {
        let cli = Cli::try_parse_from([
            "coordinator",
            "metrics",
            "--node",
            "n1",
            "--node",
            "n2",
            "--version",
            "web@2",
            "--since",
            "1h",
        ])
        .expect("parses");
        let Command::Metrics(MetricsArgs {
            command: None,
            query,
        }) = cli.command
        else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(query.nodes, ["n1", "n2"]);
        assert_eq!(query.version.as_deref(), Some("web@2"));
        assert_eq!(query.since, Duration::from_secs(3600));
        let cli =
            Cli::try_parse_from(["coordinator", "metrics", "drops", "--json"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Metrics(MetricsArgs {
                command: Some(MetricsCommand::Drops { json: true }),
                ..
            })
        ));
        assert!(Cli::try_parse_from(["coordinator", "metrics", "--since", "soon"]).is_err());
        let serve = Cli::try_parse_from(["coordinator", "serve", "--data", "d", "--keys", "k"])
            .expect("parses");
        let Command::Serve(args) = serve.command else {
            panic!("parsed as {:?}", serve.command);
        };
        assert_eq!(args.metrics_retention, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn log_since_takes_an_operator_duration_and_refuses_anything_else() {
        let cli =
            Cli::try_parse_from(["coordinator", "log", "--since", "2h", "--json"]).expect("parses");
        let Command::Log { since, json } = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!((since, json), (Some(Duration::from_secs(7200)), true));
        let error = Cli::try_parse_from(["coordinator", "log", "--since", "yesterday"])
            .expect_err("accepted");
        assert!(error.to_string().contains("e.g. 500ms, 30s"), "{error}");
    }
}
