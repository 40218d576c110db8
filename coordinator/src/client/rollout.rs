//! The client commands about rollouts: `rollout start|status|pause|resume|abort|rollback`
//! and `canary report`. Output goes to stdout; errors are returned, never printed.
//!
//! `rollout status --watch` polls the coordinator every second until the rollout ends. At a
//! terminal it redraws one block (a progress bar per wave); piped, it prints one plain line
//! per change, so logs and CI keep a readable history. Rendering is pure and tested.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use anyhow::{bail, Context as _};
use protocol::{human_duration, UnixSeconds};

use super::{ago, table, ApiClient};
use crate::api::{RolloutRequest, RolloutResponse};
use crate::canary::{Classification, MetricJudgment};
use crate::cli::{RolloutCommand, RolloutStartArgs};
use crate::rollout::engine::{Counts, GateOutcome, NodePhase, Status, WavePhase};
use crate::rollout::plan::{self, OfflinePolicy, Pct, PlanOptions, Secs, Selector, SwitchWindow};
use crate::rollout::view::{CanaryReport, RolloutView, WaveView};

/// How often `--watch` asks.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// Width of a progress bar, in characters.
const BAR: usize = 24;
/// Nodes listed by name in texts.
const NAMED: usize = 8;

/// `coordinator rollout …`.
pub async fn rollout(client: &ApiClient, command: RolloutCommand) -> anyhow::Result<()> {
    match command {
        RolloutCommand::Start(args) => start(client, &args).await,
        RolloutCommand::Status {
            id,
            watch: true,
            json: _,
        } => watch(client, id).await,
        RolloutCommand::Status { id, json, .. } => status(client, id, json).await,
        RolloutCommand::Pause(a) => control(client, a.id, "pause", a.json).await,
        RolloutCommand::Resume(a) => control(client, a.id, "resume", a.json).await,
        RolloutCommand::Abort(a) => control(client, a.id, "abort", a.json).await,
        RolloutCommand::Rollback(a) => control(client, a.id, "rollback", a.json).await,
    }
}

/// The start flags as the API's request; bad values fail here, naming the flag.
fn start_request(args: &RolloutStartArgs) -> anyhow::Result<RolloutRequest> {
    let mut select = BTreeMap::new();
    for text in &args.select {
        let Selector(pairs) = Selector::parse(text).context("invalid --select")?;
        for (key, value) in pairs {
            if let Some(before) = select.insert(key.clone(), value.clone()) {
                if before != value {
                    bail!("invalid --select: {key} is given as both {before} and {value}");
                }
            }
        }
    }
    Selector(select.clone())
        .check()
        .context("invalid --select")?;
    let duration = |flag: &'static str, text: &Option<String>| -> anyhow::Result<Option<Secs>> {
        text.as_deref()
            .map(|t| Secs::parse(flag, t))
            .transpose()
            .with_context(|| format!("invalid --{flag}"))
    };
    let plan = PlanOptions {
        waves: args
            .waves
            .as_deref()
            .map(plan::parse_waves)
            .transpose()
            .context("invalid --waves")?,
        bake: duration("bake", &args.bake)?,
        max_parallel: args.max_parallel,
        max_failures: args.max_failures,
        max_failure_pct: args
            .max_failure_pct
            .map(Pct::new)
            .transpose()
            .context("invalid --max-failure-pct")?,
        windows: if args.windows.is_empty() {
            None
        } else {
            Some(
                args.windows
                    .iter()
                    .map(|w| w.parse::<SwitchWindow>())
                    .collect::<Result<_, _>>()
                    .context("invalid --window")?,
            )
        },
        node_deadline: duration("node-deadline", &args.node_deadline)?,
        offline: args
            .offline
            .as_deref()
            .map(str::parse::<OfflinePolicy>)
            .transpose()
            .context("invalid --offline")?,
        auto_rollback: args.no_auto_rollback.then_some(false),
    };
    plan.check().context("invalid rollout plan")?;
    Ok(RolloutRequest {
        app: args.app.clone(),
        version: args.version.clone(),
        select,
        plan,
    })
}

