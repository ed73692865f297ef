//! `testbot-bench-logs`: how fast a job's log gets from the job to the broker, and from the
//! broker to a client following it.
//!
//! Everything runs in this process over the real protocol, as in `testbot-bench`: a broker on
//! `127.0.0.1:0` (SQLite in a fresh data directory, or a fresh PostgreSQL database with
//! `--database-url`) with its log limit raised above the job's output, and one agent with the
//! shell executor. Each run starts a fresh fleet, runs a warm-up job, then submits one job that
//! prints `--bytes` of lines as fast as `yes | head` makes them, while a second loop in the job
//! prints a line stamped with the time (`date +%s%N`) to stderr every `--stamp-interval`.
//! A client follows the job's log from the moment it is submitted (`follow_log`, as
//! `testbot run` does) and a second client polls the job's `log_bytes`. Per run:
//!
//! - **ingest**: the log bytes the broker stored ÷ the time from the job's start (the agent's
//!   executor begins it) until the broker's `log_bytes` reached its final value;
//! - **end to end**: submit → the follower has received every byte of the log;
//! - **printed → seen**: for each stamped line, the time from its stamp (the job's clock) to
//!   its arrival at the follower (this process's clock: the same machine, the same clock);
//!   p50, p99 and max within the run. **read → seen** is the same from the agent's own
//!   timestamp of the line (when it read it, to the millisecond);
//! - **read back**: the whole stored log read by a client once the job has ended (a log opened
//!   after the fact, or a follower that joins late), in bytes per second;
//! - the process's CPU time per second and its peak resident memory (broker, agent and clients
//!   together: they share the process; the job's own processes are not counted).
//!
//! The table shows the median of each figure over `--runs` runs, with the range.

use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser;
use testbot_bench::fleet::{BenchFleet, ExecutorChoice, Storage};
use testbot_bench::stats::{median, ms, percentile};
use testbot_bench::system::{machine, peak_rss, process_cpu_time, reset_peak_rss};
use testbot_proto::client::{BrokerClient, follow_log};
use testbot_proto::jobs::{JobId, JobSpec, JobState};
use tokio::time::Instant;

/// Target: log bytes the broker stores per second from one job.
const TARGET_INGEST_BYTES_PER_SEC: f64 = 100e6;
/// Target: a line reaches a following client this soon after it was printed.
const TARGET_LINE_LATENCY: Duration = Duration::from_millis(100);
/// How often the job's stored log size is sampled.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// The longest the job may run.
const JOB_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long the warm-up job may take.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(30);
/// What the job's stamped lines start with, and how they look in the stored log (stderr).
const STAMP: &str = "stamp ";
const STORED_STAMP: &[u8] = b" E stamp ";

/// Runs one job that prints a lot of output through an in-process broker and agent, and reports
/// the broker's ingest rate, the end-to-end time and the latency of lines to a following client.
/// Progress goes to stderr, the results table to stdout.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Opts {
    /// Bytes of output the job prints (`1GB`, `50MB`, `64MiB`, or a number). Default: 1GB
    /// (50MB with --quick).
    #[arg(long, env = "TESTBOT_BENCH_BYTES", value_parser = parse_bytes)]
    bytes: Option<u64>,
    /// Runs, each on a fresh fleet. Default: 3 (2 with --quick).
    #[arg(long, env = "TESTBOT_BENCH_RUNS")]
    runs: Option<usize>,
    /// Length of each printed line, without its newline.
    #[arg(long, env = "TESTBOT_BENCH_LINE_BYTES", default_value_t = 100)]
    line_bytes: usize,
    /// How often the job prints a stamped line to stderr.
    #[arg(long, env = "TESTBOT_BENCH_STAMP_INTERVAL", default_value = "20ms", value_parser = humantime::parse_duration)]
    stamp_interval: Duration,
    /// A PostgreSQL server's maintenance database (`postgres://USER@HOST:PORT/postgres`): each
    /// run gets a fresh database there instead of SQLite. Default: SQLite.
    #[arg(long, env = "TESTBOT_BENCH_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// A short run (50MB, 2 runs) for checking that the benchmark works.
    #[arg(long, env = "TESTBOT_BENCH_QUICK")]
    quick: bool,
}

