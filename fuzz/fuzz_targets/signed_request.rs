//! Signed agent requests: the four `x-testbot-*` headers and the Ed25519 signature over
//! method, path, timestamp, nonce and body. Anyone can send a request to `/agent/*`.
#![no_main]

use arbitrary::Arbitrary;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use testbot_proto::signing::{decode_public_key, signing_string, verify_signature};

/// A fixed agent key (a test key: it protects nothing).
const SEED: [u8; 32] = [7; 32];

#[derive(Arbitrary, Debug)]
struct Request<'a> {
    agent: &'a str,
    method: &'a str,
    path: &'a str,
    /// The timestamp header as sent (the broker parses it as Unix milliseconds).
    timestamp: &'a str,
    nonce: &'a str,
    body: &'a [u8],
    /// The signature header as sent.
    signature: &'a str,
    /// An enrolled public key as text (base64url of 32 bytes).
    public_key: &'a str,
    /// Which field a tampered copy of a genuine request changes.
    tamper: u8,
}

fuzz_target!(|r: Request<'_>| {
    let key = Ed25519KeyPair::from_seed_unchecked(&SEED).unwrap();
    let public = key.public_key().as_ref().to_vec();
    if let Ok(bytes) = decode_public_key(r.public_key) {
        assert_eq!(bytes.len(), 32);
        assert_eq!(
            URL_SAFE_NO_PAD.encode(&bytes),
            r.public_key.trim_end_matches('=')
        );
    }
    let Ok(timestamp_ms) = r.timestamp.parse::<i64>() else {
        return;
    };
    let message = signing_string(r.agent, r.method, r.path, timestamp_ms, r.nonce, r.body);
    // A signature header the fuzzer wrote verifies only if it is the key's own signature.
    if verify_signature(&public, &message, r.signature) {
        let genuine = URL_SAFE_NO_PAD.encode(key.sign(message.as_bytes()).as_ref());
        let decoded = URL_SAFE_NO_PAD.decode(r.signature).unwrap();
        assert_eq!(
            URL_SAFE_NO_PAD.encode(decoded),
            genuine,
            "forged {:?}",
            r.signature
        );
    }
    // A genuine signature verifies, and stops verifying when any signed field changes.
    let genuine = URL_SAFE_NO_PAD.encode(key.sign(message.as_bytes()).as_ref());
    assert!(verify_signature(&public, &message, &genuine));
    let mut body = r.body.to_vec();
    let (agent, method, path, mut ts, nonce) = (
        format!("{}x", r.agent),
        format!("{}X", r.method),
        format!("{}/", r.path),
        timestamp_ms,
        format!("{}0", r.nonce),
    );
    let tampered = match r.tamper % 6 {
        0 => signing_string(&agent, r.method, r.path, timestamp_ms, r.nonce, r.body),
        1 => signing_string(r.agent, &method, r.path, timestamp_ms, r.nonce, r.body),
        2 => signing_string(r.agent, r.method, &path, timestamp_ms, r.nonce, r.body),
        3 => {
            ts = ts.wrapping_add(1);
            signing_string(r.agent, r.method, r.path, ts, r.nonce, r.body)
        }
        4 => signing_string(r.agent, r.method, r.path, timestamp_ms, &nonce, r.body),
        _ => {
            body.push(b'!');
            signing_string(r.agent, r.method, r.path, timestamp_ms, r.nonce, &body)
        }
    };
    assert_ne!(tampered, message);
    assert!(!verify_signature(&public, &tampered, &genuine));
});
