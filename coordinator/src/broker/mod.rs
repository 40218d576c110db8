//! The embedded MQTT 3.1.1 broker for the single-machine default: QoS 0 and 1, retained
//! messages, wills, persistent sessions, wildcard filters. It runs as tasks on the
//! coordinator's runtime and stops when [`EmbeddedBroker`] is dropped.
//!
//! It is ours rather than rumqttd because of what a fleet costs it: rumqttd 0.20 keeps a
//! log per subscription filter and buffers per connection that took a 1,000-node rollout to
//! 547 MiB (README, "Fleet scale"). Here a message is stored once however many sessions
//! queue it, each queue is bounded, and an idle connection costs its session and two small
//! buffers. It keeps retained messages in memory only: after a restart the coordinator
//! republishes every node's desired command (see `main_loop.rs`), and agents republish
//! their own state and presence.
//!
//! `router` owns the state and does no I/O; `connection` owns one client's socket.

mod connection;
mod router;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use router::Router;

/// How long accepting pauses after an error such as running out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("cannot listen for MQTT on {addr}: {error}; another broker may be running there: pick a free address with --mqtt-listen, or use that broker with --broker mqtt://{addr}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// A running embedded broker; dropping it closes its listener and every connection.
#[derive(Debug)]
pub struct EmbeddedBroker {
    /// Where clients on this machine reach it.
    pub connect_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The address a local client uses to reach a listener on `listen`.
fn local_addr(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port())
        }
        _ => listen,
    }
}

/// Listens on `listen` and serves MQTT there until the returned broker is dropped.
pub async fn start(listen: SocketAddr) -> Result<EmbeddedBroker, BrokerError> {
    let bind_error = |error| BrokerError::Bind {
        addr: listen,
        error,
    };
    let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let task = tokio::spawn(accept(listener, Arc::new(Mutex::new(Router::default()))));
    Ok(EmbeddedBroker {
        connect_addr: local_addr(bound),
        task,
    })
}

/// Accepts connections; each is a task of this one's, so they end with it.
async fn accept(listener: TcpListener, router: Arc<Mutex<Router>>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(connection::serve(stream, peer, router.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "embedded MQTT broker cannot accept a connection; retrying");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
            },
            // Reap finished connections so the set does not grow with every one ever made.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::format::MAX_MQTT_PACKET;
    use rumqttc::QoS;

    #[test]
    fn a_wildcard_listen_address_is_reached_on_loopback() {
        let any: SocketAddr = "0.0.0.0:1883".parse().expect("addr");
        assert_eq!(local_addr(any), "127.0.0.1:1883".parse().expect("addr"));
        let specific: SocketAddr = "10.0.0.1:1883".parse().expect("addr");
        assert_eq!(local_addr(specific), specific);
    }

    /// A rumqttc client of `broker`, and a task that hands its incoming publishes over.
    fn client(
        broker: &EmbeddedBroker,
        id: &str,
        clean: bool,
        will: Option<rumqttc::LastWill>,
    ) -> (
        rumqttc::AsyncClient,
        tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
        tokio::task::JoinHandle<()>,
    ) {
        let mut options = rumqttc::MqttOptions::new(
            id,
            broker.connect_addr.ip().to_string(),
            broker.connect_addr.port(),
        );
        options
            .set_clean_session(clean)
            .set_max_packet_size(MAX_MQTT_PACKET, MAX_MQTT_PACKET);
        if let Some(will) = will {
            options.set_last_will(will);
        }
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = event {
                    let _ = tx.send(p);
                }
            }
        });
        (client, rx, task)
    }

    async fn next(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
    ) -> rumqttc::Publish {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a message within 10 s")
            .expect("client task running")
    }

    #[tokio::test]
    async fn clients_over_tcp_get_live_and_retained_messages_large_ones_whole() {
        let broker = start("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("starts");
        let (publisher, _, _p) = client(&broker, "publisher", true, None);
        publisher
            .publish("fleet/n1/state", QoS::AtLeastOnce, true, b"staged".to_vec())
            .await
            .expect("queued");
        let (subscriber, mut inbox, _s) = client(&broker, "subscriber", false, None);
        subscriber
            .subscribe("fleet/+/state", QoS::AtLeastOnce)
            .await
            .expect("queued");
        let retained = next(&mut inbox).await;
        assert_eq!(
            (retained.topic.as_str(), retained.retain),
            ("fleet/n1/state", true)
        );
        assert_eq!(retained.payload.as_ref(), b"staged");

        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        publisher
            .publish("fleet/n2/state", QoS::AtMostOnce, false, big.clone())
            .await
            .expect("queued");
        let live = next(&mut inbox).await;
        assert_eq!(
            (live.topic.as_str(), live.retain),
            ("fleet/n2/state", false)
        );
        assert!(
            live.payload.as_ref() == big.as_slice(),
            "3 MB payload arrives whole"
        );
    }

    #[tokio::test]
    async fn a_client_that_vanishes_has_its_will_published_and_one_that_says_goodbye_does_not() {
        let broker = start("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("starts");
        let (watcher, mut seen, _w) = client(&broker, "watcher", true, None);
        watcher
            .subscribe("presence/#", QoS::AtLeastOnce)
            .await
            .expect("queued");
        // The SUBACK has come back once a message published after it arrives.
        watcher
            .publish("presence/ready", QoS::AtLeastOnce, false, b"x".to_vec())
            .await
            .expect("queued");
        assert_eq!(next(&mut seen).await.topic, "presence/ready");

        let will = |topic: &str| {
            Some(rumqttc::LastWill::new(
                topic,
                b"offline".to_vec(),
                QoS::AtLeastOnce,
                true,
            ))
        };
        let (polite, _, polite_task) = client(&broker, "polite", true, will("presence/polite"));
        let (vanishing, _, vanishing_task) =
            client(&broker, "vanishing", true, will("presence/vanishing"));
        // Both are connected once their own publish comes round.
        polite
            .publish("presence/polite-up", QoS::AtLeastOnce, false, b"x".to_vec())
            .await
            .expect("queued");
        vanishing
            .publish(
                "presence/vanishing-up",
                QoS::AtLeastOnce,
                false,
                b"x".to_vec(),
            )
            .await
            .expect("queued");
        let mut up = [next(&mut seen).await.topic, next(&mut seen).await.topic];
        up.sort();
        assert_eq!(up, ["presence/polite-up", "presence/vanishing-up"]);

        polite.disconnect().await.expect("queued");
        let _ = tokio::time::timeout(Duration::from_secs(5), polite_task).await;
        // Dropping the event loop closes the socket with no DISCONNECT.
        vanishing_task.abort();
        let will = next(&mut seen).await;
        assert_eq!(
            (will.topic.as_str(), will.payload.as_ref()),
            ("presence/vanishing", &b"offline"[..])
        );
        // Nothing else: the polite client's will was discarded.
        watcher
            .publish("presence/end", QoS::AtLeastOnce, false, b"x".to_vec())
            .await
            .expect("queued");
        assert_eq!(next(&mut seen).await.topic, "presence/end");
    }

    #[tokio::test]
    async fn an_address_in_use_is_refused_with_the_flag_to_change_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let error = start(addr).await.expect_err("address is taken");
        assert!(error.to_string().contains("--mqtt-listen"), "{error}");
    }
}
