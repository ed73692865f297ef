//! The JSON error envelope: `{ "error": { "code": "...", "message": "..." } }`.

use serde::{Deserialize, Serialize};

/// The body of every non-2xx response from the broker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A machine-readable `code` to branch on and a human `message` that names the problem.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

/// Codes the broker uses; clients branch on these.
pub mod codes {
    pub const BAD_REQUEST: &str = "bad_request";
    pub const INVALID_JSON: &str = "invalid_json";
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const FORBIDDEN: &str = "forbidden";
    pub const NOT_FOUND: &str = "not_found";
    pub const LEASE_LOST: &str = "lease_lost";
    pub const CONFLICT: &str = "conflict";
    pub const LOG_GAP: &str = "log_gap";
    pub const LOG_TOO_LARGE: &str = "log_too_large";
    pub const INTERNAL: &str = "internal";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const UNPROCESSABLE: &str = "unprocessable";
    /// 429: a queue quota is full; submit again once some of the queued jobs have run.
    pub const QUOTA_EXCEEDED: &str = "quota_exceeded";
    /// 401: the agent (or its site) was revoked or is not enrolled; it must stop its jobs.
    pub const AGENT_REVOKED: &str = "agent_revoked";
    /// 408: the request did not arrive or was not answered within the broker's request timeout.
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
}
