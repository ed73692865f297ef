//! GitHub Actions OIDC tokens, as a workflow presents them to the broker and the broker hands
//! them to the agent.
//!
//! The first byte picks a mode: even, the rest is a token verified against GitHub's real key
//! set (fuzzing the splitting, header and base64 handling in front of the signature check);
//! odd, the rest is a claims payload that the test issuer's key signs, so that the claim checks
//! behind the signature are fuzzed too. Both with a pinned clock; every accepted token's claims
//! are checked again against the verifier's rules.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use testbot_proto::oidc::{
    DEFAULT_LEEWAY, GITHUB_ISSUER, Jwk, Jwks, KeySet, OidcSettings, WorkflowClaims, token_key_id,
    verified_token_identity, verify_queued_token, verify_token,
};

const GITHUB_JWKS: &str = include_str!("../../tests/fixtures/oidc/github-jwks.json");
const ISSUER_KEY: &[u8] = include_bytes!("../../tests/fixtures/oidc/test-issuer-key.pk8.der");
const TEST_KID: &str = "testbot-test-key-1";
/// Inside the lifetime of the real tokens in tests/fixtures/oidc.
const NOW: i64 = 1_743_250_000;
const MAX_QUEUE_AGE: Duration = Duration::from_secs(6 * 3600);

struct Fixed {
    github: KeySet,
    test: KeySet,
    key: RsaKeyPair,
    settings: OidcSettings,
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        let key = RsaKeyPair::from_pkcs8(ISSUER_KEY).unwrap();
        let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(key.public());
        let test = KeySet::from_jwks(&Jwks {
            keys: vec![Jwk {
                kty: "RSA".into(),
                kid: Some(TEST_KID.into()),
                alg: Some("RS256".into()),
                key_use: Some("sig".into()),
                n: Some(URL_SAFE_NO_PAD.encode(public.n)),
                e: Some(URL_SAFE_NO_PAD.encode(public.e)),
            }],
        });
        Fixed {
            github: KeySet::from_json(GITHUB_JWKS).unwrap(),
            test,
            key,
            settings: OidcSettings {
                issuer: GITHUB_ISSUER.into(),
                audience: "https://example.com".into(),
            },
        }
    })
}

fn sign(key: &RsaKeyPair, payload: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"alg":"RS256","typ":"JWT","kid":"{TEST_KID}"}}"#
    ));
    let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(payload));
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signed.as_bytes(),
        &mut signature,
    )
    .unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// What the verifier promises about the claims of a token it accepted at `at`.
fn check_accepted(claims: &WorkflowClaims, settings: &OidcSettings, at: i64) {
    let leeway = DEFAULT_LEEWAY.as_secs() as i64;
    assert_eq!(claims.iss, settings.issuer);
    assert_eq!(claims.aud, settings.audience);
    assert!(
        at <= claims.exp.saturating_add(leeway),
        "expired: {claims:?}"
    );
    assert!(
        claims.iat <= at.saturating_add(leeway),
        "issued later: {claims:?}"
    );
    if let Some(nbf) = claims.nbf {
        assert!(
            nbf <= at.saturating_add(leeway),
            "not yet valid: {claims:?}"
        );
    }
    for value in [
        &claims.sub,
        &claims.jti,
        &claims.repository,
        &claims.repository_id,
        &claims.repository_owner,
        &claims.git_ref,
        &claims.sha,
        &claims.event_name,
        &claims.actor,
        &claims.job_workflow_ref,
        &claims.run_id,
    ] {
        assert!(!value.is_empty(), "an empty claim: {claims:?}");
    }
    let parts: Vec<&str> = claims.repository.split('/').collect();
    assert!(parts.len() == 2 && parts.iter().all(|p| !p.is_empty()));
    assert!(claims.sha.len() >= 7 && claims.sha.bytes().all(|b| b.is_ascii_hexdigit()));
}

fn verify_all(token: &str, keys: &KeySet, settings: &OidcSettings, accepted_at: i64) {
    let _ = token_key_id(token);
    let _ = verified_token_identity(token);
    if let Ok(claims) = verify_token(token, keys, settings, NOW, DEFAULT_LEEWAY) {
        check_accepted(&claims, settings, NOW);
    }
    if let Ok(claims) = verify_queued_token(
        token,
        keys,
        settings,
        NOW,
        accepted_at,
        DEFAULT_LEEWAY,
        MAX_QUEUE_AGE,
    ) {
        assert!(accepted_at <= NOW + DEFAULT_LEEWAY.as_secs() as i64);
        assert!(NOW - accepted_at <= MAX_QUEUE_AGE.as_secs() as i64);
        check_accepted(&claims, settings, accepted_at);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let fixed = fixed();
    // A few values around the interesting edges, and any i64 the input spells.
    let accepted_at = match mode >> 1 & 3 {
        0 => NOW,
        1 => NOW - MAX_QUEUE_AGE.as_secs() as i64,
        2 => NOW + 61,
        _ => i64::MIN,
    };
    if mode & 1 == 0 {
        let Ok(token) = std::str::from_utf8(rest) else {
            return;
        };
        verify_all(token, &fixed.github, &fixed.settings, accepted_at);
    } else {
        let token = sign(&fixed.key, rest);
        verify_all(&token, &fixed.test, &fixed.settings, accepted_at);
        assert!(verify_token(&token, &fixed.github, &fixed.settings, NOW, DEFAULT_LEEWAY).is_err());
    }
});
