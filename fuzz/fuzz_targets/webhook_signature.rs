//! `X-Hub-Signature-256` of a webhook delivery: anyone can send one to the broker.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use testbot_broker::github::webhook::verify_signature;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    secret: &'a [u8],
    body: &'a [u8],
    header: Option<&'a str>,
    /// Also try the real signature, altered at this byte when `Some`.
    flip: Option<u8>,
}

fn real_header(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

fuzz_target!(|input: Input<'_>| {
    let real = real_header(input.secret, input.body);
    let accepted = verify_signature(input.secret, input.body, input.header).is_ok();
    if accepted {
        // The digest's hex may be written in either case; nothing else passes.
        let header = input.header.expect("accepted without a header");
        assert!(
            header.eq_ignore_ascii_case(&real) && header.starts_with("sha256="),
            "accepted {header:?}, the signature is {real:?}"
        );
    }
    assert!(verify_signature(input.secret, input.body, Some(&real)).is_ok());
    if let Some(flip) = input.flip {
        let mut forged = real.clone().into_bytes();
        let at = 7 + usize::from(flip) % 64;
        forged[at] = if forged[at] == b'0' { b'1' } else { b'0' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(verify_signature(input.secret, input.body, Some(&forged)).is_err());
    }
});
