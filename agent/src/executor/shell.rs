//! The shell executor: `bash --noprofile --norc -eo pipefail script.sh` in a fresh job
//! directory, in its own process group, with a clean environment.
//!
//! Each job also runs in a cgroup of its own ([`super::cgroup`]) when the host has a writable
//! cgroup v2: the agent then stops everything the job started, including processes that left
//! its process group (`setsid`), and at start-up kills what a job of an earlier run of the agent
//! (killed with SIGKILL, say) left behind. Without one the agent says so when it starts, and
//! only the process group is killed.
//!
//! Stopping a job (cancel, timeout, agent shutdown) sends SIGTERM to the whole group (and every
//! process of its cgroup), then SIGKILL after the grace period. When the script ends by itself,
//! whatever it left running is killed too, so no job leaves processes behind.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use testbot_proto::logs::{MAX_LINE_BYTES, Stream};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use super::cgroup::{JobCgroup, JobCgroups};
use super::{BoxFuture, ExecOutcome, Executor, JobContext, LogSink};

/// How long to wait for output pipes to close after the process group is gone.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Variables passed through from the agent's own environment when set.
const PASSTHROUGH_ENV: &[&str] = &["PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ"];

#[derive(Debug, Clone)]
pub struct ShellExecutor {
    /// Time between SIGTERM and SIGKILL when a job is stopped.
    pub kill_grace: Duration,
    /// Where each job's cgroup is made; `Err`: why jobs run without one.
    cgroups: Arc<Result<JobCgroups, String>>,
}

impl ShellExecutor {
    /// A shell executor for the agent whose state is in `state_dir` (which names its cgroup).
    pub fn new(kill_grace: Duration, state_dir: &Path) -> ShellExecutor {
        let instance = super::ContainerExecutor::instance_of(state_dir);
        ShellExecutor {
            kill_grace,
            cgroups: Arc::new(JobCgroups::create(&instance)),
        }
    }

    /// Where job cgroups are made, if they are.
    pub fn cgroups(&self) -> Option<&JobCgroups> {
        self.cgroups.as_ref().as_ref().ok()
    }
}

impl Executor for ShellExecutor {
    fn name(&self) -> &'static str {
        "shell"
    }

    fn prepare<'a>(&'a self) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            match self.cgroups.as_ref() {
                Ok(cgroups) => {
                    tracing::info!(
                        cgroup = %cgroups.parent().display(),
                        "Shell jobs run in cgroups of their own."
                    );
                    // At once, before the agent even reaches the broker: each moment an orphan
                    // of an earlier run lives, it may run beside the job's next attempt.
                    cgroups.reap().await;
                }
                Err(why) => tracing::warn!(
                    reason = %why,
                    "No writable cgroup v2: shell jobs run without a cgroup, so processes a job moves out of its process group (setsid), and jobs of an agent killed with SIGKILL, keep running. Run the agent as root, or give it a delegated cgroup v2 subtree (systemd: Delegate=yes)."
                ),
            }
            Ok(())
        })
    }

    fn run<'a>(
        &'a self,
        job: &'a JobContext,
        log: LogSink,
        stop: CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<ExecOutcome>> {
        Box::pin(self.run_job(job, log, stop))
    }

    fn cleanup<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            super::remove_job_dir(job).await;
        })
    }
}

