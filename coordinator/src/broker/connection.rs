//! One MQTT 3.1.1 client connection of the embedded broker: the CONNECT handshake, then a
//! reader (packets in, handed to the router) and a writer (the session's queue out) running
//! together until either ends. The router holds all state; nothing here outlives the
//! connection except what it put there.
//!
//! A payload is written straight from the shared buffer it was published in, never copied
//! per subscriber; only the few bytes of each packet's header are built here.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut as _, BytesMut};
use protocol::format::MAX_MQTT_PACKET;
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::{ConnAck, ConnectReturnCode, Packet, PubAck, QoS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tracing::Instrument as _;

use super::router::{valid_publish_topic, ConnectionId, Outgoing, Router, Work};

/// How long a new connection has to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A read buffer's starting size; it grows to the largest packet the client sends.
const READ_BUFFER: usize = 4 * 1024;
/// An empty read buffer larger than this is given back rather than kept for the life of
/// the connection (one manifest-sized command would otherwise cost that much per client).
const READ_BUFFER_KEPT: usize = 64 * 1024;
/// Small packets are gathered up to this size before a write; larger payloads go straight
/// to the socket.
const WRITE_BUFFER: usize = 4 * 1024;
/// Most packets taken from the router per lock.
const WRITE_BATCH: usize = 64;

/// How a connection ended, as far as the will is concerned.
enum End {
    /// The client sent DISCONNECT: its will is discarded.
    Graceful,
    /// Anything else: the will is published (if the connection still owned its session).
    Lost(String),
}

/// Serves one client until it disconnects, fails, or is taken over.
pub async fn serve(stream: TcpStream, peer: SocketAddr, router: Arc<Mutex<Router>>) {
    // Replies and small messages must not wait for Nagle's timer.
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = stream.into_split();
    let mut buffer = BytesMut::with_capacity(READ_BUFFER);

    let connect = match tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut reader, &mut buffer))
        .await
    {
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Ok(other)) => {
            tracing::warn!(%peer, packet = ?packet_name(&other), "MQTT client did not start with CONNECT; closing");
            return;
        }
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "MQTT connection closed before CONNECT");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "MQTT client sent no CONNECT in time; closing");
            return;
        }
    };

    let client_id = if connect.client_id.is_empty() {
        if !connect.clean_session {
            // MQTT 3.1.1 §3.1.3.1: a persistent session needs a client id to come back to.
            refuse(writer, ConnectReturnCode::BadClientId).await;
            return;
        }
        format!("anonymous-{peer}")
    } else {
        connect.client_id
    };
    let id = {
        let mut router = lock(&router);
        let connected = router.connect(&client_id, connect.clean_session);
        router.reply(
            &connected.id,
            Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::Success,
                connected.session_present,
            )),
        );
        connected.id
    };
    let span = tracing::debug_span!("mqtt", client = %client_id, %peer);
    span.in_scope(|| tracing::debug!(clean = connect.clean_session, "MQTT client connected"));

    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive));
    let end = async {
        tokio::select! {
            end = read_loop(reader, buffer, &router, &id, keep_alive) => end,
            end = write_loop(writer, &router, &id) => end,
        }
    }
    .instrument(span.clone())
    .await;
    let _entered = span.enter();

    let mut router = lock(&router);
    let dropped = router.dropped(&id.client);
    let owned = router.disconnect(&id);
    match end {
        End::Graceful => tracing::debug!(dropped, "MQTT client disconnected"),
        End::Lost(reason) => {
            tracing::debug!(%reason, dropped, "MQTT connection lost");
            if let (true, Some(will)) = (owned, connect.last_will) {
                if valid_publish_topic(&will.topic) {
                    router.publish(&will.topic, will.message, will.qos, will.retain);
                }
            }
        }
    }
}

/// The router's lock. A panic while holding it leaves no half-applied change that a
/// connection could not cope with (each method changes one session or table at a time),
/// so a poisoned lock is taken as it is rather than taking the broker down.
fn lock(router: &Mutex<Router>) -> MutexGuard<'_, Router> {
    router
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn refuse(mut writer: OwnedWriteHalf, code: ConnectReturnCode) {
    let mut bytes = BytesMut::new();
    if Packet::ConnAck(ConnAck::new(code, false))
        .write(&mut bytes, MAX_MQTT_PACKET)
        .is_ok()
    {
        let _ = writer.write_all(&bytes).await;
    }
}

