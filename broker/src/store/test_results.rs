//! What the broker keeps of a job's test results: the result files its agent uploaded, as they
//! were, and the test cases read from them, one row per attempt. A part of [`super::Store`] of
//! its own, implemented beside each backend (`sqlite/test_results.rs`,
//! `postgres/test_results.rs`).

use testbot_proto::batches::BatchId;
use testbot_proto::jobs::JobId;

use super::{LeaseRefusal, StoreResult};

/// One attempt of one test case, as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TestResultRow {
    pub file: String,
    /// The case's place in its file, from 0.
    pub seq: i64,
    /// From 1, in the order the attempts ran.
    pub attempt: i64,
    pub suite: String,
    pub classname: Option<String>,
    pub name: String,
    /// `passed`, `failed`, `error` or `skipped`.
    pub outcome: String,
    pub duration_ms: Option<i64>,
    pub message: Option<String>,
}

/// A result file to store, with what reading it gave.
#[derive(Debug, Clone)]
pub struct NewResultFile {
    pub path: String,
    pub data: Vec<u8>,
    /// A [`testbot_proto::test_results::FileReport`], JSON.
    pub report: String,
    pub rows: Vec<TestResultRow>,
}

/// A stored result file, without its bytes.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ResultFileModel {
    pub path: String,
    pub bytes: i64,
    pub report: String,
}

/// One test at one commit: how its runs there went. Only tests that failed at least once in the
/// window are read.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CommitTestRow {
    pub job_name: Option<String>,
    pub suite: String,
    pub classname: Option<String>,
    pub name: String,
    pub commit_sha: String,
    pub runs: i64,
    /// Runs that failed (no attempt passed).
    pub fails: i64,
    /// Runs that failed and then passed on a rerun.
    pub within: i64,
    pub first_at_ms: i64,
    pub last_at_ms: i64,
}

/// What both backends read history with: cases (one per job, file and case) with whether any
/// attempt failed and any passed, grouped per test and commit; only tests with a failure.
/// A case failed when no attempt passed (a rerun stops at its first pass).
pub(crate) const TEST_HISTORY_SQL: &str = "
WITH cases AS (
    SELECT j.job_name, j.commit_sha, j.created_at_ms, r.suite, r.classname, r.name,
           MAX(CASE WHEN r.outcome IN ('failed', 'error') THEN 1 ELSE 0 END) AS any_fail,
           MAX(CASE WHEN r.outcome = 'passed' THEN 1 ELSE 0 END) AS any_pass
    FROM jobs j JOIN test_results r ON r.job_id = j.id
    WHERE j.repository = $1 AND (CAST($2 AS TEXT) IS NULL OR j.git_ref = CAST($2 AS TEXT))
      AND j.created_at_ms >= $3
      AND j.commit_sha IS NOT NULL
    GROUP BY j.id, r.file, r.seq, j.job_name, j.commit_sha, j.created_at_ms, r.suite,
             r.classname, r.name
),
per_commit AS (
    SELECT job_name, suite, classname, name, commit_sha,
           COUNT(*) AS runs,
           SUM(CASE WHEN any_fail = 1 AND any_pass = 0 THEN 1 ELSE 0 END) AS fails,
           SUM(CASE WHEN any_fail = 1 AND any_pass = 1 THEN 1 ELSE 0 END) AS within,
           MIN(created_at_ms) AS first_at_ms, MAX(created_at_ms) AS last_at_ms
    FROM cases
    GROUP BY job_name, suite, classname, name, commit_sha
),
marked AS (
    SELECT p.*, SUM(fails + within) OVER (PARTITION BY job_name, suite, classname, name) AS bad
    FROM per_commit p
)
SELECT job_name, suite, classname, name, commit_sha, runs, fails, within, first_at_ms,
       last_at_ms
FROM marked WHERE bad > 0
ORDER BY job_name, suite, classname, name, first_at_ms";

/// Why an upload was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadRefusal {
    Lease(LeaseRefusal),
    /// The job's files would pass a limit; the message says which.
    OverLimit(String),
}

#[async_trait::async_trait]
pub trait TestResultStore: Send + Sync {
    /// Stores a result file of job `id`, which must be running under `lease`, replacing an
    /// earlier upload of the same path and its test cases (an agent's retry), unless the job's
    /// files would pass `max_files` or `max_bytes` together.
    async fn put_result_file(
        &self,
        id: JobId,
        lease: &str,
        file: &NewResultFile,
        max_files: usize,
        max_bytes: u64,
    ) -> StoreResult<Result<(), UploadRefusal>>;
    /// The job's result files, by path.
    async fn result_files(&self, id: JobId) -> StoreResult<Vec<ResultFileModel>>;
    /// One result file's bytes.
    async fn result_file_data(&self, id: JobId, path: &str) -> StoreResult<Option<Vec<u8>>>;
    /// The job's test results, by file, case and attempt.
    async fn test_results(&self, id: JobId) -> StoreResult<Vec<TestResultRow>>;
    /// The test results of every run of a batch, each with its run number, by run, file, case
    /// and attempt.
    async fn batch_test_results(&self, batch: BatchId) -> StoreResult<Vec<(i64, TestResultRow)>>;
    /// The history of every test of `repository` that failed at least once in jobs submitted
    /// since `since_ms` (of `git_ref` only, if given): per test and commit, by test and time.
    async fn test_history(
        &self,
        repository: &str,
        git_ref: Option<&str>,
        since_ms: i64,
    ) -> StoreResult<Vec<CommitTestRow>>;
}