impl ShellExecutor {
    async fn run_job(
        &self,
        job: &JobContext,
        log: LogSink,
        stop: CancellationToken,
    ) -> anyhow::Result<ExecOutcome> {
        // The directory is fresh and still the agent's (mode 0700): files are created new, with
        // their own modes, before it is handed to the job's account.
        let script = job.dir.join("script.sh");
        super::write_new_file(&script, job.spec.script.as_bytes())?;
        let tmp = job.dir.join("tmp");
        super::private_dir(&tmp)?;
        let workspace = job.dir.join("workspace");
        super::workspace_dir(&workspace)?;

        if let Some(account) = super::switches_account(job) {
            super::hand_over(&job.dir, account)?;
        }
        let cgroup = match self.cgroups() {
            Some(cgroups) => Some(cgroups.job(job.id, job.attempt).await?),
            None => None,
        };
        let procs = cgroup.as_ref().map(JobCgroup::procs).transpose()?;
        let mut command = super::command_as(job, "bash", procs)?;
        command
            .args(["--noprofile", "--norc", "-eo", "pipefail"])
            .arg(&script)
            .current_dir(&workspace)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        for name in PASSTHROUGH_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        if std::env::var_os("PATH").is_none() {
            command.env("PATH", "/usr/local/bin:/usr/bin:/bin");
        }
        if let Some(account) = &job.run_as {
            command
                .env("HOME", &account.home)
                .env("USER", &account.name)
                .env("LOGNAME", &account.name);
        }
        // The job's own variables reach only bash, which starts as the job's account: the
        // account switch happens before the exec (see `command_as`).
        command.envs(&job.spec.env);
        command
            .envs(job.testbot_env())
            .env("TMPDIR", &tmp)
            .env("TESTBOT_JOB_DIR", &job.dir)
            .env("TESTBOT_WORKSPACE", &workspace);

        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                if let Some(cgroup) = &cgroup {
                    cgroup.kill().await;
                }
                return Err(err).context("Cannot start bash");
            }
        };
        let pgid = Pid::from_raw(
            child
                .id()
                .context("bash exited before it could be tracked")? as i32,
        );
        tracing::debug!(job_id = %job.id, pgid = pgid.as_raw(), "Job process started.");
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let readers = tokio::spawn(read_lines(stdout, Stream::Stdout, log.clone()));
        let readers_err = tokio::spawn(read_lines(stderr, Stream::Stderr, log.clone()));

        let outcome = tokio::select! {
            status = child.wait() => status_outcome(status?),
            _ = tokio::time::sleep(job.timeout) => {
                log.system(format!("timed out after {}; stopping the job", humantime::format_duration(job.timeout))).await;
                self.terminate(&mut child, pgid, cgroup.as_ref()).await;
                ExecOutcome::TimedOut(job.timeout)
            }
            _ = stop.cancelled() => {
                self.terminate(&mut child, pgid, cgroup.as_ref()).await;
                ExecOutcome::Stopped
            }
        };
        // Whatever the script left running goes with it: its group, and with a cgroup also
        // what left the group.
        kill_group(pgid, Signal::SIGKILL);
        if let Some(cgroup) = &cgroup {
            cgroup.kill().await;
        }
        for reader in [readers, readers_err] {
            if tokio::time::timeout(PIPE_DRAIN_TIMEOUT, reader)
                .await
                .is_err()
            {
                tracing::warn!(job_id = %job.id, "A process outside the job's group kept its output open; stopped reading.");
            }
        }
        Ok(outcome)
    }

    /// SIGTERM to the group (and the cgroup), SIGKILL after the grace period; waits for the
    /// script to exit.
    async fn terminate(&self, child: &mut Child, pgid: Pid, cgroup: Option<&JobCgroup>) {
        kill_group(pgid, Signal::SIGTERM);
        if let Some(cgroup) = cgroup {
            cgroup.signal(Signal::SIGTERM);
        }
        if tokio::time::timeout(self.kill_grace, child.wait())
            .await
            .is_err()
        {
            kill_group(pgid, Signal::SIGKILL);
            if let Some(cgroup) = cgroup {
                cgroup.kill().await;
            }
            let _ = child.wait().await;
        }
    }
}

fn kill_group(pgid: Pid, signal: Signal) {
    match killpg(pgid, signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(err) => tracing::warn!(
            pgid = pgid.as_raw(),
            ?err,
            "Cannot signal the job's process group."
        ),
    }
}

fn status_outcome(status: std::process::ExitStatus) -> ExecOutcome {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExecOutcome::Exited(code),
        (None, Some(signal)) => ExecOutcome::Signalled(signal),
        (None, None) => ExecOutcome::Exited(-1),
    }
}

/// How much of a pipe is read at a time: as much as a Linux pipe holds by default, so a job that
/// prints fast is read in few system calls.
const PIPE_READ_BYTES: usize = 64 * 1024;

/// Reads a pipe line by line (lines longer than [`MAX_LINE_BYTES`] are split) into the sink.
async fn read_lines(pipe: impl AsyncRead + Unpin, stream: Stream, log: LogSink) {
    let mut reader = BufReader::with_capacity(PIPE_READ_BYTES, pipe);
    let mut line = Vec::new();
    loop {
        let available = match reader.fill_buf().await {
            Ok(buf) => buf,
            Err(err) => {
                tracing::warn!(?err, "Cannot read job output.");
                break;
            }
        };
        if available.is_empty() {
            break;
        }
        let (take, complete) = match memchr::memchr(b'\n', available) {
            Some(pos) => (pos + 1, true),
            None => (available.len(), false),
        };
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        if complete || line.len() >= MAX_LINE_BYTES {
            log.line(stream, text_of(&line)).await;
            line.clear();
        }
    }
    if !line.is_empty() {
        log.line(stream, text_of(&line)).await;
    }
}

/// The line as text; bytes that are not UTF-8 become U+FFFD.
fn text_of(line: &[u8]) -> String {
    // Checking first is much faster than the lossy conversion for the usual, valid line.
    match std::str::from_utf8(line) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(line).into_owned(),
    }
}
