//! Signed agent requests.
//!
//! An enrolled agent holds an Ed25519 key pair; the broker knows only the public key. Every agent
//! request carries four headers:
//!
//! - `x-testbot-agent`: the agent id the broker gave at enrollment;
//! - `x-testbot-timestamp`: Unix milliseconds when the request was signed;
//! - `x-testbot-nonce`: 16 random bytes, hex: the broker refuses a nonce it has seen;
//! - `x-testbot-signature`: base64url (no padding) Ed25519 signature over [`signing_string`].
//!
//! The signed string binds the agent id, the method, the path with its query, the time, the
//! nonce and the SHA-256 of the body, so a captured request cannot be replayed, redirected to
//! another route, given another body or passed off as another agent's.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

pub const AGENT_HEADER: &str = "x-testbot-agent";
pub const TIMESTAMP_HEADER: &str = "x-testbot-timestamp";
pub const NONCE_HEADER: &str = "x-testbot-nonce";
pub const SIGNATURE_HEADER: &str = "x-testbot-signature";

/// How far a request's timestamp may be from the broker's clock, either way.
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// The exact bytes an agent signs. The agent id is part of them, so a signature made by one
/// agent never counts for another, even one holding the same key.
pub fn signing_string(
    agent_id: &str,
    method: &str,
    path_and_query: &str,
    timestamp_ms: i64,
    nonce: &str,
    body: &[u8],
) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    format!(
        "testbot-agent-request-v2\n{agent_id}\n{method}\n{path_and_query}\n{timestamp_ms}\n{nonce}\n{}",
        hex::encode(digest.as_ref())
    )
}

/// The four header values for a request.
#[derive(Debug, Clone)]
pub struct SignedHeaders {
    pub agent: String,
    pub timestamp_ms: i64,
    pub nonce: String,
    pub signature: String,
}

/// Signs a request with the agent's key.
pub fn sign_request(
    key: &Ed25519KeyPair,
    agent_id: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> SignedHeaders {
    let timestamp_ms = crate::now_ms();
    let nonce = random_hex(16);
    let message = signing_string(agent_id, method, path_and_query, timestamp_ms, &nonce, body);
    let signature = URL_SAFE_NO_PAD.encode(key.sign(message.as_bytes()).as_ref());
    SignedHeaders {
        agent: agent_id.to_string(),
        timestamp_ms,
        nonce,
        signature,
    }
}

/// Checks a signature with a raw 32-byte Ed25519 public key.
pub fn verify_signature(public_key: &[u8], message: &str, signature_b64: &str) -> bool {
    let Ok(signature) = URL_SAFE_NO_PAD.decode(signature_b64) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message.as_bytes(), &signature)
        .is_ok()
}

/// A fresh Ed25519 key pair as PKCS#8 (to store) and its public key (base64url, to enroll).
pub fn generate_key() -> Result<(Vec<u8>, String), String> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| "cannot generate an Ed25519 key".to_string())?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|e| format!("generated key is unusable: {e}"))?;
    let public = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
    Ok((pkcs8.as_ref().to_vec(), public))
}

/// Decodes an enrolled public key (base64url of 32 bytes).
pub fn decode_public_key(text: &str) -> Result<Vec<u8>, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| "public_key is not base64url".to_string())?;
    if bytes.len() != 32 {
        return Err(format!(
            "public_key is {} bytes; an Ed25519 public key is 32",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random source works");
    hex::encode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_binds_every_part_of_the_request() {
        let (pkcs8, public) = generate_key().unwrap();
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap();
        let public = decode_public_key(&public).unwrap();
        let headers = sign_request(&key, "agt_1", "POST", "/api/v1/agent/poll", b"{}");
        let message = |method: &str, path: &str, ts: i64, nonce: &str, body: &[u8]| {
            signing_string("agt_1", method, path, ts, nonce, body)
        };
        let (ts, nonce) = (headers.timestamp_ms, headers.nonce.as_str());
        let good = message("POST", "/api/v1/agent/poll", ts, nonce, b"{}");
        assert!(verify_signature(&public, &good, &headers.signature));
        for tampered in [
            message("GET", "/api/v1/agent/poll", ts, nonce, b"{}"),
            message("POST", "/api/v1/agent/jobs/1/finish", ts, nonce, b"{}"),
            message("POST", "/api/v1/agent/poll", ts + 1, nonce, b"{}"),
            message("POST", "/api/v1/agent/poll", ts, "00", b"{}"),
            message("POST", "/api/v1/agent/poll", ts, nonce, b"{\"x\":1}"),
            signing_string("agt_2", "POST", "/api/v1/agent/poll", ts, nonce, b"{}"),
        ] {
            assert!(!verify_signature(&public, &tampered, &headers.signature));
        }
        assert!(decode_public_key("AAAA").is_err());
    }
}
