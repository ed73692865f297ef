//! Statistical bisection, driven by the broker: the bisector loop records how each run of a
//! bisection went, asks [`testbot_proto::bisect::plan`] what to do, and does it (cancels the
//! runs no longer needed, submits the next runs as App jobs without check runs). It starts a
//! bisection by itself when a post-merge run of a job with `bisect = true` shows a test flaky
//! for the first time on its branch, between the last commit where it passed and that one.
//!
//! Only the leading broker (the sweeper's lease) advances bisections, so two brokers sharing a
//! database never submit a round twice. The runs are ordinary App jobs whose provenance,
//! [`Provenance::History`], the site's agent checks with GitHub like a push's.

use std::sync::Arc;
use std::time::Duration;

use testbot_proto::bisect::{
    BisectRequest, Bisection, BisectionState, CONFIDENCE, MAX_COMMITS, NewBisection, RunOutcome,
};
use testbot_proto::jobs::{JobId, JobState};
use testbot_proto::junit::TestOutcome;
use testbot_proto::now_ms;
use testbot_proto::provenance::{CommitRef, Provenance};
use tokio::sync::broadcast::error::RecvError;

use super::config::{self, ConfigAt};
use super::{GitHubApp, GitHubError};
use crate::lifecycle::events::JobChange;
use crate::state::AppState;

/// How often running bisections are looked at without a job event.
const POLL: Duration = Duration::from_secs(2);

/// Who the broker's own bisections are started by.
pub const STARTED_BY_BROKER: &str = "testbot";

/// Starts a bisection: lists the commits from `good` to `bad` with GitHub and stores it. The
/// bisector submits its first runs.
pub async fn start(
    state: &AppState,
    app: &GitHubApp,
    new: NewBisection,
    good: &str,
    bad: &str,
) -> Result<Bisection, GitHubError> {
    #[derive(serde::Deserialize)]
    struct Comparison {
        status: String,
        total_commits: usize,
        commits: Vec<Sha>,
    }
    #[derive(serde::Deserialize)]
    struct Sha {
        sha: String,
    }
    let client = app.client.installation(new.installation_id).await?;
    let route = format!("/repos/{}/compare/{good}...{bad}", new.repository);
    let what = format!("the commits of {} from {good} to {bad}", new.repository);
    let comparison: Comparison = client
        .get(route, None::<&()>)
        .await
        .map_err(|e| GitHubError::from_octocrab(&what, e))?;
    if comparison.status != "ahead" {
        return Err(GitHubError::Refused(format!(
            "{bad} is not a later commit than {good} in {} (GitHub compares them as {}): give the good commit first",
            new.repository, comparison.status
        )));
    }
    if comparison.total_commits > comparison.commits.len()
        || comparison.total_commits + 1 > MAX_COMMITS
    {
        return Err(GitHubError::Refused(format!(
            "{} commits lie between {good} and {bad}; a bisection spans at most {MAX_COMMITS}: give a later good commit",
            comparison.total_commits
        )));
    }
    let mut commits = vec![good.to_string()];
    commits.extend(comparison.commits.into_iter().map(|c| c.sha));
    let bisection = Bisection::start(new, commits, now_ms());
    let stored = state
        .store
        .insert_bisection(&bisection)
        .await
        .map_err(|e| GitHubError::Unavailable(format!("the broker's database: {e:?}")))?;
    tracing::info!(bisection = stored.id, test = %stored.test_id(), "Bisection started: {}", stored.describe());
    app.bisections.notify_one();
    Ok(stored)
}

