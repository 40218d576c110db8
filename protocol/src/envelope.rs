//! The signed envelope: DSSE-style, so there is nothing to canonicalise.
//!
//! The signature covers the pre-authentication encoding (PAE) of the payload type and the
//! exact payload bytes: `"DSSEv1" SP len(type) SP type SP len(payload) SP payload`. A
//! verifier checks the signature over the bytes it received and only then parses them.
//! Verification uses ed25519 `verify_strict` against provisioned keys only.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature as EdSignature, Signer as _, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::Digest;

/// A message type that travels signed, with the payload type that names it on the wire.
pub trait Signed: Serialize + DeserializeOwned {
    const PAYLOAD_TYPE: &'static str;
    /// Largest payload accepted for this type, in bytes, checked before parsing.
    const MAX_PAYLOAD_BYTES: usize;
}

/// A key's short, stable name: the first 16 hex digits of BLAKE3 over the public key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyId(pub String);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        KeyId(hex::encode(&blake3::hash(key.as_bytes()).as_bytes()[..8]))
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub keyid: KeyId,
    /// base64 of the 64-byte ed25519 signature.
    pub sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// base64 of the exact signed payload bytes.
    pub payload: String,
    pub signatures: Vec<Signature>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    #[error("envelope is not valid JSON: {0}")]
    Malformed(String),
    #[error("expected a {expected} payload, got {found:?}")]
    WrongPayloadType {
        expected: &'static str,
        found: String,
    },
    #[error("payload is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("no signature by a trusted key (signed by: {signers}); provision the key in trust.json or re-sign with a trusted key")]
    UnknownKey { signers: String },
    #[error("signature by trusted key {keyid} does not verify: the message was altered or forged")]
    BadSignature { keyid: KeyId },
    #[error("signature passed but the payload does not parse: {0}")]
    BadPayload(String),
}

/// DSSE's pre-authentication encoding.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(
        format!(
            "DSSEv1 {} {} {} ",
            payload_type.len(),
            payload_type,
            payload.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// Serializes `message` and signs the bytes with `key`.
    pub fn seal<T: Signed>(message: &T, key: &SigningKey) -> Envelope {
        let payload = serde_json::to_vec(message).expect("wire types always serialize");
        Envelope::sign_bytes(T::PAYLOAD_TYPE, &payload, key)
    }

    /// Signs arbitrary payload bytes; for tests that need a well-signed but hostile payload.
    pub fn sign_bytes(payload_type: &str, payload: &[u8], key: &SigningKey) -> Envelope {
        let sig: EdSignature = key.sign(&pae(payload_type, payload));
        Envelope {
            payload_type: payload_type.to_owned(),
            payload: BASE64.encode(payload),
            signatures: vec![Signature {
                keyid: KeyId::of(&key.verifying_key()),
                sig: BASE64.encode(sig.to_bytes()),
            }],
        }
    }

    /// Parses an envelope from the wire and opens it: see [`Envelope::open`].
    pub fn open_bytes<T: Signed>(bytes: &[u8], trust: &TrustedKeys) -> Result<T, EnvelopeError> {
        let envelope: Envelope =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        envelope.open(trust)
    }

    /// Checks the payload type, the size and a signature by a trusted key (`verify_strict`),
    /// and only then parses the payload.
    pub fn open<T: Signed>(&self, trust: &TrustedKeys) -> Result<T, EnvelopeError> {
        if self.payload_type != T::PAYLOAD_TYPE {
            return Err(EnvelopeError::WrongPayloadType {
                expected: T::PAYLOAD_TYPE,
                found: self.payload_type.chars().take(100).collect(),
            });
        }
        // base64 is 4/3 of the bytes: refuse before decoding anything oversized.
        let limit = T::MAX_PAYLOAD_BYTES;
        if self.payload.len() / 4 * 3 > limit + 3 {
            return Err(EnvelopeError::TooLarge {
                size: self.payload.len() / 4 * 3,
                limit,
            });
        }
        let payload = BASE64
            .decode(&self.payload)
            .map_err(|e| EnvelopeError::Malformed(format!("payload is not base64: {e}")))?;
        if payload.len() > limit {
            return Err(EnvelopeError::TooLarge {
                size: payload.len(),
                limit,
            });
        }
        let message = pae(&self.payload_type, &payload);
        let mut verified = false;
        for signature in &self.signatures {
            let Some(key) = trust.get(&signature.keyid) else {
                continue;
            };
            let sig = BASE64
                .decode(&signature.sig)
                .ok()
                .and_then(|bytes| EdSignature::from_slice(&bytes).ok())
                .ok_or_else(|| EnvelopeError::BadSignature {
                    keyid: signature.keyid.clone(),
                })?;
            key.verify_strict(&message, &sig)
                .map_err(|_| EnvelopeError::BadSignature {
                    keyid: signature.keyid.clone(),
                })?;
            verified = true;
        }
        if !verified {
            let signers: Vec<&str> = self.signatures.iter().map(|s| s.keyid.0.as_str()).collect();
            return Err(EnvelopeError::UnknownKey {
                signers: if signers.is_empty() {
                    "nobody".to_owned()
                } else {
                    signers.join(", ")
                },
            });
        }
        serde_json::from_slice(&payload).map_err(|e| EnvelopeError::BadPayload(e.to_string()))
    }

    /// The identity of what was signed: BLAKE3 over the payload exactly as carried (its
    /// canonical base64), so every party names a manifest by the same digest, whoever
    /// re-serializes the envelope around it.
    pub fn payload_digest(&self) -> Digest {
        Digest::of(self.payload.as_bytes())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("envelopes always serialize")
    }
}

