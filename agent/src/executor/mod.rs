//! Executors: how a job's script actually runs.
//!
//! Every executor implements [`Executor`]: a cancellable `run` that streams output into a
//! [`LogSink`] and reports how the job ended, and an always-called `cleanup`.

mod noop;
mod shell;

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

pub use noop::NoopExecutor;
pub use shell::ShellExecutor;

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
}

/// How a job's process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    Exited(i32),
    Signalled(i32),
    TimedOut(Duration),
    /// Stopped because the stop token was cancelled.
    Stopped,
}

/// One line of output, stamped when it was read.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub ts_ms: i64,
    pub stream: Stream,
    pub text: String,
}

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
        let record = LogRecord {
            ts_ms: testbot_proto::now_ms(),
            stream,
            text: text.into(),
        };
        // The receiver is gone only when shipping stopped for good; the line has nowhere to go.
        let _ = self.tx.send(record).await;
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

    /// Runs the job until it ends, its timeout passes, or `stop` is cancelled.
    fn run<'a>(
        &'a self,
        job: &'a JobContext,
        log: LogSink,
        stop: CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<ExecOutcome>>;

    /// Releases whatever `run` left behind. Called after every `run`, whatever its result.
    fn cleanup<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, ()>;
}

/// Creates an empty directory at `dir`, removing what a previous attempt left there.
pub async fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("Cannot clear {}", dir.display())),
    }
    tokio::fs::create_dir_all(dir)
        .await
        .with_context(|| format!("Cannot create {}", dir.display()))
}
