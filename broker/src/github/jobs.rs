//! The App's jobs: what it submits for a trigger, and the provenance an agent is handed.

use testbot_proto::jobs::JobSpec;
use testbot_proto::provenance::{APP_SUBMITTER, Provenance};
use testbot_proto::repo_config::ConfigJob;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::github::NewAppJob;
use crate::store::{JobModel, JobOrigin, Store};

/// The provenance of an App job, for its assignment; None for every other job.
pub async fn provenance_of(
    store: &dyn Store,
    model: &JobModel,
) -> Result<Option<Provenance>, ApiError> {
    if model.submitted_by.as_deref() != Some(APP_SUBMITTER) {
        return Ok(None);
    }
    let Some(app_job) = store.app_job(model.job_id()).await? else {
        return Ok(None);
    };
    let provenance = serde_json::from_str(&app_job.provenance).map_err(|e| {
        ApiError::Internal(anyhow::anyhow!(
            "stored provenance of job {} is not valid: {e}",
            model.id
        ))
    })?;
    Ok(Some(provenance))
}

/// Submits `runs` runs of the config's job `provenance.commit().job`, each with its check run.
pub async fn submit(
    state: &AppState,
    installation_id: i64,
    provenance: &Provenance,
    job: &ConfigJob,
    runs: u32,
) -> anyhow::Result<Vec<JobModel>> {
    let commit = provenance.commit();
    let spec: JobSpec = job
        .spec(&commit.job)
        .map_err(|e| anyhow::anyhow!("job {}: {e}", commit.job))?;
    spec.validate()
        .map_err(|e| anyhow::anyhow!("job {}: {e}", commit.job))?;
    let origin = JobOrigin {
        repository: Some(commit.repository.clone()),
        run_id: None,
        submitted_by: APP_SUBMITTER.to_string(),
        oidc_token: None,
        sites: job.site.iter().cloned().collect(),
    };
    let provenance_json = serde_json::to_string(provenance)?;
    let mut jobs = Vec::new();
    for run in 1..=runs {
        let check_name = if runs == 1 {
            commit.job.clone()
        } else {
            format!("{} ({run}/{runs})", commit.job)
        };
        let app = NewAppJob {
            provenance: &provenance_json,
            installation_id,
            repository: &commit.repository,
            head_sha: &commit.sha,
            check_name: &check_name,
        };
        let model = crate::lifecycle::jobs::submit_app_job(state, &spec, &origin, &app).await?;
        tracing::info!(
            job_id = model.id,
            provenance = %provenance.describe(),
            "App job queued."
        );
        jobs.push(model);
    }
    if let Some(app) = &state.github_app {
        app.checks.notify_one();
    }
    Ok(jobs)
}
