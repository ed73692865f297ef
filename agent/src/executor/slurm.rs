//! The Slurm executor: each job becomes a Slurm batch job submitted with `sbatch --parsable`.
//!
//! - The job directory holds `script.sh` (the job's script), `batch.sh` (the batch script, which
//!   runs `script.sh` with `bash -eo pipefail` in `workspace/`) and the job's `stdout.log` and
//!   `stderr.log`, which Slurm writes on the compute node.
//! - Every option is its own argv entry, built from validated words (partition, account, qos) and
//!   numbers; nothing is interpolated into a shell line. Site-wide extra arguments come from the
//!   site policy only. The job's environment variables reach the batch script through `sbatch`'s
//!   environment (`--export=ALL`); names Slurm itself reads (`SBATCH_*`, `SLURM_*`, ...) are
//!   refused, so a job cannot change its own submission.
//! - With an account mapping, the job directory is handed to the account and `sbatch` runs as it
//!   (the agent switches uid, gid and groups between fork and exec), so the job runs as that
//!   account and its files belong to it.
//! - While the job runs its output files are tailed, so a line written on the compute node reaches
//!   the log within about [`TAIL_INTERVAL`]; its state is followed with `scontrol` (and `sacct`
//!   once Slurm has forgotten the job, when accounting is enabled).
//! - Cancel and the job's time limit call `scancel`; the job is followed until Slurm reports it
//!   ended, so nothing is left queued or running.
//! - The Slurm job id and the tail positions are kept in the agent's state directory
//!   ([`JobRecord`]), which is what lets a restarted agent re-attach to its jobs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use testbot_proto::jobs::JobState;
use testbot_proto::logs::{MAX_LINE_BYTES, Stream};
use testbot_proto::results::FailureCause;
use tokio::process::Command;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::records::{JobRecord, JobRecords};
use super::{BoxFuture, Detached, ExecOutcome, Executor, JobContext, LogSink};
use crate::policy::settings::SlurmSettings;

/// How often the output files are read while the job runs.
pub const TAIL_INTERVAL: Duration = Duration::from_millis(250);
/// How often the job's state is asked of Slurm at first; it backs off to [`STATE_INTERVAL_MAX`]
/// while nothing changes, and starts over when something does.
const STATE_INTERVAL_MIN: Duration = Duration::from_millis(500);
const STATE_INTERVAL_MAX: Duration = Duration::from_secs(5);
/// How long past a job's time limit the agent waits for Slurm to end it before it cancels the
/// job itself (Slurm checks limits about once a minute).
const TIME_LIMIT_BACKSTOP: Duration = Duration::from_secs(90);
/// The longest a Slurm command may take before it counts as failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after `scancel` the job may take to end before we stop waiting for it.
const CANCEL_WAIT: Duration = Duration::from_secs(60);
/// Environment variable prefixes Slurm's commands read as options; a job may not set them.
const RESERVED_ENV_PREFIXES: &[&str] = &["SBATCH_", "SLURM_", "SALLOC_", "SRUN_", "SQUEUE_"];
/// Variables of the agent's own environment that `sbatch` and the other commands need.
const SLURM_PASSTHROUGH_ENV: &[&str] = &["SLURM_CONF", "PATH", "LANG", "TZ"];

/// Runs jobs as Slurm batch jobs.
#[derive(Debug, Clone)]
pub struct SlurmExecutor {
    /// The site policy's `[executors.slurm]` table (defaults without a policy).
    pub settings: SlurmSettings,
    /// Where the records of running Slurm jobs are kept (`STATE_DIR/slurm`).
    pub records: JobRecords,
}

/// A job's state as Slurm reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmStatus {
    /// `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`, `TIMEOUT`, ...
    pub state: String,
    /// Why it is pending, or why it ended (`Reason=`).
    pub reason: Option<String>,
    /// `ExitCode=CODE:SIGNAL`.
    pub exit_code: Option<(i32, i32)>,
    /// The nodes it runs or ran on (`NodeList=`), once Slurm has placed it.
    pub nodes: Option<String>,
}

impl SlurmStatus {
    pub fn is_terminal(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "SUSPENDED"
                | "REQUEUED"
                | "RESIZING"
                | "SIGNALING"
                | "STAGE_OUT"
                | "STOPPED"
        )
    }
}

impl Executor for SlurmExecutor {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn run<'a>(
        &'a self,
        job: &'a JobContext,
        log: LogSink,
        stop: CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<ExecOutcome>> {
        Box::pin(async move {
            let record = self.submit(job, &log).await?;
            self.follow(job, record, &log, &stop).await
        })
    }

    fn records(&self) -> Option<&JobRecords> {
        Some(&self.records)
    }

    fn resume<'a>(
        &'a self,
        job: &'a JobContext,
        log: LogSink,
        stop: CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<ExecOutcome>> {
        Box::pin(async move {
            let record = self.records.load(job.id)?;
            log.system(format!(
                "following Slurm job {} again from where the log left off",
                record.handle
            ))
            .await;
            self.follow(job, record, &log, &stop).await
        })
    }

