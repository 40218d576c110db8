//! The client commands (`release publish`, `release list`, `node rollback`, `nodes`, `stats`;
//! `token …` and `log` in `client/access.rs`; `metrics …` in `client/metrics.rs`; `rollout …`
//! and `canary report` in `client/rollout.rs`): HTTP calls to a running `coordinator serve`,
//! and their human or JSON output.
//!
//! `release publish` reads and checks `SRC/release.toml` first, builds the image locally into
//! a temporary chunk store (removed on exit), asks the coordinator which chunks it lacks and
//! uploads only those, so publishing v2 after v1 moves about what changed. A bad
//! `release.toml` fails before anything is uploaded. Output goes to stdout; errors are
//! returned, never printed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use images::ChunkStore;
use protocol::messages::{Outcome, SlotReport};
use protocol::{
    human_bytes, AppName, ChunkRef, Digest, ReleaseId, ReleaseKind, RunSpec, UnixSeconds, Version,
};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::api::{
    ErrorBody, MissingRequest, MissingResponse, NodeRollbackRequest, NodeRollbackResponse,
    NodeView, PublishRequest, PublishResponse, ReleaseView, StatsView, StoredChunk,
};
use crate::cli::ClientArgs;
use crate::unix_now;
use crate::{release, release_file};

mod access;
pub use access::{log, token_create, token_list, token_revoke};
mod metrics;
pub use metrics::{metric_drops, metrics};
mod rollout;
pub use rollout::{canary_report, rollout};

/// Digests per `POST /api/chunks/missing`.
const MISSING_BATCH: usize = 4096;
/// Chunk uploads in flight.
const PARALLEL_UPLOADS: usize = 4;

/// A client of one coordinator's HTTP API.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl ApiClient {
    pub fn new(args: &ClientArgs) -> anyhow::Result<ApiClient> {
        let token = args
            .token
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                anyhow!(
                    "no API token: pass --token TOKEN or set COORDINATOR_TOKEN; `coordinator serve` writes the admin token to DATA/admin.token (DATA is its --data directory)"
                )
            })?
            .to_owned();
        let base = args.server.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!(
                "invalid --server {:?}: use the coordinator's http:// or https:// URL",
                args.server
            );
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("cannot set up the HTTP client")?;
        Ok(ApiClient { http, base, token })
    }

    /// Sends a request; turns transport failures and non-2xx answers into errors that say
    /// what failed and what to do.
    async fn send(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let response = request.bearer_auth(&self.token).send().await.map_err(|error| {
            if error.is_connect() || error.is_timeout() {
                anyhow!(
                    "cannot reach the coordinator at {}: {} — is \"coordinator serve\" running? (--server)",
                    self.base,
                    root_cause(&error)
                )
            } else {
                anyhow!("{what}: request to {} failed: {}", self.base, root_cause(&error))
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or_else(|_| text.chars().take(500).collect());
        if status == StatusCode::UNAUTHORIZED {
            // The coordinator's message says whether the token is unknown or revoked.
            bail!(
                "{what}: the coordinator at {} refused the API token (HTTP 401): {message}",
                self.base
            );
        }
        bail!("{what}: {message} (HTTP {})", status.as_u16())
    }

    async fn get_json<T: DeserializeOwned>(&self, what: &str, path: &str) -> anyhow::Result<T> {
        let response = self
            .send(what, self.http.get(format!("{}{path}", self.base)))
            .await?;
        response
            .json()
            .await
            .with_context(|| format!("{what}: the coordinator's answer is not the expected JSON"))
    }

    async fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        what: &str,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let request = self.http.post(format!("{}{path}", self.base)).json(body);
        let response = self.send(what, request).await?;
        response
            .json()
            .await
            .with_context(|| format!("{what}: the coordinator's answer is not the expected JSON"))
    }

    async fn put_chunk(&self, chunk: ChunkRef, compressed: Vec<u8>) -> anyhow::Result<StoredChunk> {
        let what = format!("uploading chunk {}", chunk.digest);
        let url = format!(
            "{}/api/chunks/{}?size={}",
            self.base, chunk.digest, chunk.size
        );
        let response = self
            .send(&what, self.http.put(url).body(compressed))
            .await?;
        response
            .json()
            .await
            .with_context(|| format!("{what}: the coordinator's answer is not the expected JSON"))
    }
}

/// The innermost error message (e.g. "Connection refused (os error 111)").
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// What `coordinator release publish` publishes.
#[derive(Debug, Clone, Copy)]
pub struct PublishArgs<'a> {
    /// Directory holding the release's files.
    pub src: &'a Path,
    pub app: &'a str,
    pub version: &'a str,
    pub kind: ReleaseKind,
    /// `--mirror` URLs in the order given.
    pub mirrors: &'a [String],
}

