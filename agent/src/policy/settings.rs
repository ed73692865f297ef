//! The tables of a site policy file, as serde reads them. Every table rejects unknown keys; every
//! default comes from a named function and is stated in the field's doc comment. Checks that need
//! more than one value (a rule naming an executor that is not configured, a default image outside
//! the allowlist) run after parsing, in `validate.rs`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// The `[oidc]` table: which tokens the agent accepts before it looks at any rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcPolicy {
    /// The exact `iss` of accepted tokens. Default: `https://token.actions.githubusercontent.com`
    /// (GitHub.com); GitHub Enterprise Server uses `https://HOST/_services/token`.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// The audience the token must be minted for: the broker's audience. Required.
    pub audience: String,
    /// How long a job may have waited in the broker's queue. The token's lifetime is checked at
    /// the time the broker accepted the job (GitHub's tokens live minutes, a queue can hold a job
    /// for hours); this caps how far back the broker may place that time. Default: `24h`.
    #[serde(default = "default_max_queue_age", deserialize_with = "de_duration")]
    pub max_queue_age: Duration,
}

fn default_issuer() -> String {
    testbot_proto::oidc::GITHUB_ISSUER.to_string()
}

fn default_max_queue_age() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// The `[github]` table: which GitHub App jobs the site takes, and how the agent checks each with
/// GitHub itself before it runs (see `crate::github`). Without it, App jobs are refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHubPolicy {
    /// The App events whose jobs the site takes: `push` (post-merge CI), `pull_request` (run
    /// when someone with write permission asks; a fork's only for the commit they name),
    /// `schedule` (a branch's head, on the config's cron).
    /// Required. Each job
    /// must also be allowed by a rule, which sees the event, the verified repository and ids,
    /// and the ref.
    pub accept: Vec<String>,
    /// GitHub's REST API. Default: `https://api.github.com`; GitHub Enterprise Server:
    /// `https://HOST/api/v3`.
    #[serde(default = "default_github_api_url")]
    pub api_url: String,
    /// Where repositories are fetched from: `{git_url}/OWNER/NAME.git`. Default:
    /// `https://github.com`.
    #[serde(default = "default_github_git_url")]
    pub git_url: String,
    /// A file with the site's own read-only GitHub token (a fine-grained token with
    /// "Contents: read" and "Metadata: read" on the repositories), for private repositories and
    /// a higher rate limit. Not the broker's, and never shown to jobs. Default: none (public
    /// repositories only).
    #[serde(default)]
    pub token_file: Option<std::path::PathBuf>,
}

fn default_github_api_url() -> String {
    "https://api.github.com".into()
}

fn default_github_git_url() -> String {
    "https://github.com".into()
}

/// The App events a site may accept.
pub const APP_EVENTS: &[&str] = &["push", "pull_request", "schedule"];

/// The executors a site allows, one table each. An executor without a table is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Executors {
    /// `[executors.shell]`: `bash` on the agent's host, as the job's local account.
    /// Default: not allowed.
    #[serde(default)]
    pub shell: Option<ShellSettings>,
    /// `[executors.slurm]`: batch jobs submitted with `sbatch`. Default: not allowed.
    #[serde(default)]
    pub slurm: Option<SlurmSettings>,
    /// `[executors.docker]`: containers on the Docker engine. Default: not allowed.
    #[serde(default)]
    pub docker: Option<ContainerSettings>,
    /// `[executors.podman]`: containers with podman. Default: not allowed.
    #[serde(default)]
    pub podman: Option<ContainerSettings>,
    /// `[executors.kubernetes]`: Kubernetes Jobs. Default: not allowed.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSettings>,
    /// `[executors.noop]`: runs nothing and reports success (for measuring). Default: not
    /// allowed.
    #[serde(default)]
    pub noop: Option<ShellSettings>,
}

/// The executors a policy knows, by the name jobs and agents use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorName {
    Shell,
    Slurm,
    Docker,
    Podman,
    Kubernetes,
    Noop,
}

impl ExecutorName {
    /// Every executor, in the order summaries list them.
    pub const ALL: [ExecutorName; 6] = [
        ExecutorName::Shell,
        ExecutorName::Slurm,
        ExecutorName::Docker,
        ExecutorName::Podman,
        ExecutorName::Kubernetes,
        ExecutorName::Noop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorName::Shell => "shell",
            ExecutorName::Slurm => "slurm",
            ExecutorName::Docker => "docker",
            ExecutorName::Podman => "podman",
            ExecutorName::Kubernetes => "kubernetes",
            ExecutorName::Noop => "noop",
        }
    }
}

