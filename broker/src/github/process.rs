//! The delivery consumer: claims each queued delivery and acts on it.
//!
//! An event is parsed only here, after its signature was checked, into the few fields the App
//! reads (payloads carry far more, and differ between GitHub versions). What it does:
//! - `ping`: nothing (it was answered when it arrived).
//! - `installation`, `installation_repositories`: records which repositories the App may act
//!   on; `deleted` and `suspend` forget the installation.
//! - `push` to a branch: reads `.github/testbot.toml` at the pushed commit and submits each job
//!   whose `on.push` names the branch (and whose `paths`, if any, match a changed file), with a
//!   check run each. A config that does not parse gets a failed check run with the message.
//! - `pull_request` opened, reopened or pushed to: jobs that run for writers without being
//!   asked, or an `action_required` check run on a fork's head ([`super::pulls`]).
//! - `issue_comment` created on a pull request, `pull_request_review` submitted: their
//!   `/testbot` commands ([`super::commands`]).
//! - `check_run` `rerequested` or `requested_action`: re-runs or cancels the run's job
//!   ([`super::checks`]).
//! - `push` to the default branch also records its config's schedules ([`super::schedule`]).
//! - `push` of a tag: the jobs whose `on.tag` matches, on the tagged commit.
//! - anything else: acknowledged and ignored.
//!
//! A delivery that fails because GitHub or the database could not be reached is retried with
//! backoff, up to [`MAX_DELIVERY_ATTEMPTS`]; one that cannot succeed is recorded as failed with
//! the reason, for the operator.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use testbot_proto::now_ms;
use testbot_proto::provenance::{CommitRef, Provenance};
use testbot_proto::repo_config::{CONFIG_PATH, paths_match};
use tracing::Instrument as _;

use super::config::{self, ConfigAt};
use super::{GitHubApp, GitHubError};
use crate::state::AppState;
use crate::store::github::{DeliveryModel, DeliveryOutcome, InstalledRepo};

/// How long a claimed delivery stays with its claimer before another broker may take it.
const DELIVERY_CLAIM: Duration = Duration::from_secs(120);

/// Attempts at one delivery before it is given up on.
pub const MAX_DELIVERY_ATTEMPTS: i64 = 6;

/// How often the consumer looks for due deliveries without being woken (retries, and
/// deliveries another broker received).
const DELIVERY_POLL: Duration = Duration::from_secs(2);

/// How long a processed delivery is kept; its id de-duplicates redeliveries meanwhile (GitHub
/// offers redelivery for three days).
pub const DELIVERY_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why processing a delivery stopped.
#[derive(Debug)]
enum Failure {
    /// Worth another attempt later.
    Retry(String),
    /// Will not succeed.
    Give(String),
}

