//! The agent's connection to the broker: options, and the task that drives rumqttc's event
//! loop with backoff.
//!
//! rumqttc reconnects on the next `poll()` with no delay of its own, so after a failure this
//! task waits (exponential backoff with a cap) before polling again, and logs once per state
//! change rather than once per attempt. The session is persistent (clean session off) and
//! the broker publishes the node's "offline" presence as its last will.

use std::time::Duration;

use bytes::Bytes;
use protocol::messages::Presence;
use protocol::{BrokerAddr, NodeId, NodeTopic, Topics};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Requests queued towards the broker before `try_publish` reports the queue full.
const REQUEST_QUEUE: usize = 256;

/// What the connection task hands the daemon.
#[derive(Debug)]
pub enum LinkEvent {
    /// (Re)connected: subscriptions and retained reports must be (re)sent.
    Connected,
    /// The connection was lost (once per loss, not per failed attempt to reconnect).
    Disconnected,
    Message {
        topic: String,
        payload: Bytes,
    },
}

pub fn options(node: &NodeId, broker: &BrokerAddr, topics: &Topics) -> MqttOptions {
    let mut options = MqttOptions::new(node.as_str(), broker.host.as_str(), broker.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        // rumqttc's default limit (10 KiB) is far below a manifest or a chunk.
        .set_max_packet_size(
            protocol::format::MAX_MQTT_PACKET,
            protocol::format::MAX_MQTT_PACKET,
        )
        .set_request_channel_capacity(REQUEST_QUEUE)
        .set_last_will(LastWill::new(
            topics.node(node, NodeTopic::Presence),
            serde_json::to_vec(&Presence { online: false }).expect("presence serializes"),
            QoS::AtLeastOnce,
            true,
        ));
    options
}

pub fn connect(options: MqttOptions) -> (AsyncClient, EventLoop) {
    AsyncClient::new(options, REQUEST_QUEUE)
}

/// Drives the event loop until the receiver is dropped.
pub async fn drive(mut eventloop: EventLoop, events: mpsc::Sender<LinkEvent>) {
    let mut backoff = BACKOFF_FIRST;
    let mut connected = false;
    let mut failures: u64 = 0;
    loop {
        let event = match eventloop.poll().await {
            Ok(event) => event,
            Err(error) => {
                if connected || failures == 0 {
                    tracing::warn!(%error, "broker unreachable; retrying with backoff");
                }
                if connected && events.send(LinkEvent::Disconnected).await.is_err() {
                    return;
                }
                connected = false;
                failures += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let forward = match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                tracing::info!(after_failures = failures, "connected to broker");
                connected = true;
                failures = 0;
                backoff = BACKOFF_FIRST;
                Some(LinkEvent::Connected)
            }
            Event::Incoming(Packet::Publish(publish)) => Some(LinkEvent::Message {
                topic: publish.topic,
                payload: publish.payload,
            }),
            _ => None,
        };
        if let Some(event) = forward {
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}