impl fmt::Display for ExecutorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExecutorName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ExecutorName::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not an executor"))
    }
}

impl Executors {
    /// The configured executors, in [`ExecutorName::ALL`] order.
    pub fn configured(&self) -> Vec<ExecutorName> {
        ExecutorName::ALL
            .into_iter()
            .filter(|name| self.limits(*name).is_some())
            .collect()
    }

    /// What a job may ask of executor `name`; `None` if the site does not configure it.
    pub fn limits(&self, name: ExecutorName) -> Option<ExecutorLimits<'_>> {
        let basic = |s: &ShellSettings| ExecutorLimits {
            max_cpus: s.max_cpus,
            max_memory_mib: s.max_memory_mib,
            max_gpus: s.max_gpus,
            max_time: s.max_time,
            ..ExecutorLimits::default()
        };
        match name {
            ExecutorName::Shell => self.shell.as_ref().map(basic),
            ExecutorName::Noop => self.noop.as_ref().map(basic),
            ExecutorName::Slurm => self.slurm.as_ref().map(|s| ExecutorLimits {
                max_cpus: s.max_cpus,
                max_memory_mib: s.max_memory_mib,
                default_cpus: s.default_cpus,
                default_memory_mib: s.default_memory_mib,
                max_gpus: s.max_gpus,
                max_time: s.max_time,
                max_nodes: s.max_nodes,
                max_ntasks: s.max_ntasks,
                partitions: &s.partitions,
                accounts: &s.accounts,
                qos: &s.qos,
                ..ExecutorLimits::default()
            }),
            ExecutorName::Docker => self.docker.as_ref().map(ContainerSettings::limits),
            ExecutorName::Podman => self.podman.as_ref().map(ContainerSettings::limits),
            ExecutorName::Kubernetes => self.kubernetes.as_ref().map(|s| ExecutorLimits {
                max_cpus: s.max_cpus,
                max_memory_mib: s.max_memory_mib,
                default_cpus: s.default_cpus,
                default_memory_mib: s.default_memory_mib,
                max_gpus: s.max_gpus,
                max_time: s.max_time,
                images: Some(s.images.as_slice()),
                default_image: s.default_image.as_deref(),
                ..ExecutorLimits::default()
            }),
        }
    }
}

/// What a job may ask of one executor, whatever its kind. `None` caps and empty allowlists of
/// partitions, accounts and QOS mean "any".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExecutorLimits<'a> {
    pub max_cpus: Option<u32>,
    pub max_memory_mib: Option<u64>,
    /// What a job that asks for no CPUs or memory gets (before falling back to the caps).
    pub default_cpus: Option<u32>,
    pub default_memory_mib: Option<u64>,
    pub max_gpus: Option<u32>,
    pub max_time: Option<Duration>,
    pub max_nodes: Option<u32>,
    pub max_ntasks: Option<u32>,
    pub partitions: &'a [String],
    pub accounts: &'a [String],
    pub qos: &'a [String],
    /// Image globs, for executors that run images; `None` for those that do not.
    pub images: Option<&'a [String]>,
    pub default_image: Option<&'a str>,
}

/// `[executors.shell]` and `[executors.noop]`. The caps are checked against what a job asks for;
/// the shell executor itself does not confine a job to them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellSettings {
    /// Most CPU cores a job may ask for. Default: no cap.
    #[serde(default)]
    pub max_cpus: Option<u32>,
    /// Most memory a job may ask for: `"512M"`, `"64G"`, or a number of MiB. Default: no cap.
    #[serde(default, rename = "max_memory", deserialize_with = "de_opt_memory")]
    pub max_memory_mib: Option<u64>,
    /// Most GPUs a job may ask for. Default: no cap.
    #[serde(default)]
    pub max_gpus: Option<u32>,
    /// Longest time limit a job may ask for (`"30m"`, `"2h"`). Default: the site's
    /// `max_runtime`.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_time: Option<Duration>,
}

