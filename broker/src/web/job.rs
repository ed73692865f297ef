//! A job's page: what it is, where it came from, what happened when, and its log, live.

use std::collections::VecDeque;
use std::convert::Infallible;

use askama::Template;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};
use testbot_proto::jobs::{JobId, JobState};
use testbot_proto::logs::parse_line;
use testbot_proto::provenance::{Approval, Provenance};

use super::WebError;
use super::ansi::{Segment, segments};
use crate::access::{JobAccess, authorize_job_access};
use crate::auth::Principal;
use crate::state::AppState;
use crate::store::JobModel;

/// Most bytes of log one request for earlier lines, or one live update, carries.
const LOG_PAGE_BYTES: usize = 256 * 1024;

/// The job, if the caller may read it: anyone may read a public repository's jobs; any other
/// job needs a bearer token the API would accept for it. Not found either way otherwise, so a
/// stranger learns nothing about private jobs.
async fn readable_job(state: &AppState, parts: &mut Parts, id: i64) -> Result<JobModel, WebError> {
    let not_found = || {
        WebError::NotFound(format!(
            "There is no public job {id}. A private repository's jobs need a token."
        ))
    };
    let job = state.store.job(JobId(id)).await?.ok_or_else(not_found)?;
    if job.public {
        return Ok(job);
    }
    if !parts.headers.contains_key(header::AUTHORIZATION) {
        return Err(not_found());
    }
    use axum::extract::FromRequestParts as _;
    let principal = Principal::from_request_parts(parts, state)
        .await
        .map_err(|_| not_found())?;
    authorize_job_access(state, &principal, &job, JobAccess::Read)
        .await
        .map_err(|_| not_found())?;
    Ok(job)
}

/// The job id in a page's path; anything else is a page that does not exist.
fn job_id(raw: &str) -> Result<i64, WebError> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| WebError::NotFound(format!("{raw:?} is not a job number.")))
}

struct Fact {
    label: &'static str,
    value: String,
    href: Option<String>,
}

struct Step {
    at: String,
    what: String,
}

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage {
    id: i64,
    name: Option<String>,
    state: &'static str,
    reason: Option<String>,
    facts: Vec<Fact>,
    timeline: Vec<Step>,
    script: String,
    log_bytes: i64,
    ended: bool,
    files: Vec<FileRow>,
    tests: Option<String>,
    /// The tests that did not pass (failed, errors, flaky), at most [`MAX_TESTS_SHOWN`].
    not_passed: Vec<TestRow>,
    more_not_passed: usize,
}

/// Most tests listed on a job's page; the API has them all.
const MAX_TESTS_SHOWN: usize = 200;

struct FileRow {
    path: String,
    href: String,
    bytes: u64,
    read: String,
}

struct TestRow {
    verdict: &'static str,
    id: String,
    message: String,
}