/// `coordinator rollout start`.
async fn start(client: &ApiClient, args: &RolloutStartArgs) -> anyhow::Result<()> {
    let request = start_request(args)?;
    let response: RolloutResponse = client
        .post_json(
            &format!("starting a rollout of {}@{}", args.app, args.version),
            "/api/rollouts",
            &request,
        )
        .await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&response).context("cannot format the result")?
        );
        return Ok(());
    }
    print!("{}", started_text(&response));
    Ok(())
}

fn started_text(response: &RolloutResponse) -> String {
    let view = &response.view;
    let mut out = format!(
        "rollout {} started: {} to {} node{} ({}) in {} wave{}\n",
        response.rollout,
        response.release,
        response.nodes.len(),
        plural(response.nodes.len()),
        view.selector,
        response.waves.len(),
        plural(response.waves.len()),
    );
    for (i, (nodes, wave)) in response.waves.iter().zip(&view.waves).enumerate() {
        let names: Vec<&str> = nodes.iter().map(|n| n.as_str()).collect();
        out += &format!(
            "  wave {}/{} ({}): {}\n",
            i + 1,
            response.waves.len(),
            wave.target,
            if names.is_empty() {
                "no new node on this selection; passed over".to_owned()
            } else {
                name_list(&names)
            }
        );
    }
    out += &format!("  plan: {}\n", plan_text(view));
    out += &format!(
        "  chunk sources: {}, then MQTT\n",
        response.http_sources.join(", ")
    );
    out += &format!(
        "follow it with `coordinator rollout status {} --watch`\n",
        response.rollout
    );
    out
}

/// `coordinator rollout status [ID]`.
async fn status(client: &ApiClient, id: Option<u64>, json: bool) -> anyhow::Result<()> {
    let Some(id) = id else {
        let views: Vec<RolloutView> = client.get_json("listing rollouts", "/api/rollouts").await?;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&views).context("cannot format the result")?
            );
        } else {
            print!("{}", listing_text(&views));
        }
        return Ok(());
    };
    let view = get(client, id, true).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&view).context("cannot format the result")?
        );
    } else {
        print!("{}", detail_text(&view));
    }
    Ok(())
}

async fn get(client: &ApiClient, id: u64, nodes: bool) -> anyhow::Result<RolloutView> {
    let path = if nodes {
        format!("/api/rollouts/{id}")
    } else {
        format!("/api/rollouts/{id}?nodes=false")
    };
    client
        .get_json(&format!("reading rollout {id}"), &path)
        .await
}

/// `coordinator rollout status [ID] --watch`.
async fn watch(client: &ApiClient, id: Option<u64>) -> anyhow::Result<()> {
    let id = match id {
        Some(id) => id,
        None => {
            let views: Vec<RolloutView> =
                client.get_json("listing rollouts", "/api/rollouts").await?;
            match views.iter().find(|v| v.is_active()) {
                Some(view) => view.id,
                None => bail!(
                    "no rollout is running; give the ID of one to watch (`coordinator rollout status` lists them)"
                ),
            }
        }
    };
    let terminal = std::io::stdout().is_terminal();
    let mut drawn_lines = 0usize;
    let mut last_line = String::new();
    loop {
        let view = get(client, id, false).await?;
        let mut stdout = std::io::stdout().lock();
        if terminal {
            let block = progress_text(&view);
            if drawn_lines > 0 {
                // Up to the block's first line, then clear to the end of the screen.
                write!(stdout, "\x1b[{drawn_lines}F\x1b[J")?;
            }
            write!(stdout, "{block}")?;
            drawn_lines = block.lines().count();
        } else {
            let line = summary_line(&view);
            if line != last_line {
                writeln!(stdout, "{} {line}", clock(view.now))?;
                last_line = line;
            }
        }
        stdout.flush()?;
        drop(stdout);
        if !view.is_active() {
            let reason = view.reason.clone().unwrap_or_default();
            if view.status == Status::Succeeded {
                if !terminal {
                    println!("{} rollout {id} succeeded: {reason}", clock(view.now));
                }
                return Ok(());
            }
            bail!("rollout {id} {}: {reason}", status_words(view.status));
        }
        tokio::time::sleep(WATCH_EVERY).await;
    }
}

