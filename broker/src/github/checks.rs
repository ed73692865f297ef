//! Check runs: one per App job on its commit, kept in step with the job.
//!
//! The store records, per App job, the job state its check run last showed. The syncer wakes
//! on every job event (and every [`SYNC_POLL`] besides, for retries and for changes another
//! broker made), takes the App jobs whose check run is behind, and creates or updates each.
//! A failed update is retried with backoff; nothing is lost if the broker stops in between,
//! since the store still says the check run is behind. On a shared database only the broker
//! that leads the sweeper syncs, so a check run is never created twice. When a post-merge job
//! fails, the pull requests merged into its commit get a comment naming the commit and the job.

use std::sync::Arc;
use std::time::Duration;

use testbot_proto::jobs::{Job, JobState};
use testbot_proto::logs::{Stream, parse_line};
use testbot_proto::now_ms;

use super::{GitHubApp, GitHubError};
use crate::state::AppState;
use crate::store::github::AppJobModel;

/// The identifier of a check run's re-run button.
const RERUN: &str = "rerun";

/// The identifier of a check run's cancel button.
const CANCEL: &str = "cancel";

/// How often the syncer looks without being woken.
const SYNC_POLL: Duration = Duration::from_secs(5);

/// How long the syncer waits after a wake-up, so that a burst of changes is one pass.
const SYNC_DEBOUNCE: Duration = Duration::from_millis(50);

/// Check runs synced per pass.
const SYNC_BATCH: i64 = 64;

/// How many lines of the log's end a finished check run shows.
const SUMMARY_LOG_LINES: usize = 30;

/// How much of the log's end is read for them.
const SUMMARY_LOG_BYTES: u64 = 16 * 1024;

/// Runs until shutdown.
pub async fn run_syncer(state: AppState, app: Arc<GitHubApp>) {
    let mut events = state.bus.subscribe();
    loop {
        if state.store.lead_sweeper().await.unwrap_or(false) {
            sync_due(&state, &app).await;
        }
        tokio::select! {
            () = app.checks.notified() => {}
            event = events.recv() => {
                if matches!(event, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    return;
                }
            }
            () = tokio::time::sleep(SYNC_POLL) => {}
            () = state.shutdown.cancelled() => return,
        }
        tokio::time::sleep(SYNC_DEBOUNCE).await;
    }
}

async fn sync_due(state: &AppState, app: &GitHubApp) {
    let due = match state.store.check_runs_to_sync(now_ms(), SYNC_BATCH).await {
        Ok(due) => due,
        Err(err) => {
            tracing::warn!(?err, "Cannot read the check runs to update.");
            return;
        }
    };
    for row in due {
        let id = row.job_id();
        match sync_one(state, app, &row).await {
            Ok((check_run_id, shown)) => {
                if let Err(err) = state.store.check_run_synced(id, check_run_id, &shown).await {
                    tracing::warn!(job_id = %id, ?err, "Cannot record a check run update.");
                }
            }
            Err(err) => {
                let backoff = Duration::from_secs(2u64.pow(row.sync_attempts.clamp(0, 8) as u32));
                tracing::warn!(job_id = %id, %err, retry_in = ?backoff, "Cannot update a check run.");
                let retry_at = now_ms() + backoff.as_millis() as i64;
                if let Err(err) = state.store.check_run_sync_failed(id, retry_at).await {
                    tracing::warn!(job_id = %id, ?err, "Cannot record a failed check run update.");
                }
            }
        }
    }
}

