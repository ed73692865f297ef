//! Reading a repository's `.github/testbot.toml` at a commit, through the contents API.

use base64::Engine as _;
use testbot_proto::repo_config::{CONFIG_PATH, MAX_CONFIG_BYTES, RepoConfig};

use super::GitHubError;

/// What a repository's config says at a commit.
#[derive(Debug)]
pub enum ConfigAt {
    /// The repository has no config at that commit: the App does nothing there.
    Missing,
    /// The file does not parse; the message reads `.github/testbot.toml:LINE:COL: ...`.
    Invalid(String),
    Valid(RepoConfig),
}

/// `GET /repos/{repository}/contents/.github/testbot.toml?ref={sha}`.
pub async fn read(
    client: &octocrab::Octocrab,
    repository: &str,
    sha: &str,
) -> Result<ConfigAt, GitHubError> {
    #[derive(serde::Deserialize)]
    struct Content {
        #[serde(default)]
        content: Option<String>,
        #[serde(default)]
        encoding: Option<String>,
        #[serde(default)]
        size: Option<u64>,
    }
    let route = format!("/repos/{repository}/contents/{CONFIG_PATH}");
    let what = format!("{CONFIG_PATH} of {repository} at {sha}");
    let content: Content = match client.get(route, Some(&[("ref", sha)])).await {
        Ok(content) => content,
        Err(err) => {
            let err = GitHubError::from_octocrab(&what, err);
            return if err.is_not_found() {
                Ok(ConfigAt::Missing)
            } else {
                Err(err)
            };
        }
    };
    if content.size.unwrap_or(0) > MAX_CONFIG_BYTES as u64 {
        return Ok(ConfigAt::Invalid(format!(
            "{CONFIG_PATH}: the file is {} bytes; the limit is {MAX_CONFIG_BYTES} bytes",
            content.size.unwrap_or(0)
        )));
    }
    let (Some(encoded), Some("base64")) = (content.content, content.encoding.as_deref()) else {
        return Ok(ConfigAt::Invalid(format!(
            "{CONFIG_PATH}: GitHub did not return the file's content (is it a file?)"
        )));
    };
    let compact: String = encoded.split_whitespace().collect();
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(compact) else {
        return Err(GitHubError::Unavailable(format!(
            "{what}: the content is not valid base64"
        )));
    };
    let Ok(text) = String::from_utf8(bytes) else {
        return Ok(ConfigAt::Invalid(format!(
            "{CONFIG_PATH}: the file is not UTF-8 text"
        )));
    };
    Ok(match RepoConfig::parse(&text) {
        Ok(config) => ConfigAt::Valid(config),
        Err(err) => ConfigAt::Invalid(format!("{CONFIG_PATH}:{err}")),
    })
}
