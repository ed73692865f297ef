//! [`TestResultStore`] on PostgreSQL: what `sqlite/test_results.rs` does; a file's cases are
//! inserted in one statement from arrays.

use testbot_proto::batches::BatchId;
use testbot_proto::jobs::JobId;
use testbot_proto::now_ms;

use super::PgStore;
use crate::store::StoreResult;
use crate::store::test_results::{
    CommitTestRow, NewResultFile, ResultFileModel, TEST_HISTORY_SQL, TestResultRow,
    TestResultStore, UploadRefusal,
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
        let running: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM jobs
             WHERE id = $1 AND lease = $2 AND state IN ('assigned', 'running') FOR UPDATE",
        )
        .bind(id.0)
        .bind(lease)
        .fetch_optional(&mut *tx)
        .await?;
        if running.is_none() {
            drop(tx);
            return Ok(Err(UploadRefusal::Lease(self.lease_refusal(id).await?)));
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
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (job_id, path) DO UPDATE SET bytes = excluded.bytes,
                 data = excluded.data, report = excluded.report,
                 uploaded_at_ms = excluded.uploaded_at_ms",
        )
        .bind(id.0)
        .bind(&file.path)
        .bind(file.data.len() as i64)
        .bind(&file.data)
        .bind(&file.report)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM test_results WHERE job_id = $1 AND file = $2")
            .bind(id.0)
            .bind(&file.path)
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