/// `coordinator release publish`.
pub async fn publish(client: &ApiClient, args: PublishArgs<'_>, json: bool) -> anyhow::Result<()> {
    let PublishArgs {
        src,
        app,
        version,
        kind,
        mirrors,
    } = args;
    let app = AppName::new(app).context("invalid --app")?;
    let version = Version::new(version).context("invalid --version")?;
    let release = ReleaseId::new(app.clone(), version.clone());
    // The coordinator checks them too; checking here fails before a possibly long build.
    let mirrors = release::mirror_list(mirrors).context("invalid --mirror")?;
    // Its errors name the file, the key and the line: nothing to add.
    let release_file = release_file::read(src).map_err(anyhow::Error::new)?;

    // Fail on a wrong --server or token before a possibly long build.
    let _: Vec<ReleaseView> = client
        .get_json("checking the coordinator", "/api/releases")
        .await?;

    let temp = tempfile::Builder::new()
        .prefix("coordinator-publish-")
        .tempdir()
        .context("cannot create a temporary directory for the image build")?;
    let store = ChunkStore::open(temp.path().join("chunks"))
        .context("cannot create a temporary chunk store")?;
    let mut manifest = {
        let (source, store) = (src.to_owned(), store.clone());
        tokio::task::spawn_blocking(move || {
            images::build_image(&source, app, version, kind, &store)
        })
        .await
        .context("the image build task failed")?
        // images' errors already carry their cause in their message: flatten, so that
        // `{:#}` does not print it twice.
        .map_err(|error| {
            anyhow!(
                "cannot build release {release} from {}: {error}",
                src.display()
            )
        })?
    };
    manifest.run = release_file.run;
    release::check_run_command(&manifest)
        .map_err(|error| anyhow!("{}: {error}", src.join(release_file::FILE_NAME).display()))?;

    let chunks: BTreeMap<Digest, ChunkRef> = manifest.chunks().map(|c| (c.digest, *c)).collect();
    let digests: Vec<Digest> = chunks.keys().copied().collect();
    let mut missing = Vec::new();
    for batch in digests.chunks(MISSING_BATCH) {
        let answer: MissingResponse = client
            .post_json(
                "asking which chunks the coordinator lacks",
                "/api/chunks/missing",
                &MissingRequest {
                    digests: batch.to_vec(),
                },
            )
            .await?;
        missing.extend(answer.missing);
    }

    let mut uploaded_bytes: u64 = 0;
    let mut uploads = JoinSet::new();
    let mut pending = missing.iter().filter_map(|d| chunks.get(d).copied());
    loop {
        while uploads.len() < PARALLEL_UPLOADS {
            let Some(chunk) = pending.next() else { break };
            let compressed = store
                .get(&chunk.digest)
                .context("cannot read a built chunk")?
                .ok_or_else(|| {
                    anyhow!(
                        "built chunk {} is missing from the temporary store",
                        chunk.digest
                    )
                })?;
            uploaded_bytes += compressed.len() as u64;
            let client = client.clone();
            uploads.spawn(async move { client.put_chunk(chunk, compressed).await });
        }
        match uploads.join_next().await {
            Some(result) => {
                result.context("an upload task failed")??;
            }
            None => break,
        }
    }

    let response: PublishResponse = client
        .post_json(
            &format!("publishing release {release}"),
            "/api/releases",
            &PublishRequest {
                manifest,
                mirrors,
                canary: release_file.canary,
                rollout: release_file.rollout,
            },
        )
        .await?;
    let view = &response.release;
    if json {
        let mut value = serde_json::to_value(&response).context("cannot format the result")?;
        if let Some(object) = value.as_object_mut() {
            object.insert("chunks_uploaded".into(), missing.len().into());
            object.insert("bytes_uploaded".into(), uploaded_bytes.into());
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&value).context("cannot format the result")?
        );
    } else {
        if response.created {
            println!("published {}", view.release);
        } else if response.mirrors_updated {
            println!(
                "{} was already published with the same content; its mirror list is replaced (rollouts started from now on use it)",
                view.release
            );
        } else {
            println!(
                "{} was already published with the same content; nothing changed",
                view.release
            );
        }
        println!("  files     {}", view.files);
        println!("  size      {}", human_bytes(view.bytes));
        println!(
            "  chunks    {} ({} uploaded, {})",
            view.chunks,
            missing.len(),
            human_bytes(uploaded_bytes)
        );
        println!("  manifest  {}", view.manifest_digest);
        println!("  runs      {}", run_summary(view.run.as_ref()));
        println!("  mirrors   {}", mirror_summary(&view.mirrors));
    }
    Ok(())
}

