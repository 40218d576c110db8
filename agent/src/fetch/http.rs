//! One chunk over HTTP(S): `GET {base}/chunks/{hex digest}`, the body being the chunk's zstd
//! frame as the coordinator stores it. The same layout works for any static mirror or CDN.
//!
//! Invariant: a body is never buffered beyond [`MAX_COMPRESSED_CHUNK_SIZE`], whatever the
//! server claims or sends, so a hostile mirror cannot make the agent allocate at will.
//! Whether the bytes are the chunk is decided by the one verification path in `images`.

use std::time::Duration;

use protocol::format::MAX_COMPRESSED_CHUNK_SIZE;
use protocol::{ChunkRef, Digest};

/// How long to wait for a mirror to accept a connection before moving on.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most one chunk may take, headers to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection to a chunk source stays open unused. A stage reuses its
/// connections back to back, and each open one costs the coordinator its buffers. Kept
/// for 5 s, the connections of a wave that had just staged were still open when the next
/// wave opened its own: 1,000 nodes held over 4,000 at once. Shorter than the
/// coordinator's idle timeout (`coordinator::server::connections`), so the agent closes
/// first and never reuses a connection the server is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: HTTP {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    /// The server sent more than any chunk may be: bad bytes, not a bad link.
    #[error("{url}: body over the {limit}-byte limit for a compressed chunk")]
    TooLarge { url: String, limit: usize },
}

impl HttpError {
    /// Whether the server answered with bytes that cannot be the chunk (counted as a rejected
    /// chunk), as opposed to not answering properly at all.
    pub fn is_bad_bytes(&self) -> bool {
        matches!(self, HttpError::TooLarge { .. })
    }
}

/// The client every staging shares: one connection pool per process.
pub fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .user_agent(concat!("fleet-agent/", env!("CARGO_PKG_VERSION")))
        .build()
}

pub fn chunk_url(base: &str, digest: &Digest) -> String {
    format!("{}/chunks/{digest}", base.trim_end_matches('/'))
}

/// Fetches the compressed bytes the server has for `chunk`, unverified.
pub async fn get_chunk(
    client: &reqwest::Client,
    base: &str,
    chunk: &ChunkRef,
) -> Result<bytes::Bytes, HttpError> {
    let url = chunk_url(base, &chunk.digest);
    let unreachable = |source| HttpError::Unreachable {
        url: url.clone(),
        source,
    };
    let too_large = || HttpError::TooLarge {
        url: url.clone(),
        limit: MAX_COMPRESSED_CHUNK_SIZE,
    };
    let mut response = client.get(&url).send().await.map_err(unreachable)?;
    if !response.status().is_success() {
        return Err(HttpError::Status {
            status: response.status(),
            url,
        });
    }
    read_limited(
        &mut response,
        MAX_COMPRESSED_CHUNK_SIZE,
        chunk.zsize as usize,
    )
    .await
    .map_err(unreachable)?
    .ok_or_else(too_large)
}

/// Reads a response's body, or `None` as soon as it is known to exceed `limit` bytes
/// (claimed or sent): never more than `limit` bytes are held, whatever the server does.
/// `expected` sizes the first allocation when the server does not say.
pub async fn read_limited(
    response: &mut reqwest::Response,
    limit: usize,
    expected: usize,
) -> reqwest::Result<Option<bytes::Bytes>> {
    let claimed = response.content_length().unwrap_or(0);
    if claimed > limit as u64 {
        return Ok(None);
    }
    let mut body = bytes::BytesMut::with_capacity((claimed as usize).max(expected).min(limit));
    while let Some(piece) = response.chunk().await? {
        if body.len() + piece.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&piece);
    }
    Ok(Some(body.freeze()))
}
