//! The front door: the agent owns the service's public TCP port and forwards every
//! connection to the active version's private port on 127.0.0.1.
//!
//! A switch is [`FrontDoor::set_upstream`]: one store under a lock. Connections accepted
//! after it go to the new port; connections already open stay with the version they were
//! opened to until either side closes them, and [`FrontDoor::connections_to`] /
//! [`FrontDoor::wait_drained`] tell the daemon when an old version has none left and can be
//! stopped. The listener is never closed or re-bound by a switch, so no client is refused
//! while traffic moves; it closes only at [`FrontDoor::shutdown`] or drop.
//!
//! The proxy is plain TCP and parses nothing above it. Towards the client, where downloads
//! and streams flow, bytes move with `splice(2)` through a pipe and never enter the agent's
//! memory; towards the app they are copied through a [`UP_BUFFER`] buffer. So a connection
//! costs about 16 KiB of the agent's memory and four file descriptors (two sockets, one
//! pipe); when no pipe can be had (descriptors exhausted) it falls back to copying both
//! ways, adding a [`DOWN_BUFFER`] buffer. Give the agent a generous `LimitNOFILE`.
//! Connections with both ends on this host (to the app, and from a local client) use a
//! congestion control that does not pace (`unpace_if_local`).
//!
//! HTTP keep-alive connections stick to the version they were opened to: a busy
//! keep-alive client keeps an old version from draining, and when that version is stopped
//! anyway (after the daemon's drain deadline) its graceful shutdown closes the connection
//! between two requests. A client that sends its next request at that instant sees it fail
//! (HTTP/1.1's keep-alive race; browsers retry such requests, many HTTP libraries do not).
//! Clients that open a connection per request, and keep-alive clients whose connection is
//! idle at the stop, see no failure.
//!
//! **Invariant:** the choice of upstream for a connection and the count of connections per
//! upstream change under the same lock, so once `set_upstream(new)` has returned, every
//! connection that will ever go to the old port is already counted in
//! `connections_to(old)`.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::pipe::{
    fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags,
};
use tokio::io::{AsyncWriteExt as _, BufReader, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Copy buffer from the client to the app (requests are small).
pub const UP_BUFFER: usize = 16 * 1024;
/// Copy buffer from the app to the client (responses, streams, downloads), used only when
/// no pipe is available for `splice(2)`.
pub const DOWN_BUFFER: usize = 64 * 1024;
/// How long a connection stays open after the app closed its side while the client has
/// not closed its own.
pub const HALF_OPEN_LIMIT: Duration = Duration::from_secs(60);
/// The pipe capacity asked for each spliced connection: a large pipe moves a streamed
/// response in a quarter as many `splice(2)` calls and wake-ups as the default 64 KiB, which
/// is most of the proxy's cost. Linux caps it at `/proc/sys/fs/pipe-max-size` (1 MiB by
/// default); whatever the kernel grants is used.
const PIPE_CAPACITY: usize = 256 * 1024;

/// The congestion control of connections with both ends on this host: built into every
/// Linux kernel the agent runs on, allowed to unprivileged processes, and it does not pace.
const LOCAL_CONGESTION_CONTROL: &str = "cubic";

/// Pause after an accept error caused by exhausted resources (out of file descriptors),
/// so the loop does not spin while nothing can be accepted.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrontDoorError {
    #[error(
        "cannot listen on {addr} for the front door (run.front_door.listen): {source}; \
         is another program using the port, or does the agent lack the right to bind it?"
    )]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Counters since the door opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DoorStats {
    /// Connections accepted from clients.
    pub accepted: u64,
    /// Accepted connections closed at once because no version was set to receive them.
    pub no_upstream: u64,
    /// Accepted connections closed because the version's port refused them.
    pub upstream_failed: u64,
}

#[derive(Debug, Default)]
struct Routes {
    upstream: Option<u16>,
    /// Open connections per upstream port; a port with none has no entry.
    open: HashMap<u16, usize>,
}

#[derive(Debug, Default)]
struct Shared {
    routes: Mutex<Routes>,
    /// Woken whenever a connection closes.
    closed: Notify,
    accepted: AtomicU64,
    no_upstream: AtomicU64,
    upstream_failed: AtomicU64,
    /// Whether downloads are moved with `splice(2)` (see [`relay`]).
    splice: bool,
}

impl Shared {
    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        // Every update is a single statement on plain counters; a panic while holding the
        // lock cannot leave them half-changed.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Picks the current upstream for a new connection and counts it there.
    fn lease(self: &Arc<Self>) -> Option<Lease> {
        let mut routes = self.routes();
        let port = routes.upstream?;
        *routes.open.entry(port).or_default() += 1;
        Some(Lease {
            shared: self.clone(),
            port,
        })
    }
}

/// One connection counted against an upstream port until dropped.
struct Lease {
    shared: Arc<Shared>,
    port: u16,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut routes = self.shared.routes();
        if let Some(count) = routes.open.get_mut(&self.port) {
            *count -= 1;
            if *count == 0 {
                routes.open.remove(&self.port);
            }
        }
        drop(routes);
        self.shared.closed.notify_waiters();
    }
}

