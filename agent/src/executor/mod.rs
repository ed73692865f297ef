//! Executors: how a job's script actually runs.
//!
//! Every executor implements [`Executor`]: a cancellable `run` that streams output into a
//! [`LogSink`] and reports how the job ended, and an always-called `cleanup`.

pub mod cgroup;
mod container;
mod kubernetes;
mod noop;
pub mod records;
mod shell;
pub mod slurm;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context as _;

use crate::identity::LocalAccount;
use testbot_proto::jobs::{JobId, JobSpec};
use testbot_proto::logs::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use container::{ContainerExecutor, Engine};
pub use kubernetes::KubernetesExecutor;
pub use noop::NoopExecutor;
pub use shell::ShellExecutor;
pub use slurm::SlurmExecutor;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One job as an executor sees it.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub id: JobId,
    pub attempt: u32,
    pub agent: String,
    pub spec: JobSpec,
    /// The time limit: the job's own, capped by the agent's maximum.
    pub timeout: Duration,
    /// A directory for this attempt only; created fresh before `run`.
    pub dir: PathBuf,
    /// The local account the job runs as (from the site policy's identity mapping); `None`: the
    /// agent's own account.
    pub run_as: Option<LocalAccount>,
    /// Keep the job directory after the job (the agent's `keep_job_dirs`).
    pub keep_dir: bool,
    /// The lease the job runs under and how often it is renewed (kept by executors that can
    /// re-attach, so a restarted agent can renew it).
    pub lease: String,
    pub heartbeat_interval_ms: u64,
    /// Its place in its batch, when it is a run of one.
    pub batch: Option<testbot_proto::batches::BatchPlace>,
}

impl JobContext {
    /// The `TESTBOT_*` variables every executor gives a job, whatever runs it: which job and
    /// attempt, which agent, and its place in its batch (`TESTBOT_BATCH_RUN` counts from 1, so
    /// a test can fail on chosen runs). Where the workspace is differs by executor and is set
    /// by each.
    pub fn testbot_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("CI", "true".to_string()),
            ("TESTBOT", "true".to_string()),
            ("TESTBOT_JOB_ID", self.id.to_string()),
            ("TESTBOT_ATTEMPT", self.attempt.to_string()),
            ("TESTBOT_AGENT", self.agent.clone()),
        ];
        if let Some(place) = &self.batch {
            env.push(("TESTBOT_BATCH_ID", place.batch.to_string()));
            env.push(("TESTBOT_BATCH_RUN", place.run.to_string()));
            env.push(("TESTBOT_BATCH_RUNS", place.runs.to_string()));
        }
        env
    }
}

/// How a job's process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    Exited(i32),
    Signalled(i32),
    TimedOut(Duration),
    /// Stopped because the stop token was cancelled.
    Stopped,
    /// Ended by its scheduler for a reason of its own (out of memory, node failure, preempted).
    Failed {
        state: testbot_proto::jobs::JobState,
        cause: testbot_proto::results::FailureCause,
        reason: String,
    },
}

/// One line of output, stamped when it was read.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub ts_ms: i64,
    pub stream: Stream,
    pub text: String,
    /// For output read from a file: the file position just after this line. Once the broker has
    /// acknowledged the line, the executor is told ([`Executor::checkpoint`]), so a restarted
    /// agent resumes reading exactly there.
    pub mark: Option<u64>,
    /// Not a line but a fact about the job for the broker (`key`, `value`), e.g. its Slurm job
    /// id; shown to users with the job.
    pub metadata: Option<(String, String)>,
    /// Not a line but a marker: notified once every fact sent before it has been delivered
    /// ([`LogSink::facts_delivered`]).
    pub barrier: Option<std::sync::Arc<tokio::sync::Notify>>,
}

/// File positions whose lines the broker has acknowledged, and the log size they make.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub log_offset: u64,
    pub stdout_pos: Option<u64>,
    pub stderr_pos: Option<u64>,
}

/// The longest [`LogSink::facts_delivered`] waits.
pub const FACTS_WAIT: Duration = Duration::from_secs(10);

