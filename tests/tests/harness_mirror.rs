//! The test mirror itself, at the HTTP byte level: each behaviour does what it claims, so the
//! `bad_mirrors` tests really face corrupt, cut, oversized, exploding and wrong bytes, error
//! statuses and resets. Runs without the coordinator or the agent.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use images::chunk::{compress, decompress_verified};
use images::{ChunkError, ChunkStore};
use protocol::format::{MAX_CHUNK_SIZE, MAX_COMPRESSED_CHUNK_SIZE};
use protocol::{ChunkRef, Digest};
use system_tests::mirror::{bomb, MirrorRequest};
use system_tests::{Behaviour, Mirror};

/// A store holding two chunks, and a mirror serving it.
struct Fixture {
    _dir: tempfile::TempDir,
    mirror: Mirror,
    chunks: Vec<(ChunkRef, Vec<u8>)>,
}

fn fixture() -> Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let store = ChunkStore::open(dir.path().join("chunks"))?;
    let mut chunks = Vec::new();
    for seed in [1u8, 2] {
        let plain: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
            .collect();
        let compressed = compress(&plain);
        let chunk = ChunkRef {
            digest: Digest::of(&plain),
            size: plain.len() as u32,
            zsize: compressed.len() as u32,
        };
        store.put_verified(&chunk, &compressed)?;
        chunks.push((chunk, compressed));
    }
    let mirror = Mirror::start()?;
    mirror.serve_from(store.dir())?;
    Ok(Fixture {
        _dir: dir,
        mirror,
        chunks,
    })
}

/// A response as read off the socket until the server closed it.
struct Response {
    status: u16,
    content_length: Option<usize>,
    body: Vec<u8>,
}

fn get(f: &Fixture, behaviour: Behaviour, digest: &Digest) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(f.mirror.addr())?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let path = format!(
        "{}/chunks/{digest}",
        f.mirror
            .url(behaviour)
            .trim_start_matches(&format!("http://{}", f.mirror.addr()))
    );
    write!(stream, "GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no response head"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let content_length = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    });
    Ok(Response {
        status,
        content_length,
        body: raw[end + 4..].to_vec(),
    })
}

#[test]
fn each_behaviour_sends_what_it_claims_and_every_request_is_logged() -> Result<()> {
    let f = fixture()?;
    let (chunk, stored) = &f.chunks[0];
    let (_, other) = &f.chunks[1];

    let good = get(&f, Behaviour::Serve, &chunk.digest)?;
    assert_eq!(good.status, 200);
    assert_eq!(&good.body, stored, "Serve must send the stored bytes");
    decompress_verified(chunk, &good.body)?;

    let corrupt = get(&f, Behaviour::Corrupt, &chunk.digest)?;
    assert_eq!((corrupt.status, corrupt.body.len()), (200, stored.len()));
    assert_ne!(&corrupt.body, stored);
    assert!(decompress_verified(chunk, &corrupt.body).is_err());

    let cut = get(&f, Behaviour::Truncate, &chunk.digest)?;
    assert_eq!(cut.content_length, Some(stored.len()));
    assert!(
        cut.body.len() < stored.len(),
        "Truncate sent the whole body"
    );

    let big = get(&f, Behaviour::Oversize, &chunk.digest)?;
    assert_eq!((big.status, big.content_length), (200, None));
    assert!(big.body.len() > MAX_COMPRESSED_CHUNK_SIZE);
    assert_eq!(&big.body[..stored.len()], stored.as_slice());

    let boom = get(&f, Behaviour::Bomb, &chunk.digest)?;
    assert_eq!(boom.body, bomb());
    assert!(boom.body.len() <= MAX_COMPRESSED_CHUNK_SIZE);
    // The real verifier decodes it within the window limit and stops at the chunk's size.
    let claimed = ChunkRef {
        size: MAX_CHUNK_SIZE as u32,
        ..*chunk
    };
    match decompress_verified(&claimed, &boom.body) {
        Err(ChunkError::Oversized { .. }) => {}
        other => bail!("the bomb is not an oversized frame to the verifier: {other:?}"),
    }

    let wrong = get(&f, Behaviour::WrongChunk, &chunk.digest)?;
    assert_eq!(wrong.status, 200);
    assert_eq!(
        &wrong.body, other,
        "WrongChunk must send the other stored chunk"
    );

    for code in [404, 500] {
        assert_eq!(
            get(&f, Behaviour::Status(code), &chunk.digest)?.status,
            code
        );
    }

    match get(&f, Behaviour::Reset, &chunk.digest) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => bail!("Reset gave another error: {e}"),
        Ok(r) => bail!("Reset answered with status {}", r.status),
    }

    let log: Vec<MirrorRequest> = f.mirror.requests();
    let behaviours: Vec<_> = log.iter().map(|r| r.behaviour).collect();
    assert_eq!(
        behaviours,
        [
            Behaviour::Serve,
            Behaviour::Corrupt,
            Behaviour::Truncate,
            Behaviour::Oversize,
            Behaviour::Bomb,
            Behaviour::WrongChunk,
            Behaviour::Status(404),
            Behaviour::Status(500),
            Behaviour::Reset,
        ]
        .map(Some)
    );
    assert!(log.iter().all(|r| r.digest == Some(chunk.digest)));
    Ok(())
}

#[test]
fn a_throttled_mirror_paces_its_responses() -> Result<()> {
    let f = fixture()?;
    let (chunk, stored) = &f.chunks[0];
    // At five bodies per second, one body takes 200 ms.
    let rate = (stored.len() as u64 * 5).max(1);
    f.mirror.set_rate(Some(rate));
    let start = std::time::Instant::now();
    let response = get(&f, Behaviour::Serve, &chunk.digest).context("throttled get")?;
    let took = start.elapsed();
    assert_eq!(&response.body, stored);
    assert!(
        took >= Duration::from_millis(150),
        "{} bytes at {rate} B/s arrived in {took:?}",
        stored.len()
    );
    Ok(())
}
