//! The in-memory GitHub: accounts, tokens, repositories and what happens on them. Git content
//! lives in the repositories' bare git directories (see [`super::git`]); this holds the rest.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde_json::Value;

/// A collaborator's role on a repository, weakest first (GitHub's `role_name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    None,
    Read,
    Triage,
    Write,
    Maintain,
    Admin,
}

impl Permission {
    /// GitHub's `role_name`.
    pub fn role_name(self) -> &'static str {
        match self {
            Permission::None => "none",
            Permission::Read => "read",
            Permission::Triage => "triage",
            Permission::Write => "write",
            Permission::Maintain => "maintain",
            Permission::Admin => "admin",
        }
    }

    /// GitHub's legacy `permission` field, which knows only admin, write, read and none.
    pub fn legacy_name(self) -> &'static str {
        match self {
            Permission::None => "none",
            Permission::Read | Permission::Triage => "read",
            Permission::Write | Permission::Maintain => "write",
            Permission::Admin => "admin",
        }
    }
}

/// Who made a request, as the fake authenticated it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// No `Authorization` header.
    Anonymous,
    /// A user's token (the user's login).
    User(String),
    /// An installation access token of the App (the installation id).
    Installation(u64),
    /// A read-only token (its label): reads what it was given, every write is refused.
    ReadOnly(String),
    /// A valid JWT of the App.
    App,
    /// Credentials the fake refused (why).
    Invalid(String),
}

/// One account (user, organization or bot).
#[derive(Clone, Debug)]
pub struct Account {
    pub login: String,
    pub id: u64,
    /// `User`, `Organization` or `Bot`.
    pub kind: &'static str,
}

#[derive(Clone, Debug)]
pub(crate) enum Token {
    User(String),
    Installation {
        installation_id: u64,
        expires_at: SystemTime,
        /// The repositories this token may use (full names); the installation's when `None`.
        repositories: Option<Vec<String>>,
    },
    ReadOnly {
        label: String,
        /// The private repositories it may read (full names); any when `None`.
        repositories: Option<Vec<String>>,
    },
}

/// A repository of the model.
#[derive(Clone, Debug)]
pub struct Repository {
    pub id: u64,
    pub owner: String,
    pub name: String,
    pub private: bool,
    pub default_branch: String,
    /// The repository this one is a fork of (`owner/name`).
    pub parent: Option<String>,
    pub git_dir: PathBuf,
    pub created_at: SystemTime,
    pub(crate) permissions: HashMap<String, Permission>,
    pub(crate) next_number: u64,
}

impl Repository {
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// `login`'s role here: the owner administers it.
    pub fn permission_of(&self, login: &str) -> Permission {
        if login.eq_ignore_ascii_case(&self.owner) {
            return Permission::Admin;
        }
        self.permissions
            .get(login)
            .copied()
            .unwrap_or(Permission::None)
    }
}

/// A pull request on a base repository.
#[derive(Clone, Debug)]
pub struct PullRequest {
    pub id: u64,
    pub number: u64,
    /// The base repository (`owner/name`).
    pub repo: String,
    pub title: String,
    pub body: String,
    pub author: String,
    /// The repository the head branch is in (the base itself, or a fork of it).
    pub head_repo: String,
    pub head_ref: String,
    pub head_sha: String,
    pub base_ref: String,
    /// The base branch's tip when the pull request was last opened or pushed to.
    pub base_sha: String,
    pub open: bool,
    pub merged: bool,
    pub merge_commit_sha: Option<String>,
    pub merged_by: Option<String>,
    /// What it changes against its base, as of its last open or push.
    pub stats: super::git::PullStats,
    /// The labels on it now, in the order they were added.
    pub labels: Vec<String>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub closed_at: Option<SystemTime>,
}

