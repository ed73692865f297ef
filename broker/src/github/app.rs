//! The GitHub App's identity: its JWT (RS256, signed with `ring`) and installation access
//! tokens, cached and refreshed before they expire, each wrapped in an `octocrab` client.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use secrecy::{ExposeSecret as _, SecretString};

use super::GitHubError;

/// How long before an installation token's expiry it is replaced (GitHub's last an hour).
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// How far back the JWT's `iat` is set, for clocks a little ahead of GitHub's (GitHub's advice).
const JWT_BACKDATE_SECS: u64 = 60;

/// How long a JWT is valid (GitHub allows at most 10 minutes).
const JWT_LIFETIME_SECS: u64 = 9 * 60;

/// How long one call to GitHub may take.
const GITHUB_TIMEOUT: Duration = Duration::from_secs(15);

/// Everything the App needs from its operator.
#[derive(Clone)]
pub struct AppCredentials {
    /// The App's id (its settings page shows it).
    pub app_id: u64,
    key: Arc<RsaKeyPair>,
    /// The webhook secret set in the App's settings.
    pub webhook_secret: SecretString,
}

impl std::fmt::Debug for AppCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppCredentials")
            .field("app_id", &self.app_id)
            .finish_non_exhaustive()
    }
}

impl AppCredentials {
    /// Reads the App's private key (the `.pem` GitHub lets you download: PKCS#1, or PKCS#8)
    /// and its webhook secret from files.
    pub fn load(app_id: u64, key_file: &Path, secret_file: &Path) -> anyhow::Result<Self> {
        let pem = std::fs::read_to_string(key_file)
            .with_context(|| format!("Cannot read the App's private key {}", key_file.display()))?;
        let key =
            parse_private_key(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", key_file.display()))?;
        let secret = std::fs::read_to_string(secret_file)
            .with_context(|| format!("Cannot read the webhook secret {}", secret_file.display()))?;
        let secret = secret.trim_end_matches(['\r', '\n']).to_string();
        anyhow::ensure!(
            !secret.is_empty(),
            "{}: the webhook secret is empty",
            secret_file.display()
        );
        Ok(AppCredentials {
            app_id,
            key: Arc::new(key),
            webhook_secret: SecretString::from(secret),
        })
    }

    /// A JWT that authenticates as the App itself, valid for about nine minutes.
    pub fn jwt(&self, now_secs: u64) -> Result<String, GitHubError> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iat": now_secs.saturating_sub(JWT_BACKDATE_SECS),
            "exp": now_secs + JWT_LIFETIME_SECS,
            "iss": self.app_id.to_string(),
        });
        let claims = b64.encode(claims.to_string());
        let message = format!("{header}.{claims}");
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                message.as_bytes(),
                &mut signature,
            )
            .map_err(|_| GitHubError::Unavailable("cannot sign the App's JWT".into()))?;
        Ok(format!("{message}.{}", b64.encode(signature)))
    }
}

/// A PEM RSA private key, PKCS#1 (`RSA PRIVATE KEY`, as GitHub issues them) or PKCS#8.
fn parse_private_key(pem: &str) -> Result<RsaKeyPair, String> {
    let der = |label: &str| -> Option<Vec<u8>> {
        let begin = format!("-----BEGIN {label}-----");
        let end = format!("-----END {label}-----");
        let start = pem.find(&begin)? + begin.len();
        let stop = start + pem[start..].find(&end)?;
        let body: String = pem[start..stop].split_whitespace().collect();
        base64::engine::general_purpose::STANDARD.decode(body).ok()
    };
    if let Some(der) = der("RSA PRIVATE KEY") {
        return RsaKeyPair::from_der(&der).map_err(|e| format!("not a usable RSA key: {e}"));
    }
    if let Some(der) = der("PRIVATE KEY") {
        return RsaKeyPair::from_pkcs8(&der).map_err(|e| format!("not a usable RSA key: {e}"));
    }
    Err(
        "expected a PEM RSA private key (-----BEGIN RSA PRIVATE KEY-----), as GitHub issues \
         for an App"
            .into(),
    )
}

