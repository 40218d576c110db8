//! The client commands about who may act and who did: `token create|list|revoke` and `log`.
//! Output goes to stdout; errors are returned, never printed.

use std::time::Duration;

use anyhow::Context as _;
use protocol::{human_duration, NodeId, UnixSeconds};
use serde::de::DeserializeOwned;

use super::{ago, table, ApiClient, Listing};
use crate::api::{LogEntry, TokenCreateRequest, TokenCreated, TokenView};
use crate::unix_now;

/// Nodes a log row names before it abbreviates the rest as "+N".
const NODES_SHOWN: usize = 3;

impl ApiClient {
    async fn delete_json<T: DeserializeOwned>(&self, what: &str, path: &str) -> anyhow::Result<T> {
        let response = self
            .send(what, self.http.delete(format!("{}{path}", self.base)))
            .await?;
        response
            .json()
            .await
            .with_context(|| format!("{what}: the coordinator's answer is not the expected JSON"))
    }
}

/// `coordinator token create NAME`: prints the secret, which is never shown again.
pub async fn token_create(client: &ApiClient, name: &str, json: bool) -> anyhow::Result<()> {
    let created: TokenCreated = client
        .post_json(
            &format!("creating token {name:?}"),
            "/api/tokens",
            &TokenCreateRequest {
                name: name.to_owned(),
            },
        )
        .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&created).context("cannot format the result")?
        );
    } else {
        println!(
            "token {} created by {}; its secret, shown only this once (the coordinator keeps a hash):",
            created.name, created.created_by
        );
        println!("{}", created.secret);
        println!(
            "use it as --token or COORDINATOR_TOKEN; the deploy log records its actions as {}",
            created.name
        );
    }
    Ok(())
}

/// `coordinator token list`.
pub async fn token_list(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let listing = Listing {
        what: "listing tokens",
        path: "/api/tokens",
        empty: "no named tokens; the admin creates them with `coordinator token create NAME`",
    };
    listing
        .show(client, json, |tokens: &[TokenView]| {
            tokens_table(tokens, unix_now())
        })
        .await
}

/// `coordinator token revoke NAME`.
pub async fn token_revoke(client: &ApiClient, name: &str, json: bool) -> anyhow::Result<()> {
    let path = format!("/api/tokens/{name}");
    let revoked: TokenView = client
        .delete_json(&format!("revoking token {name:?}"), &path)
        .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&revoked).context("cannot format the result")?
        );
    } else {
        println!(
            "token {} revoked; its secret is refused from now on",
            revoked.name
        );
    }
    Ok(())
}

/// `coordinator log [--since DURATION]`: the whole log without `--since`.
pub async fn log(client: &ApiClient, since: Option<Duration>, json: bool) -> anyhow::Result<()> {
    let (path, empty) = match since {
        Some(since) => (
            format!(
                "/api/log?since={}",
                unix_now().saturating_sub(since.as_secs())
            ),
            format!(
                "no deploy-log entries in the last {}",
                human_duration(since)
            ),
        ),
        None => ("/api/log".to_owned(), "the deploy log is empty".to_owned()),
    };
    let listing = Listing {
        what: "reading the deploy log",
        path: &path,
        empty: &empty,
    };
    listing.show(client, json, log_table).await
}

/// Named tokens as an aligned text table.
fn tokens_table(tokens: &[TokenView], now: UnixSeconds) -> String {
    let mut rows = vec![["NAME", "CREATED (UTC)", "BY", "STATUS"].map(String::from)];
    for token in tokens {
        let status = match (token.revoked_at, &token.revoked_by) {
            (Some(at), Some(by)) => format!("revoked {} by {by}", ago(now, at)),
            (Some(at), None) => format!("revoked {}", ago(now, at)),
            (None, _) => "active".to_owned(),
        };
        rows.push([
            token.name.clone(),
            utc(token.created_at),
            token.created_by.clone(),
            status,
        ]);
    }
    table(&rows)
}