pub(super) async fn job_page_handler(
    State(state): State<AppState>,
    axum::extract::Path(raw): axum::extract::Path<String>,
    mut parts: Parts,
) -> Result<Response, WebError> {
    let id = job_id(&raw)?;
    let model = readable_job(&state, &mut parts, id).await?;
    let job = model.to_job().map_err(WebError::Internal)?;
    let github = state.github.web_url();
    let mut facts = Vec::new();
    let provenance = crate::github::jobs::provenance_of(state.store.as_ref(), &model).await?;
    match &provenance {
        Some(provenance) => provenance_facts(&mut facts, provenance, &github),
        None => {
            if let Some(repository) = &job.repository {
                facts.push(Fact {
                    label: "Repository",
                    value: repository.clone(),
                    href: Some(format!("{github}/{repository}")),
                });
            }
            if let (Some(repository), Some(run_id)) = (&job.repository, &model.run_id) {
                facts.push(Fact {
                    label: "Workflow run",
                    value: run_id.clone(),
                    href: Some(format!("{github}/{repository}/actions/runs/{run_id}")),
                });
            }
        }
    }
    if let Some(by) = &job.submitted_by {
        facts.push(fact("Submitted by", by));
    }
    if let Some(executor) = &job.spec.executor {
        facts.push(fact("Executor", executor));
    }
    if !job.spec.labels.is_empty() {
        facts.push(fact("Labels", &job.spec.labels.join(", ")));
    }
    if let Some(agent) = &job.agent {
        facts.push(fact("Agent", agent));
    }
    for (key, value) in &job.metadata {
        let label = match key.as_str() {
            "slurm_job_id" => "Slurm job",
            "kubernetes_job" => "Kubernetes job",
            "container_id" => "Container",
            _ => continue,
        };
        facts.push(fact(label, value));
    }
    if job.attempts > 1 {
        facts.push(fact("Attempts", &job.attempts.to_string()));
    }
    if let Some(cause) = job.cause {
        facts.push(fact("Cause", &cause.to_string()));
    }
    if let Some(place) = job.batch {
        facts.push(fact(
            "Batch",
            &format!("{}: run {} of {}", place.batch, place.run, place.runs),
        ));
    }
    if let (Some(start), Some(end)) = (job.started_at_ms, job.finished_at_ms) {
        let secs = ((end - start).max(0) as u64).div_ceil(1000);
        facts.push(fact(
            "Ran for",
            &humantime::format_duration(std::time::Duration::from_secs(secs)).to_string(),
        ));
    }
    let mut timeline = vec![Step {
        at: testbot_proto::format_ms(job.created_at_ms),
        what: "queued".into(),
    }];
    if let Some(at) = job.started_at_ms {
        timeline.push(Step {
            at: testbot_proto::format_ms(at),
            what: format!("started on {}", job.agent.as_deref().unwrap_or("an agent")),
        });
    }
    if let Some(at) = job.finished_at_ms {
        timeline.push(Step {
            at: testbot_proto::format_ms(at),
            what: job.state.as_str().to_string(),
        });
    }
    let (files, tests, not_passed, more_not_passed) = test_results(&state, id).await?;
    let page = JobPage {
        files,
        tests,
        not_passed,
        more_not_passed,
        id,
        name: job.spec.name.clone(),
        state: job.state.as_str(),
        reason: job.reason.clone(),
        facts,
        timeline,
        script: job.spec.script.clone(),
        log_bytes: model.log_bytes,
        ended: job.state.is_terminal(),
    };
    let html = page
        .render()
        .map_err(|e| WebError::Internal(anyhow::anyhow!("the job page: {e}")))?;
    Ok(Html(html).into_response())
}

/// The job's result files and the tests that did not pass, for its page.
async fn test_results(
    state: &AppState,
    id: i64,
) -> Result<(Vec<FileRow>, Option<String>, Vec<TestRow>, usize), WebError> {
    use testbot_proto::junit::TestOutcome;
    use testbot_proto::test_results::{CaseTotals, FileReport};
    let files: Vec<FileRow> = state
        .store
        .result_files(JobId(id))
        .await?
        .into_iter()
        .map(|f| {
            let read = serde_json::from_str::<FileReport>(&f.report)
                .map_or_else(|_| "unknown".to_string(), |report| report.describe());
            FileRow {
                href: format!(
                    "/jobs/{id}/files?path={}",
                    testbot_proto::client::encode_query_value(&f.path)
                ),
                path: f.path,
                bytes: f.bytes.max(0) as u64,
                read,
            }
        })
        .collect();
    if files.is_empty() {
        return Ok((files, None, Vec::new(), 0));
    }
    let cases = crate::lifecycle::results::cases_of(state.store.test_results(JobId(id)).await?);
    let t = CaseTotals::of(&cases);
    let tests = format!("{} tests: {t}", t.cases);
    let mut not_passed: Vec<TestRow> = cases
        .iter()
        .filter(|c| c.final_outcome().is_failure() || c.is_flaky())
        .map(|c| TestRow {
            verdict: match c.final_outcome() {
                TestOutcome::Failed => "failed",
                TestOutcome::Error => "error",
                _ => "flaky",
            },
            id: c.test_id(),
            message: c
                .attempts
                .iter()
                .rev()
                .find_map(|a| a.message.clone())
                .unwrap_or_default(),
        })
        .collect();
    let more = not_passed.len().saturating_sub(MAX_TESTS_SHOWN);
    not_passed.truncate(MAX_TESTS_SHOWN);
    Ok((files, Some(tests), not_passed, more))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileQuery {
    path: String,
}

/// One result file as it was uploaded, as a download.
pub(super) async fn result_file_handler(
    State(state): State<AppState>,
    axum::extract::Path(raw): axum::extract::Path<String>,
    Query(query): Query<FileQuery>,
    mut parts: Parts,
) -> Result<Response, WebError> {
    let id = job_id(&raw)?;
    readable_job(&state, &mut parts, id).await?;
    let data = state
        .store
        .result_file_data(JobId(id), &query.path)
        .await?
        .ok_or_else(|| {
            WebError::NotFound(format!("Job {id} has no result file {:?}.", query.path))
        })?;
    let name = crate::lifecycle::results::download_name(&query.path);
    Ok(Response::builder()
        // Served as bytes to save, never as a page: a job's file must not run in the viewer.
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        )
        .body(Body::from(data))
        .expect("the headers are valid"))
}

