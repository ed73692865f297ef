//! Shipping a job's output to the broker as it is produced.
//!
//! Lines are sent as soon as no request is in flight, so a lone line reaches followers within a
//! round trip, and lines that arrive during a request are batched into the next one (taken from
//! the executor and formatted while the request is in flight, up to a chunk's worth). A chunk
//! that fails for want of the broker is re-sent from the same offset until it is acknowledged:
//! the broker ignores bytes it already holds, so nothing is lost or doubled.
//!
//! Every line (stdout, stderr and the agent's own `testbot:` lines) and every fact passes the
//! job's [`Masker`] first: a secret variable's value never leaves the agent in a log.

use std::time::Duration;

use testbot_proto::client::{Backoff, BrokerClient, ClientError};
use testbot_proto::jobs::JobId;
use testbot_proto::logs::{LogChunk, MAX_CHUNK_BYTES, MAX_LINE_BYTES, Stream, push_line};
use testbot_proto::secrets::Masker;
use tokio::sync::mpsc;

use crate::executor::{Checkpoint, LogRecord};

/// Send a chunk once it holds this many bytes, without waiting for more lines. As much as the
/// broker takes in one chunk: a job that prints fast is shipped in as few requests as can be,
/// and each request costs the same (signing, a round trip, a transaction) whatever its size.
const TARGET_CHUNK_BYTES: usize = MAX_CHUNK_BYTES;

/// Most bytes a chunk's data may take escaped as a JSON string (each newline takes 2, each
/// control character without a short escape 6: a colour code's ESC is `\u001b`). The broker's
/// default body limit (1 MiB) holds such a chunk and its envelope with room to spare, however
/// many control characters the job printed.
const MAX_ENCODED_CHUNK_BYTES: usize = MAX_CHUNK_BYTES + MAX_CHUNK_BYTES / 4;

/// How shipping ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShipEnd {
    /// Every line was acknowledged; the log holds this many bytes.
    Complete(u64),
    /// The broker no longer honours the lease: the job was taken away.
    LeaseLost,
    /// The broker refused the log (too large, or out of step); the rest was dropped.
    Refused(String),
}

/// Ships records from `rx` until the channel closes, starting at byte `offset` of the job's log,
/// with the job's secret values masked by `masker`. `on_ack` hears, after each acknowledged chunk that held lines read from files, up to which
/// file positions the broker now has the output.
#[allow(clippy::too_many_arguments)]
pub async fn ship_log(
    client: BrokerClient,
    id: JobId,
    lease: String,
    masker: Masker,
    mut offset: u64,
    mut rx: mpsc::Receiver<LogRecord>,
    mut on_send: impl FnMut(Checkpoint) + Send,
    mut on_ack: impl FnMut(Checkpoint) + Send,
) -> ShipEnd {
    let mut queued = Queued::new(masker);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        // Facts and markers taken in while a chunk was being sent are handled before waiting.
        if queued.pending.is_empty() && queued.facts.is_empty() && queued.barriers.is_empty() {
            match rx.recv().await {
                Some(record) => queued.push(record),
                None => return ShipEnd::Complete(offset),
            }
        }
        while queued.pending.len() < TARGET_CHUNK_BYTES {
            match rx.try_recv() {
                Ok(record) => queued.push(record),
                Err(_) => break,
            }
        }
        for (key, value) in queued.facts.drain(..) {
            let request = testbot_proto::agents::MetadataRequest {
                lease: lease.clone(),
                key,
                value,
            };
            // Best effort: a fact the broker cannot take is not worth holding the log for.
            if let Err(err) = client.set_metadata(id, &request).await {
                tracing::warn!(job_id = %id, %err, key = %request.key, "Cannot record job metadata.");
            }
        }
        // Every fact before each marker has now been sent.
        for barrier in queued.barriers.drain(..) {
            barrier.notify_one();
        }
        if queued.pending.is_empty() {
            continue;
        }
        let cut = chunk_end(&queued.pending);
        let chunk = LogChunk {
            lease: lease.clone(),
            offset,
            data: queued.pending[..cut].to_string(),
        };
        let mut sent = queued.marks.clone();
        sent.acknowledge(cut);
        let after = Checkpoint {
            log_offset: offset + cut as u64,
            stdout_pos: sent.stdout,
            stderr_pos: sent.stderr,
        };
        on_send(after);
        let sending = client.append_log(id, &chunk);
        match while_sending(sending, &mut rx, &mut queued, cut + TARGET_CHUNK_BYTES).await {
            Ok(_) => {
                backoff.reset();
                offset += cut as u64;
                queued.pending.drain(..cut);
                queued.marks.acknowledge(cut);
                on_ack(after);
            }
            Err(err) if err.is_retryable() => {
                let delay = backoff.next_delay();
                tracing::warn!(job_id = %id, %err, ?delay, "Cannot ship log; retrying.");
                tokio::time::sleep(delay).await;
            }
            Err(err) => {
                let end = refusal(&err);
                tracing::warn!(job_id = %id, %err, "The broker refused the job's log; dropping the rest.");
                // Keep reading so the job is never blocked on a full channel.
                tokio::spawn(async move { while rx.recv().await.is_some() {} });
                return end;
            }
        }
    }
}

