//! The coordinator: publishes releases, drives rollouts, keeps the fleet inventory, serves
//! chunks over HTTP and MQTT, and embeds an MQTT broker for the single-machine default.
//!
//! Code map:
//! - [`cli`]: the command line (the operator contract); [`run`] dispatches it.
//! - [`keys`], [`token`]: the release signing key and the admin API token on disk;
//!   [`tokens`]: the named operator tokens (hashes only), each an identity in the deploy log.
//! - [`config`]: `serve`'s flags validated and its on-disk state opened, before any bind.
//! - [`serve`]: start-up and shutdown order of the daemon.
//! - [`db`]: the sled trees and what each holds; [`release`]: pure release/command rules;
//!   [`release_file`]: the operator's `release.toml` (how a release runs), read at publish.
//! - [`server`]: the HTTP API and chunk server; [`api`]: its JSON bodies.
//! - [`rollout`]: staged rollouts: plans, the pure engine, the driver task that runs them,
//!   their storage, endpoints and the canary gate and report.
//! - [`stats`]: chunk-delivery counters shared by the server and the main loop.
//! - [`metrics`]: agents' health samples: the checks every batch passes, the store (by time,
//!   with retention), counters of what was refused, the ingester task, `/api/metrics*`.
//! - [`main_loop`]: the one event loop over MQTT, HTTP requests and chunk reads;
//!   [`mqtt`]: the rumqttc link task; [`broker`]: the embedded MQTT broker; [`fanout`]: chunk dedup.
//! - [`client`]: the client commands against a running coordinator.
//!
//! **Architecture invariant**: only [`main_loop`] publishes to MQTT, and it never awaits the
//! MQTT client. Topic strings and wire types come from `protocol` only.

pub mod api;
pub mod broker;
pub mod canary;
pub mod cli;
pub mod client;
pub mod config;
pub mod db;
pub mod fanout;
pub mod hot_chunks;
pub mod keys;
pub mod main_loop;
pub mod metrics;
pub mod mqtt;
pub mod release;
pub mod release_file;
pub mod rollout;
pub mod serve;
pub mod server;
pub mod stats;
pub mod token;
pub mod tokens;

use std::time::{SystemTime, UNIX_EPOCH};

use protocol::UnixSeconds;

use crate::cli::{
    CanaryCommand, Cli, Command, MetricsCommand, NodeCommand, ReleaseCommand, TokenCommand,
};

/// Runs one command line to completion.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { out } => {
            let generated = keys::keygen(&out)?;
            println!("key id      {}", generated.key_id);
            println!(
                "signing key {} (secret: keep it on the coordinator)",
                generated.signing_key.display()
            );
            println!(
                "trust file  {} (give it to every agent: --trust)",
                generated.trust_file.display()
            );
            Ok(())
        }
        Command::Serve(args) => {
            let config = config::ServeConfig::load(args)?;
            serve::serve(config, shutdown_signal()).await
        }
        Command::Release {
            command:
                ReleaseCommand::Publish {
                    src_dir,
                    app,
                    version,
                    kind,
                    mirrors,
                    json,
                },
        } => {
            let client = client::ApiClient::new(&cli.client)?;
            let release = client::PublishArgs {
                src: &src_dir,
                app: &app,
                version: &version,
                kind: kind.into(),
                mirrors: &mirrors,
            };
            client::publish(&client, release, json).await
        }
        Command::Release {
            command: ReleaseCommand::List { json },
        } => {
            let client = client::ApiClient::new(&cli.client)?;
            client::release_list(&client, json).await
        }
        Command::Rollout { command } => {
            let client = client::ApiClient::new(&cli.client)?;
            client::rollout(&client, command).await
        }
        Command::Canary {
            command: CanaryCommand::Report { rollout, json },
        } => {
            let client = client::ApiClient::new(&cli.client)?;
            client::canary_report(&client, rollout, json).await
        }
        Command::Node {
            command: NodeCommand::Rollback { nodes, json },
        } => {
            let client = client::ApiClient::new(&cli.client)?;
            client::node_rollback(&client, &nodes, json).await
        }
        Command::Nodes { json } => {
            let client = client::ApiClient::new(&cli.client)?;
            client::nodes(&client, json).await
        }
        Command::Stats { json } => {
            let client = client::ApiClient::new(&cli.client)?;
            client::stats(&client, json).await
        }
        Command::Metrics(args) => {
            let client = client::ApiClient::new(&cli.client)?;
            match args.command {
                Some(MetricsCommand::Drops { json }) => client::metric_drops(&client, json).await,
                None => client::metrics(&client, &args.query).await,
            }
        }
        Command::Token { command } => {
            let client = client::ApiClient::new(&cli.client)?;
            match command {
                TokenCommand::Create { name, json } => {
                    client::token_create(&client, &name, json).await
                }
                TokenCommand::List { json } => client::token_list(&client, json).await,
                TokenCommand::Revoke { name, json } => {
                    client::token_revoke(&client, &name, json).await
                }
            }
        }
        Command::Log { since, json } => {
            let client = client::ApiClient::new(&cli.client)?;
            client::log(&client, since, json).await
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
                _ = term.recv() => tracing::info!("SIGTERM received"),
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot watch for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Seconds since the Unix epoch by the system clock (0 if the clock is before 1970).
pub fn unix_now() -> UnixSeconds {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