/// Starts a bisection from `POST /repos/{owner}/{name}/bisections`: finds the App's
/// installation on the repository and, if the request names none, the job and the branch.
pub async fn start_requested(
    state: &AppState,
    app: &GitHubApp,
    repository: &str,
    request: &BisectRequest,
    started_by: String,
) -> Result<Bisection, GitHubError> {
    #[derive(serde::Deserialize)]
    struct Installation {
        id: i64,
    }
    #[derive(serde::Deserialize)]
    struct Repo {
        id: i64,
        default_branch: String,
        #[serde(default = "private")]
        private: bool,
    }
    fn private() -> bool {
        true
    }
    for sha in [&request.good, &request.bad] {
        if !testbot_proto::commands::is_full_sha(sha) {
            return Err(GitHubError::Refused(format!(
                "{sha:?} is not a full 40-digit commit id"
            )));
        }
    }
    let confidence = request.confidence.unwrap_or(CONFIDENCE);
    if !(0.5..=0.9999).contains(&confidence) {
        return Err(GitHubError::Refused(format!(
            "confidence is {confidence}; write 0.5 to 0.9999"
        )));
    }
    let installation: Installation = app
        .client
        .app()?
        .get(format!("/repos/{repository}/installation"), None::<&()>)
        .await
        .map_err(|e| {
            GitHubError::from_octocrab(&format!("the App's installation on {repository}"), e)
        })?;
    let client = app.client.installation(installation.id).await?;
    let repo: Repo = client
        .get(format!("/repos/{repository}"), None::<&()>)
        .await
        .map_err(|e| GitHubError::from_octocrab(repository, e))?;
    let branch = request.branch.clone().unwrap_or(repo.default_branch);
    // The test as its history names it: which job ran it, and its parts.
    let rows = state
        .store
        .test_history(repository, Some(&format!("refs/heads/{branch}")), 0)
        .await
        .map_err(|e| GitHubError::Unavailable(format!("the broker's database: {e:?}")))?;
    let tests = crate::lifecycle::results::histories(rows.clone());
    let test = tests
        .iter()
        .filter(|t| request.job.is_none() || t.job == request.job)
        .find(|t| t.test_id() == request.test)
        .ok_or_else(|| {
            GitHubError::Refused(format!(
                "no job of {repository} on {branch} has a failure of test {:?} on record (see `testbot flaky {repository} --branch {branch}`)",
                request.test
            ))
        })?;
    let job = test.job.clone().ok_or_else(|| {
        GitHubError::Refused(format!(
            "test {:?} ran in jobs without a name; bisection runs a job of {}",
            request.test,
            testbot_proto::repo_config::CONFIG_PATH
        ))
    })?;
    let rate = rate_at(&rows, test, &request.bad);
    start(
        state,
        app,
        NewBisection {
            repository: repository.to_string(),
            repository_id: repo.id,
            installation_id: installation.id,
            public: !repo.private,
            branch,
            job,
            suite: test.suite.clone(),
            classname: test.classname.clone(),
            name: test.name.clone(),
            select: request.select.clone(),
            confidence,
            rate,
            started_by,
        },
        &request.good,
        &request.bad,
    )
    .await
}

/// The test's failure rate at `sha` from its history rows, if it failed there.
fn rate_at(
    rows: &[crate::store::test_results::CommitTestRow],
    test: &testbot_proto::test_results::TestHistory,
    sha: &str,
) -> Option<f64> {
    let (runs, fails) = rows
        .iter()
        .filter(|r| {
            r.commit_sha == sha
                && r.job_name == test.job
                && r.suite == test.suite
                && r.classname == test.classname
                && r.name == test.name
        })
        .fold((0, 0), |(runs, fails), r| (runs + r.runs, fails + r.fails));
    (fails > 0).then(|| fails as f64 / runs as f64)
}

/// Runs until shutdown.
pub async fn run_bisector(state: AppState, app: Arc<GitHubApp>) {
    let mut events = state.bus.subscribe();
    let mut finished: Vec<JobId> = Vec::new();
    loop {
        if state.store.lead_sweeper().await.unwrap_or(false) {
            for id in finished.drain(..) {
                if let Err(err) = maybe_start_on_flake(&state, &app, id).await {
                    tracing::warn!(job_id = %id, %err, "Cannot check the job's tests for a new flake.");
                }
            }
            advance_all(&state, &app).await;
        } else {
            finished.clear();
        }
        tokio::select! {
            () = app.bisections.notified() => {}
            event = events.recv() => match event {
                Ok(event) => if let JobChange::Finished { .. } = event.change {
                    finished.push(event.id);
                },
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            },
            () = tokio::time::sleep(POLL) => {}
            () = state.shutdown.cancelled() => return,
        }
        // Let a burst of ends make one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(event) = events.try_recv() {
            if let JobChange::Finished { .. } = event.change {
                finished.push(event.id);
            }
        }
    }
}

async fn advance_all(state: &AppState, app: &GitHubApp) {
    let running = match state.store.running_bisections().await {
        Ok(running) => running,
        Err(err) => {
            tracing::warn!(?err, "Cannot read the running bisections.");
            return;
        }
    };
    for mut bisection in running {
        let id = bisection.id;
        if let Err(err) = advance(state, app, &mut bisection).await {
            tracing::warn!(bisection = id, %err, "Cannot advance the bisection; trying again.");
        }
    }
}

