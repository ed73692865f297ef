//! Logs: append-only chunks keyed by byte offset, and the line format of a stored log.
//!
//! A stored log is UTF-8 text, one record per line:
//!
//! ```text
//! 2026-11-22T07:50:00.123Z O hello
//! 2026-11-22T07:50:00.124Z E warning: something on stderr
//! 2026-11-22T07:50:01.000Z S testbot: lease expired on agent a1; job requeued (attempt 2 of 3)
//! ```
//!
//! The second field is the stream: `O` stdout, `E` stderr, `S` a message from testbot itself.
//! Clients print the text of `O` lines to stdout and of `E` lines to stderr, so a remote job's
//! output looks as it would locally; `--timestamps` shows the times.

use serde::{Deserialize, Serialize};

/// Most bytes of log one chunk may carry.
pub const MAX_CHUNK_BYTES: usize = 512 * 1024;

/// Longest line the agent ships as one record; longer lines are split.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// The body of `POST /api/v1/agent/jobs/{id}/log`. Appending the same chunk twice is a no-op.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogChunk {
    pub lease: String,
    /// Byte offset in the job's log where `data` starts.
    pub offset: u64,
    /// Whole formatted lines (see [`format_line`]).
    pub data: String,
}

/// The answer to a log append: how many bytes the broker now holds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogAck {
    pub log_bytes: u64,
}

/// Query parameters of `GET /api/v1/jobs/{id}/log`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Start at this byte offset. Default 0.
    #[serde(default)]
    pub offset: u64,
    /// Keep the response open and stream new bytes until the job ends. Default false.
    #[serde(default)]
    pub follow: bool,
}

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    Stdout,
    Stderr,
    /// A message from testbot itself (the broker or agent), not from the job.
    System,
}

impl Stream {
    pub fn code(self) -> char {
        match self {
            Stream::Stdout => 'O',
            Stream::Stderr => 'E',
            Stream::System => 'S',
        }
    }

    fn from_code(code: &str) -> Option<Stream> {
        match code {
            "O" => Some(Stream::Stdout),
            "E" => Some(Stream::Stderr),
            "S" => Some(Stream::System),
            _ => None,
        }
    }
}

/// Formats one record, newline included. Newlines inside `text` are replaced by spaces, so one
/// record is always one line.
pub fn format_line(ts_ms: i64, stream: Stream, text: &str) -> String {
    let mut line = String::with_capacity(text.len() + 28);
    push_line(&mut line, &crate::format_ms(ts_ms), stream, text);
    line
}

/// Appends one record to `out`, as [`format_line`] formats it, with its time already formatted
/// (`timestamp`, from [`crate::format_ms`]): a writer of many lines formats each millisecond
/// once.
pub fn push_line(out: &mut String, timestamp: &str, stream: Stream, text: &str) {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    out.reserve(timestamp.len() + text.len() + 4);
    out.push_str(timestamp);
    out.push(' ');
    out.push(stream.code());
    out.push(' ');
    if text.contains('\n') {
        out.push_str(&text.replace('\n', " "));
    } else {
        out.push_str(text);
    }
    out.push('\n');
}

/// One parsed record of a stored log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine<'a> {
    /// The RFC 3339 timestamp as stored.
    pub timestamp: &'a str,
    pub stream: Stream,
    pub text: &'a str,
}

/// Parses one record (without its newline). A line that is not in the record format is returned
/// as stdout text with an empty timestamp, so nothing a client receives is dropped.
pub fn parse_line(line: &str) -> LogLine<'_> {
    let line = line.strip_suffix('\n').unwrap_or(line);
    let mut parts = line.splitn(3, ' ');
    if let (Some(ts), Some(code), rest) = (parts.next(), parts.next(), parts.next())
        && ts.len() >= 20
        && ts.ends_with('Z')
        && let Some(stream) = Stream::from_code(code)
    {
        return LogLine {
            timestamp: ts,
            stream,
            text: rest.unwrap_or(""),
        };
    }
    LogLine {
        timestamp: "",
        stream: Stream::Stdout,
        text: line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let line = format_line(1_763_797_800_123, Stream::Stderr, "oops\n");
        assert_eq!(line, "2025-11-22T07:50:00.123Z E oops\n");
        let parsed = parse_line(&line);
        assert_eq!(parsed.stream, Stream::Stderr);
        assert_eq!(parsed.text, "oops");
        assert_eq!(parsed.timestamp, "2025-11-22T07:50:00.123Z");
    }

    #[test]
    fn pushed_lines_are_formatted_lines() {
        let mut out = String::new();
        let stamp = crate::format_ms(1_763_797_800_123);
        push_line(&mut out, &stamp, Stream::Stdout, "one\r\n");
        push_line(&mut out, &stamp, Stream::Stderr, "two\nlines");
        assert_eq!(
            out,
            format_line(1_763_797_800_123, Stream::Stdout, "one\r\n")
                + &format_line(1_763_797_800_123, Stream::Stderr, "two\nlines")
        );
    }

    #[test]
    fn empty_and_foreign_lines_survive() {
        let line = format_line(0, Stream::Stdout, "");
        assert_eq!(parse_line(&line).text, "");
        assert_eq!(parse_line("not a record").text, "not a record");
        assert_eq!(
            format_line(0, Stream::Stdout, "a\nb"),
            "1970-01-01T00:00:00.000Z O a b\n"
        );
    }
}
