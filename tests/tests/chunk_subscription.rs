//! A node subscribes to a release's shared chunk topic only once a chunk needs MQTT, and
//! drops the subscription when its fetch ends. A subscriber is sent every frame any node asked
//! for, so in a fleet-wide rollout over HTTP a node that subscribed anyway would be sent the
//! whole fleet's MQTT traffic (and the broker would buffer it per connection).
//!
//! These run `agent::fetch::stage` itself, against a real HTTP mirror, with an MQTT client
//! that is never connected: what the stage asks of the broker is read back from the client's
//! queue, in order.

use std::path::Path;
use std::sync::Arc;

use agent::fetch::{self, FetchLink, Inbound, StageJob, StageReport};
use anyhow::{ensure, Context as _, Result};
use images::assemble::LocalChunks;
use images::{build_image, ChunkStore};
use protocol::messages::ChunkFrame;
use protocol::{AppName, ReleaseId, ReleaseKind, Version};
use rumqttc::{AsyncClient, MqttOptions, Request};
use system_tests::mirror::{Behaviour, Mirror};
use tokio::sync::mpsc;

const CHUNK_TOPIC: &str = "fleet/releases/web/1/chunks";

/// What a stage of a fresh ~1 MB release asked of the broker, and its report. With `frames`,
/// every chunk is also waiting as a frame on the shared topic, as if other nodes had asked.
async fn stage(dir: &Path, mirror: Behaviour, frames: bool) -> Result<(Vec<Request>, StageReport)> {
    let src = dir.join("src");
    std::fs::create_dir_all(&src)?;
    // Incompressible and seeded: a few chunks, the same every run.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let bytes: Vec<u8> = (0..1_000_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(src.join("media.ts"), &bytes)?;
    let source = ChunkStore::open(dir.join("source"))?;
    let (app, version) = (AppName::new("web")?, Version::new("1")?);
    let manifest = build_image(
        &src,
        app.clone(),
        version.clone(),
        ReleaseKind::Content,
        &source,
    )?;

    let server = Mirror::start()?;
    server.serve_from(&dir.join("source"))?;
    let (client, mut eventloop) = AsyncClient::new(
        MqttOptions::new("chunk-subscription-test", "127.0.0.1", 1),
        64,
    );
    let (inbound_tx, inbound_rx) = mpsc::channel(64);
    if frames {
        for chunk in manifest.chunks() {
            let compressed = source
                .get(&chunk.digest)?
                .context("a built chunk is stored")?;
            let frame = ChunkFrame::encode(&chunk.digest, &compressed);
            inbound_tx.send(Inbound::Frame(frame.into())).await?;
        }
    }
    let (notes_tx, _notes_rx) = mpsc::channel(1024);
    let job = StageJob {
        release: ReleaseId { app, version },
        manifest: Arc::new(manifest),
        slot_dir: dir.join("slot"),
        store: Arc::new(ChunkStore::open_cache(dir.join("fetch"))?),
        local: Arc::new(LocalChunks::index(&[])),
        max_rate: None,
        http_sources: vec![server.url(mirror)],
        http: fetch::http_client()?,
    };
    let link = FetchLink {
        client,
        request_topic: "fleet/nodes/n1/chunk-req".to_owned(),
        chunk_topic: CHUNK_TOPIC.to_owned(),
        inbound: inbound_rx,
        notes: notes_tx,
    };
    let report = fetch::stage(job, link).await?;
    ensure!(
        dir.join("slot/media.ts").is_file(),
        "the slot was not assembled"
    );
    // Hands back every request the stage queued, in order (nothing was ever sent).
    eventloop.clean();
    Ok((eventloop.pending.into_iter().collect(), report))
}

fn subscriptions(requests: &[Request]) -> Vec<&'static str> {
    requests
        .iter()
        .filter_map(|r| match r {
            Request::Subscribe(s) if s.filters.iter().any(|f| f.path == CHUNK_TOPIC) => {
                Some("subscribe")
            }
            Request::Unsubscribe(u) if u.topics.iter().any(|t| t == CHUNK_TOPIC) => {
                Some("unsubscribe")
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_node_fetching_over_http_never_subscribes_to_the_chunk_topic() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (requests, report) = stage(dir.path(), Behaviour::Serve, false).await?;
    assert_eq!(subscriptions(&requests), Vec::<&str>::new(), "{requests:?}");
    assert!(report.bytes_fetched_http > 0, "{report:?}");
    assert_eq!(report.bytes_fetched_mqtt, 0, "{report:?}");
    Ok(())
}

#[tokio::test]
async fn a_node_whose_http_source_fails_subscribes_once_then_unsubscribes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (requests, report) = stage(dir.path(), Behaviour::Status(503), true).await?;
    assert_eq!(
        subscriptions(&requests),
        ["subscribe", "unsubscribe"],
        "{requests:?}"
    );
    let first_request = requests
        .iter()
        .position(|r| matches!(r, Request::Publish(p) if p.topic == "fleet/nodes/n1/chunk-req"));
    let subscribed = requests
        .iter()
        .position(|r| matches!(r, Request::Subscribe(_)));
    assert!(
        subscribed < first_request && first_request.is_some(),
        "the node must subscribe before it asks for chunks over MQTT: {requests:?}"
    );
    assert!(report.bytes_fetched_mqtt > 0, "{report:?}");
    assert_eq!(report.bytes_fetched_http, 0, "{report:?}");
    Ok(())
}