/// One step: outcomes of ended runs, then the plan, then its actions, then the document.
async fn advance(
    state: &AppState,
    app: &GitHubApp,
    bisection: &mut Bisection,
) -> anyhow::Result<()> {
    let before = bisection.clone();
    let open: Vec<JobId> = bisection.points.iter().flat_map(|p| p.open()).collect();
    for id in open {
        if let Some(outcome) = outcome_of(state, bisection, id).await? {
            bisection.set_outcome(id, outcome);
        }
    }
    let free = free_agents(state).await;
    let plan = testbot_proto::bisect::plan(bisection, free);
    for id in &plan.cancel {
        crate::lifecycle::jobs::cancel(state, *id).await?;
    }
    for &(position, runs) in &plan.submit {
        match submit_runs(state, app, bisection, position, runs).await {
            Ok(jobs) => bisection.add_runs(position, jobs),
            Err(Submit::Retry(err)) => {
                // What was decided is kept; the runs are asked for again next time.
                save(state, bisection, &before).await?;
                return Err(err);
            }
            Err(Submit::Fail(message)) => {
                bisection.state = BisectionState::Failed;
                bisection.message = Some(message);
                let open: Vec<JobId> = bisection.points.iter().flat_map(|p| p.open()).collect();
                for id in open {
                    crate::lifecycle::jobs::cancel(state, id).await?;
                }
                break;
            }
        }
    }
    save(state, bisection, &before).await?;
    if bisection.state != before.state {
        tracing::info!(
            bisection = bisection.id,
            state = bisection.state.as_str(),
            "Bisection ended: {}",
            bisection.describe()
        );
    }
    Ok(())
}

async fn save(
    state: &AppState,
    bisection: &mut Bisection,
    before: &Bisection,
) -> anyhow::Result<()> {
    if bisection != before {
        bisection.updated_at_ms = now_ms();
        state.store.update_bisection(bisection).await?;
    }
    Ok(())
}

/// How run `id` went for the bisection's test, once it has ended.
async fn outcome_of(
    state: &AppState,
    bisection: &Bisection,
    id: JobId,
) -> anyhow::Result<Option<RunOutcome>> {
    let Some(model) = state.store.job(id).await? else {
        return Ok(Some(RunOutcome::NoResult));
    };
    let job = model.to_job()?;
    if !job.state.is_terminal() {
        return Ok(None);
    }
    let cause = job
        .cause
        .or_else(|| testbot_proto::results::FailureCause::infer(job.state, job.reason.as_deref()));
    if job.state == JobState::Cancelled || cause.is_some_and(|c| c.is_fleets()) {
        return Ok(Some(RunOutcome::NoResult));
    }
    let rows = state.store.test_results(id).await?;
    let cases = crate::lifecycle::results::cases_of(rows);
    let case = cases.iter().find(|c| {
        c.suite == bisection.suite && c.classname == bisection.classname && c.name == bisection.name
    });
    Ok(Some(match case.map(|c| c.final_outcome()) {
        Some(TestOutcome::Passed) => RunOutcome::Passed,
        Some(TestOutcome::Failed | TestOutcome::Error) => RunOutcome::Failed,
        Some(TestOutcome::Skipped) | None => RunOutcome::NoResult,
    }))
}

/// Agents that have asked for work lately: how many commits a round spreads over.
async fn free_agents(state: &AppState) -> usize {
    crate::lifecycle::online_agents(state)
        .await
        .unwrap_or(1)
        .max(1)
}

enum Submit {
    /// GitHub or the database could not be asked: the next pass tries again.
    Retry(anyhow::Error),
    /// The commit cannot run the job: the bisection cannot go on.
    Fail(String),
}

