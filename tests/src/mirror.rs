//! A chunk mirror for tests: an HTTP server that serves the coordinator's chunks at
//! `{base}/chunks/{digest}`, or misbehaves in one of the ways a broken or hostile mirror can,
//! and logs every request it gets.
//!
//! One server answers for every [`Behaviour`] at once: the behaviour is the first level of
//! the URL ([`Mirror::url`]), so a release published with `--mirror` pointing at
//! `http://ADDR/corrupt` gets corrupt bytes, while `http://ADDR/serve` gets good ones.
//!
//! Plain `std::net` with a thread per connection and `Connection: close` on every answer:
//! misbehaving needs control of the raw bytes on the socket (a body cut short, a body longer
//! than declared, a reset), which a framework would hide. Every read has a timeout, so a
//! stuck client costs a thread for a few seconds, never the test.

use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use images::ChunkStore;
use protocol::format::{MAX_CHUNK_SIZE, MAX_COMPRESSED_CHUNK_SIZE, ZSTD_WINDOW_LOG_MAX};
use protocol::Digest;

/// Longest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// How long a connection may sit idle.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes a throttled response writes between pauses.
const THROTTLE_PIECE: usize = 16 * 1024;
/// What the decompression bomb inflates to.
const BOMB_SIZE: usize = 64 * 1024 * 1024;
const _: () = assert!(BOMB_SIZE > 64 * MAX_CHUNK_SIZE);

/// What the mirror does with a request for a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Behaviour {
    /// The chunk exactly as the coordinator stores it.
    Serve,
    /// The chunk with bytes flipped all along it (same length).
    Corrupt,
    /// Declares the chunk's full length, sends half of it and closes the connection.
    Truncate,
    /// The chunk followed by padding, four times [`MAX_COMPRESSED_CHUNK_SIZE`] in all, with
    /// no declared length (the body ends when the connection closes).
    Oversize,
    /// A valid zstd frame, within the format's window limit and without a content size in
    /// its header, that inflates to [`BOMB_SIZE`]: far beyond any chunk.
    Bomb,
    /// The valid, stored bytes of another chunk.
    WrongChunk,
    /// This HTTP status and a short text body.
    Status(u16),
    /// Resets the connection (RST) before answering.
    Reset,
}

impl Behaviour {
    fn slug(self) -> String {
        match self {
            Behaviour::Serve => "serve".into(),
            Behaviour::Corrupt => "corrupt".into(),
            Behaviour::Truncate => "truncate".into(),
            Behaviour::Oversize => "oversize".into(),
            Behaviour::Bomb => "bomb".into(),
            Behaviour::WrongChunk => "wrong-chunk".into(),
            Behaviour::Status(code) => format!("status-{code}"),
            Behaviour::Reset => "reset".into(),
        }
    }

    fn from_slug(slug: &str) -> Option<Behaviour> {
        Some(match slug {
            "serve" => Behaviour::Serve,
            "corrupt" => Behaviour::Corrupt,
            "truncate" => Behaviour::Truncate,
            "oversize" => Behaviour::Oversize,
            "bomb" => Behaviour::Bomb,
            "wrong-chunk" => Behaviour::WrongChunk,
            "reset" => Behaviour::Reset,
            _ => Behaviour::Status(slug.strip_prefix("status-")?.parse().ok()?),
        })
    }

    /// Whether the client receives a complete HTTP 200 response with bytes that are not the
    /// chunk (as opposed to an error status, a broken connection or a good chunk).
    pub fn sends_bad_bytes(self) -> bool {
        matches!(
            self,
            Behaviour::Corrupt | Behaviour::Oversize | Behaviour::Bomb | Behaviour::WrongChunk
        )
    }
}

/// One request the mirror received, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorRequest {
    /// The request target as sent.
    pub target: String,
    /// The behaviour its URL asked for; `None` for a URL outside the mirror's layout.
    pub behaviour: Option<Behaviour>,
    /// The chunk asked for; `None` for a URL outside the mirror's layout.
    pub digest: Option<Digest>,
}

struct Shared {
    chunks: RwLock<Option<ChunkStore>>,
    log: Mutex<Vec<MirrorRequest>>,
    /// Bytes per second per response; `None` is unlimited.
    rate: Mutex<Option<u64>>,
}