/// `coordinator rollout pause|resume|abort|rollback ID`.
async fn control(client: &ApiClient, id: u64, what: &str, json: bool) -> anyhow::Result<()> {
    let view: RolloutView = client
        .post_json(
            &format!("{what} of rollout {id}"),
            &format!("/api/rollouts/{id}/{what}"),
            &serde_json::json!({}),
        )
        .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&view).context("cannot format the result")?
        );
        return Ok(());
    }
    println!(
        "rollout {id} {}{}",
        status_words(view.status),
        view.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    print!("{}", detail_text(&view));
    Ok(())
}

/// `coordinator canary report ROLLOUT_ID`.
pub async fn canary_report(client: &ApiClient, id: u64, json: bool) -> anyhow::Result<()> {
    let what = format!("reading the canary report of rollout {id}");
    let path = format!("/api/rollouts/{id}/canary");
    if json {
        let value: serde_json::Value = client.get_json(&what, &path).await?;
        println!(
            "{}",
            serde_json::to_string_pretty(&value).context("cannot format the result")?
        );
        return Ok(());
    }
    let report: CanaryReport = client.get_json(&what, &path).await?;
    print!("{}", canary_text(&report));
    Ok(())
}

fn plural(n: usize) -> &'static str {
    plan::plural(n)
}

/// "n1, n2, n3 and 4 more".
fn name_list(names: &[&str]) -> String {
    let mut text = names
        .iter()
        .take(NAMED)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMED {
        text += &format!(" and {} more", names.len() - NAMED);
    }
    text
}

/// `12:03:04` UTC.
fn clock(at: UnixSeconds) -> String {
    format!("{:02}:{:02}:{:02}", at / 3600 % 24, at / 60 % 60, at % 60)
}

fn status_words(status: Status) -> &'static str {
    match status {
        Status::Running => "running",
        Status::Paused => "paused",
        Status::Succeeded => "succeeded",
        Status::Halted => "halted",
        Status::Aborted => "aborted",
        Status::RolledBack => "rolled back",
        Status::Legacy => "legacy (before staged rollouts)",
    }
}

fn phase_words(phase: WavePhase) -> &'static str {
    match phase {
        WavePhase::Pending => "pending",
        WavePhase::Staging => "staging",
        WavePhase::Switching => "switching",
        WavePhase::Baking => "baking",
        WavePhase::Gating => "gating",
        WavePhase::Passed => "passed",
        WavePhase::Empty => "empty",
        WavePhase::Stopped => "stopped",
    }
}

/// The plan in one line.
fn plan_text(view: &RolloutView) -> String {
    let plan = &view.plan;
    let waves: Vec<String> = plan.waves.iter().map(ToString::to_string).collect();
    let mut parts = vec![format!("waves {}", waves.join(", "))];
    parts.push(format!("bake {}", plan.bake));
    parts.push(match plan.max_parallel {
        Some(n) => format!("at most {n} switching at once"),
        None => "no limit on parallel switches".to_owned(),
    });
    parts.push(format!(
        "halt when more fail than: {}",
        plan.failure_limit()
    ));
    if !plan.windows.is_empty() {
        let windows: Vec<String> = plan.windows.iter().map(ToString::to_string).collect();
        parts.push(format!("switch only in {} UTC", windows.join(", ")));
    }
    parts.push(format!(
        "node deadline {} (offline: {})",
        plan.node_deadline, plan.offline
    ));
    parts.push(
        if plan.auto_rollback {
            "automatic rollback"
        } else {
            "no automatic rollback"
        }
        .to_owned(),
    );
    parts.join("; ")
}

/// What a wave is waiting for, if anything.
fn wave_note(wave: &WaveView) -> String {
    if let Some(left) = wave.bake_left_secs {
        return format!("bake {} left", human_duration(Duration::from_secs(left)));
    }
    if let Some(opens) = wave.window_opens_in_secs {
        return format!(
            "switch window opens in {}",
            human_duration(Duration::from_secs(opens))
        );
    }
    if let Some(wait) = wave.canary_in_secs {
        return format!(
            "canary judged in {}",
            human_duration(Duration::from_secs(wait))
        );
    }
    String::new()
}

