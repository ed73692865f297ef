//! The agent side of the protocol: poll → start → log → finish, heartbeat separately.
//!
//! An agent only dials out. Its poll is a long poll: the broker holds it open until a matching job
//! is queued (answering at once when one is) or the wait runs out (`204 No Content`). A claimed
//! job comes with a lease the agent renews with heartbeats; every later call names the lease, and
//! a call under a lease the broker no longer honours gets `409 lease_lost`.

use serde::{Deserialize, Serialize};

use crate::jobs::{JobId, JobSpec};

/// The body of `POST /api/v1/agent/poll`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollRequest {
    /// The agent's name, unique in the fleet (a label-like string).
    pub agent: String,
    /// Labels the agent offers; a job runs only on an agent having all of the job's labels.
    #[serde(default)]
    pub labels: Vec<String>,
    /// The executor this agent runs jobs with (`shell`, `noop`, ...).
    pub executor: String,
    /// How long the broker may hold the poll open, in milliseconds. Default and maximum: the
    /// broker's poll timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// A job handed to an agent: the answer to a successful poll.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    pub job_id: JobId,
    /// 1 for the first claim of the job, 2 after one requeue, and so on.
    pub attempt: u32,
    /// The lease token; every later call about this job names it.
    pub lease: String,
    /// The lease lasts this long after the claim and after each heartbeat.
    pub lease_ttl_ms: u64,
    /// How often the agent should send a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// The job's log already holds this many bytes (from earlier attempts); append after them.
    pub log_offset: u64,
    pub spec: JobSpec,
}

/// The body of `start` and `heartbeat` calls.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub lease: String,
    /// For heartbeats: the broker may hold the answer this long, returning early when the job is
    /// cancelled. Default 0 (answer at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

/// The answer to `start` and `heartbeat`: the lease was renewed; stop the job if asked to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseStatus {
    pub cancel_requested: bool,
    pub lease_ttl_ms: u64,
}