/// A running mirror; stops accepting connections when dropped.
pub struct Mirror {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Mirror {
    /// A mirror on a free port of 127.0.0.1. It answers 503 until [`Mirror::serve_from`].
    pub fn start() -> Result<Mirror> {
        Mirror::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// A mirror on a free port of `ip`.
    pub fn start_on(ip: IpAddr) -> Result<Mirror> {
        let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            chunks: RwLock::new(None),
            log: Mutex::new(Vec::new()),
            rate: Mutex::new(None),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accept = std::thread::Builder::new()
            .name(format!("mirror {addr}"))
            .spawn({
                let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
                move || accept_loop(&listener, &shared, &stop)
            })?;
        Ok(Mirror {
            addr,
            shared,
            stop,
            accept: Some(accept),
        })
    }

    /// Serves chunks from the chunk store at `dir` (the coordinator's `DATA/chunks`).
    pub fn serve_from(&self, dir: &Path) -> Result<()> {
        let store = ChunkStore::open(dir)
            .with_context(|| format!("opening the chunk store {}", dir.display()))?;
        *self
            .shared
            .chunks
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(store);
        Ok(())
    }

    /// The base URL that gets `behaviour`: give it to `release publish --mirror`.
    pub fn url(&self, behaviour: Behaviour) -> String {
        format!("http://{}/{}", self.addr, behaviour.slug())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Caps each response at `bytes_per_sec`; `None` lifts the cap.
    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        *self
            .shared
            .rate
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = bytes_per_sec;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<MirrorRequest> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many requests arrived so far.
    pub fn request_count(&self) -> usize {
        self.shared
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The chunks requested at the URL of `behaviour`, in arrival order, repeats included.
    pub fn requested(&self, behaviour: Behaviour) -> Vec<Digest> {
        self.requests()
            .into_iter()
            .filter(|r| r.behaviour == Some(behaviour))
            .filter_map(|r| r.digest)
            .collect()
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, stop: &AtomicBool) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let shared = Arc::clone(shared);
        // A client that misbehaves only loses its own connection.
        let _ = std::thread::Builder::new()
            .name("mirror connection".into())
            .spawn(move || {
                let _ = handle(stream, &shared);
            });
    }
}

fn handle(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let Some((head_len, target)) = peek_head(&stream)? else {
        return Ok(());
    };
    let (behaviour, digest) = parse_target(&target);
    shared
        .log
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(MirrorRequest {
            target,
            behaviour,
            digest,
        });
    if behaviour == Some(Behaviour::Reset) {
        // Closing a socket whose received data was never read makes the kernel send RST
        // instead of FIN: the request is still unread, since the head was only peeked.
        drop(stream);
        return Ok(());
    }
    let mut head = vec![0u8; head_len];
    stream.read_exact(&mut head)?;

    let (Some(behaviour), Some(digest)) = (behaviour, digest) else {
        return respond(&mut stream, 404, b"not a chunk URL", None);
    };
    if let Behaviour::Status(code) = behaviour {
        return respond(
            &mut stream,
            code,
            format!("mirror says {code}").as_bytes(),
            None,
        );
    }
    let (chunk, other) = {
        let store = shared.chunks.read().unwrap_or_else(PoisonError::into_inner);
        let Some(store) = store.as_ref() else {
            return respond(&mut stream, 503, b"mirror has no chunk store yet", None);
        };
        let chunk = store.get(&digest).ok().flatten();
        let other = if behaviour == Behaviour::WrongChunk {
            other_chunk(store, &digest)
        } else {
            None
        };
        (chunk, other)
    };
    let Some(chunk) = chunk else {
        return respond(
            &mut stream,
            404,
            format!("no chunk {digest}").as_bytes(),
            None,
        );
    };
    let rate = *shared.rate.lock().unwrap_or_else(PoisonError::into_inner);
    match behaviour {
        Behaviour::Serve => respond(&mut stream, 200, &chunk, rate),
        Behaviour::Corrupt => {
            let mut bad = chunk;
            for byte in bad.iter_mut().step_by(61) {
                *byte ^= 0xa5;
            }
            respond(&mut stream, 200, &bad, rate)
        }
        Behaviour::Truncate => {
            write_head(&mut stream, 200, Some(chunk.len()))?;
            write_body(&mut stream, &chunk[..chunk.len() / 2], rate)?;
            stream.shutdown(Shutdown::Both)
        }
        Behaviour::Oversize => {
            let mut body = chunk;
            body.resize(4 * MAX_COMPRESSED_CHUNK_SIZE, 0);
            write_head(&mut stream, 200, None)?;
            write_body(&mut stream, &body, rate)?;
            stream.shutdown(Shutdown::Both)
        }
        Behaviour::Bomb => respond(&mut stream, 200, bomb(), rate),
        Behaviour::WrongChunk => match other {
            Some(other) => respond(&mut stream, 200, &other, rate),
            None => respond(&mut stream, 404, b"no other chunk to send instead", None),
        },
        Behaviour::Status(_) | Behaviour::Reset => unreachable!("answered above"),
    }
}

/// Peeks (without consuming) until a whole request head is buffered: its length and the
/// request target. `None` when the client closed or sent no HTTP request.
fn peek_head(stream: &TcpStream) -> io::Result<Option<(usize, String)>> {
    let mut buf = vec![0u8; MAX_HEAD];
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let n = stream.peek(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]);
            let target = head
                .lines()
                .next()
                .and_then(|line| line.split_whitespace().nth(1))
                .unwrap_or_default()
                .to_owned();
            return Ok(Some((end + 4, target)));
        }
        if n == MAX_HEAD || Instant::now() >= deadline {
            return Ok(None);
        }
        // More of the head is on its way; `peek` returns at once while anything is buffered.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `/{behaviour}/chunks/{64 hex}` → its parts.
fn parse_target(target: &str) -> (Option<Behaviour>, Option<Digest>) {
    let mut levels = target.trim_start_matches('/').splitn(3, '/');
    let behaviour = levels.next().and_then(Behaviour::from_slug);
    let digest = match (levels.next(), levels.next()) {
        (Some("chunks"), Some(hex)) => hex.parse().ok(),
        _ => None,
    };
    (behaviour, digest)
}

/// Some stored chunk other than `digest`.
fn other_chunk(store: &ChunkStore, digest: &Digest) -> Option<Vec<u8>> {
    let other = store.digests().ok()?.into_iter().find(|d| d != digest)?;
    store.get(&other).ok().flatten()
}

fn respond(stream: &mut TcpStream, status: u16, body: &[u8], rate: Option<u64>) -> io::Result<()> {
    write_head(stream, status, Some(body.len()))?;
    write_body(stream, body, rate)?;
    stream.flush()
}

fn write_head(stream: &mut TcpStream, status: u16, length: Option<usize>) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/zstd\r\nConnection: close\r\n"
    );
    if let Some(length) = length {
        head += &format!("Content-Length: {length}\r\n");
    }
    head += "\r\n";
    stream.write_all(head.as_bytes())
}