impl From<GitHubError> for Failure {
    fn from(err: GitHubError) -> Self {
        match err {
            GitHubError::Unavailable(m) => Failure::Retry(m),
            GitHubError::Refused(m) => Failure::Give(m),
        }
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(err: crate::store::StoreError) -> Self {
        Failure::Retry(format!("the broker's database: {err:?}"))
    }
}

/// Runs until shutdown.
pub async fn run_consumer(state: AppState, app: Arc<GitHubApp>) {
    let mut last_prune = 0;
    loop {
        let now = now_ms();
        if now - last_prune > 3_600_000 {
            last_prune = now;
            let cutoff = now - DELIVERY_RETENTION.as_millis() as i64;
            if let Err(err) = state.store.prune_deliveries(cutoff).await {
                tracing::warn!(?err, "Cannot forget old webhook deliveries.");
            }
        }
        match state
            .store
            .claim_delivery(now, DELIVERY_CLAIM.as_millis() as i64)
            .await
        {
            Ok(Some(delivery)) => {
                let span = tracing::info_span!(
                    "delivery",
                    id = %delivery.id,
                    event = %delivery.event,
                    action = delivery.action.as_deref().unwrap_or("")
                );
                let result = process(&state, &app, &delivery)
                    .instrument(span.clone())
                    .await;
                finish(&state, &delivery, result).instrument(span).await;
                continue;
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(?err, "Cannot claim a webhook delivery."),
        }
        tokio::select! {
            () = app.deliveries.notified() => {}
            () = tokio::time::sleep(DELIVERY_POLL) => {}
            () = state.shutdown.cancelled() => return,
        }
    }
}

async fn finish(state: &AppState, delivery: &DeliveryModel, result: Result<(), Failure>) {
    let outcome = match &result {
        Ok(()) => DeliveryOutcome::Done,
        Err(Failure::Retry(error)) if delivery.attempts < MAX_DELIVERY_ATTEMPTS => {
            let backoff = Duration::from_secs(2u64.pow(delivery.attempts.clamp(0, 10) as u32));
            tracing::warn!(%error, retry_in = ?backoff, "Webhook delivery failed; will retry.");
            DeliveryOutcome::Retry {
                error,
                retry_at_ms: now_ms() + backoff.as_millis() as i64,
            }
        }
        Err(Failure::Retry(error) | Failure::Give(error)) => {
            tracing::error!(%error, attempts = delivery.attempts, "Webhook delivery failed.");
            DeliveryOutcome::Failed { error }
        }
    };
    if let Err(err) = state.store.finish_delivery(&delivery.id, outcome).await {
        tracing::warn!(?err, "Cannot record how a webhook delivery ended.");
    }
}

async fn process(
    state: &AppState,
    app: &GitHubApp,
    delivery: &DeliveryModel,
) -> Result<(), Failure> {
    let action = delivery.action.as_deref().unwrap_or("");
    match (delivery.event.as_str(), action) {
        ("ping", _) => {
            tracing::info!("GitHub pinged the webhook.");
            Ok(())
        }
        ("installation", "created" | "new_permissions_accepted" | "unsuspend") => {
            let event: InstallationEvent = parse(delivery)?;
            let repos = installed(&event.repositories);
            state
                .store
                .save_installation(
                    event.installation.id,
                    &event.installation.account.login,
                    &repos,
                )
                .await?;
            tracing::info!(
                installation = event.installation.id,
                account = %event.installation.account.login,
                repositories = repos.len(),
                "App installed."
            );
            Ok(())
        }
        ("installation", "deleted" | "suspend") => {
            let event: InstallationEvent = parse(delivery)?;
            state
                .store
                .delete_installation(event.installation.id)
                .await?;
            app.client.forget(event.installation.id).await;
            tracing::info!(
                installation = event.installation.id,
                action,
                "App uninstalled."
            );
            Ok(())
        }
        ("installation_repositories", "added" | "removed") => {
            let event: InstallationReposEvent = parse(delivery)?;
            let added = installed(&event.repositories_added);
            let removed: Vec<i64> = event.repositories_removed.iter().map(|r| r.id).collect();
            let id = event.installation.id;
            if !state
                .store
                .change_installation_repos(id, &added, &removed)
                .await?
            {
                learn_installation(state, app, id, &event.installation.account.login).await?;
            }
            Ok(())
        }
        ("push", _) => on_push(state, app, parse(delivery)?).await,
        ("issue_comment", _) => {
            Ok(super::commands::on_comment(state, app, &delivery.id, parse(delivery)?).await?)
        }
        ("pull_request", "opened" | "reopened" | "synchronize" | "labeled") => {
            Ok(super::pulls::on_pull_request(state, app, parse(delivery)?).await?)
        }
        ("pull_request_review", "submitted") => {
            Ok(super::commands::on_review(state, app, &delivery.id, parse(delivery)?).await?)
        }
        ("check_run", "rerequested" | "requested_action") => {
            Ok(super::checks::on_check_run(state, app, parse(delivery)?).await?)
        }
        _ => {
            tracing::debug!("Event not handled; acknowledged.");
            Ok(())
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(delivery: &DeliveryModel) -> Result<T, Failure> {
    serde_json::from_slice(&delivery.payload).map_err(|e| {
        Failure::Give(format!(
            "the {} payload lacks what the App reads: {e}",
            delivery.event
        ))
    })
}

fn installed(repos: &[RepoRef]) -> Vec<InstalledRepo> {
    repos
        .iter()
        .map(|r| InstalledRepo {
            id: r.id,
            full_name: r.full_name.clone(),
        })
        .collect()
}

/// Records an installation the broker has not heard of (the App was installed before the
/// broker ran), with its repositories as GitHub lists them.
async fn learn_installation(
    state: &AppState,
    app: &GitHubApp,
    id: i64,
    account: &str,
) -> Result<(), Failure> {
    #[derive(Deserialize)]
    struct Repositories {
        repositories: Vec<RepoRef>,
    }
    let client = app.client.installation(id).await?;
    let mut repos = Vec::new();
    for page in 1..=10u32 {
        let listed: Repositories = client
            .get(
                "/installation/repositories",
                Some(&[("per_page", "100".to_string()), ("page", page.to_string())]),
            )
            .await
            .map_err(|e| GitHubError::from_octocrab("the installation's repositories", e))?;
        let last = listed.repositories.len() < 100;
        repos.extend(installed(&listed.repositories));
        if last {
            break;
        }
    }
    state.store.save_installation(id, account, &repos).await?;
    tracing::info!(
        installation = id,
        repositories = repos.len(),
        "Installation learned from GitHub."
    );
    Ok(())
}

/// Whether installation `id` lets the App act on `repo`: from the store, or learned from
/// GitHub for an installation the broker has not heard of.
async fn installed_on(
    state: &AppState,
    app: &GitHubApp,
    id: i64,
    account: &str,
    repo: &RepoRef,
) -> Result<bool, Failure> {
    if state.store.installation_of(repo.id).await? == Some(id) {
        return Ok(true);
    }
    learn_installation(state, app, id, account).await?;
    Ok(state.store.installation_of(repo.id).await? == Some(id))
}

async fn on_push(state: &AppState, app: &GitHubApp, event: PushEvent) -> Result<(), Failure> {
    let Some(installation) = event.installation.as_ref().map(|i| IdOnly { id: i.id }) else {
        return Ok(());
    };
    if event.deleted || event.after.bytes().all(|b| b == b'0') {
        return Ok(());
    }
    if let Some(tag) = event.r#ref.strip_prefix("refs/tags/") {
        let tag = tag.to_string();
        return on_tag(state, app, installation.id, event, &tag).await;
    }
    let Some(branch) = event.r#ref.strip_prefix("refs/heads/") else {
        tracing::debug!(git_ref = %event.r#ref, "Neither a branch nor a tag; ignored.");
        return Ok(());
    };
    let repo = &event.repository;
    if !installed_on(state, app, installation.id, &repo.owner_login(), repo).await? {
        tracing::warn!(repository = %repo.full_name, "Push from a repository the installation does not cover; ignored.");
        return Ok(());
    }
    let client = app.client.installation(installation.id).await?;
    let config = match config::read(&client, &repo.full_name, &event.after).await? {
        ConfigAt::Missing => {
            tracing::debug!(repository = %repo.full_name, "No {CONFIG_PATH}; nothing to run.");
            return Ok(());
        }
        ConfigAt::Invalid(message) => {
            report_config_error(&client, &repo.full_name, &event.after, &message).await?;
            return Ok(());
        }
        ConfigAt::Valid(config) => config,
    };
    if event.repository.default_branch.as_deref() == Some(branch) {
        super::schedule::record(
            state,
            installation.id,
            repo.id,
            &repo.full_name,
            branch,
            &config,
        )
        .await?;
        super::history::record(
            state,
            installation.id,
            repo.id,
            &repo.full_name,
            branch,
            !repo.private,
            &config,
        )
        .await?;
    }
    let changed: Vec<String> = event
        .commits
        .iter()
        .flat_map(|c| c.added.iter().chain(&c.removed).chain(&c.modified))
        .cloned()
        .collect();
    let pushed_by = event.pushed_by();
    for (name, job) in &config.jobs {
        let Some(push) = &job.on.push else { continue };
        if !job.on.runs_on_push(branch) {
            continue;
        }
        // Without a list of changed files (a push of no new commits) the job runs.
        if !changed.is_empty() && !paths_match(&push.paths, &changed) {
            tracing::debug!(job = %name, "No changed file matches the job's paths; not run.");
            continue;
        }
        let provenance = Provenance::Push {
            commit: CommitRef {
                repository: repo.full_name.clone(),
                repository_id: repo.id as u64,
                sha: event.after.clone(),
                job: name.clone(),
                config_sha: event.after.clone(),
            },
            branch: branch.to_string(),
            pushed_by: pushed_by.clone(),
        };
        super::jobs::submit(
            state,
            installation.id,
            !repo.private,
            &provenance,
            job,
            job.repeat,
        )
        .await
        .map_err(|e| Failure::Retry(format!("{e:#}")))?;
    }
    Ok(())
}

/// A tag pushed: the jobs whose `on.tag` matches it run on the commit it points at, with the
/// config of that commit.
async fn on_tag(
    state: &AppState,
    app: &GitHubApp,
    installation: i64,
    event: PushEvent,
    tag: &str,
) -> Result<(), Failure> {
    #[derive(Deserialize)]
    struct Commit {
        sha: String,
    }
    let repo = &event.repository;
    if !installed_on(state, app, installation, &repo.owner_login(), repo).await? {
        return Ok(());
    }
    let client = app.client.installation(installation).await?;
    // An annotated tag's push names the tag object; the job runs the commit it points at.
    let commit: Commit = client
        .get(
            format!("/repos/{}/commits/{tag}", repo.full_name),
            None::<&()>,
        )
        .await
        .map_err(|e| GitHubError::from_octocrab("the tagged commit", e))?;
    let config = match config::read(&client, &repo.full_name, &commit.sha).await? {
        ConfigAt::Valid(config) => config,
        ConfigAt::Missing => return Ok(()),
        ConfigAt::Invalid(message) => {
            report_config_error(&client, &repo.full_name, &commit.sha, &message).await?;
            return Ok(());
        }
    };
    let pushed_by = event.pushed_by();
    for (name, job) in config
        .jobs
        .iter()
        .filter(|(_, job)| job.on.runs_on_tag(tag))
    {
        let provenance = Provenance::Tag {
            commit: CommitRef {
                repository: repo.full_name.clone(),
                repository_id: repo.id as u64,
                sha: commit.sha.clone(),
                job: name.clone(),
                config_sha: commit.sha.clone(),
            },
            tag: tag.to_string(),
            pushed_by: pushed_by.clone(),
        };
        super::jobs::submit(
            state,
            installation,
            !repo.private,
            &provenance,
            job,
            job.repeat,
        )
        .await
        .map_err(|e| Failure::Retry(format!("{e:#}")))?;
    }
    Ok(())
}

/// A config that does not parse: a failed check run on the commit that says where and why.
async fn report_config_error(
    client: &octocrab::Octocrab,
    repository: &str,
    sha: &str,
    message: &str,
) -> Result<(), Failure> {
    tracing::info!(repository, sha, %message, "The repository's config is not valid.");
    let body = serde_json::json!({
        "name": "testbot config",
        "head_sha": sha,
        "status": "completed",
        "conclusion": "failure",
        "output": {
            "title": format!("{CONFIG_PATH} is not valid"),
            "summary": format!("```text\n{}\n```\nCheck it locally with `testbot config check`.", message.replace("```", "'''")),
        },
    });
    let _: serde_json::Value = client
        .post(format!("/repos/{repository}/check-runs"), Some(&body))
        .await
        .map_err(|e| GitHubError::from_octocrab("a check run for the config error", e))?;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct InstallationRef {
    id: i64,
    #[serde(default)]
    account: Account,
}

#[derive(Debug, Default, Deserialize)]
struct Account {
    #[serde(default)]
    login: String,
}

#[derive(Debug, Deserialize)]
pub struct RepoRef {
    pub id: i64,
    pub full_name: String,
    #[serde(default)]
    pub default_branch: Option<String>,
    /// Taken as private when a payload does not say.
    #[serde(default = "private")]
    pub private: bool,
}

fn private() -> bool {
    true
}

impl RepoRef {
    fn owner_login(&self) -> String {
        self.full_name
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

#[derive(Debug, Deserialize)]
struct InstallationEvent {
    installation: InstallationRef,
    #[serde(default)]
    repositories: Vec<RepoRef>,
}

#[derive(Debug, Deserialize)]
struct InstallationReposEvent {
    installation: InstallationRef,
    #[serde(default)]
    repositories_added: Vec<RepoRef>,
    #[serde(default)]
    repositories_removed: Vec<RepoRef>,
}

#[derive(Debug, Deserialize)]
struct PushEvent {
    r#ref: String,
    after: String,
    #[serde(default)]
    deleted: bool,
    repository: RepoRef,
    #[serde(default)]
    installation: Option<IdOnly>,
    #[serde(default)]
    pusher: Pusher,
    #[serde(default)]
    sender: Option<Login>,
    #[serde(default)]
    commits: Vec<PushCommit>,
}

impl PushEvent {
    /// Who pushed: the sender's login, or the pusher's name when the payload has no sender.
    fn pushed_by(&self) -> String {
        self.sender
            .as_ref()
            .map_or_else(|| self.pusher.name.clone(), |s| s.login.clone())
    }
}

#[derive(Debug, Deserialize)]
pub struct IdOnly {
    pub id: i64,
}

#[derive(Debug, Default, Deserialize)]
struct Pusher {
    #[serde(default)]
    name: String,
}

#[derive(Debug, Deserialize)]
pub struct Login {
    pub login: String,
}

#[derive(Debug, Deserialize)]
struct PushCommit {
    #[serde(default)]
    added: Vec<String>,
    #[serde(default)]
    removed: Vec<String>,
    #[serde(default)]
    modified: Vec<String>,
}
