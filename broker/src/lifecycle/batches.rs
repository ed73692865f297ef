//! Batches with a stopping rule (`testbot run --until-confidence 0.95 --max-rate 0.01`): after
//! each run ends, its batch's runs are judged, and once they can say whether the job's failure
//! rate is below the threshold, the runs not needed are cancelled.
//!
//! Every broker sharing the database hears every run end, so each may judge and cancel; a
//! cancel is idempotent. A broker that was down when a run ended judges at the next end.

use testbot_proto::batches::{Batch, BatchTotals, Verdict};
use testbot_proto::jobs::JobId;
use tokio::sync::broadcast::error::RecvError;

use super::events::JobChange;
use super::jobs;
use crate::state::AppState;
use crate::store::StoreResult;

/// Runs until shutdown.
pub async fn run_stopper(state: AppState) {
    let mut events = state.bus.subscribe();
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = state.shutdown.cancelled() => return,
        };
        match event {
            Ok(event) if matches!(event.change, JobChange::Finished { .. }) => {
                if let Err(err) = judge_after(&state, event.id).await {
                    tracing::warn!(job_id = %event.id, ?err, "Cannot judge the job's batch.");
                }
            }
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

/// Judges the batch of job `id`, if it has a stopping rule, and cancels its runs that have not
/// ended once the verdict is in.
async fn judge_after(state: &AppState, id: JobId) -> StoreResult<()> {
    let Some(place) = state.store.job(id).await?.and_then(|m| m.batch_place()) else {
        return Ok(());
    };
    let Some(batch) = state.store.batch(place.batch).await? else {
        return Ok(());
    };
    let Some(until) = batch.until() else {
        return Ok(());
    };
    let models = state.store.batch_jobs(place.batch).await?;
    let runs: Vec<_> = models.iter().filter_map(|m| m.to_job().ok()).collect();
    let verdict = Batch::judge(&until, &BatchTotals::of(&runs));
    if verdict.verdict == Verdict::Undecided {
        return Ok(());
    }
    let open: Vec<JobId> = models
        .iter()
        .filter(|m| !m.state().is_terminal())
        .map(|m| m.job_id())
        .collect();
    if open.is_empty() {
        return Ok(());
    }
    tracing::info!(
        batch_id = %place.batch,
        verdict = ?verdict.verdict,
        runs = verdict.runs,
        failures = verdict.failures,
        cancelling = open.len(),
        "The batch's runs can say; cancelling the rest."
    );
    for id in open {
        jobs::cancel(state, id).await?;
    }
    Ok(())
}
