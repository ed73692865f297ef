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
}