/// Where an executor writes a job's output. Bounded: a job that prints faster than the broker
/// takes its log is slowed down rather than buffered without limit.
#[derive(Debug, Clone)]
pub struct LogSink {
    tx: mpsc::Sender<LogRecord>,
}

impl LogSink {
    pub fn new(capacity: usize) -> (LogSink, mpsc::Receiver<LogRecord>) {
        let (tx, rx) = mpsc::channel(capacity);
        (LogSink { tx }, rx)
    }

    pub async fn line(&self, stream: Stream, text: impl Into<String>) {
        self.send(stream, text.into(), None).await;
    }

    /// A line read from a file, ending at byte `pos` of it.
    pub async fn file_line(&self, stream: Stream, text: impl Into<String>, pos: u64) {
        self.send(stream, text.into(), Some(pos)).await;
    }

    async fn send(&self, stream: Stream, text: String, mark: Option<u64>) {
        let record = LogRecord {
            ts_ms: testbot_proto::now_ms(),
            stream,
            text,
            mark,
            metadata: None,
            barrier: None,
        };
        // The receiver is gone only when shipping stopped for good; the line has nowhere to go.
        let _ = self.tx.send(record).await;
    }

    /// Records a fact about the job with the broker (`slurm_job_id`, ...).
    pub async fn metadata(&self, key: &str, value: impl Into<String>) {
        let record = LogRecord {
            ts_ms: testbot_proto::now_ms(),
            stream: Stream::System,
            text: String::new(),
            mark: None,
            metadata: Some((key.to_string(), value.into())),
            barrier: None,
        };
        let _ = self.tx.send(record).await;
    }

    /// Waits (up to [`FACTS_WAIT`]) until the broker has every fact recorded before this call,
    /// e.g. the Slurm nodes a job ran on, which its test statistics count by.
    pub async fn facts_delivered(&self) {
        let barrier = std::sync::Arc::new(tokio::sync::Notify::new());
        let record = LogRecord {
            ts_ms: testbot_proto::now_ms(),
            stream: Stream::System,
            text: String::new(),
            mark: None,
            metadata: None,
            barrier: Some(barrier.clone()),
        };
        if self.tx.send(record).await.is_ok() {
            let _ = tokio::time::timeout(FACTS_WAIT, barrier.notified()).await;
        }
    }

    pub async fn system(&self, text: impl Into<String>) {
        self.line(Stream::System, format!("testbot: {}", text.into()))
            .await;
    }
}

