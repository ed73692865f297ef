//! The agent's TOML configuration file.
//!
//! ```toml
//! broker_url = "https://testbot.example.org"
//! enrollment_token_file = "/etc/testbot/enrollment.token"
//! policy = "/etc/testbot/policy.toml"
//! name = "login1"
//! labels = ["linux", "x86_64"]
//! concurrency = 2
//! work_dir = "/var/lib/testbot-agent/work"
//! state_dir = "/var/lib/testbot-agent/state"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

/// Which executor runs the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// `bash` in a fresh directory, in its own process group.
    Shell,
    /// Runs nothing and reports success: for measuring the broker and protocol alone.
    Noop,
    /// Batch jobs submitted with `sbatch` (settings in the site policy's `[executors.slurm]`).
    Slurm,
    /// Containers of the Docker engine (settings in the policy's `[executors.docker]`).
    Docker,
    /// Containers of rootful podman (settings in the policy's `[executors.podman]`).
    Podman,
    /// Kubernetes Jobs (settings in the policy's `[executors.kubernetes]`; the cluster from the
    /// `[kubernetes]` table).
    Kubernetes,
}

impl ExecutorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Shell => "shell",
            ExecutorKind::Noop => "noop",
            ExecutorKind::Slurm => "slurm",
            ExecutorKind::Docker => "docker",
            ExecutorKind::Podman => "podman",
            ExecutorKind::Kubernetes => "kubernetes",
        }
    }
}

/// The agent's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The broker's base URL (`https://...`; `http://` only for loopback and tests).
    pub broker_url: String,
    /// A site enrollment token from the broker's operator, inline. Prefer
    /// `enrollment_token_file`. Needed only until the agent has enrolled (its identity is then in
    /// `state_dir`). Default: none.
    #[serde(default)]
    pub enrollment_token: Option<SecretString>,
    /// A file holding the enrollment token (first line). Default: none.
    #[serde(default)]
    pub enrollment_token_file: Option<PathBuf>,
    /// Where the agent keeps its identity (`identity.json`), its private key (`agent-key.pk8`)
    /// and the records of running jobs: a directory of the agent's own that no job can read. The
    /// agent creates it with mode 0700 and tightens a looser one at start; it must lie outside
    /// `work_dir` (which job accounts traverse, and which for Slurm is on a shared file system).
    /// Default: `/var/lib/testbot-agent/state`.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Lets the site policy map jobs to the agent's own account. Such a job can read whatever
    /// the agent can, its private key and job records included, and so act as this agent at the
    /// broker; only for a site where that is acceptable. Without it the agent refuses to start
    /// when the policy names its own account, and refuses a job an identity script maps to it.
    /// Default: false.
    #[serde(default)]
    pub allow_jobs_as_agent_account: bool,
    /// The site policy file: which repositories, refs, events and users may run jobs here, with
    /// which executors and resources, as which local account. Without one, the agent runs the
    /// jobs operators submit, as its own user: only for a private fleet (`testbot up`).
    /// Default: none.
    #[serde(default)]
    pub policy: Option<PathBuf>,
    /// Without a site policy, also run workflow jobs (submitted with a GitHub OIDC token) of any
    /// repository registered with the broker, as the agent's own user. Anyone who can register a
    /// repository then runs code here: set it only for a fleet whose broker registers nothing
    /// you do not trust. Ignored with a `policy`. Default: false (operator jobs only).
    #[serde(default)]
    pub allow_workflow_jobs_without_policy: bool,
    /// The agent's name in the fleet. Default: the host name.
    #[serde(default)]
    pub name: Option<String>,
    /// Labels offered to jobs. Default: none.
    #[serde(default)]
    pub labels: Vec<String>,
    /// How many jobs run at once. Default: 1.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Where job directories are created (`WORK_DIR/jobs/job-ID-ATTEMPT`); job accounts must be
    /// able to traverse it. Default: `/var/lib/testbot-agent/work`.
    #[serde(default = "default_work_dir")]
    pub work_dir: PathBuf,
    /// The executor: `shell`, `slurm`, `docker`, `podman`, `kubernetes` or `noop`. Default:
    /// `shell`.
    #[serde(default = "default_executor")]
    pub executor: ExecutorKind,
    /// Time limit for jobs that set none, and the most a job may ask for. Default: `6h`.
    #[serde(default = "default_max_job_time", deserialize_with = "de_duration")]
    pub max_job_time: Duration,
    /// After SIGTERM, how long a cancelled or timed-out job has before SIGKILL. Default: `10s`.
    #[serde(default = "default_kill_grace", deserialize_with = "de_duration")]
    pub kill_grace: Duration,
    /// How long one poll may wait at the broker for work. Default: `30s`.
    #[serde(default = "default_poll_wait", deserialize_with = "de_duration")]
    pub poll_wait: Duration,
    /// Keep each job's directory after it ends (for debugging). Default: false.
    #[serde(default)]
    pub keep_job_dirs: bool,
    /// `[kubernetes]`: the cluster the `kubernetes` executor talks to. Default: found as
    /// `kubectl` finds it.
    #[serde(default)]
    pub kubernetes: KubernetesConnection,
}