/// A comment on an issue or pull request.
#[derive(Clone, Debug)]
pub struct Comment {
    pub id: u64,
    pub repo: String,
    pub issue_number: u64,
    pub author: String,
    pub body: String,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

/// A label added to or removed from an issue or pull request (its timeline).
#[derive(Clone, Debug)]
pub struct IssueEvent {
    pub id: u64,
    pub repo: String,
    pub issue_number: u64,
    pub actor: String,
    /// `labeled` or `unlabeled`.
    pub event: &'static str,
    pub label: String,
    pub created_at: SystemTime,
}

/// A pull request review.
#[derive(Clone, Debug)]
pub struct Review {
    pub id: u64,
    pub repo: String,
    pub number: u64,
    pub author: String,
    /// `APPROVED`, `CHANGES_REQUESTED` or `COMMENTED`.
    pub state: String,
    pub body: String,
    pub commit_id: String,
    pub submitted_at: SystemTime,
}

/// A reaction on an issue comment.
#[derive(Clone, Debug)]
pub struct Reaction {
    pub id: u64,
    pub comment_id: u64,
    pub user: String,
    /// `+1`, `-1`, `laugh`, `confused`, `heart`, `hooray`, `rocket` or `eyes`.
    pub content: String,
    pub created_at: SystemTime,
}

/// A comment on a commit.
#[derive(Clone, Debug)]
pub struct CommitComment {
    pub id: u64,
    pub repo: String,
    pub commit_id: String,
    pub author: String,
    pub body: String,
    pub path: Option<String>,
    pub line: Option<u64>,
    pub position: Option<u64>,
    pub created_at: SystemTime,
}

/// A check run's output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckRunOutput {
    pub title: Option<String>,
    pub summary: Option<String>,
    pub text: Option<String>,
}

/// A check run as one create or update left it.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckRunState {
    pub name: String,
    /// `queued`, `in_progress` or `completed` (GitHub's other statuses as sent).
    pub status: String,
    pub conclusion: Option<String>,
    pub details_url: Option<String>,
    pub external_id: Option<String>,
    pub output: CheckRunOutput,
    /// The buttons (`actions`: label, description, identifier), as sent.
    pub actions: Vec<Value>,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
}

/// A check run, with every state it went through (the create first).
#[derive(Clone, Debug)]
pub struct CheckRun {
    pub id: u64,
    pub repo: String,
    pub head_sha: String,
    /// The installation that created it.
    pub installation_id: Option<u64>,
    pub history: Vec<CheckRunState>,
}

impl CheckRun {
    /// The state it is in now.
    pub fn current(&self) -> &CheckRunState {
        self.history.last().expect("a check run has its create")
    }
}

/// An installation of the App on an account.
#[derive(Clone, Debug)]
pub struct Installation {
    pub id: u64,
    pub account: String,
    /// The repositories selected for it (full names).
    pub repositories: Vec<String>,
    pub created_at: SystemTime,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// The path, as in `/repos/o/r/check-runs` (git requests: `/o/r.git/info/refs`).
    pub path: String,
    /// GitHub's path template of the operation, when it is one the fake serves.
    pub template: Option<String>,
    pub query: Vec<(String, String)>,
    pub identity: Identity,
    /// The token it carried (bearer, or the password of HTTP basic auth), if any.
    pub token: Option<String>,
    /// The JSON body, when there was one.
    pub body: Option<Value>,
    pub status: u16,
}

/// The whole model.
pub(crate) struct World {
    next_id: u64,
    pub accounts: BTreeMap<String, Account>,
    pub tokens: HashMap<String, Token>,
    pub repos: BTreeMap<String, Repository>,
    pub pulls: BTreeMap<(String, u64), PullRequest>,
    pub comments: BTreeMap<u64, Comment>,
    pub reviews: BTreeMap<u64, Review>,
    pub issue_events: BTreeMap<u64, IssueEvent>,
    pub reactions: BTreeMap<u64, Reaction>,
    pub commit_comments: BTreeMap<u64, CommitComment>,
    pub check_runs: BTreeMap<u64, CheckRun>,
    pub installations: BTreeMap<u64, Installation>,
    pub requests: Vec<RecordedRequest>,
    pub violations: Vec<String>,
    /// Failures to answer instead of the model: (method, path template, status), first first.
    pub injected_failures: Vec<(String, String, u16)>,
    pub token_lifetime: Duration,
    pub app_id: u64,
    pub app_slug: String,
    pub app_owner: String,
    /// The DER `RSAPublicKey` JWTs of the App are checked with.
    pub app_public_key: Vec<u8>,
}

