//! GitHub Actions OIDC tokens: the claims a workflow's identity is made of, and their verification.
//!
//! Both the broker (when a workflow submits a job) and the agent (before it runs one) verify the
//! token: the agent does not take the broker's word for who asked. Verification is RS256 only,
//! with `ring`, against the issuer's key set (JWKS):
//!
//! 1. the header's `alg` must be `RS256` (`none`, `HS256` and everything else are refused before
//!    any key is looked at), and its `kid` must name a key of the issuer;
//! 2. the signature must verify with that RSA key;
//! 3. `iss` must equal the configured issuer exactly, `aud` must contain the configured audience;
//! 4. `exp`, `nbf` and `iat` are checked against the clock with a small leeway;
//! 5. the identity claims this project relies on must be present and well formed.
//!
//! GitHub sends ids and counters as JSON strings (`"run_id": "14144996512"`); only `exp`, `iat`
//! and `nbf` are numbers. [`WorkflowClaims`] keeps them as strings.
//!
//! [`verify_token`] is the pure check against a key set and a clock. [`OidcVerifier`] (feature
//! `client`) adds the issuer's discovery document, a cached JWKS, and a rate-limited refresh when
//! a token names a key the cache does not have (GitHub rotates its keys).

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// GitHub.com's Actions token issuer.
pub const GITHUB_ISSUER: &str = "https://token.actions.githubusercontent.com";

/// Clock leeway for `exp`, `nbf` and `iat`, in seconds.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);

/// The largest token accepted, in bytes (GitHub's are about 1.5 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What a verified token says about the workflow run that holds it.
///
/// Field names are GitHub's claim names. Required claims are plain fields; claims GitHub sends
/// only for some events (`environment`) or that other issuers may omit are `Option`s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowClaims {
    pub iss: String,
    /// The audience the token was minted for (the one that matched the verifier's).
    pub aud: String,
    pub sub: String,
    /// Unique per token: the broker refuses a token it has seen before.
    pub jti: String,
    pub exp: i64,
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// `owner/name`.
    pub repository: String,
    pub repository_id: String,
    pub repository_owner: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_owner_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_visibility: Option<String>,
    /// The git ref the workflow runs for, e.g. `refs/heads/main`, `refs/pull/7/merge`.
    #[serde(rename = "ref")]
    pub git_ref: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_protected: Option<String>,
    pub sha: String,
    /// `push`, `pull_request`, `workflow_dispatch`, `schedule`, ...
    pub event_name: String,
    /// The GitHub login that triggered the run.
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_ref: Option<String>,
    /// `owner/repo/.github/workflows/file.yml@ref` of the job's workflow (for reusable
    /// workflows, the called one).
    pub job_workflow_ref: String,
    /// The GitHub environment of the job, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    pub run_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_attempt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_environment: Option<String>,
}

/// Claims every accepted token must carry.
const REQUIRED_CLAIMS: &[&str] = &[
    "iss",
    "aud",
    "sub",
    "jti",
    "exp",
    "iat",
    "repository",
    "repository_id",
    "repository_owner",
    "ref",
    "sha",
    "event_name",
    "actor",
    "job_workflow_ref",
    "run_id",
];