/// `1GB`, `50MB`, `64MiB`, `1000`: decimal or binary multiples of a byte.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 1GB or 50MB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown unit {other:?}: use B, KB, MB, GB, KiB, MiB or GiB"
            ));
        }
    };
    let bytes = number * scale;
    if !(1.0..=1e12).contains(&bytes) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes as u64)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The broker and agent log every request and job at debug and info; keep them quiet.
    testbot_proto::init_tracing("warn");
    match try_main(Opts::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("testbot-bench-logs: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What each run does.
#[derive(Debug, Clone)]
struct Plan {
    bytes: u64,
    line_bytes: usize,
    stamp_interval: Duration,
}

impl Plan {
    /// The job: a stamping loop on stderr beside `yes | head` on stdout, and a last stamp once
    /// the output is done. `yes` ends on SIGPIPE, hence no `pipefail`.
    fn script(&self) -> String {
        let Plan {
            bytes,
            line_bytes,
            stamp_interval,
        } = self;
        let interval = stamp_interval.as_secs_f64();
        format!(
            "set +o pipefail\n\
             line=$(head -c {line_bytes} /dev/zero | tr '\\0' x)\n\
             (while :; do echo \"{STAMP}$(date +%s%N)\" >&2; sleep {interval}; done) &\n\
             stamper=$!\n\
             yes \"$line\" | head -c {bytes}\n\
             kill $stamper\n\
             wait $stamper || true\n\
             echo \"{STAMP}$(date +%s%N)\" >&2\n"
        )
    }

    /// The broker's per-job log limit for the run: room for the job's output with the
    /// timestamps and stream codes of its lines (27 bytes each), and the agent's own lines.
    fn max_log_bytes(&self) -> u64 {
        let lines = self.bytes / (self.line_bytes as u64 + 1) + 1;
        self.bytes + lines * 32 + 64 * 1024 * 1024
    }
}

async fn try_main(opts: Opts) -> anyhow::Result<()> {
    let Opts {
        bytes,
        runs,
        line_bytes,
        stamp_interval,
        database_url,
        quick,
    } = opts;
    let plan = Plan {
        bytes: bytes.unwrap_or(if quick { 50_000_000 } else { 1_000_000_000 }),
        line_bytes,
        stamp_interval,
    };
    let runs = runs.unwrap_or(if quick { 2 } else { 3 });
    anyhow::ensure!(runs > 0, "--runs must be at least 1");
    anyhow::ensure!(
        (1..=testbot_proto::logs::MAX_LINE_BYTES / 2).contains(&line_bytes),
        "--line-bytes must be between 1 and {}",
        testbot_proto::logs::MAX_LINE_BYTES / 2
    );
    anyhow::ensure!(
        stamp_interval >= Duration::from_millis(1),
        "--stamp-interval must be at least 1ms"
    );
    let storage = Storage {
        database_url,
        brokers: 1,
    };
    let machine = machine();
    eprintln!(
        "testbot-bench-logs: {machine}; {}; {runs} runs of {} of {}-byte lines",
        storage_label(&storage),
        megabytes(plan.bytes),
        line_bytes + 1
    );
    let mut results = Vec::with_capacity(runs);
    for run in 1..=runs {
        let began = Instant::now();
        let result = run_once(&storage, &plan)
            .await
            .with_context(|| format!("Run {run} failed"))?;
        eprintln!(
            "[run {run}/{runs}] ingest {:.1} MB/s; end to end {:.2} s; printed → seen p50 {:.1} ms, \
             p99 {:.1} ms, max {:.1} ms ({} lines); read back {:.0} MB/s; CPU {:.1} ms/MB; {} stored \
             ({:.1} s)",
            result.ingest_bytes_per_sec / 1e6,
            result.end_to_end.as_secs_f64(),
            ms(result.printed_p50),
            ms(result.printed_p99),
            ms(result.printed_max),
            result.stamps,
            result.log_bytes as f64 / 1e6 / result.read_back.as_secs_f64(),
            result.cpu_ms_per_mb.unwrap_or(f64::NAN),
            megabytes(result.log_bytes),
            began.elapsed().as_secs_f64()
        );
        results.push(result);
    }
    let report = render_report(
        &format!("{machine}; {}", storage_label(&storage)),
        &plan,
        &results,
    );
    std::io::stdout()
        .write_all(report.as_bytes())
        .context("Cannot write the report")?;
    Ok(())
}

fn storage_label(storage: &Storage) -> &'static str {
    if storage.database_url.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    }
}