fn failed(counts: &Counts) -> u32 {
    counts.failed + counts.rollback_failed
}

/// One rollout in full: the header, the plan, a row per wave, gates, notes.
fn detail_text(view: &RolloutView) -> String {
    let mut out = format!(
        "rollout {}  {}  {} — started {} by {}, nodes: {}\n",
        view.id,
        view.release,
        status_words(view.status),
        ago(view.now, view.started_at),
        view.started_by,
        view.selector
    );
    out += &format!("  {}\n", plan_text(view));
    let header = [
        "WAVE",
        "TARGET",
        "NODES",
        "PHASE",
        "STAGED",
        "SWITCHED",
        "FAILED",
        "SKIPPED",
        "ROLLED BACK",
        "NOTE",
    ]
    .map(String::from);
    let mut rows = vec![header];
    let total = view.waves.len();
    for wave in &view.waves {
        let c = &wave.counts;
        rows.push([
            format!("{}/{total}", wave.wave),
            wave.target.to_string(),
            wave.nodes.to_string(),
            phase_words(wave.phase).to_owned(),
            c.staged_or_beyond().to_string(),
            c.on_release().to_string(),
            failed(c).to_string(),
            (c.skipped + c.overridden).to_string(),
            (c.rolled_back + c.rolling_back).to_string(),
            wave_note(wave),
        ]);
    }
    for line in table(&rows).lines() {
        out += &format!("  {line}\n");
    }
    for wave in &view.waves {
        for gate in &wave.gates {
            out += &format!(
                "  wave {} gate {}: {} — {}\n",
                wave.wave,
                match gate.gate {
                    crate::rollout::engine::Gate::Failures => "failures",
                    crate::rollout::engine::Gate::Canary => "canary",
                },
                gate.outcome.as_str(),
                gate.detail
            );
        }
    }
    if view.late.total() > 0 {
        out += &format!(
            "  late nodes (the fleet target after success): {} switched, {} switching, {} failed\n",
            view.late.switched,
            view.late.switching,
            failed(&view.late)
        );
    }
    if let Some(reason) = &view.reason {
        out += &format!("  {}: {reason}\n", status_words(view.status));
    }
    let noted: Vec<String> = view
        .nodes
        .iter()
        .filter(|n| {
            matches!(
                n.phase,
                NodePhase::Failed
                    | NodePhase::Skipped
                    | NodePhase::Overridden
                    | NodePhase::RollbackFailed
            )
        })
        .map(|n| {
            format!(
                "    {} {}: {}",
                n.node,
                n.phase.as_str().replace('_', " "),
                n.note.as_deref().unwrap_or("-")
            )
        })
        .collect();
    if !noted.is_empty() {
        out += "  nodes:\n";
        for line in noted.iter().take(3 * NAMED) {
            out += line;
            out.push('\n');
        }
        if noted.len() > 3 * NAMED {
            out += &format!(
                "    … and {} more (--json has them all)\n",
                noted.len() - 3 * NAMED
            );
        }
    }
    out
}

/// `coordinator rollout status` without an ID: the running rollouts in full (or the latest
/// if none runs), then one line for each other.
fn listing_text(views: &[RolloutView]) -> String {
    let Some(latest) = views.first() else {
        return "no rollouts yet (`coordinator rollout start`)\n".to_owned();
    };
    let active: Vec<&RolloutView> = views.iter().filter(|v| v.is_active()).collect();
    let full: Vec<&RolloutView> = if active.is_empty() {
        vec![latest]
    } else {
        active
    };
    let mut out = String::new();
    for view in &full {
        out += &detail_text(view);
        out.push('\n');
    }
    let rest: Vec<&RolloutView> = views
        .iter()
        .filter(|v| !full.iter().any(|f| f.id == v.id))
        .collect();
    if !rest.is_empty() {
        let mut rows =
            vec![["ID", "RELEASE", "STATUS", "STARTED", "NODES", "REASON"].map(String::from)];
        for view in rest {
            rows.push([
                view.id.to_string(),
                view.release.clone(),
                status_words(view.status).to_owned(),
                ago(view.now, view.started_at),
                view.total.total().to_string(),
                view.reason.clone().unwrap_or_default(),
            ]);
        }
        out += "recent:\n";
        out += &table(&rows);
    }
    out
}

