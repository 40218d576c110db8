//! The last lines a child process printed, kept for failure reports.
//!
//! **Invariant:** an [`OutputTail`] never holds more than its capacity in lines, and no line
//! is longer than [`MAX_LINE`] bytes (plus a short truncation marker), so a child that
//! prints without end, or prints megabytes without a newline, costs the agent a bounded
//! amount of memory (at most about 50 KiB per child at the defaults).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::task::JoinHandle;

/// Lines kept per child by default.
pub const KEEP_LINES: usize = 50;
/// Longest line kept, in bytes; the rest of a longer line is dropped.
pub const MAX_LINE: usize = 1024;
/// Appended to a line cut at [`MAX_LINE`].
pub const TRUNCATED: &str = " [...]";

/// A shared ring buffer of a child's most recent output lines (stdout and stderr
/// interleaved in arrival order). Cloning shares the buffer.
#[derive(Debug, Clone)]
pub struct OutputTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    capacity: usize,
}

impl Default for OutputTail {
    fn default() -> OutputTail {
        OutputTail::new(KEEP_LINES)
    }
}

impl OutputTail {
    /// An empty tail keeping the last `capacity` lines (at least one).
    pub fn new(capacity: usize) -> OutputTail {
        let capacity = capacity.max(1);
        OutputTail {
            lines: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))),
            capacity,
        }
    }

    /// Appends a line, dropping the oldest when full.
    pub fn push(&self, line: String) {
        let mut lines = self.lock();
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    /// The last `n` kept lines, oldest first.
    pub fn last(&self, n: usize) -> Vec<String> {
        let lines = self.lock();
        lines
            .iter()
            .skip(lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<String>> {
        // Pushing a line cannot leave the deque inconsistent; a panic elsewhere while the
        // lock was held is no reason to lose the output.
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reads `reader` to its end line by line into `tail`, logging each line at debug level
/// with `source` (the version or the hook) and `stream` as fields. Returns the reading task,
/// which ends when the child closes the stream (normally when it exits).
pub(crate) fn capture(
    reader: impl AsyncRead + Unpin + Send + 'static,
    tail: OutputTail,
    source: Arc<str>,
    stream: &'static str,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::with_capacity(4096, reader);
        let mut line = Vec::with_capacity(256);
        let mut cut = false;
        loop {
            let chunk = match reader.fill_buf().await {
                Ok(chunk) => chunk,
                Err(error) => {
                    tracing::debug!(%source, stream, %error, "cannot read the child's output");
                    break;
                }
            };
            if chunk.is_empty() {
                if !line.is_empty() {
                    emit(&tail, &source, stream, &line, cut);
                }
                break;
            }
            let (part, newline) = match chunk.iter().position(|&b| b == b'\n') {
                Some(at) => (&chunk[..at], true),
                None => (chunk, false),
            };
            let room = MAX_LINE - line.len();
            if part.len() > room {
                cut = true;
            }
            line.extend_from_slice(&part[..part.len().min(room)]);
            let used = part.len() + usize::from(newline);
            reader.consume(used);
            if newline {
                emit(&tail, &source, stream, &line, cut);
                line.clear();
                cut = false;
            }
        }
    })
}

fn emit(tail: &OutputTail, source: &str, stream: &'static str, bytes: &[u8], cut: bool) {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    let mut line = String::from_utf8_lossy(bytes).into_owned();
    if cut {
        line.push_str(TRUNCATED);
    }
    tracing::debug!(source, stream, "{line}");
    tail.push(line);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn captured(input: &'static [u8], capacity: usize) -> Vec<String> {
        let tail = OutputTail::new(capacity);
        capture(input, tail.clone(), Arc::from("test"), "stdout")
            .await
            .unwrap();
        tail.lines()
    }

    #[tokio::test]
    async fn lines_are_split_on_newlines_and_a_last_unterminated_line_is_kept() {
        assert_eq!(
            captured(b"one\r\ntwo\n\nthree", 10).await,
            ["one", "two", "", "three"]
        );
    }

    #[tokio::test]
    async fn only_the_last_lines_are_kept() {
        let text: String = (0..200).map(|i| format!("line {i}\n")).collect();
        let lines = captured(Box::leak(text.into_boxed_str()).as_bytes(), 50).await;
        assert_eq!(lines.len(), 50);
        assert_eq!(lines[0], "line 150");
        assert_eq!(lines[49], "line 199");
    }

    #[tokio::test]
    async fn a_huge_line_is_cut_and_marked_and_the_next_line_is_intact() {
        let mut text = vec![b'x'; 100_000];
        text.extend_from_slice(b"\nafter\n");
        let lines = captured(Box::leak(text.into_boxed_slice()), 10).await;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE + TRUNCATED.len());
        assert!(lines[0].ends_with(TRUNCATED));
        assert_eq!(lines[1], "after");
    }

    #[test]
    fn last_n_returns_the_newest_lines_oldest_first() {
        let tail = OutputTail::new(5);
        for i in 0..4 {
            tail.push(i.to_string());
        }
        assert_eq!(tail.last(2), ["2", "3"]);
        assert_eq!(tail.last(10), ["0", "1", "2", "3"]);
    }
}
