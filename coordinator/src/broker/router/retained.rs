//! A retained message as the router keeps it between subscribes: compressed when that saves
//! memory. Every node's retained command embeds its release's signed manifest, base64 twice
//! (an estimated 34 KB for a 10 MB release), and the payloads the broker held, a thousand
//! nodes' commands among them, were its largest allocation at a 1,000-node rollout. Hex
//! digests under base64 compress to about half (zstd level 1 on a model of such a command).
//! A retained message is read back only when a client subscribes to its topic (an agent:
//! once per connection), so decompression is rare; live delivery never goes through here.
//!
//! **Invariant:** [`Retained::message`] returns exactly the payload given to
//! [`Retained::new`], whether it was kept compressed or as it came.

use std::sync::Arc;

use bytes::Bytes;
use rumqttc::QoS;

use super::Message;

/// Payloads from this size on are tried compressed; below it the saving is not worth a frame.
const COMPRESS_FROM: usize = 4 * 1024;
/// zstd's fastest levels already get most of the saving on this text; the router
/// compresses under its lock.
const LEVEL: i32 = 1;

/// A topic's retained message.
#[derive(Debug)]
pub struct Retained {
    topic: Arc<str>,
    qos: QoS,
    payload: Payload,
}

#[derive(Debug)]
enum Payload {
    AsPublished(Bytes),
    Zstd { frame: Box<[u8]>, len: usize },
}

impl Retained {
    /// Keeps `payload` compressed if that saves at least a quarter of it.
    pub fn new(topic: Arc<str>, payload: Bytes, qos: QoS) -> Retained {
        let payload = match compress(&payload) {
            Some(frame) => Payload::Zstd {
                frame,
                len: payload.len(),
            },
            None => Payload::AsPublished(payload),
        };
        Retained {
            topic,
            qos,
            payload,
        }
    }

    pub fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    pub fn qos(&self) -> QoS {
        self.qos
    }

    /// The message to send a subscriber, at `qos`, with the retain flag set.
    pub fn message(&self, qos: QoS) -> Message {
        let payload = match &self.payload {
            Payload::AsPublished(bytes) => bytes.clone(),
            Payload::Zstd { frame, len } => Bytes::from(
                zstd::bulk::decompress(frame, *len)
                    .expect("a frame the router compressed itself decodes to its length"),
            ),
        };
        Message {
            topic: self.topic.clone(),
            payload,
            qos,
            retain: true,
        }
    }

    /// Bytes held for the payload.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        match &self.payload {
            Payload::AsPublished(bytes) => bytes.len(),
            Payload::Zstd { frame, .. } => frame.len(),
        }
    }
}

fn compress(payload: &[u8]) -> Option<Box<[u8]>> {
    if payload.len() < COMPRESS_FROM {
        return None;
    }
    let frame = zstd::bulk::compress(payload, LEVEL).ok()?;
    (frame.len() <= payload.len() / 4 * 3).then(|| frame.into_boxed_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(payload: Vec<u8>) -> Retained {
        let retained = Retained::new(
            Arc::from("t"),
            Bytes::from(payload.clone()),
            QoS::AtLeastOnce,
        );
        let message = retained.message(QoS::AtMostOnce);
        assert_eq!(message.payload, payload);
        assert_eq!(
            (&*message.topic, message.qos, message.retain),
            ("t", QoS::AtMostOnce, true)
        );
        retained
    }

    #[test]
    fn a_large_repetitive_payload_is_kept_compressed_and_given_back_whole() {
        let payload = b"{\"digest\":\"0123456789abcdef\",\"size\":65536},".repeat(1000);
        let len = payload.len();
        let retained = round_trip(payload);
        assert!(
            retained.held() < len / 4,
            "held {} of {len}",
            retained.held()
        );
    }

    #[test]
    fn small_and_incompressible_payloads_are_kept_as_published() {
        round_trip(b"small".to_vec());
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let noise: Vec<u8> = (0..64 * 1024)
            .map(|_| {
                // xorshift64: no structure zstd can use.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let len = noise.len();
        let retained = round_trip(noise);
        assert_eq!(retained.held(), len);
        let small = Retained::new(
            Arc::from("t"),
            Bytes::from_static(&[7; 100]),
            QoS::AtMostOnce,
        );
        assert_eq!(
            small.held(),
            100,
            "below the threshold, even a compressible payload"
        );
    }
}
