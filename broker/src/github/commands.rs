//! `/testbot` commands in pull request comments and reviews (the grammar is
//! `testbot_proto::commands`).
//!
//! A new comment or a submitted review (never an edited one, and each once: the store remembers
//! what it acted on) is parsed; for each command:
//! - `help`: a reply listing the jobs of the base branch's `.github/testbot.toml` and when each
//!   runs;
//! - `cancel [JOB...]`: cancels the runs of the pull request's head (write permission);
//! - `run` / `repeat N`: only for someone with write permission (asked of GitHub, not taken from
//!   the payload's `author_association`). The jobs are the base branch's (a pull request cannot
//!   change what runs); on a fork's pull request the command must name the head commit in full,
//!   and a plain `/testbot run` gets a reply saying how to approve the commit; a review's
//!   command approves the commit GitHub says it reviewed (`commit_id`). The comment gets
//!   an 👀 reaction when its jobs are queued.
//! - anything the App cannot do gets a reply that says why.

use serde::Deserialize;
use testbot_proto::commands::{Command, is_short_sha, parse_comment};
use testbot_proto::provenance::{Approval, CommitRef, Provenance};
use testbot_proto::repo_config::{CONFIG_PATH, RepoConfig};

use super::config::{self, ConfigAt};
use super::{GitHubApp, GitHubError};
use crate::state::AppState;
use crate::store::github::CommentKind;

/// An `issue_comment` delivery, as far as the App reads it.
#[derive(Debug, Deserialize)]
pub struct CommentEvent {
    pub action: String,
    pub issue: Issue,
    pub comment: CommentRef,
    pub repository: super::process::RepoRef,
    #[serde(default)]
    pub installation: Option<super::process::IdOnly>,
}

