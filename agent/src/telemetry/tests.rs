//! The telemetry task as the daemon drives it, with the MQTT client's request queue read
//! directly (no broker) and the buffer's tree read beside the task.

use std::time::Duration;

use protocol::telemetry::{names, MetricAck, MetricBatch};
use protocol::{AppName, Version};
use rumqttc::{Publish, Request};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;

const DEADLINE: Duration = Duration::from_secs(20);
const INTERVAL: Duration = Duration::from_millis(200);
/// Long enough never to fire within a test, for tests not about re-sending.
const NEVER: Duration = Duration::from_secs(3600);
const TOPIC: &str = "fleet/nodes/n1/metrics";

struct Harness {
    telemetry: Telemetry,
    requests: flume::Receiver<Request>,
    tree: sled::Tree,
    _journal: Journal,
    _dir: tempfile::TempDir,
}

fn start(resend_after: Duration, capacity: u64) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path()).unwrap();
    let tree = journal.telemetry_tree().unwrap();
    let (requests_tx, requests) = flume::bounded(64);
    let telemetry = Telemetry::spawn(Parts {
        node: NodeId::new("n1").unwrap(),
        labels: BTreeMap::from([("ring".to_owned(), "canary".to_owned())]),
        metrics_topic: TOPIC.to_owned(),
        data_dir: dir.path().to_owned(),
        interval: INTERVAL,
        resend_after,
        client: AsyncClient::from_senders(requests_tx),
        buffer: SampleBuffer::open(tree.clone(), capacity).unwrap(),
    });
    Harness {
        telemetry,
        requests,
        tree,
        _journal: journal,
        _dir: dir,
    }
}

impl Harness {
    /// The seqs in the buffer, oldest first.
    fn buffered(&self) -> Vec<u64> {
        self.tree
            .scan_prefix(b"s")
            .keys()
            .map(|k| u64::from_be_bytes(k.unwrap()[1..].try_into().unwrap()))
            .collect()
    }

