//! A tiny MQTT client for tests: publish hostile messages, read retained ones, watch events.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use protocol::format::MAX_MQTT_PACKET;
use protocol::messages::Event;
use rumqttc::{Client, Event as MqttEvent, MqttOptions, Packet, QoS};

/// A message received on a subscribed topic.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

enum Incoming {
    Connected,
    Subscribed,
    Message(Message),
}

/// A connected MQTT client whose event loop runs on its own (detached) thread.
pub struct TestClient {
    client: Client,
    incoming: Receiver<Incoming>,
    stop: Arc<AtomicBool>,
    /// Messages received while waiting for something else, in arrival order.
    backlog: Vec<Message>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl TestClient {
    /// Connects to the broker at `addr` and waits for its CONNACK.
    pub fn connect(addr: SocketAddr) -> Result<TestClient> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "system-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options
            .set_max_packet_size(MAX_MQTT_PACKET, MAX_MQTT_PACKET)
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true);
        let (client, mut connection) = Client::new(options, 64);
        let (tx, incoming) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                for event in connection.iter() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let forward = match event {
                        Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => Incoming::Connected,
                        Ok(MqttEvent::Incoming(Packet::SubAck(_))) => Incoming::Subscribed,
                        Ok(MqttEvent::Incoming(Packet::Publish(p))) => Incoming::Message(Message {
                            topic: p.topic,
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        }),
                        Ok(_) => continue,
                        Err(_) => {
                            // rumqttc reconnects on the next poll; don't spin while it can't.
                            std::thread::sleep(Duration::from_millis(200));
                            continue;
                        }
                    };
                    if tx.send(forward).is_err() {
                        break;
                    }
                }
            }
        });
        let mut me = TestClient {
            client,
            incoming,
            stop,
            backlog: Vec::new(),
        };
        me.wait(|i| matches!(i, Incoming::Connected))
            .with_context(|| format!("connecting a test MQTT client to {addr}"))?;
        Ok(me)
    }

    /// Subscribes to `filter` and waits for the SUBACK, so nothing published after this
    /// returns is missed.
    pub fn subscribe(&mut self, filter: &str) -> Result<()> {
        self.client.subscribe(filter, QoS::AtLeastOnce)?;
        self.wait(|i| matches!(i, Incoming::Subscribed))
            .with_context(|| format!("subscribing to {filter}"))
    }

    /// Publishes at QoS 1.
    pub fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .with_context(|| format!("publishing to {topic}"))
    }

    /// The message retained on `topic`, or `None` when the broker holds none.
    pub fn retained(&mut self, topic: &str) -> Result<Option<Vec<u8>>> {
        self.subscribe(topic)?;
        // The broker sends a retained message right after the SUBACK, if it has one.
        let deadline = Instant::now() + Duration::from_secs(2);
        let found = self.next_message_until(deadline, |m| m.topic == topic && m.retain)?;
        self.client.unsubscribe(topic)?;
        Ok(found.map(|m| m.payload))
    }

    /// The next message (already received or arriving within `timeout`) for which `pred`
    /// holds; messages that do not match stay queued for later calls.
    pub fn next_message(
        &mut self,
        timeout: Duration,
        pred: impl FnMut(&Message) -> bool,
    ) -> Result<Option<Message>> {
        self.next_message_until(Instant::now() + timeout, pred)
    }

    /// Waits up to `timeout` for an event (on a subscribed events topic) for which `pred`
    /// holds. Fails on timeout, listing the events seen meanwhile.
    pub fn expect_event(
        &mut self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event> {
        let mut seen = Vec::new();
        let found = self.next_message(timeout, |m| {
            match serde_json::from_slice::<Event>(&m.payload) {
                Ok(event) if pred(&event) => return true,
                Ok(_) | Err(_) => seen.push(format!(
                    "{}: {}",
                    m.topic,
                    String::from_utf8_lossy(&m.payload)
                )),
            }
            false
        })?;
        match found {
            Some(m) => Ok(serde_json::from_slice(&m.payload)?),
            None => bail!(
                "timed out after {timeout:?} waiting for an event: {what}; messages seen meanwhile:\n  {}",
                if seen.is_empty() { "(none)".to_owned() } else { seen.join("\n  ") }
            ),
        }
    }

    fn next_message_until(
        &mut self,
        deadline: Instant,
        mut pred: impl FnMut(&Message) -> bool,
    ) -> Result<Option<Message>> {
        if let Some(i) = self.backlog.iter().position(&mut pred) {
            return Ok(Some(self.backlog.remove(i)));
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.incoming.recv_timeout(left) {
                Ok(Incoming::Message(m)) if pred(&m) => return Ok(Some(m)),
                Ok(Incoming::Message(m)) => self.backlog.push(m),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => bail!("the MQTT event loop ended"),
            }
        }
    }

    fn wait(&mut self, mut want: impl FnMut(&Incoming) -> bool) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.incoming.recv_timeout(left) {
                Ok(i) if want(&i) => return Ok(()),
                Ok(Incoming::Message(m)) => self.backlog.push(m),
                Ok(_) => {}
                Err(e) => return Err(anyhow!("no answer from the broker within {TIMEOUT:?}: {e}")),
            }
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The event loop thread is not joined: with the broker gone it only notices `stop`
        // at its next retry.
        let _ = self.client.disconnect();
    }
}