/// Why a token was refused. The messages are shown to whoever presented the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    #[error("the token is not a JWT: {0}")]
    Malformed(String),
    #[error("the token's algorithm {0:?} is not accepted; only RS256 is")]
    Algorithm(String),
    #[error("the token's key id {0:?} is not in the issuer's key set")]
    UnknownKey(String),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token's issuer {got:?} is not the accepted issuer {want:?}")]
    Issuer { got: String, want: String },
    #[error("the token's audience {got:?} does not include {want:?}")]
    Audience { got: String, want: String },
    #[error("the token expired at {exp} (now {now})")]
    Expired { exp: i64, now: i64 },
    #[error("the token is not valid before {nbf} (now {now})")]
    NotYetValid { nbf: i64, now: i64 },
    #[error("the token was issued in the future, at {iat} (now {now})")]
    IssuedInFuture { iat: i64, now: i64 },
    #[error("the token lacks the claim {0:?}")]
    MissingClaim(String),
    #[error("the token's claim {claim:?} is invalid: {why}")]
    BadClaim { claim: String, why: String },
    #[error("the token was already used (jti {0:?}); request a fresh one")]
    Replayed(String),
    #[error("cannot get the issuer's key set: {0}")]
    KeysUnavailable(String),
    #[error("the token had expired at {exp}, before the broker accepted the job at {accepted_at}")]
    ExpiredBeforeAccepted { exp: i64, accepted_at: i64 },
    #[error(
        "the broker says it accepted the job at {accepted_at}, which is in the future (now {now})"
    )]
    AcceptedInFuture { accepted_at: i64, now: i64 },
    #[error(
        "the job was accepted at {accepted_at}, longer ago than this site's oidc.max_queue_age \
         of {max_queue_age_secs} s (now {now}); submit it again"
    )]
    QueuedTooLong {
        accepted_at: i64,
        now: i64,
        max_queue_age_secs: u64,
    },
}

/// What a verifier accepts: one issuer, one audience.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcSettings {
    /// The exact `iss` accepted, e.g. [`GITHUB_ISSUER`], or `https://HOST/_services/token` for
    /// GitHub Enterprise Server.
    pub issuer: String,
    /// The `aud` the token must be minted for (the broker's audience).
    pub audience: String,
}

/// One RSA key of a JWKS, as published.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Jwk {
    pub kty: String,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub alg: Option<String>,
    #[serde(default, rename = "use")]
    pub key_use: Option<String>,
    #[serde(default)]
    pub n: Option<String>,
    #[serde(default)]
    pub e: Option<String>,
}

/// A JSON Web Key Set document.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// The RS256 signing keys of an issuer, by key id. Keys of other types or uses are skipped.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, RsaKey>,
}

#[derive(Debug, Clone)]
struct RsaKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

impl KeySet {
    pub fn from_jwks(jwks: &Jwks) -> KeySet {
        let mut keys = HashMap::new();
        for jwk in &jwks.keys {
            if jwk.kty != "RSA"
                || jwk.alg.as_deref().is_some_and(|a| a != "RS256")
                || jwk.key_use.as_deref().is_some_and(|u| u != "sig")
            {
                continue;
            }
            let (Some(kid), Some(n), Some(e)) = (&jwk.kid, &jwk.n, &jwk.e) else {
                continue;
            };
            let (Ok(n), Ok(e)) = (URL_SAFE_NO_PAD.decode(n), URL_SAFE_NO_PAD.decode(e)) else {
                continue;
            };
            keys.insert(kid.clone(), RsaKey { n, e });
        }
        KeySet { keys }
    }

    /// Parses a JWKS document.
    pub fn from_json(json: &str) -> Result<KeySet, OidcError> {
        let jwks: Jwks = serde_json::from_str(json)
            .map_err(|e| OidcError::KeysUnavailable(format!("the key set is not a JWKS: {e}")))?;
        Ok(KeySet::from_jwks(&jwks))
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
    kid: Option<String>,
}

/// A token split into its parts, header decoded, nothing verified yet.
struct RawToken<'a> {
    header: Header,
    signed: &'a str,
    payload: &'a str,
    signature: &'a str,
}

fn split(token: &str) -> Result<RawToken<'_>, OidcError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(OidcError::Malformed(format!(
            "it is {} bytes, more than {MAX_TOKEN_BYTES}",
            token.len()
        )));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(OidcError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let header_bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| OidcError::Malformed("the header is not base64url".into()))?;
    let header: Header = serde_json::from_slice(&header_bytes)
        .map_err(|e| OidcError::Malformed(format!("the header is not JSON: {e}")))?;
    let signed = &token[..header_len(token)];
    Ok(RawToken {
        header,
        signed,
        payload,
        signature,
    })
}

