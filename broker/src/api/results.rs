//! Test results: agents upload a job's result files; clients read what was read from them,
//! for a job and across the runs of a batch, and download the files as they were.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use testbot_proto::batches::BatchId;
use testbot_proto::jobs::JobId;
use testbot_proto::test_results::{
    BatchResults, CaseTotals, FileReport, FlakyQuery, FlakyReport, JobResults,
    MAX_RESULT_BYTES_PER_JOB, MAX_RESULT_FILES, ResultFile, TestHistory, UploadAck, UploadQuery,
    validate_result_path,
};

use super::{find_job, refusal_error};
use crate::access::{JobAccess, authorize_job_access};
use crate::auth::Principal;
use crate::error::{ApiError, ApiPath, ApiQuery};
use crate::lifecycle::results::cases_of;
use crate::state::AppState;
use crate::store::test_results::{NewResultFile, UploadRefusal};

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
    let data = body.clone();
    let (report, rows) = tokio::task::spawn_blocking(move || {
        crate::lifecycle::results::read_result_file(&path, &data)
    })
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
    let rule = testbot_proto::test_results::Quarantine::default();
    let known_flaky =
        crate::lifecycle::results::known_flaky(&*state.store, &job, &cases, &rule).await?;
    Ok(axum::Json(JobResults {
        job: id,
        totals: CaseTotals::of(&cases),
        files,
        cases,
        known_flaky,
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
    let name = crate::lifecycle::results::download_name(&query.path);
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
    let (batch, _) =
        super::batches::readable_batch(&state, &principal, id, JobAccess::Read).await?;
    let rows = state.store.batch_test_results(id).await?;
    // Rows come by run, then file, case, attempt: each run's rows make its cases.
    let cases: Vec<(u32, _)> = rows
        .chunk_by(|a, b| a.0 == b.0)
        .flat_map(|run| {
            let number = run[0].0.clamp(0, i64::from(u32::MAX)) as u32;
            cases_of(run.iter().map(|(_, row)| row.clone()))
                .into_iter()
                .map(move |case| (number, case))
        })
        .collect();
    let runs = batch.runs.clamp(0, i64::from(u32::MAX)) as u32;
    Ok(axum::Json(BatchResults::of(id, runs, cases)))
}

/// Default window of `GET /repos/{owner}/{name}/flaky`.
const FLAKY_WINDOW: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Where a query's window (`since`, default [`FLAKY_WINDOW`]) starts.
fn window_start(query: &FlakyQuery) -> Result<i64, ApiError> {
    let window = match &query.since {
        Some(since) => humantime::parse_duration(since).map_err(|e| {
            ApiError::BadRequest(format!("since {since:?} is not a duration like 30d: {e}"))
        })?,
        None => FLAKY_WINDOW,
    };
    Ok(testbot_proto::now_ms().saturating_sub(window.as_millis() as i64))
}

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
    let since_ms = window_start(&query)?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000) as usize;
    let git_ref = query.git_ref();
    let rows = state
        .store
        .test_history(&repository, git_ref.as_deref(), since_ms)
        .await?;
    let mut tests = crate::lifecycle::results::histories(rows);
    tests.sort_by(|a, b| {
        let rate = |t: &TestHistory| t.failures as f64 / t.runs.max(1) as f64;
        b.is_flaky()
            .cmp(&a.is_flaky())
            .then(b.flaky_commits.cmp(&a.flaky_commits))
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

/// `GET /repos/{owner}/{name}/history?test=ID`: one test's record per job that ran it, with
/// its runs at each commit in the window. Only tests that failed in the window are on record.
pub(super) async fn test_history_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((owner, name)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<testbot_proto::test_results::HistoryQuery>,
) -> Result<axum::Json<testbot_proto::test_results::TestRecord>, ApiError> {
    use testbot_proto::test_results::{TestRecord, TestRecordOfJob};
    let repository = super::repos::repo_name(owner, name)?;
    match &principal {
        Principal::Workflow { claims, .. }
            if claims.repository.eq_ignore_ascii_case(&repository) => {}
        other => other.require_operator()?,
    }
    let flaky = FlakyQuery {
        branch: query.branch.clone(),
        since: query.since.clone(),
        limit: None,
    };
    let since_ms = window_start(&flaky)?;
    let git_ref = flaky.git_ref();
    let rows = state
        .store
        .test_history(&repository, git_ref.as_deref(), since_ms)
        .await?;
    let jobs = rows
        .chunk_by(|a, b| {
            (&a.job_name, &a.suite, &a.classname, &a.name)
                == (&b.job_name, &b.suite, &b.classname, &b.name)
        })
        .map(crate::lifecycle::results::history)
        .filter(|(history, _)| history.test_id() == query.test)
        .map(|(history, commits)| TestRecordOfJob { history, commits })
        .collect();
    Ok(axum::Json(TestRecord {
        repository,
        git_ref,
        since_ms,
        jobs,
    }))
}
