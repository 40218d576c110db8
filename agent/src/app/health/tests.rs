use super::*;
use crate::app::ports::pick_free;
use crate::app::testing::{fast_policy, healthy_sample, sample_spec, spec, Dirs, DEADLINE};

/// The test's deadline for waits that should end well before it.
fn deadline() -> Instant {
    Instant::now() + DEADLINE
}

fn in_secs(secs: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(secs)
}

fn start(dirs: &Dirs, spec: &RunSpec, version: &str) -> (Supervisor, u16) {
    let port = pick_free(&[]).unwrap();
    let app = Supervisor::start(spec, dirs.launch(version, port), fast_policy()).unwrap();
    (app, port)
}

#[tokio::test]
async fn an_http_check_passes_on_2xx_and_quotes_the_answer_otherwise() {
    let dirs = Dirs::new();
    let healthy = healthy_sample(&dirs, "v1").await;
    let spec = sample_spec(&[]);
    check(&spec, healthy.port(), healthy.dir()).await.unwrap();

    let sick_spec = sample_spec(&[("APP_FAIL_HEALTH", "1")]);
    let (sick, port) = start(&dirs, &sick_spec, "v2");
    let error = wait_healthy(Some(&sick), &sick_spec, port, sick.dir(), in_secs(1.0))
        .await
        .unwrap_err();
    let HealthFailure::NotHealthy { last_error, .. } = &error else {
        panic!("{error}")
    };
    assert!(
        last_error.contains(&format!("GET http://127.0.0.1:{port}/healthz answered 503")),
        "{last_error}"
    );
    assert!(last_error.contains("fail_health knob"), "{last_error}");
    assert!(
        error.to_string().contains("did not become healthy"),
        "{error}"
    );
    healthy.stop(DEADLINE).await;
    sick.stop(DEADLINE).await;
}

#[tokio::test]
async fn a_tcp_check_needs_a_listener_and_works_without_a_supervisor() {
    let dirs = Dirs::new();
    let spec = spec(
        "bin/server",
        &[],
        serde_json::json!({ "health": { "tcp": true } }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    check(&spec, port, &dirs.slot()).await.unwrap();
    wait_healthy(None, &spec, port, &dirs.slot(), in_secs(5.0))
        .await
        .unwrap();
    drop(listener);
    let error = check(&spec, port, &dirs.slot()).await.unwrap_err();
    assert!(
        error.contains(&format!("TCP connect to 127.0.0.1:{port} failed")),
        "{error}"
    );
}

#[tokio::test]
async fn a_check_that_gets_no_answer_fails_at_its_timeout() {
    let dirs = Dirs::new();
    let spec = spec(
        "bin/server",
        &[],
        serde_json::json!({ "health": { "http": "/healthz", "timeout_ms": 100 } }),
    );
    // Accepts (the kernel does) but never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let started = Instant::now();
    let error = check(&spec, port, &dirs.slot()).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(error.contains("no answer within 100 ms"), "{error}");
    assert!(error.contains("/healthz"), "{error}");
}

#[tokio::test]
async fn a_command_check_runs_in_the_slot_with_the_port() {
    let dirs = Dirs::new();
    std::fs::write(dirs.slot().join("marker"), "").unwrap();
    let spec = spec(
        "bin/server",
        &[],
        serde_json::json!({ "health": { "command": ["/bin/sh", "-c", "test \"$FLEET_PORT\" = 4242 && test -f marker"] } }),
    );
    check(&spec, 4242, &dirs.slot()).await.unwrap();
    let error = check(&spec, 4243, &dirs.slot()).await.unwrap_err();
    assert!(error.contains("health hook"), "{error}");
    assert!(error.contains("exit status: 1"), "{error}");
}

#[tokio::test]
async fn a_version_that_crashes_at_start_fails_at_once_with_its_output() {
    let dirs = Dirs::new();
    let spec = sample_spec(&[("APP_CRASH_AT_START", "1")]);
    let (app, port) = start(&dirs, &spec, "v1");
    let started = Instant::now();
    let error = wait_healthy(Some(&app), &spec, port, app.dir(), deadline())
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "did not fail early: {error}"
    );
    let HealthFailure::Exited {
        exit: Exit::Status(status),
        output,
    } = &error
    else {
        panic!("{error}")
    };
    assert_eq!(status.code(), Some(1));
    assert!(
        output.iter().any(|l| l.contains("crashing at start")),
        "{output:?}"
    );
    assert!(error.to_string().contains("exit status: 1"), "{error}");
    app.stop(DEADLINE).await;
}

#[tokio::test]
async fn probation_passes_while_the_version_stays_healthy() {
    let dirs = Dirs::new();
    let app = healthy_sample(&dirs, "v1").await;
    let spec = sample_spec(&[]);
    hold_healthy(Some(&app), &spec, app.port(), app.dir(), in_secs(0.5))
        .await
        .unwrap();
    app.stop(DEADLINE).await;
}

#[tokio::test]
async fn probation_fails_when_the_version_crashes() {
    let dirs = Dirs::new();
    let spec = sample_spec(&[("APP_CRASH_AFTER_SECS", "1")]);
    let (app, port) = start(&dirs, &spec, "v1");
    wait_healthy(Some(&app), &spec, port, app.dir(), deadline())
        .await
        .unwrap();
    let error = hold_healthy(Some(&app), &spec, port, app.dir(), deadline())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, HealthFailure::Exited { exit: Exit::Status(s), .. } if s.code() == Some(1)),
        "{error}"
    );
    assert!(
        error
            .output()
            .iter()
            .any(|l| l.contains("crash_after_secs")),
        "{:?}",
        error.output()
    );
    app.stop(DEADLINE).await;
}

#[tokio::test]
async fn probation_fails_after_three_failed_checks_in_a_row() {
    let dirs = Dirs::new();
    std::fs::write(dirs.slot().join("healthy"), "").unwrap();
    let spec = spec(
        "/bin/sh",
        &["-c", "echo up; exec sleep 600"],
        serde_json::json!({ "health": { "command": ["/bin/sh", "-c", "test -f healthy"], "interval_ms": 50 } }),
    );
    let (app, port) = start(&dirs, &spec, "v1");
    wait_healthy(Some(&app), &spec, port, app.dir(), deadline())
        .await
        .unwrap();
    std::fs::remove_file(dirs.slot().join("healthy")).unwrap();
    let error = hold_healthy(Some(&app), &spec, port, app.dir(), deadline())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, HealthFailure::Unhealthy { failures: 3, .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("its last output line: up"),
        "{error}"
    );
    app.stop(DEADLINE).await;
}