/// The routing identity of a token verified earlier (the broker keeps the tokens it verified
/// at submission), read without checking anything again. Never use it on a token not yet
/// verified.
pub fn verified_token_identity(token: &str) -> Result<crate::agents::JobIdentity, OidcError> {
    #[derive(Deserialize)]
    struct Claims {
        repository: String,
        #[serde(rename = "ref")]
        git_ref: String,
        event_name: String,
        job_workflow_ref: String,
        actor: String,
        #[serde(default)]
        environment: Option<String>,
    }
    let raw = split(token)?;
    let payload = URL_SAFE_NO_PAD
        .decode(raw.payload)
        .map_err(|_| OidcError::Malformed("the payload is not base64url".into()))?;
    let claims: Claims = serde_json::from_slice(&payload)
        .map_err(|e| OidcError::Malformed(format!("the payload is not a token's claims: {e}")))?;
    Ok(crate::agents::JobIdentity {
        repository: claims.repository,
        git_ref: claims.git_ref,
        event_name: claims.event_name,
        job_workflow_ref: claims.job_workflow_ref,
        actor: claims.actor,
        environment: claims.environment,
    })
}

/// Length of `header.payload`, the signed part.
fn header_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(0)
}

/// The key id a token names, after checking that its algorithm is RS256. Used to decide whether
/// the key set needs a refresh before [`verify_token`].
pub fn token_key_id(token: &str) -> Result<String, OidcError> {
    let raw = split(token)?;
    check_alg(&raw.header)?;
    raw.header
        .kid
        .ok_or_else(|| OidcError::Malformed("the header has no key id (kid)".into()))
}

fn check_alg(header: &Header) -> Result<(), OidcError> {
    match header.alg.as_deref() {
        Some("RS256") => Ok(()),
        Some(other) => Err(OidcError::Algorithm(other.to_string())),
        None => Err(OidcError::Algorithm(String::new())),
    }
}

/// Verifies a token against a key set at time `now` (Unix seconds), and returns its claims.
pub fn verify_token(
    token: &str,
    keys: &KeySet,
    settings: &OidcSettings,
    now: i64,
    leeway: Duration,
) -> Result<WorkflowClaims, OidcError> {
    let raw = split(token)?;
    check_alg(&raw.header)?;
    let kid = raw
        .header
        .kid
        .as_deref()
        .ok_or_else(|| OidcError::Malformed("the header has no key id (kid)".into()))?;
    let key = keys
        .keys
        .get(kid)
        .ok_or_else(|| OidcError::UnknownKey(kid.to_string()))?;
    let signature = URL_SAFE_NO_PAD
        .decode(raw.signature)
        .map_err(|_| OidcError::Malformed("the signature is not base64url".into()))?;
    ring::signature::RsaPublicKeyComponents {
        n: &key.n,
        e: &key.e,
    }
    .verify(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        raw.signed.as_bytes(),
        &signature,
    )
    .map_err(|_| OidcError::BadSignature)?;

    // Only now, with the signature good, is the payload worth reading.
    let payload = URL_SAFE_NO_PAD
        .decode(raw.payload)
        .map_err(|_| OidcError::Malformed("the payload is not base64url".into()))?;
    let mut claims: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&payload)
            .map_err(|e| OidcError::Malformed(format!("the payload is not a JSON object: {e}")))?;
    check_claims(&mut claims, settings, now, leeway.as_secs() as i64)?;
    serde_json::from_value(serde_json::Value::Object(claims)).map_err(|e| OidcError::BadClaim {
        claim: "(payload)".into(),
        why: e.to_string(),
    })
}

