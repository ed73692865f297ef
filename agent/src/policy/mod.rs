//! The site policy: the HPC admin's TOML file that says which workflows may run jobs on this
//! site, with which executors, within which caps, and as which local account. The agent applies
//! it to every job after verifying the job's OIDC token, whatever the broker says.
//!
//! ```toml
//! max_concurrent_jobs = 4
//! max_runtime = "6h"
//! env_allow = ["OMP_NUM_THREADS"]
//!
//! [oidc]
//! audience = "https://testbot.example.org"
//!
//! [executors.slurm]
//! max_cpus = 32
//! max_memory = "64G"
//! partitions = ["ci"]
//!
//! [identity]
//! default_account = "testbot-ci"
//!
//! [[rules]]
//! name = "main-branch"
//! repositories = ["my-org/*"]
//! refs = ["refs/heads/main"]
//! ```
//!
//! A job is allowed when one rule matches all of its claims (repository, ref, event, workflow,
//! actor, environment, executor), what it asks for is within its executor's caps, every
//! environment variable it sets is in `env_allow`, and `[identity]` maps it to an account.
//! `docs/site-policy.md` is the admin's reference.
//!
//! Layout:
//! - [`settings`]: the file's tables, as serde reads them.
//! - `validate`: checks across values, after parsing.
//! - [`PolicyError`]: placed at `LINE:COL`, with "did you mean" suggestions
//!   ([`testbot_proto::toml_errors`], shared with the repository config).

pub mod settings;
mod validate;

use std::fmt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;
use testbot_proto::agents::{ExecutorCaps, PolicySummary, RuleSummary};
use testbot_proto::glob::{any_match, glob_match};
use testbot_proto::jobs::{JobSpec, Resources};
use testbot_proto::oidc::{OidcSettings, WorkflowClaims};

use crate::identity::{self, AccountChoice, IdentitySettings, LocalAccount};
use settings::{ExecutorLimits, ExecutorName, Executors, OidcPolicy, Rule};
pub use settings::{format_duration, format_mib};
/// What is wrong with a policy file, and where.
pub use testbot_proto::toml_errors::FileError as PolicyError;
pub use validate::GITHUB_EVENTS;

/// A validated site policy. Built only by [`SitePolicy::load`] and [`SitePolicy::parse`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SitePolicy {
    /// How many jobs this site runs at once. Default: 1.
    #[serde(default = "default_max_concurrent_jobs")]
    max_concurrent_jobs: usize,
    /// The longest any job may run, whatever its executor allows. Default: `6h`.
    #[serde(
        default = "default_max_runtime",
        deserialize_with = "settings::de_duration"
    )]
    max_runtime: Duration,
    /// Globs of environment variable names a job may set (`OMP_NUM_THREADS`, `MY_*`).
    /// Default: none (a job that sets any variable is refused).
    #[serde(default)]
    env_allow: Vec<String>,
    /// Which tokens are accepted. Required (for `audience`).
    oidc: OidcPolicy,
    /// GitHub App jobs: which events, and the credentials the agent checks them with.
    /// Default: none are taken.
    #[serde(default)]
    github: Option<settings::GitHubPolicy>,
    /// Which local account a job runs as. Default: no mapping (every job is refused).
    #[serde(default)]
    identity: IdentitySettings,
    /// The executors allowed and their caps. At least one is required.
    #[serde(default)]
    executors: Executors,
    /// Who may run jobs. At least one is required.
    #[serde(default)]
    rules: Vec<Rule>,
}

fn default_max_concurrent_jobs() -> usize {
    1
}
fn default_max_runtime() -> Duration {
    Duration::from_secs(6 * 3600)
}

/// Whether a job may run, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `rule` allows the job; it runs as the account `account` picks.
    Allow {
        rule: String,
        account: AccountChoice,
    },
    /// A sentence for the job's submitter naming what was refused and what is allowed.
    Deny { reason: String },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// One rule's verdict on a job's claims and executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleVerdict {
    pub rule: String,
    /// Why the rule does not allow the job; `None` when it does.
    pub denial: Option<String>,
}

/// Every rule's verdict and the decision: what `testbot-agent policy explain` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The executor the job was evaluated for (its own, or the agent's).
    pub executor: String,
    pub rules: Vec<RuleVerdict>,
    pub decision: Decision,
}

