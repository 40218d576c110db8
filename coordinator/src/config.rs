//! `serve`'s configuration, validated before anything binds a port.
//!
//! [`ServeConfig::load`] turns the raw flags into checked values and opens everything on disk
//! (keys, data directory, database, chunk store, admin token). If it returns, every setting is
//! usable; if not, its error says which flag or file is wrong and what to do. No sockets yet.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use ed25519_dalek::SigningKey;
use images::ChunkStore;
use protocol::{BrokerAddr, Topics};

use crate::cli::ServeArgs;
use crate::db::{Db, DbError};
use crate::keys;
use crate::token::AdminToken;

/// Which broker to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerSpec {
    /// Run the embedded MQTT broker in this process.
    Embedded,
    /// Connect to a broker somewhere else.
    External { host: String, port: u16 },
}

#[derive(Debug, thiserror::Error)]
#[error("invalid --broker: {0} (or `embedded` for the built-in broker)")]
pub struct BrokerSpecError(#[from] protocol::broker::BrokerAddrError);

impl BrokerSpec {
    pub fn parse(value: &str) -> Result<BrokerSpec, BrokerSpecError> {
        if value == "embedded" {
            return Ok(BrokerSpec::Embedded);
        }
        let BrokerAddr { host, port } = BrokerAddr::parse(value)?;
        Ok(BrokerSpec::External { host, port })
    }
}

/// Longest chunk base URL accepted: every deploy command carries each one.
pub const MAX_BASE_URL_LEN: usize = 1024;

/// A chunk base URL (`--public-url`, `--mirror`) that agents could not use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a usable chunk base URL: {reason}")]
pub struct BaseUrlError {
    value: String,
    reason: &'static str,
}

/// Checks an HTTP(S) base URL that agents append `/chunks/{digest}` to; returns it normalized,
/// without trailing `/`s. The one check for every such URL: the coordinator's `--public-url` and a release's
/// `--mirror`s.
///
/// Refused, beyond what is not an `http://` or `https://` URL with a host: a query or a
/// fragment (`{base}/chunks/{digest}` would name something else), credentials (the URL is
/// sent to nodes inside deploy commands, over the broker), spaces, control and non-ASCII
/// characters (spell an international host name in punycode), over [`MAX_BASE_URL_LEN`] bytes.
pub fn parse_base_url(value: &str) -> Result<String, BaseUrlError> {
    let refuse = |reason| BaseUrlError {
        value: value.chars().take(200).collect(),
        reason,
    };
    let trimmed = value.trim_end_matches('/');
    if trimmed.len() > MAX_BASE_URL_LEN {
        return Err(refuse("longer than 1024 bytes"));
    }
    if !trimmed.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(refuse(
            "it contains spaces, control or non-ASCII characters",
        ));
    }
    let Some(authority) = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
    else {
        return Err(refuse("it must start with http:// or https://"));
    };
    // The URL parser would read `http:///x` as the host `x`.
    if authority.starts_with(['/', '\\']) {
        return Err(refuse("it has no host"));
    }
    let url = reqwest::Url::parse(trimmed).map_err(|_| refuse("it does not parse as a URL"))?;
    if !matches!(url.host_str(), Some(host) if !host.is_empty()) {
        return Err(refuse("it has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refuse(
            "it carries credentials, which would be sent to every node",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(refuse(
            "it has a query or fragment; agents append /chunks/{digest} to it",
        ));
    }
    // The parser's spelling (host in lower case, default port and dot segments dropped), so
    // one base has one spelling.
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Checks a `--public-url` (see [`parse_base_url`]) and drops a trailing `/`.
pub fn parse_public_url(value: &str) -> anyhow::Result<String> {
    parse_base_url(value).map_err(|error| {
        anyhow::anyhow!(
            "invalid --public-url: {error}; use the http:// or https:// base URL agents can reach this coordinator at"
        )
    })
}

/// Everything `serve` needs, checked and opened.
pub struct ServeConfig {
    pub data: PathBuf,
    pub signing_key: SigningKey,
    pub broker: BrokerSpec,
    pub mqtt_listen: SocketAddr,
    pub http: SocketAddr,
    pub topics: Topics,
    pub public_url: String,
    pub db: Db,
    pub chunks: ChunkStore,
    pub token: AdminToken,
    pub token_path: PathBuf,
    pub token_created: bool,
    /// How long health samples are kept (at least [`MIN_METRICS_RETENTION`]).
    pub metrics_retention: Duration,
}

impl ServeConfig {
    /// Validates every flag and opens the on-disk state. Binds nothing.
    pub fn load(args: ServeArgs) -> anyhow::Result<ServeConfig> {
        let broker = BrokerSpec::parse(&args.broker)?;
        let metrics_retention = check_metrics_retention(args.metrics_retention)?;
        let topics = Topics::new(&args.topic_prefix).context("invalid --topic-prefix")?;
        let public_url = match &args.public_url {
            Some(url) => parse_public_url(url)?,
            None => {
                if args.http.ip().is_unspecified() {
                    tracing::warn!(
                        http = %args.http,
                        "--http listens on all interfaces but --public-url is not set: agents will be told to fetch chunks from http://{}; set --public-url to an address they can reach",
                        args.http
                    );
                }
                format!("http://{}", args.http)
            }
        };
        let signing_key = keys::load_signing_key(&args.keys)?;

        let data = args.data;
        fs::create_dir_all(&data).with_context(|| {
            format!(
                "cannot create the data directory {} (--data)",
                data.display()
            )
        })?;
        check_writable(&data)?;
        let db_path = data.join("db");
        let db = Db::open(&db_path).map_err(|error| match &error {
            // sled reports its file lock as a plain I/O error with this text.
            DbError::Sled(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => anyhow::anyhow!(
                "the database {} is locked: another `coordinator serve` is using --data {}; stop it or use another --data",
                db_path.display(),
                data.display()
            ),
            _ => anyhow::anyhow!("cannot open the database {}: {error}", db_path.display()),
        })?;
        let chunks =
            ChunkStore::open(data.join("chunks")).context("cannot open the chunk store")?;
        let (token, token_path, token_created) = AdminToken::load_or_create(&data)?;
        Ok(ServeConfig {
            data,
            signing_key,
            broker,
            mqtt_listen: args.mqtt_listen,
            http: args.http,
            topics,
            public_url,
            db,
            chunks,
            token,
            token_path,
            token_created,
            metrics_retention,
        })
    }
}

/// Shortest `--metrics-retention`: a canary judgment looks back minutes, and samples are
/// pruned once a minute.
pub const MIN_METRICS_RETENTION: Duration = Duration::from_secs(600);

/// Checks `--metrics-retention` (already parsed by `protocol::parse_duration`, which bounds
/// it to ten years).
pub fn check_metrics_retention(retention: Duration) -> anyhow::Result<Duration> {
    if retention < MIN_METRICS_RETENTION {
        anyhow::bail!(
            "invalid --metrics-retention {}: keep samples for at least {} (canary judgments look back minutes), e.g. 7d",
            protocol::human_duration(retention),
            protocol::human_duration(MIN_METRICS_RETENTION)
        );
    }
    Ok(retention)
}

/// Fails unless a file can be created in `dir`.
fn check_writable(dir: &Path) -> anyhow::Result<()> {
    let probe = dir.join(format!(".write-test.{}", std::process::id()));
    fs::write(&probe, b"")
        .and_then(|()| fs::remove_file(&probe))
        .with_context(|| {
            format!(
                "the data directory {} is not writable (--data)",
                dir.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_is_embedded_or_an_mqtt_url() {
        assert_eq!(
            BrokerSpec::parse("embedded").expect("ok"),
            BrokerSpec::Embedded
        );
        assert_eq!(
            BrokerSpec::parse("mqtt://broker.lan").expect("ok"),
            BrokerSpec::External {
                host: "broker.lan".to_owned(),
                port: 1883
            }
        );
        assert!(BrokerSpec::parse("mqtt://u@h:1").is_err());
    }

    #[test]
    fn metrics_retention_must_cover_a_canary_window() {
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(check_metrics_retention(week).expect("ok"), week);
        assert!(check_metrics_retention(MIN_METRICS_RETENTION).is_ok());
        let error = check_metrics_retention(Duration::from_secs(59))
            .expect_err("refused")
            .to_string();
        assert!(
            error.contains("--metrics-retention 59s") && error.contains("10m 00s"),
            "{error}"
        );
    }

    #[test]
    fn public_urls_must_be_http_and_lose_the_trailing_slash() {
        assert_eq!(
            parse_public_url("http://c:7070/").expect("ok"),
            "http://c:7070"
        );
        assert_eq!(
            parse_public_url("https://cdn.example/x").expect("ok"),
            "https://cdn.example/x"
        );
        assert!(parse_public_url("ftp://c").is_err());
        assert!(parse_public_url("http://").is_err());
    }

    #[test]
    fn base_urls_that_would_not_name_chunks_or_would_leak_secrets_are_refused() {
        for bad in [
            "http:///path",
            "http://user:secret@cdn.example",
            "http://cdn.example/x?sig=1",
            "http://cdn.example/#frag",
            "http://cdn example",
            "http://cdn.example/\u{e9}",
            "https://",
            "cdn.example",
        ] {
            assert!(parse_base_url(bad).is_err(), "{bad} was accepted");
        }
        let long = format!("https://cdn.example/{}", "a".repeat(MAX_BASE_URL_LEN));
        assert!(parse_base_url(&long).is_err());
        assert_eq!(
            parse_base_url("https://cdn.example/fleet//").expect("ok"),
            "https://cdn.example/fleet"
        );
        assert_eq!(
            parse_base_url("http://CDN.example:80/a/../fleet").expect("ok"),
            "http://cdn.example/fleet"
        );
        let error = parse_public_url("ftp://c")
            .expect_err("refused")
            .to_string();
        assert!(
            error.contains("--public-url") && error.contains("\"ftp://c\""),
            "{error}"
        );
    }
}