/// The public listener and its forwarding. Dropping it closes the port and cuts every
/// connection; [`FrontDoor::shutdown`] lets them finish first.
#[derive(Debug)]
pub struct FrontDoor {
    local: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<Duration>>,
    task: Option<JoinHandle<()>>,
}

impl FrontDoor {
    /// Binds `listen` and starts accepting. Until [`FrontDoor::set_upstream`] is called,
    /// accepted connections are closed at once (the port is open, nothing serves yet).
    pub async fn bind(listen: SocketAddr) -> Result<FrontDoor, FrontDoorError> {
        FrontDoor::bind_with(listen, true).await
    }

    /// [`FrontDoor::bind`], choosing whether downloads are spliced (the default) or copied
    /// through memory; tests compare the two.
    async fn bind_with(listen: SocketAddr, splice: bool) -> Result<FrontDoor, FrontDoorError> {
        let bind_error = |source| FrontDoorError::Bind {
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).await.map_err(bind_error)?;
        let local = listener.local_addr().map_err(bind_error)?;
        let shared = Arc::new(Shared {
            splice,
            ..Shared::default()
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(serve(listener, shared.clone(), stop_rx));
        tracing::info!(listen = %local, "front door open");
        Ok(FrontDoor {
            local,
            shared,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// The bound address (with the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends new connections to `127.0.0.1:port` from now on; returns the previous port.
    pub fn set_upstream(&self, port: u16) -> Option<u16> {
        let previous = self.shared.routes().upstream.replace(port);
        tracing::info!(upstream = port, previous, "front door switched");
        previous
    }

    /// Stops forwarding new connections (they are accepted and closed); returns the
    /// previous port. Open connections are not touched.
    pub fn clear_upstream(&self) -> Option<u16> {
        self.shared.routes().upstream.take()
    }

    /// The port new connections go to.
    pub fn upstream(&self) -> Option<u16> {
        self.shared.routes().upstream
    }

    /// Connections open to `port` right now.
    pub fn connections_to(&self, port: u16) -> usize {
        self.shared.routes().open.get(&port).copied().unwrap_or(0)
    }

    /// Waits until no connection is open to `port`, or `deadline`; returns whether it
    /// drained. Call it after switching away from `port`.
    pub async fn wait_drained(&self, port: u16, deadline: Instant) -> bool {
        loop {
            let closed = self.shared.closed.notified();
            tokio::pin!(closed);
            // Registered before the count is read, so a close in between is not missed.
            closed.as_mut().enable();
            if self.connections_to(port) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, closed).await.is_err() {
                return self.connections_to(port) == 0;
            }
        }
    }

    pub fn stats(&self) -> DoorStats {
        DoorStats {
            accepted: self.shared.accepted.load(Ordering::Relaxed),
            no_upstream: self.shared.no_upstream.load(Ordering::Relaxed),
            upstream_failed: self.shared.upstream_failed.load(Ordering::Relaxed),
        }
    }

    /// Closes the public port, lets open connections finish for up to `grace`, then cuts
    /// the rest.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(grace);
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for FrontDoor {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // Aborting drops the listener and the set of connection tasks, which aborts them.
            task.abort();
        }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<Duration>) {
    let mut connections = JoinSet::new();
    let grace = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    shared.accepted.fetch_add(1, Ordering::Relaxed);
                    match shared.lease() {
                        Some(lease) => {
                            connections.spawn(forward(client, peer, lease));
                        }
                        None => {
                            shared.no_upstream.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, "no version to forward to; closing the connection");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "front door cannot accept a connection");
                    if is_resource_exhaustion(&error) {
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                }
            },
            // Reap finished connections so the set holds only open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            grace = &mut stop => break grace.unwrap_or(Duration::ZERO),
        }
    };
    drop(listener);
    tracing::info!(
        open = connections.len(),
        "front door closed; letting open connections finish"
    );
    let finished = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::info!(
            cut = connections.len(),
            "front door grace over; cutting connections"
        );
    }
}

fn is_resource_exhaustion(error: &io::Error) -> bool {
    use rustix::io::Errno;
    [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM]
        .iter()
        .any(|errno| error.raw_os_error() == Some(errno.raw_os_error()))
}

async fn forward(mut client: TcpStream, peer: SocketAddr, mut lease: Lease) {
    let mut upstream = match TcpStream::connect((Ipv4Addr::LOCALHOST, lease.port)).await {
        Ok(upstream) => upstream,
        Err(error) => {
            // The door may have been switched while this connection was being opened, to
            // the version that is stopping: one more try to wherever the door points now.
            let retried = match lease.shared.lease() {
                Some(newer) if newer.port != lease.port => {
                    lease = newer;
                    TcpStream::connect((Ipv4Addr::LOCALHOST, lease.port))
                        .await
                        .ok()
                }
                _ => None,
            };
            match retried {
                Some(upstream) => upstream,
                None => {
                    lease.shared.upstream_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, upstream = lease.port, %error, "the version refused the connection; closing it");
                    return;
                }
            }
        }
    };
    // Small writes (requests, interactive protocols) must not wait for Nagle.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    unpace_if_local(&upstream);
    if peer.ip().is_loopback() {
        unpace_if_local(&client);
    }
    match relay(&mut client, &mut upstream, lease.shared.splice).await {
        Ok((up, down)) => {
            tracing::trace!(%peer, upstream = lease.port, up, down, "connection closed")
        }
        Err(error) => {
            tracing::debug!(%peer, upstream = lease.port, %error, "connection ended with an error")
        }
    }
}

