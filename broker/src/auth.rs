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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A fleet operator (admin token).
    Operator { name: String },
    /// An agent holding the fleet's agent token.
    Agent { name: String },
}

impl Principal {
    pub fn require_operator(&self) -> Result<(), ApiError> {
        match self {
            Principal::Operator { .. } => Ok(()),
            _ => Err(ApiError::Forbidden(
                "this endpoint needs an operator token; an agent token was given".into(),
            )),
        }
    }

    pub fn require_agent(&self) -> Result<(), ApiError> {
        match self {
            Principal::Agent { .. } => Ok(()),
            _ => Err(ApiError::Forbidden(
                "this endpoint is for agents; an operator token was given".into(),
            )),
        }
    }
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
}

impl Authenticator {
    pub async fn load(db: &Db) -> anyhow::Result<Self> {
        let auth = Authenticator::default();
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

    pub fn authenticate(&self, bearer: &str) -> Result<Principal, ApiError> {
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
        state.auth.authenticate(token)
    }
}