    fn abandon<'a>(&'a self, job: &'a Detached) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Ok(record) = self.records.load(job.job_id) {
                tracing::warn!(job_id = %job.job_id, slurm_job = %record.handle, "Cancelling a Slurm job whose lease is gone.");
                self.scancel(&record.handle).await;
            }
            self.records.remove(job.job_id);
            let _ = tokio::fs::remove_dir_all(&job.dir).await;
        })
    }

    fn cleanup<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.records.remove(job.id);
            super::remove_job_dir(job).await;
        })
    }
}

impl SlurmExecutor {
    /// The `sbatch` arguments for a job, before the batch script's path. Public for tests: no
    /// job field can add or change an option.
    pub fn sbatch_args(&self, job: &JobContext) -> anyhow::Result<Vec<String>> {
        let r = &job.spec.resources;
        let dir = job.dir.display();
        let minutes = job.timeout.as_secs().div_ceil(60).max(1);
        let mut args = vec![
            "--parsable".to_string(),
            format!("--job-name=testbot-{}", job.id),
            format!("--chdir={dir}/workspace"),
            format!("--output={dir}/stdout.log"),
            format!("--error={dir}/stderr.log"),
            "--export=ALL".to_string(),
            format!("--time={minutes}"),
            format!("--comment=testbot job {} attempt {}", job.id, job.attempt),
        ];
        // The site's own arguments first, so a job's (checked) options refine them.
        args.extend(self.settings.extra_args.iter().cloned());
        let word = |field: &str, value: &Option<String>| -> anyhow::Result<Option<String>> {
            value
                .as_deref()
                .map(|v| {
                    testbot_proto::jobs::validate_word(field, v).map_err(anyhow::Error::msg)?;
                    Ok(v.to_string())
                })
                .transpose()
        };
        if let Some(partition) = word("resources.partition", &r.partition)? {
            args.push(format!("--partition={partition}"));
        }
        if let Some(account) = word("resources.account", &r.account)? {
            args.push(format!("--account={account}"));
        }
        if let Some(qos) = word("resources.qos", &r.qos)? {
            args.push(format!("--qos={qos}"));
        }
        if let Some(nodes) = r.nodes {
            args.push(format!("--nodes={nodes}"));
        }
        if let Some(ntasks) = r.ntasks {
            args.push(format!("--ntasks={ntasks}"));
        }
        if let Some(cpus) = r.cpus {
            args.push(format!("--cpus-per-task={cpus}"));
        }
        if let Some(memory) = r.memory_mib {
            args.push(format!("--mem={memory}M"));
        }
        if let Some(gpus) = r.gpus.filter(|&g| g > 0) {
            args.push(format!("--gpus={gpus}"));
        }
        if let Some(constraint) = &r.constraint {
            // Validated by the job spec: features joined by & | , only.
            args.push(format!("--constraint={constraint}"));
        }
        Ok(args)
    }

    /// Writes the job's files, submits it, and saves its record.
    async fn submit(&self, job: &JobContext, log: &LogSink) -> anyhow::Result<JobRecord> {
        for name in job.spec.env.keys() {
            if let Some(prefix) = RESERVED_ENV_PREFIXES.iter().find(|p| name.starts_with(*p)) {
                anyhow::bail!(
                    "environment variable {name} is refused by the Slurm executor: Slurm reads {prefix}* variables as options"
                );
            }
        }
        // The directory is fresh and still the agent's (mode 0700): files are created new, with
        // their own modes, before it is handed to the job's account.
        let workspace = job.dir.join("workspace");
        super::workspace_dir(&workspace)?;
        super::write_new_file(&job.dir.join("script.sh"), job.spec.script.as_bytes())?;
        let batch = job.dir.join("batch.sh");
        super::write_new_file(
            &batch,
            format!(
                "#!/bin/bash\n# testbot job {} attempt {}\nexec bash --noprofile --norc -eo pipefail \"$TESTBOT_JOB_DIR/script.sh\"\n",
                job.id, job.attempt
            )
            .as_bytes(),
        )?;
        for file in ["stdout.log", "stderr.log"] {
            super::write_new_file(&job.dir.join(file), b"")?;
        }
        if let Some(account) = super::switches_account(job) {
            super::hand_over(&job.dir, account)?;
        }

        let args = self.sbatch_args(job)?;
        let mut command = self.command_as(job, "sbatch")?;
        command.args(&args).arg(&batch);
        // `--export=ALL` hands sbatch's environment to the batch script. sbatch itself starts
        // as the job's account (the switch happens before the exec), so the job's variables
        // never reach a program running as root.
        command.envs(&job.spec.env);
        command
            .envs(job.testbot_env())
            .env("TESTBOT_JOB_DIR", &job.dir)
            .env("TESTBOT_WORKSPACE", &workspace);
        let started = Instant::now();
        let output = run_command(command).await.context("Cannot run sbatch")?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            anyhow::bail!("sbatch refused the job: {}", stderr.trim());
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        // `--parsable` prints `ID` or `ID;CLUSTER`.
        let slurm_job = stdout
            .trim()
            .split(';')
            .next()
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
            .with_context(|| format!("sbatch printed no job id: {stdout:?}"))?
            .to_string();
        tracing::info!(
            job_id = %job.id,
            slurm_job = %slurm_job,
            sbatch_ms = started.elapsed().as_millis() as u64,
            "Submitted to Slurm."
        );
        let record = JobRecord::started(slurm_job, job);
        self.records.save(&record)?;
        log.metadata("slurm_job_id", record.handle.clone()).await;
        log.system(format!("submitted to Slurm as job {}", record.handle))
            .await;
        Ok(record)
    }

