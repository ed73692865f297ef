//! Admission: whether a workflow may submit a job, and where it may go. Checked before the job
//! is stored; the agent checks again, itself, before it runs anything.

use testbot_proto::glob::any_match;
use testbot_proto::jobs::JobSpec;
use testbot_proto::oidc::WorkflowClaims;

use crate::access::check_repository_ids;
use crate::error::ApiError;
use crate::state::AppState;

/// Whether a workflow may submit: its repository is registered (and bound to the token's
/// repository ids), the registration enables the token's event and ref, some enrolled agent's
/// site would accept the job, and neither the repository's nor a site's queue is full. Returns
/// the sites the job may go to (empty: any). `runs`: how many jobs of `spec` (a batch's runs).
pub async fn admit_workflow_job(
    state: &AppState,
    claims: &WorkflowClaims,
    spec: &JobSpec,
    runs: u32,
) -> Result<Vec<String>, ApiError> {
    let repo = state.store.repo(&claims.repository).await?.ok_or_else(|| {
        ApiError::Forbidden(format!(
            "repository {} is not registered with this broker; a maintainer registers it with \
             `testbot repo register {}`",
            claims.repository, claims.repository
        ))
    })?;
    check_repository_ids(state, &repo, claims).await?;
    let settings = repo.settings()?;
    if !settings.events.contains(&claims.event_name) {
        return Err(ApiError::Forbidden(format!(
            "event {} is not enabled for repository {} (enabled: [{}])",
            claims.event_name,
            claims.repository,
            settings.events.join(", ")
        )));
    }
    if !any_match(&settings.refs, &claims.git_ref) {
        return Err(ApiError::Forbidden(format!(
            "ref {} is not enabled for repository {} (enabled: [{}])",
            claims.git_ref,
            claims.repository,
            settings.refs.join(", ")
        )));
    }
    find_accepting_site(state, claims, spec, &settings.sites).await?;
    crate::limits::check_queue_quota(
        &*state.store,
        &state.settings.limits,
        &claims.repository,
        spec,
        &settings.sites,
        runs,
    )
    .await?;
    Ok(settings.sites)
}

/// Fails fast when no enrolled agent would accept the job, naming why each site refuses it.
pub async fn find_accepting_site(
    state: &AppState,
    claims: &WorkflowClaims,
    spec: &JobSpec,
    sites: &[String],
) -> Result<(), ApiError> {
    let job = crate::routing::RoutedJob {
        spec: spec.clone(),
        sites: (!sites.is_empty()).then(|| sites.to_vec()),
        identity: Some(claims.into()),
        app_event: None,
    };
    let reasons = match crate::routing::first_taker(state, &job, None, false).await? {
        Ok(_) => return Ok(()),
        Err(reasons) => reasons,
    };
    let sites_note = if sites.is_empty() {
        String::new()
    } else {
        format!(" (the registration allows sites [{}])", sites.join(", "))
    };
    if reasons.is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "no site can run this job: no agent is enrolled{sites_note}"
        )));
    }
    Err(ApiError::Unprocessable(format!(
        "no site accepts this job{sites_note}: {}",
        reasons.join("; ")
    )))
}