/// `1000 MB`, `50.0 MB`.
fn megabytes(bytes: u64) -> String {
    let mb = bytes as f64 / 1e6;
    if mb >= 100.0 {
        format!("{mb:.0} MB")
    } else {
        format!("{mb:.1} MB")
    }
}

/// The figures of one run.
#[derive(Debug, Clone)]
struct RunResult {
    /// The size of the stored log.
    log_bytes: u64,
    /// Stored log bytes ÷ (job start → the broker has the last byte).
    ingest_bytes_per_sec: f64,
    /// Job start → the broker has the last byte.
    ingest: Duration,
    /// Submit → the follower has every byte.
    end_to_end: Duration,
    /// Stamped line printed → seen by the follower.
    printed_p50: Duration,
    printed_p99: Duration,
    printed_max: Duration,
    /// The agent read the line (its millisecond timestamp) → seen by the follower.
    read_p50: Duration,
    read_p99: Duration,
    stamps: usize,
    /// Process CPU time per second from submit until the follower had every byte.
    cpu_cores: Option<f64>,
    /// The same CPU time per megabyte stored: what the log costs, however busy the machine.
    cpu_ms_per_mb: Option<f64>,
    /// Reading the whole stored log back once the job has ended (not following).
    read_back: Duration,
    /// Peak resident memory of the process during the run.
    peak_rss: Option<u64>,
}

/// Starts a fleet, measures, and stops the fleet whatever happened.
async fn run_once(storage: &Storage, plan: &Plan) -> anyhow::Result<RunResult> {
    let max_log_bytes = plan.max_log_bytes();
    let fleet = BenchFleet::start_with(storage, ExecutorChoice::Shell, 1, |config| {
        config.settings.max_log_bytes = max_log_bytes;
    })
    .await?;
    let result = measure(&fleet, plan).await;
    let stopped = fleet.stop().await;
    let result = result?;
    stopped?;
    Ok(result)
}

