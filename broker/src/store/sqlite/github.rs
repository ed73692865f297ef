//! [`GitHubStore`] on SQLite: writes on the writer thread, reads on the reading connections,
//! as the rest of the SQLite store.

use rusqlite::{OptionalExtension as _, params};
use testbot_proto::jobs::{JobId, JobSpec};
use testbot_proto::now_ms;

use super::{SqliteStore, insert_job_row};
use crate::store::github::{
    AppJobModel, CommentKind, DeliveryModel, DeliveryOutcome, GitHubStore, InstalledRepo,
    NewAppJob, NewDelivery, ScheduleModel,
};
use crate::store::github::{COMMIT_RUNS_SQL, CommitRunCount, HistoryTargetModel};
use crate::store::{JobModel, JobOrigin, StoreResult, StoredJob};

macro_rules! delivery_columns {
    () => {
        "id, event, action, payload, received_at_ms, state, attempts, error"
    };
}

macro_rules! app_job_columns {
    () => {
        "g.job_id, g.provenance, g.installation_id, g.repository, g.head_sha, g.check_name, \
         g.check_run_id, g.synced_state, g.sync_attempts, j.state"
    };
}

/// The App's record of a job, owned for the writer thread: its provenance and its check run
/// (none when the job has none).
struct GitHubJobRow {
    provenance: String,
    installation_id: i64,
    repository: String,
    head_sha: String,
    check_name: String,
    synced_state: Option<&'static str>,
}

impl GitHubJobRow {
    fn of(app: &NewAppJob<'_>) -> GitHubJobRow {
        GitHubJobRow {
            provenance: app.provenance.to_owned(),
            installation_id: app.installation_id,
            repository: app.repository.to_owned(),
            head_sha: app.head_sha.to_owned(),
            check_name: app.check_name.to_owned(),
            synced_state: (!app.check_run).then_some(crate::store::github::NO_CHECK_RUN),
        }
    }

    fn insert(&self, tx: &rusqlite::Transaction<'_>, job_id: i64) -> rusqlite::Result<()> {
        tx.prepare_cached(
            "INSERT INTO github_jobs (job_id, provenance, installation_id, repository, head_sha,
                 check_name, synced_state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            job_id,
            self.provenance,
            self.installation_id,
            self.repository,
            self.head_sha,
            self.check_name,
            self.synced_state
        ])?;
        Ok(())
    }
}

fn delivery_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryModel> {
    Ok(DeliveryModel {
        id: row.get(0)?,
        event: row.get(1)?,
        action: row.get(2)?,
        payload: row.get(3)?,
        received_at_ms: row.get(4)?,
        state: row.get(5)?,
        attempts: row.get(6)?,
        error: row.get(7)?,
    })
}

fn app_job_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AppJobModel> {
    Ok(AppJobModel {
        job_id: row.get(0)?,
        provenance: row.get(1)?,
        installation_id: row.get(2)?,
        repository: row.get(3)?,
        head_sha: row.get(4)?,
        check_name: row.get(5)?,
        check_run_id: row.get(6)?,
        synced_state: row.get(7)?,
        sync_attempts: row.get(8)?,
        state: row.get(9)?,
    })
}

fn insert_repo(
    tx: &rusqlite::Transaction<'_>,
    installation_id: i64,
    repo: &InstalledRepo,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO github_installation_repos (installation_id, repository_id, full_name)
         VALUES (?1, ?2, ?3)
         ON CONFLICT (installation_id, repository_id) DO UPDATE SET full_name = excluded.full_name",
    )?
    .execute(params![installation_id, repo.id, repo.full_name])?;
    Ok(())
}

