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
use std::time::Duration;

use agent::fetch::{self, FetchLink, Inbound, StageJob, StageReport};
use anyhow::{Context as _, Result};
use images::assemble::LocalChunks;
use images::{build_image, ChunkStore};
use protocol::messages::ChunkFrame;
use protocol::{AppName, NodeId, NodeTopic, ReleaseId, ReleaseKind, Topics, Version};
use rumqttc::{AsyncClient, EventLoop, MqttOptions, Request};
use system_tests::mirror::{Behaviour, Mirror};
use system_tests::tree::{assert_tree_eq, write_tree};
use tokio::sync::{mpsc, oneshot};

/// Far beyond what staging ~1 MB takes; only a stage that waits for good reaches it.
const STAGE_LIMIT: Duration = Duration::from_secs(60);

fn release() -> ReleaseId {
    ReleaseId {
        app: AppName::new("web").expect("a valid app name"),
        version: Version::new("1").expect("a valid version"),
    }
}

fn chunk_topic() -> String {
    Topics::default().chunks(&release())
}

fn request_topic() -> String {
    let node = NodeId::new("n1").expect("a valid node id");
    Topics::default().node(&node, NodeTopic::ChunkRequests)
}

/// What a stage of a fresh ~1 MB release asked of the broker, and its report. With
/// `frames`, a stand-in for the coordinator answers the stage's first chunk request over
/// MQTT with every chunk as a frame on the shared topic; without, nothing ever arrives.
async fn stage(dir: &Path, mirror: Behaviour, frames: bool) -> Result<(Vec<Request>, StageReport)> {
    let src = dir.join("src");
    write_tree(&src, 7, 1_000_000)?;
    let source = ChunkStore::open(dir.join("source"))?;
    let release = release();
    let manifest = build_image(
        &src,
        release.app.clone(),
        release.version.clone(),
        ReleaseKind::Content,
        &source,
    )?;
    let mut answer = Vec::new();
    if frames {
        for chunk in manifest.chunks() {
            let compressed = source
                .get(&chunk.digest)?
                .context("a built chunk is stored")?;
            answer.push(ChunkFrame::encode(&chunk.digest, &compressed));
        }
    }

    let server = Mirror::start()?;
    server.serve_from(&dir.join("source"))?;
    let (client, eventloop) = AsyncClient::new(
        MqttOptions::new("chunk-subscription-test", "127.0.0.1", 1),
        64,
    );
    let (inbound_tx, inbound_rx) = mpsc::channel(64);
    let (done_tx, done_rx) = oneshot::channel();
    let stand_in = tokio::spawn(answer_first_request(eventloop, inbound_tx, answer, done_rx));
    let (notes_tx, _notes_rx) = mpsc::channel(1024);
    let job = StageJob {
        release,
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
        request_topic: request_topic(),
        chunk_topic: chunk_topic(),
        inbound: inbound_rx,
        notes: notes_tx,
    };
    // A stage that never asks over MQTT would wait for frames for good: fail instead.
    let report = match tokio::time::timeout(STAGE_LIMIT, fetch::stage(job, link)).await {
        Ok(staged) => staged.map_err(anyhow::Error::from),
        Err(_) => Err(anyhow::anyhow!(
            "the stage did not finish within {STAGE_LIMIT:?}: it never asked over MQTT?"
        )),
    };
    let _ = done_tx.send(());
    let requests = stand_in.await?;
    let report = report?;
    assert_tree_eq(&src, &dir.join("slot"));
    Ok((requests, report))
}

/// Reads back, in order, every request the stage queued on the never-connected client
/// (nothing is ever sent), and on the first chunk request over MQTT delivers `answer` as
/// if the coordinator had published it. Answering the request, rather than having the
/// frames waiting, keeps the test about ordering, not timing: a node that finds frames
/// already passing by follows them and asks for nothing.
async fn answer_first_request(
    mut eventloop: EventLoop,
    inbound: mpsc::Sender<Inbound>,
    mut answer: Vec<Vec<u8>>,
    mut done: oneshot::Receiver<()>,
) -> Vec<Request> {
    let request_topic = request_topic();
    let mut requests = Vec::new();
    loop {
        let finished = done.try_recv().is_ok();
        eventloop.clean();
        for request in eventloop.pending.drain(..) {
            let asks = matches!(&request, Request::Publish(p) if p.topic == request_topic);
            requests.push(request);
            if asks {
                for frame in answer.drain(..) {
                    if inbound.send(Inbound::Frame(frame.into())).await.is_err() {
                        break;
                    }
                }
            }
        }
        if finished {
            return requests;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn subscriptions(requests: &[Request]) -> Vec<&'static str> {
    let topic = chunk_topic();
    requests
        .iter()
        .filter_map(|r| match r {
            Request::Subscribe(s) if s.filters.iter().any(|f| f.path == topic) => Some("subscribe"),
            Request::Unsubscribe(u) if u.topics.contains(&topic) => Some("unsubscribe"),
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
    let request_topic = request_topic();
    let position = |wanted: &dyn Fn(&Request) -> bool| requests.iter().position(wanted);
    let subscribed = position(&|r| matches!(r, Request::Subscribe(_)))
        .expect("a subscription to the chunk topic (checked above)");
    let first_request = position(&|r| matches!(r, Request::Publish(p) if p.topic == request_topic))
        .expect("a chunk request over MQTT, since the mirror failed every chunk");
    assert!(
        subscribed < first_request,
        "the node must subscribe before it asks for chunks over MQTT: {requests:?}"
    );
    assert!(report.bytes_fetched_mqtt > 0, "{report:?}");
    assert_eq!(report.bytes_fetched_http, 0, "{report:?}");
    Ok(())
}