fn check_claims(
    claims: &mut serde_json::Map<String, serde_json::Value>,
    settings: &OidcSettings,
    now: i64,
    leeway: i64,
) -> Result<(), OidcError> {
    use serde_json::Value;
    let string = |claims: &serde_json::Map<String, Value>, name: &str| match claims.get(name) {
        None | Some(Value::Null) => Err(OidcError::MissingClaim(name.into())),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(OidcError::BadClaim {
            claim: name.into(),
            why: "expected a string".into(),
        }),
    };
    let number = |claims: &serde_json::Map<String, Value>, name: &str| match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| OidcError::BadClaim {
            claim: name.into(),
            why: "expected whole seconds".into(),
        }),
        Some(_) => Err(OidcError::BadClaim {
            claim: name.into(),
            why: "expected a number".into(),
        }),
    };

    let iss = string(claims, "iss")?;
    if iss != settings.issuer {
        return Err(OidcError::Issuer {
            got: iss,
            want: settings.issuer.clone(),
        });
    }
    // `aud` is a string or an array of strings; keep the one that matched.
    let audiences: Vec<String> = match claims.get("aud") {
        None | Some(Value::Null) => return Err(OidcError::MissingClaim("aud".into())),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(_) => {
            return Err(OidcError::BadClaim {
                claim: "aud".into(),
                why: "expected a string or an array of strings".into(),
            });
        }
    };
    if !audiences.contains(&settings.audience) {
        return Err(OidcError::Audience {
            got: audiences.join(", "),
            want: settings.audience.clone(),
        });
    }
    claims.insert("aud".into(), Value::String(settings.audience.clone()));

    let exp = number(claims, "exp")?.ok_or_else(|| OidcError::MissingClaim("exp".into()))?;
    // `exp`, `nbf` and `iat` are whatever i64 the token's issuer wrote: no arithmetic on them
    // may overflow.
    if now > exp.saturating_add(leeway) {
        return Err(OidcError::Expired { exp, now });
    }
    if let Some(nbf) = number(claims, "nbf")?
        && now.saturating_add(leeway) < nbf
    {
        return Err(OidcError::NotYetValid { nbf, now });
    }
    let iat = number(claims, "iat")?.ok_or_else(|| OidcError::MissingClaim("iat".into()))?;
    if now.saturating_add(leeway) < iat {
        return Err(OidcError::IssuedInFuture { iat, now });
    }

    for name in REQUIRED_CLAIMS {
        if !matches!(*name, "aud" | "exp" | "iat") {
            let value = string(claims, name)?;
            if value.is_empty() {
                return Err(OidcError::BadClaim {
                    claim: name.to_string(),
                    why: "it is empty".into(),
                });
            }
        }
    }
    let repository = string(claims, "repository")?;
    if repository.split('/').count() != 2 || repository.split('/').any(str::is_empty) {
        return Err(OidcError::BadClaim {
            claim: "repository".into(),
            why: format!("{repository:?} is not owner/name"),
        });
    }
    let sha = string(claims, "sha")?;
    if sha.len() < 7 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(OidcError::BadClaim {
            claim: "sha".into(),
            why: format!("{sha:?} is not a commit id"),
        });
    }
    Ok(())
}

/// Verifies the token of a job that waited in the broker's queue. Signature, issuer, audience
/// and the identity claims are checked as by [`verify_token`]; the token's lifetime is checked
/// at `accepted_at` (Unix seconds), when the broker accepted the job, rather than `now`: GitHub's
/// tokens live for minutes, a site's queue can hold a job for hours. The broker's word on
/// `accepted_at` is bounded: it may not lie in the future, nor more than `max_queue_age` before
/// `now`, so a token harvested from a job is good for that long at most.
pub fn verify_queued_token(
    token: &str,
    keys: &KeySet,
    settings: &OidcSettings,
    now: i64,
    accepted_at: i64,
    leeway: Duration,
    max_queue_age: Duration,
) -> Result<WorkflowClaims, OidcError> {
    if accepted_at > now.saturating_add(leeway.as_secs() as i64) {
        return Err(OidcError::AcceptedInFuture { accepted_at, now });
    }
    if now.saturating_sub(accepted_at) > max_queue_age.as_secs() as i64 {
        return Err(OidcError::QueuedTooLong {
            accepted_at,
            now,
            max_queue_age_secs: max_queue_age.as_secs(),
        });
    }
    verify_token(token, keys, settings, accepted_at, leeway).map_err(|err| match err {
        OidcError::Expired { exp, .. } => OidcError::ExpiredBeforeAccepted { exp, accepted_at },
        other => other,
    })
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    crate::now_ms() / 1000
}

