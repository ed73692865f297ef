//! [`GitHubStore`] on PostgreSQL: what `sqlite/github.rs` does, with row locks where several
//! brokers may race (a delivery is claimed by one of them).

use testbot_proto::jobs::{JobId, JobSpec};
use testbot_proto::now_ms;

use super::PgStore;
use crate::store::github::{
    AppJobModel, CommentKind, DeliveryModel, DeliveryOutcome, GitHubStore, InstalledRepo,
    NewAppJob, NewDelivery, ScheduleModel,
};
use crate::store::github::{COMMIT_RUNS_SQL, CommitRunCount, HistoryTargetModel};
use crate::store::{JobModel, JobOrigin, StoreError, StoreResult, StoredJob};

const DELIVERY_COLUMNS: &str = "id, event, action, payload, received_at_ms, state, attempts, error";

const APP_JOB_COLUMNS: &str = "g.job_id, g.provenance, g.installation_id, g.repository, \
     g.head_sha, g.check_name, g.check_run_id, g.synced_state, g.sync_attempts, j.state";

#[async_trait::async_trait]
impl GitHubStore for PgStore {
    async fn queue_delivery(&self, d: &NewDelivery<'_>) -> StoreResult<bool> {
        let inserted = sqlx::query(
            "INSERT INTO github_deliveries (id, event, action, payload, received_at_ms, not_before_ms)
             VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(d.id)
        .bind(d.event)
        .bind(d.action)
        .bind(d.payload)
        .bind(d.received_at_ms)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    async fn claim_delivery(
        &self,
        now_ms: i64,
        claim_ms: i64,
    ) -> StoreResult<Option<DeliveryModel>> {
        let sql = format!(
            "UPDATE github_deliveries
                SET claimed_until_ms = $1 + $2, attempts = attempts + 1
              WHERE id = (SELECT id FROM github_deliveries
                           WHERE state = 'queued' AND not_before_ms <= $1
                             AND (claimed_until_ms IS NULL OR claimed_until_ms <= $1)
                           ORDER BY received_at_ms, id LIMIT 1
                           FOR UPDATE SKIP LOCKED)
             RETURNING {DELIVERY_COLUMNS}"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(now_ms)
            .bind(claim_ms)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from)
    }

    async fn finish_delivery(&self, id: &str, outcome: DeliveryOutcome<'_>) -> StoreResult<()> {
        let (state, error, not_before, finished) = match outcome {
            DeliveryOutcome::Done => ("done", None, None, Some(now_ms())),
            DeliveryOutcome::Retry { error, retry_at_ms } => {
                ("queued", Some(error), Some(retry_at_ms), None)
            }
            DeliveryOutcome::Failed { error } => ("failed", Some(error), None, Some(now_ms())),
        };
        sqlx::query(
            "UPDATE github_deliveries
                SET state = $2, error = $3, not_before_ms = COALESCE($4, not_before_ms),
                    finished_at_ms = $5, claimed_until_ms = NULL
              WHERE id = $1",
        )
        .bind(id)
        .bind(state)
        .bind(error)
        .bind(not_before)
        .bind(finished)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delivery(&self, id: &str) -> StoreResult<Option<DeliveryModel>> {
        let sql = format!("SELECT {DELIVERY_COLUMNS} FROM github_deliveries WHERE id = $1");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from)
    }

    async fn prune_deliveries(&self, cutoff_ms: i64) -> StoreResult<u64> {
        Ok(sqlx::query(
            "DELETE FROM github_deliveries WHERE finished_at_ms IS NOT NULL AND finished_at_ms < $1",
        )
        .bind(cutoff_ms)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn save_installation(
        &self,
        id: i64,
        account: &str,
        repos: &[InstalledRepo],
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO github_installations (id, account, updated_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET account = excluded.account,
                 updated_at_ms = excluded.updated_at_ms",
        )
        .bind(id)
        .bind(account)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM github_installation_repos WHERE installation_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        for repo in repos {
            insert_repo(&mut tx, id, repo).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn change_installation_repos(
        &self,
        id: i64,
        added: &[InstalledRepo],
        removed: &[i64],
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let known = sqlx::query("UPDATE github_installations SET updated_at_ms = $2 WHERE id = $1")
            .bind(id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !known {
            return Ok(false);
        }
        for repo in added {
            insert_repo(&mut tx, id, repo).await?;
        }
        for repository_id in removed {
            sqlx::query(
                "DELETE FROM github_installation_repos
                  WHERE installation_id = $1 AND repository_id = $2",
            )
            .bind(id)
            .bind(repository_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn delete_installation(&self, id: i64) -> StoreResult<bool> {
        Ok(
            sqlx::query("DELETE FROM github_installations WHERE id = $1")
                .bind(id)
                .execute(&self.pool)
                .await?
                .rows_affected()
                == 1,
        )
    }

    async fn installation_of(&self, repository_id: i64) -> StoreResult<Option<i64>> {
        sqlx::query_scalar(
            "SELECT installation_id FROM github_installation_repos WHERE repository_id = $1
              ORDER BY installation_id LIMIT 1",
        )
        .bind(repository_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::from)
    }

    async fn insert_app_job(
        &self,
        spec: &JobSpec,
        origin: &JobOrigin,
        app: &NewAppJob<'_>,
    ) -> StoreResult<JobModel> {
        let stored = StoredJob::new(spec, origin)?;
        // An App job carries no OIDC token: the agent checks it with GitHub.
        let origin = JobOrigin {
            oidc_token: None,
            ..origin.clone()
        };
        let mut tx = self.pool.begin().await?;
        let model = super::insert_job_row(&mut tx, spec, &stored, &origin, None, None).await?;
        insert_github_job(&mut tx, model.id, app).await?;
        tx.commit().await?;
        Ok(model)
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
        let runs = apps.len() as u32;
        let mut tx = self.pool.begin().await?;
        let batch = super::insert_batch_row(&mut tx, runs, &origin, None).await?;
        let mut jobs = Vec::with_capacity(apps.len());
        for (run, app) in apps.iter().enumerate() {
            let place = Some((batch.id, run as u32 + 1, runs));
            let model = super::insert_job_row(&mut tx, spec, &stored, &origin, None, place).await?;
            insert_github_job(&mut tx, model.id, app).await?;
            jobs.push(model);
        }
        tx.commit().await?;
        Ok((batch, jobs))
    }

    async fn add_workflow_check_run(
        &self,
        id: JobId,
        installation_id: i64,
        repository: &str,
        head_sha: &str,
        check_name: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO github_jobs (job_id, provenance, installation_id, repository, head_sha,
                 check_name)
             VALUES ($1, NULL, $2, $3, $4, $5) ON CONFLICT (job_id) DO NOTHING",
        )
        .bind(id.0)
        .bind(installation_id)
        .bind(repository)
        .bind(head_sha)
        .bind(check_name)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn app_job(&self, id: JobId) -> StoreResult<Option<AppJobModel>> {
        let sql = format!(
            "SELECT {APP_JOB_COLUMNS} FROM github_jobs g JOIN jobs j ON j.id = g.job_id
              WHERE g.job_id = $1"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from)
    }

    async fn app_job_by_check_run(&self, check_run_id: i64) -> StoreResult<Option<AppJobModel>> {
        let sql = format!(
            "SELECT {APP_JOB_COLUMNS} FROM github_jobs g JOIN jobs j ON j.id = g.job_id
              WHERE g.check_run_id = $1"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(check_run_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from)
    }

    async fn active_app_jobs_of_commit(
        &self,
        repository: &str,
        head_sha: &str,
    ) -> StoreResult<Vec<AppJobModel>> {
        let sql = format!(
            "SELECT {APP_JOB_COLUMNS} FROM github_jobs g JOIN jobs j ON j.id = g.job_id
              WHERE g.repository = $1 AND g.head_sha = $2
                AND j.state IN ('queued', 'assigned', 'running')
              ORDER BY g.job_id"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(repository)
            .bind(head_sha)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)
    }

    async fn check_runs_to_sync(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<AppJobModel>> {
        let sql = format!(
            "SELECT {APP_JOB_COLUMNS} FROM github_jobs g JOIN jobs j ON j.id = g.job_id
              WHERE (g.synced_state IS NULL OR g.synced_state IN ('queued', 'assigned', 'running'))
                        AND g.synced_state IS DISTINCT FROM j.state AND g.sync_after_ms <= $1
              ORDER BY g.job_id LIMIT $2"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)
    }

    async fn check_run_synced(&self, id: JobId, check_run_id: i64, state: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE github_jobs SET check_run_id = $2, synced_state = $3, sync_attempts = 0,
                    sync_after_ms = 0
              WHERE job_id = $1",
        )
        .bind(id.0)
        .bind(check_run_id)
        .bind(state)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn check_run_sync_failed(&self, id: JobId, retry_at_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE github_jobs SET sync_attempts = sync_attempts + 1, sync_after_ms = $2
              WHERE job_id = $1",
        )
        .bind(id.0)
        .bind(retry_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn replace_history_targets(
        &self,
        repository_id: i64,
        targets: &[HistoryTargetModel],
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM github_history_targets WHERE repository_id = $1")
            .bind(repository_id)
            .execute(&mut *tx)
            .await?;
        for t in targets {
            sqlx::query(
                "INSERT INTO github_history_targets (repository_id, repository, installation_id,
                     public, branch, job, commits, runs)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(t.repository_id)
            .bind(&t.repository)
            .bind(t.installation_id)
            .bind(t.public)
            .bind(&t.branch)
            .bind(&t.job)
            .bind(t.commits)
            .bind(t.runs)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn history_targets(&self) -> StoreResult<Vec<HistoryTargetModel>> {
        Ok(sqlx::query_as(
            "SELECT repository_id, repository, installation_id, public, branch, job, commits,
                 runs
             FROM github_history_targets ORDER BY repository, job",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn commit_runs(
        &self,
        repository: &str,
        git_ref: &str,
        job_name: &str,
        limit: i64,
    ) -> StoreResult<Vec<CommitRunCount>> {
        Ok(sqlx::query_as(COMMIT_RUNS_SQL)
            .bind(repository)
            .bind(git_ref)
            .bind(job_name)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn replace_schedules(
        &self,
        repository_id: i64,
        schedules: &[ScheduleModel],
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let kept: Vec<(String, String, String, i64)> = sqlx::query_as(
            "DELETE FROM github_schedules WHERE repository_id = $1
             RETURNING job, cron, branch, next_run_ms",
        )
        .bind(repository_id)
        .fetch_all(&mut *tx)
        .await?;
        for s in schedules {
            let next = kept
                .iter()
                .find(|(job, cron, branch, _)| {
                    *job == s.job && *cron == s.cron && *branch == s.branch
                })
                .map_or(s.next_run_ms, |(_, _, _, next)| *next);
            sqlx::query(
                "INSERT INTO github_schedules (repository_id, repository, installation_id, job,
                     cron, branch, next_run_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            )
            .bind(repository_id)
            .bind(&s.repository)
            .bind(s.installation_id)
            .bind(&s.job)
            .bind(&s.cron)
            .bind(&s.branch)
            .bind(next)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn due_schedules(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<ScheduleModel>> {
        sqlx::query_as(
            "SELECT repository_id, repository, installation_id, job, cron, branch, next_run_ms
               FROM github_schedules WHERE next_run_ms <= $1 ORDER BY next_run_ms LIMIT $2",
        )
        .bind(now_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)
    }

    async fn advance_schedule(
        &self,
        s: &ScheduleModel,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<bool> {
        Ok(sqlx::query(
            "UPDATE github_schedules SET next_run_ms = $5
              WHERE repository_id = $1 AND job = $2 AND cron = $3 AND branch = $4
                AND next_run_ms = $6",
        )
        .bind(s.repository_id)
        .bind(&s.job)
        .bind(&s.cron)
        .bind(&s.branch)
        .bind(to_ms)
        .bind(from_ms)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    async fn claim_comment(
        &self,
        kind: CommentKind,
        id: i64,
        delivery_id: &str,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let owner: String = sqlx::query_scalar(
            "WITH inserted AS (
                 INSERT INTO github_comments_handled (kind, comment_id, delivery_id, handled_at_ms)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (kind, comment_id) DO NOTHING
                 RETURNING delivery_id)
             SELECT delivery_id FROM inserted
             UNION ALL
             SELECT delivery_id FROM github_comments_handled WHERE kind = $1 AND comment_id = $2
             LIMIT 1",
        )
        .bind(kind.as_str())
        .bind(id)
        .bind(delivery_id)
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(owner == delivery_id)
    }
}

async fn insert_repo(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    installation_id: i64,
    repo: &InstalledRepo,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO github_installation_repos (installation_id, repository_id, full_name)
         VALUES ($1, $2, $3)
         ON CONFLICT (installation_id, repository_id) DO UPDATE SET full_name = excluded.full_name",
    )
    .bind(installation_id)
    .bind(repo.id)
    .bind(&repo.full_name)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The App's record of job `id`: its provenance and its check run (none when the job has none).
async fn insert_github_job(
    tx: &mut sqlx::PgConnection,
    id: i64,
    app: &NewAppJob<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO github_jobs (job_id, provenance, installation_id, repository, head_sha,
             check_name, synced_state)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(app.provenance)
    .bind(app.installation_id)
    .bind(app.repository)
    .bind(app.head_sha)
    .bind(app.check_name)
    .bind((!app.check_run).then_some(crate::store::github::NO_CHECK_RUN))
    .execute(tx)
    .await?;
    Ok(())
}