impl SitePolicy {
    /// Reads and validates a policy file; errors read `FILE:LINE:COL: message`.
    pub fn load(path: &Path) -> anyhow::Result<SitePolicy> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("Cannot read the site policy {}", path.display()))?;
        SitePolicy::parse(&text).map_err(|err| match err.position {
            Some(_) => anyhow::anyhow!("{}:{err}", path.display()),
            None => anyhow::anyhow!("{}: {err}", path.display()),
        })
    }

    /// Parses and validates policy text.
    pub fn parse(text: &str) -> Result<SitePolicy, PolicyError> {
        let policy: SitePolicy =
            toml::from_str(text).map_err(|e| PolicyError::from_toml(text, &e))?;
        validate::validate(&policy).map_err(|e| PolicyError::at_path(text, &e.path, e.message))?;
        Ok(policy)
    }

    /// The issuer and audience the agent verifies job tokens against.
    pub fn oidc(&self) -> OidcSettings {
        OidcSettings {
            issuer: self.oidc.issuer.clone(),
            audience: self.oidc.audience.clone(),
        }
    }

    /// The `[github]` table, when the site takes GitHub App jobs.
    pub fn github(&self) -> Option<&settings::GitHubPolicy> {
        self.github.as_ref()
    }

    /// The longest a job may have waited in the broker's queue (`oidc.max_queue_age`).
    pub fn max_queue_age(&self) -> std::time::Duration {
        self.oidc.max_queue_age
    }

    /// How many jobs may run at once on this site.
    pub fn max_concurrent_jobs(&self) -> usize {
        self.max_concurrent_jobs
    }

    /// The longest any job may run.
    pub fn max_runtime(&self) -> Duration {
        self.max_runtime
    }

    /// Globs of the environment variable names a job may set.
    pub fn env_allow(&self) -> &[String] {
        &self.env_allow
    }

    /// The executors and their settings, for the executors to read.
    pub fn executors(&self) -> &Executors {
        &self.executors
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn identity(&self) -> &IdentitySettings {
        &self.identity
    }

    /// The time limit of a job allowed on `executor`: its own `timeout_secs`, capped by the
    /// executor's `max_time` and the site's `max_runtime`; the cap when it sets none.
    pub fn time_limit(&self, spec: &JobSpec, executor: &str) -> Duration {
        let cap = executor
            .parse()
            .ok()
            .and_then(|name| self.executors.limits(name))
            .and_then(|limits| limits.max_time)
            .map_or(self.max_runtime, |t| t.min(self.max_runtime));
        spec.timeout_secs
            .map(Duration::from_secs)
            .map_or(cap, |t| t.min(cap))
    }

    /// The resources a job allowed on `executor` runs with: what it asks for, and for CPUs and
    /// memory it leaves out, the executor's `default_cpus`/`default_memory`, else its cap. So a
    /// cap limits every job, not only those that ask: a job that asks for nothing must not get
    /// a container or pod without limits.
    pub fn resources(&self, spec: &JobSpec, executor: &str) -> Resources {
        let mut resources = spec.resources.clone();
        if let Some(limits) = executor
            .parse()
            .ok()
            .and_then(|name| self.executors.limits(name))
        {
            resources.cpus = resources.cpus.or(limits.default_cpus).or(limits.max_cpus);
            resources.memory_mib = resources
                .memory_mib
                .or(limits.default_memory_mib)
                .or(limits.max_memory_mib);
        }
        resources
    }

    /// Whether a job with these (verified) claims may run. `agent_executor` is the executor of a
    /// job that names none. This is what the site allows; whether this agent runs the executor
    /// the job names is for the caller to check.
    pub fn evaluate(
        &self,
        claims: &WorkflowClaims,
        spec: &JobSpec,
        agent_executor: &str,
    ) -> Decision {
        self.explain(claims, spec, agent_executor).decision
    }

    /// [`SitePolicy::evaluate`] with every rule's verdict.
    pub fn explain(
        &self,
        claims: &WorkflowClaims,
        spec: &JobSpec,
        agent_executor: &str,
    ) -> Explanation {
        let executor = spec.executor.as_deref().unwrap_or(agent_executor);
        let rules: Vec<RuleVerdict> = self
            .rules
            .iter()
            .map(|rule| RuleVerdict {
                rule: rule.name.clone(),
                denial: rule_denial(rule, claims, executor).err(),
            })
            .collect();
        let decision = self.decide(&rules, claims, spec, executor);
        Explanation {
            executor: executor.to_string(),
            rules,
            decision,
        }
    }

    fn decide(
        &self,
        verdicts: &[RuleVerdict],
        claims: &WorkflowClaims,
        spec: &JobSpec,
        executor: &str,
    ) -> Decision {
        let deny = |reason: String| Decision::Deny { reason };
        let Some(allowing) = verdicts.iter().find(|v| v.denial.is_none()) else {
            return deny(self.no_rule_reason(verdicts, claims));
        };
        if let Err(reason) = self.check_job(spec, executor) {
            return deny(reason);
        }
        match self.identity.choose(claims) {
            Err(reason) => deny(reason),
            Ok(Some(account)) => Decision::Allow {
                rule: allowing.rule.clone(),
                account,
            },
            Ok(None) => deny(format!(
                "no local account is mapped for actor {} of repository {}: the site's [identity] has no map entry for it and no default_account",
                claims.actor, claims.repository
            )),
        }
    }

    /// The reason to give when no rule allows a job: the verdicts of the rules that cover its
    /// repository, or that none does.
    fn no_rule_reason(&self, verdicts: &[RuleVerdict], claims: &WorkflowClaims) -> String {
        let relevant: Vec<String> = self
            .rules
            .iter()
            .zip(verdicts)
            .filter(|(rule, _)| any_match(&rule.repositories, &claims.repository))
            .filter_map(|(rule, verdict)| {
                let denial = verdict.denial.as_ref()?;
                Some(format!("{denial} (rule {:?})", rule.name))
            })
            .collect();
        match relevant.as_slice() {
            [] => format!(
                "repository {} is not allowed by any rule",
                claims.repository
            ),
            [one] => one.clone(),
            many => format!("no rule allows this job: {}", many.join("; ")),
        }
    }

    /// What the job asks for, against the executor's caps and the site's limits.
    fn check_job(&self, spec: &JobSpec, executor: &str) -> Result<(), String> {
        let configured = self.executors.configured();
        let (name, limits) = executor
            .parse::<ExecutorName>()
            .ok()
            .and_then(|name| Some((name, self.executors.limits(name)?)))
            .ok_or_else(|| {
                format!(
                    "executor {executor} is not configured at this site (configured: {})",
                    list(&configured)
                )
            })?;
        check_resources(spec, name, &limits)?;
        check_image(spec, name, &limits)?;
        if let Some(timeout) = spec.timeout_secs {
            let asked = Duration::from_secs(timeout);
            if let Some(max_time) = limits.max_time
                && asked > max_time
            {
                return Err(format!(
                    "timeout_secs {timeout} ({}) is over the cap of {} for executor {name}",
                    format_duration(asked),
                    format_duration(max_time)
                ));
            }
            if asked > self.max_runtime {
                return Err(format!(
                    "timeout_secs {timeout} ({}) is over the site's max_runtime of {}",
                    format_duration(asked),
                    format_duration(self.max_runtime)
                ));
            }
        }
        for variable in spec.env.keys() {
            if let Some(why) = validate::denied_env(variable) {
                return Err(format!(
                    "environment variable {variable} is never allowed at this site ({why}): a job must not change how the programs that start it behave"
                ));
            }
            if !any_match(&self.env_allow, variable) {
                return Err(format!(
                    "environment variable {variable} is not in the site's env_allow {}",
                    list(&self.env_allow)
                ));
            }
        }
        Ok(())
    }

    /// Which account a job with these claims runs as, resolved on this host: the identity script
    /// runs if the policy has one for these claims. Accounts that do not exist and root are
    /// refused. (With a [`Decision::Allow`] at hand, [`identity::resolve`] on its `account` does
    /// the same without choosing again.)
    pub async fn resolve_account(&self, claims: &WorkflowClaims) -> Result<LocalAccount, String> {
        let choice = self.identity.choose(claims)?.ok_or_else(|| {
            format!(
                "no local account is mapped for actor {} of repository {}",
                claims.actor, claims.repository
            )
        })?;
        identity::resolve(&choice, claims).await
    }

    /// What the agent advertises to the broker: the repositories some rule allows, the
    /// executors some rule allows with their caps, every rule with what it matches, `env_allow`
    /// and `max_concurrent_jobs`, so the broker does not offer jobs this site would refuse.
    /// What it cannot summarise (the identity mapping) the agent refuses by handing the job back.
    pub fn summary(&self) -> PolicySummary {
        let mut repositories: Vec<String> = Vec::new();
        for pattern in self.rules.iter().flat_map(|r| &r.repositories) {
            if !repositories.contains(pattern) {
                repositories.push(pattern.clone());
            }
        }
        let executors = self
            .executors
            .configured()
            .into_iter()
            .filter(|name| {
                self.rules
                    .iter()
                    .any(|r| r.executors.as_ref().is_none_or(|e| e.contains(name)))
            })
            .map(|name| {
                let limits = self.executors.limits(name).expect("configured");
                let max_time = limits
                    .max_time
                    .map_or(self.max_runtime, |t| t.min(self.max_runtime));
                ExecutorCaps {
                    executor: name.to_string(),
                    max_cpus: limits.max_cpus,
                    max_memory_mib: limits.max_memory_mib,
                    max_gpus: limits.max_gpus,
                    max_time_secs: Some(max_time.as_secs()),
                    images: limits.images.map(<[String]>::to_vec).unwrap_or_default(),
                    partitions: limits.partitions.to_vec(),
                    max_nodes: limits.max_nodes,
                    max_ntasks: limits.max_ntasks,
                    accounts: limits.accounts.to_vec(),
                    qos: limits.qos.to_vec(),
                    requires_image: limits.images.is_some() && limits.default_image.is_none(),
                }
            })
            .collect();
        let rules = self
            .rules
            .iter()
            .map(|rule| RuleSummary {
                name: rule.name.clone(),
                repositories: rule.repositories.clone(),
                refs: rule.refs.clone(),
                events: rule.events.clone(),
                workflows: rule.workflows.clone(),
                actors: rule.actors.clone(),
                environments: rule.environments.clone(),
                executors: rule
                    .executors
                    .as_ref()
                    .map(|e| e.iter().map(|name| name.as_str().to_string()).collect()),
            })
            .collect();
        PolicySummary {
            repositories,
            executors,
            rules,
            env_allow: Some(self.env_allow.clone()),
            max_concurrent_jobs: Some(u32::try_from(self.max_concurrent_jobs).unwrap_or(u32::MAX)),
            app_events: self
                .github
                .as_ref()
                .map(|github| github.accept.clone())
                .unwrap_or_default(),
        }
    }

    /// The executor of a job that names none when explaining without an agent: the first
    /// executor the first rule allows.
    pub fn first_allowed_executor(&self) -> ExecutorName {
        let configured = self.executors.configured();
        self.rules
            .first()
            .and_then(|rule| rule.executors.as_ref())
            .and_then(|e| e.first().copied())
            .unwrap_or(configured[0])
    }

    /// Problems of this host that would make jobs fail although the file is valid: accounts that
    /// do not exist or are root, an identity script that is missing or does not match its hash.
    /// Blocking (user database lookups).
    pub fn host_problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = Vec::new();
        for name in self.identity.named_accounts() {
            if let Err(e) = identity::lookup_account(name)
                && !problems.contains(&e)
            {
                problems.push(e);
            }
        }
        if let Some(script) = &self.identity.script
            && let Err(e) = identity::check_script(script)
        {
            problems.push(e);
        }
        problems
    }

    /// A few lines for `policy check`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let oidc = &self.oidc;
        out += &format!("oidc: issuer {}, audience {}\n", oidc.issuer, oidc.audience);
        if let Some(github) = &self.github {
            let credentials = match &github.token_file {
                Some(path) => format!("with the token in {}", path.display()),
                None => "without a token (public repositories only)".to_string(),
            };
            out += &format!(
                "github: App jobs of {} checked with {} {credentials}\n",
                list(&github.accept),
                github.api_url
            );
        }
        out += &format!(
            "limits: {} concurrent job(s), max runtime {}, env_allow {}\n",
            self.max_concurrent_jobs,
            format_duration(self.max_runtime),
            list(&self.env_allow)
        );
        for name in self.executors.configured() {
            let limits = self.executors.limits(name).expect("configured");
            out += &format!("executor {name}: {}\n", describe_limits(&limits));
        }
        for rule in &self.rules {
            out += &format!(
                "rule {:?}: repositories {}, refs {}, events {}, executors {}\n",
                rule.name,
                list(&rule.repositories),
                rule.refs.as_deref().map_or("any".into(), list),
                list(&rule.events),
                rule.executors.as_deref().map_or("any".into(), list),
            );
        }
        let identity = &self.identity;
        out += &format!(
            "identity: {} map entr{}, {}\n",
            identity.map.len(),
            if identity.map.len() == 1 { "y" } else { "ies" },
            match (&identity.script, &identity.default_account) {
                (Some(script), _) => format!("otherwise script {}", script.path.display()),
                (None, Some(account)) => format!("otherwise account {account}"),
                (None, None) => "unmapped jobs are refused".into(),
            }
        );
        out
    }
}

