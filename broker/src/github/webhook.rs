//! `POST /api/v1/github/webhook`: GitHub's deliveries, verified before anything reads them.
//!
//! The extractor reads at most [`MAX_WEBHOOK_BYTES`], checks `X-Hub-Signature-256` (an
//! HMAC-SHA256 of the body under the App's webhook secret, compared in constant time by
//! `ring::hmac::verify`), and only then looks at the event. The handler stores the delivery in
//! the queue and answers `202` at once; a redelivery (the same `X-GitHub-Delivery`) is answered
//! `200` and does nothing. Events the App does not act on are stored all the same and
//! acknowledged: GitHub must never see a 5xx for a payload it sent.

use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use secrecy::ExposeSecret as _;
use testbot_proto::now_ms;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::github::NewDelivery;

/// The largest delivery accepted. GitHub caps payloads at 25 MB; a push of many commits is
/// the largest an App sees, and stays far below this.
pub const MAX_WEBHOOK_BYTES: usize = 8 * 1024 * 1024;

/// The route, under `/api/v1`.
pub const WEBHOOK_PATH: &str = "/github/webhook";

/// A delivery whose signature matched.
#[derive(Debug)]
pub struct VerifiedDelivery {
    pub id: String,
    pub event: String,
    pub body: Bytes,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Checks `X-Hub-Signature-256` (`sha256=<hex>`) against `body`.
pub fn verify_signature(secret: &[u8], body: &[u8], signature: Option<&str>) -> Result<(), String> {
    let Some(signature) = signature else {
        return Err(
            "the delivery has no X-Hub-Signature-256 header: set the webhook secret in \
                    the App's settings to the broker's, or the request is not from GitHub"
                .into(),
        );
    };
    let Some(hex_digest) = signature.strip_prefix("sha256=") else {
        return Err("X-Hub-Signature-256 must read sha256=<hex digest>".into());
    };
    let Ok(digest) = hex::decode(hex_digest) else {
        return Err("X-Hub-Signature-256 is not a hex digest".into());
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, body, &digest).map_err(|_| {
        "X-Hub-Signature-256 does not match the body: the webhook secret differs from the \
         broker's (was it rotated?), or the body was changed"
            .to_string()
    })
}

impl FromRequest<AppState> for VerifiedDelivery {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let Some(app) = state.github_app.as_ref() else {
            return Err(ApiError::NotFound(
                "the GitHub App is not set up on this broker (--github-app-id)".into(),
            ));
        };
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, MAX_WEBHOOK_BYTES)
            .await
            .map_err(|_| {
                ApiError::PayloadTooLarge(format!(
                    "a webhook delivery may be at most {MAX_WEBHOOK_BYTES} bytes"
                ))
            })?;
        let secret = app
            .client
            .credentials()
            .webhook_secret
            .expose_secret()
            .as_bytes();
        verify_signature(secret, &body, header(&parts.headers, "x-hub-signature-256"))
            .map_err(ApiError::Unauthorized)?;
        let event = header(&parts.headers, "x-github-event")
            .filter(|e| !e.is_empty() && e.len() <= 64)
            .ok_or_else(|| {
                ApiError::BadRequest("the delivery has no X-GitHub-Event header".into())
            })?
            .to_string();
        let id = header(&parts.headers, "x-github-delivery")
            .filter(|id| {
                !id.is_empty()
                    && id.len() <= 128
                    && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
            .ok_or_else(|| {
                ApiError::BadRequest("the delivery has no valid X-GitHub-Delivery header".into())
            })?
            .to_string();
        Ok(VerifiedDelivery { id, event, body })
    }
}

/// Stores a verified delivery for the consumer; `202` when queued, `200` for a redelivery.
pub async fn webhook_handler(
    State(state): State<AppState>,
    delivery: VerifiedDelivery,
) -> Result<Response, ApiError> {
    // The action, when the body is a JSON object that has one; anything else is still queued
    // (and ignored by the consumer), never refused.
    let action = serde_json::from_slice::<ActionOnly>(&delivery.body)
        .ok()
        .and_then(|a| a.action);
    let queued = state
        .store
        .queue_delivery(&NewDelivery {
            id: &delivery.id,
            event: &delivery.event,
            action: action.as_deref(),
            payload: &delivery.body,
            received_at_ms: now_ms(),
        })
        .await?;
    if let Some(app) = &state.github_app {
        app.deliveries.notify_one();
    }
    tracing::info!(
        delivery = %delivery.id,
        event = %delivery.event,
        action = action.as_deref().unwrap_or(""),
        queued,
        "Webhook delivery received."
    );
    let (status, message) = if queued {
        (StatusCode::ACCEPTED, "queued")
    } else {
        (StatusCode::OK, "already received; nothing more to do")
    };
    Ok((
        status,
        axum::Json(serde_json::json!({ "delivery": delivery.id, "status": message })),
    )
        .into_response())
}

#[derive(serde::Deserialize)]
struct ActionOnly {
    #[serde(default)]
    action: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's documented test vector.
    #[test]
    fn the_signature_check_matches_githubs_test_vector() {
        let secret = b"It's a Secret to Everybody";
        let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(
            verify_signature(secret, b"Hello, World!", Some(good)),
            Ok(())
        );
        let err = verify_signature(secret, b"Hello, World?", Some(good)).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        let err = verify_signature(b"another secret", b"Hello, World!", Some(good)).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        assert!(
            verify_signature(secret, b"x", None)
                .unwrap_err()
                .contains("no X-Hub-Signature-256")
        );
        assert!(
            verify_signature(secret, b"x", Some("sha1=00"))
                .unwrap_err()
                .contains("sha256=")
        );
        assert!(
            verify_signature(secret, b"x", Some("sha256=zz"))
                .unwrap_err()
                .contains("hex")
        );
    }
}