    /// A Slurm command with a clean environment, run as the job's account when it has one.
    fn command_as(&self, job: &JobContext, program: &str) -> anyhow::Result<Command> {
        let mut command = super::command_as(job, program, None)?;
        for name in SLURM_PASSTHROUGH_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        if std::env::var_os("PATH").is_none() {
            command.env("PATH", "/usr/local/bin:/usr/bin:/bin");
        }
        if let Some(account) = super::switches_account(job) {
            command
                .env("HOME", &account.home)
                .env("USER", &account.name)
                .env("LOGNAME", &account.name);
        }
        Ok(command)
    }

    /// Tails the job's output and follows its state until it ends (or is stopped, or times out).
    pub async fn follow(
        &self,
        job: &JobContext,
        record: JobRecord,
        log: &LogSink,
        stop: &CancellationToken,
    ) -> anyhow::Result<ExecOutcome> {
        let owner = super::job_owner(job);
        let mut stdout = Tail::new(record.job.dir.join("stdout.log"), record.stdout_pos, owner);
        let mut stderr = Tail::new(record.job.dir.join("stderr.log"), record.stderr_pos, owner);
        // Slurm enforces the time limit (`--time`); the agent's own deadline is a backstop.
        let deadline = Instant::now() + job.timeout + TIME_LIMIT_BACKSTOP;
        let mut state_interval = STATE_INTERVAL_MIN;
        let mut next_state_check = Instant::now();
        let mut last: Option<SlurmStatus> = None;
        let mut stopping: Option<(ExecOutcome, Instant)> = None;
        let mut tick = tokio::time::interval(TAIL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Tailing is one branch, so cancel and the deadline are heard while output is read
            // (or while the sink makes it wait); a pump stopped half-way loses nothing.
            tokio::select! {
                _ = async {
                    tick.tick().await;
                    // Positions are saved when the broker acknowledges the lines
                    // ([`Executor::checkpoint`]).
                    stdout.pump(Stream::Stdout, log).await;
                    stderr.pump(Stream::Stderr, log).await;
                } => {}
                _ = stop.cancelled(), if stopping.is_none() => {
                    log.system(format!("cancelling Slurm job {}", record.handle)).await;
                    self.scancel(&record.handle).await;
                    stopping = Some((ExecOutcome::Stopped, Instant::now()));
                    next_state_check = Instant::now();
                }
                _ = tokio::time::sleep_until(deadline), if stopping.is_none() => {
                    log.system(format!(
                        "timed out after {}; cancelling Slurm job {}",
                        humantime::format_duration(job.timeout),
                        record.handle
                    )).await;
                    self.scancel(&record.handle).await;
                    stopping = Some((ExecOutcome::TimedOut(job.timeout), Instant::now()));
                    next_state_check = Instant::now();
                }
            }
            if Instant::now() < next_state_check {
                continue;
            }
            let status = match self.status(&record.handle).await {
                Ok(status) => status,
                Err(err) => {
                    tracing::warn!(job_id = %job.id, slurm_job = %record.handle, %err, "Cannot read the Slurm job's state; retrying.");
                    state_interval = (state_interval * 2).min(STATE_INTERVAL_MAX);
                    next_state_check = Instant::now() + state_interval;
                    continue;
                }
            };
            let changed = last.as_ref() != Some(&status);
            if let Some(nodes) = &status.nodes
                && last.as_ref().and_then(|l| l.nodes.as_ref()) != Some(nodes)
            {
                log.metadata(testbot_proto::jobs::SLURM_NODES, nodes.clone())
                    .await;
            }
            if changed {
                match (status.state.as_str(), &status.reason) {
                    ("PENDING", Some(reason)) => {
                        log.system(format!("Slurm job {} is pending ({reason})", record.handle))
                            .await
                    }
                    ("RUNNING", _) => {
                        log.system(format!("Slurm job {} is running", record.handle))
                            .await
                    }
                    _ => {}
                }
                state_interval = STATE_INTERVAL_MIN;
            } else {
                state_interval = (state_interval * 2).min(STATE_INTERVAL_MAX);
            }
            next_state_check = Instant::now() + state_interval;
            if status.is_terminal() {
                // Slurm has closed the files; take what is left, including a last line without
                // a newline.
                stdout.drain(Stream::Stdout, log).await;
                stderr.drain(Stream::Stderr, log).await;
                stdout.flush(Stream::Stdout, log).await;
                stderr.flush(Stream::Stderr, log).await;
                let outcome = match stopping {
                    Some((outcome, _)) => outcome,
                    None => outcome_of(&status, job.timeout),
                };
                if !matches!(outcome, ExecOutcome::Exited(_)) || status.state != "COMPLETED" {
                    log.system(format!(
                        "Slurm job {} ended {}{}",
                        record.handle,
                        status.state,
                        status
                            .exit_code
                            .map(|(c, s)| format!(" with exit code {c}:{s}"))
                            .unwrap_or_default()
                    ))
                    .await;
                }
                return Ok(outcome);
            }
            last = Some(status);
            if let Some((_, since)) = &stopping
                && since.elapsed() > CANCEL_WAIT
            {
                anyhow::bail!(
                    "Slurm job {} did not end within {} of scancel",
                    record.handle,
                    humantime::format_duration(CANCEL_WAIT)
                );
            }
        }
    }

