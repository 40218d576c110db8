//! Serving the HTTP router on its listener: HTTP/1.1 connections, each closed once idle, and
//! a bounded number of them open at once. An open connection costs the coordinator hyper's
//! buffers (about 16 KB, more while busy) whether it is used or not. In a rollout every
//! node of a wave opens a few; `axum::serve` kept each open until its client closed it.
//!
//! **Invariants:**
//! - At most [`MAX_CONNECTIONS`] connections are served at once. Further ones wait in the
//!   kernel's accept queue, which costs this process nothing, until one closes.
//! - A connection that has not sent a whole request head within [`IDLE_TIMEOUT`] of being
//!   accepted or of its previous response is closed. A request under way is never cut:
//!   bodies and responses are not timed here.
//! - On shutdown, no connection is accepted any more, idle ones close, and [`serve`]
//!   returns once the requests in flight have been answered. The caller bounds the wait.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Most HTTP connections served at once: a 1,000-node wave's worth at the agents' four
/// parallel fetches each, so the bound only shapes a larger burst or a misbehaving client,
/// and caps what idle connections can cost (~65 MB at ~16 KB each).
pub const MAX_CONNECTIONS: usize = 4096;

/// How long a connection may wait for its next request. Longer than the agents' own idle
/// timeout for chunk sources (`agent::fetch::http`), so that an agent closes first and never
/// sends a request on a connection the coordinator is closing.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait before accepting again after `accept` failed (out of file descriptors,
/// for one): trying again at once would spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `shutdown` completes and the requests in flight are
/// answered.
pub async fn serve(listener: TcpListener, router: Router, shutdown: impl Future<Output = ()>) {
    serve_bounded(listener, router, MAX_CONNECTIONS, IDLE_TIMEOUT, shutdown).await;
}

async fn serve_bounded(
    listener: TcpListener,
    router: Router,
    max_connections: usize,
    idle_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    // Built once and shared: a plain `Router` rebuilds its route table for every connection
    // it serves (`with_state` is what `into_make_service` does; ~2 KB per connection).
    let router: Router = router.with_state(());
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Some(idle_timeout));
    let open = Arc::new(Semaphore::new(max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = open.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    let retry_ms = ACCEPT_RETRY.as_millis();
                    tracing::warn!(%error, retry_ms, "cannot accept an HTTP connection");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "HTTP connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::*;

    /// Far beyond any wait the tests expect, so a slow machine does not fail them.
    const DEADLINE: Duration = Duration::from_secs(20);
    const REQUEST: &[u8] = b"GET /hello HTTP/1.1\r\nhost: test\r\n\r\n";

    async fn start(max_connections: usize, idle_timeout: Duration) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let router = Router::new().route("/hello", get(|| async { "hello" }));
        tokio::spawn(serve_bounded(
            listener,
            router,
            max_connections,
            idle_timeout,
            std::future::pending(),
        ));
        addr
    }

    /// Reads one response (headers and the 5-byte body "hello").
    async fn read_response(stream: &mut TcpStream) -> String {
        let mut seen = Vec::new();
        let mut buf = [0; 1024];
        while !seen.ends_with(b"hello") {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed before a whole response: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(seen).expect("UTF-8")
    }

    /// Waits for the server to close `stream`, panicking on any byte or after [`DEADLINE`].
    async fn closed_by_server(stream: &mut TcpStream) {
        let mut buf = [0; 64];
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
            .await
            .expect("the server closed the idle connection")
            .expect("read");
        assert_eq!(
            n,
            0,
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed() {
        let addr = start(8, Duration::from_millis(200)).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        closed_by_server(&mut stream).await;
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_closed_once_idle_after_its_responses() {
        let addr = start(8, Duration::from_millis(300)).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        for _ in 0..2 {
            stream.write_all(REQUEST).await.expect("write");
            let response = read_response(&mut stream).await;
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        }
        closed_by_server(&mut stream).await;
    }

    #[tokio::test]
    async fn a_connection_over_the_bound_is_served_once_another_closes() {
        let addr = start(1, DEADLINE * 2).await;
        let mut first = TcpStream::connect(addr).await.expect("connect");
        first.write_all(REQUEST).await.expect("write");
        read_response(&mut first).await;

        // The kernel completes the handshake; the server does not take the connection yet.
        let mut second = TcpStream::connect(addr).await.expect("connect");
        second.write_all(REQUEST).await.expect("write");
        let mut buf = [0; 64];
        let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
        assert!(
            early.is_err(),
            "answered while the bound was reached: {early:?}"
        );

        drop(first);
        let response = tokio::time::timeout(DEADLINE, read_response(&mut second))
            .await
            .expect("served once the first connection closed");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
}