/// `[executors.slurm]`: caps, allowlists and the site's own `sbatch` arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSettings {
    /// Most CPU cores (`--cpus-per-task`) a job may ask for. Default: no cap.
    #[serde(default)]
    pub max_cpus: Option<u32>,
    /// Most memory (`--mem`) a job may ask for: `"512M"`, `"64G"`, or a number of MiB.
    /// Default: no cap.
    #[serde(default, rename = "max_memory", deserialize_with = "de_opt_memory")]
    pub max_memory_mib: Option<u64>,
    /// Most GPUs (`--gpus`) a job may ask for. Default: no cap.
    #[serde(default)]
    pub max_gpus: Option<u32>,
    /// Longest time limit (`--time`) a job may ask for. Default: the site's `max_runtime`.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_time: Option<Duration>,
    /// CPU cores a job that asks for none gets. Default: `max_cpus` (so every job has a limit
    /// when there is a cap).
    #[serde(default)]
    pub default_cpus: Option<u32>,
    /// Memory a job that asks for none gets: `"512M"`, `"4G"`, or a number of MiB. Default:
    /// `max_memory` (so every job has a limit when there is a cap).
    #[serde(default, rename = "default_memory", deserialize_with = "de_opt_memory")]
    pub default_memory_mib: Option<u64>,
    /// Most nodes (`--nodes`) a job may ask for. Default: no cap.
    #[serde(default)]
    pub max_nodes: Option<u32>,
    /// Most tasks (`--ntasks`) a job may ask for. Default: no cap.
    #[serde(default)]
    pub max_ntasks: Option<u32>,
    /// Partitions a job may name. Default: empty, any partition (Slurm's own limits apply).
    #[serde(default)]
    pub partitions: Vec<String>,
    /// Accounts a job may charge. Default: empty, any account (Slurm's own associations apply).
    #[serde(default)]
    pub accounts: Vec<String>,
    /// Qualities of service a job may name. Default: empty, any QOS.
    #[serde(default)]
    pub qos: Vec<String>,
    /// Arguments the site adds to every `sbatch` (`"--reservation=ci"`, `"--account=ci"`),
    /// before the job's own. Default: none.
    #[serde(default)]
    pub extra_args: Vec<String>,
}

/// `[executors.docker]` and `[executors.podman]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSettings {
    /// Most CPU cores (`--cpus`) a job may ask for. Default: no cap.
    #[serde(default)]
    pub max_cpus: Option<u32>,
    /// Most memory (`--memory`): `"512M"`, `"64G"`, or a number of MiB. Default: no cap.
    #[serde(default, rename = "max_memory", deserialize_with = "de_opt_memory")]
    pub max_memory_mib: Option<u64>,
    /// Most GPUs a job may ask for. Default: no cap.
    #[serde(default)]
    pub max_gpus: Option<u32>,
    /// Longest time limit a job may ask for. Default: the site's `max_runtime`.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_time: Option<Duration>,
    /// CPU cores a job that asks for none gets. Default: `max_cpus` (so every job has a limit
    /// when there is a cap).
    #[serde(default)]
    pub default_cpus: Option<u32>,
    /// Memory a job that asks for none gets: `"512M"`, `"4G"`, or a number of MiB. Default:
    /// `max_memory` (so every job has a limit when there is a cap).
    #[serde(default, rename = "default_memory", deserialize_with = "de_opt_memory")]
    pub default_memory_mib: Option<u64>,
    /// Image globs a job may use, fully qualified (`docker.io/library/ubuntu:*`,
    /// `ghcr.io/org/*`, or a digest `REGISTRY/NAME@sha256:...`). Required, not empty.
    #[serde(default)]
    pub images: Vec<String>,
    /// The image of a job that names none; it must match `images`. Default: none (a job must
    /// name its image).
    #[serde(default)]
    pub default_image: Option<String>,
    /// The OCI runtime (`--runtime`, e.g. `runsc`, `crun`). Default: the engine's own.
    #[serde(default)]
    pub runtime: Option<String>,
    /// When images are pulled. Default: `if-not-present`.
    #[serde(default = "default_pull")]
    pub pull: PullPolicy,
    /// The container's network. Default: `none`.
    #[serde(default = "default_network")]
    pub network: ContainerNetwork,
    /// Mount the container's root file system read-only. Default: false.
    #[serde(default)]
    pub read_only_root: bool,
}

