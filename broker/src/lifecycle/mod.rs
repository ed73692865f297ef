//! The job lifecycle: every change of a job's state, what it means, and who hears of it.
//!
//! Handlers and the sweeper change jobs only through [`jobs`]: each operation asks the store to
//! apply one change and publishes it once on the [`events::EventBus`]; log followers, held
//! heartbeats, waiting polls (and whatever subscribes later) hear of it there.
//!
//! Layout:
//! - [`admission`]: whether a workflow may submit a job, and to which sites.
//! - [`jobs`]: the operations (submit, claim, start, append, finish, cancel, hand back, expire).
//! - [`transitions`]: the decisions: what an expired lease or a hand-back means, and how the
//!   `testbot:` system lines in a job's log read.
//! - [`events`]: the job-event bus.
//! - [`watch`]: per-job wake-ups for log followers and held heartbeats.
//! - [`dispatch`]: waking the one waiting poll that may take a queued job.
//! - [`batches`]: stopping a batch once its runs can say what its stopping rule asks.
//! - [`results`]: reading uploaded result files, and test results read back as cases and
//!   histories.

pub mod admission;
pub mod batches;
pub mod dispatch;
pub mod events;
pub mod jobs;
pub mod results;
pub mod transitions;
pub mod watch;
