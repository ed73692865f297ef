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
    /// Where these runs ran; empty where not known.
    pub site: String,
    pub agent: String,
    pub nodes: String,
    pub image: String,
    pub runs: i64,
    /// Runs that failed (no attempt passed).
    pub fails: i64,
    /// Runs that failed and then passed on a rerun.
    pub within: i64,
    pub first_at_ms: i64,
    pub last_at_ms: i64,
}

/// Where a job ran, as the statistics count it: empty text for what is not known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub site: String,
    pub agent: String,
    /// Slurm's node list (`c[041-042]`), as the agent reported it.
    pub nodes: String,
    pub image: String,
}

impl Placement {
    /// The placement of a job from its row: `agent` is `site/name`, `spec` its JobSpec JSON,
    /// `metadata` its executor's facts as a JSON object.
    pub fn of_job(agent: Option<&str>, spec: &str, metadata: Option<&str>) -> Placement {
        let (site, agent) = match agent.and_then(|a| a.split_once('/')) {
            Some((site, name)) => (site.to_string(), name.to_string()),
            None => (String::new(), agent.unwrap_or_default().to_string()),
        };
        let image = serde_json::from_str::<testbot_proto::jobs::JobSpec>(spec)
            .ok()
            .and_then(|spec| spec.image)
            .unwrap_or_default();
        let nodes = metadata
            .and_then(|m| {
                serde_json::from_str::<std::collections::BTreeMap<String, String>>(m).ok()
            })
            .and_then(|mut m| m.remove(testbot_proto::jobs::SLURM_NODES))
            .unwrap_or_default();
        Placement {
            site,
            agent,
            nodes,
            image,
        }
    }
}

/// One test's runs in one uploaded file, summed for the statistics tables: a case failed
/// when none of its attempts passed, and failed within when it failed and then passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseStat {
    pub suite: String,
    /// Empty for none: a part of the key.
    pub classname: String,
    pub name: String,
    pub runs: i64,
    pub fails: i64,
    pub within: i64,
}

/// The rows of one file (ordered by case and attempt), summed per test.
pub fn case_stats(rows: &[TestResultRow]) -> Vec<CaseStat> {
    let mut stats: std::collections::BTreeMap<(String, String, String), CaseStat> =
        std::collections::BTreeMap::new();
    let mut i = 0;
    while i < rows.len() {
        let seq = rows[i].seq;
        let (mut any_fail, mut any_pass) = (false, false);
        let first = &rows[i];
        while i < rows.len() && rows[i].seq == seq {
            match rows[i].outcome.as_str() {
                "failed" | "error" => any_fail = true,
                "passed" => any_pass = true,
                _ => {}
            }
            i += 1;
        }
        let key = (
            first.suite.clone(),
            first.classname.clone().unwrap_or_default(),
            first.name.clone(),
        );
        let stat = stats.entry(key).or_insert_with(|| CaseStat {
            suite: first.suite.clone(),
            classname: first.classname.clone().unwrap_or_default(),
            name: first.name.clone(),
            runs: 0,
            fails: 0,
            within: 0,
        });
        stat.runs += 1;
        stat.fails += i64::from(any_fail && !any_pass);
        stat.within += i64::from(any_fail && any_pass);
    }
    stats.into_values().collect()
}

/// What both backends read history with: the tests of the repository (and ref) with a bad run
/// in the window, and their rows per commit in the window.
pub(crate) const TEST_HISTORY_SQL: &str = "
SELECT NULLIF(c.job_name, '') AS job_name, c.suite, NULLIF(c.classname, '') AS classname,
       c.name, c.commit_sha, c.site, c.agent, c.nodes, c.image, c.runs, c.fails, c.within, c.first_at_ms, c.last_at_ms
FROM test_stats t
JOIN test_commit_stats c
  ON c.repository = t.repository AND c.git_ref = t.git_ref AND c.job_name = t.job_name
 AND c.suite = t.suite AND c.classname = t.classname AND c.name = t.name
WHERE t.repository = $1 AND (CAST($2 AS TEXT) IS NULL OR t.git_ref = CAST($2 AS TEXT))
  AND t.bad_runs > 0 AND t.last_bad_at_ms >= $3 AND c.last_at_ms >= $3
ORDER BY c.job_name, c.suite, c.classname, c.name, c.first_at_ms";

/// Why an upload was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadRefusal {
    Lease(LeaseRefusal),
    /// The job's files would pass a limit; the message says which.
    OverLimit(String),
}

#[async_trait::async_trait]
pub trait TestResultStore: Send + Sync {
    /// Stores a result file of job `id`, which must be running under `lease`, with its test
    /// results, and adds them to the statistics of the job's repository, ref and commit (when
    /// it has them), unless the job's files would pass `max_files` or `max_bytes` together. A
    /// path stored before (an agent's retry) is kept as it was and counted once.
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
