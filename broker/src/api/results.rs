//! Test results: agents upload a job's result files; clients read what was read from them,
//! for a job and across the runs of a batch, and download the files as they were.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use testbot_proto::batches::BatchId;
use testbot_proto::jobs::JobId;
use testbot_proto::junit::{JunitError, JunitLimits, TestOutcome, TestReport, parse_junit};
use testbot_proto::test_results::{
    AttemptResult, BatchResults, CaseResult, CaseTotals, FileReport, FlakyQuery, FlakyReport,
    JobResults, MAX_MESSAGE_BYTES, MAX_RESULT_BYTES_PER_JOB, MAX_RESULT_FILES, ResultFile,
    TestHistory, UploadAck, UploadQuery, validate_result_path,
};

use super::{find_job, refusal_error};
use crate::access::{JobAccess, authorize_job_access};
use crate::auth::Principal;
use crate::error::{ApiError, ApiPath, ApiQuery};
use crate::state::AppState;
use crate::store::test_results::{CommitTestRow, NewResultFile, TestResultRow, UploadRefusal};

/// `PUT /agent/jobs/{id}/files?lease=L&path=P`: one result file, its bytes the body.
pub(super) async fn upload_result_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    body: Bytes,
) -> Result<axum::Json<UploadAck>, ApiError> {
    principal.require_agent()?;
    validate_result_path(&query.path).map_err(ApiError::BadRequest)?;
    let path = query.path.clone();
    let data = body.to_vec();
    let (report, rows) = tokio::task::spawn_blocking(move || read_file(&path, &data))
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("reading a result file: {e}")))?;
    let file = NewResultFile {
        path: query.path.clone(),
        data: body.to_vec(),
        report: serde_json::to_string(&report)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("{e}")))?,
        rows,
    };
    let stored = state
        .store
        .put_result_file(
            id,
            &query.lease,
            &file,
            MAX_RESULT_FILES,
            MAX_RESULT_BYTES_PER_JOB,
        )
        .await?;
    match stored {
        Ok(()) => {
            tracing::debug!(job_id = %id, path = %query.path, bytes = body.len(), "Result file stored.");
            Ok(axum::Json(UploadAck {
                path: query.path,
                bytes: body.len() as u64,
                report,
            }))
        }
        Err(UploadRefusal::Lease(refusal)) => Err(refusal_error(id, refusal)),
        Err(UploadRefusal::OverLimit(message)) => Err(ApiError::PayloadTooLarge(message)),
    }
}

/// What reading `data` as JUnit XML gives: the report and the rows to store. Blocking.
fn read_file(path: &str, data: &[u8]) -> (FileReport, Vec<TestResultRow>) {
    let start = data
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(data)
        .iter()
        .find(|b| !b.is_ascii_whitespace());
    if start != Some(&b'<') {
        return (
            FileReport::NotJunit {
                reason: "not XML".into(),
            },
            Vec::new(),
        );
    }
    match parse_junit(std::io::Cursor::new(data), &JunitLimits::default()) {
        Ok(report) => {
            let rows = rows_of(path, &report);
            (
                FileReport::Junit {
                    totals: report.totals,
                    truncated: report.truncated,
                    warnings: report.warnings,
                },
                rows,
            )
        }
        Err(err @ (JunitError::NotJunit { .. } | JunitError::Empty)) => (
            FileReport::NotJunit {
                reason: err.to_string(),
            },
            Vec::new(),
        ),
        Err(err) => (
            FileReport::Unreadable {
                error: err.to_string(),
            },
            Vec::new(),
        ),
    }
}

fn rows_of(path: &str, report: &TestReport) -> Vec<TestResultRow> {
    let mut rows = Vec::new();
    for (seq, case) in report.cases.iter().enumerate() {
        for (i, attempt) in case.attempts.iter().enumerate() {
            rows.push(TestResultRow {
                file: path.to_string(),
                seq: seq as i64,
                attempt: i as i64 + 1,
                suite: case.suite.clone(),
                classname: case.classname.clone(),
                name: case.name.clone(),
                outcome: outcome_name(attempt.outcome).to_string(),
                duration_ms: attempt
                    .duration_secs
                    .filter(|d| d.is_finite() && *d >= 0.0)
                    .map(|d| (d * 1000.0).round().min(i64::MAX as f64) as i64),
                message: attempt
                    .message
                    .as_ref()
                    .map(|m| cut(&m.text, MAX_MESSAGE_BYTES)),
            });
        }
    }
    rows
}

fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn outcome_name(outcome: TestOutcome) -> &'static str {
    match outcome {
        TestOutcome::Passed => "passed",
        TestOutcome::Failed => "failed",
        TestOutcome::Error => "error",
        TestOutcome::Skipped => "skipped",
    }
}

fn outcome_of(name: &str) -> TestOutcome {
    match name {
        "passed" => TestOutcome::Passed,
        "failed" => TestOutcome::Failed,
        "skipped" => TestOutcome::Skipped,
        _ => TestOutcome::Error,
    }
}

/// Groups stored rows (ordered by file, case, attempt) into cases.
fn cases_of(rows: impl IntoIterator<Item = TestResultRow>) -> Vec<CaseResult> {
    let mut cases: Vec<CaseResult> = Vec::new();
    let mut last: Option<(String, i64)> = None;
    for row in rows {
        let key = (row.file.clone(), row.seq);
        let attempt = AttemptResult {
            outcome: outcome_of(&row.outcome),
            duration_ms: row.duration_ms.map(|d| d.max(0) as u64),
            message: row.message,
        };
        match cases.last_mut() {
            Some(case) if last.as_ref() == Some(&key) => case.attempts.push(attempt),
            _ => cases.push(CaseResult {
                file: row.file,
                suite: row.suite,
                classname: row.classname,
                name: row.name,
                attempts: vec![attempt],
            }),
        }
        last = Some(key);
    }
    cases
}

pub(super) async fn job_results_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
) -> Result<axum::Json<JobResults>, ApiError> {
    let job = find_job(&state, id).await?;
    authorize_job_access(&state, &principal, &job, JobAccess::Read).await?;
    let files = state
        .store
        .result_files(id)
        .await?
        .into_iter()
        .map(|f| ResultFile {
            report: serde_json::from_str(&f.report).unwrap_or_else(|e| FileReport::Unreadable {
                error: format!("the broker's record of this file is damaged: {e}"),
            }),
            path: f.path,
            bytes: f.bytes.max(0) as u64,
        })
        .collect();
    let cases = cases_of(state.store.test_results(id).await?);
    Ok(axum::Json(JobResults {
        job: id,
        totals: CaseTotals::of(&cases),
        files,
        cases,
    }))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileQuery {
    path: String,
}

/// `GET /jobs/{id}/results/file?path=P`: a result file as it was uploaded.
pub(super) async fn result_file_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
    ApiQuery(query): ApiQuery<FileQuery>,
) -> Result<Response, ApiError> {
    let job = find_job(&state, id).await?;
    authorize_job_access(&state, &principal, &job, JobAccess::Read).await?;
    let data = state
        .store
        .result_file_data(id, &query.path)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("job {id} has no result file {:?}", query.path))
        })?;
    let name = query
        .path
        .rsplit('/')
        .next()
        .unwrap_or("result")
        .replace('"', "");
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        data,
    )
        .into_response())
}

pub(super) async fn batch_results_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<BatchId>,
) -> Result<axum::Json<BatchResults>, ApiError> {
    let not_found = || ApiError::NotFound(format!("batch {id} does not exist"));
    let batch = state.store.batch(id).await?.ok_or_else(not_found)?;
    let jobs = state.store.batch_jobs(id).await?;
    let first = jobs.first().ok_or_else(not_found)?;
    authorize_job_access(&state, &principal, first, JobAccess::Read).await?;
    let rows = state.store.batch_test_results(id).await?;
    // Rows come by run, then file, case, attempt: group each run's into cases.
    let mut cases = Vec::new();
    let mut run_rows: Vec<TestResultRow> = Vec::new();
    let mut current = None;
    for (run, row) in rows {
        if current.is_some_and(|c| c != run) {
            let done = std::mem::take(&mut run_rows);
            cases.extend(
                cases_of(done)
                    .into_iter()
                    .map(|c| (current.unwrap_or(0) as u32, c)),
            );
        }
        current = Some(run);
        run_rows.push(row);
    }
    if let Some(run) = current {
        cases.extend(cases_of(run_rows).into_iter().map(|c| (run as u32, c)));
    }
    let runs = batch.runs.clamp(0, i64::from(u32::MAX)) as u32;
    Ok(axum::Json(BatchResults::of(id, runs, cases)))
}