/// Waits for `request` (a chunk being sent), meanwhile taking records from `rx` until `queued`
/// holds `limit` bytes: the next chunk is formatted while the broker stores this one, and the job
/// is not held up waiting for room in the channel.
async fn while_sending<T>(
    request: impl std::future::Future<Output = T>,
    rx: &mut mpsc::Receiver<LogRecord>,
    queued: &mut Queued,
    limit: usize,
) -> T {
    let mut request = std::pin::pin!(request);
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            done = &mut request => return done,
            record = rx.recv(), if open && queued.pending.len() < limit => {
                let Some(record) = record else {
                    // The job's output ended; the loop above finds that out again.
                    open = false;
                    continue;
                };
                queued.push(record);
                // Whatever else is waiting, before polling the request again.
                while queued.pending.len() < limit {
                    match rx.try_recv() {
                        Ok(record) => queued.push(record),
                        Err(_) => break,
                    }
                }
            }
        }
    }
}

fn refusal(err: &ClientError) -> ShipEnd {
    if err.is_lease_lost() {
        ShipEnd::LeaseLost
    } else {
        ShipEnd::Refused(err.to_string())
    }
}

/// What is read from the job and not yet sent: log lines, their file positions, and facts.
struct Queued {
    /// Formatted log lines.
    pending: String,
    marks: Marks,
    /// Metadata to send, (key, value).
    facts: Vec<(String, String)>,
    /// Markers to notify once the facts before them are sent.
    barriers: Vec<std::sync::Arc<tokio::sync::Notify>>,
    cuts: Cuts,
    masker: Masker,
    /// The time of the last line pushed, and that time formatted: lines come many a millisecond.
    stamp_ms: Option<i64>,
    stamp: String,
}

impl Queued {
    fn new(masker: Masker) -> Queued {
        Queued {
            pending: String::new(),
            marks: Marks::default(),
            facts: Vec::new(),
            barriers: Vec::new(),
            cuts: Cuts::default(),
            masker,
            stamp_ms: None,
            stamp: String::new(),
        }
    }

    /// Adds a record to the pending chunk (a line) or to the facts to send (metadata), masked.
    fn push(&mut self, record: LogRecord) {
        if let Some(barrier) = record.barrier {
            self.barriers.push(barrier);
            return;
        }
        if let Some((key, value)) = record.metadata {
            self.facts
                .push((key, self.masker.mask(&value).into_owned()));
            return;
        }
        let text = self.cuts.mask(&self.masker, record.stream, &record.text);
        if self.stamp_ms != Some(record.ts_ms) {
            self.stamp_ms = Some(record.ts_ms);
            self.stamp = testbot_proto::format_ms(record.ts_ms);
        }
        push_line(&mut self.pending, &self.stamp, record.stream, &text);
        if let Some(pos) = record.mark {
            self.marks
                .pending
                .push((self.pending.len(), record.stream, pos));
        }
    }
}