/// How the agent reaches its Kubernetes cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConnection {
    /// A kubeconfig file. Default: `$KUBECONFIG`, then `~/.kube/config`, then the pod's own
    /// service account when the agent runs inside the cluster.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use. Default: its current context.
    #[serde(default)]
    pub context: Option<String>,
}

fn default_concurrency() -> usize {
    1
}
fn default_work_dir() -> PathBuf {
    PathBuf::from("/var/lib/testbot-agent/work")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/testbot-agent/state")
}
fn default_executor() -> ExecutorKind {
    ExecutorKind::Shell
}
fn default_max_job_time() -> Duration {
    Duration::from_secs(6 * 3600)
}
fn default_kill_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_poll_wait() -> Duration {
    Duration::from_secs(30)
}

/// Durations are written as humans do: `90s`, `10m`, `6h`.
fn de_duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration ({e}); write e.g. \"90s\", \"10m\", \"6h\""
        ))
    })
}

impl AgentConfig {
    /// A configuration with every default, for embedding (tests, `testbot up`), but with its
    /// state beside `work_dir` ([`AgentConfig::state_dir_beside`]), so agents embedded side by
    /// side keep apart.
    pub fn new(
        broker_url: impl Into<String>,
        enrollment_token: SecretString,
        work_dir: PathBuf,
    ) -> Self {
        AgentConfig {
            broker_url: broker_url.into(),
            enrollment_token: Some(enrollment_token),
            enrollment_token_file: None,
            state_dir: Some(AgentConfig::state_dir_beside(&work_dir)),
            allow_jobs_as_agent_account: false,
            policy: None,
            allow_workflow_jobs_without_policy: false,
            name: None,
            labels: Vec::new(),
            concurrency: default_concurrency(),
            work_dir,
            executor: default_executor(),
            max_job_time: default_max_job_time(),
            kill_grace: default_kill_grace(),
            poll_wait: default_poll_wait(),
            keep_job_dirs: false,
            kubernetes: KubernetesConnection::default(),
        }
    }

    /// Reads and validates a configuration file; errors name the file, line and column.
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("Cannot read {}", path.display()))?;
        let config = Self::parse(&text).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))?;
        Ok(config)
    }

    /// Parses configuration text. The error starts with `LINE:COL: ` when it has a position.
    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().to_string();
            match e.span() {
                Some(span) => {
                    let (line, col) = line_col(text, span.start);
                    format!("{line}:{col}: {message}")
                }
                None => format!(" {message}"),
            }
        })?;
        config.validate().map_err(|e| format!(" {e}"))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if !(self.broker_url.starts_with("http://") || self.broker_url.starts_with("https://")) {
            return Err(format!(
                "broker_url {:?} must start with https:// (or http:// for loopback)",
                self.broker_url
            ));
        }
        if self.enrollment_token.is_some() && self.enrollment_token_file.is_some() {
            return Err("set only one of enrollment_token and enrollment_token_file".into());
        }
        if self.concurrency == 0 || self.concurrency > 1024 {
            return Err("concurrency must be between 1 and 1024".into());
        }
        if let Some(name) = &self.name {
            testbot_proto::jobs::validate_label(name).map_err(|e| format!("name: {e}"))?;
        }
        for label in &self.labels {
            testbot_proto::jobs::validate_label(label).map_err(|e| format!("labels: {e}"))?;
            if label.starts_with("site:") {
                return Err(format!(
                    "labels: {label:?} is refused: the broker gives every agent the label \
                     site:SITE of the site it enrolled in; remove it"
                ));
            }
        }
        self.check_state_dir()
    }

    /// The state directory must not overlap the work directory.
    pub fn check_state_dir(&self) -> Result<(), String> {
        let state_dir = self.state_dir();
        if state_dir.starts_with(&self.work_dir) || self.work_dir.starts_with(&state_dir) {
            return Err(format!(
                "state_dir {} and work_dir {} overlap: jobs reach into work_dir, and the agent's key and job records must be out of their reach; set state_dir to a directory outside work_dir (default {})",
                state_dir.display(),
                self.work_dir.display(),
                default_state_dir().display()
            ));
        }
        Ok(())
    }

    /// The enrollment token, read from `enrollment_token_file` if that is how it is given.
    pub fn resolve_enrollment_token(&self) -> anyhow::Result<Option<SecretString>> {
        if let Some(token) = &self.enrollment_token {
            return Ok(Some(token.clone()));
        }
        let Some(path) = &self.enrollment_token_file else {
            return Ok(None);
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            // Admins delete the token file after enrolling; that is fine once enrolled.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("Cannot read the enrollment token from {}", path.display())
                });
            }
        };
        let token = text.lines().next().unwrap_or("").trim().to_string();
        anyhow::ensure!(!token.is_empty(), "{} is empty", path.display());
        Ok(Some(SecretString::from(token)))
    }

    /// Where the identity and the job records live.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(default_state_dir)
    }

    /// `WORK_DIR-state`: the state directory of an agent embedded with its work directory at
    /// `work_dir`.
    pub fn state_dir_beside(work_dir: &Path) -> PathBuf {
        let mut name = work_dir.file_name().unwrap_or_default().to_os_string();
        name.push("-state");
        work_dir.with_file_name(name)
    }

    /// The configured name, or the host name.
    pub fn resolve_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| testbot_proto::jobs::validate_label(h).is_ok())
            .unwrap_or_else(|| "agent".to_string())
    }
}