/// The public keys an agent trusts, as provisioned in `trust.json`.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(KeyId, VerifyingKey)>,
}

#[derive(Serialize, Deserialize)]
struct TrustFile {
    version: u32,
    keys: Vec<TrustFileKey>,
}

#[derive(Serialize, Deserialize)]
struct TrustFileKey {
    keyid: KeyId,
    /// hex of the 32-byte ed25519 public key.
    public_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("trust file is not usable: {0}")]
pub struct TrustFileError(String);

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> TrustedKeys {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (KeyId::of(&k), k)).collect(),
        }
    }

    pub fn get(&self, keyid: &KeyId) -> Option<&VerifyingKey> {
        self.keys.iter().find(|(id, _)| id == keyid).map(|(_, k)| k)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Parses `trust.json`; refuses an empty key set and keys whose id does not match.
    pub fn from_json(bytes: &[u8]) -> Result<TrustedKeys, TrustFileError> {
        let file: TrustFile =
            serde_json::from_slice(bytes).map_err(|e| TrustFileError(e.to_string()))?;
        if file.version != 1 {
            return Err(TrustFileError(format!(
                "unsupported version {}",
                file.version
            )));
        }
        let mut keys = Vec::new();
        for k in file.keys {
            let mut raw = [0u8; 32];
            hex::decode_to_slice(&k.public_key, &mut raw)
                .map_err(|_| TrustFileError(format!("key {} is not 64 hex digits", k.keyid)))?;
            let key = VerifyingKey::from_bytes(&raw)
                .map_err(|_| TrustFileError(format!("key {} is not an ed25519 point", k.keyid)))?;
            if KeyId::of(&key) != k.keyid {
                return Err(TrustFileError(format!(
                    "key id {} does not match its key",
                    k.keyid
                )));
            }
            keys.push((k.keyid, key));
        }
        if keys.is_empty() {
            return Err(TrustFileError("it lists no keys".to_owned()));
        }
        Ok(TrustedKeys { keys })
    }

    pub fn to_json(&self) -> Vec<u8> {
        let file = TrustFile {
            version: 1,
            keys: self
                .keys
                .iter()
                .map(|(id, k)| TrustFileKey {
                    keyid: id.clone(),
                    public_key: hex::encode(k.as_bytes()),
                })
                .collect(),
        };
        serde_json::to_vec_pretty(&file).expect("trust files always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Hello {
        n: u32,
    }
    impl Signed for Hello {
        const PAYLOAD_TYPE: &'static str = "application/x-hello";
        const MAX_PAYLOAD_BYTES: usize = 64;
    }

    fn key() -> SigningKey {
        SigningKey::generate(&mut rand::rngs::OsRng)
    }

    #[test]
    fn a_sealed_message_opens_with_its_key_only() {
        let (k1, k2) = (key(), key());
        let env = Envelope::seal(&Hello { n: 7 }, &k1);
        let trust1 = TrustedKeys::new([k1.verifying_key()]);
        let trust2 = TrustedKeys::new([k2.verifying_key()]);
        assert_eq!(env.open::<Hello>(&trust1).unwrap(), Hello { n: 7 });
        assert!(matches!(
            env.open::<Hello>(&trust2),
            Err(EnvelopeError::UnknownKey { .. })
        ));
    }

    #[test]
    fn an_altered_payload_or_type_is_refused() {
        let k = key();
        let trust = TrustedKeys::new([k.verifying_key()]);
        let mut env = Envelope::seal(&Hello { n: 7 }, &k);
        env.payload = BASE64.encode(br#"{"n":8}"#);
        assert!(matches!(
            env.open::<Hello>(&trust),
            Err(EnvelopeError::BadSignature { .. })
        ));
        let mut env = Envelope::seal(&Hello { n: 7 }, &k);
        env.payload_type = "application/x-other".into();
        assert!(matches!(
            env.open::<Hello>(&trust),
            Err(EnvelopeError::WrongPayloadType { .. })
        ));
    }

    #[test]
    fn oversized_and_malformed_input_is_refused_before_parsing() {
        let k = key();
        let trust = TrustedKeys::new([k.verifying_key()]);
        let env = Envelope::sign_bytes(Hello::PAYLOAD_TYPE, &[b' '; 200], &k);
        assert!(matches!(
            env.open::<Hello>(&trust),
            Err(EnvelopeError::TooLarge { .. })
        ));
        assert!(matches!(
            Envelope::open_bytes::<Hello>(b"{not json", &trust),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    #[test]
    fn trust_file_round_trips_and_refuses_mismatched_ids() {
        let k = key();
        let trust = TrustedKeys::new([k.verifying_key()]);
        let parsed = TrustedKeys::from_json(&trust.to_json()).unwrap();
        assert!(parsed.get(&KeyId::of(&k.verifying_key())).is_some());
        let other = KeyId::of(&key().verifying_key());
        let tampered = String::from_utf8(trust.to_json())
            .unwrap()
            .replace(&KeyId::of(&k.verifying_key()).0, &other.0);
        assert!(TrustedKeys::from_json(tampered.as_bytes()).is_err());
    }
}
