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
    /// What the agent's site policy accepts; only such jobs are handed to it. None: the agent
    /// has no site policy and takes any job (a private fleet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySummary>,
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
    /// When the broker accepted the job (Unix milliseconds). The agent checks the token's
    /// lifetime at this time, within its site's `oidc.max_queue_age` of now, since a job may wait
    /// in the queue far longer than a token lives. None (older brokers): checked at now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at_ms: Option<i64>,
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
    /// Bytes of the job's log the broker holds (where a resumed agent continues it).
    #[serde(default)]
    pub log_bytes: u64,
}

/// The body of `POST /api/v1/agent/jobs/{id}/metadata`: a fact about the job (a key of
/// `[a-z0-9_]`, at most 64 bytes; a value of at most 1 KiB), such as its Slurm job id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataRequest {
    pub lease: String,
    pub key: String,
    pub value: String,
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

impl PolicySummary {
    /// Whether a job of `repository` (None: submitted by an operator) with `spec` fits this
    /// summary, and if not, why. `agent_executor` is the executor a job that names none gets;
    /// None: any executor of the site may take it.
    pub fn admits(
        &self,
        repository: Option<&str>,
        spec: &JobSpec,
        agent_executor: Option<&str>,
    ) -> Result<(), String> {
        let Some(repository) = repository else {
            return Err(
                "the job has no workflow identity (OIDC token), which this site requires".into(),
            );
        };
        if !crate::glob::any_match(&self.repositories, repository) {
            return Err(format!("repository {repository} is not allowed"));
        }
        let Some(executor) = spec.executor.as_deref().or(agent_executor) else {
            // Any executor will do: the first refusal explains if none does.
            let mut first_refusal = None;
            for caps in &self.executors {
                match caps.admits(spec) {
                    Ok(()) => return Ok(()),
                    Err(why) => {
                        first_refusal.get_or_insert(why);
                    }
                }
            }
            return Err(first_refusal.unwrap_or_else(|| "the site allows no executor".into()));
        };
        let Some(caps) = self.executors.iter().find(|c| c.executor == executor) else {
            return Err(format!("executor {executor} is not allowed"));
        };
        caps.admits(spec)
    }
}

impl ExecutorCaps {
    /// Whether a job's resources, image and time limit fit these caps, and if not, why.
    pub fn admits(&self, spec: &JobSpec) -> Result<(), String> {
        let r = &spec.resources;
        let over = |what: &str, asked: u64, cap: Option<u64>| match cap {
            Some(cap) if asked > cap => Err(format!(
                "{what} {asked} is over the cap of {cap} for executor {}",
                self.executor
            )),
            _ => Ok(()),
        };
        over(
            "resources.cpus",
            r.cpus.unwrap_or(0).into(),
            self.max_cpus.map(u64::from),
        )?;
        over(
            "resources.memory_mib",
            r.memory_mib.unwrap_or(0),
            self.max_memory_mib,
        )?;
        over(
            "resources.gpus",
            r.gpus.unwrap_or(0).into(),
            self.max_gpus.map(u64::from),
        )?;
        over(
            "timeout_secs",
            spec.timeout_secs.unwrap_or(0),
            self.max_time_secs,
        )?;
        if let Some(partition) = &r.partition
            && !self.partitions.is_empty()
            && !self.partitions.contains(partition)
        {
            return Err(format!(
                "partition {partition} is not in allowed partitions [{}]",
                self.partitions.join(", ")
            ));
        }
        if let Some(image) = &spec.image
            && !crate::glob::any_match(&self.images, image)
        {
            return Err(format!(
                "image {image} is not in allowed images [{}]",
                self.images.join(", ")
            ));
        }
        Ok(())
    }
}
