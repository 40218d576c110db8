//! The embedded MQTT broker (rumqttd) for the single-machine default.
//!
//! rumqttd runs on its own OS threads (one per listener, plus its router) with its own
//! runtimes; it cannot be stopped, so it lives until the process exits. It keeps retained
//! messages in memory only: after a restart the coordinator republishes every node's desired
//! command (see `main_loop.rs`), and agents republish their own state and presence.
//!
//! rumqttd reports a listener that fails to bind only in its log, so [`start`] checks the
//! address is free first and then waits until an MQTT client can connect.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use protocol::format::MAX_MQTT_PACKET;
use rand::RngCore as _;
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most messages the embedded broker sends a connection in one write (see [`config`]).
const OUTGOING_BATCH: usize = 32;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("cannot listen for MQTT on {addr}: {error}; another broker may be running there: pick a free address with --mqtt-listen, or use that broker with --broker mqtt://{addr}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot start the embedded MQTT broker thread: {0}")]
    Thread(std::io::Error),
    #[error("the embedded MQTT broker stopped while starting on {addr} (see its log lines above); try another --mqtt-listen")]
    Died { addr: SocketAddr },
    #[error("the embedded MQTT broker did not accept connections on {addr} within {}s; try another --mqtt-listen", READY_TIMEOUT.as_secs())]
    NotReady { addr: SocketAddr },
}

/// A running embedded broker. Dropping it does not stop the broker (rumqttd cannot be stopped).
#[derive(Debug)]
pub struct EmbeddedBroker {
    /// Where clients on this machine reach it.
    pub connect_addr: SocketAddr,
}

/// The broker's configuration: one MQTT 3.1.1 listener on `listen`.
fn config(listen: SocketAddr) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_MQTT_PACKET,
        // rumqttd writes a connection's pending messages into one buffer per batch, up to this
        // many QoS 1 messages (`max_outgoing_packet_count` for QoS 0), and the buffer keeps
        // its largest size for the life of the connection: a batch of chunk frames is up to
        // 32 × 256 KiB, not 200 ×.
        max_inflight_count: OUTGOING_BATCH,
        auth: None,
        external_auth: None,
        // Without this, publishing to a topic nobody subscribed to yet is an error, which
        // would refuse retained commands for nodes that have not connected yet.
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "v4".to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: OUTGOING_BATCH as u64,
            // rumqttd keeps every message published to a subscription filter in that
            // filter's in-memory log until the log is full, then drops its oldest segment:
            // this bounds each log to about 8 MiB (plus one oversized message: a segment
            // takes a message larger than itself whole). The coordinator's wildcard filters
            // (every node's metrics, state, events) would otherwise hold all the traffic of a
            // fleet. A subscriber that falls further behind misses messages or, as seen with
            // tiny segments, is sent an older one again; every flow here tolerates both
            // (agents ask again for missing chunks and verify every one, ignore a command at
            // or below their last seq; samples are resent until acked; commands and states
            // are retained).
            max_segment_size: 2 * 1024 * 1024,
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Config::default()
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

/// Starts rumqttd on `listen` and returns once it accepts TCP connections.
pub async fn start(listen: SocketAddr) -> Result<EmbeddedBroker, BrokerError> {
    // rumqttd would only log a bind failure; find it out here with a clear message.
    drop(
        std::net::TcpListener::bind(listen).map_err(|error| BrokerError::Bind {
            addr: listen,
            error,
        })?,
    );

    let config = config(listen);
    let thread = std::thread::Builder::new()
        .name("mqtt-broker".to_owned())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(error) = broker.start() {
                tracing::error!(%error, "embedded MQTT broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;

    let connect_addr = local_addr(listen);
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if thread.is_finished() {
            return Err(BrokerError::Died { addr: listen });
        }
        if probe(connect_addr).await {
            return Ok(EmbeddedBroker { connect_addr });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BrokerError::NotReady { addr: listen });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether an MQTT client can connect to `addr` and get a CONNACK. A full MQTT handshake
/// rather than a bare TCP connect, which rumqttd would log as a failed client.
async fn probe(addr: SocketAddr) -> bool {
    let mut suffix = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut suffix);
    let options = rumqttc::MqttOptions::new(
        format!("coordinator-probe-{}", hex::encode(suffix)),
        addr.ip().to_string(),
        addr.port(),
    );
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1);
    let handshake = async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => break true,
                Ok(_) => {}
                Err(_) => break false,
            }
        }
    };
    let connected = tokio::time::timeout(Duration::from_millis(500), handshake)
        .await
        .unwrap_or(false);
    if connected {
        // Best effort: a clean DISCONNECT so the broker does not log a dropped client.
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    }
    connected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listen_address_is_reached_on_loopback() {
        let any: SocketAddr = "0.0.0.0:1883".parse().expect("addr");
        assert_eq!(local_addr(any), "127.0.0.1:1883".parse().expect("addr"));
        let specific: SocketAddr = "10.0.0.1:1883".parse().expect("addr");
        assert_eq!(local_addr(specific), specific);
    }

    #[tokio::test]
    async fn an_address_in_use_is_refused_with_the_flag_to_change_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let error = start(addr).await.expect_err("address is taken");
        assert!(error.to_string().contains("--mqtt-listen"), "{error}");
    }
}
