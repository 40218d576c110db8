//! Start and stop: crash knobs and graceful shutdown on SIGTERM.

mod common;

use common::App;
use tokio::io::AsyncReadExt as _;

#[tokio::test]
async fn crash_at_start_exits_with_status_1_and_says_why() {
    let root = tempfile::tempdir().unwrap();
    let mut app = App::start(root.path(), &[("APP_CRASH_AT_START", "1")]).await;
    let status = app.wait_exit().await;
    assert_eq!(status.code(), Some(1));
    app.wait_for_log("crashing at start because the crash_at_start knob")
        .await;
}

#[tokio::test]
async fn crash_after_secs_serves_then_exits_with_status_1() {
    let root = tempfile::tempdir().unwrap();
    let mut app = App::start(root.path(), &[("APP_CRASH_AFTER_SECS", "1")]).await;
    assert_eq!(app.status("/healthz").await, 200);
    let status = app.wait_exit().await;
    assert_eq!(status.code(), Some(1));
    app.wait_for_log("crashing because the crash_after_secs knob")
        .await;
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_download_finish_then_exits_0() {
    let root = tempfile::tempdir().unwrap();
    // Much larger than socket buffers, so the server is still writing when SIGTERM comes.
    let big = common::pattern(64 * 1024 * 1024);
    std::fs::write(root.path().join("big"), &big).unwrap();
    let mut app = App::start(root.path(), &[]).await;

    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"GET /files/big HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    app.send_sigterm();
    app.wait_for_log("SIGTERM").await;
    assert!(
        app.child.try_wait().unwrap().is_none(),
        "the app exited with a download in flight"
    );
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    let body_start = rest
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers")
        + 4;
    assert!(rest[body_start..] == big[..], "the download was cut short");

    let status = app.wait_exit().await;
    assert_eq!(status.code(), Some(0));
}