/// Default window of `GET /repos/{owner}/{name}/flaky`.
const FLAKY_WINDOW: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// `GET /repos/{owner}/{name}/flaky`: every test of the repository that failed at least once
/// in the window, with how it went at each commit, flaky ones first.
pub(super) async fn flaky_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((owner, name)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<FlakyQuery>,
) -> Result<axum::Json<FlakyReport>, ApiError> {
    let repository = super::repos::repo_name(owner, name)?;
    match &principal {
        Principal::Workflow { claims, .. }
            if claims.repository.eq_ignore_ascii_case(&repository) => {}
        other => other.require_operator()?,
    }
    let window = match &query.since {
        Some(since) => humantime::parse_duration(since).map_err(|e| {
            ApiError::BadRequest(format!("since {since:?} is not a duration like 30d: {e}"))
        })?,
        None => FLAKY_WINDOW,
    };
    let since_ms = testbot_proto::now_ms().saturating_sub(window.as_millis() as i64);
    let limit = query.limit.unwrap_or(100).clamp(1, 1000) as usize;
    let git_ref = query.git_ref();
    let rows = state
        .store
        .test_history(&repository, git_ref.as_deref(), since_ms)
        .await?;
    let mut tests = histories(rows);
    tests.sort_by(|a, b| {
        let rate = |t: &TestHistory| t.failures as f64 / t.runs.max(1) as f64;
        b.flaky_commits
            .cmp(&a.flaky_commits)
            .then(b.is_broken().cmp(&a.is_broken()))
            .then(rate(b).total_cmp(&rate(a)))
            .then_with(|| a.test_id().cmp(&b.test_id()))
    });
    tests.truncate(limit);
    Ok(axum::Json(FlakyReport {
        repository,
        git_ref,
        since_ms,
        tests,
    }))
}

/// Each test's history from its rows per commit (ordered by test, then by when each commit
/// first ran).
fn histories(rows: Vec<CommitTestRow>) -> Vec<TestHistory> {
    let mut tests: Vec<TestHistory> = Vec::new();
    let mut latest_at = 0;
    let mut key: Option<(Option<String>, String, Option<String>, String)> = None;
    for row in rows {
        let row_key = (
            row.job_name.clone(),
            row.suite.clone(),
            row.classname.clone(),
            row.name.clone(),
        );
        if key.as_ref() != Some(&row_key) {
            tests.push(TestHistory {
                job: row.job_name.clone(),
                suite: row.suite.clone(),
                classname: row.classname.clone(),
                name: row.name.clone(),
                runs: 0,
                failures: 0,
                flaky_within: 0,
                commits: 0,
                flaky_commits: 0,
                failing_commits: 0,
                first_flaky_commit: None,
                last_passing_commit: None,
                latest_commit: String::new(),
                failing_at_latest: false,
            });
            key = Some(row_key);
            latest_at = i64::MIN;
        }
        let test = tests.last_mut().expect("pushed above");
        let (runs, fails, within) = (
            row.runs.max(0) as u64,
            row.fails.max(0) as u64,
            row.within.max(0) as u64,
        );
        test.runs += runs;
        test.failures += fails;
        test.flaky_within += within;
        test.commits += 1;
        let flaky = (fails > 0 && fails < runs) || within > 0;
        if flaky {
            test.flaky_commits += 1;
            test.first_flaky_commit
                .get_or_insert_with(|| row.commit_sha.clone());
        }
        if fails == runs {
            test.failing_commits += 1;
        }
        if fails == 0 && within == 0 {
            test.last_passing_commit = Some(row.commit_sha.clone());
        }
        if row.last_at_ms >= latest_at {
            latest_at = row.last_at_ms;
            test.latest_commit = row.commit_sha.clone();
            test.failing_at_latest = fails == runs && runs > 0;
        }
    }
    tests
}
