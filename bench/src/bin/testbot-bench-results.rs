//! `testbot-bench-results`: how fast the broker takes in test results, and how fast it reads a
//! repository's flaky tests back.
//!
//! - **ingest**: one JUnit file of `--cases` test cases (as a large suite writes it: a tenth
//!   failing with a message, one in fifty retried), read with the broker's reader into rows and
//!   stored under a workflow job's lease, as an upload is (`lifecycle::results::read_result_file`,
//!   then `put_result_file`, which also adds each case to its commit's statistics); read and
//!   store are timed apart and together.
//! - **flaky query**: a repository with `--history-jobs` jobs of `--cases-per-job` cases each
//!   (`--history-jobs × --cases-per-job` stored results, across 100 commits of `main`, a few
//!   tests flaky), and the query `testbot flaky` makes (`test_history`, then the histories
//!   built from its rows).
//!
//! On SQLite in a fresh data directory, or with `--database-url` on a fresh PostgreSQL
//! database made from the given one (dropped afterwards). Each figure is the median of `--runs`
//! runs, with the range. Progress goes to stderr, the report to stdout.

use std::io::Write as _;

use anyhow::Context as _;
use clap::Parser;
use testbot_bench::stats::{median, ms};
use testbot_bench::system::{machine, peak_rss};
use testbot_broker::lifecycle::results::{histories, read_result_file};
use testbot_broker::routing::Offer;
use testbot_broker::store::test_results::{NewResultFile, TestResultRow};
use testbot_broker::store::{JobOrigin, SharedStore};
use testbot_proto::jobs::{JobId, JobSpec};
use tokio::time::Instant;

#[derive(Debug, Parser)]
#[command(about = "Ingest of a large JUnit file, and the flaky-test query over many results")]
struct Opts {
    /// Test cases in the ingested file.
    #[arg(long, default_value_t = 100_000)]
    cases: usize,
    /// Jobs in the history the flaky query reads.
    #[arg(long, default_value_t = 1000)]
    history_jobs: usize,
    /// Test cases of each of those jobs.
    #[arg(long, default_value_t = 1000)]
    cases_per_job: usize,
    /// Runs of each measurement.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// A PostgreSQL database that may create others (postgres://...); default: SQLite.
    #[arg(long)]
    database_url: Option<String>,
}

