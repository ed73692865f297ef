//! The App's jobs: what it submits for a trigger, and the provenance an agent is handed.

use testbot_proto::jobs::JobSpec;
use testbot_proto::provenance::{APP_SUBMITTER, Provenance};
use testbot_proto::repo_config::ConfigJob;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::github::NewAppJob;
use crate::store::{JobModel, JobOrigin, Priority, Store};

/// The provenance of an App job, for its assignment; None for every other job.
pub async fn provenance_of(
    store: &dyn Store,
    model: &JobModel,
) -> Result<Option<Provenance>, ApiError> {
    if model.submitted_by.as_deref() != Some(APP_SUBMITTER) {
        return Ok(None);
    }
    let Some(provenance) = store
        .app_job(model.job_id())
        .await?
        .and_then(|app_job| app_job.provenance)
    else {
        return Ok(None);
    };
    let provenance = serde_json::from_str(&provenance).map_err(|e| {
        ApiError::Internal(anyhow::anyhow!(
            "stored provenance of job {} is not valid: {e}",
            model.id
        ))
    })?;
    Ok(Some(provenance))
}

/// Gives a workflow job (the Action's) a check run on its commit when the App is installed on
/// its repository. Best effort: the job is queued whatever happens here.
pub async fn add_workflow_check_run(
    state: &AppState,
    model: &JobModel,
    claims: &testbot_proto::oidc::WorkflowClaims,
) {
    let Some(app) = &state.github_app else {
        return;
    };
    let Ok(repository_id) = claims.repository_id.parse::<i64>() else {
        return;
    };
    let installation = match state.store.installation_of(repository_id).await {
        Ok(Some(installation)) => installation,
        Ok(None) => return,
        Err(err) => {
            tracing::warn!(
                job_id = model.id,
                ?err,
                "Cannot look up the App's installation."
            );
            return;
        }
    };
    let workflow = claims.workflow.as_deref().unwrap_or("workflow");
    let mut name = match model.spec().ok().and_then(|spec| spec.name) {
        Some(name) => format!("{workflow}: {name}"),
        None => format!("{workflow}: testbot job {}", model.id),
    };
    if let Some(place) = model.batch_place() {
        name.push_str(&format!(" ({}/{})", place.run, place.runs));
    }
    if let Err(err) = state
        .store
        .add_workflow_check_run(
            model.job_id(),
            installation,
            &claims.repository,
            &claims.sha,
            &name,
        )
        .await
    {
        tracing::warn!(
            job_id = model.id,
            ?err,
            "Cannot record a workflow job's check run."
        );
        return;
    }
    app.checks.notify_one();
}

/// Submits `runs` runs of the config's job `provenance.commit().job`, each with its check run.
/// `public`: GitHub says the repository is public (in the webhook's signed payload, or asked).
pub async fn submit(
    state: &AppState,
    installation_id: i64,
    public: bool,
    provenance: &Provenance,
    job: &ConfigJob,
    runs: u32,
) -> anyhow::Result<Vec<JobModel>> {
    let spec = spec_of(provenance, job)?;
    submit_spec(
        state,
        installation_id,
        public,
        provenance,
        &spec,
        job.site.as_deref(),
        runs,
        true,
    )
    .await
}

/// The spec the config's job `provenance.commit().job` gives.
pub fn spec_of(provenance: &Provenance, job: &ConfigJob) -> anyhow::Result<JobSpec> {
    let name = &provenance.commit().job;
    let spec: JobSpec = job
        .spec(name)
        .map_err(|e| anyhow::anyhow!("job {name}: {e}"))?;
    spec.validate()
        .map_err(|e| anyhow::anyhow!("job {name}: {e}"))?;
    Ok(spec)
}

/// Submits `runs` runs of `spec`, a config job's (to `site` if it names one), each with its
/// check run when `check_runs`.
#[allow(clippy::too_many_arguments)]
pub async fn submit_spec(
    state: &AppState,
    installation_id: i64,
    public: bool,
    provenance: &Provenance,
    spec: &JobSpec,
    site: Option<&str>,
    runs: u32,
    check_runs: bool,
) -> anyhow::Result<Vec<JobModel>> {
    spec.validate()
        .map_err(|e| anyhow::anyhow!("job {}: {e}", provenance.commit().job))?;
    let commit = provenance.commit();
    let origin = JobOrigin {
        repository: Some(commit.repository.clone()),
        run_id: None,
        submitted_by: APP_SUBMITTER.to_string(),
        oidc_token: None,
        sites: site.iter().map(|s| s.to_string()).collect(),
        public,
        commit_sha: Some(commit.sha.clone()),
        // A bisection's runs of older commits are its own record, not the branch's: kept
        // apart, they leave the branch's statistics in the order its commits were pushed.
        git_ref: Some(match provenance {
            Provenance::History {
                bisection: Some(bisection),
                ..
            } => format!("refs/testbot/bisections/{bisection}"),
            _ => provenance.git_ref(),
        }),
        // Pull requests and comments have someone waiting; a push's runs come after them, and
        // the broker's own runs of older commits after everything else.
        priority: match provenance {
            Provenance::Push { .. } | Provenance::Tag { .. } | Provenance::Schedule { .. } => {
                Priority::PostMerge
            }
            Provenance::History { .. } => Priority::Background,
            _ => Priority::Interactive,
        },
    };
    let provenance_json = serde_json::to_string(provenance)?;
    let names: Vec<String> = (1..=runs)
        .map(|run| match runs {
            1 => commit.job.clone(),
            _ => format!("{} ({run}/{runs})", commit.job),
        })
        .collect();
    let apps: Vec<NewAppJob<'_>> = names
        .iter()
        .map(|check_name| NewAppJob {
            provenance: &provenance_json,
            installation_id,
            repository: &commit.repository,
            head_sha: &commit.sha,
            check_name,
            check_run: check_runs,
        })
        .collect();
    // Several runs are one batch: followed, counted and reported together.
    let jobs = match apps.as_slice() {
        [app] => vec![crate::lifecycle::jobs::submit_app_job(state, spec, &origin, app).await?],
        apps => crate::lifecycle::jobs::submit_app_batch(state, spec, &origin, apps).await?,
    };
    for model in &jobs {
        tracing::info!(
            job_id = model.id,
            provenance = %provenance.describe(),
            "App job queued."
        );
    }
    if let Some(app) = &state.github_app {
        app.checks.notify_one();
    }
    Ok(jobs)
}
