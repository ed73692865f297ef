//! History filling (TestLooper's core): a job with `history = { commits = M, runs = K }` keeps
//! at least K runs on each of the last M commits of the default branch that ran it, so a flake
//! that shows once in fifty runs is seen at the commit that brought it. The filler only uses
//! idle capacity: it submits runs only while fewer jobs are queued or running than agents are
//! online, and at most as many as would fill them, so its runs never wait in front of a job
//! someone asked for (a run already started is not preempted).
//!
//! The runs are App jobs of the commit's own config with a [`Provenance::History`] the agent
//! checks like a push's, without check runs; their results count for the branch. Only the
//! broker holding the sweeper's lease fills.

use std::sync::Arc;
use std::time::Duration;

use testbot_proto::jobs::JobState;
use testbot_proto::provenance::{CommitRef, Provenance};
use testbot_proto::repo_config::RepoConfig;

use super::config::{self, ConfigAt};
use super::{GitHubApp, GitHubError};
use crate::state::AppState;
use crate::store::github::HistoryTargetModel;

/// How often idle capacity is looked for.
pub const FILL_INTERVAL: Duration = Duration::from_secs(2);

/// Records the history targets of the default branch's config (at each push to it).
pub async fn record(
    state: &AppState,
    installation_id: i64,
    repository_id: i64,
    repository: &str,
    branch: &str,
    public: bool,
    config: &RepoConfig,
) -> Result<(), GitHubError> {
    let targets: Vec<HistoryTargetModel> = config
        .jobs
        .iter()
        .filter_map(|(job, spec)| {
            let fill = spec.history?;
            Some(HistoryTargetModel {
                repository_id,
                repository: repository.to_string(),
                installation_id,
                public,
                branch: branch.to_string(),
                job: job.clone(),
                commits: i64::from(fill.commits),
                runs: i64::from(fill.runs),
            })
        })
        .collect();
    state
        .store
        .replace_history_targets(repository_id, &targets)
        .await
        .map_err(|e| GitHubError::Unavailable(format!("the broker's database: {e:?}")))
}

/// Runs until shutdown.
pub async fn run_filler(state: AppState, app: Arc<GitHubApp>) {
    loop {
        if state.store.lead_sweeper().await.unwrap_or(false)
            && let Err(err) = fill(&state, &app).await
        {
            tracing::warn!(%err, "Cannot fill the branches' history; trying again.");
        }
        tokio::select! {
            () = tokio::time::sleep(FILL_INTERVAL) => {}
            () = state.shutdown.cancelled() => return,
        }
    }
}

/// Agents online now, less the jobs queued or running: how many runs would not wait for, nor
/// hold back, anything else.
async fn idle_capacity(state: &AppState) -> anyhow::Result<i64> {
    let online = crate::lifecycle::online_agents(state).await? as i64;
    let busy: u64 = state
        .store
        .jobs_by_state()
        .await?
        .iter()
        .filter(|(s, _)| matches!(s, JobState::Queued | JobState::Assigned | JobState::Running))
        .map(|(_, n)| n)
        .sum();
    Ok(online - busy as i64)
}

/// One pass: the newest commits short of their runs first, within the idle capacity.
async fn fill(state: &AppState, app: &GitHubApp) -> anyhow::Result<()> {
    let mut idle = idle_capacity(state).await?;
    if idle <= 0 {
        return Ok(());
    }
    for target in state.store.history_targets().await? {
        let git_ref = format!("refs/heads/{}", target.branch);
        let commits = state
            .store
            .commit_runs(&target.repository, &git_ref, &target.job, target.commits)
            .await?;
        for commit in commits {
            if idle <= 0 {
                return Ok(());
            }
            let missing = (target.runs - commit.runs).min(idle);
            if missing <= 0 {
                continue;
            }
            submit(state, app, &target, &commit.commit_sha, missing as u32).await?;
            idle -= missing;
        }
    }
    Ok(())
}

/// Submits `runs` runs of the target's job at `sha`, with that commit's config.
async fn submit(
    state: &AppState,
    app: &GitHubApp,
    target: &HistoryTargetModel,
    sha: &str,
    runs: u32,
) -> anyhow::Result<()> {
    let client = app.client.installation(target.installation_id).await?;
    let ConfigAt::Valid(config) = config::read(&client, &target.repository, sha).await? else {
        tracing::debug!(repository = %target.repository, sha, "No valid config at the commit; its history is not filled.");
        return Ok(());
    };
    let Some(job) = config.job(&target.job) else {
        return Ok(());
    };
    let provenance = Provenance::History {
        commit: CommitRef {
            repository: target.repository.clone(),
            repository_id: target.repository_id as u64,
            sha: sha.to_string(),
            job: target.job.clone(),
            config_sha: sha.to_string(),
        },
        branch: target.branch.clone(),
        bisection: None,
    };
    let spec = super::jobs::spec_of(&provenance, job)?;
    let jobs = super::jobs::submit_spec(
        state,
        target.installation_id,
        target.public,
        &provenance,
        &spec,
        job.site.as_deref(),
        runs,
        false,
    )
    .await?;
    tracing::info!(
        repository = %target.repository,
        job = %target.job,
        sha,
        runs = jobs.len(),
        "Filling the branch's history."
    );
    Ok(())
}