/// Submits `runs` runs of the bisection's job at `commits[position]`, with that commit's
/// config, of the test alone when the job says how (`run_tests`).
async fn submit_runs(
    state: &AppState,
    app: &GitHubApp,
    bisection: &Bisection,
    position: usize,
    runs: u32,
) -> Result<Vec<JobId>, Submit> {
    let sha = &bisection.commits[position];
    let client = app
        .client
        .installation(bisection.installation_id)
        .await
        .map_err(|e| Submit::Retry(e.into()))?;
    let config = match config::read(&client, &bisection.repository, sha).await {
        Ok(ConfigAt::Valid(config)) => config,
        Ok(ConfigAt::Missing) => {
            return Err(Submit::Fail(format!(
                "commit {sha} has no {}: the job cannot run there",
                testbot_proto::repo_config::CONFIG_PATH
            )));
        }
        Ok(ConfigAt::Invalid(message)) => {
            return Err(Submit::Fail(format!("at commit {sha}: {message}")));
        }
        Err(err) => return Err(Submit::Retry(err.into())),
    };
    let Some(job) = config.job(&bisection.job) else {
        return Err(Submit::Fail(format!(
            "{} at commit {sha} declares no job {}",
            testbot_proto::repo_config::CONFIG_PATH,
            bisection.job
        )));
    };
    let provenance = Provenance::History {
        commit: CommitRef {
            repository: bisection.repository.clone(),
            repository_id: bisection.repository_id as u64,
            sha: sha.clone(),
            job: bisection.job.clone(),
            config_sha: sha.clone(),
        },
        branch: bisection.branch.clone(),
        bisection: Some(bisection.id),
    };
    let mut spec =
        super::jobs::spec_of(&provenance, job).map_err(|e| Submit::Fail(format!("{e:#}")))?;
    if spec.run_tests.is_some() {
        // With a list command, the listed tests whose names end with the test's: the runner's
        // name for it (`tests/test_io.py::test_wobbly` for `test_wobbly`), and perhaps a few
        // more, whose runs the bisection does not count.
        let default = match spec.list {
            Some(_) => format!("*{}", bisection.name),
            None => bisection.name.clone(),
        };
        spec.tests = vec![bisection.select.clone().unwrap_or(default)];
    }
    let models = super::jobs::submit_spec(
        state,
        bisection.installation_id,
        bisection.public,
        &provenance,
        &spec,
        job.site.as_deref(),
        runs,
        false,
    )
    .await
    .map_err(Submit::Retry)?;
    Ok(models.iter().map(|m| m.job_id()).collect())
}

/// When job `id` is a post-merge run of a job with `bisect = true`: starts a bisection for
/// each test that is flaky at its commit for the first time on the branch and passed at an
/// earlier commit.
async fn maybe_start_on_flake(state: &AppState, app: &GitHubApp, id: JobId) -> anyhow::Result<()> {
    let Some(model) = state.store.job(id).await? else {
        return Ok(());
    };
    let Some(provenance) = state
        .store
        .app_job(id)
        .await?
        .and_then(|row| row.provenance)
        .and_then(|p| serde_json::from_str::<Provenance>(&p).ok())
    else {
        return Ok(());
    };
    let Provenance::Push { commit, branch, .. } = &provenance else {
        return Ok(());
    };
    let Some(installation) = state
        .store
        .installation_of(commit.repository_id as i64)
        .await?
    else {
        return Ok(());
    };
    let client = app.client.installation(installation).await?;
    let ConfigAt::Valid(config) = config::read(&client, &commit.repository, &commit.sha).await?
    else {
        return Ok(());
    };
    if !config.job(&commit.job).is_some_and(|job| job.bisect) {
        return Ok(());
    }
    let rows = state
        .store
        .test_history(&commit.repository, Some(&provenance.git_ref()), 0)
        .await?;
    for test in crate::lifecycle::results::histories(rows.clone()) {
        if test.job.as_deref() != Some(commit.job.as_str())
            || test.first_flaky_commit.as_deref() != Some(commit.sha.as_str())
            || !test.clusters.is_empty()
        {
            continue;
        }
        let Some(good) = test.last_passing_commit.clone() else {
            continue;
        };
        if state
            .store
            .bisection_exists(&commit.repository, &test.test_id(), &commit.sha)
            .await?
        {
            continue;
        }
        tracing::info!(test = %test.test_id(), sha = %commit.sha, "A post-merge run shows a new flake; bisecting.");
        start(
            state,
            app,
            NewBisection {
                repository: commit.repository.clone(),
                repository_id: commit.repository_id as i64,
                installation_id: installation,
                public: model.public,
                branch: branch.clone(),
                job: commit.job.clone(),
                suite: test.suite.clone(),
                classname: test.classname.clone(),
                name: test.name.clone(),
                select: None,
                confidence: CONFIDENCE,
                rate: rate_at(&rows, &test, &commit.sha),
                started_by: STARTED_BY_BROKER.to_string(),
            },
            &good,
            &commit.sha,
        )
        .await?;
    }
    Ok(())
}
