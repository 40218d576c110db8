//! The knobs: injected errors and latency, failing health, and file versus environment.

mod common;

use common::{sample, App};

#[tokio::test]
async fn error_rate_one_fails_all_traffic_and_counts_errors_but_spares_control_endpoints() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("f"), b"x").unwrap();
    let app = App::start(root.path(), &[("APP_ERROR_RATE", "1.0")]).await;
    for path in ["/", "/work?ms=1", "/files/f", "/", "/"] {
        assert_eq!(app.status(path).await, 500, "{path}");
    }
    assert_eq!(app.status("/healthz").await, 200);
    assert_eq!(app.status("/version").await, 200);
    let metrics = app.metrics().await;
    assert_eq!(sample(&metrics, "http_request_errors_total"), 5.0);
    assert_eq!(sample(&metrics, r#"http_requests_total{code="500"}"#), 5.0);
    assert_eq!(sample(&metrics, r#"http_requests_total{code="200"}"#), 0.0);
}

#[tokio::test]
async fn a_partial_error_rate_fails_some_requests_only() {
    let root = tempfile::tempdir().unwrap();
    let app = App::start(root.path(), &[("APP_ERROR_RATE", "0.5"), ("APP_SEED", "1")]).await;
    let mut failed = 0;
    for _ in 0..100 {
        if app.status("/").await == 500 {
            failed += 1;
        }
    }
    // At p = 0.5 over 100 requests, outside 20..=80 has probability below 1e-9.
    assert!((20..=80).contains(&failed), "{failed} of 100 failed");
    assert_eq!(
        sample(&app.metrics().await, "http_request_errors_total"),
        f64::from(failed)
    );
}

#[tokio::test]
async fn fail_health_answers_503_while_traffic_still_works() {
    let root = tempfile::tempdir().unwrap();
    let app = App::start(root.path(), &[("APP_FAIL_HEALTH", "true")]).await;
    assert_eq!(app.status("/healthz").await, 503);
    assert_eq!(app.status("/").await, 200);
    assert_eq!(
        sample(&app.metrics().await, "http_request_errors_total"),
        0.0,
        "health checks are not traffic"
    );
}

#[tokio::test]
async fn added_latency_delays_traffic_and_shows_in_the_histogram() {
    let root = tempfile::tempdir().unwrap();
    let app = App::start(root.path(), &[("APP_ADDED_LATENCY_MS", "300")]).await;
    let started = std::time::Instant::now();
    assert_eq!(app.status("/").await, 200);
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    let metrics = app.metrics().await;
    assert!(sample(&metrics, "http_request_duration_seconds_sum") >= 0.3);
    assert_eq!(
        sample(
            &metrics,
            r#"http_request_duration_seconds_bucket{le="0.25"}"#
        ),
        0.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"http_request_duration_seconds_bucket{le="0.5"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn knobs_come_from_app_toml_in_the_root_and_the_environment_wins() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(
        root.path().join("app.toml"),
        "error_rate = 1.0\nfail_health = true\n",
    )
    .unwrap();
    let from_file = App::start(root.path(), &[]).await;
    assert_eq!(from_file.status("/").await, 500);
    assert_eq!(from_file.status("/healthz").await, 503);
    from_file
        .wait_for_log("knobs=error_rate=1 fail_health")
        .await;

    let overridden = App::start(root.path(), &[("APP_ERROR_RATE", "0")]).await;
    assert_eq!(overridden.status("/").await, 200);
    assert_eq!(overridden.status("/healthz").await, 503);
}

#[tokio::test]
async fn an_explicit_json_config_is_used() {
    let root = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("knobs.json");
    std::fs::write(&config, r#"{"fail_health": true}"#).unwrap();
    let mut command = common::command(root.path());
    command
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&config);
    let app = App::spawn(command).await;
    assert_eq!(app.status("/healthz").await, 503);
}

#[tokio::test]
async fn an_invalid_config_stops_the_app_before_it_listens_with_a_message_naming_the_file() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("app.toml"), "error_rate = 3\n").unwrap();
    let mut command = common::command(root.path());
    command.args(["--listen", "127.0.0.1:0"]);
    let output = tokio::time::timeout(common::DEADLINE, command.output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty(), "it must not claim to listen");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("app.toml") && stderr.contains("error_rate"),
        "{stderr}"
    );
}