/// An installation token and when to replace it.
#[derive(Clone)]
struct CachedToken {
    client: octocrab::Octocrab,
    refresh_at: std::time::Instant,
}

/// The App's clients: one for the App itself, and one per installation, refreshed before its
/// token expires.
pub struct AppClient {
    credentials: AppCredentials,
    base_url: String,
    installations: tokio::sync::Mutex<HashMap<i64, CachedToken>>,
}

impl AppClient {
    pub fn new(credentials: AppCredentials, base_url: &str) -> AppClient {
        testbot_proto::client::install_crypto_provider();
        AppClient {
            credentials,
            base_url: base_url.trim_end_matches('/').to_string(),
            installations: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn credentials(&self) -> &AppCredentials {
        &self.credentials
    }

    fn client_with(&self, token: &str) -> Result<octocrab::Octocrab, GitHubError> {
        octocrab::Octocrab::builder()
            .base_uri(self.base_url.as_str())
            .map_err(|e| GitHubError::Unavailable(format!("bad GitHub API URL: {e}")))?
            .personal_token(token.to_string())
            .set_connect_timeout(Some(GITHUB_TIMEOUT))
            .set_read_timeout(Some(GITHUB_TIMEOUT))
            .add_header(
                axum::http::header::USER_AGENT,
                concat!("community-testbot/", env!("CARGO_PKG_VERSION")).to_string(),
            )
            .build()
            .map_err(|e| GitHubError::Unavailable(format!("cannot build a GitHub client: {e}")))
    }

    /// A client acting as the App itself (its JWT), for the few calls made as the App.
    pub fn app(&self) -> Result<octocrab::Octocrab, GitHubError> {
        let now_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.client_with(&self.credentials.jwt(now_secs)?)
    }

    /// A client acting as the installation `installation_id`, with a fresh enough token.
    pub async fn installation(
        &self,
        installation_id: i64,
    ) -> Result<octocrab::Octocrab, GitHubError> {
        let mut cache = self.installations.lock().await;
        if let Some(cached) = cache.get(&installation_id)
            && cached.refresh_at > std::time::Instant::now()
        {
            return Ok(cached.client.clone());
        }
        let (token, lifetime) = self.installation_token(installation_id).await?;
        let client = self.client_with(token.expose_secret())?;
        cache.insert(
            installation_id,
            CachedToken {
                client: client.clone(),
                refresh_at: std::time::Instant::now()
                    + lifetime.saturating_sub(TOKEN_REFRESH_MARGIN),
            },
        );
        Ok(client)
    }

    /// Forgets a cached token (GitHub refused it: revoked, or the App was reinstalled).
    pub async fn forget(&self, installation_id: i64) {
        self.installations.lock().await.remove(&installation_id);
    }

    /// `POST /app/installations/{id}/access_tokens` with the App's JWT: the token and how long
    /// it lives.
    async fn installation_token(
        &self,
        installation_id: i64,
    ) -> Result<(SecretString, Duration), GitHubError> {
        #[derive(serde::Deserialize)]
        struct AccessToken {
            token: String,
            expires_at: String,
        }
        let now = std::time::SystemTime::now();
        let now_secs = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let app = self.client_with(&self.credentials.jwt(now_secs)?)?;
        let route = format!("/app/installations/{installation_id}/access_tokens");
        let token: AccessToken = app.post(route, None::<&()>).await.map_err(|e| {
            GitHubError::from_octocrab(
                &format!("an installation token for installation {installation_id}"),
                e,
            )
        })?;
        let lifetime = humantime::parse_rfc3339_weak(&token.expires_at)
            .ok()
            .and_then(|at| at.duration_since(now).ok())
            .unwrap_or(Duration::from_secs(10 * 60));
        Ok((SecretString::from(token.token), lifetime))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_are_not_rsa_pem_are_refused_with_the_fix() {
        let err = parse_private_key("not a key").err().unwrap();
        assert!(err.contains("BEGIN RSA PRIVATE KEY"), "{err}");
        let err = parse_private_key(
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----",
        )
        .err()
        .unwrap();
        assert!(err.contains("not a usable RSA key"), "{err}");
    }
}