/// "none", or the mirrors in order, comma-separated.
fn mirror_summary(mirrors: &[String]) -> String {
    if mirrors.is_empty() {
        "none".to_owned()
    } else {
        mirrors.join(", ")
    }
}

/// How a release runs, in a few words: "bin/server, front door 0.0.0.0:8080",
/// "bin/server, traffic by hooks", or "files only".
fn run_summary(run: Option<&RunSpec>) -> String {
    let Some(run) = run else {
        return "files only".to_owned();
    };
    match (&run.front_door, &run.hooks) {
        (Some(door), _) => format!("{}, front door {}", run.command, door.listen),
        (None, Some(_)) => format!("{}, traffic by hooks", run.command),
        // Not a valid spec (the coordinator refuses it); say what is there.
        (None, None) => run.command.clone(),
    }
}

/// `coordinator release list`.
pub async fn release_list(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let listing = Listing {
        what: "listing releases",
        path: "/api/releases",
        empty: "no releases have been published yet",
    };
    listing
        .show(client, json, |releases: &[ReleaseView]| {
            releases_table(releases, unix_now())
        })
        .await
}

/// A `GET` of a list printed as JSON as-is, or as a table.
struct Listing<'a> {
    what: &'a str,
    path: &'a str,
    empty: &'a str,
}

impl Listing<'_> {
    async fn show<T: DeserializeOwned>(
        &self,
        client: &ApiClient,
        json: bool,
        table: impl FnOnce(&[T]) -> String,
    ) -> anyhow::Result<()> {
        if json {
            let value: serde_json::Value = client.get_json(self.what, self.path).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&value).context("cannot format the result")?
            );
            return Ok(());
        }
        let items: Vec<T> = client.get_json(self.what, self.path).await?;
        if items.is_empty() {
            println!("{}", self.empty);
        } else {
            print!("{}", table(&items));
        }
        Ok(())
    }
}

/// Published releases as an aligned text table.
fn releases_table(releases: &[ReleaseView], now: UnixSeconds) -> String {
    let header = [
        "RELEASE",
        "KIND",
        "FILES",
        "SIZE",
        "CHUNKS",
        "RUNS",
        "PUBLISHED",
        "MIRRORS",
    ];
    let mut rows = vec![header.map(String::from)];
    for view in releases {
        rows.push([
            view.release.clone(),
            match view.kind {
                ReleaseKind::App => "app".into(),
                ReleaseKind::Content => "content".into(),
            },
            view.files.to_string(),
            human_bytes(view.bytes),
            view.chunks.to_string(),
            run_summary(view.run.as_ref()),
            ago(now, view.published_at),
            if view.mirrors.is_empty() {
                "-".into()
            } else {
                view.mirrors.join(", ")
            },
        ]);
    }
    table(&rows)
}

/// `coordinator stats`.
pub async fn stats(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let stats: StatsView = client
        .get_json("reading the coordinator's counters", "/api/stats")
        .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&stats).context("cannot format the result")?
        );
    } else {
        print!("{}", stats_text(&stats));
    }
    Ok(())
}

/// The counters for a person: exact numbers, with sizes also in binary units.
fn stats_text(s: &StatsView) -> String {
    let bytes = |n: u64| format!("{n} bytes ({})", human_bytes(n));
    let rows = [
        [
            "since start".to_owned(),
            format!("{}s (started at {} Unix time)", s.uptime_secs, s.started_at),
        ],
        [
            "MQTT chunk frames".to_owned(),
            format!("{}, {}", s.mqtt_frames_published, bytes(s.mqtt_frame_bytes)),
        ],
        [
            "chunk requests".to_owned(),
            format!(
                "{} ({} refused)",
                s.chunk_requests, s.chunk_requests_refused
            ),
        ],
        [
            "digests requested".to_owned(),
            format!(
                "{}: {} queued, {} deduped by fan-out, {} unknown, {} dropped (queue full)",
                s.digests_requested,
                s.digests_queued,
                s.digests_deduped,
                s.digests_unknown,
                s.digests_dropped
            ),
        ],
        [
            "HTTP chunks served".to_owned(),
            format!("{}, {}", s.http_chunks_served, bytes(s.http_chunk_bytes)),
        ],
        ["HTTP chunk 404s".to_owned(), s.http_not_found.to_string()],
        [
            "chunk egress".to_owned(),
            bytes(s.mqtt_frame_bytes + s.http_chunk_bytes),
        ],
    ];
    table(&rows)
}

