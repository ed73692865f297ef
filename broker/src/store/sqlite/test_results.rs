//! [`TestResultStore`] on SQLite: writes on the writer thread, reads on the reading
//! connections, as the rest of the SQLite store.

use rusqlite::{OptionalExtension as _, params};
use testbot_proto::batches::BatchId;
use testbot_proto::jobs::JobId;
use testbot_proto::now_ms;

use super::{SqliteStore, lease_refusal};
use crate::store::StoreResult;
use crate::store::test_results::{
    CommitTestRow, NewResultFile, Placement, ResultFileModel, TEST_HISTORY_SQL, TestResultRow,
    TestResultStore, UploadRefusal, case_stats,
};

macro_rules! result_columns {
    () => {
        "file, seq, attempt, suite, classname, name, outcome, duration_ms, message"
    };
}

fn result_row(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<TestResultRow> {
    Ok(TestResultRow {
        file: row.get(at)?,
        seq: row.get(at + 1)?,
        attempt: row.get(at + 2)?,
        suite: row.get(at + 3)?,
        classname: row.get(at + 4)?,
        name: row.get(at + 5)?,
        outcome: row.get(at + 6)?,
        duration_ms: row.get(at + 7)?,
        message: row.get(at + 8)?,
    })
}

#[async_trait::async_trait]
impl TestResultStore for SqliteStore {
    async fn put_result_file(
        &self,
        id: JobId,
        lease: &str,
        file: &NewResultFile,
        max_files: usize,
        max_bytes: u64,
    ) -> StoreResult<Result<(), UploadRefusal>> {
        let (lease, file) = (lease.to_owned(), file.clone());
        self.writer
            .write(move |tx| {
                type Job = (
                    Option<String>,
                    Option<String>,
                    Option<String>,
                    Option<String>,
                    i64,
                    Placement,
                );
                let running: Option<Job> = tx
                    .prepare_cached(
                        "SELECT repository, git_ref, commit_sha, job_name, created_at_ms, agent,
                             spec, metadata
                         FROM jobs
                         WHERE id = ?1 AND lease = ?2 AND state IN ('assigned', 'running')",
                    )?
                    .query_row(params![id.0, lease], |row| {
                        let agent: Option<String> = row.get(5)?;
                        let spec: String = row.get(6)?;
                        let metadata: Option<String> = row.get(7)?;
                        Ok((
                            row.get(0)?,
                            row.get(1)?,
                            row.get(2)?,
                            row.get(3)?,
                            row.get(4)?,
                            Placement::of_job(agent.as_deref(), &spec, metadata.as_deref()),
                        ))
                    })
                    .optional()?;
                let Some((repository, git_ref, commit_sha, job_name, at_ms, placement)) = running
                else {
                    return Ok(Err(UploadRefusal::Lease(lease_refusal(tx, id)?)));
                };
                let stored_before: Option<i64> = tx
                    .prepare_cached("SELECT 1 FROM result_files WHERE job_id = ?1 AND path = ?2")?
                    .query_row(params![id.0, file.path], |row| row.get(0))
                    .optional()?;
                if stored_before.is_some() {
                    return Ok(Ok(()));
                }
                let (files, bytes): (i64, i64) = tx
                    .prepare_cached(
                        "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM result_files
                         WHERE job_id = ?1 AND path != ?2",
                    )?
                    .query_row(params![id.0, file.path], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })?;
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
                tx.prepare_cached(
                    "INSERT INTO result_files (job_id, path, bytes, data, report, uploaded_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    id.0,
                    file.path,
                    file.data.len() as i64,
                    file.data,
                    file.report,
                    now_ms()
                ])?;
                let mut insert = tx.prepare_cached(concat!(
                    "INSERT INTO test_results (job_id, ",
                    result_columns!(),
                    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
                ))?;
                for row in &file.rows {
                    insert.execute(params![
                        id.0,
                        row.file,
                        row.seq,
                        row.attempt,
                        row.suite,
                        row.classname,
                        row.name,
                        row.outcome,
                        row.duration_ms,
                        row.message
                    ])?;
                }
                if let (Some(repository), Some(git_ref), Some(commit)) =
                    (repository, git_ref, commit_sha)
                {
                    let job_name = job_name.unwrap_or_default();
                    let mut commit_stats = tx.prepare_cached(
                        "INSERT INTO test_commit_stats (repository, git_ref, job_name, suite,
                             classname, name, commit_sha, runs, fails, within, first_at_ms,
                             last_at_ms, site, agent, nodes, image)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11, ?12, ?13,
                             ?14, ?15)
                         ON CONFLICT (repository, git_ref, job_name, suite, classname, name,
                             commit_sha, site, agent, nodes, image)
                         DO UPDATE SET runs = runs + excluded.runs, fails = fails + excluded.fails,
                             within = within + excluded.within,
                             first_at_ms = MIN(first_at_ms, excluded.first_at_ms),
                             last_at_ms = MAX(last_at_ms, excluded.last_at_ms)",
                    )?;
                    let mut test_stats = tx.prepare_cached(
                        "INSERT INTO test_stats (repository, git_ref, job_name, suite, classname,
                             name, bad_runs, last_bad_at_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                         ON CONFLICT (repository, git_ref, job_name, suite, classname, name)
                         DO UPDATE SET bad_runs = bad_runs + excluded.bad_runs,
                             last_bad_at_ms = MAX(COALESCE(last_bad_at_ms, 0),
                                                  excluded.last_bad_at_ms)",
                    )?;
                    for stat in case_stats(&file.rows) {
                        commit_stats.execute(params![
                            repository,
                            git_ref,
                            job_name,
                            stat.suite,
                            stat.classname,
                            stat.name,
                            commit,
                            stat.runs,
                            stat.fails,
                            stat.within,
                            at_ms,
                            placement.site,
                            placement.agent,
                            placement.nodes,
                            placement.image
                        ])?;
                        let bad = stat.fails + stat.within;
                        if bad > 0 {
                            test_stats.execute(params![
                                repository,
                                git_ref,
                                job_name,
                                stat.suite,
                                stat.classname,
                                stat.name,
                                bad,
                                at_ms
                            ])?;
                        }
                    }
                }
                Ok(Ok(()))
            })
            .await
    }

    async fn result_files(&self, id: JobId) -> StoreResult<Vec<ResultFileModel>> {
        self.readers
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT path, bytes, report FROM result_files WHERE job_id = ?1 ORDER BY path",
                )?
                .query_map([id.0], |row| {
                    Ok(ResultFileModel {
                        path: row.get(0)?,
                        bytes: row.get(1)?,
                        report: row.get(2)?,
                    })
                })?
                .collect()
            })
            .await
    }

    async fn result_file_data(&self, id: JobId, path: &str) -> StoreResult<Option<Vec<u8>>> {
        let path = path.to_owned();
        self.readers
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT data FROM result_files WHERE job_id = ?1 AND path = ?2",
                )?
                .query_row(params![id.0, path], |row| row.get(0))
                .optional()
            })
            .await
    }

    async fn test_results(&self, id: JobId) -> StoreResult<Vec<TestResultRow>> {
        self.readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    result_columns!(),
                    " FROM test_results WHERE job_id = ?1 ORDER BY file, seq, attempt"
                ))?
                .query_map([id.0], |row| result_row(row, 0))?
                .collect()
            })
            .await
    }

    async fn batch_test_results(&self, batch: BatchId) -> StoreResult<Vec<(i64, TestResultRow)>> {
        self.readers
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT j.batch_run, r.file, r.seq, r.attempt, r.suite, r.classname, r.name,
                            r.outcome, r.duration_ms, r.message
                     FROM jobs j JOIN test_results r ON r.job_id = j.id
                     WHERE j.batch_id = ?1
                     ORDER BY j.batch_run, r.file, r.seq, r.attempt",
                )?
                .query_map([batch.0], |row| Ok((row.get(0)?, result_row(row, 1)?)))?
                .collect()
            })
            .await
    }

    async fn test_history(
        &self,
        repository: &str,
        git_ref: Option<&str>,
        since_ms: i64,
    ) -> StoreResult<Vec<CommitTestRow>> {
        let (repository, git_ref) = (repository.to_owned(), git_ref.map(str::to_owned));
        self.readers
            .read(move |conn| {
                // SQLite reads `$N` as a numbered parameter, as PostgreSQL does.
                conn.prepare_cached(TEST_HISTORY_SQL)?
                    .query_map(params![repository, git_ref, since_ms], |row| {
                        Ok(CommitTestRow {
                            job_name: row.get(0)?,
                            suite: row.get(1)?,
                            classname: row.get(2)?,
                            name: row.get(3)?,
                            commit_sha: row.get(4)?,
                            site: row.get(5)?,
                            agent: row.get(6)?,
                            nodes: row.get(7)?,
                            image: row.get(8)?,
                            runs: row.get(9)?,
                            fails: row.get(10)?,
                            within: row.get(11)?,
                            first_at_ms: row.get(12)?,
                            last_at_ms: row.get(13)?,
                        })
                    })?
                    .collect()
            })
            .await
    }
}
