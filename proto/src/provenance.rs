//! Where a job the GitHub App created comes from: the facts a site's agent checks with GitHub
//! itself before it runs anything (see the provenance table in `docs/github-app.md`).
//!
//! A workflow job proves itself with its OIDC token; an App job has no token, so the broker
//! records what made it (the event, the repository and its id, the exact commit, the config's
//! job name, who asked) and the agent verifies each fact against GitHub's REST API with its own
//! credentials. A compromised broker can therefore replay a real event for the same commit, but
//! cannot invent a commit, a script, or an approval.

use serde::{Deserialize, Serialize};

/// Who submits App jobs, as recorded on them (`submitted_by`).
pub const APP_SUBMITTER: &str = "github-app";

/// What made an App job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum Provenance {
    /// A push to a branch (post-merge CI).
    Push {
        #[serde(flatten)]
        commit: CommitRef,
        /// The branch pushed (without `refs/heads/`).
        branch: String,
        /// Who pushed (GitHub login).
        pushed_by: String,
    },
    /// A tag pushed (a release): the commit the tag points at.
    Tag {
        #[serde(flatten)]
        commit: CommitRef,
        /// The tag (without `refs/tags/`).
        tag: String,
        /// Who pushed it (GitHub login).
        pushed_by: String,
    },
    /// A scheduled run (`on.schedule`) of a branch's head.
    Schedule {
        #[serde(flatten)]
        commit: CommitRef,
        /// The branch whose head runs (without `refs/heads/`).
        branch: String,
        /// The cron expression of the config's schedule entry.
        cron: String,
    },
    /// A commit already on a branch, run again by the broker for the test statistics: a step
    /// of bisection `bisection`, or (without one) a run that fills the branch's history in idle
    /// capacity. It runs what a push of the commit would: the agent checks the commit is on
    /// the branch and that the config at the commit runs the job on pushes to it.
    History {
        #[serde(flatten)]
        commit: CommitRef,
        branch: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bisection: Option<i64>,
    },
    /// A pull request, run because someone with write permission asked in a comment. The
    /// commit is the pull request's head; the config is the base branch's, never the head's (a
    /// fork must not change what runs, where, or with what).
    PullRequest {
        /// `repository` is the base repository; `sha` the head commit; `config_sha` the base
        /// branch's head when the job was made.
        #[serde(flatten)]
        commit: CommitRef,
        number: u64,
        /// The branch the pull request targets (without `refs/heads/`).
        base_branch: String,
        /// `owner/name` of the head repository: a fork, or the base repository itself.
        head_repository: String,
        /// What approved running this commit.
        approval: Approval,
    },
}

/// What approved running a pull request's commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Approval {
    /// A comment with a `/testbot run` or `/testbot repeat` command on the pull request. On a
    /// fork's pull request, the command names the head commit in full.
    Comment { comment_id: u64, by: String },
    /// A pull request review whose body holds such a command; GitHub records the commit it
    /// reviewed (`commit_id`), so it names the commit whatever the command says.
    Review { review_id: u64, by: String },
    /// The pull request's own author, who has write permission: the job's
    /// `on.pull_request.automatic = "writers"` runs it without being asked.
    Author { by: String },
    /// Someone with write permission added a label that the job's `on.label` names, to a pull
    /// request from a branch of the repository itself. A label names no commit, so it never
    /// approves a fork's code.
    Label { label: String, by: String },
}

impl Approval {
    /// The GitHub login that approved.
    pub fn by(&self) -> &str {
        match self {
            Approval::Comment { by, .. }
            | Approval::Review { by, .. }
            | Approval::Author { by }
            | Approval::Label { by, .. } => by,
        }
    }
}

/// The repository, commit and config job every provenance names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRef {
    /// `owner/name`.
    pub repository: String,
    /// GitHub's id of the repository (stable across renames; a name can be re-used).
    pub repository_id: u64,
    /// The full commit id the job runs.
    pub sha: String,
    /// The job's name in `.github/testbot.toml`.
    pub job: String,
    /// The commit whose `.github/testbot.toml` declares the job (for a push: `sha` itself).
    pub config_sha: String,
}

impl Provenance {
    /// The repository, commit and job.
    pub fn commit(&self) -> &CommitRef {
        match self {
            Provenance::Push { commit, .. }
            | Provenance::Tag { commit, .. }
            | Provenance::Schedule { commit, .. }
            | Provenance::History { commit, .. }
            | Provenance::PullRequest { commit, .. } => commit,
        }
    }