/// `coordinator node rollback NODE...`.
pub async fn node_rollback(client: &ApiClient, nodes: &[String], json: bool) -> anyhow::Result<()> {
    let response: NodeRollbackResponse = client
        .post_json(
            &format!("rolling back {}", nodes.join(", ")),
            "/api/nodes/rollback",
            &NodeRollbackRequest {
                nodes: nodes.to_vec(),
            },
        )
        .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&response).context("cannot format the result")?
        );
    } else {
        for sent in &response.nodes {
            let from = sent
                .from
                .as_ref()
                .map_or_else(|| "-".to_owned(), ToString::to_string);
            println!(
                "{}: rollback sent (seq {}), {from} → {} as last reported",
                sent.node, sent.seq, sent.to
            );
        }
        println!("the outcome shows in `coordinator nodes` (LAST UPDATE) once each node reports");
    }
    Ok(())
}

/// `coordinator nodes`.
pub async fn nodes(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let listing = Listing {
        what: "listing nodes",
        path: "/api/nodes",
        empty: "no nodes have reported yet",
    };
    listing
        .show(client, json, |nodes: &[NodeView]| {
            nodes_table(nodes, unix_now())
        })
        .await
}

/// The inventory as an aligned text table.
fn nodes_table(nodes: &[NodeView], now: UnixSeconds) -> String {
    let header = [
        "NODE",
        "ONLINE",
        "CURRENT",
        "PREVIOUS",
        "STAGED",
        "LAST UPDATE",
        "LAST SEEN",
    ]
    .map(String::from);
    let mut rows = vec![header];
    for node in nodes {
        rows.push([
            node.node.to_string(),
            match node.online {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "?".into(),
            },
            slot(node.current.as_ref()),
            slot(node.previous.as_ref()),
            staged(node),
            last_update(node),
            node.last_seen.map_or_else(|| "-".into(), |t| ago(now, t)),
        ]);
    }
    table(&rows)
}

/// Rows as left-aligned columns two spaces apart; the first row is the header, if any.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn slot(report: Option<&SlotReport>) -> String {
    report.map_or_else(|| "-".into(), |s| s.release.to_string())
}

fn staged(node: &NodeView) -> String {
    if let Some(staged) = &node.staged {
        return staged.release.to_string();
    }
    match &node.staging {
        Some(p) if p.bytes_total > 0 => {
            format!("{} {}%", p.release, p.bytes_have * 100 / p.bytes_total)
        }
        Some(p) => format!("{} …", p.release),
        None => "-".into(),
    }
}

fn last_update(node: &NodeView) -> String {
    let Some(update) = &node.last_update else {
        return "-".into();
    };
    let fetched = human_bytes(update.bytes_fetched_mqtt + update.bytes_fetched_http);
    let short = |reason: &str| {
        if reason.chars().count() > 40 {
            format!("{}…", reason.chars().take(39).collect::<String>())
        } else {
            reason.to_owned()
        }
    };
    match &update.outcome {
        Outcome::Switched => format!("switched {}, {fetched} fetched", update.release),
        Outcome::Failed { reason } => {
            format!(
                "failed {} ({}), {fetched} fetched",
                update.release,
                short(reason)
            )
        }
        Outcome::RolledBack { reason } => format!(
            "rolled back to {} in {} ms ({})",
            update.release,
            update.switch_ms,
            short(reason)
        ),
    }
}