impl ContainerSettings {
    /// For an agent without a site policy (a private fleet): any image present on the host,
    /// never pulled, no network.
    pub fn private_fleet() -> ContainerSettings {
        ContainerSettings {
            max_cpus: None,
            max_memory_mib: None,
            max_gpus: None,
            max_time: None,
            default_cpus: None,
            default_memory_mib: None,
            images: vec!["*".into()],
            default_image: None,
            runtime: None,
            pull: PullPolicy::Never,
            network: ContainerNetwork::None,
            read_only_root: false,
        }
    }
}

fn default_pull() -> PullPolicy {
    PullPolicy::IfNotPresent
}
fn default_network() -> ContainerNetwork {
    ContainerNetwork::None
}

impl ContainerSettings {
    fn limits(&self) -> ExecutorLimits<'_> {
        ExecutorLimits {
            max_cpus: self.max_cpus,
            max_memory_mib: self.max_memory_mib,
            default_cpus: self.default_cpus,
            default_memory_mib: self.default_memory_mib,
            max_gpus: self.max_gpus,
            max_time: self.max_time,
            images: Some(&self.images),
            default_image: self.default_image.as_deref(),
            ..ExecutorLimits::default()
        }
    }
}

/// When a container executor pulls an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Only images already on the host run.
    Never,
    /// Pull when the host does not have the image.
    IfNotPresent,
    /// Pull before every job (tags get updates).
    Always,
}

/// A container's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerNetwork {
    /// No network but loopback.
    None,
    /// The engine's default private network, with outbound access.
    Bridge,
}

/// `[executors.kubernetes]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSettings {
    /// Most CPU cores a job may ask for. Default: no cap.
    #[serde(default)]
    pub max_cpus: Option<u32>,
    /// Most memory: `"512M"`, `"64G"`, or a number of MiB. Default: no cap.
    #[serde(default, rename = "max_memory", deserialize_with = "de_opt_memory")]
    pub max_memory_mib: Option<u64>,
    /// Most GPUs a job may ask for. Default: no cap.
    #[serde(default)]
    pub max_gpus: Option<u32>,
    /// Longest time limit (`activeDeadlineSeconds`) a job may ask for. Default: the site's
    /// `max_runtime`.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_time: Option<Duration>,
    /// CPU cores a job that asks for none gets. Default: `max_cpus` (so every job has a limit
    /// when there is a cap).
    #[serde(default)]
    pub default_cpus: Option<u32>,
    /// Memory a job that asks for none gets: `"512M"`, `"4G"`, or a number of MiB. Default:
    /// `max_memory` (so every job has a limit when there is a cap).
    #[serde(default, rename = "default_memory", deserialize_with = "de_opt_memory")]
    pub default_memory_mib: Option<u64>,
    /// The namespace jobs run in. Required.
    pub namespace: String,
    /// The service account of job pods. Default: the namespace's `default` account.
    #[serde(default)]
    pub service_account: Option<String>,
    /// Image globs a job may use, fully qualified. Required, not empty.
    #[serde(default)]
    pub images: Vec<String>,
    /// The image of a job that names none; it must match `images`. Default: none.
    #[serde(default)]
    pub default_image: Option<String>,
    /// The pods' `imagePullPolicy`. Default: `if-not-present`.
    #[serde(default = "default_pull")]
    pub pull: PullPolicy,
    /// Mount the service account's API token into job pods. Default: false (a CI job gets no
    /// credentials for the cluster; name a `service_account` for its image pull secrets).
    #[serde(default)]
    pub automount_service_account_token: bool,
    /// Node labels job pods must run on (`nodeSelector`). Default: none.
    #[serde(default)]
    pub node_selector: std::collections::BTreeMap<String, String>,
    /// The extended resource GPUs are requested as. Default: `nvidia.com/gpu`.
    #[serde(default = "default_gpu_resource")]
    pub gpu_resource: String,
    /// How long a pod may wait for a node (unschedulable) or for its image before the job fails
    /// with the scheduler's or kubelet's message. Default: `5m`.
    #[serde(default = "default_max_pending", deserialize_with = "de_duration")]
    pub max_pending: Duration,
    /// `ttlSecondsAfterFinished` of the Jobs: Kubernetes removes a finished Job after this, in
    /// case the agent could not (the agent deletes each Job once its result is reported).
    /// Default: `1h`.
    #[serde(
        default = "default_ttl_after_finished",
        deserialize_with = "de_duration"
    )]
    pub ttl_after_finished: Duration,
}