/// Brings one check run up to the job's state: `(check run id, the state it now shows)`.
async fn sync_one(
    state: &AppState,
    app: &GitHubApp,
    row: &AppJobModel,
) -> Result<(i64, String), GitHubError> {
    let Some(model) = state
        .store
        .job(row.job_id())
        .await
        .map_err(|e| GitHubError::Unavailable(format!("the broker's database: {e:?}")))?
    else {
        return Err(GitHubError::Refused(format!("job {} is gone", row.job_id)));
    };
    let job = model
        .to_job()
        .map_err(|e| GitHubError::Unavailable(format!("job {}: {e:#}", row.job_id)))?;
    let (tail, tests) = if job.state.is_terminal() {
        (
            log_tail(state, &job).await,
            tests_summary(state, &model, &job).await,
        )
    } else {
        (String::new(), TestsPart::default())
    };
    let client = app.client.installation(row.installation_id).await?;
    let what = format!("the check run of job {}", row.job_id);
    let check_run_id = match row.check_run_id {
        Some(id) => id,
        None => {
            // Every check run starts queued, whatever the job did meanwhile, so that its
            // history on GitHub reads as the job's did.
            let queued = Job {
                state: JobState::Queued,
                ..job.clone()
            };
            let body = check_run_body(row, &queued, "", &TestsPart::default(), &app.public_url);
            let route = format!("/repos/{}/check-runs", row.repository);
            let created: CheckRunId = client
                .post(route, Some(&body))
                .await
                .map_err(|e| GitHubError::from_octocrab(&what, e))?;
            // Recorded at once: a failure below must not create a second check run.
            if let Err(err) = state
                .store
                .check_run_synced(row.job_id(), created.id, JobState::Queued.as_str())
                .await
            {
                tracing::warn!(job_id = row.job_id, ?err, "Cannot record a new check run.");
            }
            if job.state == JobState::Queued {
                return Ok((created.id, job.state.as_str().to_string()));
            }
            created.id
        }
    };
    let body = check_run_body(row, &job, &tail, &tests, &app.public_url);
    let route = format!("/repos/{}/check-runs/{check_run_id}", row.repository);
    let _: CheckRunId = client
        .patch(route, Some(&body))
        .await
        .map_err(|e| GitHubError::from_octocrab(&what, e))?;
    let was_done = row
        .synced_state
        .as_deref()
        .and_then(|s| s.parse::<JobState>().ok())
        .is_some_and(|s| s.is_terminal());
    if matches!(job.state, JobState::Failed | JobState::Error) && !was_done {
        tell_merged_pull_requests(&client, row, &job).await?;
    }
    Ok((check_run_id, job.state.as_str().to_string()))
}