#[derive(Debug, Deserialize)]
pub struct Issue {
    pub number: u64,
    /// Present when the issue is a pull request.
    #[serde(default)]
    pub pull_request: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct CommentRef {
    pub id: u64,
    pub body: Option<String>,
    pub user: super::process::Login,
}

/// A `pull_request_review` delivery, as far as the App reads it.
#[derive(Debug, Deserialize)]
pub struct ReviewEvent {
    pub action: String,
    pub review: ReviewRef,
    pub pull_request: PullNumber,
    pub repository: super::process::RepoRef,
    #[serde(default)]
    pub installation: Option<super::process::IdOnly>,
}

#[derive(Debug, Deserialize)]
pub struct ReviewRef {
    pub id: u64,
    pub body: Option<String>,
    pub commit_id: String,
    pub user: super::process::Login,
}

#[derive(Debug, Deserialize)]
pub struct PullNumber {
    pub number: u64,
}

/// What carried the commands.
#[derive(Debug, Clone)]
enum Source {
    Comment(u64),
    /// A review, with the commit GitHub says it reviewed.
    Review {
        id: u64,
        commit_id: String,
    },
}

/// Acts on a comment's commands. `Err` only for what is worth another attempt.
pub async fn on_comment(
    state: &AppState,
    app: &GitHubApp,
    delivery: &str,
    event: CommentEvent,
) -> Result<(), GitHubError> {
    if event.action != "created" || event.issue.pull_request.is_none() {
        // Edits never act (nothing runs twice); comments on issues have no commit to run.
        return Ok(());
    }
    let body = event.comment.body.as_deref().unwrap_or("");
    on_commands(
        state,
        app,
        delivery,
        event.installation.as_ref(),
        &event.repository,
        event.issue.number,
        Source::Comment(event.comment.id),
        &event.comment.user.login,
        body,
    )
    .await
}

/// Acts on the commands in a submitted review's body.
pub async fn on_review(
    state: &AppState,
    app: &GitHubApp,
    delivery: &str,
    event: ReviewEvent,
) -> Result<(), GitHubError> {
    if event.action != "submitted" {
        return Ok(());
    }
    let body = event.review.body.as_deref().unwrap_or("");
    on_commands(
        state,
        app,
        delivery,
        event.installation.as_ref(),
        &event.repository,
        event.pull_request.number,
        Source::Review {
            id: event.review.id,
            commit_id: event.review.commit_id.clone(),
        },
        &event.review.user.login,
        body,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn on_commands(
    state: &AppState,
    app: &GitHubApp,
    delivery: &str,
    installation: Option<&super::process::IdOnly>,
    repo: &super::process::RepoRef,
    number: u64,
    source: Source,
    author: &str,
    body: &str,
) -> Result<(), GitHubError> {
    let Some(installation) = installation else {
        return Ok(());
    };
    let commands = parse_comment(body);
    if commands.is_empty() {
        return Ok(());
    }
    let store_err = |e: crate::store::StoreError| GitHubError::Unavailable(format!("{e:?}"));
    let (kind, id) = match &source {
        Source::Comment(id) => (CommentKind::Comment, *id),
        Source::Review { id, .. } => (CommentKind::Review, *id),
    };
    if !state
        .store
        .claim_comment(kind, id as i64, delivery, testbot_proto::now_ms())
        .await
        .map_err(store_err)?
    {
        return Ok(());
    }
    let client = app.client.installation(installation.id).await?;
    let ctx = Context {
        state,
        client: &client,
        repository: &repo.full_name,
        repository_id: repo.id as u64,
        public: !repo.private,
        installation_id: installation.id,
        number,
        source,
        author,
    };
    let mut replies = Vec::new();
    let mut queued = 0;
    for command in commands {
        match command {
            Err(err) => replies.push(format!("I cannot read {err}.")),
            Ok(command) => match ctx.act(&command).await? {
                Outcome::Queued(n) => queued += n,
                Outcome::Reply(text) => replies.push(text),
            },
        }
    }
    if queued > 0 {
        ctx.react("eyes").await?;
    }
    if !replies.is_empty() {
        let text = format!("@{} {}", ctx.author, replies.join("\n\n"));
        ctx.reply(&text).await?;
    }
    Ok(())
}

enum Outcome {
    Queued(usize),
    Reply(String),
}

struct Context<'a> {
    state: &'a AppState,
    client: &'a octocrab::Octocrab,
    repository: &'a str,
    repository_id: u64,
    /// The repository is public (its jobs' pages need no sign-in).
    public: bool,
    installation_id: i64,
    number: u64,
    source: Source,
    author: &'a str,
}

impl Context<'_> {
    async fn act(&self, command: &Command) -> Result<Outcome, GitHubError> {
        let pr: super::pulls::Pull = self
            .client
            .get(
                format!("/repos/{}/pulls/{}", self.repository, self.number),
                None::<&()>,
            )
            .await
            .map_err(|e| GitHubError::from_octocrab("the pull request", e))?;
        let base_branch = pr.base.git_ref.clone();
        let (config_sha, config) = match self.base_config(&base_branch).await? {
            Ok(found) => found,
            Err(reply) => return Ok(Outcome::Reply(reply)),
        };
        let (jobs, count, sha) = match command {
            Command::Help => return Ok(Outcome::Reply(help(&config, &base_branch))),
            Command::Cancel { jobs } => {
                if !self.may_write().await? {
                    return Ok(Outcome::Reply(format!(
                        "only people with write permission on {} may cancel jobs here.",
                        self.repository
                    )));
                }
                return self.cancel(jobs, &pr.head.sha).await;
            }
            Command::Run { jobs, sha } => (jobs, 1, sha),
            Command::Repeat { count, jobs, sha } => (jobs, *count, sha),
        };
        if !self.may_write().await? {
            return Ok(Outcome::Reply(format!(
                "only people with write permission on {} may run jobs here.",
                self.repository
            )));
        }
        if pr.state != "open" {
            return Ok(Outcome::Reply("this pull request is closed.".into()));
        }
        let head_repository = pr
            .head
            .repo
            .as_ref()
            .map_or_else(String::new, |r| r.full_name.clone());
        let fork = !head_repository.eq_ignore_ascii_case(self.repository);
        // A review names the commit it reviewed, whatever its command says.
        let sha = match (&self.source, sha) {
            (Source::Review { commit_id, .. }, Some(named)) if named != commit_id => {
                return Ok(Outcome::Reply(format!(
                    "this review is of `{commit_id}`, but its command names `{named}`: nothing runs."
                )));
            }
            (Source::Review { commit_id, .. }, _) => Some(commit_id.clone()),
            (Source::Comment(_), sha) => sha.clone(),
        };
        match &sha {
            Some(sha) if *sha != pr.head.sha => {
                return Ok(Outcome::Reply(format!(
                    "`{sha}` is not the head of this pull request (it is `{}`): nothing runs. \
                     Approve the commit you reviewed with `/testbot run {}`.",
                    pr.head.sha, pr.head.sha
                )));
            }
            None if fork => {
                return Ok(Outcome::Reply(format!(
                    "this pull request comes from a fork, so its code runs only once an approver \
                     names the exact commit they reviewed: `/testbot run {}` (or a pull request \
                     review with `/testbot run`). A later push needs a new approval.",
                    pr.head.sha
                )));
            }
            _ => {}
        }
        let names: Vec<String> = if jobs.is_empty() {
            config
                .jobs
                .iter()
                .filter(|(_, job)| job.on.comment)
                .map(|(name, _)| name.clone())
                .collect()
        } else {
            jobs.clone()
        };
        for name in &names {
            match config.job(name) {
                None => return Ok(Outcome::Reply(unknown_job(name, &config, &base_branch))),
                Some(job) if !job.on.comment => {
                    return Ok(Outcome::Reply(format!(
                        "job `{name}` does not run on request (`on.comment = false` in {CONFIG_PATH})."
                    )));
                }
                Some(_) => {}
            }
        }
        if names.is_empty() {
            return Ok(Outcome::Reply(format!(
                "{CONFIG_PATH} on `{base_branch}` has no job that runs on request."
            )));
        }
        let mut queued = 0;
        for name in &names {
            let job = config.job(name).expect("checked above");
            let provenance = Provenance::PullRequest {
                commit: CommitRef {
                    repository: self.repository.to_string(),
                    repository_id: self.repository_id,
                    sha: pr.head.sha.clone(),
                    job: name.clone(),
                    config_sha: config_sha.clone(),
                },
                number: self.number,
                base_branch: base_branch.clone(),
                head_repository: head_repository.clone(),
                approval: match &self.source {
                    Source::Comment(id) => Approval::Comment {
                        comment_id: *id,
                        by: self.author.to_string(),
                    },
                    Source::Review { id, .. } => Approval::Review {
                        review_id: *id,
                        by: self.author.to_string(),
                    },
                },
            };
            let runs = count.max(1) * job.repeat;
            let runs = runs.min(testbot_proto::repo_config::MAX_REPEAT);
            let submitted = super::jobs::submit(
                self.state,
                self.installation_id,
                self.public,
                &provenance,
                job,
                runs,
            )
            .await
            .map_err(|e| GitHubError::Unavailable(format!("{e:#}")))?;
            queued += submitted.len();
        }
        Ok(Outcome::Queued(queued))
    }

    /// Cancels the named jobs' runs (all the App's runs, when none is named) on `sha`.
    async fn cancel(&self, jobs: &[String], sha: &str) -> Result<Outcome, GitHubError> {
        let unavailable = |e: crate::store::StoreError| GitHubError::Unavailable(format!("{e:?}"));
        let active = self
            .state
            .store
            .active_app_jobs_of_commit(self.repository, sha)
            .await
            .map_err(unavailable)?;
        let mut cancelled = 0;
        for row in active {
            let name = row
                .provenance
                .as_deref()
                .and_then(|p| serde_json::from_str::<Provenance>(p).ok())
                .map(|p| p.commit().job.clone())
                .unwrap_or_default();
            if !jobs.is_empty() && !jobs.contains(&name) {
                continue;
            }
            crate::lifecycle::jobs::cancel(self.state, row.job_id())
                .await
                .map_err(unavailable)?;
            cancelled += 1;
        }
        let short = sha.get(..12).unwrap_or(sha);
        Ok(Outcome::Reply(match cancelled {
            0 => format!(
                "no run of {} is going on for `{short}`.",
                describe_jobs(jobs)
            ),
            n => format!(
                "cancelled {n} run{} of {} on `{short}`.",
                if n == 1 { "" } else { "s" },
                describe_jobs(jobs)
            ),
        }))
    }

    /// The base branch's head and its config, or the reply that says why there is none.
    async fn base_config(
        &self,
        branch: &str,
    ) -> Result<Result<(String, RepoConfig), String>, GitHubError> {
        let sha = super::pulls::branch_head(self.client, self.repository, branch).await?;
        Ok(
            match config::read(self.client, self.repository, &sha).await? {
                ConfigAt::Valid(config) => Ok((sha, config)),
                ConfigAt::Missing => Err(format!(
                    "`{branch}` has no {CONFIG_PATH}, so no job runs here yet."
                )),
                ConfigAt::Invalid(message) => Err(format!(
                    "{CONFIG_PATH} on `{branch}` is not valid, so nothing runs:\n\n```text\n{}\n```",
                    message.replace("```", "'''")
                )),
            },
        )
    }

    /// Whether the comment's author may write to the repository, as GitHub says now.
    async fn may_write(&self) -> Result<bool, GitHubError> {
        may_write(self.client, self.repository, self.author).await
    }

    /// Reacts to the comment (a review cannot carry reactions).
    async fn react(&self, content: &str) -> Result<(), GitHubError> {
        let Source::Comment(comment_id) = &self.source else {
            return Ok(());
        };
        let route = format!(
            "/repos/{}/issues/comments/{comment_id}/reactions",
            self.repository
        );
        let _: serde_json::Value = self
            .client
            .post(route, Some(&serde_json::json!({ "content": content })))
            .await
            .map_err(|e| GitHubError::from_octocrab("a reaction", e))?;
        Ok(())
    }

    async fn reply(&self, body: &str) -> Result<(), GitHubError> {
        let route = format!("/repos/{}/issues/{}/comments", self.repository, self.number);
        let _: serde_json::Value = self
            .client
            .post(route, Some(&serde_json::json!({ "body": body })))
            .await
            .map_err(|e| GitHubError::from_octocrab("a reply", e))?;
        Ok(())
    }
}

/// Whether `login` has write permission on `repository` now, as GitHub says (not the
/// payload's `author_association`).
pub async fn may_write(
    client: &octocrab::Octocrab,
    repository: &str,
    login: &str,
) -> Result<bool, GitHubError> {
    #[derive(Deserialize)]
    struct Permission {
        permission: String,
    }
    let route = format!("/repos/{repository}/collaborators/{login}/permission");
    match client.get::<Permission, _, _>(route, None::<&()>).await {
        Ok(p) => Ok(matches!(
            p.permission.as_str(),
            "admin" | "maintain" | "write"
        )),
        Err(err) => {
            let err = GitHubError::from_octocrab("a user's permission", err);
            if err.is_not_found() {
                Ok(false)
            } else {
                Err(err)
            }
        }
    }
}

fn describe_jobs(jobs: &[String]) -> String {
    if jobs.is_empty() {
        "any job".into()
    } else {
        jobs.iter()
            .map(|j| format!("`{j}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn job_names(config: &RepoConfig) -> String {
    config
        .jobs
        .keys()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn unknown_job(name: &str, config: &RepoConfig, branch: &str) -> String {
    let hint = if is_short_sha(name) {
        " A commit is named by its full 40-character sha: a shorter one could be matched by \
         another commit made to look like it."
    } else {
        ""
    };
    format!(
        "{CONFIG_PATH} on `{branch}` has no job `{name}`; its jobs are {}.{hint}",
        job_names(config)
    )
}

/// The reply to `/testbot help`.
fn help(config: &RepoConfig, branch: &str) -> String {
    let mut text = format!(
        "these are the jobs of {CONFIG_PATH} on `{branch}`:\n\n| job | runs on | when |\n|---|---|---|\n"
    );
    for (name, job) in &config.jobs {
        text += &format!(
            "| `{name}` | {} | {} |\n",
            job.describe_placement(),
            job.on.describe().join("; ")
        );
    }
    text += "\nCommands (people with write permission): `/testbot run [JOB...]`, \
             `/testbot repeat N [JOB...]`, `/testbot cancel [JOB...]`, `/testbot help`. On a \
             pull request from a fork, \
             name the commit you reviewed: `/testbot run SHA`.";
    text
}
