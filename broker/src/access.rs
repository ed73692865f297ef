//! What a workflow token may do besides submitting, and which repository it must come from.
//!
//! The token that submits a job travels with it: every agent that claims the job receives it, so
//! it must verify there. Such a *forwarded* token is therefore only as trusted as the least
//! trusted agent that ever claimed the job. The broker tells forwarded tokens apart by their
//! `jti`: a token that submitted a job (or created a registration) has its `jti` recorded. A
//! recorded token may afterwards read the one job it submitted (the action follows its log
//! with it) and nothing else: it cannot read or cancel the run's other jobs, and cannot cancel
//! its own. Cancelling takes a token whose `jti` was never recorded, that is one never handed to
//! an agent; the action requests a fresh one to cancel.
//!
//! A registration is bound to the GitHub repository it was made for by its ids
//! (`repository_id`, `repository_owner_id`), not only by `owner/name`: names are released when
//! a repository or its owner is renamed or deleted, and whoever takes the name next must not
//! inherit the registration.

use testbot_proto::oidc::WorkflowClaims;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{JobModel, RepoModel, RepositoryIds};

/// What a caller wants to do with a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAccess {
    /// See the job and its log.
    Read,
    /// Cancel it.
    Cancel,
}

/// Operators may do anything with every job; a workflow only with the jobs of its own run, and
/// only with a token that was not forwarded to agents (see the module documentation).
pub async fn authorize_job_access(
    state: &AppState,
    principal: &Principal,
    job: &JobModel,
    access: JobAccess,
) -> Result<(), ApiError> {
    let claims = match principal {
        Principal::Operator { .. } => return Ok(()),
        Principal::Workflow { claims, .. } => claims,
        other => return other.require_operator(),
    };
    if job.repository.as_deref() != Some(claims.repository.as_str())
        || job.run_id.as_deref() != Some(claims.run_id.as_str())
    {
        return Err(ApiError::Forbidden(format!(
            "job {} was not submitted by this workflow run ({}@{})",
            job.id, claims.repository, claims.run_id
        )));
    }
    if !state.store.jti_used(&claims.jti).await? {
        return Ok(());
    }
    let submitted_this_job =
        state.store.submit_jti(job.job_id()).await?.as_deref() == Some(claims.jti.as_str());
    match access {
        JobAccess::Read if submitted_this_job => Ok(()),
        JobAccess::Read => Err(ApiError::Forbidden(format!(
            "this token was used already (it submitted another job, which hands it to the agents \
             that run it), so it may read only that job, not job {}; request a fresh token",
            job.id
        ))),
        JobAccess::Cancel => Err(ApiError::Forbidden(format!(
            "this token was used already (submitting a job hands it to the agents that run it), \
             so it cannot cancel job {}; cancel with a fresh token of the run",
            job.id
        ))),
    }
}

/// Refuses a token whose repository ids differ from those the registration is bound to. A
/// registration made without ids (by the operator) is bound to the ids of the first token that
/// uses it.
pub async fn check_repository_ids(
    state: &AppState,
    repo: &RepoModel,
    claims: &WorkflowClaims,
) -> Result<(), ApiError> {
    let presented = RepositoryIds {
        repository_id: claims.repository_id.clone(),
        repository_owner_id: claims.repository_owner_id.clone(),
    };
    let bound = match repo.ids() {
        Some(ids) => ids,
        None => state
            .store
            .bind_repo_ids(&repo.name, &presented)
            .await?
            .unwrap_or_else(|| presented.clone()),
    };
    // A token without the owner id cannot show that the owner is the same one.
    let same = bound.repository_id == presented.repository_id
        && (bound.repository_owner_id.is_none()
            || bound.repository_owner_id == presented.repository_owner_id);
    if same {
        return Ok(());
    }
    Err(ApiError::Forbidden(format!(
        "repository {} is registered for {}, but this token comes from {}: the repository or its \
         owner was renamed, transferred or deleted and the name taken again; the operator \
         removes the registration and registers the repository again if this one is meant",
        repo.name,
        describe(&bound),
        describe(&presented)
    )))
}

fn describe(ids: &RepositoryIds) -> String {
    format!(
        "repository id {} (owner id {})",
        ids.repository_id,
        ids.repository_owner_id.as_deref().unwrap_or("unknown")
    )
}