/// Gives a socket whose both ends are on this host a congestion control that does not
/// pace ([`LOCAL_CONGESTION_CONTROL`]).
///
/// A pacing one (BBR, a common system default) spaces its sends with timers to suit a
/// network path's bottleneck; on loopback there is none, and the gaps it leaves cost each
/// hop about a third of its throughput (direct downloads from the app: 2.4 vs 3.6 GB/s on
/// the 2-core bench machine). The door would add a second paced hop to every local
/// client's stream. Connections to remote clients keep the system's choice.
fn unpace_if_local(socket: &TcpStream) {
    if let Err(error) = rustix::net::sockopt::set_tcp_congestion(socket, LOCAL_CONGESTION_CONTROL) {
        tracing::debug!(%error, "cannot set {LOCAL_CONGESTION_CONTROL} on a local connection; keeping the system's congestion control");
    }
}

/// Forwards both ways until both sides have finished sending, passing on each half-close.
/// Returns the bytes sent up (to the app) and down (to the client).
///
/// Downwards, where downloads and streams flow, bytes move socket → pipe → socket with
/// `splice(2)` and never enter the agent's memory; upwards (requests) they are copied
/// through a small buffer. Without a pipe (out of file descriptors) both ways are copied.
///
/// Once the app has closed its side, the client gets [`HALF_OPEN_LIMIT`] to close its
/// own: a client that vanished without a word would otherwise hold the connection (and
/// keep an old version from draining) for good.
async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    splice: bool,
) -> io::Result<(u64, u64)> {
    let pipe = match splice.then(|| pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)) {
        Some(Ok((pipe_out, pipe_in))) => {
            // A refused resize (the per-user pipe quota is spent) leaves the default size.
            let capacity = fcntl_setpipe_size(&pipe_in, PIPE_CAPACITY)
                .or_else(|_| fcntl_getpipe_size(&pipe_in))
                .unwrap_or(64 * 1024);
            Some((pipe_out, pipe_in, capacity))
        }
        Some(Err(error)) => {
            tracing::debug!(%error, "no pipe for zero-copy forwarding; copying instead");
            None
        }
        None => None,
    };
    let (client_read, mut client_write) = client.split();
    let (upstream_read, mut upstream_write) = upstream.split();
    let up = async {
        let mut reader = BufReader::with_capacity(UP_BUFFER, client_read);
        let sent = tokio::io::copy_buf(&mut reader, &mut upstream_write).await?;
        upstream_write.shutdown().await?;
        Ok::<_, io::Error>(sent)
    };
    let down = async {
        let sent = match &pipe {
            Some(pipe) => splice_all(upstream_read.as_ref(), client_write.as_ref(), pipe).await?,
            None => {
                let mut reader = BufReader::with_capacity(DOWN_BUFFER, upstream_read);
                tokio::io::copy_buf(&mut reader, &mut client_write).await?
            }
        };
        client_write.shutdown().await?;
        Ok::<_, io::Error>(sent)
    };
    tokio::pin!(up, down);
    let (mut sent_up, mut sent_down) = (None, None);
    loop {
        tokio::select! {
            sent = &mut up, if sent_up.is_none() => sent_up = Some(sent?),
            sent = &mut down, if sent_down.is_none() => sent_down = Some(sent?),
            () = tokio::time::sleep(HALF_OPEN_LIMIT), if sent_down.is_some() => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not close its side after the app closed its own",
                ));
            }
        }
        if let (Some(up), Some(down)) = (sent_up, sent_down) {
            return Ok((up, down));
        }
    }
}

/// Moves everything `from` sends to `to` through `pipe` until `from` ends its side.
///
/// The pipe is always drained before it is filled again, so a `WouldBlock` while filling
/// means `from` has nothing to read and one while draining means `to` cannot take more;
/// that is what lets tokio's readiness tracking ([`TcpStream::try_io`]) stay exact.
async fn splice_all(
    from: &TcpStream,
    to: &TcpStream,
    (pipe_out, pipe_in, capacity): &(OwnedFd, OwnedFd, usize),
) -> io::Result<u64> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut total = 0;
    loop {
        let filled = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from, None, pipe_in, None, *capacity, flags).map_err(io::Error::from)
            }) {
                Ok(filled) => break filled,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        };
        if filled == 0 {
            return Ok(total);
        }
        let mut left = filled;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe_out, None, to, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(moved) => left -= moved,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        }
        total += filled as u64;
    }
}

#[cfg(test)]
mod tests;
