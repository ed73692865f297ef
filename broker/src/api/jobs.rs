//! Jobs: submit, list, read, cancel.

use axum::extract::State;
use axum::http::StatusCode;
use secrecy::ExposeSecret as _;
use testbot_proto::jobs::{Job, JobId, JobList, JobListQuery, JobSpec, validate_word};

use super::{find_job, replayed, to_job};
use crate::access::{JobAccess, authorize_job_access};
use crate::auth::Principal;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::lifecycle::{admission, jobs};
use crate::state::AppState;
use crate::store::JobOrigin;

pub(super) async fn submit_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(spec): ApiJson<JobSpec>,
) -> Result<(StatusCode, axum::Json<Job>), ApiError> {
    spec.validate()
        .map_err(|e| ApiError::BadRequest(format!("invalid job: {e}")))?;
    let (origin, jti) = origin_of(&state, &principal, &spec, 1).await?;
    let model = jobs::submit(&state, &spec, &origin, jti)
        .await?
        .ok_or_else(|| replayed(jti))?;
    tracing::debug!(job_id = model.id, "Job queued.");
    if let Principal::Workflow { claims, .. } = &principal {
        crate::github::jobs::add_workflow_check_run(&state, &model, claims).await;
    }
    Ok((StatusCode::CREATED, axum::Json(to_job(&model)?)))
}

/// Who submits `runs` jobs of `spec`, once admitted: an operator, or a workflow whose
/// repository and event may submit them (its token's id is recorded with them).
pub(super) async fn origin_of<'p>(
    state: &AppState,
    principal: &'p Principal,
    spec: &JobSpec,
    runs: u32,
) -> Result<(JobOrigin, Option<(&'p str, i64)>), ApiError> {
    match principal {
        Principal::Operator { .. } => Ok((
            JobOrigin {
                submitted_by: principal.describe(),
                ..JobOrigin::default()
            },
            None,
        )),
        Principal::Workflow { claims, token } => {
            let sites = admission::admit_workflow_job(state, claims, spec, runs).await?;
            Ok((
                JobOrigin {
                    repository: Some(claims.repository.clone()),
                    run_id: Some(claims.run_id.clone()),
                    submitted_by: principal.describe(),
                    oidc_token: Some(token.expose_secret().to_string()),
                    sites,
                    public: claims.repository_visibility.as_deref() == Some("public"),
                    commit_sha: Some(claims.sha.clone()),
                    git_ref: Some(claims.git_ref.clone()),
                    // A workflow waits on its job, whatever its event.
                    priority: crate::store::Priority::Interactive,
                },
                Some((claims.jti.as_str(), claims.exp)),
            ))
        }
        other => Err(ApiError::Forbidden(format!(
            "submitting jobs needs a workflow OIDC token or an operator token; {} was given",
            match other {
                Principal::Agent(_) => "an agent's signature",
                _ => "a GitHub user token",
            }
        ))),
    }
}

pub(super) async fn list_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<JobListQuery>,
) -> Result<axum::Json<JobList>, ApiError> {
    principal.require_operator()?;
    let limit = query.limit.unwrap_or(50).clamp(1, 1000);
    if let Some(site) = &query.site {
        validate_word("site", site).map_err(ApiError::BadRequest)?;
    }
    let models = state
        .store
        .jobs(query.state, query.site.as_deref(), limit)
        .await?;
    let jobs = models.iter().map(to_job).collect::<Result<_, _>>()?;
    Ok(axum::Json(JobList { jobs }))
}

pub(super) async fn job_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
) -> Result<axum::Json<Job>, ApiError> {
    let job = find_job(&state, id).await?;
    authorize_job_access(&state, &principal, &job, JobAccess::Read).await?;
    let mut job = to_job(&job)?;
    if job.state == testbot_proto::jobs::JobState::Queued {
        job.waiting = crate::routing::why_waiting(&state, id).await?;
    }
    Ok(axum::Json(job))
}

pub(super) async fn cancel_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
) -> Result<axum::Json<Job>, ApiError> {
    authorize_job_access(
        &state,
        &principal,
        &find_job(&state, id).await?,
        JobAccess::Cancel,
    )
    .await?;
    let model = jobs::cancel(&state, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("job {id} does not exist")))?;
    tracing::info!(job_id = %id, state = %model.state(), "Cancel requested.");
    Ok(axum::Json(to_job(&model)?))
}
