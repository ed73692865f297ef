//! A local OIDC issuer with GitHub's shape: discovery document and JWKS served on loopback, and
//! RS256 tokens minted with a fixed test key. Tests never talk to GitHub.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair};
use serde_json::{Value, json};

/// The request token the test issuer's Actions token service accepts
/// (`ACTIONS_ID_TOKEN_REQUEST_TOKEN`).
pub const ACTIONS_REQUEST_TOKEN: &str = "actions-request-token";

/// The key id the test issuer publishes.
pub const TEST_KID: &str = "testbot-test-key-1";

/// The test issuer's RSA key (PKCS#8 DER).
const ISSUER_KEY: &[u8] = include_bytes!("../fixtures/oidc/test-issuer-key.pk8.der");
/// A key the issuer does not publish: tokens signed with it are forgeries.
const ATTACKER_KEY: &[u8] = include_bytes!("../fixtures/oidc/attacker-key.pk8.der");

/// An issuer on `127.0.0.1:PORT` serving `/.well-known/openid-configuration` and
/// `/.well-known/jwks`. Dropping it stops the server.
pub struct TestIssuer {
    pub url: String,
    key: Arc<RsaKeyPair>,
    attacker: Arc<RsaKeyPair>,
    server: tokio::task::JoinHandle<()>,
    /// How many of the next key set requests fail with `503` (an issuer outage).
    jwks_failures: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl TestIssuer {
    pub async fn start() -> TestIssuer {
        let key = Arc::new(RsaKeyPair::from_pkcs8(ISSUER_KEY).expect("test issuer key"));
        let attacker = Arc::new(RsaKeyPair::from_pkcs8(ATTACKER_KEY).expect("attacker key"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let discovery = json!({
            "issuer": url,
            "jwks_uri": format!("{url}/.well-known/jwks"),
            "subject_types_supported": ["public", "pairwise"],
            "response_types_supported": ["id_token"],
            "id_token_signing_alg_values_supported": ["RS256"],
        });
        let jwks = json!({ "keys": [jwk(&key, TEST_KID)] });
        let jwks_failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let minter = TestIssuer {
            url: url.clone(),
            key: key.clone(),
            attacker: attacker.clone(),
            server: tokio::spawn(async {}),
            jwks_failures: jwks_failures.clone(),
        };
        let failures = jwks_failures.clone();
        let minter = Arc::new(minter);
        let app = axum::Router::new()
            .route(
                "/actions-token/{owner}/{repo}/{run}",
                axum::routing::get(
                    move |axum::extract::Path((owner, repo, run)): axum::extract::Path<(
                        String,
                        String,
                        String,
                    )>,
                          axum::extract::Query(query): axum::extract::Query<
                        std::collections::HashMap<String, String>,
                    >,
                          headers: axum::http::HeaderMap| async move {
                        // The Actions runtime's token service: the runner's request token
                        // proves the caller; the audience comes from the query.
                        let authorized = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| {
                                v.eq_ignore_ascii_case(&format!("bearer {ACTIONS_REQUEST_TOKEN}"))
                            });
                        if !authorized {
                            return (
                                axum::http::StatusCode::UNAUTHORIZED,
                                axum::Json(json!({"message": "bad request token"})),
                            );
                        }
                        let audience = query.get("audience").cloned().unwrap_or_default();
                        let mut claims = minter.claims(&format!("{owner}/{repo}"), &audience);
                        // Every token of one workflow run carries that run's id.
                        claims["run_id"] = run.into();
                        (
                            axum::http::StatusCode::OK,
                            axum::Json(json!({"count": 1, "value": minter.mint(&claims)})),
                        )
                    },
                ),
            )
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || async move { axum::Json(discovery) }),
            )
            .route(
                "/.well-known/jwks",
                axum::routing::get(move || async move {
                    use axum::response::IntoResponse as _;
                    use std::sync::atomic::Ordering;
                    let failing = failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if failing {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
                    }
                    axum::Json(jwks).into_response()
                }),
            );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestIssuer {
            url,
            key,
            attacker,
            server,
            jwks_failures,
        }
    }

