//! Who is calling: bearer tokens resolved to a [`Principal`].
//!
//! Tokens are random 256-bit secrets; the broker stores only their SHA-256. An operator token
//! may do everything on the job API; an agent token may only use `/agent/*`. Later kinds of
//! credential (workflow OIDC tokens, per-agent signing keys) resolve to further principals in
//! [`Authenticator::authenticate`], so handlers keep asking the same questions.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretString};

use testbot_proto::oidc::{OidcError, OidcVerifier, WorkflowClaims};

use crate::db::Db;
use crate::error::ApiError;
use crate::state::AppState;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Operator,
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Agent => "agent",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Role::Operator => "tbo_",
            Role::Agent => "tba_",
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub enum Principal {
    /// A fleet operator (admin token).
    Operator { name: String },
    /// An agent holding the fleet's agent token.
    Agent { name: String },
    /// A GitHub Actions workflow run, proven by its verified OIDC token. The token travels with
    /// the jobs it submits so that agents can verify it themselves.
    Workflow {
        claims: Box<WorkflowClaims>,
        token: SecretString,
    },
    /// Someone holding a GitHub user token. It proves nothing by itself: it is checked against
    /// the GitHub API for the one repository a request is about.
    GitHubUser { token: SecretString },
}

impl Principal {
    fn kind(&self) -> &'static str {
        match self {
            Principal::Operator { .. } => "an operator token",
            Principal::Agent { .. } => "an agent token",
            Principal::Workflow { .. } => "a workflow OIDC token",
            Principal::GitHubUser { .. } => "a GitHub user token",
        }
    }

    pub fn require_operator(&self) -> Result<(), ApiError> {
        match self {
            Principal::Operator { .. } => Ok(()),
            other => Err(ApiError::Forbidden(format!(
                "this endpoint needs an operator token; {} was given",
                other.kind()
            ))),
        }
    }

    pub fn require_agent(&self) -> Result<(), ApiError> {
        match self {
            Principal::Agent { .. } => Ok(()),
            other => Err(ApiError::Forbidden(format!(
                "this endpoint is for agents; {} was given",
                other.kind()
            ))),
        }
    }

    /// How the caller is recorded on what it creates.
    pub fn describe(&self) -> String {
        match self {
            Principal::Operator { name } => format!("operator:{name}"),
            Principal::Agent { name } => format!("agent:{name}"),
            Principal::Workflow { claims, .. } => {
                format!("workflow:{}@{}", claims.repository, claims.run_id)
            }
            Principal::GitHubUser { .. } => "github:(unverified)".into(),
        }
    }
}

/// Whether a bearer token is shaped like a JWT (`header.payload.signature`, header `{"...`).
fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.bytes().filter(|&b| b == b'.').count() == 2
}

/// Whether a bearer token is a GitHub user or app token (`ghp_`, `gho_`, `ghu_`, `github_pat_`).
fn looks_like_github_token(token: &str) -> bool {
    ["ghp_", "gho_", "ghu_", "ghs_", "github_pat_"]
        .iter()
        .any(|prefix| token.starts_with(prefix))
}

/// SHA-256 of a token, hex encoded: the only form in which the broker keeps tokens.
pub fn token_hash(token: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))
}

/// A fresh random token for `role`.
pub fn generate_token(role: Role) -> anyhow::Result<SecretString> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("Cannot read random bytes from the system"))?;
    Ok(SecretString::from(format!(
        "{}{}",
        role.prefix(),
        hex::encode(bytes)
    )))
}

/// Resolves bearer tokens to principals. Token hashes are cached in memory; the database is the
/// record.
#[derive(Clone, Default)]
pub struct Authenticator {
    tokens: Arc<RwLock<HashMap<String, Principal>>>,
    /// Verifies workflow OIDC tokens; `None` when the broker accepts none.
    oidc: Option<OidcVerifier>,
}

impl Authenticator {
    pub async fn load(db: &Db, oidc: Option<OidcVerifier>) -> anyhow::Result<Self> {
        let auth = Authenticator {
            tokens: Arc::default(),
            oidc,
        };
        for token in db.api_tokens().await? {
            auth.remember(&token.token_hash, &token.role, token.name);
        }
        Ok(auth)
    }

    fn remember(&self, hash: &str, role: &str, name: String) {
        let principal = match role {
            "operator" => Principal::Operator { name },
            _ => Principal::Agent { name },
        };
        self.tokens
            .write()
            .expect("token cache poisoned")
            .insert(hash.to_string(), principal);
    }

    /// Makes sure a token of `role` exists whose secret is in `file`: reuses the file's token
    /// (registering its hash if the database lost it), or creates a new token and writes it to
    /// `file` with mode 0600.
    pub async fn ensure_token_file(
        &self,
        db: &Db,
        role: Role,
        name: &str,
        file: &Path,
    ) -> anyhow::Result<SecretString> {
        let existing = match std::fs::read_to_string(file) {
            Ok(text) => Some(text.trim().to_string()).filter(|t| !t.is_empty()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(err) => {
                return Err(err).with_context(|| format!("Cannot read {}", file.display()));
            }
        };
        let token = match existing {
            Some(token) => SecretString::from(token),
            None => {
                let token = generate_token(role)?;
                write_secret_file(file, token.expose_secret())?;
                token
            }
        };
        let hash = token_hash(token.expose_secret());
        db.upsert_api_token(&hash, role.as_str(), name).await?;
        self.remember(&hash, role.as_str(), name.to_string());
        Ok(token)
    }

    pub async fn authenticate(&self, bearer: &str) -> Result<Principal, ApiError> {
        if looks_like_jwt(bearer) {
            let Some(oidc) = &self.oidc else {
                return Err(ApiError::Unauthorized(
                    "this broker does not accept GitHub OIDC tokens (it has no --oidc-audience)"
                        .into(),
                ));
            };
            let claims = oidc.verify(bearer).await.map_err(|err| match err {
                OidcError::KeysUnavailable(ref why) => {
                    tracing::warn!(%why, "Cannot fetch the OIDC issuer's keys.");
                    ApiError::Unavailable(format!("{err}; try again shortly"))
                }
                err => ApiError::Unauthorized(format!("OIDC token refused: {err}")),
            })?;
            return Ok(Principal::Workflow {
                claims: Box::new(claims),
                token: SecretString::from(bearer.to_string()),
            });
        }
        if looks_like_github_token(bearer) {
            return Ok(Principal::GitHubUser {
                token: SecretString::from(bearer.to_string()),
            });
        }
        let hash = token_hash(bearer);
        self.tokens
            .read()
            .expect("token cache poisoned")
            .get(&hash)
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("the bearer token is not valid".into()))
    }
}

/// Writes a secret to `path`, readable by its owner only.
pub fn write_secret_file(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("Cannot create {}", path.display()))?;
    writeln!(file, "{secret}").with_context(|| format!("Cannot write {}", path.display()))?;
    Ok(())
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::Unauthorized("missing Authorization: Bearer <token> header".into())
        })?;
        let value = header
            .to_str()
            .map_err(|_| ApiError::Unauthorized("the Authorization header is not text".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header must be \"Bearer <token>\"".into())
            })?;
        state.auth.authenticate(token).await
    }
}
