//! [`TestResultStore`] on PostgreSQL: what `sqlite/test_results.rs` does; a file's cases are
//! inserted in one statement from arrays.

use testbot_proto::batches::BatchId;
use testbot_proto::jobs::JobId;
use testbot_proto::now_ms;

use super::PgStore;
use crate::store::StoreResult;
use crate::store::test_results::{
    CaseStat, CommitTestRow, NewResultFile, Placement, ResultFileModel, TEST_HISTORY_SQL,
    TestResultRow, TestResultStore, UploadRefusal, case_stats,
};

const RESULT_COLUMNS: &str =
    "file, seq, attempt, suite, classname, name, outcome, duration_ms, message";

#[async_trait::async_trait]
impl TestResultStore for PgStore {
    async fn put_result_file(
        &self,
        id: JobId,
        lease: &str,
        file: &NewResultFile,
        max_files: usize,
        max_bytes: u64,
    ) -> StoreResult<Result<(), UploadRefusal>> {
        let mut tx = self.pool.begin().await?;
        // The job's row is locked: a finish cannot slip in, nor a second upload's count.
        type Job = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            i64,
            Option<String>,
            String,
            Option<String>,
        );
        let running: Option<Job> = sqlx::query_as(
            "SELECT repository, git_ref, commit_sha, job_name, created_at_ms, agent, spec,
                 metadata
             FROM jobs
             WHERE id = $1 AND lease = $2 AND state IN ('assigned', 'running') FOR UPDATE",
        )
        .bind(id.0)
        .bind(lease)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((repository, git_ref, commit_sha, job_name, at_ms, agent, spec, metadata)) =
            running
        else {
            drop(tx);
            return Ok(Err(UploadRefusal::Lease(self.lease_refusal(id).await?)));
        };
        let stored_before: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM result_files WHERE job_id = $1 AND path = $2")
                .bind(id.0)
                .bind(&file.path)
                .fetch_optional(&mut *tx)
                .await?;
        if stored_before.is_some() {
            return Ok(Ok(()));
        }
        let (files, bytes): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0)::BIGINT FROM result_files
             WHERE job_id = $1 AND path != $2",
        )
        .bind(id.0)
        .bind(&file.path)
        .fetch_one(&mut *tx)
        .await?;
        if files as usize >= max_files {
            return Ok(Err(UploadRefusal::OverLimit(format!(
                "job {id} has {files} result files, the most a job may have"
            ))));
        }
        let total = bytes as u64 + file.data.len() as u64;
        if total > max_bytes {
            return Ok(Err(UploadRefusal::OverLimit(format!(
                "job {id}'s result files would hold {total} bytes together; the most is {max_bytes}"
            ))));
        }
        sqlx::query(
            "INSERT INTO result_files (job_id, path, bytes, data, report, uploaded_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id.0)
        .bind(&file.path)
        .bind(file.data.len() as i64)
        .bind(&file.data)
        .bind(&file.report)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        // In slices, so that no statement carries more than a few megabytes of parameters.
        for rows in file.rows.chunks(10_000) {
            let column = |f: fn(&TestResultRow) -> Option<String>| -> Vec<Option<String>> {
                rows.iter().map(f).collect()
            };
            sqlx::query(
                "INSERT INTO test_results (job_id, file, seq, attempt, suite, classname, name,
                     outcome, duration_ms, message)
                 SELECT $1, * FROM UNNEST($2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::TEXT[],
                     $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::BIGINT[], $10::TEXT[])",
            )
            .bind(id.0)
            .bind(column(|r| Some(r.file.clone())))
            .bind(rows.iter().map(|r| r.seq).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.attempt).collect::<Vec<_>>())
            .bind(column(|r| Some(r.suite.clone())))
            .bind(column(|r| r.classname.clone()))
            .bind(column(|r| Some(r.name.clone())))
            .bind(column(|r| Some(r.outcome.clone())))
            .bind(rows.iter().map(|r| r.duration_ms).collect::<Vec<_>>())
            .bind(column(|r| r.message.clone()))
            .execute(&mut *tx)
            .await?;
        }
        let placement = Placement::of_job(agent.as_deref(), &spec, metadata.as_deref());
        if let (Some(repository), Some(git_ref), Some(commit)) = (repository, git_ref, commit_sha) {
            let job_name = job_name.unwrap_or_default();
            // One row per test (summed first): an upsert may touch each row once.
            let stats = case_stats(&file.rows);
            for stats in stats.chunks(10_000) {
                let text =
                    |f: fn(&CaseStat) -> String| -> Vec<String> { stats.iter().map(f).collect() };
                let number =
                    |f: fn(&CaseStat) -> i64| -> Vec<i64> { stats.iter().map(f).collect() };
                sqlx::query(
                    "INSERT INTO test_commit_stats (repository, git_ref, job_name, suite,
                         classname, name, commit_sha, runs, fails, within, first_at_ms,
                         last_at_ms, site, agent, nodes, image)
                     SELECT $1, $2, $3, s.suite, s.classname, s.name, $4, s.runs, s.fails,
                            s.within, $5, $5, $12, $13, $14, $15
                     FROM UNNEST($6::TEXT[], $7::TEXT[], $8::TEXT[], $9::BIGINT[],
                                 $10::BIGINT[], $11::BIGINT[])
                          AS s (suite, classname, name, runs, fails, within)
                     ON CONFLICT (repository, git_ref, job_name, suite, classname, name,
                         commit_sha, site, agent, nodes, image)
                     DO UPDATE SET runs = test_commit_stats.runs + excluded.runs,
                         fails = test_commit_stats.fails + excluded.fails,
                         within = test_commit_stats.within + excluded.within,
                         first_at_ms = LEAST(test_commit_stats.first_at_ms, excluded.first_at_ms),
                         last_at_ms = GREATEST(test_commit_stats.last_at_ms, excluded.last_at_ms)",
                )
                .bind(&repository)
                .bind(&git_ref)
                .bind(&job_name)
                .bind(&commit)
                .bind(at_ms)
                .bind(text(|s| s.suite.clone()))
                .bind(text(|s| s.classname.clone()))
                .bind(text(|s| s.name.clone()))
                .bind(number(|s| s.runs))
                .bind(number(|s| s.fails))
                .bind(number(|s| s.within))
                .bind(&placement.site)
                .bind(&placement.agent)
                .bind(&placement.nodes)
                .bind(&placement.image)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO test_stats (repository, git_ref, job_name, suite, classname,
                         name, bad_runs, last_bad_at_ms)
                     SELECT $1, $2, $3, s.suite, s.classname, s.name, s.bad, $4
                     FROM UNNEST($5::TEXT[], $6::TEXT[], $7::TEXT[], $8::BIGINT[])
                          AS s (suite, classname, name, bad)
                     WHERE s.bad > 0
                     ON CONFLICT (repository, git_ref, job_name, suite, classname, name)
                     DO UPDATE SET bad_runs = test_stats.bad_runs + excluded.bad_runs,
                         last_bad_at_ms = GREATEST(test_stats.last_bad_at_ms,
                                                   excluded.last_bad_at_ms)",
                )
                .bind(&repository)
                .bind(&git_ref)
                .bind(&job_name)
                .bind(at_ms)
                .bind(text(|s| s.suite.clone()))
                .bind(text(|s| s.classname.clone()))
                .bind(text(|s| s.name.clone()))
                .bind(number(|s| s.fails + s.within))
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(Ok(()))
    }

    async fn result_files(&self, id: JobId) -> StoreResult<Vec<ResultFileModel>> {
        Ok(sqlx::query_as(
            "SELECT path, bytes, report FROM result_files WHERE job_id = $1 ORDER BY path",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn result_file_data(&self, id: JobId, path: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT data FROM result_files WHERE job_id = $1 AND path = $2")
                .bind(id.0)
                .bind(path)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn test_results(&self, id: JobId) -> StoreResult<Vec<TestResultRow>> {
        let sql = format!(
            "SELECT {RESULT_COLUMNS} FROM test_results WHERE job_id = $1 ORDER BY file, seq, attempt"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn batch_test_results(&self, batch: BatchId) -> StoreResult<Vec<(i64, TestResultRow)>> {
        #[derive(sqlx::FromRow)]
        struct Row {
            batch_run: i64,
            #[sqlx(flatten)]
            result: TestResultRow,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT j.batch_run, r.file, r.seq, r.attempt, r.suite, r.classname, r.name,
                    r.outcome, r.duration_ms, r.message
             FROM jobs j JOIN test_results r ON r.job_id = j.id
             WHERE j.batch_id = $1
             ORDER BY j.batch_run, r.file, r.seq, r.attempt",
        )
        .bind(batch.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.batch_run, r.result)).collect())
    }

    async fn test_history(
        &self,
        repository: &str,
        git_ref: Option<&str>,
        since_ms: i64,
    ) -> StoreResult<Vec<CommitTestRow>> {
        Ok(sqlx::query_as(TEST_HISTORY_SQL)
            .bind(repository)
            .bind(git_ref)
            .bind(since_ms)
            .fetch_all(&self.pool)
            .await?)
    }
}