fn fact(label: &'static str, value: &str) -> Fact {
    Fact {
        label,
        value: value.to_string(),
        href: None,
    }
}

/// What made an App job, with links to GitHub.
fn provenance_facts(facts: &mut Vec<Fact>, provenance: &Provenance, github: &str) {
    let commit = provenance.commit();
    let repo = &commit.repository;
    facts.push(Fact {
        label: "Repository",
        value: repo.clone(),
        href: Some(format!("{github}/{repo}")),
    });
    facts.push(Fact {
        label: "Commit",
        value: commit.sha.clone(),
        href: Some(format!("{github}/{repo}/commit/{}", commit.sha)),
    });
    let (event, detail) = match provenance {
        Provenance::Push {
            branch, pushed_by, ..
        } => ("push", format!("to {branch} by {pushed_by}")),
        Provenance::Tag { tag, pushed_by, .. } => ("tag", format!("{tag} pushed by {pushed_by}")),
        Provenance::Schedule { branch, cron, .. } => {
            ("schedule", format!("`{cron}` (UTC) on {branch}"))
        }
        Provenance::History {
            branch,
            bisection: Some(bisection),
            ..
        } => (
            "bisection",
            format!("step of bisection {bisection}, a commit of {branch}"),
        ),
        Provenance::History { branch, .. } => {
            ("history", format!("a run filling the history of {branch}"))
        }
        Provenance::PullRequest {
            number, approval, ..
        } => {
            facts.push(Fact {
                label: "Pull request",
                value: format!("#{number}"),
                href: Some(format!("{github}/{repo}/pull/{number}")),
            });
            let how = match approval {
                Approval::Comment { by, .. } => format!("asked for by {by} in a comment"),
                Approval::Review { by, .. } => format!("approved by {by} in a review"),
                Approval::Author { by } => format!("opened by {by}, who may write"),
                Approval::Label { label, by } => format!("label {label} added by {by}"),
            };
            ("pull request", how)
        }
    };
    facts.push(fact("Event", &format!("{event}: {detail}")));
    facts.push(Fact {
        label: "Config",
        value: format!("job {} at {}", commit.job, short(&commit.config_sha)),
        href: Some(format!(
            "{github}/{repo}/blob/{}/{}",
            commit.config_sha,
            testbot_proto::repo_config::CONFIG_PATH
        )),
    });
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// One log line as the page's script receives it.
#[derive(Debug, Serialize)]
pub struct LineView {
    /// Its byte offset in the log (the line's anchor, `#o{offset}`).
    o: u64,
    /// Its time (RFC 3339, as stored).
    t: String,
    /// `O`, `E` or `S`: stdout, stderr, or testbot's own.
    s: char,
    /// The text, in styled segments.
    g: Vec<Segment>,
}

/// Complete lines of `data`, which starts at byte `start` of the log; the bytes after the last
/// newline are left in place for the next read.
fn complete_lines(data: &mut Vec<u8>, start: &mut u64) -> Vec<LineView> {
    let Some(end) = data.iter().rposition(|b| *b == b'\n') else {
        return Vec::new();
    };
    let rest = data.split_off(end + 1);
    let whole = std::mem::replace(data, rest);
    let mut lines = Vec::new();
    let mut offset = *start;
    for raw in whole.split_inclusive(|b| *b == b'\n') {
        let text = String::from_utf8_lossy(raw);
        let line = parse_line(&text);
        lines.push(LineView {
            o: offset,
            t: line.timestamp.to_string(),
            s: line.stream.code(),
            g: segments(line.text),
        });
        offset += raw.len() as u64;
    }
    *start = offset;
    lines
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LinesQuery {
    /// The lines that end at or before this byte offset (the first line shown so far).
    before: u64,
}

#[derive(Debug, Serialize)]
struct LinesPage {
    /// The offset of the first line returned: 0 when the log's start is reached.
    start: u64,
    lines: Vec<LineView>,
}

/// Up to [`LOG_PAGE_BYTES`] of whole lines that end at `before`: the page's tail at first,
/// then each "Show earlier lines". A log of a million lines is read a page at a time.
pub(super) async fn log_lines_handler(
    State(state): State<AppState>,
    axum::extract::Path(raw): axum::extract::Path<String>,
    Query(query): Query<LinesQuery>,
    mut parts: Parts,
) -> Result<Response, WebError> {
    let id = job_id(&raw)?;
    let model = readable_job(&state, &mut parts, id).await?;
    let before = query.before.min(model.log_bytes.max(0) as u64);
    let mut start = before.saturating_sub(LOG_PAGE_BYTES as u64);
    let mut data = state
        .store
        .read_log(JobId(id), start, (before - start) as usize)
        .await?;
    // The store reads whole chunks: the last may run past `before`.
    data.truncate((before - start) as usize);
    if start > 0 {
        // The page starts inside a line: it begins after the first newline.
        let cut = data
            .iter()
            .position(|b| *b == b'\n')
            .map_or(data.len(), |i| i + 1);
        data.drain(..cut);
        start += cut as u64;
    }
    let first = start;
    let lines = complete_lines(&mut data, &mut start);
    Ok(axum::Json(LinesPage {
        start: first,
        lines,
    })
    .into_response())
}

/// The whole log as stored, as a file.
pub(super) async fn raw_log_handler(
    State(state): State<AppState>,
    axum::extract::Path(raw): axum::extract::Path<String>,
    mut parts: Parts,
) -> Result<Response, WebError> {
    let id = job_id(&raw)?;
    readable_job(&state, &mut parts, id).await?;
    let stream = futures_util::stream::unfold(Some(0u64), move |offset| {
        let state = state.clone();
        async move {
            let offset = offset?;
            match state
                .store
                .read_log(JobId(id), offset, LOG_PAGE_BYTES)
                .await
            {
                Ok(data) if data.is_empty() => None,
                Ok(data) => {
                    let next = offset + data.len() as u64;
                    Some((Ok(bytes::Bytes::from(data)), Some(next)))
                }
                Err(err) => {
                    tracing::warn!(job_id = id, ?err, "Cannot read a log for download.");
                    Some((
                        Err(std::io::Error::other("the log could not be read")),
                        None,
                    ))
                }
            }
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"testbot-job-{id}.log\""),
        )
        .body(Body::from_stream(stream))
        .expect("static headers are valid"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamQuery {
    /// Start at this byte offset (a line's start). A reconnecting `EventSource` sends the last
    /// event's id instead, which wins.
    #[serde(default)]
    offset: u64,
}

/// What the live log sends: `lines` (`{"lines": [...]}`, its id the offset after them),
/// `state` (`{"state", "reason"}`) when the job's state changes, and `end` once it ended and
/// every line was sent.
struct LiveLog {
    state: AppState,
    id: JobId,
    rx: tokio::sync::watch::Receiver<u64>,
    /// The offset of the next byte to read, and of the first byte of `pending`.
    read: u64,
    next_line: u64,
    pending: Vec<u8>,
    sent_state: Option<JobState>,
    queue: VecDeque<Event>,
    done: bool,
    _slot: crate::limits::FollowerSlot,
}

impl LiveLog {
    /// The next events, or None at the end.
    async fn step(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(Some(event));
            }
            if self.done {
                return Ok(None);
            }
            // The state before the bytes: a job seen ended has all of its log stored.
            let Some(job) = self.state.store.job(self.id).await? else {
                self.done = true;
                continue;
            };
            let data = self
                .state
                .store
                .read_log(self.id, self.read, LOG_PAGE_BYTES)
                .await?;
            if !data.is_empty() {
                self.read += data.len() as u64;
                self.pending.extend_from_slice(&data);
                let lines = complete_lines(&mut self.pending, &mut self.next_line);
                if !lines.is_empty() {
                    let body = serde_json::json!({ "lines": lines });
                    self.queue.push_back(
                        Event::default()
                            .event("lines")
                            .id(self.next_line.to_string())
                            .data(body.to_string()),
                    );
                }
                continue;
            }
            let job_state = job.state();
            if self.sent_state != Some(job_state) {
                self.sent_state = Some(job_state);
                let body = serde_json::json!({
                    "state": job_state.as_str(),
                    "reason": job.reason,
                });
                self.queue
                    .push_back(Event::default().event("state").data(body.to_string()));
            }
            if job_state.is_terminal() {
                self.queue
                    .push_back(Event::default().event("end").data("{}"));
                self.done = true;
                continue;
            }
            if !self.queue.is_empty() {
                continue;
            }
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        self.rx = self.state.log_watchers.subscribe(self.id);
                    }
                }
                _ = tokio::time::sleep(crate::api::FOLLOW_RECHECK) => {}
                _ = self.state.shutdown.cancelled() => return Ok(None),
            }
        }
    }
}