    /// Asks Slurm to cancel a job; an unknown or finished job is not an error.
    pub async fn scancel(&self, slurm_job: &str) {
        let mut command = Command::new("scancel");
        command.arg(slurm_job);
        match run_command(command).await {
            Ok(output) if output.status.success() => {}
            Ok(output) => tracing::warn!(
                slurm_job,
                stderr = %String::from_utf8_lossy(&output.stderr).trim(),
                "scancel failed."
            ),
            Err(err) => tracing::warn!(slurm_job, ?err, "Cannot run scancel."),
        }
    }

    /// The job's state: `scontrol` while Slurm remembers the job, then `sacct` if accounting
    /// is enabled.
    pub async fn status(&self, slurm_job: &str) -> anyhow::Result<SlurmStatus> {
        let mut command = Command::new("scontrol");
        command.args(["-o", "show", "job", slurm_job]);
        let output = run_command(command).await?;
        if output.status.success() {
            let text = String::from_utf8_lossy(&output.stdout);
            return parse_scontrol(&text)
                .with_context(|| format!("unexpected scontrol output: {}", text.trim()));
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("Invalid job id") {
            if let Some(status) = self.sacct_status(slurm_job).await? {
                return Ok(status);
            }
            anyhow::bail!(
                "Slurm no longer knows job {slurm_job} and accounting (sacct) is not enabled"
            );
        }
        anyhow::bail!("scontrol failed: {}", stderr.trim())
    }

    async fn sacct_status(&self, slurm_job: &str) -> anyhow::Result<Option<SlurmStatus>> {
        let mut command = Command::new("sacct");
        command.args([
            "-n",
            "-X",
            "-P",
            "-j",
            slurm_job,
            "-o",
            "State,ExitCode,NodeList,Reason",
        ]);
        let output = run_command(command).await?;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || text.contains("accounting storage is disabled") {
            return Ok(None);
        }
        Ok(text.lines().next().and_then(|line| {
            let mut fields = line.split('|');
            let state = fields.next()?.split_whitespace().next()?.to_string();
            let exit_code = fields.next().and_then(parse_exit_code);
            let nodes = fields.next().and_then(node_list);
            let reason = fields
                .next()
                .map(str::to_string)
                .filter(|r| !r.is_empty() && r != "None");
            Some(SlurmStatus {
                state,
                reason,
                exit_code,
                nodes,
            })
        }))
    }
}

/// Runs a Slurm command with a time limit, capturing its output.
async fn run_command(mut command: Command) -> anyhow::Result<std::process::Output> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    tokio::time::timeout(COMMAND_TIMEOUT, command.output())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "timed out after {}",
                humantime::format_duration(COMMAND_TIMEOUT)
            )
        })?
        .map_err(anyhow::Error::from)
}

/// Parses one line of `scontrol -o show job ID`.
pub fn parse_scontrol(text: &str) -> Option<SlurmStatus> {
    let fields: HashMap<&str, &str> = text
        .split_whitespace()
        .filter_map(|field| field.split_once('='))
        .collect();
    let state = fields.get("JobState")?.to_string();
    let reason = fields
        .get("Reason")
        .map(|r| r.to_string())
        .filter(|r| r != "None");
    let exit_code = fields.get("ExitCode").and_then(|e| parse_exit_code(e));
    let nodes = fields.get("NodeList").and_then(|n| node_list(n));
    Some(SlurmStatus {
        state,
        reason,
        exit_code,
        nodes,
    })
}

