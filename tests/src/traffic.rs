//! HTTP clients for the app behind an agent's front door: one request ([`http_get`]), and
//! steady traffic from several threads ([`Traffic`]) that records every failed request and
//! the order in which each client saw the answers change, so a test can say "no request
//! failed during the switch, and every client went from v1 to v2 and never back". And load
//! that follows one node's active version wherever its switch hook put it ([`NodeTraffic`]),
//! so many agents on one machine each serve traffic and report metrics of their own.
//!
//! Plain HTTP/1.1 over `std::net`, one connection per request (`Connection: close`), so each
//! request goes through the front door's accept and upstream choice anew.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::wait::wait_until;

/// How long one request of [`Traffic`] may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two requests of one [`Traffic`] client: steady load without starving the
/// agent and the app of the (few) CPUs the tests share.
const PACE: Duration = Duration::from_millis(10);
/// Failures kept per client, with their time and reason; the rest are only counted.
const KEEP_FAILURES: usize = 20;
/// Largest response accepted.
const MAX_RESPONSE: u64 = 1 << 20;

/// A response: its status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// `GET http://ADDR{path}` on a new connection, bounded by `timeout` per step (connect,
/// write, each read). Fails on any I/O error or a malformed response; any status is an
/// [`Answer`].
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Answer> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("sending GET {path} to {addr}"))?;
    let mut response = Vec::new();
    stream
        .take(MAX_RESPONSE)
        .read_to_end(&mut response)
        .with_context(|| {
            format!(
                "reading the answer to GET {path} from {addr} ({} bytes before the error)",
                response.len()
            )
        })?;
    parse_response(&response).with_context(|| {
        format!(
            "the answer to GET {path} from {addr}: {:?}",
            String::from_utf8_lossy(&response[..response.len().min(200)])
        )
    })
}

fn parse_response(bytes: &[u8]) -> Result<Answer> {
    let text = std::str::from_utf8(bytes).context("not UTF-8")?;
    if text.is_empty() {
        bail!("the connection closed without an answer");
    }
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers"))?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("no status code in {status_line:?}"))?;
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    if let Some(length) = length {
        if body.len() != length {
            bail!(
                "the body has {} bytes, Content-Length says {length}",
                body.len()
            );
        }
    }
    Ok(Answer {
        status,
        body: body.to_owned(),
    })
}

/// The body of `GET /version` (the sample app's version label), trimmed; fails unless the
/// status is 200.
pub fn version_at(addr: SocketAddr) -> Result<String> {
    let answer = http_get(addr, "/version", Duration::from_secs(2))?;
    if answer.status != 200 {
        bail!(
            "GET /version on {addr} answered {}: {}",
            answer.status,
            answer.body.trim()
        );
    }
    Ok(answer.body.trim().to_owned())
}

/// What one [`Traffic`] client saw.
#[derive(Debug, Clone, Default)]
pub struct ClientLog {
    /// Requests answered 200.
    pub ok: u64,
    /// Requests that failed (no answer, a broken one, or a status other than 200).
    pub failed: u64,
    /// The first failures: when (since the traffic started) and why.
    pub failures: Vec<String>,
    /// The bodies answered, in order, with consecutive repeats merged: `[("1", 120),
    /// ("2", 80)]` is 120 answers of "1" then 80 of "2".
    pub runs: Vec<(String, u64)>,
}

impl ClientLog {
    /// The distinct bodies in the order they were seen (`["1", "2"]`).
    pub fn sequence(&self) -> Vec<&str> {
        self.runs.iter().map(|(body, _)| body.as_str()).collect()
    }
}

/// Threads sending `GET path` to one address back to back until [`Traffic::stop`].
pub struct Traffic {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Requests finished per client, either way.
    done: Vec<Arc<AtomicU64>>,
    clients: Vec<JoinHandle<ClientLog>>,
}

impl Traffic {
    /// Starts `clients` threads, each sending one request at a time.
    pub fn start(addr: SocketAddr, path: &str, clients: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut done = Vec::with_capacity(clients);
        let mut handles = Vec::with_capacity(clients);
        for _ in 0..clients {
            let counter = Arc::new(AtomicU64::new(0));
            done.push(counter.clone());
            let stop = stop.clone();
            let path = path.to_owned();
            handles.push(std::thread::spawn(move || {
                let mut log = ClientLog::default();
                while !stop.load(Ordering::Relaxed) {
                    match http_get(addr, &path, REQUEST_TIMEOUT) {
                        Ok(answer) if answer.status == 200 => {
                            log.ok += 1;
                            let body = answer.body.trim();
                            match log.runs.last_mut() {
                                Some((last, count)) if last == body => *count += 1,
                                _ => log.runs.push((body.to_owned(), 1)),
                            }
                        }
                        outcome => {
                            log.failed += 1;
                            if log.failures.len() < KEEP_FAILURES {
                                let why = match outcome {
                                    Ok(answer) => {
                                        format!("status {}: {}", answer.status, answer.body.trim())
                                    }
                                    Err(e) => format!("{e:#}"),
                                };
                                log.failures.push(format!(
                                    "after {:.3}s: {why}",
                                    started.elapsed().as_secs_f64()
                                ));
                            }
                        }
                    }
                    counter.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(PACE);
                }
                log
            }));
        }
        Traffic {
            addr,
            stop,
            done,
            clients: handles,
        }
    }

