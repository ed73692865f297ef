//! The GitHub App: webhooks in, jobs and check runs out.
//!
//! A delivery is verified ([`webhook`]: size limit, then the HMAC, then the event's name),
//! stored in the delivery queue and answered at once; a consumer loop ([`process`]) claims each
//! queued delivery and acts on it: installations are recorded, a push reads
//! `.github/testbot.toml` at the pushed commit ([`config`]) and submits the jobs it asks for
//! ([`jobs`]), each with the provenance the site's agent verifies. Every App job has a check run
//! on its commit, kept in step with the job by [`checks`], which the job-event bus wakes.
//!
//! Layout:
//! - [`app`]: the App's JWT and installation tokens (cached, refreshed), as `octocrab` clients.
//! - [`webhook`]: `POST /api/v1/github/webhook`, the verifying extractor and the queue.
//! - [`process`]: the consumer loop and what each event does.
//! - [`pulls`]: pull requests opened or pushed to.
//! - [`schedule`]: `on.schedule`, the scheduler.
//! - [`config`]: reading `.github/testbot.toml` at a commit.
//! - [`jobs`]: submitting App jobs; the provenance handed to agents.
//! - [`checks`]: check runs.
//! - [`bisect`]: statistical bisection, the bisector loop.
//! - [`history`]: filling a branch's history in idle capacity.
//! - [`commands`]: `/testbot` commands in pull request comments.
//! - [`user`]: user-token checks for repository registration (no App needed).

pub mod app;
pub mod bisect;
pub mod checks;
pub mod commands;
pub mod config;
pub mod history;
pub mod jobs;
pub mod process;
pub mod pulls;
pub mod schedule;
pub mod user;
pub mod webhook;

use std::sync::Arc;

pub use user::{GitHubApi, RepoPermission};

/// GitHub.com's REST API.
pub const GITHUB_API_URL: &str = "https://api.github.com";

#[derive(Debug, thiserror::Error)]
pub enum GitHubError {
    /// GitHub answered, and the answer is no: a token not valid (401), something it does not
    /// show (403, 404), a request it refuses (422).
    #[error("{0}")]
    Refused(String),
    /// GitHub could not be asked, or failed (5xx, rate limits): worth trying again.
    #[error("cannot reach the GitHub API: {0}")]
    Unavailable(String),
}

impl GitHubError {
    /// Classifies an octocrab error; `what` names what was asked for.
    pub fn from_octocrab(what: &str, err: octocrab::Error) -> GitHubError {
        match &err {
            octocrab::Error::GitHub { source, .. } => {
                let status = source.status_code.as_u16();
                let message = format!("GitHub refused {what} ({status}: {})", source.message);
                match status {
                    429 | 500..=599 => GitHubError::Unavailable(message),
                    // A rate limit comes as 403 with a message that says so.
                    403 if source.message.to_ascii_lowercase().contains("rate limit") => {
                        GitHubError::Unavailable(message)
                    }
                    _ => GitHubError::Refused(message),
                }
            }
            _ => GitHubError::Unavailable(format!("{what}: {err}")),
        }
    }

    /// Whether GitHub said the thing asked for does not exist (404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, GitHubError::Refused(m) if m.contains("(404:"))
    }
}

/// The App as the broker runs it.
pub struct GitHubApp {
    pub client: app::AppClient,
    /// Wakes the delivery consumer when a delivery is queued.
    pub deliveries: tokio::sync::Notify,
    /// Wakes the check-run syncer when an App job changes.
    pub checks: Arc<tokio::sync::Notify>,
    /// Wakes the bisector when a bisection is started.
    pub bisections: tokio::sync::Notify,
    /// The broker's URL as users reach it, for links in check runs.
    pub public_url: String,
}

impl GitHubApp {
    pub fn new(
        credentials: app::AppCredentials,
        api_url: &str,
        public_url: &str,
    ) -> Arc<GitHubApp> {
        Arc::new(GitHubApp {
            client: app::AppClient::new(credentials, api_url),
            deliveries: tokio::sync::Notify::new(),
            checks: Arc::new(tokio::sync::Notify::new()),
            bisections: tokio::sync::Notify::new(),
            public_url: public_url.trim_end_matches('/').to_string(),
        })
    }
}
