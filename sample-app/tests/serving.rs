//! The well-behaved app: files, health, version, metrics, and how it picks its address.

mod common;

use common::{sample, App};

#[tokio::test]
async fn files_of_the_root_are_served_byte_for_byte_with_their_length() {
    let root = tempfile::tempdir().unwrap();
    let big = common::pattern(9 * 1024 * 1024 + 17);
    std::fs::create_dir(root.path().join("media")).unwrap();
    std::fs::write(root.path().join("media/big.bin"), &big).unwrap();
    std::fs::write(root.path().join("empty"), b"").unwrap();
    let app = App::start(root.path(), &[]).await;

    let response = app.get("/files/media/big.bin").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.content_length(), Some(big.len() as u64));
    let body = response.bytes().await.unwrap();
    assert!(body[..] == big[..], "downloaded bytes differ");

    let (status, body) = app.text("/files/empty").await;
    assert_eq!((status, body.as_str()), (200, ""));
}

#[tokio::test]
async fn missing_files_and_directories_are_404() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("dir")).unwrap();
    let app = App::start(root.path(), &[]).await;
    assert_eq!(app.status("/files/nope").await, 404);
    assert_eq!(app.status("/files/dir").await, 404);
    assert_eq!(app.status("/files/").await, 404);
}

#[tokio::test]
async fn paths_that_escape_the_root_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("slot");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(parent.path().join("sibling"), b"sibling").unwrap();
    std::fs::write(root.join("real"), b"real").unwrap();
    std::os::unix::fs::symlink("real", root.join("inside-link")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), root.join("outside-link")).unwrap();
    let app = App::start(&root, &[]).await;

    assert_eq!(app.raw_status("/files/../sibling").await, 403);
    assert_eq!(app.raw_status("/files/%2e%2e/sibling").await, 403);
    assert_eq!(app.raw_status("/files/%2E%2E%2Fsibling").await, 403);
    assert_eq!(app.raw_status("/files/a/../../sibling").await, 403);
    assert_eq!(app.raw_status("/files//etc/passwd").await, 403);
    assert_eq!(app.raw_status("/files/%2Fetc%2Fpasswd").await, 403);
    assert_eq!(app.status("/files/outside-link").await, 403);
    // A symlink that stays inside the root is followed.
    assert_eq!(
        app.text("/files/inside-link").await,
        (200, "real".to_owned())
    );
}

#[tokio::test]
async fn health_version_and_index_answer() {
    let root = tempfile::tempdir().unwrap();
    let app = App::start(root.path(), &[("APP_VERSION", "2.4.1")]).await;
    assert_eq!(app.text("/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(app.text("/version").await, (200, "2.4.1\n".to_owned()));
    assert_eq!(app.text("/").await, (200, "sample-app 2.4.1\n".to_owned()));
    assert_eq!(
        app.text("/work?ms=5").await,
        (200, "worked 5 ms\n".to_owned())
    );
    assert_eq!(app.status("/work?ms=999999").await, 400);
    assert_eq!(app.status("/work?ms=abc").await, 400);
}

#[tokio::test]
async fn the_version_flag_wins_over_app_version() {
    let root = tempfile::tempdir().unwrap();
    let mut command = common::command(root.path());
    command
        .args(["--listen", "127.0.0.1:0", "--version-label", "from-flag"])
        .env("APP_VERSION", "from-env");
    let app = App::spawn(command).await;
    assert_eq!(app.text("/version").await.1, "from-flag\n");
}

#[tokio::test]
async fn metrics_count_traffic_but_not_control_requests() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("f"), b"x").unwrap();
    let app = App::start(root.path(), &[("APP_VERSION", "v7")]).await;
    let response = app.get("/metrics").await;
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let before = response.text().await.unwrap();
    for family in [
        "http_requests_total counter",
        "http_request_errors_total counter",
        "http_request_duration_seconds histogram",
        "process_uptime_seconds gauge",
        "app_info gauge",
    ] {
        assert!(before.contains(&format!("# TYPE {family}\n")), "{family}");
    }
    assert_eq!(sample(&before, r#"app_info{version="v7"}"#), 1.0);

    for path in ["/", "/work?ms=1", "/files/f", "/healthz", "/version"] {
        assert_eq!(app.status(path).await, 200, "{path}");
    }
    assert_eq!(app.status("/no-such-page").await, 404);
    let after = app.metrics().await;

    let ok = r#"http_requests_total{code="200"}"#;
    assert_eq!(
        sample(&after, ok) - sample(&before, ok),
        3.0,
        "/, /work, /files"
    );
    assert_eq!(sample(&after, r#"http_requests_total{code="404"}"#), 1.0);
    assert_eq!(sample(&after, "http_request_errors_total"), 0.0);
    let count = sample(&after, "http_request_duration_seconds_count");
    assert_eq!(count, 4.0);
    assert_eq!(
        sample(&after, r#"http_request_duration_seconds_bucket{le="+Inf"}"#),
        count
    );
    let buckets: Vec<f64> = after
        .lines()
        .filter(|l| l.starts_with("http_request_duration_seconds_bucket"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.len() > 5);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert!(sample(&after, "http_request_duration_seconds_sum") >= 0.001);
    assert!(sample(&after, "process_uptime_seconds") >= sample(&before, "process_uptime_seconds"));
}

#[tokio::test]
async fn port_comes_from_env_port_unless_listen_is_given() {
    let root = tempfile::tempdir().unwrap();
    // A port that was free a moment ago; the window for another process to take it is tiny.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = common::command(root.path());
    command.env("PORT", free.to_string());
    let app = App::spawn(command).await;
    assert_eq!(app.addr, ([127, 0, 0, 1], free).into());
    assert_eq!(app.status("/healthz").await, 200);

    // --listen wins over PORT (which here names the port just taken).
    let mut command = common::command(root.path());
    command
        .env("PORT", free.to_string())
        .args(["--listen", "127.0.0.1:0"]);
    let other = App::spawn(command).await;
    assert_ne!(other.addr.port(), free);
    assert_eq!(other.status("/healthz").await, 200);
}