#[async_trait::async_trait]
impl GitHubStore for SqliteStore {
    async fn queue_delivery(&self, d: &NewDelivery<'_>) -> StoreResult<bool> {
        let (id, event, action, payload, at) = (
            d.id.to_owned(),
            d.event.to_owned(),
            d.action.map(str::to_owned),
            d.payload.to_vec(),
            d.received_at_ms,
        );
        self.writer
            .write(move |tx| {
                let inserted = tx
                    .prepare_cached(
                        "INSERT INTO github_deliveries
                             (id, event, action, payload, received_at_ms, not_before_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (id) DO NOTHING",
                    )?
                    .execute(params![id, event, action, payload, at])?;
                Ok(inserted == 1)
            })
            .await
    }

    async fn claim_delivery(
        &self,
        now_ms: i64,
        claim_ms: i64,
    ) -> StoreResult<Option<DeliveryModel>> {
        self.writer
            .write(move |tx| {
                tx.prepare_cached(concat!(
                    "UPDATE github_deliveries
                        SET claimed_until_ms = ?1 + ?2, attempts = attempts + 1
                      WHERE id = (SELECT id FROM github_deliveries
                                   WHERE state = 'queued' AND not_before_ms <= ?1
                                     AND (claimed_until_ms IS NULL OR claimed_until_ms <= ?1)
                                   ORDER BY received_at_ms, id LIMIT 1)
                     RETURNING ",
                    delivery_columns!()
                ))?
                .query_row(params![now_ms, claim_ms], delivery_row)
                .optional()
            })
            .await
    }

    async fn finish_delivery(&self, id: &str, outcome: DeliveryOutcome<'_>) -> StoreResult<()> {
        let (state, error, not_before, finished) = match outcome {
            DeliveryOutcome::Done => ("done", None, None, Some(now_ms())),
            DeliveryOutcome::Retry { error, retry_at_ms } => {
                ("queued", Some(error.to_owned()), Some(retry_at_ms), None)
            }
            DeliveryOutcome::Failed { error } => {
                ("failed", Some(error.to_owned()), None, Some(now_ms()))
            }
        };
        let id = id.to_owned();
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "UPDATE github_deliveries
                        SET state = ?2, error = ?3, not_before_ms = COALESCE(?4, not_before_ms),
                            finished_at_ms = ?5, claimed_until_ms = NULL
                      WHERE id = ?1",
                )?
                .execute(params![id, state, error, not_before, finished])?;
                Ok(())
            })
            .await
    }

    async fn delivery(&self, id: &str) -> StoreResult<Option<DeliveryModel>> {
        let id = id.to_owned();
        self.readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    delivery_columns!(),
                    " FROM github_deliveries WHERE id = ?1"
                ))?
                .query_row([id], delivery_row)
                .optional()
            })
            .await
    }

    async fn prune_deliveries(&self, cutoff_ms: i64) -> StoreResult<u64> {
        self.writer
            .write(move |tx| {
                let deleted = tx
                    .prepare_cached(
                        "DELETE FROM github_deliveries
                          WHERE finished_at_ms IS NOT NULL AND finished_at_ms < ?1",
                    )?
                    .execute([cutoff_ms])?;
                Ok(deleted as u64)
            })
            .await
    }

    async fn save_installation(
        &self,
        id: i64,
        account: &str,
        repos: &[InstalledRepo],
    ) -> StoreResult<()> {
        let (account, repos) = (account.to_owned(), repos.to_vec());
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "INSERT INTO github_installations (id, account, updated_at_ms)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (id) DO UPDATE SET account = excluded.account,
                         updated_at_ms = excluded.updated_at_ms",
                )?
                .execute(params![id, account, now_ms()])?;
                tx.prepare_cached(
                    "DELETE FROM github_installation_repos WHERE installation_id = ?1",
                )?
                .execute([id])?;
                for repo in &repos {
                    insert_repo(tx, id, repo)?;
                }
                Ok(())
            })
            .await
    }

    async fn change_installation_repos(
        &self,
        id: i64,
        added: &[InstalledRepo],
        removed: &[i64],
    ) -> StoreResult<bool> {
        let (added, removed) = (added.to_vec(), removed.to_vec());
        self.writer
            .write(move |tx| {
                let known = tx
                    .prepare_cached(
                        "UPDATE github_installations SET updated_at_ms = ?2 WHERE id = ?1",
                    )?
                    .execute(params![id, now_ms()])?
                    == 1;
                if !known {
                    return Ok(false);
                }
                for repo in &added {
                    insert_repo(tx, id, repo)?;
                }
                for repository_id in &removed {
                    tx.prepare_cached(
                        "DELETE FROM github_installation_repos
                          WHERE installation_id = ?1 AND repository_id = ?2",
                    )?
                    .execute(params![id, repository_id])?;
                }
                Ok(true)
            })
            .await
    }

    async fn delete_installation(&self, id: i64) -> StoreResult<bool> {
        self.writer
            .write(move |tx| {
                Ok(tx
                    .prepare_cached("DELETE FROM github_installations WHERE id = ?1")?
                    .execute([id])?
                    == 1)
            })
            .await
    }

    async fn installation_of(&self, repository_id: i64) -> StoreResult<Option<i64>> {
        self.readers
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT installation_id FROM github_installation_repos
                      WHERE repository_id = ?1 ORDER BY installation_id LIMIT 1",
                )?
                .query_row([repository_id], |row| row.get(0))
                .optional()
            })
            .await
    }

    async fn insert_app_job(
        &self,
        spec: &JobSpec,
        origin: &JobOrigin,
        app: &NewAppJob<'_>,
    ) -> StoreResult<JobModel> {
        let stored = StoredJob::new(spec, origin)?;
        let origin = JobOrigin {
            oidc_token: None,
            ..origin.clone()
        };
        let row = GitHubJobRow::of(app);
        self.writer
            .write(move |tx| {
                let job = insert_job_row(tx, &stored, &origin, None, None)?;
                row.insert(tx, job.id)?;
                Ok(job)
            })
            .await
    }

    async fn insert_app_batch(
        &self,
        spec: &JobSpec,
        origin: &JobOrigin,
        apps: &[NewAppJob<'_>],
    ) -> StoreResult<(crate::store::BatchModel, Vec<JobModel>)> {
        let stored = StoredJob::new(spec, origin)?;
        let origin = JobOrigin {
            oidc_token: None,
            ..origin.clone()
        };
        let rows: Vec<GitHubJobRow> = apps.iter().map(GitHubJobRow::of).collect();
        self.writer
            .write(move |tx| {
                let runs = rows.len() as u32;
                let batch = super::insert_batch_row(tx, runs, &origin, None)?;
                let mut jobs = Vec::with_capacity(rows.len());
                for (run, row) in rows.iter().enumerate() {
                    let place = Some((batch.id, run as u32 + 1, runs));
                    let job = insert_job_row(tx, &stored, &origin, None, place)?;
                    row.insert(tx, job.id)?;
                    jobs.push(job);
                }
                Ok((batch, jobs))
            })
            .await
    }

    async fn add_workflow_check_run(
        &self,
        id: JobId,
        installation_id: i64,
        repository: &str,
        head_sha: &str,
        check_name: &str,
    ) -> StoreResult<()> {
        let (repository, head_sha, check_name) = (
            repository.to_owned(),
            head_sha.to_owned(),
            check_name.to_owned(),
        );
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "INSERT INTO github_jobs (job_id, provenance, installation_id, repository,
                         head_sha, check_name)
                     VALUES (?1, NULL, ?2, ?3, ?4, ?5) ON CONFLICT (job_id) DO NOTHING",
                )?
                .execute(params![
                    id.0,
                    installation_id,
                    repository,
                    head_sha,
                    check_name
                ])?;
                Ok(())
            })
            .await
    }

    async fn app_job(&self, id: JobId) -> StoreResult<Option<AppJobModel>> {
        self.readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    app_job_columns!(),
                    " FROM github_jobs g JOIN jobs j ON j.id = g.job_id WHERE g.job_id = ?1"
                ))?
                .query_row([id.0], app_job_row)
                .optional()
            })
            .await
    }

    async fn app_job_by_check_run(&self, check_run_id: i64) -> StoreResult<Option<AppJobModel>> {
        self.readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    app_job_columns!(),
                    " FROM github_jobs g JOIN jobs j ON j.id = g.job_id WHERE g.check_run_id = ?1"
                ))?
                .query_row([check_run_id], app_job_row)
                .optional()
            })
            .await
    }

    async fn active_app_jobs_of_commit(
        &self,
        repository: &str,
        head_sha: &str,
    ) -> StoreResult<Vec<AppJobModel>> {
        let (repository, head_sha) = (repository.to_owned(), head_sha.to_owned());
        self.readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    app_job_columns!(),
                    " FROM github_jobs g JOIN jobs j ON j.id = g.job_id
                      WHERE g.repository = ?1 AND g.head_sha = ?2
                        AND j.state IN ('queued', 'assigned', 'running')
                      ORDER BY g.job_id"
                ))?
                .query_map(params![repository, head_sha], app_job_row)?
                .collect()
            })
            .await
    }

    async fn check_runs_to_sync(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<AppJobModel>> {
        self.readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    app_job_columns!(),
                    " FROM github_jobs g JOIN jobs j ON j.id = g.job_id
                      WHERE (g.synced_state IS NULL OR g.synced_state IN ('queued', 'assigned', 'running'))
                        AND g.synced_state IS NOT j.state AND g.sync_after_ms <= ?1
                      ORDER BY g.job_id LIMIT ?2"
                ))?
                .query_map(params![now_ms, limit], app_job_row)?
                .collect()
            })
            .await
    }

    async fn check_run_synced(&self, id: JobId, check_run_id: i64, state: &str) -> StoreResult<()> {
        let state = state.to_owned();
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "UPDATE github_jobs SET check_run_id = ?2, synced_state = ?3,
                            sync_attempts = 0, sync_after_ms = 0
                      WHERE job_id = ?1",
                )?
                .execute(params![id.0, check_run_id, state])?;
                Ok(())
            })
            .await
    }

    async fn check_run_sync_failed(&self, id: JobId, retry_at_ms: i64) -> StoreResult<()> {
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "UPDATE github_jobs SET sync_attempts = sync_attempts + 1, sync_after_ms = ?2
                      WHERE job_id = ?1",
                )?
                .execute(params![id.0, retry_at_ms])?;
                Ok(())
            })
            .await
    }

    async fn replace_history_targets(
        &self,
        repository_id: i64,
        targets: &[HistoryTargetModel],
    ) -> StoreResult<()> {
        let targets = targets.to_vec();
        self.writer
            .write(move |tx| {
                tx.prepare_cached("DELETE FROM github_history_targets WHERE repository_id = ?1")?
                    .execute([repository_id])?;
                for t in &targets {
                    tx.prepare_cached(
                        "INSERT INTO github_history_targets (repository_id, repository,
                             installation_id, public, branch, job, commits, runs)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )?
                    .execute(params![
                        t.repository_id,
                        t.repository,
                        t.installation_id,
                        t.public,
                        t.branch,
                        t.job,
                        t.commits,
                        t.runs
                    ])?;
                }
                Ok(())
            })
            .await
    }

    async fn history_targets(&self) -> StoreResult<Vec<HistoryTargetModel>> {
        self.readers
            .read(|conn| {
                conn.prepare_cached(
                    "SELECT repository_id, repository, installation_id, public, branch, job,
                         commits, runs
                     FROM github_history_targets ORDER BY repository, job",
                )?
                .query_map([], |row| {
                    Ok(HistoryTargetModel {
                        repository_id: row.get(0)?,
                        repository: row.get(1)?,
                        installation_id: row.get(2)?,
                        public: row.get(3)?,
                        branch: row.get(4)?,
                        job: row.get(5)?,
                        commits: row.get(6)?,
                        runs: row.get(7)?,
                    })
                })?
                .collect()
            })
            .await
    }

    async fn commit_runs(
        &self,
        repository: &str,
        git_ref: &str,
        job_name: &str,
        limit: i64,
    ) -> StoreResult<Vec<CommitRunCount>> {
        let (repository, git_ref, job_name) = (
            repository.to_owned(),
            git_ref.to_owned(),
            job_name.to_owned(),
        );
        self.readers
            .read(move |conn| {
                conn.prepare_cached(COMMIT_RUNS_SQL)?
                    .query_map(params![repository, git_ref, job_name, limit], |row| {
                        Ok(CommitRunCount {
                            commit_sha: row.get(0)?,
                            first_at_ms: row.get(1)?,
                            runs: row.get(2)?,
                        })
                    })?
                    .collect()
            })
            .await
    }

    async fn replace_schedules(
        &self,
        repository_id: i64,
        schedules: &[ScheduleModel],
    ) -> StoreResult<()> {
        let schedules = schedules.to_vec();
        self.writer
            .write(move |tx| {
                // Keep the entries that stay (with their next run), drop the others.
                let mut keep = Vec::new();
                {
                    let mut existing = tx.prepare_cached(
                        "SELECT job, cron, branch, next_run_ms FROM github_schedules
                          WHERE repository_id = ?1",
                    )?;
                    let rows = existing.query_map([repository_id], |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, String>(2)?,
                            row.get::<_, i64>(3)?,
                        ))
                    })?;
                    for row in rows {
                        keep.push(row?);
                    }
                }
                tx.prepare_cached("DELETE FROM github_schedules WHERE repository_id = ?1")?
                    .execute([repository_id])?;
                for s in &schedules {
                    let next = keep
                        .iter()
                        .find(|(job, cron, branch, _)| {
                            *job == s.job && *cron == s.cron && *branch == s.branch
                        })
                        .map_or(s.next_run_ms, |(_, _, _, next)| *next);
                    tx.prepare_cached(
                        "INSERT INTO github_schedules (repository_id, repository, installation_id,
                             job, cron, branch, next_run_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                         ON CONFLICT DO NOTHING",
                    )?
                    .execute(params![
                        repository_id,
                        s.repository,
                        s.installation_id,
                        s.job,
                        s.cron,
                        s.branch,
                        next
                    ])?;
                }
                Ok(())
            })
            .await
    }

    async fn due_schedules(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<ScheduleModel>> {
        self.readers
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT repository_id, repository, installation_id, job, cron, branch,
                            next_run_ms
                       FROM github_schedules WHERE next_run_ms <= ?1
                      ORDER BY next_run_ms LIMIT ?2",
                )?
                .query_map(params![now_ms, limit], |row| {
                    Ok(ScheduleModel {
                        repository_id: row.get(0)?,
                        repository: row.get(1)?,
                        installation_id: row.get(2)?,
                        job: row.get(3)?,
                        cron: row.get(4)?,
                        branch: row.get(5)?,
                        next_run_ms: row.get(6)?,
                    })
                })?
                .collect()
            })
            .await
    }

    async fn advance_schedule(
        &self,
        schedule: &ScheduleModel,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<bool> {
        let s = schedule.clone();
        self.writer
            .write(move |tx| {
                Ok(tx
                    .prepare_cached(
                        "UPDATE github_schedules SET next_run_ms = ?5
                          WHERE repository_id = ?1 AND job = ?2 AND cron = ?3 AND branch = ?4
                            AND next_run_ms = ?6",
                    )?
                    .execute(params![
                        s.repository_id,
                        s.job,
                        s.cron,
                        s.branch,
                        to_ms,
                        from_ms
                    ])?
                    == 1)
            })
            .await
    }

    async fn claim_comment(
        &self,
        kind: CommentKind,
        id: i64,
        delivery_id: &str,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let (kind, delivery_id) = (kind.as_str(), delivery_id.to_owned());
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "INSERT INTO github_comments_handled (kind, comment_id, delivery_id, handled_at_ms)
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (kind, comment_id) DO NOTHING",
                )?
                .execute(params![kind, id, delivery_id, now_ms])?;
                let owner: String = tx
                    .prepare_cached(
                        "SELECT delivery_id FROM github_comments_handled
                          WHERE kind = ?1 AND comment_id = ?2",
                    )?
                    .query_row(params![kind, id], |row| row.get(0))?;
                Ok(owner == delivery_id)
            })
            .await
    }
}