/// Why `rule` does not allow a job with these claims on `executor`; `Ok` if it does.
fn rule_denial(rule: &Rule, claims: &WorkflowClaims, executor: &str) -> Result<(), String> {
    if !any_match(&rule.repositories, &claims.repository) {
        return Err(format!(
            "repository {} is not in allowed repositories {}",
            claims.repository,
            list(&rule.repositories)
        ));
    }
    if let Some(ids) = &rule.repository_ids
        && !ids.iter().any(|id| id.to_string() == claims.repository_id)
    {
        return Err(format!(
            "repository {} has id {}, not one of the pinned repository_ids {}: the name may have passed to another repository (renamed, or deleted and created again)",
            claims.repository,
            claims.repository_id,
            list(ids)
        ));
    }
    if let Some(ids) = &rule.repository_owner_ids {
        let owner_id = claims.repository_owner_id.as_deref();
        if !ids
            .iter()
            .any(|id| Some(id.to_string().as_str()) == owner_id)
        {
            return Err(format!(
                "owner {} of repository {} has id {}, not one of the pinned repository_owner_ids {}: the name may have passed to another account",
                claims.repository_owner,
                claims.repository,
                owner_id.unwrap_or("none (the token carries no repository_owner_id)"),
                list(ids)
            ));
        }
    }
    if let Some(refs) = &rule.refs
        && !any_match(refs, &claims.git_ref)
    {
        return Err(format!(
            "ref {} is not in allowed refs {}",
            claims.git_ref,
            list(refs)
        ));
    }
    if !rule.events.contains(&claims.event_name) {
        // `pull_request_target` runs a base-branch workflow with the base's secrets on a
        // pull request's code: a classic way in, so it is never allowed by default.
        if claims.event_name == "pull_request_target" {
            return Err(
                "event pull_request_target is not allowed: name it in a rule's events to allow it"
                    .into(),
            );
        }
        return Err(format!(
            "event {} is not in allowed events {}",
            claims.event_name,
            list(&rule.events)
        ));
    }
    if let Some(workflows) = &rule.workflows
        && !any_match(workflows, &claims.job_workflow_ref)
    {
        return Err(format!(
            "workflow {} is not in allowed workflows {}",
            claims.job_workflow_ref,
            list(workflows)
        ));
    }
    if let Some(actors) = &rule.actors
        && !any_match(actors, &claims.actor)
    {
        return Err(format!(
            "actor {} is not in allowed actors {}",
            claims.actor,
            list(actors)
        ));
    }
    if let Some(environments) = &rule.environments {
        // GitHub environment names are case-insensitive.
        let matches = |env: &str| {
            let env = env.to_lowercase();
            environments
                .iter()
                .any(|p| glob_match(&p.to_lowercase(), &env))
        };
        match &claims.environment {
            None => {
                return Err(format!(
                    "the job has no GitHub environment; allowed environments are {}",
                    list(environments)
                ));
            }
            Some(env) if !matches(env) => {
                return Err(format!(
                    "environment {env} is not in allowed environments {}",
                    list(environments)
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(executors) = &rule.executors
        && !executors.iter().any(|e| e.as_str() == executor)
    {
        return Err(format!(
            "executor {executor} is not in allowed executors {}",
            list(executors)
        ));
    }
    Ok(())
}

fn check_resources(
    spec: &JobSpec,
    name: ExecutorName,
    limits: &ExecutorLimits<'_>,
) -> Result<(), String> {
    let r = &spec.resources;
    let counts = [
        ("cpus", r.cpus, limits.max_cpus),
        ("gpus", r.gpus, limits.max_gpus),
        ("nodes", r.nodes, limits.max_nodes),
        ("ntasks", r.ntasks, limits.max_ntasks),
    ];
    for (field, asked, cap) in counts {
        if let (Some(asked), Some(cap)) = (asked, cap)
            && asked > cap
        {
            return Err(format!(
                "resources.{field} {asked} is over the cap of {cap} for executor {name}"
            ));
        }
    }
    if let (Some(asked), Some(cap)) = (r.memory_mib, limits.max_memory_mib)
        && asked > cap
    {
        return Err(format!(
            "resources.memory_mib {asked} ({}) is over the cap of {} for executor {name}",
            format_mib(asked),
            format_mib(cap)
        ));
    }
    let allowlists = [
        ("partition", "partitions", &r.partition, limits.partitions),
        ("account", "accounts", &r.account, limits.accounts),
        ("qos", "qos", &r.qos, limits.qos),
    ];
    for (field, plural, asked, allowed) in allowlists {
        if let Some(asked) = asked
            && !allowed.is_empty()
            && !allowed.contains(asked)
        {
            return Err(format!(
                "resources.{field} {asked} is not in allowed {plural} {} for executor {name}",
                list(allowed)
            ));
        }
    }
    Ok(())
}

fn check_image(
    spec: &JobSpec,
    name: ExecutorName,
    limits: &ExecutorLimits<'_>,
) -> Result<(), String> {
    match (limits.images, &spec.image) {
        (None, None) => Ok(()),
        (None, Some(image)) => Err(format!(
            "image {image} was asked for, but executor {name} does not run container images"
        )),
        (Some(allowed), None) if limits.default_image.is_none() => Err(format!(
            "executor {name} runs container images: the job must name one of {}",
            list(allowed)
        )),
        (Some(_), None) => Ok(()),
        (Some(allowed), Some(image)) if !any_match(allowed, image) => Err(format!(
            "image {image} is not in allowed images {} for executor {name}",
            list(allowed)
        )),
        (Some(_), Some(_)) => Ok(()),
    }
}

fn describe_limits(limits: &ExecutorLimits<'_>) -> String {
    let mut parts = Vec::new();
    let cap = |v: Option<String>| v.unwrap_or_else(|| "no cap".into());
    parts.push(format!(
        "cpus {}",
        cap(limits.max_cpus.map(|v| v.to_string()))
    ));
    parts.push(format!(
        "memory {}",
        cap(limits.max_memory_mib.map(format_mib))
    ));
    if let Some(cpus) = limits.default_cpus {
        parts.push(format!("default cpus {cpus}"));
    }
    if let Some(memory) = limits.default_memory_mib {
        parts.push(format!("default memory {}", format_mib(memory)));
    }
    parts.push(format!(
        "gpus {}",
        cap(limits.max_gpus.map(|v| v.to_string()))
    ));
    parts.push(format!(
        "time {}",
        limits
            .max_time
            .map_or("the site's max runtime".into(), format_duration)
    ));
    if !limits.partitions.is_empty() {
        parts.push(format!("partitions {}", list(limits.partitions)));
    }
    if !limits.accounts.is_empty() {
        parts.push(format!("accounts {}", list(limits.accounts)));
    }
    if let Some(images) = limits.images {
        parts.push(format!("images {}", list(images)));
    }
    parts.join(", ")
}

impl fmt::Display for Explanation {
    /// One line per rule, then the decision: `allowed by rule "x"; ...` or `denied: REASON`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for verdict in &self.rules {
            match &verdict.denial {
                None => writeln!(f, "rule {:?}: allows it", verdict.rule)?,
                Some(why) => writeln!(f, "rule {:?}: denied: {why}", verdict.rule)?,
            }
        }
        match &self.decision {
            Decision::Allow { rule, account } => write!(
                f,
                "allowed by rule {rule:?} on executor {}; runs as {account}",
                self.executor
            ),
            Decision::Deny { reason } => write!(f, "denied: {reason}"),
        }
    }
}

/// A list as messages show it: `[a, b]`.
pub(crate) fn list<T: fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("[{}]", items.join(", "))
}

/// Reads claims from JSON: the bare claims object, or `{"header": ..., "payload": {claims}}` as
/// a decoded token is often shown.
pub fn claims_from_json(text: &str) -> Result<WorkflowClaims, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let claims = match value.get("payload") {
        Some(payload) if payload.is_object() => payload.clone(),
        _ => value,
    };
    serde_json::from_value(claims).map_err(|e| format!("not a token's claims: {e}"))
}

/// Reads a job from JSON: a [`JobSpec`] whose `script` may be left out (`explain` does not run
/// it).
pub fn job_from_json(text: &str) -> Result<JobSpec, String> {
    let mut value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let object = value
        .as_object_mut()
        .ok_or("not a job: expected a JSON object")?;
    object
        .entry("script")
        .or_insert_with(|| serde_json::Value::String("true".into()));
    let spec: JobSpec = serde_json::from_value(value).map_err(|e| format!("not a job: {e}"))?;
    spec.validate()
        .map_err(|e| format!("not a valid job: {e}"))?;
    Ok(spec)
}

#[cfg(test)]
mod tests;