/// A node list as Slurm prints it, or None for none yet (`(null)`, `None assigned`, empty).
fn node_list(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty() && !text.starts_with('(') && !text.starts_with("None"))
        .then(|| text.to_string())
}

fn parse_exit_code(text: &str) -> Option<(i32, i32)> {
    let (code, signal) = text.trim().split_once(':')?;
    Some((code.parse().ok()?, signal.parse().ok()?))
}

/// How a job that Slurm ended maps to a result.
pub fn outcome_of(status: &SlurmStatus, limit: Duration) -> ExecOutcome {
    let (code, signal) = status.exit_code.unwrap_or((0, 0));
    match status.state.as_str() {
        "COMPLETED" => ExecOutcome::Exited(code),
        "FAILED" if signal != 0 && code == 0 => ExecOutcome::Signalled(signal),
        "FAILED" => ExecOutcome::Exited(if code == 0 { 1 } else { code }),
        "TIMEOUT" | "DEADLINE" => ExecOutcome::TimedOut(limit),
        "OUT_OF_MEMORY" => ExecOutcome::Failed {
            state: JobState::Failed,
            cause: FailureCause::OutOfMemory,
            reason: "out of memory: Slurm killed the job (OUT_OF_MEMORY)".into(),
        },
        "CANCELLED" => ExecOutcome::Failed {
            state: JobState::Cancelled,
            cause: FailureCause::Cancelled,
            reason:
                "cancelled in Slurm (CANCELLED: scancel outside testbot, or by an administrator)"
                    .into(),
        },
        "NODE_FAIL" => ExecOutcome::Failed {
            state: JobState::Error,
            cause: FailureCause::Infrastructure,
            reason: "the Slurm node failed (NODE_FAIL)".into(),
        },
        "PREEMPTED" => ExecOutcome::Failed {
            state: JobState::Error,
            cause: FailureCause::Infrastructure,
            reason: "preempted by Slurm (PREEMPTED)".into(),
        },
        "BOOT_FAIL" => ExecOutcome::Failed {
            state: JobState::Error,
            cause: FailureCause::Infrastructure,
            reason: "the Slurm node failed to boot (BOOT_FAIL)".into(),
        },
        other => ExecOutcome::Failed {
            state: JobState::Error,
            cause: FailureCause::Infrastructure,
            reason: format!(
                "Slurm ended the job in state {other}{}",
                status
                    .reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ),
        },
    }
}

/// The most read from one output file at a time: reads are bounded, so a file that grows
/// without end cannot make the agent hold more than this (plus one unfinished line).
const READ_PIECE: usize = 64 * 1024;
/// The most read from one output file per [`Tail::pump`].
const READ_PER_PUMP: usize = 16 * READ_PIECE;

/// What one [`Tail::pump`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pumped {
    /// Nothing new (or the file is gone for now, or refused).
    Idle,
    /// New bytes; `more`: the read stopped at [`READ_PER_PUMP`], there may be more.
    Read { more: bool },
}

/// Follows a growing file from a byte position, turning complete lines into log records.
///
/// The file lies in the job's directory, which belongs to the job's account: the job can replace
/// it with a symbolic link (to `/etc/munge/munge.key`, `/etc/shadow`, the agent's key), a FIFO or
/// a device. Each read opens it with [`super::open_job_file`] (no links followed, nothing that
/// blocks, only a regular file of the job's account); once it has been refused the tail stops
/// for good and says why in the log. Reads are bounded, and the tail is cancel-safe: a line
/// counts as consumed only once it has been handed to the sink.
struct Tail {
    path: PathBuf,
    /// The account whose file this must be.
    owner: nix::unistd::Uid,
    /// Bytes consumed: everything before is in the log.
    pos: u64,
    /// Bytes read past `pos` that do not end in a newline yet.
    partial: Vec<u8>,
    /// The file was refused; nothing more is read from it.
    refused: bool,
}

impl Tail {
    fn new(path: PathBuf, pos: u64, owner: nix::unistd::Uid) -> Tail {
        Tail {
            path,
            owner,
            pos,
            partial: Vec::new(),
            refused: false,
        }
    }