/// "12s ago", "5m ago", "3h ago", "2d ago".
fn ago(now: UnixSeconds, then: UnixSeconds) -> String {
    let secs = now.saturating_sub(then);
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::messages::UpdateReport;
    use protocol::NodeId;

    fn rel(version: &str) -> ReleaseId {
        ReleaseId::new(
            AppName::new("web").expect("app"),
            Version::new(version).expect("version"),
        )
    }

    fn view(node: &str) -> NodeView {
        NodeView {
            node: NodeId::new(node).expect("node"),
            online: Some(true),
            labels: BTreeMap::new(),
            agent_version: None,
            current: Some(SlotReport {
                release: rel("2"),
                manifest_digest: Digest::of(b"m"),
                slot_dir: "/slots/x".into(),
            }),
            previous: None,
            staged: None,
            staging: None,
            last_update: Some(UpdateReport {
                release: rel("2"),
                bytes_fetched_mqtt: 1024,
                bytes_fetched_http: 1024,
                bytes_reused: 0,
                chunks_fetched: 2,
                chunks_rejected: 0,
                staging_ms: 5,
                switch_ms: 1,
                outcome: Outcome::Switched,
                finished_at: 90,
                app_output: Vec::new(),
            }),
            last_seq: Some(1),
            last_seen: Some(95),
            last_event: None,
        }
    }

    #[test]
    fn the_nodes_table_has_a_header_and_one_aligned_row_per_node() {
        let table = nodes_table(&[view("edge-1"), view("n2")], 100);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("NODE    ONLINE  CURRENT  PREVIOUS"),
            "{table}"
        );
        assert!(lines[1].contains("web@2"), "{table}");
        assert!(
            lines[1].contains("switched web@2, 2.0 KiB fetched"),
            "{table}"
        );
        assert!(lines[1].ends_with("5s ago"), "{table}");
        assert_eq!(lines[1].find("yes"), lines[2].find("yes"));
    }

    #[test]
    fn a_rolled_back_node_shows_the_outcome_and_its_time() {
        let mut node = view("n1");
        if let Some(update) = node.last_update.as_mut() {
            update.release = rel("1");
            update.switch_ms = 4;
            update.outcome = Outcome::RolledBack {
                reason: "asked by an operator".into(),
            };
        }
        let table = nodes_table(&[node], 100);
        assert!(
            table.contains("rolled back to web@1 in 4 ms (asked by an operator)"),
            "{table}"
        );
    }

    #[test]
    fn the_releases_table_lists_mirrors_in_order() {
        let view = |version: &str, mirrors: &[&str]| ReleaseView {
            release: format!("web@{version}"),
            app: "web".into(),
            version: version.into(),
            kind: ReleaseKind::App,
            files: 3,
            bytes: 2048,
            chunks: 2,
            manifest_digest: Digest::of(b"m"),
            created_at: 1,
            published_at: 40,
            mirrors: mirrors.iter().map(|m| m.to_string()).collect(),
            run: None,
            rollout: None,
        };
        let table = releases_table(
            &[view("1", &[]), view("2", &["https://cdn/a", "http://m2"])],
            100,
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("RELEASE  KIND  FILES"), "{table}");
        assert!(lines[1].ends_with("1m ago     -"), "{table}");
        assert!(lines[2].ends_with("https://cdn/a, http://m2"), "{table}");
        assert!(lines[1].contains("files only"), "{table}");
    }

    #[test]
    fn a_run_section_is_summarised_by_its_command_and_traffic_strategy() {
        let spec = |json: serde_json::Value| -> RunSpec {
            serde_json::from_value(json).expect("run spec")
        };
        assert_eq!(run_summary(None), "files only");
        assert_eq!(
            run_summary(Some(&spec(serde_json::json!({
                "command": "bin/sample-app",
                "front_door": { "listen": "0.0.0.0:8080" }
            })))),
            "bin/sample-app, front door 0.0.0.0:8080"
        );
        assert_eq!(
            run_summary(Some(&spec(serde_json::json!({
                "command": "bin/server",
                "hooks": { "switch": ["systemctl", "reload", "nginx"] }
            })))),
            "bin/server, traffic by hooks"
        );
    }

    #[test]
    fn the_stats_text_gives_exact_counts_and_the_total_egress() {
        let text = stats_text(&StatsView {
            started_at: 1000,
            uptime_secs: 5,
            mqtt_frames_published: 2,
            mqtt_frame_bytes: 2048,
            chunk_requests: 3,
            chunk_requests_refused: 1,
            digests_requested: 4,
            digests_queued: 2,
            digests_deduped: 2,
            digests_unknown: 0,
            digests_dropped: 0,
            http_chunks_served: 1,
            http_chunk_bytes: 1024,
            http_not_found: 7,
        });
        assert!(
            text.contains("MQTT chunk frames   2, 2048 bytes (2.0 KiB)"),
            "{text}"
        );
        assert!(text.contains("2 deduped by fan-out"), "{text}");
        assert!(text.contains("HTTP chunk 404s     7"), "{text}");
        assert!(
            text.contains("chunk egress        3072 bytes (3.0 KiB)"),
            "{text}"
        );
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(ago(100, 100), "0s ago");
        assert_eq!(ago(4000, 100), "1h ago");
        assert_eq!(ago(100, 200), "0s ago");
    }
}