/// A way of running jobs.
pub trait Executor: Send + Sync + 'static {
    /// The name agents advertise (`shell`, `noop`, ...).
    fn name(&self) -> &'static str;

    /// Called once when the agent starts, before it enrolls or polls: connects to what the
    /// executor drives and checks it may, so a misconfigured agent stops at once with the
    /// reason instead of failing every job. Default: nothing to check.
    fn prepare<'a>(&'a self) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Runs the job until it ends, its timeout passes, or `stop` is cancelled.
    fn run<'a>(
        &'a self,
        job: &'a JobContext,
        log: LogSink,
        stop: CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<ExecOutcome>>;

    /// Releases whatever `run` left behind. Called after every `run`, whatever its result,
    /// once the result is reported.
    fn cleanup<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, ()>;

    /// The job's workspace as the agent sees it once the script has ended, where its result
    /// files are collected from. Default: `workspace` in the job's directory. None: the
    /// workspace is not on the agent's machine (a pod's), or there is none.
    fn workspace(&self, job: &JobContext) -> Option<std::path::PathBuf> {
        Some(job.dir.join("workspace"))
    }

    /// Where an executor whose jobs outlive the agent (Slurm jobs, containers, Kubernetes Jobs)
    /// keeps a record of each, to re-attach after a restart. Default: none.
    fn records(&self) -> Option<&records::JobRecords> {
        None
    }

    /// The broker has stored the job's log up to `checkpoint`: recorded in the executor's
    /// [`Executor::records`], so a restarted agent resumes there.
    fn checkpoint(&self, job: &JobContext, checkpoint: Checkpoint) {
        if let Some(records) = self.records() {
            records.checkpoint(job.id, checkpoint);
        }
    }

    /// A chunk of the log is about to be sent; `checkpoint` is where the broker's log and the
    /// positions will be once it has it. Recorded beside the acknowledged checkpoint, so an agent
    /// killed after the broker took the chunk but before [`Executor::checkpoint`] resumes after it
    /// rather than sending its lines again (see [`Executor::settle`]).
    fn sending(&self, job: &JobContext, checkpoint: Checkpoint) {
        if let Some(records) = self.records() {
            records.sending(job.id, checkpoint);
        }
    }

    /// Before a detached job is resumed: the broker's log of it is `log_bytes` long. If that is
    /// the end of the chunk that was being sent, the broker has it, and its positions count.
    fn settle(&self, job: JobId, log_bytes: u64) {
        if let Some(records) = self.records() {
            records.settle(job, log_bytes);
        }
    }

    /// Called once when the agent starts, before [`Executor::detached`]: clean up what a crash
    /// left behind that no record explains (containers of forgotten jobs). Default: nothing.
    fn reap<'a>(&'a self) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Jobs this executor was running when the agent stopped, which it can pick up again: those
    /// in its [`Executor::records`].
    fn detached(&self) -> Vec<Detached> {
        self.records()
            .map(|records| records.all().into_iter().map(|r| r.job).collect())
            .unwrap_or_default()
    }

    /// Follows a detached job to its end, as `run` would have (only for executors whose
    /// [`Executor::detached`] returns jobs).
    fn resume<'a>(
        &'a self,
        _job: &'a JobContext,
        _log: LogSink,
        _stop: CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<ExecOutcome>> {
        Box::pin(async { anyhow::bail!("this executor cannot resume jobs") })
    }

    /// Gives up a detached job whose lease is gone (the broker handed it on): stops whatever
    /// still runs for it and forgets it.
    fn abandon<'a>(&'a self, _job: &'a Detached) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// A job an executor was running when the agent stopped: enough to renew its lease, resume its
/// log where the broker has it, and report its result.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Detached {
    pub job_id: JobId,
    pub attempt: u32,
    pub lease: String,
    pub heartbeat_interval_ms: u64,
    /// Where the broker's copy of the log ends.
    pub log_offset: u64,
    pub spec: JobSpec,
    pub timeout: Duration,
    pub dir: PathBuf,
    pub run_as: Option<String>,
}

/// The `PATH` programs are looked up in when the agent's own environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where `program` is, looked up in the agent's own `PATH` (set by the operator), never in a
/// job's: a job that sets `PATH` must not choose what the agent starts as root.
pub fn find_program(program: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .with_context(|| {
            format!(
                "Cannot find {program} in the agent's PATH ({}): install it or add its directory to the PATH the agent starts with",
                path.to_string_lossy()
            )
        })
}

/// A command for `program` that runs as the job's account, with an empty environment (the
/// caller adds what the job gets).
///
/// The program is found in the agent's own `PATH` ([`find_program`]). The account switch
/// (supplementary groups of the account, not the agent's; then gid; then uid) happens in the
/// child between fork and exec, so nothing runs as root with the job's environment: variables
/// such as `LD_PRELOAD` or `PATH` only take effect at the exec, as the job's account. When
/// `cgroup_procs` is given (a job cgroup's `cgroup.procs`, opened by the agent), the child moves
/// itself into that cgroup first, before it can start anything that would escape it. The agent's
/// own account needs no switch.
///
/// An agent that is not root but holds capabilities (the systemd unit gives it the few it needs
/// as ambient capabilities) would pass them on: a uid change from a non-root uid keeps them, and
/// ambient capabilities survive `exec`. The child therefore clears its ambient set before the
/// exec, so the program starts with none.
pub fn command_as(
    job: &JobContext,
    program: &str,
    cgroup_procs: Option<std::fs::File>,
) -> anyhow::Result<tokio::process::Command> {
    let mut command = tokio::process::Command::new(find_program(program)?);
    command.env_clear();
    let switch = match switches_account(job) {
        Some(account) => {
            let name = std::ffi::CString::new(account.name.as_str())
                .context("an account name with a NUL byte")?;
            let groups = nix::unistd::getgrouplist(&name, account.gid)
                .with_context(|| format!("Cannot read the groups of account {}", account.name))?;
            Some((account.uid, account.gid, groups))
        }
        None => None,
    };
    pre_exec_confine(&mut command, cgroup_procs, switch);
    Ok(command)
}

