//! `pull_request` opened, reopened or pushed to (`synchronize`).
//!
//! - Jobs with `on.pull_request.automatic = "writers"` run at once when the pull request's
//!   author has write permission (asked of GitHub), when a changed file matches the job's
//!   `paths`, if it has any. The config is the base branch's.
//! - A fork's pull request whose author may not write gets an `action_required` check run on its
//!   head, saying how a maintainer approves that commit; every push needs a new approval, so each
//!   new head gets one.
//! - `labeled`: a label that jobs' `on.label` name, added by someone with write permission,
//!   runs those jobs on a pull request from the repository's own branches. A label names no
//!   commit, so on a fork's pull request it only gets the `action_required` check run.

use serde::Deserialize;
use testbot_proto::provenance::{Approval, CommitRef, Provenance};
use testbot_proto::repo_config::{Automatic, CONFIG_PATH, paths_match};

use super::config::{self, ConfigAt};
use super::{GitHubApp, GitHubError};
use crate::state::AppState;

/// A `pull_request` delivery, as far as the App reads it.
#[derive(Debug, Deserialize)]
pub struct PullRequestEvent {
    pub action: String,
    pub number: u64,
    pub pull_request: Pull,
    pub repository: super::process::RepoRef,
    #[serde(default)]
    pub installation: Option<super::process::IdOnly>,
    pub sender: super::process::Login,
    /// The label added (`labeled`).
    #[serde(default)]
    pub label: Option<Label>,
}

#[derive(Debug, Deserialize)]
pub struct Label {
    pub name: String,
}

/// A pull request as the App reads it (from a delivery, or `GET .../pulls/{number}`).
#[derive(Debug, Deserialize)]
pub struct Pull {
    pub state: String,
    pub user: super::process::Login,
    pub head: Side,
    pub base: Side,
}

#[derive(Debug, Deserialize)]
pub struct Side {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub sha: String,
    #[serde(default)]
    pub repo: Option<SideRepo>,
}

#[derive(Debug, Deserialize)]
pub struct SideRepo {
    pub full_name: String,
}

/// Most changed files read to match `paths` (GitHub lists at most 3,000).
const MAX_FILES_PAGES: u32 = 30;

pub async fn on_pull_request(
    state: &AppState,
    app: &GitHubApp,
    event: PullRequestEvent,
) -> Result<(), GitHubError> {
    let Some(installation) = &event.installation else {
        return Ok(());
    };
    if !matches!(
        event.action.as_str(),
        "opened" | "reopened" | "synchronize" | "labeled"
    ) || event.pull_request.state != "open"
    {
        return Ok(());
    }
    let repo = &event.repository;
    let pr = &event.pull_request;
    let client = app.client.installation(installation.id).await?;
    let base_head = branch_head(&client, &repo.full_name, &pr.base.git_ref).await?;
    let config = match config::read(&client, &repo.full_name, &base_head).await? {
        ConfigAt::Valid(config) => config,
        // No config on the base: nothing runs; an invalid one is reported on the base's pushes.
        ConfigAt::Missing | ConfigAt::Invalid(_) => return Ok(()),
    };
    let head_repository = pr
        .head
        .repo
        .as_ref()
        .map_or_else(String::new, |r| r.full_name.clone());
    let fork = !head_repository.eq_ignore_ascii_case(&repo.full_name);
    let provenance_of = |job: &str, approval: Approval| Provenance::PullRequest {
        commit: CommitRef {
            repository: repo.full_name.clone(),
            repository_id: repo.id as u64,
            sha: pr.head.sha.clone(),
            job: job.to_string(),
            config_sha: base_head.clone(),
        },
        number: event.number,
        base_branch: pr.base.git_ref.clone(),
        head_repository: head_repository.clone(),
        approval,
    };
    if event.action == "labeled" {
        let Some(label) = &event.label else {
            return Ok(());
        };
        let labelled: Vec<_> = config
            .jobs
            .iter()
            .filter(|(_, job)| job.on.label.contains(&label.name))
            .collect();
        if labelled.is_empty() {
            return Ok(());
        }
        if fork {
            return approval_needed(&client, &repo.full_name, &pr.head.sha, &app.public_url).await;
        }
        let by = &event.sender.login;
        if !super::commands::may_write(&client, &repo.full_name, by).await? {
            tracing::info!(
                repository = %repo.full_name,
                number = event.number,
                label = %label.name,
                sender = %by,
                "A label that starts jobs was added by someone without write permission; nothing runs."
            );
            return Ok(());
        }
        for (name, job) in labelled {
            let provenance = provenance_of(
                name,
                Approval::Label {
                    label: label.name.clone(),
                    by: by.clone(),
                },
            );
            super::jobs::submit(
                state,
                installation.id,
                !repo.private,
                &provenance,
                job,
                job.repeat,
            )
            .await
            .map_err(|e| GitHubError::Unavailable(format!("{e:#}")))?;
        }
        return Ok(());
    }
    let author = &pr.user.login;
    let writer = super::commands::may_write(&client, &repo.full_name, author).await?;
    if !writer {
        if fork && config.jobs.values().any(|job| job.on.comment) {
            approval_needed(&client, &repo.full_name, &pr.head.sha, &app.public_url).await?;
        }
        return Ok(());
    }
    let automatic: Vec<_> = config
        .jobs
        .iter()
        .filter(|(_, job)| {
            job.on
                .pull_request
                .as_ref()
                .is_some_and(|trigger| trigger.automatic == Automatic::Writers)
        })
        .collect();
    if automatic.is_empty() {
        return Ok(());
    }
    let changed = if automatic.iter().any(|(_, job)| {
        job.on
            .pull_request
            .as_ref()
            .is_some_and(|t| !t.paths.is_empty())
    }) {
        changed_files(&client, &repo.full_name, event.number).await?
    } else {
        Vec::new()
    };
    for (name, job) in automatic {
        let paths = &job.on.pull_request.as_ref().expect("filtered").paths;
        if !paths_match(paths, &changed) {
            continue;
        }
        let provenance = provenance_of(name, Approval::Author { by: author.clone() });
        super::jobs::submit(
            state,
            installation.id,
            !repo.private,
            &provenance,
            job,
            job.repeat,
        )
        .await
        .map_err(|e| GitHubError::Unavailable(format!("{e:#}")))?;
    }
    Ok(())
}

