//! The operations that change a job: each asks the store for one change and publishes it.

use std::sync::Arc;

use testbot_proto::jobs::{JobId, JobSpec, JobState};
use testbot_proto::now_ms;
use testbot_proto::results::Outcome;

use super::events::JobChange;
use super::transitions;
use crate::state::AppState;
use crate::store::{
    AppendResult, JobModel, JobOrigin, JobTaker, LeaseRefusal, LeaseRenewal, Release, StoreResult,
};

/// Publishes that `id` is queued (`again`: after a lost lease or a hand-back), with the job as
/// routing reads it so the dispatcher can wake an agent that may take it.
async fn publish_queued(state: &AppState, id: JobId, again: bool) {
    match state.store.routed_job(id).await {
        Ok(Some(job)) => state.bus.publish(
            id,
            JobChange::Queued {
                job: Arc::new(job),
                again,
            },
        ),
        Ok(None) => {}
        Err(err) => tracing::error!(job_id = %id, ?err, "Cannot read a queued job for routing."),
    }
}

/// Publishes where a job that left its lease went: queued again, or ended.
async fn publish_lease_end(state: &AppState, job: &JobModel) {
    match job.state() {
        JobState::Queued => publish_queued(state, job.job_id(), true).await,
        ended => state
            .bus
            .publish(job.job_id(), JobChange::Finished { state: ended }),
    }
}

/// Queues a job. `None`: the token `jti` was used before, nothing was stored.
pub async fn submit(
    state: &AppState,
    spec: &JobSpec,
    origin: &JobOrigin,
    jti: Option<(&str, i64)>,
) -> StoreResult<Option<JobModel>> {
    let Some(model) = state.store.insert_job(spec, origin, jti).await? else {
        return Ok(None);
    };
    publish_queued(state, model.job_id(), false).await;
    Ok(Some(model))
}

/// Queues `runs` runs of `spec` as one batch. `None`: the token was used already.
pub async fn submit_batch(
    state: &AppState,
    spec: &JobSpec,
    origin: &JobOrigin,
    jti: Option<(&str, i64)>,
    runs: u32,
    until: Option<testbot_proto::batches::Until>,
) -> StoreResult<Option<(crate::store::BatchModel, Vec<JobModel>)>> {
    let Some((batch, models)) = state
        .store
        .insert_batch(spec, origin, jti, runs, until)
        .await?
    else {
        return Ok(None);
    };
    for model in &models {
        publish_queued(state, model.job_id(), false).await;
    }
    Ok(Some((batch, models)))
}

/// Queues a job of the GitHub App with its check-run record.
pub async fn submit_app_job(
    state: &AppState,
    spec: &JobSpec,
    origin: &JobOrigin,
    app: &crate::store::github::NewAppJob<'_>,
) -> StoreResult<JobModel> {
    let model = state.store.insert_app_job(spec, origin, app).await?;
    publish_queued(state, model.job_id(), false).await;
    Ok(model)
}