/// Which output streams are in the middle of a line too long to ship whole: executors cut such a
/// line into pieces of about [`MAX_LINE_BYTES`], and a secret value may straddle a cut.
#[derive(Debug, Default)]
struct Cuts {
    stdout: bool,
    stderr: bool,
}

impl Cuts {
    /// `text` masked, with the edges of a piece of a cut line masked too.
    fn mask<'t>(
        &mut self,
        masker: &Masker,
        stream: Stream,
        text: &'t str,
    ) -> std::borrow::Cow<'t, str> {
        let cut = match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
            Stream::System => return masker.mask(text),
        };
        let continues = *cut;
        // A piece is as long as a piece gets (cut on a character boundary) and ends no line.
        let goes_on = text.len() + 3 >= MAX_LINE_BYTES && !text.ends_with('\n');
        *cut = goes_on;
        if masker.is_empty() || !(continues || goes_on) {
            return masker.mask(text);
        }
        masker.mask_piece(text, continues, goes_on).into()
    }
}

/// File positions of lines waiting to be shipped, and of the last acknowledged ones.
#[derive(Debug, Clone, Default)]
struct Marks {
    /// (end of the line in `pending`, stream, file position after it).
    pending: Vec<(usize, Stream, u64)>,
    stdout: Option<u64>,
    stderr: Option<u64>,
}

impl Marks {
    /// The first `cut` bytes of `pending` were acknowledged.
    fn acknowledge(&mut self, cut: usize) {
        self.pending.retain_mut(|(end, stream, pos)| {
            if *end > cut {
                *end -= cut;
                return true;
            }
            match stream {
                Stream::Stdout => self.stdout = Some(*pos),
                Stream::Stderr => self.stderr = Some(*pos),
                Stream::System => {}
            }
            false
        });
    }
}

/// The end of the next chunk: all of `pending`, or the last whole line within the chunk limits
/// ([`MAX_CHUNK_BYTES`] of log, [`MAX_ENCODED_CHUNK_BYTES`] once escaped for JSON).
fn chunk_end(pending: &str) -> usize {
    let window = &pending.as_bytes()[..pending.len().min(MAX_CHUNK_BYTES)];
    // The common case, in one pass that the compiler vectorises: the window fits escaped even
    // if every byte that has an escape took the longest one.
    let escapes: usize = window
        .chunks(255)
        .map(|piece| {
            let count: u8 = piece
                .iter()
                .map(|&b| u8::from((b < 0x20) | (b == b'"') | (b == b'\\')))
                .sum();
            usize::from(count)
        })
        .sum();
    let end = if window.len() + 5 * escapes <= MAX_ENCODED_CHUNK_BYTES {
        window.len()
    } else {
        // Many escapes: count them exactly, and stop where the escaped size reaches the limit.
        let mut escaped = 0;
        window
            .iter()
            .position(|&b| {
                escaped += 1 + json_extra(b);
                escaped > MAX_ENCODED_CHUNK_BYTES
            })
            .unwrap_or(window.len())
    };
    if end == pending.len() {
        return end;
    }
    match pending.as_bytes()[..end].iter().rposition(|&b| b == b'\n') {
        Some(nl) => nl + 1,
        None => pending.floor_char_boundary(end),
    }
}