/// A post-merge job failed: a comment on the pull requests the commit came from, naming the
/// commit and the job, so a failing merge is seen at once.
async fn tell_merged_pull_requests(
    client: &octocrab::Octocrab,
    row: &AppJobModel,
    job: &Job,
) -> Result<(), GitHubError> {
    #[derive(serde::Deserialize)]
    struct Pull {
        number: u64,
        #[serde(default)]
        merged_at: Option<String>,
    }
    let Some(Ok(testbot_proto::provenance::Provenance::Push { branch, .. })) =
        row.provenance.as_deref().map(serde_json::from_str)
    else {
        return Ok(());
    };
    let route = format!("/repos/{}/commits/{}/pulls", row.repository, row.head_sha);
    let pulls: Vec<Pull> = client
        .get(route, None::<&()>)
        .await
        .map_err(|e| GitHubError::from_octocrab("the pull requests of a commit", e))?;
    let reason = job
        .reason
        .as_deref()
        .map(|r| format!(": {}", escape_markdown(r)))
        .unwrap_or_default();
    for pull in pulls.iter().filter(|p| p.merged_at.is_some()) {
        let body = format!(
            "Post-merge job **{}** failed on `{}` at {}{reason} (testbot job {}; see its check run).",
            escape_markdown(&row.check_name),
            escape_markdown(&branch),
            row.head_sha,
            job.id,
        );
        let route = format!("/repos/{}/issues/{}/comments", row.repository, pull.number);
        let _: serde_json::Value = client
            .post(route, Some(&serde_json::json!({ "body": body })))
            .await
            .map_err(|e| GitHubError::from_octocrab("a comment on the merged pull request", e))?;
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct CheckRunId {
    id: i64,
}

/// A `check_run` delivery: GitHub's re-run (`rerequested`) or one of the run's buttons
/// (`requested_action`).
#[derive(Debug, serde::Deserialize)]
pub struct CheckRunEvent {
    pub action: String,
    pub check_run: CheckRunRef,
    #[serde(default)]
    pub requested_action: Option<RequestedAction>,
    pub repository: super::process::RepoRef,
    pub sender: super::process::Login,
    #[serde(default)]
    pub installation: Option<super::process::IdOnly>,
}

#[derive(Debug, serde::Deserialize)]
pub struct CheckRunRef {
    pub id: i64,
}

#[derive(Debug, serde::Deserialize)]
pub struct RequestedAction {
    pub identifier: String,
}

/// Re-runs or cancels the job of a check run of the App's, for someone with write permission.
pub async fn on_check_run(
    state: &AppState,
    app: &GitHubApp,
    event: CheckRunEvent,
) -> Result<(), GitHubError> {
    let Some(installation) = &event.installation else {
        return Ok(());
    };
    let identifier = match (event.action.as_str(), &event.requested_action) {
        ("rerequested", _) => RERUN,
        ("requested_action", Some(requested)) => match requested.identifier.as_str() {
            RERUN => RERUN,
            CANCEL => CANCEL,
            _ => return Ok(()),
        },
        _ => return Ok(()),
    };
    let unavailable = |e: crate::store::StoreError| GitHubError::Unavailable(format!("{e:?}"));
    let Some(row) = state
        .store
        .app_job_by_check_run(event.check_run.id)
        .await
        .map_err(unavailable)?
    else {
        // Not one of this App's check runs (another App's, or a config error's).
        return Ok(());
    };
    let client = app.client.installation(installation.id).await?;
    let repository = &event.repository.full_name;
    if !row.repository.eq_ignore_ascii_case(repository)
        || !super::commands::may_write(&client, repository, &event.sender.login).await?
    {
        tracing::info!(sender = %event.sender.login, check_run = event.check_run.id, "Check run action refused: no write permission.");
        return Ok(());
    }
    if identifier == CANCEL {
        crate::lifecycle::jobs::cancel(state, row.job_id())
            .await
            .map_err(unavailable)?;
        return Ok(());
    }
    let Some(provenance) = row.provenance.as_deref() else {
        // A workflow job: the workflow re-runs it, with a token of its own.
        tracing::info!(
            job_id = row.job_id,
            "Re-run of a workflow job's check run ignored: re-run the workflow."
        );
        return Ok(());
    };
    let provenance: testbot_proto::provenance::Provenance = serde_json::from_str(provenance)
        .map_err(|e| {
            GitHubError::Refused(format!("stored provenance of job {}: {e}", row.job_id))
        })?;
    let commit = provenance.commit();
    let config = match super::config::read(&client, &commit.repository, &commit.config_sha).await? {
        super::config::ConfigAt::Valid(config) => config,
        _ => {
            return Err(GitHubError::Refused(format!(
                "the config of job {} at {} is gone or not valid",
                row.job_id, commit.config_sha
            )));
        }
    };
    let Some(job) = config.job(&commit.job) else {
        return Err(GitHubError::Refused(format!(
            "the config at {} has no job {}",
            commit.config_sha, commit.job
        )));
    };
    super::jobs::submit(
        state,
        installation.id,
        !event.repository.private,
        &provenance,
        job,
        1,
    )
    .await
    .map_err(|e| GitHubError::Unavailable(format!("{e:#}")))?;
    tracing::info!(sender = %event.sender.login, job_id = row.job_id, "Job re-run from its check run.");
    Ok(())
}

/// The last lines of a finished job's log, as text.
async fn log_tail(state: &AppState, job: &Job) -> String {
    let from = job.log_bytes.saturating_sub(SUMMARY_LOG_BYTES);
    let Ok(bytes) = state
        .store
        .read_log(job.id, from, SUMMARY_LOG_BYTES as usize)
        .await
    else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if from > 0 && !lines.is_empty() {
        // The first line was cut.
        lines.remove(0);
    }
    let start = lines.len().saturating_sub(SUMMARY_LOG_LINES);
    lines[start..]
        .iter()
        .map(|line| {
            let line = parse_line(line);
            match line.stream {
                Stream::System => format!("{} (testbot)", line.text),
                _ => line.text.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Most failed or flaky tests a check run names; the job's page lists them all.
const CHECK_RUN_TESTS: usize = 20;

/// What a check run says of the job's tests.
#[derive(Debug, Default)]
pub struct TestsPart {
    /// Markdown: the totals, then new failures, failures of known-flaky tests, and tests that
    /// passed only on a rerun, apart. Empty when the job uploaded none.
    pub text: String,
    /// The job asks for quarantine and failed only in known-flaky tests: the check passes.
    pub passes_in_quarantine: bool,
}

async fn tests_summary(state: &AppState, model: &crate::store::JobModel, job: &Job) -> TestsPart {
    let rows = match state.store.test_results(job.id).await {
        Ok(rows) if !rows.is_empty() => rows,
        Ok(_) => return TestsPart::default(),
        Err(err) => {
            tracing::warn!(job_id = %job.id, ?err, "Cannot read the job's test results.");
            return TestsPart::default();
        }
    };
    let cases = crate::lifecycle::results::cases_of(rows);
    let t = testbot_proto::test_results::CaseTotals::of(&cases);
    let rule = testbot_proto::test_results::Quarantine::default();
    let known = crate::lifecycle::results::known_flaky(&*state.store, model, &cases, &rule)
        .await
        .unwrap_or_else(|err| {
            tracing::warn!(job_id = %job.id, ?err, "Cannot read the job's test history.");
            Vec::new()
        });
    let mut out = format!("\n\n**Tests**: {t}");
    let (failed, flaky) = testbot_proto::test_results::failed_and_flaky(&cases);
    let (new, known): (Vec<_>, Vec<_>) = failed
        .into_iter()
        .partition(|c| !known.contains(&c.test_id()));
    let passes_in_quarantine = job.spec.quarantine
        && job.state == JobState::Failed
        && job.cause == Some(testbot_proto::results::FailureCause::TestFailure)
        && new.is_empty()
        && !known.is_empty();
    for (title, list) in [
        ("Failed", new),
        ("Failed, known flaky (in quarantine)", known),
        ("Flaky (passed on a rerun)", flaky),
    ] {
        if list.is_empty() {
            continue;
        }
        let names: Vec<String> = list
            .iter()
            .take(CHECK_RUN_TESTS)
            .map(|c| escape_markdown(&c.test_id()))
            .collect();
        out.push_str(&format!("\n\n{title}: {}", names.join(", ")));
        if list.len() > CHECK_RUN_TESTS {
            out.push_str(&format!(", and {} more", list.len() - CHECK_RUN_TESTS));
        }
    }
    if passes_in_quarantine {
        out.push_str(
            "\n\nThe job failed only in tests known to be flaky, which its `quarantine` keeps from failing this check.",
        );
    }
    TestsPart {
        text: out,
        passes_in_quarantine,
    }
}

/// The JSON body of a check-run create or update for `job`'s present state.
pub fn check_run_body(
    row: &AppJobModel,
    job: &Job,
    log_tail: &str,
    tests: &TestsPart,
    public_url: &str,
) -> serde_json::Value {
    let (status, conclusion) = match job.state {
        JobState::Failed if tests.passes_in_quarantine => ("completed", Some("success")),
        JobState::Queued => ("queued", None),
        JobState::Assigned | JobState::Running => ("in_progress", None),
        JobState::Succeeded => ("completed", Some("success")),
        JobState::Failed if is_timeout(job) => ("completed", Some("timed_out")),
        JobState::Failed | JobState::Error => ("completed", Some("failure")),
        JobState::Cancelled => ("completed", Some("cancelled")),
    };
    let title = match job.state {
        JobState::Queued => "Waiting for an agent".to_string(),
        JobState::Assigned => format!("Starting on {}", job.agent.as_deref().unwrap_or("an agent")),
        JobState::Running => format!("Running on {}", job.agent.as_deref().unwrap_or("an agent")),
        JobState::Succeeded => "Succeeded".to_string(),
        JobState::Failed if tests.passes_in_quarantine => {
            "Passed but for known-flaky tests".to_string()
        }
        JobState::Failed => match job.exit_code {
            Some(code) => format!("Failed with exit code {code}"),
            None => "Failed".to_string(),
        },
        JobState::Cancelled => "Cancelled".to_string(),
        JobState::Error => "Could not run".to_string(),
    };
    let mut summary = vec![format!("testbot job **{}**", job.id)];
    if let Some(agent) = &job.agent {
        summary.push(format!("agent `{agent}`"));
    }
    if let Some(scheduler) = job.metadata.get("slurm_job_id") {
        summary.push(format!("Slurm job `{scheduler}`"));
    }
    if let (Some(start), Some(end)) = (job.started_at_ms, job.finished_at_ms) {
        let secs = ((end - start).max(0) as u64).div_ceil(1000);
        summary.push(format!(
            "ran for {}",
            humantime::format_duration(Duration::from_secs(secs))
        ));
    }
    let mut summary = summary.join(" · ");
    if let Some(reason) = &job.reason {
        summary.push_str(&format!("\n\n{}", escape_markdown(reason)));
    }
    summary.push_str(&tests.text);
    let page = format!("{public_url}/jobs/{}", job.id);
    summary.push_str(&format!(
        "\n\n[The job's page and live log]({page}), or `testbot logs -f {}`.",
        job.id
    ));
    let mut body = serde_json::json!({
        "name": row.check_name,
        "head_sha": row.head_sha,
        "details_url": page,
        "external_id": job.id.to_string(),
        "status": status,
        "output": { "title": title, "summary": summary },
    });
    if let Some(conclusion) = conclusion {
        body["conclusion"] = conclusion.into();
    }
    // GitHub shows these buttons to people with write access; the App asks GitHub again.
    body["actions"] = if job.state.is_terminal() {
        serde_json::json!([{
            "label": "Re-run",
            "description": "Run this job again",
            "identifier": RERUN,
        }])
    } else {
        serde_json::json!([{
            "label": "Cancel",
            "description": "Stop this job",
            "identifier": CANCEL,
        }])
    };
    if !log_tail.is_empty() {
        body["output"]["text"] = format!(
            "The end of the log:\n\n```text\n{}\n```",
            log_tail.replace("```", "`\u{200b}``")
        )
        .into();
    }
    body
}

fn is_timeout(job: &Job) -> bool {
    job.reason
        .as_deref()
        .is_some_and(|r| r.contains("time limit") || r.contains("timed out"))
}

/// Job output and reasons go into Markdown: keep them from forming links, images or HTML.
fn escape_markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\`*_{}[]()<>#+!|~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
