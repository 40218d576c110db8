//! One scrape of the serving version's metrics: `GET http://127.0.0.1:{port}{path}` on its
//! private port, parsed.
//!
//! **Invariants**: a scrape is bounded in time (the caller's timeout, for the whole
//! request) and in memory ([`MAX_BODY`], whatever the app claims or sends); it goes to the
//! loopback port directly, never through a proxy or the front door, with the client the
//! health probes use.

use std::time::Duration;

use super::prom::{self, Exposition, ParseError};

/// Largest metrics body read.
pub const MAX_BODY: usize = 1024 * 1024;

/// Why a scrape yielded nothing. The messages name the URL, for the operator reading the
/// agent's log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScrapeError {
    #[error("{0}")]
    Client(String),
    #[error("GET {url}: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url}: no complete answer within {} ms", timeout.as_millis())]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url} answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("GET {url}: the body is over the {MAX_BODY}-byte limit for metrics")]
    TooLarge { url: String },
    #[error("GET {url}: the body is not UTF-8 text")]
    NotText { url: String },
    #[error("GET {url}: not the Prometheus text format: {source}")]
    Format {
        url: String,
        #[source]
        source: ParseError,
    },
}

/// Scrapes and parses the metrics at `path` on the loopback `port` within `timeout`.
pub async fn scrape(port: u16, path: &str, timeout: Duration) -> Result<Exposition, ScrapeError> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let client = crate::app::health::client().map_err(ScrapeError::Client)?;
    let fetch = async {
        let request = |source| ScrapeError::Request {
            url: url.clone(),
            source,
        };
        let mut response = client.get(&url).send().await.map_err(request)?;
        let status = response.status();
        if !status.is_success() {
            return Err(ScrapeError::Status {
                url: url.clone(),
                status,
            });
        }
        crate::fetch::http::read_limited(&mut response, MAX_BODY, 0)
            .await
            .map_err(request)?
            .ok_or_else(|| ScrapeError::TooLarge { url: url.clone() })
    };
    let body = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ScrapeError::Timeout {
            url: url.clone(),
            timeout,
        })??;
    let text = std::str::from_utf8(&body).map_err(|_| ScrapeError::NotText { url: url.clone() })?;
    prom::parse(text).map_err(|source| ScrapeError::Format { url, source })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    /// Serves one connection with `response` (a raw HTTP answer) and returns the port.
    async fn serve_once(response: Vec<u8>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let _ = stream.write_all(&response).await;
            let _ = stream.shutdown().await;
        });
        port
    }

    fn http(status: &str, body: &[u8]) -> Vec<u8> {
        let mut answer = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(body);
        answer
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_metrics_page_is_fetched_and_parsed() {
        let port = serve_once(http("200 OK", b"# TYPE up gauge\nup 1\n")).await;
        let exposition = scrape(port, "/metrics", TIMEOUT).await.unwrap();
        assert_eq!(exposition.series.len(), 1);
        assert_eq!(exposition.series[0].value, 1.0);
    }

    #[tokio::test]
    async fn errors_say_what_went_wrong_with_which_url() {
        let port = serve_once(http("500 Internal Server Error", b"")).await;
        let error = scrape(port, "/m", TIMEOUT).await.unwrap_err();
        assert!(matches!(error, ScrapeError::Status { .. }), "{error}");
        assert!(
            error.to_string().contains(&format!("127.0.0.1:{port}/m")),
            "{error}"
        );

        let port = serve_once(http("200 OK", &vec![b'#'; MAX_BODY + 1])).await;
        let error = scrape(port, "/m", TIMEOUT).await.unwrap_err();
        assert!(matches!(error, ScrapeError::TooLarge { .. }), "{error}");

        let port = serve_once(http("200 OK", b"up \xff\n")).await;
        let error = scrape(port, "/m", TIMEOUT).await.unwrap_err();
        assert!(matches!(error, ScrapeError::NotText { .. }), "{error}");

        let port = serve_once(http("200 OK", b"<html>hello</html>")).await;
        let error = scrape(port, "/m", TIMEOUT).await.unwrap_err();
        assert!(matches!(error, ScrapeError::Format { .. }), "{error}");
    }

    #[tokio::test]
    async fn a_body_longer_than_claimed_is_cut_off_at_the_limit() {
        // No content-length: the body runs until the connection closes.
        let mut answer = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
        answer.extend(std::iter::repeat_n(b'#', MAX_BODY + 10));
        let port = serve_once(answer).await;
        let error = scrape(port, "/m", TIMEOUT).await.unwrap_err();
        assert!(matches!(error, ScrapeError::TooLarge { .. }), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_app_that_does_not_answer_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts (the kernel does, from the backlog) but never answers.
        let error = scrape(port, "/m", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(error, ScrapeError::Timeout { .. }), "{error}");
        drop(listener);
    }
}