/// Queues the runs of a batch of App jobs, each with its check-run record.
pub async fn submit_app_batch(
    state: &AppState,
    spec: &JobSpec,
    origin: &JobOrigin,
    apps: &[crate::store::github::NewAppJob<'_>],
) -> StoreResult<Vec<JobModel>> {
    let (_, models) = state.store.insert_app_batch(spec, origin, apps).await?;
    for model in &models {
        publish_queued(state, model.job_id(), false).await;
    }
    Ok(models)
}

/// Claims the oldest queued job `taker` may run, under `lease`.
pub async fn claim(
    state: &AppState,
    taker: &JobTaker<'_>,
    lease: &str,
    lease_expires_at_ms: i64,
) -> StoreResult<Option<JobModel>> {
    let claimed = state
        .store
        .claim_job(taker, lease, lease_expires_at_ms)
        .await?;
    if let Some(model) = &claimed {
        state.bus.publish(
            model.job_id(),
            JobChange::Assigned {
                agent: taker.agent.to_string(),
            },
        );
    }
    Ok(claimed)
}

/// The agent started the job under `lease`.
pub async fn start(
    state: &AppState,
    id: JobId,
    lease: &str,
    lease_expires_at_ms: i64,
) -> StoreResult<Result<LeaseRenewal, LeaseRefusal>> {
    let started = state
        .store
        .start_job(id, lease, lease_expires_at_ms)
        .await?;
    if started.is_ok() {
        state.bus.publish(id, JobChange::Started);
    }
    Ok(started)
}

/// Appends a chunk to the job's log (see [`crate::store::Store::append_log`]).
pub async fn append_log(
    state: &AppState,
    id: JobId,
    lease: &str,
    offset: u64,
    data: &[u8],
) -> StoreResult<AppendResult> {
    let max_log_bytes = state.settings.max_log_bytes;
    let result = state
        .store
        .append_log(id, lease, offset, data, max_log_bytes, &|kept| {
            transitions::log_cut(max_log_bytes, kept, now_ms())
        })
        .await?;
    match result {
        // A re-sent chunk adds nothing, but waking followers for it costs them one read.
        AppendResult::Appended(log_bytes) | AppendResult::TooLarge { log_bytes } => {
            state.bus.publish(id, JobChange::LogAppended { log_bytes })
        }
        AppendResult::Refused(_) | AppendResult::Gap { .. } => {}
    }
    Ok(result)
}

/// Records the job's one result, from the agent holding `lease`.
pub async fn finish(
    state: &AppState,
    id: JobId,
    lease: &str,
    outcome: &Outcome,
) -> StoreResult<Result<JobModel, LeaseRefusal>> {
    let outcome = Outcome {
        reason: outcome.reason.as_deref().map(transitions::agent_text),
        ..outcome.clone()
    };
    let finished = state.store.finish_job(id, lease, &outcome).await?;
    if let Ok(model) = &finished {
        state.bus.publish(
            id,
            JobChange::Finished {
                state: model.state(),
            },
        );
    }
    Ok(finished)
}

/// Cancels a queued job at once, or asks the agent running it to stop. `None`: no such job.
pub async fn cancel(state: &AppState, id: JobId) -> StoreResult<Option<JobModel>> {
    let before = state.store.job(id).await?.map(|job| job.state());
    let Some(model) = state
        .store
        .request_cancel(id, &transitions::cancelled_before_start(now_ms()))
        .await?
    else {
        return Ok(None);
    };
    match (before, model.state()) {
        (Some(JobState::Queued), ended) if ended.is_terminal() => {
            state.bus.publish(id, JobChange::Finished { state: ended })
        }
        (_, JobState::Assigned | JobState::Running) => {
            state.bus.publish(id, JobChange::CancelRequested)
        }
        _ => {}
    }
    Ok(Some(model))
}

/// Hands a job back from the agent holding `release.lease` (see [`transitions::released`]).
pub async fn release(
    state: &AppState,
    id: JobId,
    release: &Release<'_>,
    requeue_reason: &str,
    final_reason: Option<&str>,
    max_releases: u32,
) -> StoreResult<Result<JobModel, LeaseRefusal>> {
    let at_ms = now_ms();
    let released = state
        .store
        .release_job(id, release, &|releases| {
            transitions::released(requeue_reason, final_reason, releases, max_releases, at_ms)
        })
        .await?;
    if let Ok(model) = &released {
        publish_lease_end(state, model).await;
    }
    Ok(released)
}

/// Ends every lease that ran out before `now_ms` as [`transitions::lease_expired`] says;
/// returns the jobs as they are now.
pub async fn expire_leases(state: &AppState, now_ms: i64) -> StoreResult<Vec<JobModel>> {
    let mut ended = Vec::new();
    for job in state.store.expired_leases(now_ms).await? {
        let Some(lease) = job.lease.as_deref() else {
            continue;
        };
        let to = transitions::lease_expired(&job, state.settings.max_attempts, now_ms);
        // Refused: the agent renewed, finished or handed the job back meanwhile.
        if let Ok(model) = state
            .store
            .expire_lease(job.job_id(), lease, now_ms, &to)
            .await?
        {
            publish_lease_end(state, &model).await;
            ended.push(model);
        }
    }
    Ok(ended)
}