/// A JUnit file of `cases` cases in `cases / 100` suites: every tenth fails with a message,
/// every fiftieth was retried (a `flakyFailure` before its pass).
fn junit_file(cases: usize) -> Vec<u8> {
    let mut out = String::with_capacity(cases * 120);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"bench\">\n");
    for suite in 0..cases.div_ceil(100) {
        out.push_str(&format!(
            "  <testsuite name=\"suite{suite}\" tests=\"100\">\n"
        ));
        for case in suite * 100..((suite + 1) * 100).min(cases) {
            out.push_str(&format!(
                "    <testcase classname=\"pkg.mod{suite}\" name=\"test_{case}\" time=\"0.{:03}\">",
                case % 1000
            ));
            if case % 10 == 3 {
                out.push_str(&format!(
                    "<failure message=\"assert {case} == {}\">Traceback: line {case}</failure>",
                    case + 1
                ));
            } else if case % 50 == 7 {
                out.push_str("<flakyFailure message=\"timeout\"/>");
            }
            out.push_str("</testcase>\n");
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out.into_bytes()
}

fn offer() -> Offer {
    Offer {
        site: "bench".into(),
        labels: vec![],
        executor: "shell".into(),
        policy: None,
        workflow_jobs_without_policy: true,
    }
}

/// Queues a job of `origin` and claims it under `lease`.
async fn running_job(
    store: &SharedStore,
    origin: &JobOrigin,
    lease: &str,
) -> anyhow::Result<JobId> {
    let spec = JobSpec {
        name: Some("unit".into()),
        script: "true".into(),
        ..JobSpec::default()
    };
    let job = store
        .insert_job(&spec, origin, None)
        .await?
        .context("a job without a token is always stored")?;
    let offer = offer();
    let taker = testbot_broker::store::JobTaker {
        agent: "bench/a1",
        offer: &offer,
    };
    let claimed = store
        .claim_job(&taker, lease, testbot_proto::now_ms() + 3_600_000)
        .await?
        .context("the queued job is claimed")?;
    anyhow::ensure!(claimed.id == job.id, "claimed another job");
    Ok(job.job_id())
}

struct Store {
    store: SharedStore,
    _dir: tempfile::TempDir,
    scratch: Option<testbot_broker::store::scratch::ScratchDatabase>,
}

async fn fresh_store(url: Option<&str>) -> anyhow::Result<Store> {
    let dir = tempfile::tempdir()?;
    let scratch = match url {
        Some(url) => Some(
            testbot_broker::store::scratch::ScratchDatabase::create(url, "testbot_bench").await?,
        ),
        None => None,
    };
    let store =
        testbot_broker::store::open(scratch.as_ref().map(|s| s.url.as_str()), dir.path()).await?;
    Ok(Store {
        store,
        _dir: dir,
        scratch,
    })
}

fn range(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.0}–{max:.0}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let backend = if opts.database_url.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let file = junit_file(opts.cases);
    eprintln!(
        "ingest: a {:.1} MB JUnit file of {} cases, {} runs on {backend}",
        file.len() as f64 / 1e6,
        opts.cases,
        opts.runs
    );
    let (mut read_ms, mut store_ms, mut total_ms) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..opts.runs {
        let fresh = fresh_store(opts.database_url.as_deref()).await?;
        // A workflow's job: its results also go into the statistics of its commit.
        let origin = JobOrigin {
            submitted_by: "workflow:bench/repo@1".into(),
            repository: Some("bench/repo".into()),
            commit_sha: Some(format!("{:040x}", 1)),
            git_ref: Some("refs/heads/main".into()),
            ..JobOrigin::default()
        };
        let id = running_job(&fresh.store, &origin, "lease").await?;
        let started = Instant::now();
        let data = file.clone();
        let (report, rows) =
            tokio::task::spawn_blocking(move || read_result_file("junit.xml", &data)).await?;
        let read = started.elapsed();
        let attempts = rows.len();
        let upload = NewResultFile {
            path: "junit.xml".into(),
            data: file.clone(),
            report: serde_json::to_string(&report)?,
            rows,
        };
        let stored_at = Instant::now();
        fresh
            .store
            .put_result_file(id, "lease", &upload, 10, 1 << 30)
            .await?
            .map_err(|r| anyhow::anyhow!("upload refused: {r:?}"))?;
        let stored = stored_at.elapsed();
        eprintln!(
            "  run {}: read {:.0} ms, stored {attempts} attempts in {:.0} ms",
            run + 1,
            ms(read),
            ms(stored)
        );
        read_ms.push(ms(read));
        store_ms.push(ms(stored));
        total_ms.push(ms(read + stored));
        fresh.store.close().await;
        drop(fresh.scratch);
    }

    let total = opts.history_jobs * opts.cases_per_job;
    eprintln!(
        "flaky query: {} jobs × {} cases = {total} results across 100 commits",
        opts.history_jobs, opts.cases_per_job
    );
    let fresh = fresh_store(opts.database_url.as_deref()).await?;
    let fill = Instant::now();
    for job in 0..opts.history_jobs {
        let commit = format!("{:040x}", job % 100);
        let origin = JobOrigin {
            submitted_by: "workflow:bench/repo@1".into(),
            repository: Some("bench/repo".into()),
            commit_sha: Some(commit),
            git_ref: Some("refs/heads/main".into()),
            ..JobOrigin::default()
        };
        let lease = format!("l{job}");
        let id = running_job(&fresh.store, &origin, &lease).await?;
        let rows: Vec<TestResultRow> = (0..opts.cases_per_job)
            .map(|case| {
                // Ten flaky tests fail in one job of seven; one is broken from commit 90 on.
                let failed =
                    (case < 10 && (job + case) % 7 == 0) || (case == 10 && job % 100 >= 90);
                TestResultRow {
                    file: "junit.xml".into(),
                    seq: case as i64,
                    attempt: 1,
                    suite: format!("suite{}", case / 100),
                    classname: Some("pkg.T".into()),
                    name: format!("test_{case}"),
                    outcome: if failed { "failed" } else { "passed" }.into(),
                    duration_ms: Some(12),
                    message: failed.then(|| "assertion failed".to_string()),
                }
            })
            .collect();
        let upload = NewResultFile {
            path: "junit.xml".into(),
            data: b"<testsuites/>".to_vec(),
            report: "{}".into(),
            rows,
        };
        fresh
            .store
            .put_result_file(id, &lease, &upload, 10, 1 << 30)
            .await?
            .map_err(|r| anyhow::anyhow!("upload refused: {r:?}"))?;
        if (job + 1) % 100 == 0 {
            eprintln!("  {} of {} jobs stored", job + 1, opts.history_jobs);
        }
    }
    let filled = fill.elapsed();
    let mut query_ms = Vec::new();
    let mut flaky = 0;
    for run in 0..opts.runs {
        let started = Instant::now();
        let rows = fresh
            .store
            .test_history("bench/repo", Some("refs/heads/main"), 0)
            .await?;
        let tests = histories(rows);
        let took = started.elapsed();
        flaky = tests.iter().filter(|t| t.is_flaky()).count();
        eprintln!(
            "  run {}: {} tests with failures ({flaky} flaky) in {:.0} ms",
            run + 1,
            tests.len(),
            ms(took)
        );
        query_ms.push(ms(took));
    }
    fresh.store.close().await;
    drop(fresh.scratch);

    let mut out = std::io::stdout().lock();
    writeln!(out, "# testbot-bench-results on {backend}")?;
    writeln!(out)?;
    writeln!(out, "Machine: {}", machine())?;
    writeln!(out)?;
    writeln!(out, "| measurement | median | range | target |")?;
    writeln!(out, "|---|--:|--:|--:|")?;
    let med = |v: &[f64]| median(v).unwrap_or(f64::NAN);
    writeln!(
        out,
        "| ingest of {} cases ({:.1} MB): read | {:.0} ms | {} ms | |",
        opts.cases,
        file.len() as f64 / 1e6,
        med(&read_ms),
        range(&read_ms)
    )?;
    writeln!(
        out,
        "| ingest: store | {:.0} ms | {} ms | |",
        med(&store_ms),
        range(&store_ms)
    )?;
    writeln!(
        out,
        "| ingest: read and store | {:.0} ms | {} ms | 2,000 ms |",
        med(&total_ms),
        range(&total_ms)
    )?;
    writeln!(
        out,
        "| flaky query over {total} results ({flaky} flaky tests found) | {:.0} ms | {} ms | 200 ms |",
        med(&query_ms),
        range(&query_ms)
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "Filling the history took {:.1} s; peak resident memory {} MiB.",
        filled.as_secs_f64(),
        peak_rss().map_or(0, |b| b / (1024 * 1024))
    )?;
    Ok(())
}
