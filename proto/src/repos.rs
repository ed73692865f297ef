//! Repository registration: which GitHub repositories may submit jobs, and with what defaults.
//!
//! A workflow can submit jobs only for a registered repository. Registering needs proof of
//! control of the repository: a GitHub user token with admin permission on it, or the operator
//! token. A broker may let an OIDC token from one of its workflows create the first
//! registration; a workflow never changes or removes one.

use serde::{Deserialize, Serialize};

/// Events a registration enables when it names none. `pull_request_target` is never a default:
/// it runs with the base repository's trust on code from a fork.
pub const DEFAULT_EVENTS: &[&str] = &["push", "workflow_dispatch", "schedule", "pull_request"];

/// The body of `POST /api/v1/repos`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoRegistration {
    /// `owner/name`, as on GitHub.
    pub name: String,
    /// See [`RepoSettings::sites`].
    #[serde(default)]
    pub sites: Vec<String>,
    /// See [`RepoSettings::events`].
    #[serde(default = "default_events")]
    pub events: Vec<String>,
    /// See [`RepoSettings::refs`].
    #[serde(default = "default_refs")]
    pub refs: Vec<String>,
}

impl Default for RepoRegistration {
    fn default() -> Self {
        let settings = RepoSettings::default();
        RepoRegistration {
            name: String::new(),
            sites: settings.sites,
            events: settings.events,
            refs: settings.refs,
        }
    }
}

/// Per-repository settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoSettings {
    /// Sites the repository's jobs may run on. Default: empty, meaning any site whose policy
    /// accepts them.
    #[serde(default)]
    pub sites: Vec<String>,
    /// Workflow events whose jobs are accepted. Default: [`DEFAULT_EVENTS`].
    #[serde(default = "default_events")]
    pub events: Vec<String>,
    /// Ref globs whose jobs are accepted (`refs/heads/main`, `refs/tags/*`). Default: `["*"]`.
    #[serde(default = "default_refs")]
    pub refs: Vec<String>,
}

impl Default for RepoSettings {
    fn default() -> Self {
        RepoSettings {
            sites: Vec::new(),
            events: default_events(),
            refs: default_refs(),
        }
    }
}

fn default_events() -> Vec<String> {
    DEFAULT_EVENTS.iter().map(|e| e.to_string()).collect()
}

fn default_refs() -> Vec<String> {
    vec!["*".into()]
}

/// A repository name is `owner/name` with GitHub's characters.
pub fn validate_repo_name(name: &str) -> Result<(), String> {
    let valid_part = |part: &str| {
        !part.is_empty()
            && part.len() <= 100
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match name.split_once('/') {
        Some((owner, repo)) if valid_part(owner) && valid_part(repo) && !repo.contains('/') => {
            Ok(())
        }
        _ => Err(format!(
            "repository {name:?} is not owner/name (letters, digits, - _ .)"
        )),
    }
}

impl RepoRegistration {
    pub fn settings(&self) -> RepoSettings {
        RepoSettings {
            sites: self.sites.clone(),
            events: self.events.clone(),
            refs: self.refs.clone(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        validate_repo_name(&self.name)?;
        for site in &self.sites {
            crate::jobs::validate_word("site", site)?;
        }
        if self.events.is_empty() {
            return Err("events is empty: the repository could never run a job".into());
        }
        for event in &self.events {
            crate::jobs::validate_word("event", event)?;
        }
        if self.refs.is_empty() {
            return Err("refs is empty: the repository could never run a job".into());
        }
        Ok(())
    }
}

/// A registered repository, as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repo {
    pub name: String,
    pub settings: RepoSettings,
    /// Who registered it: `operator:NAME`, `workflow:OWNER/REPO@RUN_ID` or `github:LOGIN`.
    pub registered_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// GitHub's id of the repository the registration is bound to: a token of another
    /// repository that took the name (after a rename or deletion) is refused. `None` until the
    /// first workflow token uses a registration the operator made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_id: Option<String>,
    /// GitHub's id of the repository's owner, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_owner_id: Option<String>,
}

/// The answer to `GET /api/v1/repos`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoList {
    pub repos: Vec<Repo>,
}
