//! Sites and agent enrollment.
//!
//! A site is one place that runs jobs (an HPC centre, a cloud account, a cluster) under one
//! policy. The operator creates it and issues enrollment tokens for it (expiring, limited uses).
//! An agent enrolls once with such a token and its own Ed25519 public key; afterwards it signs
//! every request (see [`crate::signing`]). Revoking an agent or its site takes effect on its next
//! request.

use serde::{Deserialize, Serialize};

use crate::agents::PolicySummary;

/// The body of `POST /api/v1/sites`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteRequest {
    /// 1-128 characters of `[A-Za-z0-9_.-]`.
    pub name: String,
}

/// A site as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    pub name: String,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<i64>,
}

/// The answer to `GET /api/v1/sites`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteList {
    pub sites: Vec<Site>,
}

/// The body of `POST /api/v1/sites/{name}/enrollment-tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentTokenRequest {
    /// How many agents may enroll with it. Default: 1.
    #[serde(default = "one")]
    pub uses: u32,
    /// How long it stays valid, in seconds. Default: one day.
    #[serde(default = "one_day")]
    pub ttl_secs: u64,
}

fn one() -> u32 {
    1
}
fn one_day() -> u64 {
    24 * 3600
}

impl Default for EnrollmentTokenRequest {
    fn default() -> Self {
        EnrollmentTokenRequest {
            uses: one(),
            ttl_secs: one_day(),
        }
    }
}

/// A fresh enrollment token: shown once, stored by the broker only as a hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub site: String,
    pub token: String,
    pub uses: u32,
    pub expires_at_ms: i64,
}

/// The body of `POST /api/v1/agent/enroll` (no Authorization header: the token is the proof).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub enrollment_token: String,
    /// The agent's name, unique within its site.
    pub name: String,
    /// The agent's Ed25519 public key, base64url without padding (32 bytes).
    pub public_key: String,
    /// What the agent's site policy accepts. None: the agent runs any job (a private fleet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySummary>,
}

/// The answer to a successful enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// The id to sign requests with.
    pub agent_id: String,
    pub site: String,
}

/// An enrolled agent as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub id: String,
    pub site: String,
    pub name: String,
    pub enrolled_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySummary>,
}

/// The answer to `GET /api/v1/agents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentList {
    pub agents: Vec<AgentInfo>,
}
