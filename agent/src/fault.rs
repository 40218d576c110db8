//! Fault injection for crash-safety tests: `FLEET_AGENT_CRASH_AT=<point>` makes the agent
//! SIGKILL itself when it reaches that point, exactly as an outside `kill -9` would, so a
//! test can stop it between any two steps of a switch. Unset (the normal case) it costs one
//! environment lookup per point reached.

/// The points, in the order a deploy with a run section reaches them.
pub const POINTS: [&str; 7] = [
    "accepted",       // save point 1 written, staging not started
    "staged",         // save point 2 written (slot complete), new version not started
    "started",        // new version healthy beside the old one, traffic not moved
    "flipped",        // traffic and pointer moved, save point 3 not written
    "switched",       // save point 3 written, probation running
    "rollback-saved", // a rollback's save point written, traffic not moved back
    "rolled-back",    // traffic moved back, outcome not recorded
];

pub const ENV: &str = "FLEET_AGENT_CRASH_AT";

/// Dies here, by SIGKILL, if the environment asks for this point.
pub fn point(name: &str) {
    debug_assert!(POINTS.contains(&name), "unknown fault point {name}");
    if std::env::var(ENV).is_ok_and(|wanted| wanted == name) {
        tracing::warn!(point = name, "fault injection: killing the agent");
        let me = rustix::process::getpid();
        let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; this is never reached.
        std::process::abort();
    }
}