    /// Reads what the file gained (at most [`READ_PER_PUMP`]) and sends complete lines.
    async fn pump(&mut self, stream: Stream, log: &LogSink) -> Pumped {
        if self.refused {
            return Pumped::Idle;
        }
        let read_from = self.pos + self.partial.len() as u64;
        let (path, owner) = (self.path.clone(), self.owner);
        let read = tokio::task::spawn_blocking(move || read_job_file(&path, owner, read_from))
            .await
            .unwrap_or_else(|err| Err(super::JobFileError::Io(std::io::Error::other(err))));
        let fresh = match read {
            Ok(fresh) if fresh.is_empty() => return Pumped::Idle,
            Ok(fresh) => fresh,
            Err(super::JobFileError::Missing) => return Pumped::Idle,
            Err(super::JobFileError::Refused(what)) => {
                self.refused = true;
                let name = self
                    .path
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
                tracing::warn!(path = %self.path.display(), reason = %what, "Refused to read a job's output file.");
                log.system(format!(
                    "stopped reading {name}: {what}, not the file the job was given; the agent reads only that file, so the rest of this output is not shown"
                ))
                .await;
                return Pumped::Idle;
            }
            Err(super::JobFileError::Io(err)) => {
                tracing::warn!(path = %self.path.display(), ?err, "Cannot read a job's output file; retrying.");
                return Pumped::Idle;
            }
        };
        let more = fresh.len() >= READ_PER_PUMP;
        self.partial.extend_from_slice(&fresh);
        while let Some(newline) = self.partial.iter().position(|&b| b == b'\n') {
            let end = self.pos + newline as u64 + 1;
            send_line(&self.partial[..newline], stream, log, end).await;
            self.partial.drain(..=newline);
            self.pos = end;
        }
        // A line longer than the limit is sent in pieces rather than held forever.
        while self.partial.len() >= MAX_LINE_BYTES {
            let end = self.pos + MAX_LINE_BYTES as u64;
            send_line(&self.partial[..MAX_LINE_BYTES], stream, log, end).await;
            self.partial.drain(..MAX_LINE_BYTES);
            self.pos = end;
        }
        Pumped::Read { more }
    }

    /// Reads everything the file still has (the job has ended, the file is closed).
    async fn drain(&mut self, stream: Stream, log: &LogSink) {
        while self.pump(stream, log).await == (Pumped::Read { more: true }) {}
    }

    /// Sends a last line that has no newline (the job has ended).
    async fn flush(&mut self, stream: Stream, log: &LogSink) {
        if !self.partial.is_empty() {
            let end = self.pos + self.partial.len() as u64;
            send_line(&self.partial, stream, log, end).await;
            self.partial.clear();
            self.pos = end;
        }
    }
}

/// Reads at most [`READ_PER_PUMP`] bytes of a job's file from `offset`, in pieces of
/// [`READ_PIECE`] (blocking).
fn read_job_file(
    path: &std::path::Path,
    owner: nix::unistd::Uid,
    offset: u64,
) -> Result<Vec<u8>, super::JobFileError> {
    use std::os::unix::fs::FileExt as _;
    let file = super::open_job_file(path, owner)?;
    let mut out = Vec::new();
    let mut piece = vec![0; READ_PIECE];
    while out.len() < READ_PER_PUMP {
        match file.read_at(&mut piece, offset + out.len() as u64) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&piece[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) if out.is_empty() => return Err(super::JobFileError::Io(err)),
            Err(_) => break,
        }
    }
    Ok(out)
}