/// The bytes a JSON string escape adds to `b`: 1 for `"`, `\\` and the control characters
/// with a short escape (`\n`, `\t`, ...), 5 for other control characters (`\u001b`).
fn json_extra(b: u8) -> usize {
    let short = matches!(b, b'"' | b'\\' | b'\n' | b'\t' | b'\r' | 0x08 | 0x0c);
    let control = b < 0x20;
    usize::from(short) + 5 * usize::from(control && !short)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_end_at_a_line_within_both_limits() {
        let line = format!("{}\n", "x".repeat(99));
        // Small: all of it.
        assert_eq!(chunk_end(&line.repeat(10)), 1000);
        // Plain text: whole lines up to the size limit.
        let plain = line.repeat(MAX_CHUNK_BYTES / 100 + 10);
        let cut = chunk_end(&plain);
        assert_eq!(cut, MAX_CHUNK_BYTES / 100 * 100);
        // Colour codes everywhere: whole lines whose JSON form fits.
        let coloured = format!("{}\n", "\u{1b}[0m".repeat(20)).repeat(MAX_CHUNK_BYTES / 80);
        let cut = chunk_end(&coloured);
        assert!(coloured[..cut].ends_with('\n'));
        let encoded = serde_json::to_string(&coloured[..cut]).unwrap().len() - 2;
        assert!(encoded <= MAX_ENCODED_CHUNK_BYTES, "{encoded}");
        assert!(
            encoded + 2 * 6 * 20 > MAX_ENCODED_CHUNK_BYTES,
            "{encoded}: cut too early"
        );
        // Every escape counts as serde_json writes it.
        let odd = "\"\\\n\t\r\u{8}\u{c}\u{1}\u{1f} é";
        let extra: usize = odd.bytes().map(json_extra).sum();
        assert_eq!(
            odd.len() + extra,
            serde_json::to_string(odd).unwrap().len() - 2
        );
    }

    #[test]
    fn a_secret_cut_with_a_long_line_is_masked_in_both_pieces() {
        let masker = Masker::new(["s3cr3t-value"]);
        let mut cuts = Cuts::default();
        let first = format!("{}s3cr3t", "x".repeat(MAX_LINE_BYTES - 6));
        let first = cuts.mask(&masker, Stream::Stdout, &first).into_owned();
        assert!(first.ends_with("x***"), "{}", &first[first.len() - 10..]);
        // Another stream's line between the pieces changes nothing.
        assert_eq!(cuts.mask(&masker, Stream::Stderr, "-value"), "-value");
        assert_eq!(
            cuts.mask(&masker, Stream::Stdout, "-value end\n"),
            "*** end\n"
        );
        // The line ended: the next one is not a continuation.
        assert_eq!(cuts.mask(&masker, Stream::Stdout, "-value"), "-value");
    }

    #[test]
    fn lines_and_facts_are_masked_before_they_are_queued() {
        let mut queued = Queued::new(Masker::new(["s3cr3t-value"]));
        for (stream, text) in [
            (Stream::Stdout, "token s3cr3t-value"),
            (Stream::Stderr, "s3cr3t-values3cr3t-value"),
            (
                Stream::System,
                "testbot: the executor failed: bad s3cr3t-value",
            ),
        ] {
            let record = LogRecord {
                ts_ms: 0,
                stream,
                text: text.into(),
                mark: None,
                metadata: None,
                barrier: None,
            };
            queued.push(record);
        }
        let fact = LogRecord {
            ts_ms: 0,
            stream: Stream::System,
            text: String::new(),
            mark: None,
            metadata: Some(("note".into(), "s3cr3t-value".into())),
            barrier: None,
        };
        queued.push(fact);
        let Queued { pending, facts, .. } = queued;
        assert!(!pending.contains("s3cr3t"), "{pending}");
        assert!(pending.contains(" O token ***\n"), "{pending}");
        assert!(pending.contains(" E ******\n"), "{pending}");
        assert!(
            pending.ends_with("the executor failed: bad ***\n"),
            "{pending}"
        );
        assert_eq!(facts, [("note".to_string(), "***".to_string())]);
    }
}
