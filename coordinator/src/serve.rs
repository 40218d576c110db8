//! `coordinator serve`: wires the validated config to the HTTP server, the broker and the main
//! loop, and shuts them down in order.
//!
//! Start-up order: config validated and on-disk state opened (`config.rs`) → HTTP port bound →
//! embedded broker started and accepting → MQTT link started → HTTP served → main loop.
//! Shutdown (SIGTERM / Ctrl-C): main loop stops → HTTP drains (bounded) → MQTT DISCONNECT →
//! sled flushed. The embedded broker's threads end with the process.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use protocol::KeyId;
use tokio::sync::{mpsc, watch, Mutex};

use crate::broker;
use crate::config::{BrokerSpec, ServeConfig};
use crate::main_loop::MainLoop;
use crate::mqtt::Link;
use crate::server::{self, AppState};
use crate::stats::Stats;
use crate::unix_now;

const HTTP_DRAIN: Duration = Duration::from_secs(5);

pub async fn serve(config: ServeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tracing::info!(path = %config.token_path.display(), created = config.token_created, "admin token for client commands (--token / COORDINATOR_TOKEN)");
    tracing::info!(key_id = %KeyId::of(&config.signing_key.verifying_key()), data = %config.data.display(), "signing releases and commands");

    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .map_err(|error| {
            anyhow::anyhow!(
                "cannot listen for HTTP on {}: {error}; pick a free address with --http",
                config.http
            )
        })?;

    let (host, port) = match &config.broker {
        BrokerSpec::Embedded => {
            let embedded = broker::start(config.mqtt_listen).await?;
            tracing::info!(listen = %config.mqtt_listen, "embedded MQTT broker accepting connections");
            (
                embedded.connect_addr.ip().to_string(),
                embedded.connect_addr.port(),
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
        public_url: config.public_url.clone(),
        to_loop,
        command_lock: Mutex::new(()),
        stats: stats.clone(),
    });
    let (stop_http, mut http_stopped) = watch::channel(false);
    let app = server::router(state);
    let mut http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_stopped.wait_for(|stop| *stop).await;
            })
            .await
    });
    tracing::info!(http = %config.http, public_url = %config.public_url, "HTTP API and chunk server listening");

    let main_loop = MainLoop::new(
        config.db.clone(),
        config.chunks,
        config.topics,
        link.client.clone(),
        stats,
    );
    let result = main_loop.run(&mut link, from_http, shutdown).await;
    tracing::info!("shutting down");

    let _ = stop_http.send(true);
    match tokio::time::timeout(HTTP_DRAIN, &mut http).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => tracing::error!(%error, "HTTP server failed"),
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
    config
        .db
        .flush()
        .await
        .context("cannot flush the database at shutdown")?;
    result
}
