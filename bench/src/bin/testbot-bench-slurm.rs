//! Slurm executor latencies against a real Slurm (`SLURM_CONF` must name its configuration;
//! `eval "$(tests/slurm/start.sh)"` starts one):
//!
//! - **claim → sbatch accepted**: from the agent starting the job (its "running on agent" line)
//!   to `sbatch` returning the Slurm job id (its "submitted to Slurm" line), both stamped by the
//!   agent;
//! - **line on the node → line at the client**: each job prints lines stamped with the compute
//!   node's clock (`date +%s%N`); the client following the job's log stamps each line's arrival.
//!   One machine, one clock.
//!
//! Reports the median over `--runs` jobs (default 20), and the spread.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser;
use futures_util::StreamExt as _;
use testbot_agent::config::ExecutorKind;
use testbot_agent::{Agent, AgentConfig, Shutdown};
use testbot_broker::{Broker, BrokerConfig};
use testbot_proto::jobs::{JobSpec, JobState};
use testbot_proto::logs::{Stream, parse_line};

/// Slurm executor latencies against a real Slurm.
#[derive(Debug, Parser)]
struct Opts {
    /// Jobs to measure (one at a time).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Lines each job prints, 300 ms apart.
    #[arg(long, default_value_t = 5)]
    lines: usize,
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    testbot_proto::init_tracing("warn");
    let Opts { runs, lines } = Opts::parse();
    anyhow::ensure!(
        std::env::var_os("SLURM_CONF").is_some(),
        "set SLURM_CONF to a running Slurm's configuration (eval \"$(tests/slurm/start.sh)\")"
    );
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(BrokerConfig::new(
        "127.0.0.1:0".parse()?,
        dir.path().join("broker"),
    ))
    .await?;
    let token = broker
        .enrollment_token("bench", 1, Duration::from_secs(600))
        .await?;
    let mut config = AgentConfig::new(broker.url(), token, dir.path().join("agent"));
    config.executor = ExecutorKind::Slurm;
    config.name = Some("slurm-bench".into());
    let shutdown = Shutdown::default();
    let agent = tokio::spawn(Agent::new(config)?.run(shutdown.clone()));
    let client =
        testbot_proto::client::BrokerClient::new(&broker.url(), broker.admin_token.clone())?;

    let script =
        format!("for i in $(seq 1 {lines}); do echo \"node $(date +%s%N)\"; sleep 0.3; done");
    let mut to_sbatch_ms = Vec::new();
    let mut line_ms = Vec::new();
    for run in 1..=runs {
        let job = client
            .submit(&JobSpec {
                script: script.clone(),
                ..Default::default()
            })
            .await?;
        let stream = client.log_stream(job.id, 0, true).await?;
        let mut stream = std::pin::pin!(stream);
        let mut buffer = String::new();
        let mut running_at: Option<i128> = None;
        let mut per_line = Vec::new();
        while let Some(bytes) = stream.next().await {
            let arrived = now_ns();
            buffer.push_str(&String::from_utf8_lossy(&bytes?));
            while let Some(newline) = buffer.find('\n') {
                let line: String = buffer.drain(..=newline).collect();
                let parsed = parse_line(&line);
                let stamped = humantime::parse_rfc3339(parsed.timestamp)
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos() as i128);
                match parsed.stream {
                    Stream::System if parsed.text.contains("running on agent") => {
                        running_at = stamped;
                    }
                    Stream::System if parsed.text.contains("submitted to Slurm as job") => {
                        if let (Some(from), Some(to)) = (running_at, stamped) {
                            to_sbatch_ms.push((to - from) as f64 / 1e6);
                        }
                    }
                    Stream::Stdout => {
                        if let Some(written) = parsed
                            .text
                            .strip_prefix("node ")
                            .and_then(|t| t.trim().parse::<i128>().ok())
                        {
                            per_line.push((arrived - written) as f64 / 1e6);
                        }
                    }
                    _ => {}
                }
            }
        }
        let done = client.job(job.id).await?;
        anyhow::ensure!(
            done.state == JobState::Succeeded,
            "job {} ended {}: {:?}",
            job.id,
            done.state,
            done.reason
        );
        anyhow::ensure!(per_line.len() == lines, "job {} lost lines", job.id);
        let job_median = median(&mut per_line);
        line_ms.push(job_median);
        eprintln!(
            "run {run}/{runs}: sbatch accepted {:.1} ms after the claim; lines {job_median:.0} ms node to client",
            to_sbatch_ms.last().copied().unwrap_or(f64::NAN)
        );
    }
    shutdown.drain.cancel();
    agent.await.context("agent task")??;
    broker.shutdown().await?;

    let spread = |v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    };
    let (s_min, s_max) = spread(&to_sbatch_ms);
    let (l_min, l_max) = spread(&line_ms);
    println!("| measure | median | min | max | runs |");
    println!("|---|--:|--:|--:|--:|");
    println!(
        "| claim → sbatch accepted | {:.1} ms | {s_min:.1} ms | {s_max:.1} ms | {} |",
        median(&mut to_sbatch_ms.clone()),
        to_sbatch_ms.len()
    );
    println!(
        "| line on the node → line at the client | {:.0} ms | {l_min:.0} ms | {l_max:.0} ms | {} |",
        median(&mut line_ms.clone()),
        line_ms.len()
    );
    Ok(())
}
