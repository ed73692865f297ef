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

/// How recently an agent must have asked for work to count as online.
pub const ONLINE_WITHIN_MS: i64 = 60_000;

/// Agents that are not revoked and have asked for work within [`ONLINE_WITHIN_MS`]: how wide a
/// bisection round may spread, and what the history filler may fill.
pub async fn online_agents(state: &crate::state::AppState) -> crate::store::StoreResult<usize> {
    let recent = testbot_proto::now_ms() - ONLINE_WITHIN_MS;
    Ok(state
        .store
        .agents()
        .await?
        .iter()
        .filter(|a| a.revoked_at_ms.is_none() && a.last_seen_ms.is_some_and(|at| at >= recent))
        .count())
}
