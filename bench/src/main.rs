//! `testbot-bench`: dispatch latency and throughput of a broker and N agents on loopback.
//!
//! Everything runs in this process, but over the real protocol: the broker serves HTTP on
//! `127.0.0.1:0` from a fresh SQLite data directory, and each agent polls it with its own HTTP
//! client. Each configuration (executor × agent count) is measured `--runs` times, on a fresh
//! fleet each time, with the configurations interleaved so slow drift of a noisy machine
//! spreads over all of them; the table shows the median of each figure across runs.
//!
//! Layout:
//! - [`testbot_bench::fleet`]: the broker, the agents, and the executor wrapper that stamps job
//!   starts.
//! - [`measure`]: one run: warm-up, latency with one job in flight, throughput with many.
//! - [`testbot_bench::stats`]: percentiles and medians.

mod measure;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

use testbot_bench::fleet::{self, ExecutorChoice};
use testbot_bench::stats::{median, ms};
use testbot_bench::system::machine;

use crate::measure::{RunPlan, RunResult, run_once};

/// Target: median submit → agent start latency.
const TARGET_START_P50: Duration = Duration::from_millis(10);
/// Target: 99th percentile submit → agent start latency.
const TARGET_START_P99: Duration = Duration::from_millis(50);
/// Target: jobs per second with the no-op executor.
const TARGET_NOOP_JOBS_PER_SEC: f64 = 2000.0;