/// The commit at the head of `branch`.
pub async fn branch_head(
    client: &octocrab::Octocrab,
    repository: &str,
    branch: &str,
) -> Result<String, GitHubError> {
    #[derive(Deserialize)]
    struct Branch {
        commit: Sha,
    }
    #[derive(Deserialize)]
    struct Sha {
        sha: String,
    }
    let found: Branch = client
        .get(
            format!("/repos/{repository}/branches/{branch}"),
            None::<&()>,
        )
        .await
        .map_err(|e| GitHubError::from_octocrab("the base branch", e))?;
    Ok(found.commit.sha)
}

/// Whether GitHub says `repository` is public (a scheduled run has no payload that says).
pub async fn is_public(client: &octocrab::Octocrab, repository: &str) -> Result<bool, GitHubError> {
    #[derive(Deserialize)]
    struct Repository {
        private: bool,
    }
    let found: Repository = client
        .get(format!("/repos/{repository}"), None::<&()>)
        .await
        .map_err(|e| GitHubError::from_octocrab("the repository", e))?;
    Ok(!found.private)
}

async fn changed_files(
    client: &octocrab::Octocrab,
    repository: &str,
    number: u64,
) -> Result<Vec<String>, GitHubError> {
    #[derive(Deserialize)]
    struct File {
        filename: String,
    }
    let mut files = Vec::new();
    for page in 1..=MAX_FILES_PAGES {
        let listed: Vec<File> = client
            .get(
                format!("/repos/{repository}/pulls/{number}/files"),
                Some(&[("per_page", "100".to_string()), ("page", page.to_string())]),
            )
            .await
            .map_err(|e| GitHubError::from_octocrab("the pull request's files", e))?;
        let last = listed.len() < 100;
        files.extend(listed.into_iter().map(|f| f.filename));
        if last {
            break;
        }
    }
    Ok(files)
}

/// An `action_required` check run on a fork's head: nothing runs until a maintainer approves
/// exactly this commit.
async fn approval_needed(
    client: &octocrab::Octocrab,
    repository: &str,
    sha: &str,
    public_url: &str,
) -> Result<(), GitHubError> {
    let body = serde_json::json!({
        "name": "testbot approval",
        "head_sha": sha,
        "status": "completed",
        "conclusion": "action_required",
        "details_url": public_url,
        "output": {
            "title": "Waiting for a maintainer to approve this commit",
            "summary": format!(
                "This pull request comes from a fork, so its code runs on the test sites only \
                 once someone with write permission approves this exact commit: a comment \
                 `/testbot run {sha}`, or a review whose text holds `/testbot run`. A later push \
                 needs a new approval. The jobs are those of {CONFIG_PATH} on the base branch."
            ),
        },
    });
    let _: serde_json::Value = client
        .post(format!("/repos/{repository}/check-runs"), Some(&body))
        .await
        .map_err(|e| GitHubError::from_octocrab("the approval check run", e))?;
    Ok(())
}