    /// Waits until every client has finished `more` requests after this call, so each has
    /// seen the system as it is now.
    pub fn wait_for_requests(&self, more: u64, timeout: Duration) -> Result<()> {
        let from: Vec<u64> = self
            .done
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .collect();
        wait_until(
            timeout,
            format_args!(
                "each of {} clients of {} to finish {more} more requests",
                self.done.len(),
                self.addr
            ),
            || {
                Ok(self
                    .done
                    .iter()
                    .zip(&from)
                    .all(|(d, from)| d.load(Ordering::Relaxed) >= from + more))
            },
        )
    }

    /// Stops the clients and returns what each saw.
    pub fn stop(mut self) -> Result<TrafficReport> {
        self.stop.store(true, Ordering::Relaxed);
        let mut clients = Vec::with_capacity(self.clients.len());
        for handle in std::mem::take(&mut self.clients) {
            clients.push(
                handle
                    .join()
                    .map_err(|_| anyhow!("a traffic client thread panicked"))?,
            );
        }
        Ok(TrafficReport {
            addr: self.addr,
            clients,
        })
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        // Threads not joined by `stop` end at their next request.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What all the clients of a [`Traffic`] saw.
#[derive(Debug, Clone)]
pub struct TrafficReport {
    pub addr: SocketAddr,
    pub clients: Vec<ClientLog>,
}

impl TrafficReport {
    pub fn ok(&self) -> u64 {
        self.clients.iter().map(|c| c.ok).sum()
    }

    pub fn failed(&self) -> u64 {
        self.clients.iter().map(|c| c.failed).sum()
    }

    /// Fails unless no request failed and every client saw exactly the answers `sequence`,
    /// in that order (each at least once, none again after the next one appeared).
    pub fn assert_clean(&self, sequence: &[&str]) -> Result<()> {
        let mut problems = Vec::new();
        for (i, client) in self.clients.iter().enumerate() {
            if client.failed > 0 {
                problems.push(format!(
                    "client {i}: {} of {} requests failed: {}",
                    client.failed,
                    client.failed + client.ok,
                    client.failures.join("; ")
                ));
            }
            if client.sequence() != sequence {
                problems.push(format!(
                    "client {i} saw the answers {:?}, not {sequence:?}",
                    client.runs
                ));
            }
        }
        if !problems.is_empty() {
            bail!(
                "traffic to {} ({} ok, {} failed):\n  {}",
                self.addr,
                self.ok(),
                self.failed(),
                problems.join("\n  ")
            );
        }
        Ok(())
    }
}

/// One client thread sending `GET /` to a node's active version, about 30 requests a second,
/// re-reading the port from the node's [`crate::app_release::SERVING_PORT_FILE`] (written by
/// [`crate::AppRelease::serving_port_hook`]) before each request. Failures are not recorded:
/// this is load for the node's metrics, not a check of its switches.
pub struct NodeTraffic {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl NodeTraffic {
    /// Pause between two requests.
    const PACE: Duration = Duration::from_millis(15);

    /// Starts the client for the agent whose data directory is `data_dir`.
    pub fn start(data_dir: &Path) -> NodeTraffic {
        let port_file = data_dir.join(crate::app_release::SERVING_PORT_FILE);
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, answered) = (stop.clone(), answered.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(addr) = serving_addr(&port_file) {
                        if http_get(addr, "/", Duration::from_secs(2)).is_ok() {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(NodeTraffic::PACE);
                }
            }
        });
        NodeTraffic {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    /// Requests answered so far (any status).
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for NodeTraffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serving_addr(port_file: &Path) -> Option<SocketAddr> {
    let port: u16 = std::fs::read_to_string(port_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(SocketAddr::from(([127, 0, 0, 1], port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_its_status_and_its_body() {
        let answer =
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx: y\r\n\r\n1\n").expect("ok");
        assert_eq!(
            answer,
            Answer {
                status: 200,
                body: "1\n".to_owned()
            }
        );
    }

    #[test]
    fn a_cut_or_empty_response_is_an_error() {
        assert!(parse_response(b"").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n1\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