/// Runs in the forked child before exec: joins the job's cgroup, then drops to the account.
/// Only async-signal-safe calls (write, setgroups, setgid, setuid, prctl), as the agent is
/// multi-threaded.
#[allow(unsafe_code)]
fn pre_exec_confine(
    command: &mut tokio::process::Command,
    cgroup_procs: Option<std::fs::File>,
    switch: Option<(nix::unistd::Uid, nix::unistd::Gid, Vec<nix::unistd::Gid>)>,
) {
    let hook = move || -> std::io::Result<()> {
        if let Some(procs) = &cgroup_procs {
            use std::io::Write as _;
            // "0" moves the writing process itself.
            (&*procs).write_all(b"0")?;
        }
        if let Some((uid, gid, groups)) = &switch {
            nix::unistd::setgroups(groups)?;
            nix::unistd::setgid(*gid)?;
            nix::unistd::setuid(*uid)?;
        }
        // Whatever the agent holds as ambient capabilities must not cross the exec.
        // SAFETY: prctl with integer arguments only; no memory is passed.
        let cleared = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if cleared != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook allocates nothing and makes only async-signal-safe system calls on data
    // prepared before the fork (an open file, ids and a group list).
    unsafe {
        command.pre_exec(hook);
    }
}

/// Removes the job directory unless the agent keeps job directories.
pub async fn remove_job_dir(job: &JobContext) {
    if job.keep_dir {
        return;
    }
    if let Err(err) = tokio::fs::remove_dir_all(&job.dir).await
        && err.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(job_id = %job.id, dir = %job.dir.display(), ?err, "Cannot remove the job directory.");
    }
}

/// Whether the job must switch to another account than the agent's own.
pub fn switches_account(job: &JobContext) -> Option<&LocalAccount> {
    job.run_as
        .as_ref()
        .filter(|account| account.uid != nix::unistd::geteuid())
}

/// Gives the job directory and everything in it to `account`, so the job can write there and
/// leaves no files the account cannot remove. Needs root or `CAP_CHOWN`; any other agent must
/// run jobs as itself.
///
/// Everything is listed while the directory still belongs to the agent (mode 0700, so no other
/// account can reach into it), then given away deepest first and the directory itself last: a
/// process of the account that is already running cannot swap an entry for a symbolic link
/// half-way and have the agent follow it.
pub fn hand_over(
    dir: &std::path::Path,
    account: &crate::identity::LocalAccount,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root() || has_capability(CAP_CHOWN),
        "the site policy maps this job to account {} (uid {}), but the agent runs as uid {} without the capabilities to switch accounts: run the agent as root or with CAP_SETUID, CAP_SETGID, CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER and CAP_KILL (packaging/systemd/testbot-agent.service)",
        account.name,
        account.uid,
        nix::unistd::geteuid()
    );
    let (uid, gid) = (Some(account.uid.as_raw()), Some(account.gid.as_raw()));
    let mut listed = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path)
            .with_context(|| format!("Cannot read {}", path.display()))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
        listed.push(path);
    }
    for path in listed.iter().rev() {
        std::os::unix::fs::lchown(path, uid, gid)
            .with_context(|| format!("Cannot give {} to {}", path.display(), account.name))?;
    }
    Ok(())
}

/// Creates an empty directory at `dir` (mode 0700, whatever the umask), removing what a previous
/// attempt left there.
pub async fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("Cannot clear {}", dir.display())),
    }
    if let Some(parent) = dir.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .with_context(|| format!("Cannot create {}", parent.display()))?;
    }
    private_dir(dir)
}

