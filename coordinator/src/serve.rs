//! `coordinator serve`: wires the validated config to the HTTP server, the broker and the main
//! loop, and shuts them down in order.
//!
//! Start-up order: config validated and on-disk state opened (`config.rs`) → HTTP port bound →
//! embedded broker started and accepting → MQTT link started → rollout driver loaded (its
//! rollouts read and reconciled) → HTTP served → main loop and rollout driver.
//! Shutdown (SIGTERM / Ctrl-C): main loop stops → rollout driver stops (between save points)
//! → metric ingester stops (it flushes) → HTTP drains (bounded) → MQTT DISCONNECT → embedded
//! broker stopped → sled flushed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use protocol::KeyId;
use tokio::sync::{mpsc, watch, Mutex};

use crate::broker;
use crate::config::{BrokerSpec, ServeConfig};
use crate::hot_chunks::HotChunks;
use crate::main_loop::MainLoop;
use crate::metrics::{ingest_channel, MetricStore};
use crate::mqtt::Link;
use crate::rollout::store::RolloutStore;
use crate::rollout::{Driver, Rollouts};
use crate::server::{self, AppState};
use crate::stats::Stats;
use crate::tokens::TokenStore;
use crate::unix_now;

const HTTP_DRAIN: Duration = Duration::from_secs(5);

pub async fn serve(config: ServeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tracing::info!(path = %config.token_path.display(), created = config.token_created, "admin token for client commands (--token / COORDINATOR_TOKEN)");
    tracing::info!(key_id = %KeyId::of(&config.signing_key.verifying_key()), data = %config.data.display(), "signing releases and commands");

    // Before anything binds: a database that cannot open a tree fails the start cleanly.
    let tokens = TokenStore::open(&config.db).context("cannot open the API token store")?;
    let metrics =
        MetricStore::open(&config.db, unix_now()).context("cannot open the metric store")?;
    let (rollouts, rollout_inbox) =
        Rollouts::new(RolloutStore::open(&config.db).context("cannot open the rollout store")?);

    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .map_err(|error| {
            anyhow::anyhow!(
                "cannot listen for HTTP on {}: {error}; pick a free address with --http",
                config.http
            )
        })?;

    // Held to the end of `serve`: dropping the embedded broker stops it.
    let mut embedded = None;
    let (host, port) = match &config.broker {
        BrokerSpec::Embedded => {
            let broker = embedded.insert(broker::start(config.mqtt_listen).await?);
            tracing::info!(listen = %config.mqtt_listen, "embedded MQTT broker accepting connections");
            (
                broker.connect_addr.ip().to_string(),
                broker.connect_addr.port(),
            )
        }
        BrokerSpec::External { host, port } => (host.clone(), *port),
    };
    let mut link = Link::start(&host, port);

    let (to_loop, from_http) = mpsc::channel(64);
    let stats = Arc::new(Stats::new(unix_now()));
    let state = Arc::new(AppState {
        db: config.db.clone(),
        chunks: config.chunks.clone(),
        signing_key: config.signing_key,
        token: config.token,
        tokens,
        public_url: config.public_url.clone(),
        to_loop,
        command_lock: Mutex::new(()),
        stats: stats.clone(),
        metrics: metrics.clone(),
        rollouts: rollouts.clone(),
        chunk_reads: tokio::sync::Semaphore::new(server::CHUNK_READS),
        hot_chunks: HotChunks::new(server::HOT_CHUNK_BYTES, server::HOT_CHUNK_IDLE),
    });
    let driver = Driver::new(state.clone(), rollout_inbox)
        .context("cannot load the rollouts in progress")?;
    let (stop_driver, mut driver_stopped) = watch::channel(false);
    let driver = tokio::spawn(driver.run(async move {
        let _ = driver_stopped.wait_for(|stop| *stop).await;
    }));
    let (stop_http, mut http_stopped) = watch::channel(false);
    let app = server::router(state);
    let mut http = tokio::spawn(server::connections::serve(listener, app, async move {
        let _ = http_stopped.wait_for(|stop| *stop).await;
    }));
    tracing::info!(http = %config.http, public_url = %config.public_url, "HTTP API and chunk server listening");

    // Ends when the main loop drops its end of the link.
    let (ingest, ingester) = ingest_channel(metrics, config.db.clone(), config.metrics_retention);
    let ingester = tokio::spawn(ingester.run());
    let main_loop = MainLoop::new(
        config.db.clone(),
        config.chunks,
        config.topics,
        link.client.clone(),
        stats,
        ingest,
    )
    .observe_nodes(rollouts.observer());
    let result = main_loop.run(&mut link, from_http, shutdown).await;
    tracing::info!("shutting down");
    let _ = stop_driver.send(true);
    if let Err(error) = driver.await {
        tracing::error!(%error, "the rollout driver task failed");
    }
    if let Err(error) = ingester.await {
        tracing::error!(%error, "the metric ingester task failed");
    }

    let _ = stop_http.send(true);
    match tokio::time::timeout(HTTP_DRAIN, &mut http).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "HTTP server task failed"),
        Err(_) => {
            tracing::warn!(
                "HTTP requests still running after {}s; closing them",
                HTTP_DRAIN.as_secs()
            );
            http.abort();
        }
    }
    link.close().await;
    drop(embedded);
    config
        .db
        .flush()
        .await
        .context("cannot flush the database at shutdown")?;
    result
}
