//! One run of one configuration: a fresh fleet, a warm-up, latency with one job in flight, then
//! throughput with many.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use testbot_proto::client::BrokerClient;
use testbot_proto::jobs::{JobId, JobListQuery, JobSpec, JobState};
use tokio::time::Instant;

use testbot_bench::fleet::{BenchFleet, ExecutorChoice};
use testbot_bench::stats::percentile;
use testbot_bench::system::process_cpu_time;

/// Jobs run before measuring (at least two per agent), so every agent has connected and every
/// code path is warm.
const WARMUP_JOBS: usize = 20;
/// The longest any single step may make no progress (no job starting, one job not finishing):
/// a fleet that stopped working fails the run rather than hanging it.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The interval at which the broker is asked whether any job is still unfinished, once every
/// job has started (so only for the last few jobs).
const IDLE_CHECK_INTERVAL: Duration = Duration::from_millis(1);
/// The most jobs one list call returns.
const LIST_LIMIT: u32 = 1000;

/// What one run measures.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub storage: std::sync::Arc<testbot_bench::fleet::Storage>,
    pub executor: ExecutorChoice,
    pub agents: usize,
    /// Jobs submitted one at a time, each after the previous one finished.
    pub latency_jobs: usize,
    /// Jobs submitted all at once (by `submitters` concurrent clients).
    pub throughput_jobs: usize,
    pub submitters: usize,
}

/// The figures of one run.
#[derive(Debug, Clone, Copy)]
pub struct RunResult {
    /// Submit → the agent's executor begins `run`, one job in flight.
    pub start_p50: Duration,
    pub start_p99: Duration,
    /// Submit → the broker records the job's result (its `finished_at_ms`, so to the
    /// millisecond), one job in flight.
    pub result_p50: Duration,
    pub result_p99: Duration,
    /// Submit → the client following the job's log sees it end, one job in flight.
    pub end_to_end_p50: Duration,
    pub end_to_end_p99: Duration,
    /// Jobs finished per second, from the first submit until the broker recorded the last
    /// result.
    pub jobs_per_sec: f64,
    /// CPU time of the whole process (broker, agents, clients) per second of the throughput
    /// measurement: how many cores were busy. `None` where `/proc` is not available.
    pub cpu_cores: Option<f64>,
}

/// Starts a fleet, measures, and stops the fleet whatever happened.
pub async fn run_once(plan: &RunPlan) -> anyhow::Result<RunResult> {
    let fleet = BenchFleet::start(&plan.storage, plan.executor, plan.agents).await?;
    let result = measure(&fleet, plan).await;
    let stopped = fleet.stop().await;
    let result = result?;
    stopped?;
    Ok(result)
}

async fn measure(fleet: &BenchFleet, plan: &RunPlan) -> anyhow::Result<RunResult> {
    throughput(fleet, WARMUP_JOBS.max(2 * plan.agents), plan.submitters)
        .await
        .context("Warm-up failed")?;
    let latency = latency(fleet, plan.latency_jobs).await?;
    let cpu_before = process_cpu_time();
    let wall_before = Instant::now();
    let elapsed = throughput(fleet, plan.throughput_jobs, plan.submitters).await?;
    let cpu_cores = cpu_before.zip(process_cpu_time()).map(|(before, after)| {
        (after - before).as_secs_f64() / wall_before.elapsed().as_secs_f64()
    });
    ensure_all_succeeded(&fleet.client).await?;
    let p = |samples: &[Duration], p: f64| percentile(samples, p).unwrap_or_default();
    Ok(RunResult {
        start_p50: p(&latency.start, 50.0),
        start_p99: p(&latency.start, 99.0),
        result_p50: p(&latency.result, 50.0),
        result_p99: p(&latency.result, 99.0),
        end_to_end_p50: p(&latency.end_to_end, 50.0),
        end_to_end_p99: p(&latency.end_to_end, 99.0),
        jobs_per_sec: plan.throughput_jobs as f64 / elapsed.as_secs_f64(),
        cpu_cores,
    })
}

/// The trivial job every measurement submits.
fn trivial_job() -> JobSpec {
    JobSpec {
        script: "true".into(),
        ..Default::default()
    }
}

/// Latency samples, one per job, all measured from just before the submit call.
struct LatencySamples {
    start: Vec<Duration>,
    result: Vec<Duration>,
    end_to_end: Vec<Duration>,
}

