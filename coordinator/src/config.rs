//! `serve`'s configuration, validated before anything binds a port.
//!
//! [`ServeConfig::load`] turns the raw flags into checked values and opens everything on disk
//! (keys, data directory, database, chunk store, admin token). If it returns, every setting is
//! usable; if not, its error says which flag or file is wrong and what to do. No sockets yet.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// Run rumqttd in this process.
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

/// Checks a `--public-url` and drops a trailing `/`.
pub fn parse_public_url(value: &str) -> anyhow::Result<String> {
    let trimmed = value.trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => Ok(trimmed.to_owned()),
        _ => anyhow::bail!(
            "invalid --public-url {value:?}: use the http:// or https:// base URL agents can reach this coordinator at"
        ),
    }
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
}

impl ServeConfig {
    /// Validates every flag and opens the on-disk state. Binds nothing.
    pub fn load(args: ServeArgs) -> anyhow::Result<ServeConfig> {
        let broker = BrokerSpec::parse(&args.broker)?;
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
        })
    }
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
}
