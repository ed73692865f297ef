//! Batches: submit N runs of one job, read them counted, cancel them all.

use axum::extract::State;
use axum::http::StatusCode;
use testbot_proto::batches::{Batch, BatchId, BatchRequest, BatchTotals};

use super::jobs::origin_of;
use super::{replayed, to_job};
use crate::access::{JobAccess, authorize_job_access};
use crate::auth::Principal;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::lifecycle::jobs;
use crate::state::AppState;
use crate::store::{BatchModel, JobModel};

pub(super) async fn submit_batch_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(request): ApiJson<BatchRequest>,
) -> Result<(StatusCode, axum::Json<Batch>), ApiError> {
    request
        .validate()
        .map_err(|e| ApiError::BadRequest(format!("invalid batch: {e}")))?;
    let (origin, jti) = origin_of(&state, &principal, &request.spec, request.runs).await?;
    let (batch, models) = jobs::submit_batch(
        &state,
        &request.spec,
        &origin,
        jti,
        request.runs,
        request.until,
    )
    .await?
    .ok_or_else(|| replayed(jti))?;
    tracing::info!(batch_id = batch.id, runs = request.runs, "Batch queued.");
    if let Principal::Workflow { claims, .. } = &principal {
        for model in &models {
            crate::github::jobs::add_workflow_check_run(&state, model, claims).await;
        }
    }
    Ok((StatusCode::CREATED, axum::Json(view(&batch, &models)?)))
}

pub(super) async fn batch_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<BatchId>,
) -> Result<axum::Json<Batch>, ApiError> {
    let (batch, models) = readable_batch(&state, &principal, id, JobAccess::Read).await?;
    Ok(axum::Json(view(&batch, &models)?))
}

/// Cancels every run that has not ended: queued runs end at once, running ones are stopped.
pub(super) async fn cancel_batch_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<BatchId>,
) -> Result<axum::Json<Batch>, ApiError> {
    let (batch, models) = readable_batch(&state, &principal, id, JobAccess::Cancel).await?;
    for model in &models {
        if !model.state().is_terminal() {
            jobs::cancel(&state, model.job_id()).await?;
        }
    }
    let models = state.store.batch_jobs(id).await?;
    Ok(axum::Json(view(&batch, &models)?))
}

/// The batch and its runs, if `principal` may `access` them: the runs share who submitted
/// them, so the first run answers for all.
pub(super) async fn readable_batch(
    state: &AppState,
    principal: &Principal,
    id: BatchId,
    access: JobAccess,
) -> Result<(BatchModel, Vec<JobModel>), ApiError> {
    let not_found = || ApiError::NotFound(format!("batch {id} does not exist"));
    let batch = state.store.batch(id).await?.ok_or_else(not_found)?;
    let models = state.store.batch_jobs(id).await?;
    let first = models.first().ok_or_else(not_found)?;
    authorize_job_access(state, principal, first, access).await?;
    Ok((batch, models))
}

fn view(batch: &BatchModel, models: &[JobModel]) -> Result<Batch, ApiError> {
    let jobs = models.iter().map(to_job).collect::<Result<Vec<_>, _>>()?;
    let totals = BatchTotals::of(&jobs);
    let until = batch.until();
    Ok(Batch {
        id: BatchId(batch.id),
        runs: batch.runs.clamp(0, i64::from(u32::MAX)) as u32,
        submitted_by: batch.submitted_by.clone(),
        repository: batch.repository.clone(),
        created_at_ms: batch.created_at_ms,
        verdict: until.map(|until| Batch::judge(&until, &totals)),
        until,
        totals,
        jobs,
    })
}