    /// Whether the commit comes from a fork (its pull request's head is another repository).
    pub fn from_fork(&self) -> bool {
        match self {
            Provenance::Push { .. }
            | Provenance::Tag { .. }
            | Provenance::Schedule { .. }
            | Provenance::History { .. } => false,
            Provenance::PullRequest {
                commit,
                head_repository,
                ..
            } => !head_repository.eq_ignore_ascii_case(&commit.repository),
        }
    }

    /// The event's name as a site policy names it (`push`).
    pub fn event(&self) -> &'static str {
        match self {
            // A commit of the branch again: what the site allowed for its push.
            Provenance::Push { .. } | Provenance::Tag { .. } | Provenance::History { .. } => "push",
            Provenance::Schedule { .. } => "schedule",
            Provenance::PullRequest { .. } => "pull_request",
        }
    }

    /// The git ref the commit was reached by (`refs/heads/main`).
    pub fn git_ref(&self) -> String {
        match self {
            Provenance::Push { branch, .. }
            | Provenance::Schedule { branch, .. }
            | Provenance::History { branch, .. } => format!("refs/heads/{branch}"),
            Provenance::Tag { tag, .. } => format!("refs/tags/{tag}"),
            Provenance::PullRequest { number, .. } => format!("refs/pull/{number}/head"),
        }
    }

    /// The job's identity as routing and a site policy's rules read it: the repository, the
    /// verified ref and the event. An App job has no workflow (its `job_workflow_ref` names the
    /// config file, which no `workflows` glob of a rule is written for) and no actor GitHub
    /// vouches for (empty, which no `actors` glob matches).
    pub fn identity(&self) -> crate::agents::JobIdentity {
        let c = self.commit();
        let git_ref = self.git_ref();
        crate::agents::JobIdentity {
            repository: c.repository.clone(),
            job_workflow_ref: format!(
                "{}/{}@{git_ref}",
                c.repository,
                crate::repo_config::CONFIG_PATH
            ),
            git_ref,
            event_name: self.event().to_string(),
            actor: String::new(),
            environment: None,
        }
    }

    /// One line for logs and refusals: `push of owner/repo@abc1234 to main (job unit)`.
    pub fn describe(&self) -> String {
        let c = self.commit();
        let short = c.sha.get(..12).unwrap_or(&c.sha);
        match self {
            Provenance::Push {
                branch, pushed_by, ..
            } => format!(
                "push of {}@{short} to {branch} by {pushed_by} (job {})",
                c.repository, c.job
            ),
            Provenance::Schedule { branch, cron, .. } => format!(
                "schedule `{cron}` of {}@{short} on {branch} (job {})",
                c.repository, c.job
            ),
            Provenance::History {
                branch,
                bisection: Some(bisection),
                ..
            } => format!(
                "bisection {bisection} of {}@{short} on {branch} (job {})",
                c.repository, c.job
            ),
            Provenance::History { branch, .. } => format!(
                "history run of {}@{short} on {branch} (job {})",
                c.repository, c.job
            ),
            Provenance::Tag { tag, pushed_by, .. } => format!(
                "tag {tag} of {}@{short} pushed by {pushed_by} (job {})",
                c.repository, c.job
            ),
            Provenance::PullRequest {
                number, approval, ..
            } => format!(
                "pull request {}#{number} at {short}, asked for by {} (job {})",
                c.repository,
                approval.by(),
                c.job
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provenance_round_trips_and_refuses_unknown_fields() {
        let p = Provenance::Push {
            commit: CommitRef {
                repository: "o/r".into(),
                repository_id: 7,
                sha: "a".repeat(40),
                job: "unit".into(),
                config_sha: "a".repeat(40),
            },
            branch: "main".into(),
            pushed_by: "alice".into(),
        };
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["event"], "push");
        assert_eq!(json["repository_id"], 7);
        assert_eq!(
            serde_json::from_value::<Provenance>(json.clone()).unwrap(),
            p
        );
        let mut extra = json;
        extra["script"] = "rm -rf /".into();
        assert!(serde_json::from_value::<Provenance>(extra).is_err());
        assert_eq!(p.git_ref(), "refs/heads/main");
        assert!(
            p.describe()
                .starts_with("push of o/r@aaaaaaaaaaaa to main by alice")
        );
    }
}