pub(super) async fn log_stream_handler(
    State(state): State<AppState>,
    axum::extract::Path(raw): axum::extract::Path<String>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
    mut parts: Parts,
) -> Result<Response, WebError> {
    let id = job_id(&raw)?;
    let model = readable_job(&state, &mut parts, id).await?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let offset = resume
        .unwrap_or(query.offset)
        .min(model.log_bytes.max(0) as u64);
    let slot = state
        .log_followers
        .join(JobId(id), state.settings.max_log_followers)?;
    let live = LiveLog {
        rx: state.log_watchers.subscribe(JobId(id)),
        state,
        id: JobId(id),
        read: offset,
        next_line: offset,
        pending: Vec::new(),
        sent_state: None,
        queue: VecDeque::new(),
        done: false,
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(live, |mut live| async move {
        match live.step().await {
            Ok(Some(event)) => Some((Ok::<_, Infallible>(event), live)),
            Ok(None) => None,
            Err(err) => {
                tracing::warn!(job_id = %live.id, ?err, "Live log failed.");
                None
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_at_newlines_and_keep_their_offsets() {
        let mut data = b"2026-12-01T10:00:00.000Z O one\n2026-12-01T10:00:00.001Z E tw".to_vec();
        let mut start = 100;
        let lines = complete_lines(&mut data, &mut start);
        assert_eq!(lines.len(), 1);
        assert_eq!((lines[0].o, lines[0].s), (100, 'O'));
        assert_eq!(start, 131);
        assert_eq!(data, b"2026-12-01T10:00:00.001Z E tw");
        data.extend_from_slice(b"o\n");
        let lines = complete_lines(&mut data, &mut start);
        assert_eq!((lines[0].o, lines[0].s), (131, 'E'));
        assert_eq!(lines[0].g, vec![Segment(String::new(), "two".into())]);
        assert!(data.is_empty());
    }
}
