use std::os::unix::process::ExitStatusExt as _;

use super::*;
use crate::app::testing::{alive, eventually, fast_policy, spec, Dirs, DEADLINE};

fn sh(script: &str) -> RunSpec {
    spec("/bin/sh", &["-c", script], serde_json::json!({}))
}

async fn wait_status(app: &Supervisor, what: &str, done: impl Fn(&Status) -> bool) -> Status {
    let mut rx = app.subscribe();
    let status = tokio::time::timeout(DEADLINE, rx.wait_for(|s| done(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}; status {:?}", app.status()))
        .expect("the supervisor publishes until stopped")
        .clone();
    status
}

async fn wait_for_line(app: &Supervisor, line: &str) {
    eventually(&format!("the app to print {line:?}"), || async {
        app.last_output().iter().any(|l| l == line).then_some(())
    })
    .await;
}

fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn running_pid(status: &Status) -> Option<u32> {
    match status.phase {
        Phase::Running { pid, .. } => Some(pid),
        _ => None,
    }
}

#[tokio::test]
async fn the_app_runs_in_its_slot_with_its_port_and_names_and_a_clean_environment() {
    let dirs = Dirs::new();
    let spec = spec(
        "/bin/sh",
        &["-c", "echo \"$PORT $FLEET_PORT $FLEET_SLOT $FLEET_VERSION $GREETING $(pwd)\"; env; exec sleep 600"],
        serde_json::json!({ "env": { "GREETING": "hi", "PORT": "overridden?" } }),
    );
    let app = Supervisor::start(&spec, dirs.launch("v1", 4321), fast_policy()).unwrap();
    let slot = std::fs::canonicalize(dirs.slot()).unwrap();
    let expected = format!("4321 4321 app-v1 v1 hi {}", slot.display());
    let output = eventually("the app's first line", || async {
        let output = app.last_output();
        output.contains(&expected).then_some(output)
    })
    .await;
    for line in &output[1..] {
        let Some((name, _)) = line.split_once('=') else {
            continue;
        };
        assert!(
            crate::app::INHERITED_ENV.contains(&name)
                || name.starts_with("FLEET_")
                || ["PORT", "GREETING", "PWD", "SHLVL", "_"].contains(&name),
            "{name} leaked from the agent's environment"
        );
    }
    assert!(matches!(app.status().phase, Phase::Running { .. }));
    app.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_command_path_inside_the_slot_is_run_from_the_slot() {
    let dirs = Dirs::new();
    std::fs::create_dir(dirs.slot().join("bin")).unwrap();
    let script = dirs.slot().join("bin/server");
    std::fs::write(&script, "#!/bin/sh\necho server on $PORT\nexec sleep 600\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let spec = spec("bin/server", &[], serde_json::json!({}));
    let app = Supervisor::start(&spec, dirs.launch("v1", 4000), fast_policy()).unwrap();
    wait_for_line(&app, "server on 4000").await;
    app.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_missing_command_fails_to_start_with_the_path_and_what_to_check() {
    let dirs = Dirs::new();
    let spec = spec("bin/missing", &[], serde_json::json!({}));
    let error = Supervisor::start(&spec, dirs.launch("v1", 4000), fast_policy()).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("bin/missing"), "{message}");
    assert!(message.contains("app-v1"), "{message}");
    assert!(message.contains("run.command"), "{message}");
    assert!(!dirs.run().join("app-v1.pid").exists());
}

#[tokio::test]
async fn an_exiting_app_is_restarted_with_growing_backoff_and_three_quick_exits_are_a_crash_loop() {
    let dirs = Dirs::new();
    // Backoffs of 100, 200, 400 ms leave the test ample time to see each status.
    let policy = RestartPolicy {
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(10),
        ..fast_policy()
    };
    let app = Supervisor::start(
        &sh("echo starting; exit 3"),
        dirs.launch("v1", 4000),
        policy,
    )
    .unwrap();
    let first = wait_status(&app, "the first exit", |s| s.exits == 1).await;
    assert!(!first.crash_loop);
    let status = wait_status(&app, "a crash loop", |s| s.crash_loop).await;
    assert_eq!(status.exits, 3);
    assert_eq!(status.restarts, 2);
    let Some(Exit::Status(exit)) = &status.last_exit else {
        panic!("{status:?}")
    };
    assert_eq!(exit.code(), Some(3));
    assert!(
        matches!(status.phase, Phase::Exited { restart_in, .. } if restart_in == Duration::from_millis(400)),
        "{status:?}"
    );
    let output = app.last_output();
    assert!(
        output.len() >= 3 && output.iter().all(|l| l == "starting"),
        "{output:?}"
    );
    app.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_backoff_is_capped_and_a_long_enough_run_clears_the_crash_loop() {
    let dirs = Dirs::new();
    // Exits three times, then stays up: the run counter lives in the slot.
    let script = "n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; \
                  echo run $n; [ $n -ge 4 ] && exec sleep 600; exit 1";
    let policy = RestartPolicy {
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(150),
        reset_after: Duration::from_millis(300),
        crash_loop_exits: 3,
        crash_loop_window: Duration::from_secs(60),
    };
    let app = Supervisor::start(&sh(script), dirs.launch("v1", 4000), policy).unwrap();
    let looping = wait_status(&app, "a crash loop", |s| s.crash_loop).await;
    assert_eq!(looping.exits, 3);
    assert!(
        matches!(looping.phase, Phase::Exited { restart_in, .. } if restart_in == Duration::from_millis(150)),
        "100, then capped at 150: {looping:?}"
    );
    let cleared = wait_status(&app, "the crash loop to clear", |s| {
        !s.crash_loop && running_pid(s).is_some()
    })
    .await;
    assert_eq!(cleared.restarts, 3);
    assert_eq!(app.last_output().last().map(String::as_str), Some("run 4"));
    app.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn stop_sends_sigterm_to_the_group_and_removes_the_pid_file() {
    let dirs = Dirs::new();
    // The shell forwards nothing: the `sleep` child must get SIGTERM through the group.
    let script =
        "sleep 600 & echo $! > child.pid; trap 'echo got TERM; exit 0' TERM; echo ready; wait";
    let app = Supervisor::start(&sh(script), dirs.launch("v1", 4000), fast_policy()).unwrap();
    wait_for_line(&app, "ready").await;
    let pid = running_pid(&app.status()).unwrap();
    let child = read_pid(&dirs.slot().join("child.pid"));
    let record = eventually("the pid file", || async {
        std::fs::read_to_string(dirs.run().join("app-v1.pid")).ok()
    })
    .await;
    assert!(record.starts_with(&format!("{pid} ")), "{record}");
    let output = app.output();
    let exit = app.stop(Duration::from_secs(10)).await;
    assert!(
        matches!(exit, Some(Exit::Status(s)) if s.code() == Some(0)),
        "{exit:?}"
    );
    assert!(
        output.lines().contains(&"got TERM".to_owned()),
        "{:?}",
        output.lines()
    );
    eventually("the child to die", || async {
        (!alive(child)).then_some(())
    })
    .await;
    assert!(!dirs.run().join("app-v1.pid").exists());
}

#[tokio::test]
async fn a_process_that_ignores_sigterm_is_killed_after_the_timeout() {
    let dirs = Dirs::new();
    let app = Supervisor::start(
        &sh("trap '' TERM; echo ready; while :; do sleep 0.05; done"),
        dirs.launch("v1", 4000),
        fast_policy(),
    )
    .unwrap();
    wait_for_line(&app, "ready").await;
    let pid = running_pid(&app.status()).unwrap();
    let started = std::time::Instant::now();
    let exit = app.stop(Duration::from_millis(300)).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        matches!(exit, Some(Exit::Status(s)) if s.signal() == Some(9)),
        "{exit:?}"
    );
    assert!(!alive(pid));
}

#[tokio::test]
async fn stopping_during_the_backoff_does_not_restart_and_reports_the_last_exit() {
    let dirs = Dirs::new();
    let policy = RestartPolicy {
        first_backoff: Duration::from_secs(600),
        ..fast_policy()
    };
    let app = Supervisor::start(&sh("exit 7"), dirs.launch("v1", 4000), policy).unwrap();
    wait_status(&app, "the exit", |s| {
        matches!(s.phase, Phase::Exited { .. })
    })
    .await;
    let mut rx = app.subscribe();
    let exit = app.stop(Duration::from_secs(5)).await;
    assert!(
        matches!(exit, Some(Exit::Status(s)) if s.code() == Some(7)),
        "{exit:?}"
    );
    let last = rx.borrow_and_update().clone();
    assert_eq!(last.restarts, 0);
    assert!(matches!(last.phase, Phase::Stopped { .. }), "{last:?}");
}

#[tokio::test]
async fn dropping_a_supervisor_kills_its_process_group() {
    let dirs = Dirs::new();
    let app = Supervisor::start(
        &sh("sleep 600 & echo $! > child.pid; echo ready; wait"),
        dirs.launch("v1", 4000),
        fast_policy(),
    )
    .unwrap();
    wait_for_line(&app, "ready").await;
    let pid = running_pid(&app.status()).unwrap();
    let child = read_pid(&dirs.slot().join("child.pid"));
    eventually("the pid file", || async {
        dirs.run().join("app-v1.pid").exists().then_some(())
    })
    .await;
    drop(app);
    eventually("the app and its child to die", || async {
        (!alive(pid) && !alive(child)).then_some(())
    })
    .await;
    assert!(!dirs.run().join("app-v1.pid").exists());
}

/// Starts `sleep 600` in its own group the way the supervisor does, as a previous agent
/// would have left it, with its pid file.
fn leftover(run_dir: &Path, slot: &str, start_ticks: Option<u64>) -> tokio::process::Child {
    let child = tokio::process::Command::new("/bin/sleep")
        .arg("600")
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let start = start_ticks.unwrap_or_else(|| read_stat(pid).unwrap().start_ticks);
    std::fs::create_dir_all(run_dir).unwrap();
    crate::journal::write_atomic(
        &run_dir.join(format!("{slot}.pid")),
        format!("{pid} {start}\n").as_bytes(),
    )
    .unwrap();
    child
}

#[tokio::test]
async fn kill_stale_kills_a_recorded_leftover_and_spares_a_reused_pid() {
    let dirs = Dirs::new();
    let mut ours = leftover(&dirs.run(), "app-v1", None);
    let ours_pid = ours.id().unwrap();
    let mut stranger = leftover(&dirs.run(), "app-v0", Some(1));
    let stranger_pid = stranger.id().unwrap();
    std::fs::write(dirs.run().join("garbled.pid"), "not a pid").unwrap();

    // The leftovers are this test's children, so it reaps them while kill_stale waits.
    let run_dir = dirs.run();
    let (killed, status) = tokio::join!(kill_stale(&run_dir, Duration::from_secs(5)), ours.wait());
    assert_eq!(
        killed.unwrap(),
        [Stale {
            slot: "app-v1".to_owned(),
            pid: ours_pid
        }]
    );
    assert_eq!(status.unwrap().signal(), Some(15), "SIGTERM comes first");
    assert!(
        alive(stranger_pid),
        "a pid whose start time differs is not ours"
    );
    assert_eq!(
        std::fs::read_dir(dirs.run()).unwrap().count(),
        0,
        "every pid file is removed"
    );
    stranger.kill().await.unwrap();
}

#[tokio::test]
async fn kill_stale_kills_a_leftover_whose_pid_file_was_never_renamed() {
    let dirs = Dirs::new();
    let mut ours = leftover(&dirs.run(), "app-v2", None);
    let ours_pid = ours.id().unwrap();
    // The agent was killed between writing the temp file and renaming it.
    std::fs::rename(
        dirs.run().join("app-v2.pid"),
        dirs.run().join(".app-v2.pid.tmp"),
    )
    .unwrap();
    let run_dir = dirs.run();
    let (killed, status) = tokio::join!(kill_stale(&run_dir, Duration::from_secs(5)), ours.wait());
    assert_eq!(
        killed.unwrap(),
        [Stale {
            slot: "app-v2".to_owned(),
            pid: ours_pid
        }]
    );
    assert_eq!(status.unwrap().signal(), Some(15));
    assert_eq!(std::fs::read_dir(dirs.run()).unwrap().count(), 0);
}

#[tokio::test]
async fn kill_stale_without_a_run_directory_finds_nothing() {
    let dirs = Dirs::new();
    assert_eq!(
        kill_stale(&dirs.run(), Duration::from_secs(1))
            .await
            .unwrap(),
        []
    );
}

#[test]
fn stat_lines_with_odd_command_names_parse() {
    let line = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
    assert_eq!(
        parse_stat(line),
        Some(Stat {
            state: 'S',
            pgrp: 4242,
            start_ticks: 987654
        })
    );
    assert_eq!(parse_stat("4242 (x) S 1"), None);
}