/// 1-based line and column (in characters) of a byte offset, for `FILE:LINE:COL:` messages.
pub(crate) use testbot_proto::toml_errors::line_col;

#[cfg(test)]
mod tests {
    use super::*;

    /// The example shipped for admins must stay valid and must state the real defaults.
    #[test]
    fn shipped_example_parses_and_matches_the_defaults() {
        let example = include_str!("../../packaging/agent.toml.example");
        let config = AgentConfig::parse(example).unwrap();
        let defaults = AgentConfig::new("x", SecretString::from("t"), default_work_dir());
        assert_eq!(config.broker_url, "https://testbot.example.org");
        assert_eq!(config.labels, ["linux", "x86_64"]);
        assert_eq!(config.concurrency, defaults.concurrency);
        assert_eq!(config.work_dir, defaults.work_dir);
        assert_eq!(config.executor, defaults.executor);
        assert_eq!(config.max_job_time, defaults.max_job_time);
        assert_eq!(config.kill_grace, defaults.kill_grace);
        assert_eq!(config.poll_wait, defaults.poll_wait);
        assert_eq!(config.keep_job_dirs, defaults.keep_job_dirs);
        assert_eq!(config.state_dir(), default_state_dir());
        assert_eq!(
            config.allow_jobs_as_agent_account,
            defaults.allow_jobs_as_agent_account
        );
    }

    #[test]
    fn the_state_directory_stays_out_of_the_work_directory() {
        let config = AgentConfig::parse("broker_url = \"https://x\"\n").unwrap();
        assert_eq!(
            config.state_dir(),
            PathBuf::from("/var/lib/testbot-agent/state")
        );
        assert_eq!(
            config.work_dir,
            PathBuf::from("/var/lib/testbot-agent/work")
        );
        for (work, state) in [
            ("/srv/ci", "/srv/ci/state"),
            ("/srv/ci", "/srv/ci"),
            ("/srv/ci/work", "/srv/ci"),
        ] {
            let err = AgentConfig::parse(&format!(
                "broker_url = \"https://x\"\nwork_dir = \"{work}\"\nstate_dir = \"{state}\"\n"
            ))
            .unwrap_err();
            assert!(
                err.contains(&format!("state_dir {state} and work_dir {work} overlap")),
                "{err}"
            );
        }
        let embedded = AgentConfig::new(
            "x",
            SecretString::from("t"),
            PathBuf::from("/tmp/f/agent-a"),
        );
        assert_eq!(embedded.state_dir(), PathBuf::from("/tmp/f/agent-a-state"));
        assert!(embedded.check_state_dir().is_ok());
    }

    #[test]
    fn parses_a_full_config() {
        let config = AgentConfig::parse(
            r#"
broker_url = "https://testbot.example.org"
enrollment_token_file = "/etc/testbot/enrollment.token"
name = "login1"
labels = ["linux", "x86_64"]
concurrency = 4
executor = "shell"
max_job_time = "2h"
"#,
        )
        .unwrap();
        assert_eq!(config.concurrency, 4);
        assert_eq!(config.max_job_time, Duration::from_secs(7200));
        assert_eq!(config.kill_grace, Duration::from_secs(10));
    }

    #[test]
    fn site_labels_are_the_brokers() {
        let err = AgentConfig::parse(
            "broker_url = \"https://x\"\nlabels = [\"linux\", \"site:other\"]\n",
        )
        .unwrap_err();
        assert!(err.contains("\"site:other\" is refused"), "{err}");
        let config = AgentConfig::parse(
            "broker_url = \"https://x\"\nallow_workflow_jobs_without_policy = true\n",
        )
        .unwrap();
        assert!(config.allow_workflow_jobs_without_policy);
    }

    #[test]
    fn errors_name_line_and_column() {
        let err = AgentConfig::parse("broker_url = \"https://x\"\nname = \"a\"\nconcurency = 2\n")
            .unwrap_err();
        assert!(err.starts_with("3:1: unknown field `concurency`"), "{err}");
        let err =
            AgentConfig::parse("broker_url = \"https://x\"\nname = \"a\"\nkill_grace = \"soon\"\n")
                .unwrap_err();
        assert!(err.contains("\"soon\" is not a duration"), "{err}");
        let err = AgentConfig::parse(
            "broker_url = \"https://x\"\nenrollment_token = \"a\"\nenrollment_token_file = \"b\"\n",
        )
        .unwrap_err();
        assert!(err.contains("only one of enrollment_token"), "{err}");
    }
}