fn write_body(stream: &mut TcpStream, body: &[u8], rate: Option<u64>) -> io::Result<()> {
    let Some(rate) = rate else {
        return stream.write_all(body);
    };
    let start = Instant::now();
    let mut sent = 0usize;
    for piece in body.chunks(THROTTLE_PIECE) {
        stream.write_all(piece)?;
        sent += piece.len();
        // Pace against the start, so rounding does not accumulate.
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(())
}

/// The decompression bomb [`Behaviour::Bomb`] sends: [`BOMB_SIZE`] zeros in one zstd frame with
/// the format's largest window and no content size, so a decoder learns how big it is only
/// by decoding. Built once.
pub fn bomb() -> &'static [u8] {
    static BOMB: OnceLock<Vec<u8>> = OnceLock::new();
    BOMB.get_or_init(|| {
        let build = || -> io::Result<Vec<u8>> {
            let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
            encoder.include_contentsize(false)?;
            encoder.window_log(ZSTD_WINDOW_LOG_MAX)?;
            let zeros = vec![0u8; 1024 * 1024];
            for _ in 0..BOMB_SIZE / zeros.len() {
                encoder.write_all(&zeros)?;
            }
            encoder.finish()
        };
        let bomb = build().expect("compressing zeros in memory cannot fail");
        assert!(
            bomb.len() <= MAX_COMPRESSED_CHUNK_SIZE,
            "the bomb ({} bytes) must pass the compressed-size check",
            bomb.len()
        );
        bomb
    })
}
