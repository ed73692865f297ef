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
    /// has no site policy, and takes the jobs operators submit (and workflow jobs only with
    /// `workflow_jobs_without_policy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySummary>,
    /// For an agent without a site policy: it also takes workflow jobs, of any registered
    /// repository (its configuration's `allow_workflow_jobs_without_policy`). Default: false
    /// (operator jobs only). Ignored when `policy` is set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub workflow_jobs_without_policy: bool,
}

/// The body of `POST /api/v1/agent/jobs/{id}/release`: the agent will not run the job and hands
/// it back, so that another agent may take it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub lease: String,
    /// Why the job was not run, a sentence for the submitter.
    pub reason: String,
    pub kind: ReleaseKind,
}

/// Why an agent hands a job back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseKind {
    /// This agent refuses the job (its site policy, its executor, no local account): another
    /// agent may take it; when none could, the job ends `error` with the reason.
    Refused,
    /// The agent could not decide now (the issuer's key set could not be fetched, the network):
    /// the job is offered again shortly, to this agent too.
    Transient,
}

/// What the broker did with a released job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReleaseOutcome {
    /// The job's state now: `queued` (handed back), or `error` when no agent could run it.
    pub state: crate::jobs::JobState,
    /// The reason recorded on the job.
    pub reason: String,
}

/// The workflow identity of a job as routing sees it: the claims of its (verified) token that
/// a site policy's rules match on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobIdentity {
    pub repository: String,
    pub git_ref: String,
    pub event_name: String,
    pub job_workflow_ref: String,
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
}

impl From<&crate::oidc::WorkflowClaims> for JobIdentity {
    fn from(claims: &crate::oidc::WorkflowClaims) -> Self {
        JobIdentity {
            repository: claims.repository.clone(),
            git_ref: claims.git_ref.clone(),
            event_name: claims.event_name.clone(),
            job_workflow_ref: claims.job_workflow_ref.clone(),
            actor: claims.actor.clone(),
            environment: claims.environment.clone(),
        }
    }
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
    /// What made a job the GitHub App created, for the agent to verify with GitHub itself.
    /// None for workflow and operator jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<crate::provenance::Provenance>,
    /// When the broker accepted the job (Unix milliseconds). The agent checks the token's
    /// lifetime at this time, within its site's `oidc.max_queue_age` of now, since a job may wait
    /// in the queue far longer than a token lives. None (older brokers): checked at now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at_ms: Option<i64>,
    /// The job's place in its batch, when it is a run of one (`TESTBOT_BATCH_RUN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<crate::batches::BatchPlace>,
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
/// verifies every job's token and applies its full policy before running anything. It can only
/// narrow what the agent is sent: the broker never sends a job outside the agent's enrolled site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySummary {
    /// Repository globs (`owner/*`, `owner/name`) some rule allows.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// Executors the site allows, with their caps.
    #[serde(default)]
    pub executors: Vec<ExecutorCaps>,
    /// The policy's rules, each with what it matches; a job fits when one rule matches all of
    /// its claims. Empty (an agent older than this field): only `repositories` is matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSummary>,
    /// Globs of the environment variable names a job may set. None (an older agent): not
    /// checked by routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_allow: Option<Vec<String>>,
    /// How many jobs the site runs at once, over all its agents. None: no cap at the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_jobs: Option<u32>,
    /// The GitHub App events whose jobs the site takes (its policy's `[github] accept`).
    /// Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub app_events: Vec<String>,
}

/// One rule of a site policy, as routing matches it. `None` fields match anything, as in the
/// policy file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSummary {
    pub name: String,
    /// Repository globs.
    pub repositories: Vec<String>,
    /// Git ref globs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refs: Option<Vec<String>>,
    /// Event names, exact.
    pub events: Vec<String>,
    /// `job_workflow_ref` globs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflows: Option<Vec<String>>,
    /// Actor login globs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actors: Option<Vec<String>>,
    /// Environment globs, case-insensitive; a job without an environment does not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environments: Option<Vec<String>>,
    /// Executors the rule allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executors: Option<Vec<String>>,
}