async fn measure(fleet: &BenchFleet, plan: &Plan) -> anyhow::Result<RunResult> {
    let client = &fleet.client;
    // The agent has connected and the shell executor is warm before anything is timed.
    let warmup = client
        .submit(&JobSpec {
            script: "echo warm".into(),
            ..Default::default()
        })
        .await
        .context("Cannot submit the warm-up job")?;
    let warm = tokio::time::timeout(WARMUP_TIMEOUT, follow_log(client, warmup.id, 0, |_| {}))
        .await
        .with_context(|| format!("The warm-up job did not finish within {WARMUP_TIMEOUT:?}"))?
        .context("Cannot follow the warm-up job")?;
    ensure_succeeded(&warm)?;

    let rss_reset = reset_peak_rss();
    let cpu_before = process_cpu_time();
    let submit_at = Instant::now();
    let job = client
        .submit(&JobSpec {
            script: plan.script(),
            timeout_secs: Some(JOB_TIMEOUT.as_secs()),
            ..Default::default()
        })
        .await
        .context("Cannot submit the job")?;
    let follower = tokio::spawn(follow(client.clone(), job.id));
    let sizes = tokio::spawn(watch_size(client.clone(), job.id));
    let followed = follower.await.context("The follower panicked")??;
    let wall = submit_at.elapsed();
    let cpu = cpu_before
        .zip(process_cpu_time())
        .map(|(before, after)| after - before);
    let peak_rss = if rss_reset { peak_rss() } else { None };
    let stored_at = sizes.await.context("The size watcher panicked")??;

    let done = &followed.job;
    ensure_succeeded(done)?;
    anyhow::ensure!(
        !done.metadata.contains_key("log_truncated"),
        "The broker cut the log: {}",
        done.metadata["log_truncated"]
    );
    anyhow::ensure!(
        followed.bytes == done.log_bytes,
        "The follower received {} bytes of a {}-byte log",
        followed.bytes,
        done.log_bytes
    );
    anyhow::ensure!(
        done.log_bytes >= plan.bytes,
        "The log holds {} bytes, less than the {} the job printed",
        done.log_bytes,
        plan.bytes
    );
    anyhow::ensure!(!followed.printed.is_empty(), "No stamped line arrived");
    let started_at = fleet
        .starts
        .get(job.id)
        .context("The job finished but never reached the executor")?;
    let ingest = stored_at
        .saturating_duration_since(started_at)
        .max(POLL_INTERVAL);
    let read_back = read_back(client, job.id, done.log_bytes).await?;
    let p = |samples: &[Duration], p: f64| percentile(samples, p).unwrap_or_default();
    Ok(RunResult {
        log_bytes: done.log_bytes,
        ingest_bytes_per_sec: done.log_bytes as f64 / ingest.as_secs_f64(),
        ingest,
        end_to_end: followed.last_byte_at.saturating_duration_since(submit_at),
        printed_p50: p(&followed.printed, 50.0),
        printed_p99: p(&followed.printed, 99.0),
        printed_max: p(&followed.printed, 100.0),
        read_p50: p(&followed.read, 50.0),
        read_p99: p(&followed.read, 99.0),
        stamps: followed.printed.len(),
        cpu_cores: cpu.map(|cpu| cpu.as_secs_f64() / wall.as_secs_f64()),
        cpu_ms_per_mb: cpu.map(|cpu| ms(cpu) / (done.log_bytes as f64 / 1e6)),
        read_back,
        peak_rss,
    })
}

/// Reads the whole log of the ended job, as a client that opens it afterwards does; checks that
/// it is all there.
async fn read_back(client: &BrokerClient, id: JobId, log_bytes: u64) -> anyhow::Result<Duration> {
    use futures_util::StreamExt as _;
    let began = Instant::now();
    let stream = client
        .log_stream(id, 0, false)
        .await
        .with_context(|| format!("Cannot read the log of job {id}"))?;
    let mut stream = std::pin::pin!(stream);
    let mut bytes = 0u64;
    while let Some(piece) = stream.next().await {
        bytes += piece
            .with_context(|| format!("The log of job {id} broke off"))?
            .len() as u64;
    }
    let took = began.elapsed();
    anyhow::ensure!(
        bytes == log_bytes,
        "Reading the log back gave {bytes} bytes of {log_bytes}"
    );
    Ok(took)
}

fn ensure_succeeded(job: &testbot_proto::jobs::Job) -> anyhow::Result<()> {
    anyhow::ensure!(
        job.state == JobState::Succeeded,
        "Job {} ended {}: {}",
        job.id,
        job.state,
        job.reason.as_deref().unwrap_or("no reason given")
    );
    Ok(())
}