async fn send_line(bytes: &[u8], stream: Stream, log: &LogSink, pos: u64) {
    let text = String::from_utf8_lossy(bytes);
    log.file_line(stream, text.strip_suffix('\r').unwrap_or(&text), pos)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line the sink received so far.
    fn received(lines: &mut tokio::sync::mpsc::Receiver<super::super::LogRecord>) -> Vec<String> {
        let mut texts = Vec::new();
        while let Ok(line) = lines.try_recv() {
            texts.push(line.text);
        }
        texts
    }

    /// A job directory holding a secret the job must not see, and a path for its stdout.log.
    fn job_dir_with_secret() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("munge.key");
        std::fs::write(&secret, "SECRET-KEY-BYTES\n").unwrap();
        let log = dir.path().join("stdout.log");
        (dir, secret, log)
    }

    #[tokio::test]
    async fn a_tail_does_not_follow_a_symlink_to_a_secret() {
        let (_dir, secret, path) = job_dir_with_secret();
        std::os::unix::fs::symlink(&secret, &path).unwrap();
        let (sink, mut lines) = LogSink::new(16);
        let mut tail = Tail::new(path.clone(), 0, nix::unistd::geteuid());
        assert_eq!(tail.pump(Stream::Stdout, &sink).await, Pumped::Idle);
        let texts = received(&mut lines);
        assert!(texts.iter().all(|t| !t.contains("SECRET")), "{texts:?}");
        assert_eq!(
            texts,
            [
                "testbot: stopped reading stdout.log: it is a symbolic link, not the file the job was given; the agent reads only that file, so the rest of this output is not shown"
            ]
        );
        // Once refused, for good: putting a file back does not resume the stream.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "SECRET-KEY-BYTES\n").unwrap();
        assert_eq!(tail.pump(Stream::Stdout, &sink).await, Pumped::Idle);
        assert!(received(&mut lines).is_empty());
    }

    #[tokio::test]
    async fn a_tail_refuses_a_fifo_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (sink, mut lines) = LogSink::new(16);
        let mut tail = Tail::new(path, 0, nix::unistd::geteuid());
        let pumped = tokio::time::timeout(Duration::from_secs(5), tail.pump(Stream::Stdout, &sink))
            .await
            .expect("reading a FIFO must not block the job's slot");
        assert_eq!(pumped, Pumped::Idle);
        let texts = received(&mut lines);
        assert_eq!(texts.len(), 1, "{texts:?}");
        assert!(
            texts[0].contains("it is a FIFO, not a regular file"),
            "{texts:?}"
        );
    }

    #[tokio::test]
    async fn a_tail_refuses_dev_zero_and_other_accounts_files() {
        let (_dir, secret, path) = job_dir_with_secret();
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        let (sink, mut lines) = LogSink::new(16);
        let mut tail = Tail::new(path, 0, nix::unistd::geteuid());
        let pumped = tokio::time::timeout(Duration::from_secs(5), tail.pump(Stream::Stdout, &sink))
            .await
            .expect("a link to /dev/zero is not read");
        assert_eq!(pumped, Pumped::Idle);
        assert!(received(&mut lines)[0].contains("it is a symbolic link"));
        // The device itself (as a hard link would show it).
        let mut tail = Tail::new(PathBuf::from("/dev/zero"), 0, nix::unistd::geteuid());
        assert_eq!(tail.pump(Stream::Stdout, &sink).await, Pumped::Idle);
        assert!(received(&mut lines)[0].contains("it is a device, not a regular file"));
        // A regular file of another account (a hard link to someone else's file).
        let other = nix::unistd::Uid::from_raw(nix::unistd::geteuid().as_raw() + 4242);
        let mut tail = Tail::new(secret, 0, other);
        assert_eq!(tail.pump(Stream::Stdout, &sink).await, Pumped::Idle);
        let texts = received(&mut lines);
        assert!(
            texts[0].contains(&format!(
                "it belongs to uid {}, not to the job's account (uid {other})",
                nix::unistd::geteuid()
            )),
            "{texts:?}"
        );
    }

    #[tokio::test]
    async fn a_tail_reads_in_bounded_pieces_and_loses_nothing_when_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        // Three short lines, then far more than one pump reads.
        let mut text = String::from("one\ntwo\nthree\n");
        text.push_str(&"x".repeat(READ_PER_PUMP * 2));
        std::fs::write(&path, &text).unwrap();
        let (sink, mut lines) = LogSink::new(1);
        let mut tail = Tail::new(path, 0, nix::unistd::geteuid());
        // The sink takes one line and then makes the tail wait: cancelling it there (as a
        // cancelled job does) must neither lose nor repeat a line.
        let cancelled =
            tokio::time::timeout(Duration::from_millis(200), tail.pump(Stream::Stdout, &sink))
                .await;
        assert!(cancelled.is_err(), "the full sink holds the pump");
        let mut texts = received(&mut lines);
        let (sink, mut lines) = LogSink::new(1024);
        assert_eq!(
            tail.pump(Stream::Stdout, &sink).await,
            Pumped::Read { more: true }
        );
        texts.extend(received(&mut lines));
        assert_eq!(texts[..3], ["one", "two", "three"]);
        // What is held back is less than a line.
        assert!(tail.partial.len() < MAX_LINE_BYTES);
        tail.drain(Stream::Stdout, &sink).await;
        tail.flush(Stream::Stdout, &sink).await;
        texts.extend(received(&mut lines));
        let xs: usize = texts[3..].iter().map(String::len).sum();
        assert_eq!(xs, READ_PER_PUMP * 2);
    }

    #[test]
    fn scontrol_lines_parse() {
        let line = "JobId=7 JobName=testbot-3 UserId=root(0) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) ExitCode=3:0 RunTime=00:00:01 NodeList=c[041-042] BatchHost=c041";
        assert_eq!(
            parse_scontrol(line),
            Some(SlurmStatus {
                state: "FAILED".into(),
                reason: Some("NonZeroExitCode".into()),
                exit_code: Some((3, 0)),
                nodes: Some("c[041-042]".into()),
            })
        );
        let pending = "JobId=8 JobState=PENDING Reason=Resources ExitCode=0:0 NodeList=(null)";
        let status = parse_scontrol(pending).unwrap();
        assert!(!status.is_terminal());
        assert_eq!(status.nodes, None);
        assert_eq!(status.reason.as_deref(), Some("Resources"));
    }

    fn context(resources: testbot_proto::jobs::Resources) -> JobContext {
        JobContext {
            id: testbot_proto::jobs::JobId(7),
            attempt: 1,
            agent: "login1".into(),
            spec: testbot_proto::jobs::JobSpec {
                script: "true".into(),
                resources,
                ..Default::default()
            },
            timeout: Duration::from_secs(90),
            dir: PathBuf::from("/work/jobs/job-7-1"),
            run_as: None,
            keep_dir: false,
            lease: "l".into(),
            heartbeat_interval_ms: 1000,
            batch: None,
        }
    }

    #[test]
    fn sbatch_options_are_one_argv_entry_each_and_job_fields_cannot_add_any() {
        let executor = SlurmExecutor {
            settings: SlurmSettings {
                extra_args: vec!["--reservation=ci".into()],
                ..SlurmSettings::default()
            },
            records: JobRecords::new(PathBuf::from("/nonexistent")),
        };
        let args = executor
            .sbatch_args(&context(testbot_proto::jobs::Resources {
                partition: Some("debug".into()),
                cpus: Some(2),
                memory_mib: Some(512),
                ..Default::default()
            }))
            .unwrap();
        assert_eq!(
            args,
            [
                "--parsable",
                "--job-name=testbot-7",
                "--chdir=/work/jobs/job-7-1/workspace",
                "--output=/work/jobs/job-7-1/stdout.log",
                "--error=/work/jobs/job-7-1/stderr.log",
                "--export=ALL",
                "--time=2",
                "--comment=testbot job 7 attempt 1",
                "--reservation=ci",
                "--partition=debug",
                "--cpus-per-task=2",
                "--mem=512M",
            ]
        );
        for hostile in ["debug --uid=0", "-A", "debug;id", "a b", "$(id)"] {
            let err = executor
                .sbatch_args(&context(testbot_proto::jobs::Resources {
                    partition: Some(hostile.into()),
                    ..Default::default()
                }))
                .unwrap_err();
            assert!(err.to_string().contains("is invalid"), "{hostile}: {err}");
        }
    }

    #[test]
    fn sbatch_carries_the_site_caps_for_a_job_that_asks_for_nothing() {
        let policy = crate::policy::SitePolicy::parse(
            r#"
[oidc]
audience = "https://testbot.example.org"
[executors.slurm]
max_cpus = 8
max_memory = "4G"
max_time = "30m"
[[rules]]
name = "all"
repositories = ["my-org/*"]
"#,
        )
        .unwrap();
        let executor = SlurmExecutor {
            settings: policy.executors().slurm.clone().unwrap(),
            records: JobRecords::new(PathBuf::from("/nonexistent")),
        };
        let asks_nothing = testbot_proto::jobs::JobSpec {
            script: "true".into(),
            ..Default::default()
        };
        let mut job = context(policy.resources(&asks_nothing, "slurm"));
        job.timeout = policy.time_limit(&asks_nothing, "slurm");
        let args = executor.sbatch_args(&job).unwrap();
        for want in ["--time=30", "--cpus-per-task=8", "--mem=4096M"] {
            assert!(args.contains(&want.to_string()), "{want} in {args:?}");
        }

        // A site default is used before the cap; what a job asks for, within the cap, is kept.
        let policy = crate::policy::SitePolicy::parse(
            r#"
[oidc]
audience = "https://testbot.example.org"
[executors.slurm]
max_cpus = 8
default_cpus = 1
max_memory = "4G"
default_memory = "1G"
[[rules]]
name = "all"
repositories = ["my-org/*"]
"#,
        )
        .unwrap();
        let args = executor
            .sbatch_args(&context(policy.resources(&asks_nothing, "slurm")))
            .unwrap();
        assert!(args.contains(&"--cpus-per-task=1".to_string()), "{args:?}");
        assert!(args.contains(&"--mem=1024M".to_string()), "{args:?}");
        let mut asks = asks_nothing.clone();
        asks.resources.memory_mib = Some(2048);
        let args = executor
            .sbatch_args(&context(policy.resources(&asks, "slurm")))
            .unwrap();
        assert!(args.contains(&"--mem=2048M".to_string()), "{args:?}");
    }

    #[test]
    fn slurm_states_map_to_results() {
        let status = |state: &str, exit: (i32, i32)| SlurmStatus {
            state: state.into(),
            reason: None,
            nodes: None,
            exit_code: Some(exit),
        };
        let limit = Duration::from_secs(60);
        assert_eq!(
            outcome_of(&status("COMPLETED", (0, 0)), limit),
            ExecOutcome::Exited(0)
        );
        assert_eq!(
            outcome_of(&status("FAILED", (3, 0)), limit),
            ExecOutcome::Exited(3)
        );
        assert_eq!(
            outcome_of(&status("FAILED", (0, 9)), limit),
            ExecOutcome::Signalled(9)
        );
        assert_eq!(
            outcome_of(&status("TIMEOUT", (0, 15)), limit),
            ExecOutcome::TimedOut(limit)
        );
        for (state, want) in [
            ("OUT_OF_MEMORY", JobState::Failed),
            ("CANCELLED", JobState::Cancelled),
            ("NODE_FAIL", JobState::Error),
            ("PREEMPTED", JobState::Error),
        ] {
            match outcome_of(&status(state, (0, 0)), limit) {
                ExecOutcome::Failed {
                    state: got, reason, ..
                } => {
                    assert_eq!(got, want, "{state}");
                    assert!(reason.contains(state), "{reason}");
                }
                other => panic!("{state}: {other:?}"),
            }
        }
    }
}