/// Submits `count` jobs one after another, each once the previous one has finished.
async fn latency(fleet: &BenchFleet, count: usize) -> anyhow::Result<LatencySamples> {
    let spec = trivial_job();
    let mut submitted = Vec::with_capacity(count);
    let mut end_to_end = Vec::with_capacity(count);
    for _ in 0..count {
        let submit_wall = SystemTime::now();
        let submit_at = Instant::now();
        let job = fleet
            .client
            .submit(&spec)
            .await
            .context("Cannot submit a job")?;
        tokio::time::timeout(STALL_TIMEOUT, wait_finished(&fleet.client, job.id))
            .await
            .with_context(|| format!("Job {} did not finish within {STALL_TIMEOUT:?}", job.id))??;
        end_to_end.push(submit_at.elapsed());
        submitted.push((job.id, submit_at, submit_wall));
    }
    let mut start = Vec::with_capacity(count);
    let mut result = Vec::with_capacity(count);
    for (id, submit_at, submit_wall) in submitted {
        let started_at = fleet
            .starts
            .get(id)
            .with_context(|| format!("Job {id} finished but never reached the executor"))?;
        start.push(started_at.saturating_duration_since(submit_at));
        let job = fleet
            .client
            .job(id)
            .await
            .with_context(|| format!("Cannot read job {id}"))?;
        let finished_ms = job
            .finished_at_ms
            .with_context(|| format!("Job {id} has no result"))?;
        result.push(since_ms(submit_wall, finished_ms));
    }
    Ok(LatencySamples {
        start,
        result,
        end_to_end,
    })
}

/// The time from `from` until the broker timestamp `ms` (zero if the timestamp, truncated to the
/// millisecond, lies before it).
fn since_ms(from: SystemTime, ms: i64) -> Duration {
    (UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
        .duration_since(from)
        .unwrap_or_default()
}

/// Follows the job's log until the broker closes it, which it does the moment the job has its
/// result: no polling delay is added to the measurement.
async fn wait_finished(client: &BrokerClient, id: JobId) -> anyhow::Result<()> {
    let stream = client
        .log_stream(id, 0, true)
        .await
        .with_context(|| format!("Cannot follow the log of job {id}"))?;
    let mut stream = std::pin::pin!(stream);
    while let Some(bytes) = stream.next().await {
        bytes.with_context(|| format!("The log of job {id} broke off"))?;
    }
    Ok(())
}

/// Submits `jobs` jobs from `submitters` concurrent clients and waits until all have finished.
/// Returns the time from the first submit until the broker recorded the last result.
async fn throughput(
    fleet: &BenchFleet,
    jobs: usize,
    submitters: usize,
) -> anyhow::Result<Duration> {
    let started_before = fleet.starts.count();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let first_submit = SystemTime::now();
    for _ in 0..submitters.clamp(1, jobs.max(1)) {
        let client = fleet.client.clone();
        let next = next.clone();
        tasks.spawn(async move {
            let spec = trivial_job();
            while next.fetch_add(1, Ordering::Relaxed) < jobs {
                client.submit(&spec).await.context("Cannot submit a job")?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(submitted) = tasks.join_next().await {
        submitted.context("A submitter panicked")??;
    }
    // Waiting on the executors costs the broker nothing; only the last few jobs are watched
    // through the API.
    fleet
        .starts
        .wait_for_count(started_before + jobs, STALL_TIMEOUT)
        .await?;
    wait_until_idle(&fleet.client).await?;
    let newest = fleet
        .client
        .jobs(&JobListQuery {
            limit: Some(LIST_LIMIT),
            ..JobListQuery::default()
        })
        .await
        .context("Cannot list jobs")?;
    // Jobs are claimed in submission order, so the last result is among the newest jobs.
    let last_finished_ms = newest
        .jobs
        .iter()
        .filter_map(|job| job.finished_at_ms)
        .max()
        .context("No job has finished")?;
    // The broker stamps results in whole milliseconds; never report a zero duration.
    Ok(since_ms(first_submit, last_finished_ms).max(Duration::from_millis(1)))
}

/// Waits until no job is queued, assigned or running.
async fn wait_until_idle(client: &BrokerClient) -> anyhow::Result<()> {
    let deadline = Instant::now() + STALL_TIMEOUT;
    loop {
        let mut busy = None;
        for state in [JobState::Queued, JobState::Assigned, JobState::Running] {
            if let Some(job) = first_in_state(client, state).await? {
                busy = Some(job);
                break;
            }
        }
        let Some(job) = busy else {
            return Ok(());
        };
        anyhow::ensure!(
            Instant::now() < deadline,
            "Job {} is still {} after {STALL_TIMEOUT:?}",
            job.id,
            job.state
        );
        tokio::time::sleep(IDLE_CHECK_INTERVAL).await;
    }
}

/// Fails if any job ended other than `succeeded`: a benchmark of failing jobs measures nothing.
async fn ensure_all_succeeded(client: &BrokerClient) -> anyhow::Result<()> {
    for state in [JobState::Failed, JobState::Cancelled, JobState::Error] {
        if let Some(job) = first_in_state(client, state).await? {
            anyhow::bail!(
                "Job {} ended {}: {}",
                job.id,
                job.state,
                job.reason.as_deref().unwrap_or("no reason given")
            );
        }
    }
    Ok(())
}

async fn first_in_state(
    client: &BrokerClient,
    state: JobState,
) -> anyhow::Result<Option<testbot_proto::jobs::Job>> {
    let list = client
        .jobs(&JobListQuery {
            state: Some(state),
            limit: Some(1),
            ..JobListQuery::default()
        })
        .await
        .with_context(|| format!("Cannot list {state} jobs"))?;
    Ok(list.jobs.into_iter().next())
}
