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

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{AgentModel, Store};

/// What a bearer token issued by the broker is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Operators: the job, repository, site and agent APIs.
    Operator,
    /// Site enrollment: exchanged once per agent for an agent identity.
    Enrollment,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Enrollment => "enrollment",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Role::Operator => "tbo_",
            Role::Enrollment => "tbe_",
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub enum Principal {
    /// A fleet operator (admin token).
    Operator { name: String },
    /// An enrolled agent, proven by the signature on this very request.
    Agent(Box<AgentModel>),
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
            Principal::Agent(_) => "an agent's signature",
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
            Principal::Agent(_) => Ok(()),
            other => Err(ApiError::Forbidden(format!(
                "this endpoint is for agents; {} was given",
                other.kind()
            ))),
        }
    }

    /// The enrolled agent making the request.
    pub fn agent(&self) -> Result<&AgentModel, ApiError> {
        match self {
            Principal::Agent(agent) => Ok(agent),
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
            Principal::Agent(agent) => format!("agent:{}/{}", agent.site, agent.name),
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
    pub async fn load(db: &dyn Store, oidc: Option<OidcVerifier>) -> anyhow::Result<Self> {
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
        if role != Role::Operator.as_str() {
            return; // Agent tokens of earlier versions are no longer accepted.
        }
        let principal = Principal::Operator { name };
        self.tokens
            .write()
            .expect("token cache poisoned")
            .insert(hash.to_string(), principal);
    }

    /// Forgets every cached operator token named `name` except the one with hash `keep`.
    fn forget_all_but(&self, name: &str, keep: &str) {
        self.tokens
            .write()
            .expect("token cache poisoned")
            .retain(|hash, principal| {
                hash == keep || !matches!(principal, Principal::Operator { name: n } if n == name)
            });
    }

    /// Makes sure a token of `role` exists whose secret is in `file`: reuses the file's token
    /// (registering its hash if the database lost it), or creates a new token and writes it to
    /// `file` with mode 0600.
    pub async fn ensure_token_file(
        &self,
        db: &dyn Store,
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
            // Brokers sharing a database share its tokens: a new one here would retire the
            // token the others hold.
            None if db.shared()
                && db
                    .api_tokens()
                    .await?
                    .iter()
                    .any(|t| t.role == role.as_str() && t.name == name) =>
            {
                anyhow::bail!(
                    "{} is missing, but the database, which other brokers share, already has the {} \
                     token {name}: copy {} from another broker's data directory here (every \
                     broker of one database uses the same token)",
                    file.display(),
                    role.as_str(),
                    file.file_name().unwrap_or_default().to_string_lossy()
                );
            }
            None => {
                let token = generate_token(role)?;
                write_secret_file(file, token.expose_secret())?;
                token
            }
        };
        let hash = token_hash(token.expose_secret());
        db.upsert_api_token(&hash, role.as_str(), name).await?;
        // The file is the one record of this token: replacing or deleting it rotates the
        // token, so every earlier token of the same name is retired.
        let retired = db.retire_api_tokens(role.as_str(), name, &hash).await?;
        if retired > 0 {
            tracing::warn!(
                file = %file.display(),
                retired,
                "Retired the earlier {} token(s) named {name}: {} holds a new one.",
                role.as_str(),
                file.display()
            );
        }
        self.forget_all_but(name, &hash);
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
        if bearer.starts_with(Role::Enrollment.prefix()) {
            return Err(ApiError::Unauthorized(
                "an enrollment token is not a bearer token: give it to an agent (enrollment_token_file), which exchanges it for its own identity".into(),
            ));
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
        // Agent routes are authenticated by `verify_agent_signature`, which needs the body.
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(principal.clone());
        }
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

/// Middleware for `/agent/*`: checks the request's Ed25519 signature (see
/// [`testbot_proto::signing`]), the agent's and its site's standing, the clock window and the
/// nonce, then hands the handler a [`Principal::Agent`].
pub async fn verify_agent_signature(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    let limit = state.settings.max_body_bytes;
    verify_signed(state, request, next, limit).await
}

/// [`verify_agent_signature`] for result-file uploads, whose bodies may be as large as
/// [`testbot_proto::test_results::MAX_RESULT_FILE_BYTES`].
pub async fn verify_agent_upload_signature(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    let limit = testbot_proto::test_results::MAX_RESULT_FILE_BYTES as usize;
    verify_signed(state, request, next, limit).await
}

async fn verify_signed(
    state: AppState,
    request: axum::extract::Request,
    next: axum::middleware::Next,
    limit: usize,
) -> Result<axum::response::Response, ApiError> {
    use testbot_proto::signing::{
        AGENT_HEADER, MAX_CLOCK_SKEW_MS, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
        signing_string, verify_signature,
    };
    let (mut parts, body) = request.into_parts();
    let header = |name: &str| -> Result<String, ApiError> {
        let value = parts.headers.get(name).ok_or_else(|| {
            ApiError::Unauthorized(format!(
                "agent requests must be signed: the {name} header is missing (enroll the agent first)"
            ))
        })?;
        value
            .to_str()
            .map(str::to_string)
            .map_err(|_| ApiError::Unauthorized(format!("the {name} header is not text")))
    };
    let agent_id = header(AGENT_HEADER)?;
    let timestamp = header(TIMESTAMP_HEADER)?;
    let nonce = header(NONCE_HEADER)?;
    let signature = header(SIGNATURE_HEADER)?;
    let timestamp_ms: i64 = timestamp.parse().map_err(|_| {
        ApiError::Unauthorized(format!(
            "the {TIMESTAMP_HEADER} header is not Unix milliseconds"
        ))
    })?;
    if nonce.len() < 16 || nonce.len() > 128 {
        return Err(ApiError::Unauthorized(format!(
            "the {NONCE_HEADER} header must be 16-128 characters"
        )));
    }
    // The timestamp is any i64 the caller chose: no arithmetic on it may overflow.
    let skew = testbot_proto::now_ms().saturating_sub(timestamp_ms);
    if skew.unsigned_abs() > MAX_CLOCK_SKEW_MS.unsigned_abs() {
        return Err(ApiError::Unauthorized(format!(
            "the request was signed {} s {} the broker's clock (at most {} s allowed): a replayed request, or the agent's clock is wrong",
            skew.unsigned_abs() / 1000,
            if skew > 0 { "behind" } else { "ahead of" },
            MAX_CLOCK_SKEW_MS / 1000
        )));
    }
    let agent = state
        .store
        .agent(&agent_id)
        .await?
        .ok_or_else(|| ApiError::AgentRevoked(format!("agent {agent_id} is not enrolled")))?;
    if agent.site_revoked_at_ms.is_some() {
        return Err(ApiError::AgentRevoked(format!(
            "site {} was revoked; its agents are refused",
            agent.site
        )));
    }
    if agent.revoked_at_ms.is_some() {
        return Err(ApiError::AgentRevoked(format!(
            "agent {}/{} ({agent_id}) was revoked",
            agent.site, agent.name
        )));
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::PayloadTooLarge(format!("request body is larger than {limit} bytes"))
    })?;
    // Inside the nested `/api/v1` router the URI lacks the prefix; the agent signed the full one.
    let uri = parts
        .extensions
        .get::<axum::extract::OriginalUri>()
        .map_or(&parts.uri, |original| &original.0);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let message = signing_string(
        &agent_id,
        parts.method.as_str(),
        path,
        timestamp_ms,
        &nonce,
        &bytes,
    );
    if !verify_signature(&agent.public_key, &message, &signature) {
        return Err(ApiError::Unauthorized(
            "the request signature does not verify".into(),
        ));
    }
    // Checked after the signature, so an attacker cannot burn an agent's nonces.
    if !state
        .nonces
        .record(
            &*state.store,
            &agent_id,
            &nonce,
            timestamp_ms + MAX_CLOCK_SKEW_MS,
        )
        .await?
    {
        return Err(ApiError::Unauthorized(
            "the request nonce was used before: a replayed request".into(),
        ));
    }
    parts.extensions.insert(Principal::Agent(Box::new(agent)));
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    Ok(next.run(request).await)
}