impl World {
    pub fn new(app_id: u64, app_public_key: Vec<u8>) -> World {
        World {
            next_id: 1_000,
            accounts: BTreeMap::new(),
            tokens: HashMap::new(),
            repos: BTreeMap::new(),
            pulls: BTreeMap::new(),
            comments: BTreeMap::new(),
            reviews: BTreeMap::new(),
            issue_events: BTreeMap::new(),
            reactions: BTreeMap::new(),
            commit_comments: BTreeMap::new(),
            check_runs: BTreeMap::new(),
            installations: BTreeMap::new(),
            requests: Vec::new(),
            violations: Vec::new(),
            injected_failures: Vec::new(),
            token_lifetime: Duration::from_secs(3600),
            app_id,
            app_slug: "testbot-fake".into(),
            app_owner: "testbot-org".into(),
            app_public_key,
        }
    }

    /// A fresh id, unique across everything the fake numbers.
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The account `login`, created (as a user) when new.
    pub fn account(&mut self, login: &str) -> Account {
        if let Some(account) = self.accounts.get(login) {
            return account.clone();
        }
        let id = super::owner_id(login);
        if let Some(other) = self.accounts.values().find(|a| a.id == id) {
            panic!(
                "accounts {login} and {} of the fake would share id {id}: name one differently",
                other.login
            );
        }
        let account = Account {
            login: login.to_string(),
            id,
            kind: if login.ends_with("[bot]") {
                "Bot"
            } else {
                "User"
            },
        };
        self.accounts.insert(login.to_string(), account.clone());
        account
    }

    pub fn repo(&self, full_name: &str) -> Option<&Repository> {
        self.repos.get(&full_name.to_ascii_lowercase())
    }

    pub fn repo_mut(&mut self, full_name: &str) -> Option<&mut Repository> {
        self.repos.get_mut(&full_name.to_ascii_lowercase())
    }

    /// Who `token` is (`Invalid`: not a token of the fake, an expired one, or one of an
    /// installation that is gone).
    pub fn identity_of_token(&self, token: &str) -> Identity {
        match self.tokens.get(token) {
            None => Identity::Invalid("Bad credentials".into()),
            Some(Token::User(login)) => Identity::User(login.clone()),
            Some(Token::ReadOnly { label, .. }) => Identity::ReadOnly(label.clone()),
            Some(Token::Installation {
                installation_id,
                expires_at,
                ..
            }) => {
                if *expires_at <= SystemTime::now()
                    || !self.installations.contains_key(installation_id)
                {
                    Identity::Invalid("Bad credentials".into())
                } else {
                    Identity::Installation(*installation_id)
                }
            }
        }
    }

    /// Whether `identity` (holding `token`) may read `repo`.
    pub fn can_read(&self, identity: &Identity, token: Option<&str>, repo: &Repository) -> bool {
        if matches!(identity, Identity::Invalid(_)) {
            return false;
        }
        if !repo.private {
            return true;
        }
        match identity {
            Identity::User(login) => repo.permission_of(login) >= Permission::Read,
            Identity::Installation(_) | Identity::ReadOnly(_) => self.token_covers(token, repo),
            _ => false,
        }
    }

    /// Whether `identity` may write to `repo` as an App does (check runs, comments as the App).
    pub fn installation_can_write(
        &self,
        identity: &Identity,
        token: Option<&str>,
        repo: &Repository,
    ) -> bool {
        matches!(identity, Identity::Installation(_)) && self.token_covers(token, repo)
    }

    fn token_covers(&self, token: Option<&str>, repo: &Repository) -> bool {
        let full = repo.full_name();
        match token.and_then(|t| self.tokens.get(t)) {
            Some(Token::Installation {
                installation_id,
                repositories,
                ..
            }) => {
                let installed = self
                    .installations
                    .get(installation_id)
                    .is_some_and(|i| i.repositories.iter().any(|r| r.eq_ignore_ascii_case(&full)));
                installed
                    && repositories
                        .as_ref()
                        .is_none_or(|only| only.iter().any(|r| r.eq_ignore_ascii_case(&full)))
            }
            Some(Token::ReadOnly { repositories, .. }) => repositories
                .as_ref()
                .is_none_or(|only| only.iter().any(|r| r.eq_ignore_ascii_case(&full))),
            _ => false,
        }
    }

    /// The installation that covers `repo`, if the App is installed on it.
    pub fn installation_of(&self, repo: &str) -> Option<&Installation> {
        self.installations
            .values()
            .find(|i| i.repositories.iter().any(|r| r.eq_ignore_ascii_case(repo)))
    }

    /// The login the App acts as on GitHub.
    pub fn bot_login(&self) -> String {
        format!("{}[bot]", self.app_slug)
    }
}