/// Creates the directory `path` with mode 0700; it must not exist yet (a job directory is fresh,
/// so anything already there is not the agent's).
pub fn private_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .with_context(|| format!("Cannot create {}", path.display()))
}

/// The job's `workspace/`: created empty (mode 0700), or kept as the agent left it when it
/// checked out the job's commit there (the job directory is fresh and still the agent's, so
/// nothing else can have made it).
pub fn workspace_dir(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => anyhow::bail!("{} is not a directory", path.display()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => private_dir(path),
        Err(err) => Err(err).with_context(|| format!("Cannot read {}", path.display())),
    }
}

/// Writes a new file into a job directory before it is handed over: created, never opened if
/// something is already there, with mode 0600 whatever the umask.
pub fn write_new_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .with_context(|| format!("Cannot create {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("Cannot write {}", path.display()))
}

/// Why a file in a job's directory was not opened.
#[derive(Debug)]
pub enum JobFileError {
    /// There is no such file (not yet, or no more).
    Missing,
    /// The file is not one the agent may read for the job: what it is instead, as a phrase
    /// ("it is a symbolic link").
    Refused(String),
    Io(std::io::Error),
}

/// Opens a file the agent reads in a directory the job's account owns, where the job may have
/// put anything in its place: a symbolic link is never followed (it could point at a key only
/// the agent may read), nothing blocks (a FIFO would hold the agent forever), and only a regular
/// file owned by `owner` is accepted (not a device such as `/dev/zero`, nor a hard link to
/// someone else's file).
pub fn open_job_file(path: &Path, owner: nix::unistd::Uid) -> Result<std::fs::File, JobFileError> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _};
    let flags =
        nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)
    {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(JobFileError::Missing);
        }
        Err(err) if err.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) => {
            return Err(JobFileError::Refused("it is a symbolic link".into()));
        }
        Err(err) => return Err(JobFileError::Io(err)),
    };
    let meta = file.metadata().map_err(JobFileError::Io)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(JobFileError::Refused(format!(
            "it is {what}, not a regular file"
        )));
    }
    if meta.uid() != owner.as_raw() {
        return Err(JobFileError::Refused(format!(
            "it belongs to uid {}, not to the job's account (uid {owner})",
            meta.uid()
        )));
    }
    Ok(file)
}

/// The uid that owns the files of a job's directory once it is handed over: the job's account,
/// or the agent's own.
pub fn job_owner(job: &JobContext) -> nix::unistd::Uid {
    job.run_as
        .as_ref()
        .map_or_else(nix::unistd::geteuid, |account| account.uid)
}

/// Linux capability numbers the agent checks for (`capabilities(7)`).
pub const CAP_CHOWN: u32 = 0;
pub const CAP_SETUID: u32 = 7;

/// Whether the agent holds a capability in its effective set (read from `/proc/self/status`).
pub fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|set| set & (1 << cap) != 0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[tokio::test]
    async fn job_directories_and_their_files_are_private_whatever_the_umask() {
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("jobs").join("job-1-1");
        fresh_dir(&job).await.unwrap();
        private_dir(&job.join("workspace")).unwrap();
        write_new_file(&job.join("script.sh"), b"true").unwrap();
        nix::sys::stat::umask(old);
        assert_eq!(mode(&job), 0o700);
        assert_eq!(mode(&job.join("workspace")), 0o700);
        assert_eq!(mode(&job.join("script.sh")), 0o600);

        // What is already there is never opened: a link planted where a file is to be written.
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "untouched").unwrap();
        std::os::unix::fs::symlink(&target, job.join("stdout.log")).unwrap();
        assert!(write_new_file(&job.join("stdout.log"), b"").is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        // A second attempt starts from an empty directory again.
        fresh_dir(&job).await.unwrap();
        assert_eq!(std::fs::read_dir(&job).unwrap().count(), 0);
        assert_eq!(mode(&job), 0o700);
    }
}
