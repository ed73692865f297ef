//! Scheduled jobs (`on.schedule`): nightly runs of a branch's head.
//!
//! A push to a repository's default branch records the schedules of its config (every entry of
//! every job, with the branch it runs: its own or the default), keeping the next run of those
//! that stay. The scheduler looks every [`SCHEDULE_POLL`] for schedules that are due, moves each
//! one's next run on (the broker whose update wins runs it, so several brokers run it once),
//! and submits the job on the branch's head, with the config of that commit, if it still has
//! that schedule. Next runs are in the store, so they survive restarts; a run missed while no
//! broker ran happens once when one starts.

use std::sync::Arc;
use std::time::Duration;

use testbot_proto::now_ms;
use testbot_proto::provenance::{CommitRef, Provenance};
use testbot_proto::repo_config::{RepoConfig, parse_cron};

use super::config::{self, ConfigAt};
use super::{GitHubApp, GitHubError};
use crate::state::AppState;
use crate::store::github::ScheduleModel;

/// How often the scheduler looks for due schedules.
pub const SCHEDULE_POLL: Duration = Duration::from_secs(5);

/// Schedules run per look.
const SCHEDULE_BATCH: i64 = 64;

/// The first time after `after_ms` that `cron` fires (UTC), in Unix milliseconds.
pub fn next_run_ms(cron: &str, after_ms: i64) -> Option<i64> {
    let cron = parse_cron(cron).ok()?;
    let after = chrono::DateTime::from_timestamp_millis(after_ms)?;
    cron.find_next_occurrence(&after, false)
        .ok()
        .map(|next| next.timestamp_millis())
}

/// Records the schedules `config` (at the head of the default branch) declares.
pub async fn record(
    state: &AppState,
    installation_id: i64,
    repository_id: i64,
    repository: &str,
    default_branch: &str,
    config: &RepoConfig,
) -> Result<(), GitHubError> {
    let now = now_ms();
    let schedules: Vec<ScheduleModel> = config
        .jobs
        .iter()
        .flat_map(|(job, spec)| {
            spec.on.schedule.iter().filter_map(move |entry| {
                Some(ScheduleModel {
                    repository_id,
                    repository: repository.to_string(),
                    installation_id,
                    job: job.clone(),
                    cron: entry.cron.clone(),
                    branch: entry
                        .branch
                        .clone()
                        .unwrap_or_else(|| default_branch.to_string()),
                    next_run_ms: next_run_ms(&entry.cron, now)?,
                })
            })
        })
        .collect();
    state
        .store
        .replace_schedules(repository_id, &schedules)
        .await
        .map_err(|e| GitHubError::Unavailable(format!("the broker's database: {e:?}")))
}

/// Runs until shutdown.
pub async fn run_scheduler(state: AppState, app: Arc<GitHubApp>) {
    loop {
        let now = now_ms();
        match state.store.due_schedules(now, SCHEDULE_BATCH).await {
            Ok(due) => {
                for schedule in due {
                    let Some(next) = next_run_ms(&schedule.cron, now) else {
                        continue;
                    };
                    match state
                        .store
                        .advance_schedule(&schedule, schedule.next_run_ms, next)
                        .await
                    {
                        Ok(true) => {
                            if let Err(err) = run(&state, &app, &schedule).await {
                                tracing::warn!(
                                    repository = %schedule.repository,
                                    job = %schedule.job,
                                    %err,
                                    "A scheduled job could not be started."
                                );
                            }
                        }
                        Ok(false) => {}
                        Err(err) => tracing::warn!(?err, "Cannot move a schedule on."),
                    }
                }
            }
            Err(err) => tracing::warn!(?err, "Cannot read the due schedules."),
        }
        tokio::select! {
            () = tokio::time::sleep(SCHEDULE_POLL) => {}
            () = state.shutdown.cancelled() => return,
        }
    }
}

async fn run(
    state: &AppState,
    app: &GitHubApp,
    schedule: &ScheduleModel,
) -> Result<(), GitHubError> {
    let client = app.client.installation(schedule.installation_id).await?;
    let head = super::pulls::branch_head(&client, &schedule.repository, &schedule.branch).await?;
    let ConfigAt::Valid(config) = config::read(&client, &schedule.repository, &head).await? else {
        return Ok(());
    };
    let Some(job) = config.job(&schedule.job) else {
        return Ok(());
    };
    let still = job.on.schedule.iter().any(|entry| {
        entry.cron == schedule.cron && entry.branch.as_deref().is_none_or(|b| b == schedule.branch)
    });
    if !still {
        return Ok(());
    }
    let provenance = Provenance::Schedule {
        commit: CommitRef {
            repository: schedule.repository.clone(),
            repository_id: schedule.repository_id as u64,
            sha: head.clone(),
            job: schedule.job.clone(),
            config_sha: head,
        },
        branch: schedule.branch.clone(),
        cron: schedule.cron.clone(),
    };
    let public = super::pulls::is_public(&client, &schedule.repository).await?;
    super::jobs::submit(
        state,
        schedule.installation_id,
        public,
        &provenance,
        job,
        job.repeat,
    )
    .await
    .map_err(|e| GitHubError::Unavailable(format!("{e:#}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_run_is_the_crons_next_minute_in_utc() {
        // 2026-12-01T14:00:30Z
        let at = 1_796_133_630_000;
        assert_eq!(next_run_ms("* * * * *", at), Some(1_796_133_660_000));
        // 03:00 the next day.
        assert_eq!(next_run_ms("0 3 * * *", at), Some(1_796_180_400_000));
        assert_eq!(next_run_ms("not cron", at), None);
    }
}
