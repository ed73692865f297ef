//! The little of GitHub's REST API the broker needs without the App: whether the holder of a
//! user token administers a repository.

use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;

/// How long one call to GitHub may take.
const GITHUB_TIMEOUT: Duration = Duration::from_secs(15);

use super::GitHubError;

/// A user's standing on one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoPermission {
    pub login: String,
    pub admin: bool,
    /// GitHub's ids of the repository and its owner, when GitHub sent them.
    pub ids: Option<crate::store::RepositoryIds>,
}

#[derive(Clone, Debug)]
pub struct GitHubApi {
    base_url: String,
    http: reqwest::Client,
}

impl GitHubApi {
    pub fn new(base_url: impl Into<String>) -> GitHubApi {
        testbot_proto::client::install_crypto_provider();
        GitHubApi {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(GITHUB_TIMEOUT)
                .user_agent(concat!("community-testbot/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("an HTTP client with default settings builds"),
        }
    }

    /// Where people see GitHub in a browser: `https://github.com` for the public API,
    /// `https://HOST` for GitHub Enterprise Server's `https://HOST/api/v3`.
    pub fn web_url(&self) -> String {
        if self.base_url == super::GITHUB_API_URL.trim_end_matches('/') {
            "https://github.com".to_string()
        } else {
            self.base_url
                .strip_suffix("/api/v3")
                .unwrap_or(&self.base_url)
                .to_string()
        }
    }

    /// Who holds `token`, and whether they have admin permission on `repo` (`owner/name`).
    pub async fn repo_permission(
        &self,
        token: &SecretString,
        repo: &str,
    ) -> Result<RepoPermission, GitHubError> {
        #[derive(Deserialize)]
        struct User {
            login: String,
        }
        #[derive(Deserialize)]
        struct Repository {
            #[serde(default)]
            permissions: Option<Permissions>,
            #[serde(default)]
            id: Option<u64>,
            #[serde(default)]
            owner: Option<Owner>,
        }
        #[derive(Deserialize)]
        struct Owner {
            #[serde(default)]
            id: Option<u64>,
        }
        #[derive(Deserialize)]
        struct Permissions {
            #[serde(default)]
            admin: bool,
        }
        let user: User = self.get(token, "/user").await?;
        let repository: Repository = self.get(token, &format!("/repos/{repo}")).await?;
        Ok(RepoPermission {
            login: user.login,
            admin: repository.permissions.is_some_and(|p| p.admin),
            ids: repository.id.map(|id| crate::store::RepositoryIds {
                repository_id: id.to_string(),
                repository_owner_id: repository.owner.and_then(|o| o.id).map(|id| id.to_string()),
            }),
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        token: &SecretString,
        path: &str,
    ) -> Result<T, GitHubError> {
        let url = format!("{}{path}", self.base_url);
        let response = self
            .http
            .get(&url)
            .bearer_auth(token.expose_secret())
            .header("Accept", "application/vnd.github+json")
            .header("X-GitHub-Api-Version", "2022-11-28")
            .send()
            .await
            .map_err(|e| GitHubError::Unavailable(e.to_string()))?;
        let status = response.status();
        match status.as_u16() {
            200..=299 => response
                .json()
                .await
                .map_err(|e| GitHubError::Unavailable(format!("GET {path}: {e}"))),
            401 => Err(GitHubError::Refused(
                "GitHub says the user token is not valid (401)".into(),
            )),
            403 | 404 => Err(GitHubError::Refused(format!(
                "GitHub does not show {path} to this token ({status}): the repository does not exist or the token cannot see it"
            ))),
            _ => Err(GitHubError::Unavailable(format!(
                "GET {path}: HTTP {status}"
            ))),
        }
    }
}