/// Starts a broker and N agents on loopback and reports dispatch latency and throughput, as
/// medians over repeated runs. Progress goes to stderr, the results table to stdout.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Opts {
    /// How many times to measure each configuration. Default: 5 (2 with --quick).
    #[arg(long, env = "TESTBOT_BENCH_RUNS")]
    runs: Option<usize>,
    /// Jobs per throughput measurement with the no-op executor. Default: 2000 (300 with
    /// --quick).
    #[arg(long, env = "TESTBOT_BENCH_JOBS")]
    jobs: Option<usize>,
    /// Jobs per throughput measurement with the shell executor. Default: 500 (100 with --quick).
    #[arg(long, env = "TESTBOT_BENCH_SHELL_JOBS")]
    shell_jobs: Option<usize>,
    /// Jobs per latency measurement, submitted one at a time. Default: 200 (50 with --quick).
    #[arg(long, env = "TESTBOT_BENCH_LATENCY_JOBS")]
    latency_jobs: Option<usize>,
    /// Agent counts to measure (each agent runs one job at a time). Throughput is also shown
    /// relative to the smallest.
    #[arg(
        long,
        env = "TESTBOT_BENCH_AGENTS",
        value_delimiter = ',',
        default_values_t = [1, 10, 50]
    )]
    agents: Vec<usize>,
    /// Executors to measure.
    #[arg(
        long,
        env = "TESTBOT_BENCH_EXECUTOR",
        value_enum,
        value_delimiter = ',',
        default_values_t = [ExecutorChoice::Noop, ExecutorChoice::Shell]
    )]
    executor: Vec<ExecutorChoice>,
    /// Concurrent submitting clients in throughput measurements.
    #[arg(long, env = "TESTBOT_BENCH_SUBMITTERS", default_value_t = 32)]
    submitters: usize,
    /// A PostgreSQL server's maintenance database (`postgres://USER@HOST:PORT/postgres`): each
    /// fleet gets a fresh database there instead of SQLite. Default: SQLite.
    #[arg(long, env = "TESTBOT_BENCH_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Brokers sharing the PostgreSQL database (agents are spread over them, jobs are
    /// submitted to the first). More than 1 needs --database-url.
    #[arg(long, env = "TESTBOT_BENCH_BROKERS", default_value_t = 1)]
    brokers: usize,
    /// A short run (fewer runs and jobs) for checking that the benchmark works.
    #[arg(long, env = "TESTBOT_BENCH_QUICK")]
    quick: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The broker and agents log every request and job at debug and info; keep them quiet.
    testbot_proto::init_tracing("warn");
    match try_main(Opts::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("testbot-bench: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn try_main(opts: Opts) -> anyhow::Result<()> {
    let Opts {
        runs,
        jobs,
        shell_jobs,
        latency_jobs,
        mut agents,
        mut executor,
        submitters,
        database_url,
        brokers,
        quick,
    } = opts;
    anyhow::ensure!(brokers >= 1, "--brokers must be at least 1");
    anyhow::ensure!(
        brokers == 1 || database_url.is_some(),
        "--brokers {brokers} needs --database-url: several brokers share a PostgreSQL database"
    );
    let storage = std::sync::Arc::new(fleet::Storage {
        database_url,
        brokers,
    });
    let pick = |value: Option<usize>, normal: usize, short: usize| {
        value.unwrap_or(if quick { short } else { normal })
    };
    let runs = pick(runs, 5, 2);
    let noop_jobs = pick(jobs, 2000, 300);
    let shell_jobs = pick(shell_jobs, 500, 100);
    let latency_jobs = pick(latency_jobs, 200, 50);
    anyhow::ensure!(runs > 0, "--runs must be at least 1");
    anyhow::ensure!(latency_jobs > 0, "--latency-jobs must be at least 1");
    anyhow::ensure!(
        noop_jobs > 0 && shell_jobs > 0,
        "--jobs and --shell-jobs must be at least 1"
    );
    anyhow::ensure!(submitters > 0, "--submitters must be at least 1");
    anyhow::ensure!(
        !agents.is_empty() && agents.iter().all(|&n| n > 0),
        "--agents must list agent counts of at least 1, e.g. --agents 1,10,50"
    );
    anyhow::ensure!(!executor.is_empty(), "--executor must name an executor");
    agents.sort_unstable();
    agents.dedup();
    executor.sort_unstable();
    executor.dedup();

    let plans: Vec<RunPlan> = executor
        .iter()
        .flat_map(|&executor| {
            let storage = storage.clone();
            agents.iter().map(move |&agents| RunPlan {
                storage: storage.clone(),
                executor,
                agents,
                latency_jobs,
                throughput_jobs: match executor {
                    ExecutorChoice::Noop => noop_jobs,
                    ExecutorChoice::Shell => shell_jobs,
                },
                submitters,
            })
        })
        .collect();
    let machine = machine();
    eprintln!(
        "testbot-bench: {machine}; {}; {runs} runs of {} configurations",
        storage.describe(),
        plans.len()
    );

    // Rounds outside, configurations inside: each round measures every configuration once,
    // close together in time, so ratios within a round compare like with like.
    let mut results: BTreeMap<(ExecutorChoice, usize), Vec<RunResult>> = BTreeMap::new();
    for round in 1..=runs {
        for plan in &plans {
            let began = std::time::Instant::now();
            let result = run_once(plan).await.with_context(|| {
                format!(
                    "Run {round} with the {} executor and {} failed",
                    plan.executor.as_str(),
                    agents_label(plan.agents)
                )
            })?;
            eprintln!(
                "[run {round}/{runs}] {} executor, {}: start p50 {:.2} ms, p99 {:.2} ms; \
                 result p50 {:.0} ms; seen p50 {:.2} ms, p99 {:.2} ms; {:.0} jobs/s ({:.1} s)",
                plan.executor.as_str(),
                agents_label(plan.agents),
                ms(result.start_p50),
                ms(result.start_p99),
                ms(result.result_p50),
                ms(result.end_to_end_p50),
                ms(result.end_to_end_p99),
                result.jobs_per_sec,
                began.elapsed().as_secs_f64()
            );
            results
                .entry((plan.executor, plan.agents))
                .or_default()
                .push(result);
        }
    }

    let report = render_report(
        &format!("{machine}; {}", storage.describe()),
        &results,
        &Settings {
            runs,
            latency_jobs,
            noop_jobs,
            shell_jobs,
            submitters,
            baseline_agents: agents[0],
        },
    );
    std::io::stdout()
        .write_all(report.as_bytes())
        .context("Cannot write the report")?;
    Ok(())
}

/// The settings a report states alongside its figures.
struct Settings {
    runs: usize,
    latency_jobs: usize,
    noop_jobs: usize,
    shell_jobs: usize,
    submitters: usize,
    /// Throughput is also shown relative to this agent count.
    baseline_agents: usize,
}

/// The results table and the comparison with the targets.
fn render_report(
    machine: &str,
    results: &BTreeMap<(ExecutorChoice, usize), Vec<RunResult>>,
    settings: &Settings,
) -> String {
    use std::fmt::Write as _;
    let Settings {
        runs,
        latency_jobs,
        noop_jobs,
        shell_jobs,
        submitters,
        baseline_agents,
    } = *settings;
    let mut out = String::new();
    let _ = writeln!(out, "testbot-bench on {machine}");
    let _ = writeln!(
        out,
        "Medians over {runs} runs. Latency: {latency_jobs} jobs one at a time (p50/p99 within a \
         run). Throughput: {noop_jobs} (noop) / {shell_jobs} (shell) jobs from {submitters} \
         concurrent submitters. Agents run one job at a time."
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| executor | agents | start p50 | start p99 | result p50 | result p99 | seen p50 | seen p99 | jobs/s | jobs/s min–max | vs {} | CPU cores |",
        agents_label(baseline_agents)
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let mut rows = Vec::new();
    for (&(executor, agents), runs) in results {
        let med = |f: &dyn Fn(&RunResult) -> f64| {
            median(&runs.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
        };
        let row = Row {
            executor,
            agents,
            start_p50: med(&|r| ms(r.start_p50)),
            start_p99: med(&|r| ms(r.start_p99)),
            jobs_per_sec: med(&|r| r.jobs_per_sec),
        };
        let (min, max) = runs.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), r| {
            (lo.min(r.jobs_per_sec), hi.max(r.jobs_per_sec))
        });
        // Ratios within a round (same moment, same machine state), then their median.
        let scale = results.get(&(executor, baseline_agents)).and_then(|base| {
            let ratios: Vec<f64> = runs
                .iter()
                .zip(base)
                .map(|(r, b)| r.jobs_per_sec / b.jobs_per_sec)
                .collect();
            median(&ratios)
        });
        let cpu = median(&runs.iter().filter_map(|r| r.cpu_cores).collect::<Vec<_>>());
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} ms | {:.2} ms | {:.1} ms | {:.1} ms | {:.2} ms | {:.2} ms | {:.0} | {:.0}–{:.0} | {} | {} |",
            executor.as_str(),
            agents,
            row.start_p50,
            row.start_p99,
            med(&|r| ms(r.result_p50)),
            med(&|r| ms(r.result_p99)),
            med(&|r| ms(r.end_to_end_p50)),
            med(&|r| ms(r.end_to_end_p99)),
            row.jobs_per_sec,
            min,
            max,
            scale.map_or_else(|| "–".to_string(), |s| format!("{s:.2}×")),
            cpu.map_or_else(|| "–".to_string(), |c| format!("{c:.2}")),
        );
        rows.push(row);
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "start: submit → the agent's executor begins the job. result: submit → the broker records \
         the result (1 ms resolution). seen: submit → the client following the job's log sees it \
         end. Latencies with one job in flight; jobs/s with all in flight. CPU cores: process CPU \
         time per second during the throughput measurement."
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "Targets:");
    let worst = |f: fn(&Row) -> f64| {
        rows.iter()
            .max_by(|a, b| f(a).total_cmp(&f(b)))
            .map(|row| (f(row), row.describe()))
    };
    for (name, target, figure) in [
        (
            "submit → agent start p50",
            ms(TARGET_START_P50),
            worst(|r| r.start_p50),
        ),
        (
            "submit → agent start p99",
            ms(TARGET_START_P99),
            worst(|r| r.start_p99),
        ),
    ] {
        if let Some((value, row)) = figure {
            let _ = writeln!(
                out,
                "  {name} ≤ {target:.0} ms: worst {value:.2} ms ({row}): {}",
                verdict(value <= target)
            );
        }
    }
    for row in rows.iter().filter(|r| r.executor == ExecutorChoice::Noop) {
        let _ = writeln!(
            out,
            "  noop throughput ≥ {TARGET_NOOP_JOBS_PER_SEC:.0} jobs/s with {}: {:.0} jobs/s: {}",
            agents_label(row.agents),
            row.jobs_per_sec,
            verdict(row.jobs_per_sec >= TARGET_NOOP_JOBS_PER_SEC)
        );
    }
    out
}

/// Medians of one configuration.
struct Row {
    executor: ExecutorChoice,
    agents: usize,
    start_p50: f64,
    start_p99: f64,
    jobs_per_sec: f64,
}

impl Row {
    fn describe(&self) -> String {
        format!("{}, {}", self.executor.as_str(), agents_label(self.agents))
    }
}

/// "1 agent", "10 agents".
fn agents_label(agents: usize) -> String {
    if agents == 1 {
        "1 agent".into()
    } else {
        format!("{agents} agents")
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}
