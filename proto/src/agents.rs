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
    /// The submitting workflow's GitHub OIDC token, for the agent to verify itself before it
    /// runs anything. None for jobs an operator submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc_token: Option<String>,
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

/// What an agent's site policy accepts, advertised at enrollment and on every poll so the broker
/// routes to the agent only jobs its site would take. It is a routing hint: the agent still
/// verifies every job's token and applies its full policy before running anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySummary {
    /// Repository globs (`owner/*`, `owner/name`) some rule allows.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// Executors the site allows, with their caps.
    #[serde(default)]
    pub executors: Vec<ExecutorCaps>,
}

/// One allowed executor and the most a job may ask of it. `None` means no cap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorCaps {
    /// `shell`, `slurm`, `docker`, `podman`, `kubernetes`.
    pub executor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_gpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_time_secs: Option<u64>,
    /// Image globs allowed (container and Kubernetes executors); empty: no images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// Slurm partitions allowed; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<String>,
}