/// Polls the job's stored log size until the job has ended; returns when the size first reached
/// its final value (to within [`POLL_INTERVAL`] and one request).
async fn watch_size(client: BrokerClient, id: JobId) -> anyhow::Result<Instant> {
    let mut size = 0;
    let mut size_since = Instant::now();
    loop {
        let job = client
            .job(id)
            .await
            .with_context(|| format!("Cannot read job {id}"))?;
        let now = Instant::now();
        if job.log_bytes != size {
            size = job.log_bytes;
            size_since = now;
        }
        if job.state.is_terminal() {
            return Ok(size_since);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// What the follower saw.
struct Followed {
    job: testbot_proto::jobs::Job,
    bytes: u64,
    last_byte_at: Instant,
    /// Per stamped line: printed → seen.
    printed: Vec<Duration>,
    /// Per stamped line: read by the agent → seen.
    read: Vec<Duration>,
}

/// Follows the job's log from its first byte until it ends, timing the stamped lines.
async fn follow(client: BrokerClient, id: JobId) -> anyhow::Result<Followed> {
    let mut lines = StampedLines::default();
    let mut bytes = 0u64;
    let mut last_byte_at = Instant::now();
    let job = follow_log(&client, id, 0, |chunk| {
        let arrived = SystemTime::now();
        last_byte_at = Instant::now();
        bytes += chunk.len() as u64;
        lines.take(chunk, arrived);
    })
    .await
    .with_context(|| format!("Cannot follow the log of job {id}"))?;
    Ok(Followed {
        job,
        bytes,
        last_byte_at,
        printed: lines.printed,
        read: lines.read,
    })
}

/// Finds the stamped lines in a log arriving in pieces that need not end at a line's end.
#[derive(Default)]
struct StampedLines {
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
    printed: Vec<Duration>,
    read: Vec<Duration>,
}

impl StampedLines {
    fn take(&mut self, chunk: &[u8], arrived: SystemTime) {
        let Some(last_newline) = memchr::memrchr(b'\n', chunk) else {
            self.partial.extend_from_slice(chunk);
            return;
        };
        let mut whole = &chunk[..=last_newline];
        if !self.partial.is_empty() {
            let first_newline = memchr::memchr(b'\n', whole).expect("a newline was found");
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&whole[..=first_newline]);
            self.scan(&line, arrived);
            whole = &whole[first_newline + 1..];
        }
        self.scan(whole, arrived);
        self.partial.extend_from_slice(&chunk[last_newline + 1..]);
    }

    /// Times every stamped line in `lines` (whole lines).
    fn scan(&mut self, lines: &[u8], arrived: SystemTime) {
        for at in memchr::memmem::find_iter(lines, STORED_STAMP) {
            let start = memchr::memrchr(b'\n', &lines[..at]).map_or(0, |nl| nl + 1);
            let rest = &lines[at + STORED_STAMP.len()..];
            let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
            let (Some(read), Some(printed)) = (
                std::str::from_utf8(&lines[start..at])
                    .ok()
                    .and_then(|ts| humantime::parse_rfc3339(ts).ok()),
                std::str::from_utf8(&rest[..end])
                    .ok()
                    .and_then(|ns| ns.trim().parse::<u64>().ok())
                    .map(|ns| UNIX_EPOCH + Duration::from_nanos(ns)),
            ) else {
                continue;
            };
            self.printed
                .push(arrived.duration_since(printed).unwrap_or_default());
            self.read
                .push(arrived.duration_since(read).unwrap_or_default());
        }
    }
}

/// The results table and the comparison with the targets.
fn render_report(machine: &str, plan: &Plan, results: &[RunResult]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let runs = results.len();
    let _ = writeln!(out, "testbot-bench-logs on {machine}");
    let _ = writeln!(
        out,
        "One job printing {} of {}-byte lines, one agent (shell executor), one follower. \
         Medians over {runs} runs (p50/p99/max within a run).",
        megabytes(plan.bytes),
        plan.line_bytes + 1
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "| figure | median | min–max |");
    let _ = writeln!(out, "|---|--:|--:|");
    let stat = |f: &dyn Fn(&RunResult) -> Option<f64>| {
        let values: Vec<f64> = results.iter().filter_map(f).collect();
        let (lo, hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        median(&values).map(|m| (m, lo, hi))
    };
    let mut row = |name: &str, unit: &str, digits: usize, f: &dyn Fn(&RunResult) -> Option<f64>| {
        if let Some((m, lo, hi)) = stat(f) {
            let unit = if unit.is_empty() {
                String::new()
            } else {
                format!(" {unit}")
            };
            let _ = writeln!(
                out,
                "| {name} | {m:.digits$}{unit} | {lo:.digits$}–{hi:.digits$}{unit} |"
            );
        }
    };
    row("stored log", "MB", 1, &|r| Some(r.log_bytes as f64 / 1e6));
    row("ingest rate", "MB/s", 1, &|r| {
        Some(r.ingest_bytes_per_sec / 1e6)
    });
    row("ingest time", "s", 2, &|r| Some(r.ingest.as_secs_f64()));
    row("end to end", "s", 2, &|r| Some(r.end_to_end.as_secs_f64()));
    row("end to end rate", "MB/s", 1, &|r| {
        Some(r.log_bytes as f64 / 1e6 / r.end_to_end.as_secs_f64())
    });
    row("printed → seen p50", "ms", 1, &|r| {
        Some(ms(r.printed_p50))
    });
    row("printed → seen p99", "ms", 1, &|r| {
        Some(ms(r.printed_p99))
    });
    row("printed → seen max", "ms", 1, &|r| {
        Some(ms(r.printed_max))
    });
    row("read → seen p50", "ms", 1, &|r| Some(ms(r.read_p50)));
    row("read → seen p99", "ms", 1, &|r| Some(ms(r.read_p99)));
    row("stamped lines", "", 0, &|r| Some(r.stamps as f64));
    row("read back rate", "MB/s", 1, &|r| {
        Some(r.log_bytes as f64 / 1e6 / r.read_back.as_secs_f64())
    });
    row("CPU cores (process)", "", 2, &|r| r.cpu_cores);
    row("CPU time per stored MB (process)", "ms", 1, &|r| {
        r.cpu_ms_per_mb
    });
    row("peak RSS (process)", "MB", 0, &|r| {
        r.peak_rss.map(|b| b as f64 / 1e6)
    });
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "ingest: log bytes stored ÷ (the agent starts the job → the broker's log_bytes reaches its \
         final size, sampled every {} ms). end to end: submit → the following client has every \
         byte. printed → seen: a stamped stderr line's `date +%s%N` → its arrival at the \
         follower; read → seen: the agent's timestamp of the line (to the ms) → arrival. read back: \
         the whole log read by a client once the job has ended (not following). CPU and RSS \
         (from submit until the follower has every byte) are of the whole process (broker, agent and clients share it), not the job's.",
        POLL_INTERVAL.as_millis()
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "Targets:");
    if let Some((ingest, _, _)) = stat(&|r| Some(r.ingest_bytes_per_sec)) {
        let _ = writeln!(
            out,
            "  broker ingest ≥ {:.0} MB/s: {:.1} MB/s: {}",
            TARGET_INGEST_BYTES_PER_SEC / 1e6,
            ingest / 1e6,
            verdict(ingest >= TARGET_INGEST_BYTES_PER_SEC)
        );
    }
    let target = ms(TARGET_LINE_LATENCY);
    for (name, f) in [
        (
            "p99",
            (&|r: &RunResult| Some(ms(r.printed_p99))) as &dyn Fn(&RunResult) -> Option<f64>,
        ),
        ("max", &|r: &RunResult| Some(ms(r.printed_max))),
    ] {
        if let Some((value, _, _)) = stat(f) {
            let _ = writeln!(
                out,
                "  line printed → seen by a follower ≤ {target:.0} ms, {name}: {value:.1} ms: {}",
                verdict(value <= target)
            );
        }
    }
    out
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("50MB"), Ok(50_000_000));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("1.5k"), Ok(1500));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("1TB").is_err());
    }

    #[test]
    fn stamped_lines_are_found_across_pieces() {
        let log = "2026-01-01T00:00:00.000Z O xxxx\n\
                   2026-01-01T00:00:00.001Z E stamp 1767225600000000000\n\
                   2026-01-01T00:00:00.002Z O xxxx\n\
                   2026-01-01T00:00:00.003Z E stamp 1767225600002000000\n";
        let arrived = UNIX_EPOCH + Duration::from_millis(1_767_225_600_010);
        for cut in [0, 10, 40, 60, log.len() - 1] {
            let mut lines = StampedLines::default();
            lines.take(&log.as_bytes()[..cut], arrived);
            lines.take(&log.as_bytes()[cut..], arrived);
            assert_eq!(
                lines.printed,
                [Duration::from_millis(10), Duration::from_millis(8)],
                "cut at {cut}"
            );
            assert_eq!(
                lines.read,
                [Duration::from_millis(9), Duration::from_millis(7)],
                "cut at {cut}"
            );
        }
    }
}