/// The rollout in one line, for `--watch` when piped: printed whenever it changes.
fn summary_line(view: &RolloutView) -> String {
    let total = view.waves.len();
    let current = view
        .waves
        .iter()
        .find(|w| !matches!(w.phase, WavePhase::Passed | WavePhase::Empty))
        .or(view.waves.last());
    let mut line = format!(
        "rollout {} {} {}",
        view.id,
        view.release,
        status_words(view.status)
    );
    if let Some(wave) = current {
        let c = &wave.counts;
        line += &format!(
            ": wave {}/{total} {}: {}/{} staged, {}/{} switched, {} failed",
            wave.wave,
            phase_words(wave.phase),
            c.staged_or_beyond(),
            wave.nodes,
            c.on_release(),
            wave.nodes,
            failed(c)
        );
        let note = wave_note(wave);
        // The countdowns change every second; the line changes only on real progress.
        if !note.is_empty() && wave.bake_left_secs.is_none() && wave.canary_in_secs.is_none() {
            line += &format!(" ({note})");
        }
    }
    if view.is_active() {
        if let Some(reason) = &view.reason {
            line += &format!(" — {reason}");
        }
    }
    line
}

/// The `--watch` block at a terminal: a header and a bar per wave.
fn progress_text(view: &RolloutView) -> String {
    let mut out = format!(
        "rollout {}  {}  {}  (started {})\n",
        view.id,
        view.release,
        status_words(view.status),
        ago(view.now, view.started_at)
    );
    let total = view.waves.len();
    for wave in &view.waves {
        let c = &wave.counts;
        let done = if wave.phase == WavePhase::Staging {
            c.staged_or_beyond() + failed(c) + c.skipped + c.overridden
        } else {
            c.settled()
        };
        let filled = if wave.nodes == 0 {
            BAR
        } else {
            (done as usize * BAR / wave.nodes as usize).min(BAR)
        };
        out += &format!(
            "wave {}/{total} {:>5} [{}{}] {:>4}/{:<4} switched  {} failed  {:<9} {}\n",
            wave.wave,
            wave.target.to_string(),
            "#".repeat(filled),
            "-".repeat(BAR - filled),
            c.on_release(),
            wave.nodes,
            failed(c),
            phase_words(wave.phase),
            wave_note(wave)
        );
    }
    if let Some(reason) = &view.reason {
        out += &format!("{reason}\n");
    }
    out
}

/// A number for the canary table: `-` for none, `inf` for an infinite ratio.
fn number(value: Option<f64>) -> String {
    match value {
        None => "-".to_owned(),
        Some(v) if v.is_infinite() => if v > 0.0 { "inf" } else { "-inf" }.to_owned(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.4}"),
    }
}

fn bounds(metric: &MetricJudgment) -> String {
    match (metric.lower_bound, metric.upper_bound) {
        (Some(low), Some(high)) => format!("{low:.2}–{high:.2}"),
        (None, Some(high)) => format!("≤{high:.2}"),
        (Some(low), None) => format!("≥{low:.2}"),
        (None, None) => "-".to_owned(),
    }
}

