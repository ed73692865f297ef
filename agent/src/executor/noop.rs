//! The no-op executor: runs nothing and succeeds. It isolates the broker and protocol in
//! benchmarks.

use tokio_util::sync::CancellationToken;

use super::{BoxFuture, ExecOutcome, Executor, JobContext, LogSink};

#[derive(Debug, Default)]
pub struct NoopExecutor;

impl Executor for NoopExecutor {
    fn name(&self) -> &'static str {
        "noop"
    }

    fn run<'a>(
        &'a self,
        _job: &'a JobContext,
        _log: LogSink,
        _stop: CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<ExecOutcome>> {
        Box::pin(async { Ok(ExecOutcome::Exited(0)) })
    }

    fn cleanup<'a>(&'a self, _job: &'a JobContext) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn workspace(&self, _job: &JobContext) -> Option<std::path::PathBuf> {
        None
    }
}
