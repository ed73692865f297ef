//! The App's RS256 JWTs: signing (as an App does, with `ring`) and checking them by GitHub's
//! rules (`iss` is the App id, `exp` at most ten minutes after `iat`, not expired, `iat` not in
//! the future beyond a minute of clock drift).

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{self, RsaKeyPair};
use serde_json::{Value, json};

/// The fake App's private key (PKCS#1 PEM, as GitHub hands them out).
pub const APP_PRIVATE_KEY_PEM: &str = include_str!("../../fixtures/github/app-private-key.pem");
/// Its public key (PKCS#1 `RSA PUBLIC KEY` PEM), which the fake checks JWTs with.
pub const APP_PUBLIC_KEY_PEM: &str = include_str!("../../fixtures/github/app-public-key.pem");

/// The DER inside a PEM block.
pub fn pem_to_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    STANDARD
        .decode(body.trim())
        .expect("a PEM block holds base64")
}

/// An RS256 JWT for App `app_id`, issued at `iat` (Unix seconds) and expiring at `exp`, signed
/// with `private_key_pem` (PKCS#1 or PKCS#8).
pub fn sign_app_jwt(app_id: u64, private_key_pem: &str, iat: u64, exp: u64) -> String {
    let der = pem_to_der(private_key_pem);
    let key = RsaKeyPair::from_der(&der)
        .or_else(|_| RsaKeyPair::from_pkcs8(&der))
        .expect("an RSA private key");
    let header = URL_SAFE_NO_PAD.encode(json!({"alg": "RS256", "typ": "JWT"}).to_string());
    let claims = URL_SAFE_NO_PAD
        .encode(json!({"iat": iat, "exp": exp, "iss": app_id.to_string()}).to_string());
    let message = format!("{header}.{claims}");
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        message.as_bytes(),
        &mut signature,
    )
    .expect("RS256 signing works");
    format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// A JWT as an App makes it now: issued a minute ago (GitHub's advice against clock drift),
/// expiring in nine minutes.
pub fn app_jwt_now(app_id: u64, private_key_pem: &str) -> String {
    let now = unix_now();
    sign_app_jwt(app_id, private_key_pem, now - 60, now + 9 * 60)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// Checks `jwt` as GitHub checks an App's JWT; the error is GitHub's message.
pub fn verify_app_jwt(jwt: &str, app_id: u64, public_key_der: &[u8]) -> Result<(), String> {
    const UNDECODABLE: &str = "A JSON web token could not be decoded";
    let mut parts = jwt.split('.');
    let (Some(header), Some(claims), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(UNDECODABLE.into());
    };
    let decode = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| UNDECODABLE.to_string())
    };
    let header: Value =
        serde_json::from_slice(&decode(header)?).map_err(|_| UNDECODABLE.to_string())?;
    if header["alg"] != "RS256" {
        return Err(UNDECODABLE.into());
    }
    let signature_bytes = decode(sig)?;
    let message = &jwt[..jwt.len() - sig.len() - 1];
    signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, public_key_der)
        .verify(message.as_bytes(), &signature_bytes)
        .map_err(|_| UNDECODABLE.to_string())?;
    let claims: Value =
        serde_json::from_slice(&decode(claims)?).map_err(|_| UNDECODABLE.to_string())?;
    let issuer = match &claims["iss"] {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    };
    if issuer != Some(app_id) {
        return Err("'Issuer' claim ('iss') must be an Integer".into());
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
        return Err(
            "Missing 'issued at' time claim ('iat') or 'expiration time' claim ('exp')".into(),
        );
    };
    let now = unix_now();
    if iat > now + 60 {
        return Err(
            "'Issued at' claim ('iat') must be an Integer representing a time in the past".into(),
        );
    }
    if exp <= now {
        return Err("'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion expires".into());
    }
    if exp > iat + 600 {
        return Err("'Expiration time' claim ('exp') is too far in the future".into());
    }
    Ok(())
}