fn default_gpu_resource() -> String {
    "nvidia.com/gpu".to_string()
}
fn default_max_pending() -> Duration {
    Duration::from_secs(300)
}
fn default_ttl_after_finished() -> Duration {
    Duration::from_secs(3600)
}

/// One `[[rules]]` entry: who may run jobs here. A job is allowed when one rule matches every
/// one of its claims; a list that is left out matches anything (except for `events`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The rule's name, shown in every verdict. Required, unique.
    pub name: String,
    /// Repository globs (`owner/name`, `owner/*`). Required, not empty.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// GitHub's numeric ids of the repositories this rule allows (the token's `repository_id`):
    /// a repository renamed, or deleted and created again under the same name, no longer
    /// matches. Default: any id.
    #[serde(default)]
    pub repository_ids: Option<Vec<u64>>,
    /// GitHub's numeric ids of the owners (users or organisations) whose repositories this rule
    /// allows (the token's `repository_owner_id`): someone who takes over a released owner name
    /// is not that owner. Default: any id.
    #[serde(default)]
    pub repository_owner_ids: Option<Vec<u64>>,
    /// Git ref globs (`refs/heads/main`, `refs/tags/v*`). Default: any ref.
    #[serde(default)]
    pub refs: Option<Vec<String>>,
    /// Events (`push`, `schedule`, `workflow_dispatch`, `pull_request`, ...), exact names.
    /// Default: `["push", "schedule", "workflow_dispatch"]`. `pull_request_target` runs only if
    /// named here.
    #[serde(default = "default_events")]
    pub events: Vec<String>,
    /// Globs on the job's `job_workflow_ref` (`owner/repo/.github/workflows/ci.yml@*`).
    /// Default: any workflow.
    #[serde(default)]
    pub workflows: Option<Vec<String>>,
    /// GitHub logins (globs) that may trigger jobs. Default: any actor.
    #[serde(default)]
    pub actors: Option<Vec<String>>,
    /// GitHub environments (globs, case-insensitive) the job must run in. Default: any
    /// environment, or none.
    #[serde(default)]
    pub environments: Option<Vec<String>>,
    /// Executors this rule allows. Default: every configured executor.
    #[serde(default)]
    pub executors: Option<Vec<ExecutorName>>,
}

/// The events a rule allows when it names none: those started by people with write access or by
/// the repository itself.
pub fn default_events() -> Vec<String> {
    vec!["push".into(), "schedule".into(), "workflow_dispatch".into()]
}

pub use testbot_proto::units::{format_mib, parse_memory_mib};

/// A duration as written in the file: `90s`, `30m`, `2h`, `1h 30m`.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn de_opt_memory<'de, D: Deserializer<'de>>(de: D) -> Result<Option<u64>, D::Error> {
    struct MemoryVisitor;
    impl Visitor<'_> for MemoryVisitor {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a memory size such as \"512M\" or \"64G\", or a number of MiB")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            if v <= 0 {
                return Err(E::custom(format!(
                    "{v} is not a memory size; write e.g. \"512M\" or \"64G\""
                )));
            }
            Ok(v as u64)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_memory_mib(v).map_err(E::custom)
        }
    }
    de.deserialize_any(MemoryVisitor).map(Some)
}

/// Durations are written as humans do: `90s`, `30m`, `2h`.
pub(crate) fn de_duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    let duration = humantime::parse_duration(&text).map_err(|e| {
        de::Error::custom(format!(
            "{text:?} is not a duration ({e}); write e.g. \"90s\", \"30m\", \"2h\""
        ))
    })?;
    if duration.is_zero() {
        return Err(de::Error::custom(format!(
            "{text:?} is zero; write a positive duration such as \"30m\""
        )));
    }
    Ok(duration)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Duration>, D::Error> {
    de_duration(de).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse_into_mib() {
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("64G"), Ok(65536));
        assert_eq!(parse_memory_mib("64GiB"), Ok(65536));
        assert_eq!(parse_memory_mib("1t"), Ok(1024 * 1024));
        assert_eq!(parse_memory_mib("4096"), Ok(4096));
        assert!(
            parse_memory_mib("64X")
                .unwrap_err()
                .contains("not a memory size")
        );
        assert!(parse_memory_mib("G").is_err());
        assert!(parse_memory_mib("0G").unwrap_err().contains("zero"));
        assert_eq!(format_mib(65536), "64G");
        assert_eq!(format_mib(512), "512M");
        assert_eq!(format_mib(1536), "1536M");
    }
}
