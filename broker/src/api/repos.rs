//! Repository registrations: what a repository's workflows may submit, and where.

use axum::extract::State;
use axum::http::StatusCode;
use testbot_proto::repos::{Repo, RepoList, RepoRegistration, validate_repo_name};

use super::replayed;
use crate::auth::Principal;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::github::GitHubError;
use crate::state::AppState;
use crate::store::RepositoryIds;

/// Registers a repository, or replaces its settings. Proof of control: the operator token, an
/// OIDC token from a workflow of that repository, or a GitHub user token with admin permission
/// on it.
pub(super) async fn register_repo_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(registration): ApiJson<RepoRegistration>,
) -> Result<(StatusCode, axum::Json<Repo>), ApiError> {
    registration
        .validate()
        .map_err(|e| ApiError::BadRequest(format!("invalid registration: {e}")))?;
    let (registered_by, jti, ids) =
        prove_repo_control(&state, &principal, &registration.name).await?;
    let settings = serde_json::to_string(&registration.settings()).map_err(anyhow::Error::from)?;
    let model = match (&principal, &ids) {
        (Principal::Workflow { .. }, Some(ids)) => {
            self_register_repo(
                &state,
                &registration.name,
                &settings,
                &registered_by,
                ids,
                jti,
            )
            .await?
        }
        _ => state
            .store
            .upsert_repo(
                &registration.name,
                &settings,
                &registered_by,
                ids.as_ref(),
                jti,
            )
            .await?
            .ok_or_else(|| replayed(jti))?,
    };
    tracing::info!(repo = %model.name, %registered_by, "Repository registered.");
    Ok((StatusCode::CREATED, axum::Json(model.to_repo()?)))
}

/// Proof of control of a repository: who to record, the token id to consume, and the
/// repository ids to bind the registration to (when the proof shows them).
type RepoControl<'a> = (String, Option<(&'a str, i64)>, Option<RepositoryIds>);

/// A workflow registering its own repository: allowed only when the operator turned
/// self-registration on, and only as the first registration. Anything else would let any branch
/// or pull request of the repository widen the refs, events and sites its maintainers chose.
pub(super) async fn self_register_repo(
    state: &AppState,
    name: &str,
    settings: &str,
    registered_by: &str,
    ids: &RepositoryIds,
    jti: Option<(&str, i64)>,
) -> Result<crate::store::RepoModel, ApiError> {
    if !state.settings.allow_self_registration {
        return Err(ApiError::Forbidden(format!(
            "this broker does not let workflows register repositories: the operator registers \
             {name} (or an admin of it, with a GitHub token), or starts the broker with \
             --allow-self-registration"
        )));
    }
    match state
        .store
        .insert_repo_if_absent(name, settings, registered_by, ids, jti)
        .await?
    {
        crate::store::FirstRegistration::Created(model) => Ok(model),
        crate::store::FirstRegistration::Replayed => Err(replayed(jti)),
        crate::store::FirstRegistration::Exists => Err(ApiError::Forbidden(format!(
            "repository {name} is registered already, and a workflow token cannot change a \
             registration; the operator or an admin of {name} (with a GitHub token) changes it"
        ))),
    }
}

/// Who may change `repo`'s registration: `Ok((recorded name, token id to consume, repository
/// ids to bind it to))`.
pub(super) async fn prove_repo_control<'a>(
    state: &AppState,
    principal: &'a Principal,
    repo: &str,
) -> Result<RepoControl<'a>, ApiError> {
    match principal {
        Principal::Operator { .. } => Ok((principal.describe(), None, None)),
        Principal::Workflow { claims, .. } => {
            if !claims.repository.eq_ignore_ascii_case(repo) {
                return Err(ApiError::Forbidden(format!(
                    "a workflow of {} cannot register {repo}: the OIDC token must come from a workflow of {repo}",
                    claims.repository
                )));
            }
            Ok((
                principal.describe(),
                Some((claims.jti.as_str(), claims.exp)),
                Some(RepositoryIds {
                    repository_id: claims.repository_id.clone(),
                    repository_owner_id: claims.repository_owner_id.clone(),
                }),
            ))
        }
        Principal::GitHubUser { token } => {
            let permission = state
                .github
                .repo_permission(token, repo)
                .await
                .map_err(|err| match err {
                    GitHubError::Refused(why) => ApiError::Forbidden(why),
                    GitHubError::Unavailable(why) => ApiError::Unavailable(format!(
                        "cannot check your permission on {repo}: {why}"
                    )),
                })?;
            if !permission.admin {
                return Err(ApiError::Forbidden(format!(
                    "GitHub user {} does not have admin permission on {repo}; only its admins can register it",
                    permission.login
                )));
            }
            Ok((format!("github:{}", permission.login), None, permission.ids))
        }
        Principal::Agent(_) => Err(ApiError::Forbidden(
            "agents cannot register repositories".into(),
        )),
    }
}

pub(super) async fn list_repos_handler(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<axum::Json<RepoList>, ApiError> {
    principal.require_operator()?;
    let repos = state
        .store
        .repos()
        .await?
        .iter()
        .map(|m| m.to_repo())
        .collect::<anyhow::Result<_>>()?;
    Ok(axum::Json(RepoList { repos }))
}

pub(super) fn repo_name(owner: String, name: String) -> Result<String, ApiError> {
    let full = format!("{owner}/{name}");
    validate_repo_name(&full).map_err(ApiError::BadRequest)?;
    Ok(full)
}

pub(super) async fn repo_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((owner, name)): ApiPath<(String, String)>,
) -> Result<axum::Json<Repo>, ApiError> {
    let name = repo_name(owner, name)?;
    match &principal {
        Principal::Workflow { claims, .. } if claims.repository.eq_ignore_ascii_case(&name) => {}
        other => other.require_operator()?,
    }
    let model = state
        .store
        .repo(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("repository {name} is not registered")))?;
    Ok(axum::Json(model.to_repo()?))
}

pub(super) async fn remove_repo_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((owner, name)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let name = repo_name(owner, name)?;
    if let Principal::Workflow { .. } = principal {
        // Removing and registering again would widen the registration, and every agent that
        // ran one of the repository's jobs holds one of its tokens.
        return Err(ApiError::Forbidden(format!(
            "a workflow token cannot remove a registration; the operator or an admin of {name} \
             (with a GitHub token) removes it"
        )));
    }
    let (removed_by, _, _) = prove_repo_control(&state, &principal, &name).await?;
    if !state.store.delete_repo(&name).await? {
        return Err(ApiError::NotFound(format!(
            "repository {name} is not registered"
        )));
    }
    tracing::info!(repo = %name, %removed_by, "Repository removed.");
    Ok(StatusCode::NO_CONTENT)
}