    async fn wait_until(&self, what: &str, mut done: impl FnMut(&Harness) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The next batch published.
    async fn next_batch(&self) -> (Publish, MetricBatch) {
        loop {
            let request = tokio::time::timeout(DEADLINE, self.requests.recv_async())
                .await
                .expect("a batch within the deadline")
                .unwrap();
            if let Request::Publish(publish) = request {
                let batch = serde_json::from_slice(&publish.payload).unwrap();
                return (publish, batch);
            }
        }
    }

    fn ack(&self, up_to: u64) {
        let ack = MetricAck {
            protocol: protocol::PROTOCOL_VERSION,
            up_to,
        };
        self.telemetry.on_ack(&serde_json::to_vec(&ack).unwrap());
    }
}

fn seqs(batch: &MetricBatch) -> Vec<u64> {
    batch.samples.iter().map(|s| s.seq).collect()
}

#[tokio::test]
async fn samples_taken_offline_go_oldest_first_once_connected_and_acks_free_them() {
    let h = start(NEVER, 100);
    h.wait_until("three samples", |h| h.buffered().len() >= 3)
        .await;
    // Each loop turn that buffered a sample would have published right after it.
    assert!(h.requests.is_empty(), "published while the link was down");

    h.telemetry.link_up();
    let (publish, batch) = h.next_batch().await;
    assert_eq!(publish.topic, TOPIC);
    assert_eq!(publish.qos, QoS::AtLeastOnce);
    assert!(!publish.retain);
    assert_eq!(batch.node.as_str(), "n1");
    assert_eq!(batch.labels["ring"], "canary");
    assert_eq!(batch.dropped_total, 0);
    let sent = seqs(&batch);
    assert!(sent.len() >= 3, "{sent:?}");
    assert_eq!(sent, (1..=sent.len() as u64).collect::<Vec<_>>());
    for sample in &batch.samples {
        assert_eq!(sample.version, None);
        assert!(sample.values.contains_key(names::HOST_MEM_USED_PERCENT));
        assert!(sample.values.values().all(|v| v.is_finite()));
    }

    // Garbage and acks of a newer protocol are ignored.
    h.telemetry.on_ack(b"{not json");
    h.telemetry.on_ack(br#"{"protocol":99,"up_to":1000000}"#);
    assert_eq!(*h.telemetry.acks.borrow(), 0);

    let last = *sent.last().unwrap();
    h.ack(last);
    h.wait_until("the acknowledged samples to leave the buffer", |h| {
        h.buffered().first().is_none_or(|&first| first > last)
    })
    .await;
    // The next batch starts after what was acknowledged.
    let (_, next) = h.next_batch().await;
    assert_eq!(next.samples[0].seq, last + 1, "{:?}", seqs(&next));
}

#[tokio::test]
async fn a_full_buffer_drops_the_oldest_and_the_batch_says_how_many() {
    let h = start(NEVER, 2);
    h.wait_until("three samples dropped", |h| {
        h.buffered().first().is_some_and(|&first| first >= 4)
    })
    .await;
    h.telemetry.link_up();
    let (_, batch) = h.next_batch().await;
    assert!(batch.dropped_total >= 3, "{}", batch.dropped_total);
    let sent = seqs(&batch);
    assert_eq!(sent.len(), 2, "{sent:?}");
    // What was dropped is exactly what came before.
    assert_eq!(sent[0], batch.dropped_total + 1, "{sent:?}");
    assert_eq!(sent[1], sent[0] + 1);
}

#[tokio::test]
async fn an_unacknowledged_batch_is_sent_again_after_the_timeout() {
    let resend_after = Duration::from_millis(500);
    let h = start(resend_after, 100);
    h.telemetry.link_up();
    let (_, first) = h.next_batch().await;
    let sent_at = Instant::now();
    let (_, again) = h.next_batch().await;
    assert!(
        sent_at.elapsed() >= resend_after - INTERVAL,
        "re-sent too early"
    );
    assert_eq!(again.samples[0].seq, first.samples[0].seq);
}

#[tokio::test]
async fn a_reconnection_sends_the_unacknowledged_batch_again_at_once() {
    let h = start(NEVER, 100);
    h.telemetry.link_up();
    let (_, first) = h.next_batch().await;
    h.telemetry.link_down();
    h.telemetry.link_up();
    // Only the reconnection can cause this: the resend timeout is an hour.
    let (_, again) = h.next_batch().await;
    assert_eq!(again.samples[0].seq, first.samples[0].seq);
}

/// Serves a metrics page whose counters grow by 9 answers and 1 failure per scrape.
async fn fake_app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut scrapes = 0u64;
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            scrapes += 1;
            let body = format!(
                "# TYPE http_requests_total counter\n\
                 http_requests_total{{code=\"200\"}} {}\n\
                 http_requests_total{{code=\"500\"}} {scrapes}\n\
                 # TYPE queue_depth gauge\nqueue_depth 3\n",
                9 * scrapes
            );
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    });
    port
}

#[tokio::test]
async fn the_serving_versions_metrics_arrive_as_interval_values_tagged_with_its_version() {
    let port = fake_app().await;
    let release = ReleaseId::new(AppName::new("web").unwrap(), Version::new("2").unwrap());
    let h = start(NEVER, 100);
    h.telemetry.set_traffic(Traffic {
        version: Some(release.clone()),
        app: Some(AppEndpoint {
            release: release.clone(),
            port,
            metrics_path: "/metrics".to_owned(),
        }),
    });
    h.telemetry.link_up();
    let mut samples = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while !samples
        .iter()
        .any(|s: &protocol::telemetry::Sample| s.values.contains_key(names::APP_ERROR_RATE))
    {
        assert!(Instant::now() < deadline, "no app values in {samples:?}");
        let (_, batch) = h.next_batch().await;
        h.ack(batch.samples.last().unwrap().seq);
        samples.extend(batch.samples);
    }
    // The first scrape is only the baseline.
    assert!(!samples[0].values.contains_key(names::APP_REQUEST_RATE));
    let with_app = samples
        .iter()
        .find(|s| s.values.contains_key(names::APP_ERROR_RATE))
        .unwrap();
    assert!(with_app.seq > 1);
    assert_eq!(with_app.version.as_ref(), Some(&release));
    assert_eq!(with_app.values[names::APP_ERROR_RATE], 0.1);
    assert!(with_app.values[names::APP_REQUEST_RATE] > 0.0);
    assert_eq!(with_app.values["app:queue_depth"], 3.0);
    assert!(with_app.values.contains_key(names::HOST_LOAD1));
}