/// The canary report: verdict and score, window and groups, then a row per metric.
fn canary_text(report: &CanaryReport) -> String {
    let score = report
        .score
        .map(|s| format!(", score {s:.1}"))
        .unwrap_or_default();
    let source = if report.live {
        "computed now over the window so far; the gate has not judged yet".to_owned()
    } else {
        "the gate's judgment".to_owned()
    };
    let mut out = format!(
        "rollout {} {} canary: {}{score} ({source})\n",
        report.rollout,
        report.release,
        report.outcome.as_str().to_uppercase()
    );
    out += &format!("  {}\n", report.summary);
    out += &format!(
        "  window {}–{} UTC ({})\n",
        clock(report.from),
        clock(report.to),
        human_duration(Duration::from_secs(report.to.saturating_sub(report.from)))
    );
    let names = |nodes: &[protocol::NodeId]| {
        let names: Vec<&str> = nodes.iter().map(|n| n.as_str()).collect();
        format!(
            "{} ({} node{})",
            name_list(&names),
            nodes.len(),
            plural(nodes.len())
        )
    };
    out += &format!("  canary:   {}\n", names(&report.canary_nodes));
    out += &format!("  baseline: {}\n", names(&report.baseline_nodes));
    let Some(judgment) = &report.judgment else {
        if report.outcome == GateOutcome::Skipped {
            out += "  (nothing was judged)\n";
        }
        return out;
    };
    let header = [
        "METRIC",
        "RESULT",
        "RATIO",
        "ANCHORED",
        "BOUNDS",
        "CANARY MEAN",
        "BASELINE MEAN",
        "SAMPLES C/B",
        "NODES C/B",
        "P",
    ]
    .map(String::from);
    let mut rows = vec![header];
    for metric in &judgment.metrics {
        let result = if !metric.counted && metric.classification == Classification::NoData {
            "no data".to_owned()
        } else {
            metric.classification.as_str().to_owned()
        };
        rows.push([
            format!("{}{}", metric.name, if metric.critical { " *" } else { "" }),
            result,
            number(metric.ratio),
            if metric.anchored { "yes" } else { "no" }.to_owned(),
            bounds(metric),
            number(metric.canary_mean),
            number(metric.baseline_mean),
            format!("{}/{}", metric.canary_samples, metric.baseline_samples),
            format!("{}/{}", metric.canary_nodes, metric.baseline_nodes),
            number(metric.p_value),
        ]);
    }
    for line in table(&rows).lines() {
        out += &format!("  {line}\n");
    }
    out += &format!(
        "  * critical: failing it fails the canary. pass ≥ {}, marginal ≥ {}, confidence {}\n",
        judgment.pass_score, judgment.marginal_score, judgment.confidence
    );
    if judgment.metrics.iter().any(|m| m.anchored) {
        out += "  anchored: the ratio is of each node's change against its own level before the first canary switch\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::engine::{Gate, GateResult};
    use crate::rollout::plan::{Plan, WaveSize};
    use crate::rollout::view::NodeView;
    use protocol::NodeId;

    fn wave(n: u32, target: WaveSize, phase: WavePhase, counts: Counts) -> WaveView {
        WaveView {
            wave: n,
            target,
            nodes: counts.total(),
            phase,
            counts,
            started_at: None,
            staged_at: None,
            switched_at: None,
            bake_until: None,
            bake_left_secs: None,
            window_opens_in_secs: None,
            canary_in_secs: None,
            gates: Vec::new(),
        }
    }

    fn view() -> RolloutView {
        let mut first = wave(
            1,
            WaveSize::Count(1),
            WavePhase::Passed,
            Counts {
                switched: 1,
                ..Counts::default()
            },
        );
        first.gates.push(GateResult {
            gate: Gate::Canary,
            outcome: GateOutcome::Pass,
            detail: "canary pass (score 100): every metric passes".into(),
            at: 0,
        });
        let mut second = wave(
            2,
            WaveSize::Percent(3000),
            WavePhase::Baking,
            Counts {
                switched: 1,
                failed: 1,
                ..Counts::default()
            },
        );
        second.bake_left_secs = Some(12);
        let third = wave(
            3,
            WaveSize::ALL,
            WavePhase::Pending,
            Counts {
                pending: 7,
                ..Counts::default()
            },
        );
        RolloutView {
            id: 3,
            release: "web@2".into(),
            app: "web".into(),
            version: "2".into(),
            status: Status::Running,
            reason: None,
            started_at: 940,
            started_by: "alice".into(),
            finished_at: None,
            selector: Selector::default(),
            plan: Plan::merge(
                &PlanOptions {
                    waves: Some(plan::parse_waves("1,30%,100%").expect("waves")),
                    ..PlanOptions::default()
                },
                None,
            )
            .expect("plan"),
            waves: vec![first, second, third],
            total: Counts::default(),
            late: Counts::default(),
            canary: None,
            now: 1000,
            nodes: vec![NodeView {
                node: NodeId::new("n7").expect("node"),
                wave: Some(2),
                phase: NodePhase::Failed,
                since: 990,
                switched_at: None,
                note: Some("rolled back by itself: health check failed".into()),
            }],
        }
    }

    #[test]
    fn the_detail_shows_a_row_per_wave_the_gates_and_why_nodes_failed() {
        let text = detail_text(&view());
        assert!(
            text.starts_with(
                "rollout 3  web@2  running — started 1m ago by alice, nodes: all nodes\n"
            ),
            "{text}"
        );
        assert!(text.contains("waves 1, 30%, 100%; bake 0ms"), "{text}");
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.trim_start().starts_with(char::is_numeric))
            .collect();
        assert_eq!(rows.len(), 3, "{text}");
        assert!(
            rows[1].contains("30%")
                && rows[1].contains("baking")
                && rows[1].ends_with("bake 12s left"),
            "{text}"
        );
        assert!(
            text.contains("wave 1 gate canary: pass — canary pass (score 100)"),
            "{text}"
        );
        assert!(
            text.contains("n7 failed: rolled back by itself: health check failed"),
            "{text}"
        );
    }

    #[test]
    fn the_piped_watch_line_changes_on_progress_not_on_countdowns() {
        let mut view = view();
        let line = summary_line(&view);
        assert_eq!(
            line,
            "rollout 3 web@2 running: wave 2/3 baking: 1/2 staged, 1/2 switched, 1 failed"
        );
        view.waves[1].bake_left_secs = Some(5);
        assert_eq!(summary_line(&view), line);
        view.status = Status::Paused;
        view.reason = Some("paused by bob".into());
        assert!(summary_line(&view).ends_with(
            "paused: wave 2/3 baking: 1/2 staged, 1/2 switched, 1 failed — paused by bob"
        ));
    }

    #[test]
    fn the_terminal_block_draws_a_bar_per_wave() {
        let text = progress_text(&view());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[1].contains(&format!("[{}]", "#".repeat(BAR))),
            "{text}"
        );
        assert!(
            lines[3].contains(&format!("[{}]", "-".repeat(BAR))),
            "{text}"
        );
        assert!(
            lines[2].contains("1/2    switched  1 failed  baking"),
            "{text}"
        );
    }

    #[test]
    fn start_flags_become_the_request_and_bad_ones_name_the_flag() {
        use clap::Parser as _;
        let parse = |extra: &[&str]| {
            let mut argv = vec![
                "coordinator",
                "rollout",
                "start",
                "--app",
                "web",
                "--version",
                "2",
            ];
            argv.extend_from_slice(extra);
            let cli = crate::cli::Cli::try_parse_from(argv).expect("parses");
            match cli.command {
                crate::cli::Command::Rollout {
                    command: RolloutCommand::Start(args),
                } => start_request(&args),
                other => panic!("{other:?}"),
            }
        };
        let request = parse(&[
            "--select",
            "region=eu,ring=canary",
            "--select",
            "hw=x",
            "--waves",
            "1,30%,100%",
            "--bake",
            "2s",
            "--max-failure-pct",
            "12.5",
            "--window",
            "22:00-06:00",
            "--no-auto-rollback",
        ])
        .expect("valid");
        assert_eq!(request.select.len(), 3);
        assert_eq!(request.plan.waves.map(|w| w.len()), Some(3));
        assert_eq!(request.plan.bake, Some(Secs(2)));
        assert_eq!(request.plan.auto_rollback, Some(false));
        let error = format!("{:#}", parse(&["--waves", "1,50%"]).expect_err("bad waves"));
        assert!(
            error.starts_with("invalid --waves: the last wave is 50%"),
            "{error}"
        );
        let error = format!("{:#}", parse(&["--bake", "soon"]).expect_err("bad bake"));
        assert!(error.starts_with("invalid --bake"), "{error}");
        let error = format!(
            "{:#}",
            parse(&["--select", "region"]).expect_err("bad select")
        );
        assert!(error.starts_with("invalid --select"), "{error}");
    }
}