impl RuleSummary {
    /// Why this rule does not match a job of `identity` on `executor`; `Ok` when it does.
    pub fn matches(&self, identity: &JobIdentity, executor: &str) -> Result<(), String> {
        use crate::glob::{any_match, glob_match};
        let list = |items: &[String]| format!("[{}]", items.join(", "));
        if !any_match(&self.repositories, &identity.repository) {
            return Err(format!(
                "repository {} is not in allowed repositories {}",
                identity.repository,
                list(&self.repositories)
            ));
        }
        if let Some(refs) = &self.refs
            && !any_match(refs, &identity.git_ref)
        {
            return Err(format!(
                "ref {} is not in allowed refs {}",
                identity.git_ref,
                list(refs)
            ));
        }
        if !self.events.contains(&identity.event_name) {
            return Err(format!(
                "event {} is not in allowed events {}",
                identity.event_name,
                list(&self.events)
            ));
        }
        if let Some(workflows) = &self.workflows
            && !any_match(workflows, &identity.job_workflow_ref)
        {
            return Err(format!(
                "workflow {} is not in allowed workflows {}",
                identity.job_workflow_ref,
                list(workflows)
            ));
        }
        if let Some(actors) = &self.actors
            && !any_match(actors, &identity.actor)
        {
            return Err(format!(
                "actor {} is not in allowed actors {}",
                identity.actor,
                list(actors)
            ));
        }
        if let Some(environments) = &self.environments {
            let env = identity.environment.as_deref().map(str::to_lowercase);
            let matched = env.as_deref().is_some_and(|env| {
                environments
                    .iter()
                    .any(|p| glob_match(&p.to_lowercase(), env))
            });
            if !matched {
                return Err(format!(
                    "environment {} is not in allowed environments {}",
                    identity.environment.as_deref().unwrap_or("(none)"),
                    list(environments)
                ));
            }
        }
        if let Some(executors) = &self.executors
            && !executors.iter().any(|e| e == executor)
        {
            return Err(format!(
                "executor {executor} is not in allowed executors {}",
                list(executors)
            ));
        }
        Ok(())
    }
}

/// One allowed executor and the most a job may ask of it. `None` means no cap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_nodes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ntasks: Option<u32>,
    /// Slurm accounts allowed; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<String>,
    /// Slurm QOS allowed; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qos: Vec<String>,
    /// A job must name an image (a container executor without a default image).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub requires_image: bool,
}

impl PolicySummary {
    /// Whether a job of `identity` (None: submitted by an operator) with `spec` fits this
    /// summary, and if not, why. `agent_executor` is the executor a job that names none gets;
    /// None: any executor of the site may take it.
    pub fn admits(
        &self,
        identity: Option<&JobIdentity>,
        spec: &JobSpec,
        agent_executor: Option<&str>,
    ) -> Result<(), String> {
        let Some(identity) = identity else {
            return Err(
                "the job has no workflow identity (OIDC token), which this site requires".into(),
            );
        };
        let repository = identity.repository.as_str();
        if !crate::glob::any_match(&self.repositories, repository) {
            return Err(format!("repository {repository} is not allowed"));
        }
        let Some(executor) = spec.executor.as_deref().or(agent_executor) else {
            // Any executor will do: the first refusal explains if none does.
            let mut first_refusal = None;
            for caps in &self.executors {
                match self.admits_on(identity, spec, caps) {
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
        self.admits_on(identity, spec, caps)
    }

    /// Whether one rule admits the job on the executor of `caps`, within those caps and the
    /// site's `env_allow`.
    fn admits_on(
        &self,
        identity: &JobIdentity,
        spec: &JobSpec,
        caps: &ExecutorCaps,
    ) -> Result<(), String> {
        if !self.rules.is_empty() {
            let mut denials = Vec::new();
            let matched =
                self.rules
                    .iter()
                    .any(|rule| match rule.matches(identity, &caps.executor) {
                        Ok(()) => true,
                        Err(why) => {
                            if any_match_repo(rule, &identity.repository) {
                                denials.push(format!("{why} (rule {:?})", rule.name));
                            }
                            false
                        }
                    });
            if !matched {
                return Err(match denials.as_slice() {
                    [] => format!(
                        "repository {} is not allowed by any rule",
                        identity.repository
                    ),
                    [one] => one.clone(),
                    many => format!("no rule allows this job: {}", many.join("; ")),
                });
            }
        }
        caps.admits(spec)?;
        if let Some(env_allow) = &self.env_allow
            && let Some(variable) = spec
                .env
                .keys()
                .find(|v| !crate::glob::any_match(env_allow, v))
        {
            return Err(format!(
                "environment variable {variable} is not in the site's env_allow [{}]",
                env_allow.join(", ")
            ));
        }
        Ok(())
    }
}

fn any_match_repo(rule: &RuleSummary, repository: &str) -> bool {
    crate::glob::any_match(&rule.repositories, repository)
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
        over(
            "resources.nodes",
            r.nodes.unwrap_or(0).into(),
            self.max_nodes.map(u64::from),
        )?;
        over(
            "resources.ntasks",
            r.ntasks.unwrap_or(0).into(),
            self.max_ntasks.map(u64::from),
        )?;
        let allowlists = [
            ("partition", "partitions", &r.partition, &self.partitions),
            ("account", "accounts", &r.account, &self.accounts),
            ("qos", "qos", &r.qos, &self.qos),
        ];
        for (field, plural, asked, allowed) in allowlists {
            if let Some(asked) = asked
                && !allowed.is_empty()
                && !allowed.contains(asked)
            {
                return Err(format!(
                    "{field} {asked} is not in allowed {plural} [{}]",
                    allowed.join(", ")
                ));
            }
        }
        if self.requires_image && spec.image.is_none() {
            return Err(format!(
                "executor {} runs container images: the job must name one of [{}]",
                self.executor,
                self.images.join(", ")
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