/// Reads one whole packet, growing `buffer` as the packet's header says it needs.
async fn read_packet(
    reader: &mut OwnedReadHalf,
    buffer: &mut BytesMut,
) -> Result<Packet, CodecError> {
    loop {
        match Packet::read(buffer, MAX_MQTT_PACKET) {
            Err(CodecError::InsufficientBytes(needed)) => {
                buffer.reserve(needed.max(READ_BUFFER));
                if reader.read_buf(buffer).await? == 0 {
                    return Err(CodecError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
            }
            result => return result,
        }
    }
}

async fn read_loop(
    mut reader: OwnedReadHalf,
    mut buffer: BytesMut,
    router: &Mutex<Router>,
    id: &ConnectionId,
    keep_alive: Duration,
) -> End {
    loop {
        let packet = if keep_alive.is_zero() {
            read_packet(&mut reader, &mut buffer).await
        } else {
            // MQTT 3.1.1 §3.1.2.10: one and a half keep-alive periods of silence end it.
            match tokio::time::timeout(keep_alive * 3 / 2, read_packet(&mut reader, &mut buffer))
                .await
            {
                Ok(packet) => packet,
                Err(_) => return End::Lost("keep-alive expired".to_owned()),
            }
        };
        let packet = match packet {
            Ok(packet) => packet,
            Err(error) => return End::Lost(error.to_string()),
        };
        if buffer.is_empty() && buffer.capacity() > READ_BUFFER_KEPT {
            buffer = BytesMut::with_capacity(READ_BUFFER);
        }
        let mut router = lock(router);
        match packet {
            Packet::Publish(publish) => {
                if !valid_publish_topic(&publish.topic) {
                    return End::Lost(format!("invalid topic {:?}", publish.topic));
                }
                if publish.qos == QoS::ExactlyOnce {
                    return End::Lost("QoS 2 is not supported by the embedded broker".to_owned());
                }
                router.publish(&publish.topic, publish.payload, publish.qos, publish.retain);
                if publish.qos == QoS::AtLeastOnce {
                    router.reply(id, Packet::PubAck(PubAck::new(publish.pkid)));
                }
            }
            Packet::PubAck(ack) => router.acknowledge(id, ack.pkid),
            Packet::Subscribe(subscribe) => {
                let filters: Vec<(String, QoS)> = subscribe
                    .filters
                    .into_iter()
                    .map(|f| (f.path, f.qos))
                    .collect();
                router.subscribe(id, subscribe.pkid, &filters);
            }
            Packet::Unsubscribe(unsubscribe) => {
                router.unsubscribe(id, unsubscribe.pkid, &unsubscribe.topics);
            }
            Packet::PingReq => router.reply(id, Packet::PingResp),
            Packet::Disconnect => return End::Graceful,
            other => {
                return End::Lost(format!("unexpected {} from a client", packet_name(&other)));
            }
        }
    }
}

async fn write_loop(writer: OwnedWriteHalf, router: &Mutex<Router>, id: &ConnectionId) -> End {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, writer);
    let mut header = BytesMut::with_capacity(64);
    loop {
        let work = lock(router).next_work(id, WRITE_BATCH);
        let result = match work {
            Work::Closed => return End::Lost("session taken over".to_owned()),
            Work::Wait(wake) => {
                if let Err(error) = out.flush().await {
                    return End::Lost(error.to_string());
                }
                wake.notified().await;
                continue;
            }
            Work::Send(batch) => write_batch(&mut out, &mut header, batch).await,
        };
        if let Err(error) = result {
            return End::Lost(error.to_string());
        }
    }
}

async fn write_batch(
    out: &mut BufWriter<OwnedWriteHalf>,
    header: &mut BytesMut,
    batch: Vec<Outgoing>,
) -> std::io::Result<()> {
    for item in batch {
        header.clear();
        match item {
            Outgoing::Reply(packet) => {
                packet
                    .write(header, MAX_MQTT_PACKET)
                    .map_err(std::io::Error::other)?;
                out.write_all(header).await?;
            }
            Outgoing::Deliver { message, pkid, dup } => {
                publish_header(
                    header,
                    &message.topic,
                    message.qos,
                    message.retain,
                    dup,
                    pkid,
                    message.payload.len(),
                );
                out.write_all(header).await?;
                out.write_all(&message.payload).await?;
            }
        }
    }
    Ok(())
}

/// A PUBLISH packet up to its payload: fixed header, topic and (for QoS 1) packet id.
fn publish_header(
    header: &mut BytesMut,
    topic: &str,
    qos: QoS,
    retain: bool,
    dup: bool,
    pkid: u16,
    payload_len: usize,
) {
    let pkid_len = if qos == QoS::AtMostOnce { 0 } else { 2 };
    header.put_u8(0b0011_0000 | u8::from(dup) << 3 | (qos as u8) << 1 | u8::from(retain));
    let mut remaining = 2 + topic.len() + pkid_len + payload_len;
    // MQTT's variable-length integer: 7 bits a byte, low bits first.
    loop {
        let mut byte = (remaining % 128) as u8;
        remaining /= 128;
        if remaining > 0 {
            byte |= 0x80;
        }
        header.put_u8(byte);
        if remaining == 0 {
            break;
        }
    }
    let topic_len = u16::try_from(topic.len()).expect("topics were read from a u16 length");
    header.put_u16(topic_len);
    header.put_slice(topic.as_bytes());
    if pkid_len > 0 {
        header.put_u16(pkid);
    }
}

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rumqttc::Publish;

    #[test]
    fn a_publish_header_and_payload_are_the_packet_the_codec_reads() {
        for (qos, payload_len) in [
            (QoS::AtMostOnce, 0),
            (QoS::AtLeastOnce, 127),
            (QoS::AtLeastOnce, 128),
            (QoS::AtMostOnce, 300_000),
        ] {
            let payload = Bytes::from(vec![7u8; payload_len]);
            let mut packet = BytesMut::new();
            publish_header(&mut packet, "fleet/a/b", qos, true, true, 9, payload_len);
            packet.extend_from_slice(&payload);
            let Packet::Publish(read) = Packet::read(&mut packet, MAX_MQTT_PACKET).expect("reads")
            else {
                panic!("not a publish");
            };
            let mut expected = Publish::from_bytes("fleet/a/b", qos, payload);
            expected.retain = true;
            expected.dup = true;
            expected.pkid = if qos == QoS::AtMostOnce { 0 } else { 9 };
            assert_eq!(read, expected);
            assert!(packet.is_empty());
        }
    }
}