#[cfg(feature = "client")]
pub use verifier::OidcVerifier;

#[cfg(feature = "client")]
mod verifier {
    use std::sync::{Arc, Mutex, RwLock};
    use std::time::{Duration, Instant};

    use super::{
        KeySet, OidcError, OidcSettings, WorkflowClaims, token_key_id, verify_queued_token,
        verify_token,
    };

    /// The shortest time between two key-set refreshes caused by unknown key ids, so a stream of
    /// tokens with made-up `kid`s cannot make us hammer the issuer.
    pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

    /// After a failed fetch (the issuer down, the network), the next refresh may come this soon:
    /// an outage must not make every token look unknown for a whole [`MIN_REFRESH_INTERVAL`].
    pub const RETRY_AFTER_FAILED_FETCH: Duration = Duration::from_secs(2);

    /// A clock in Unix seconds; tests pin it.
    pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

    /// Verifies tokens of one issuer, fetching its key set through OpenID discovery
    /// (`ISSUER/.well-known/openid-configuration` → `jwks_uri`) and caching it.
    #[derive(Clone)]
    pub struct OidcVerifier {
        inner: Arc<Inner>,
    }

    struct Inner {
        settings: OidcSettings,
        http: reqwest::Client,
        keys: RwLock<Arc<KeySet>>,
        last_fetch: Mutex<Option<Instant>>,
        refresh: tokio::sync::Mutex<()>,
        clock: Clock,
        leeway: Duration,
        /// A fixed key set: never fetched (tests, air-gapped sites with a pinned JWKS file).
        fixed: bool,
    }

