//! Statistical bisections: start one for a repository's test, list them, follow one.

use axum::extract::State;
use axum::http::StatusCode;
use testbot_proto::bisect::{BisectRequest, Bisection};

use crate::auth::Principal;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::github::GitHubError;
use crate::state::AppState;

/// Bisections `GET /repos/{owner}/{name}/bisections` lists.
const LISTED: i64 = 100;

/// Operators, and a workflow of the repository itself, may bisect and read its bisections.
fn may_use(principal: &Principal, repository: &str) -> Result<(), ApiError> {
    match principal {
        Principal::Workflow { claims, .. }
            if claims.repository.eq_ignore_ascii_case(repository) =>
        {
            Ok(())
        }
        other => other.require_operator(),
    }
}

pub(super) async fn start_bisection_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((owner, name)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<BisectRequest>,
) -> Result<(StatusCode, axum::Json<Bisection>), ApiError> {
    let repository = super::repos::repo_name(owner, name)?;
    may_use(&principal, &repository)?;
    let Some(app) = state.github_app.clone() else {
        return Err(ApiError::Conflict(
            "bisection runs the repository's jobs through the GitHub App, which this broker does not run ([github_app] in its config)".into(),
        ));
    };
    let bisection = crate::github::bisect::start_requested(
        &state,
        &app,
        &repository,
        &request,
        principal.describe(),
    )
    .await
    .map_err(|e| match e {
        GitHubError::Refused(message) => ApiError::Unprocessable(message),
        GitHubError::Unavailable(message) => ApiError::Unavailable(message),
    })?;
    Ok((StatusCode::CREATED, axum::Json(bisection)))
}

pub(super) async fn repo_bisections_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((owner, name)): ApiPath<(String, String)>,
) -> Result<axum::Json<Vec<Bisection>>, ApiError> {
    let repository = super::repos::repo_name(owner, name)?;
    may_use(&principal, &repository)?;
    Ok(axum::Json(
        state.store.repo_bisections(&repository, LISTED).await?,
    ))
}

pub(super) async fn bisection_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<i64>,
) -> Result<axum::Json<Bisection>, ApiError> {
    let not_found = || ApiError::NotFound(format!("bisection {id} does not exist"));
    let bisection = state.store.bisection(id).await?.ok_or_else(not_found)?;
    // Whoever may not read it learns nothing of it, not even that it exists.
    may_use(&principal, &bisection.repository).map_err(|_| not_found())?;
    Ok(axum::Json(bisection))
}
