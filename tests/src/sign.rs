//! Building commands and manifests the way the coordinator does, or deliberately not:
//! validly signed but hostile, signed by strangers, or altered after signing.

use anyhow::{Context as _, Result};
use ed25519_dalek::SigningKey;
use protocol::format::FORMAT_VERSION;
use protocol::manifest::{Entry, Manifest, RelPath, ReleaseKind};
use protocol::messages::{Action, Command};
use protocol::{Envelope, NodeId, Signed as _, TrustedKeys, PROTOCOL_VERSION};

use crate::fleet::release;
use crate::now;

/// A deploy command for `node` with sequence number `seq`, valid for an hour.
pub fn deploy_command(node: &NodeId, seq: u64, manifest: Envelope) -> Command {
    let issued_at = now();
    Command {
        protocol: PROTOCOL_VERSION,
        node: node.clone(),
        seq,
        issued_at,
        expires_at: issued_at + 3600,
        action: Action::Deploy {
            manifest,
            http_sources: Vec::new(),
        },
    }
}

/// A rollback command for `node` with sequence number `seq`, valid for an hour: what
/// `coordinator node rollback` sends, for a node the coordinator would not send it to.
pub fn rollback_command(node: &NodeId, seq: u64) -> Command {
    let issued_at = now();
    Command {
        protocol: PROTOCOL_VERSION,
        node: node.clone(),
        seq,
        issued_at,
        expires_at: issued_at + 3600,
        action: Action::Rollback {},
    }
}

/// A valid, signed manifest of a files-only release `app@version` holding one empty
/// directory: no chunks to fetch, so an agent that accepted a command carrying it would
/// switch to it at once.
pub fn harmless_manifest(app: &str, version: &str, key: &SigningKey) -> Result<Envelope> {
    let id = release(app, version)?;
    let manifest = Manifest {
        format: FORMAT_VERSION,
        app: id.app,
        version: id.version,
        kind: ReleaseKind::App,
        created_at: now(),
        entries: vec![Entry::Dir {
            path: RelPath::new("empty")?,
            mode: 0o755,
        }],
        run: None,
    };
    manifest.validate()?;
    Ok(Envelope::seal(&manifest, key))
}

/// Signs hand-written manifest JSON as it is, bypassing every check of the typed
/// [`Manifest`] (which refuses to hold a hostile path).
pub fn sign_raw_manifest(json: &serde_json::Value, key: &SigningKey) -> Envelope {
    let bytes = serde_json::to_vec(json).expect("JSON values serialize");
    Envelope::sign_bytes(Manifest::PAYLOAD_TYPE, &bytes, key)
}

/// Opens a command taken off the wire with the fleet's trusted keys.
pub fn open_command(bytes: &[u8], trust: &TrustedKeys) -> Result<Command> {
    Envelope::open_bytes::<Command>(bytes, trust).context("opening a command envelope")
}

/// A fresh key no agent trusts.
pub fn stranger_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

/// `envelope` with its payload replaced by `payload` and the original signature kept.
pub fn with_payload(envelope: &Envelope, payload: &[u8]) -> Envelope {
    use base64::Engine as _;
    Envelope {
        payload: base64::engine::general_purpose::STANDARD.encode(payload),
        ..envelope.clone()
    }
}

/// `manifest` as a `serde_json::Value`, for editing.
pub fn manifest_json(app: &str, version: &str, entries: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "format": FORMAT_VERSION,
        "app": app,
        "version": version,
        "kind": "app",
        "created_at": now(),
        "entries": entries,
    })
}