/// Deploy-log entries as an aligned text table, oldest first as the API returns them.
fn log_table(entries: &[LogEntry]) -> String {
    let header = ["TIME (UTC)", "WHO", "ACTION", "TARGET", "NODES", "OUTCOME"];
    let mut rows = vec![header.map(String::from)];
    for entry in entries {
        rows.push([
            utc(entry.at),
            entry.who.clone(),
            entry.action.clone(),
            entry.target.clone(),
            nodes_cell(&entry.nodes),
            entry.outcome.clone(),
        ]);
    }
    table(&rows)
}

/// "-", "n1, n2", or the first few and how many more: "n1, n2, n3 +7".
fn nodes_cell(nodes: &[NodeId]) -> String {
    if nodes.is_empty() {
        return "-".to_owned();
    }
    let shown: Vec<&str> = nodes.iter().take(NODES_SHOWN).map(NodeId::as_str).collect();
    let mut cell = shown.join(", ");
    if nodes.len() > NODES_SHOWN {
        cell.push_str(&format!(" +{}", nodes.len() - NODES_SHOWN));
    }
    cell
}

/// Unix seconds as "2023-11-14 22:13:20" (UTC, proleptic Gregorian calendar).
fn utc(at: UnixSeconds) -> String {
    let (days, secs) = (at / 86_400, at % 86_400);
    // Howard Hinnant's days-to-civil algorithm, with days counted from 0000-03-01 so that a
    // leap day is the last day of its year; `at` is unsigned, so the era is never negative.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at: UnixSeconds, who: &str, nodes: &[&str], outcome: &str) -> LogEntry {
        LogEntry {
            id: 1,
            at,
            who: who.to_owned(),
            action: "node rollback".to_owned(),
            target: "web@1".to_owned(),
            nodes: nodes
                .iter()
                .map(|n| NodeId::new(*n).expect("node"))
                .collect(),
            outcome: outcome.to_owned(),
        }
    }

    #[test]
    fn utc_times_are_calendar_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(951_868_799), "2000-02-29 23:59:59");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc(4_107_542_400), "2100-03-01 00:00:00");
    }

    #[test]
    fn many_nodes_are_abbreviated_to_the_first_few_and_a_count() {
        let nodes = |n: usize| -> Vec<NodeId> {
            (1..=n)
                .map(|i| NodeId::new(format!("n{i}")).expect("node"))
                .collect()
        };
        assert_eq!(nodes_cell(&[]), "-");
        assert_eq!(nodes_cell(&nodes(3)), "n1, n2, n3");
        assert_eq!(nodes_cell(&nodes(10)), "n1, n2, n3 +7");
    }

    #[test]
    fn the_log_table_has_one_aligned_row_per_entry_with_the_outcome_last() {
        let table = log_table(&[
            entry(1_700_000_000, "alice", &["n1"], "ok: rollback sent"),
            entry(
                1_700_000_060,
                "admin",
                &["edge-1", "edge-2", "edge-3", "edge-4"],
                "refused: node edge-4 has no previous version",
            ),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[0].starts_with("TIME (UTC)           WHO    ACTION         TARGET  NODES"),
            "{table}"
        );
        assert!(
            lines[1].starts_with("2023-11-14 22:13:20  alice"),
            "{table}"
        );
        assert!(lines[1].ends_with("ok: rollback sent"), "{table}");
        assert!(
            lines[2].contains("edge-1, edge-2, edge-3 +1  refused: node edge-4"),
            "{table}"
        );
        assert_eq!(lines[1].find("web@1"), lines[2].find("web@1"));
    }

    #[test]
    fn the_tokens_table_shows_who_created_and_revoked_each_never_a_secret() {
        let view = |name: &str, revoked: Option<UnixSeconds>| TokenView {
            name: name.to_owned(),
            created_at: 1_700_000_000,
            created_by: "admin".to_owned(),
            revoked_at: revoked,
            revoked_by: revoked.map(|_| "admin".to_owned()),
        };
        let table = tokens_table(
            &[view("alice", None), view("ci", Some(1_700_000_000))],
            1_700_007_200,
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0], "NAME   CREATED (UTC)        BY     STATUS",
            "{table}"
        );
        assert_eq!(
            lines[1], "alice  2023-11-14 22:13:20  admin  active",
            "{table}"
        );
        assert!(lines[2].ends_with("revoked 2h ago by admin"), "{table}");
    }
}