    /// Makes the next `count` key set requests fail with `503 Service Unavailable`.
    pub fn fail_jwks_requests(&self, count: usize) {
        self.jwks_failures
            .store(count, std::sync::atomic::Ordering::SeqCst);
    }

    /// Claims as GitHub would send them for a push to `main` of `repo`, minted for `audience`,
    /// valid from a minute ago for an hour. Ids and counters are strings, as GitHub sends them.
    pub fn claims(&self, repo: &str, audience: &str) -> Value {
        let now = testbot_proto::oidc::unix_now();
        let owner = repo.split('/').next().unwrap_or(repo);
        json!({
            "iss": self.url,
            "aud": audience,
            "sub": format!("repo:{repo}:ref:refs/heads/main"),
            "jti": format!("jti-{}", unique()),
            "exp": now + 3600,
            "nbf": now - 60,
            "iat": now - 60,
            "repository": repo,
            "repository_id": "123456",
            "repository_owner": owner,
            "repository_owner_id": "1000",
            "repository_visibility": "public",
            "ref": "refs/heads/main",
            "ref_type": "branch",
            "ref_protected": "true",
            "sha": "0f661a4a011d77cb21fa4dc7013d9b6f928666ed",
            "event_name": "push",
            "actor": "octocat",
            "actor_id": "583231",
            "workflow": "CI",
            "workflow_ref": format!("{repo}/.github/workflows/ci.yml@refs/heads/main"),
            "job_workflow_ref": format!("{repo}/.github/workflows/ci.yml@refs/heads/main"),
            "run_id": format!("{}", 9_000_000 + unique()),
            "run_number": "7",
            "run_attempt": "1",
            "head_ref": "",
            "base_ref": "",
            "runner_environment": "github-hosted",
        })
    }

    /// `ACTIONS_ID_TOKEN_REQUEST_URL` for one workflow run of `repo`: GitHub's token service's
    /// shape (`GET URL&audience=AUD` with the request token, answering `{"value": JWT}`).
    pub fn actions_token_url(&self, repo: &str) -> String {
        format!(
            "{}/actions-token/{repo}/{}?api-version=2.0",
            self.url,
            8_000_000 + unique()
        )
    }

    /// A token for `claims`, signed by the issuer's published key.
    pub fn mint(&self, claims: &Value) -> String {
        sign(
            &self.key,
            &json!({"alg": "RS256", "typ": "JWT", "kid": TEST_KID}),
            claims,
        )
    }

    /// A token with an arbitrary header, signed by the issuer's key.
    pub fn mint_with_header(&self, header: &Value, claims: &Value) -> String {
        sign(&self.key, header, claims)
    }

    /// A token that names the issuer's key id but is signed with another key.
    pub fn forge(&self, claims: &Value) -> String {
        sign(
            &self.attacker,
            &json!({"alg": "RS256", "typ": "JWT", "kid": TEST_KID}),
            claims,
        )
    }

    /// The issuer's public key as DER (RSAPublicKey), which an HS256 forgery uses as its secret.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }
}

/// `header.payload` signed with HMAC-SHA256 under `secret` (the "alg confusion" attack).
pub fn sign_hs256(secret: &[u8], header: &Value, claims: &Value) -> String {
    let signed = format!("{}.{}", b64_json(header), b64_json(claims));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// An unsigned token (`alg: none`).
pub fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64_json(&json!({"alg": "none", "typ": "JWT"})),
        b64_json(claims)
    )
}

fn b64_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

fn sign(key: &RsaKeyPair, header: &Value, claims: &Value) -> String {
    let signed = format!("{}.{}", b64_json(header), b64_json(claims));
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signed.as_bytes(),
        &mut signature,
    )
    .expect("RSA signing");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

fn jwk(key: &RsaKeyPair, kid: &str) -> Value {
    let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(key.public());
    let (n, e) = (public.n, public.e);
    json!({
        "kty": "RSA",
        "alg": "RS256",
        "use": "sig",
        "kid": kid,
        "n": URL_SAFE_NO_PAD.encode(n),
        "e": URL_SAFE_NO_PAD.encode(e),
    })
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() as u64 * 1_000_000
}