    impl std::fmt::Debug for OidcVerifier {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("OidcVerifier")
                .field("settings", &self.inner.settings)
                .finish_non_exhaustive()
        }
    }

    impl OidcVerifier {
        /// A verifier that fetches the issuer's keys when it first needs them.
        pub fn new(settings: OidcSettings) -> OidcVerifier {
            Self::build(settings, KeySet::default(), false)
        }

        /// A verifier with a fixed key set that is never refreshed.
        pub fn with_keys(settings: OidcSettings, keys: KeySet) -> OidcVerifier {
            Self::build(settings, keys, true)
        }

        fn build(settings: OidcSettings, keys: KeySet, fixed: bool) -> OidcVerifier {
            crate::client::install_crypto_provider();
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .user_agent(concat!("testbot/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("an HTTP client with default settings builds");
            OidcVerifier {
                inner: Arc::new(Inner {
                    settings,
                    http,
                    keys: RwLock::new(Arc::new(keys)),
                    last_fetch: Mutex::new(None),
                    refresh: tokio::sync::Mutex::new(()),
                    clock: Arc::new(super::unix_now),
                    leeway: super::DEFAULT_LEEWAY,
                    fixed,
                }),
            }
        }

        /// Replaces the clock (tests verify expired real tokens at a pinned time).
        pub fn with_clock(self, clock: Clock) -> OidcVerifier {
            let inner = Arc::into_inner(self.inner).expect("with_clock is called before sharing");
            OidcVerifier {
                inner: Arc::new(Inner { clock, ..inner }),
            }
        }

        pub fn settings(&self) -> &OidcSettings {
            &self.inner.settings
        }

        /// Verifies a token, refreshing the key set first if the token names a key it lacks.
        pub async fn verify(&self, token: &str) -> Result<WorkflowClaims, OidcError> {
            let keys = self.keys_for(token).await?;
            verify_token(
                token,
                &keys,
                &self.inner.settings,
                (self.inner.clock)(),
                self.inner.leeway,
            )
        }

        /// Verifies the token of a job the broker accepted at `accepted_at` (Unix seconds), at
        /// most `max_queue_age` ago: see [`verify_queued_token`].
        pub async fn verify_queued(
            &self,
            token: &str,
            accepted_at: i64,
            max_queue_age: Duration,
        ) -> Result<WorkflowClaims, OidcError> {
            let keys = self.keys_for(token).await?;
            verify_queued_token(
                token,
                &keys,
                &self.inner.settings,
                (self.inner.clock)(),
                accepted_at,
                self.inner.leeway,
                max_queue_age,
            )
        }

        /// The key set to verify `token` with, refreshed first if it lacks the token's key.
        async fn keys_for(&self, token: &str) -> Result<Arc<KeySet>, OidcError> {
            let kid = token_key_id(token)?;
            if !self.keys().contains(&kid) {
                self.refresh(&kid).await?;
            }
            Ok(self.keys())
        }

        fn keys(&self) -> Arc<KeySet> {
            self.inner.keys.read().expect("key set lock").clone()
        }

        async fn refresh(&self, kid: &str) -> Result<(), OidcError> {
            if self.inner.fixed {
                return Ok(());
            }
            let _one_at_a_time = self.inner.refresh.lock().await;
            if self.keys().contains(kid) {
                return Ok(()); // Another task fetched it meanwhile.
            }
            {
                let last = self.inner.last_fetch.lock().expect("refresh lock");
                if last.is_some_and(|at| at.elapsed() < MIN_REFRESH_INTERVAL) {
                    return Ok(()); // Too soon; the caller reports the unknown key.
                }
            }
            *self.inner.last_fetch.lock().expect("refresh lock") = Some(Instant::now());
            let keys = match self.fetch().await {
                Ok(keys) => keys,
                Err(err) => {
                    *self.inner.last_fetch.lock().expect("refresh lock") =
                        Instant::now().checked_sub(MIN_REFRESH_INTERVAL - RETRY_AFTER_FAILED_FETCH);
                    return Err(OidcError::KeysUnavailable(err));
                }
            };
            *self.inner.keys.write().expect("key set lock") = Arc::new(keys);
            Ok(())
        }

        async fn fetch(&self) -> Result<KeySet, String> {
            #[derive(serde::Deserialize)]
            struct Discovery {
                jwks_uri: String,
            }
            let issuer = self.inner.settings.issuer.trim_end_matches('/');
            let discovery_url = format!("{issuer}/.well-known/openid-configuration");
            let discovery: Discovery = self
                .get_json(&discovery_url)
                .await
                .map_err(|e| format!("{discovery_url}: {e}"))?;
            let jwks: super::Jwks = self
                .get_json(&discovery.jwks_uri)
                .await
                .map_err(|e| format!("{}: {e}", discovery.jwks_uri))?;
            Ok(KeySet::from_jwks(&jwks))
        }

        async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
            let response = self
                .inner
                .http
                .get(url)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("HTTP {status}"));
            }
            response.json().await.map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWKS: &str = include_str!("../../tests/fixtures/oidc/github-jwks.json");
    const RGL: &str = include_str!("../../tests/fixtures/oidc/real-token-rgl.jwt");
    const MARCHENKO: &str = include_str!("../../tests/fixtures/oidc/real-token-marchenko.jwt");
    const RGL_DECODED: &str = include_str!("../../tests/fixtures/oidc/real-token-rgl.decoded.json");
    const MARCHENKO_DECODED: &str =
        include_str!("../../tests/fixtures/oidc/real-token-marchenko.decoded.json");

    fn decoded(json: &str) -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(json).unwrap()["payload"].clone()
    }

    fn settings_for(payload: &serde_json::Value) -> OidcSettings {
        OidcSettings {
            issuer: GITHUB_ISSUER.into(),
            audience: payload["aud"].as_str().unwrap().into(),
        }
    }

    #[test]
    fn real_github_tokens_verify_at_their_issue_time() {
        let keys = KeySet::from_json(JWKS).unwrap();
        for (token, decoded_json) in [(RGL, RGL_DECODED), (MARCHENKO, MARCHENKO_DECODED)] {
            let payload = decoded(decoded_json);
            let now = payload["iat"].as_i64().unwrap() + 60;
            let claims = verify_token(
                token.trim(),
                &keys,
                &settings_for(&payload),
                now,
                DEFAULT_LEEWAY,
            )
            .unwrap();
            assert_eq!(claims.repository, payload["repository"].as_str().unwrap());
            assert_eq!(claims.sha, payload["sha"].as_str().unwrap());
            assert_eq!(claims.git_ref, payload["ref"].as_str().unwrap());
            assert_eq!(claims.run_id, payload["run_id"].as_str().unwrap());
            assert_eq!(claims.exp, payload["exp"].as_i64().unwrap());
        }
    }

    /// Found while writing the `oidc_token` fuzz target (its seed `claims-far-exp`): an `exp`
    /// of `i64::MAX` overflowed the expiry check, a panic in a build with overflow checks and a
    /// wrapped comparison that called a valid token expired without them.
    #[test]
    fn lifetimes_at_the_ends_of_i64_are_checked_without_overflow() {
        let payload = decoded(RGL_DECODED);
        let settings = settings_for(&payload);
        let now = payload["iat"].as_i64().unwrap() + 60;
        let claims_with = |name: &str, value: i64| {
            let mut claims = payload.as_object().unwrap().clone();
            claims.insert(name.into(), value.into());
            claims
        };
        let leeway = DEFAULT_LEEWAY.as_secs() as i64;
        assert_eq!(
            check_claims(&mut claims_with("exp", i64::MAX), &settings, now, leeway),
            Ok(())
        );
        assert!(matches!(
            check_claims(&mut claims_with("exp", i64::MIN), &settings, now, leeway),
            Err(OidcError::Expired { .. })
        ));
        assert_eq!(
            check_claims(&mut claims_with("nbf", i64::MIN), &settings, now, leeway),
            Ok(())
        );
        let mut far = claims_with("exp", i64::MAX);
        assert_eq!(check_claims(&mut far, &settings, i64::MAX, leeway), Ok(()));
        assert!(matches!(
            check_claims(&mut claims_with("iat", i64::MAX), &settings, now, leeway),
            Err(OidcError::IssuedInFuture { .. })
        ));
    }

    #[test]
    fn real_github_token_is_refused_now_that_it_has_expired() {
        let keys = KeySet::from_json(JWKS).unwrap();
        let payload = decoded(RGL_DECODED);
        let exp = payload["exp"].as_i64().unwrap();
        let err = verify_token(
            RGL.trim(),
            &keys,
            &settings_for(&payload),
            exp + 3600,
            DEFAULT_LEEWAY,
        )
        .unwrap_err();
        assert_eq!(
            err,
            OidcError::Expired {
                exp,
                now: exp + 3600
            }
        );
    }

    #[test]
    fn a_queued_jobs_token_is_checked_at_the_time_the_broker_accepted_it() {
        let keys = KeySet::from_json(JWKS).unwrap();
        let payload = decoded(MARCHENKO_DECODED);
        let settings = settings_for(&payload);
        let (iat, exp) = (
            payload["iat"].as_i64().unwrap(),
            payload["exp"].as_i64().unwrap(),
        );
        let day = Duration::from_secs(24 * 3600);
        let token = MARCHENKO.trim();
        // Accepted a minute after it was minted, run five hours later: long after it expired.
        let accepted_at = iat + 60;
        let now = accepted_at + 5 * 3600;
        assert!(matches!(
            verify_token(token, &keys, &settings, now, DEFAULT_LEEWAY),
            Err(OidcError::Expired { .. })
        ));
        let claims = verify_queued_token(
            token,
            &keys,
            &settings,
            now,
            accepted_at,
            DEFAULT_LEEWAY,
            day,
        )
        .unwrap();
        assert_eq!(claims.exp, exp);

        // A token that had expired already when the broker says it took the job.
        let late = exp + DEFAULT_LEEWAY.as_secs() as i64 + 1;
        assert_eq!(
            verify_queued_token(
                token,
                &keys,
                &settings,
                late + 10,
                late,
                DEFAULT_LEEWAY,
                day
            ),
            Err(OidcError::ExpiredBeforeAccepted {
                exp,
                accepted_at: late
            })
        );
        // A broker that claims an old acceptance to revive a harvested token: bounded.
        let now = accepted_at + day.as_secs() as i64 + 1;
        assert_eq!(
            verify_queued_token(
                token,
                &keys,
                &settings,
                now,
                accepted_at,
                DEFAULT_LEEWAY,
                day
            ),
            Err(OidcError::QueuedTooLong {
                accepted_at,
                now,
                max_queue_age_secs: day.as_secs()
            })
        );
        // Or one that claims to have accepted it in the future.
        let now = iat;
        let future = now + 3600;
        assert_eq!(
            verify_queued_token(token, &keys, &settings, now, future, DEFAULT_LEEWAY, day),
            Err(OidcError::AcceptedInFuture {
                accepted_at: future,
                now
            })
        );
        // Accepted before the token was issued.
        assert!(matches!(
            verify_queued_token(
                token,
                &keys,
                &settings,
                iat,
                iat - 3600,
                DEFAULT_LEEWAY,
                day
            ),
            Err(OidcError::NotYetValid { .. } | OidcError::IssuedInFuture { .. })
        ));
        // The signature is still checked.
        let forged = format!("{}x", &token[..token.len() - 1]);
        assert!(
            verify_queued_token(
                &forged,
                &keys,
                &settings,
                now,
                accepted_at,
                DEFAULT_LEEWAY,
                day
            )
            .is_err()
        );
    }

    #[test]
    fn tampered_real_tokens_are_refused() {
        let keys = KeySet::from_json(JWKS).unwrap();
        let payload = decoded(RGL_DECODED);
        let now = payload["iat"].as_i64().unwrap() + 60;
        let token = RGL.trim();
        let mut parts: Vec<&str> = token.split('.').collect();

        // Change the repository in the payload, keep the signature.
        let mut forged = payload.clone();
        forged["repository"] = "attacker/repo".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        parts[1] = &forged_payload;
        let err = verify_token(
            &parts.join("."),
            &keys,
            &settings_for(&payload),
            now,
            DEFAULT_LEEWAY,
        )
        .unwrap_err();
        assert_eq!(err, OidcError::BadSignature);

        // Flip one bit of the signature.
        let mut signature = URL_SAFE_NO_PAD
            .decode(token.rsplit('.').next().unwrap())
            .unwrap();
        signature[10] ^= 1;
        let tampered = format!(
            "{}.{}",
            &token[..token.rfind('.').unwrap()],
            URL_SAFE_NO_PAD.encode(signature)
        );
        let err = verify_token(
            &tampered,
            &keys,
            &settings_for(&payload),
            now,
            DEFAULT_LEEWAY,
        )
        .unwrap_err();
        assert_eq!(err, OidcError::BadSignature);

        // Right token, wrong audience.
        let mut settings = settings_for(&payload);
        settings.audience = "https://testbot.example.org".into();
        let err = verify_token(token, &keys, &settings, now, DEFAULT_LEEWAY).unwrap_err();
        assert_eq!(
            err,
            OidcError::Audience {
                got: "https://example.com".into(),
                want: "https://testbot.example.org".into()
            }
        );
    }

    #[test]
    fn the_jwks_keeps_only_rs256_signing_keys() {
        let keys = KeySet::from_json(JWKS).unwrap();
        assert!(!keys.is_empty());
        let header: serde_json::Value = serde_json::from_str(RGL_DECODED).unwrap();
        assert!(keys.contains(header["header"]["kid"].as_str().unwrap()));
        assert!(matches!(
            KeySet::from_json("{\"keys\": 3}"),
            Err(OidcError::KeysUnavailable(_))
        ));
    }
}
