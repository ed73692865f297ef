//! The agent process: `concurrency` workers, each polling the broker and running one job at a
//! time, with a two-stage shutdown.

use anyhow::Context as _;
use std::sync::Arc;

use testbot_proto::agents::PollRequest;
use testbot_proto::client::Backoff;
use testbot_proto::oidc::OidcVerifier;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::{AgentConfig, ExecutorKind};
use crate::enroll::AgentIdentity;
use crate::executor::records::JobRecords;
use crate::executor::{
    ContainerExecutor, Engine, Executor, KubernetesExecutor, NoopExecutor, ShellExecutor,
    SlurmExecutor,
};
use crate::job::{JobRunner, SiteGate};
use crate::policy::SitePolicy;
use crate::policy::settings::ContainerSettings;

/// Signals the agent reacts to.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Cancelled on the first SIGTERM/SIGINT: take no new work, let running jobs finish.
    pub drain: CancellationToken,
    /// Cancelled on the second: stop running jobs, report them cancelled, exit.
    pub hard: CancellationToken,
}

impl Shutdown {
    /// Drains on the first SIGTERM or SIGINT, stops hard on the second.
    pub fn from_signals() -> anyhow::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        let shutdown = Shutdown::default();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (drain, hard) = (shutdown.drain.clone(), shutdown.hard.clone());
        tokio::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!(
                "Draining: taking no new jobs; running jobs will finish. Signal again to cancel them."
            );
            drain.cancel();
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::warn!("Stopping: cancelling running jobs.");
            hard.cancel();
        });
        Ok(shutdown)
    }
}

/// The site policy the configuration names, checked against this host.
fn load_policy(config: &AgentConfig) -> anyhow::Result<Option<Arc<SitePolicy>>> {
    let Some(path) = &config.policy else {
        return Ok(None);
    };
    let policy = SitePolicy::load(path)?;
    let problems = policy.host_problems();
    anyhow::ensure!(
        problems.is_empty(),
        "The site policy {} cannot work on this host: {}",
        path.display(),
        problems.join("; ")
    );
    Ok(Some(Arc::new(policy)))
}

/// Refuses a policy under which jobs would run as the agent's own account (they could read its
/// key and records, and act as the agent) unless the configuration allows it by name, and one
/// that maps jobs to other accounts when the agent cannot switch to them.
fn check_accounts(config: &AgentConfig, policy: &SitePolicy) -> anyhow::Result<()> {
    let me = nix::unistd::geteuid();
    let path = config
        .policy
        .as_deref()
        .unwrap_or(std::path::Path::new("?"));
    for name in policy.identity().named_accounts() {
        // Accounts that do not exist are reported by `load_policy`.
        let Ok(account) = crate::identity::lookup_account(name) else {
            continue;
        };
        if account.uid == me {
            anyhow::ensure!(
                config.allow_jobs_as_agent_account,
                "The site policy {} maps jobs to account {} (uid {}), which is the account the agent runs as: such jobs could read the agent's private key and job records in {} and act as this agent. Map jobs to other accounts (the agent then needs root, or the capabilities in packaging/systemd/testbot-agent.service), or set allow_jobs_as_agent_account = true in the agent configuration if that is really intended.",
                path.display(),
                account.name,
                account.uid,
                config.state_dir().display()
            );
        } else {
            anyhow::ensure!(
                me.is_root() || crate::executor::has_capability(crate::executor::CAP_SETUID),
                "The site policy {} maps jobs to account {} (uid {}), but the agent runs as uid {me} without CAP_SETUID and cannot switch to it: run the agent as root, or with the capabilities in packaging/systemd/testbot-agent.service.",
                path.display(),
                account.name,
                account.uid
            );
        }
    }
    Ok(())
}

/// Makes the state directory the agent's alone: created with mode 0700, tightened if looser,
/// refused if it belongs to someone else or overlaps the work directory.
fn prepare_state_dir(config: &AgentConfig) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    config.check_state_dir().map_err(anyhow::Error::msg)?;
    let dir = config.state_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("Cannot create the state directory {}", dir.display()))?;
    let meta = std::fs::metadata(&dir)
        .with_context(|| format!("Cannot read the state directory {}", dir.display()))?;
    let me = nix::unistd::geteuid();
    anyhow::ensure!(
        meta.uid() == me.as_raw(),
        "The state directory {} belongs to uid {}, not to the agent (uid {me}): give it to the agent's account (chown) or set state_dir to a directory of its own.",
        dir.display(),
        meta.uid()
    );
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", meta.mode() & 0o7777), "The state directory was open to others; setting its mode to 0700.");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("Cannot set the mode of {}", dir.display()))?;
    }
    // Before the state directory had a place of its own, the identity lay in the work directory.
    let old = config.work_dir.join(crate::enroll::IDENTITY_FILE);
    anyhow::ensure!(
        dir.join(crate::enroll::IDENTITY_FILE).exists() || !old.exists(),
        "{} holds this agent's identity, but the identity now lives in state_dir {}, out of the jobs' reach: move {} and {} from {} there (with the slurm, docker, podman or kubernetes directory of job records, if any), then start the agent again.",
        old.display(),
        dir.display(),
        crate::enroll::IDENTITY_FILE,
        crate::enroll::KEY_FILE,
        config.work_dir.display()
    );
    Ok(())
}

/// A configured agent, ready to run.
pub struct Agent {
    name: String,
    config: AgentConfig,
    executor: Arc<dyn Executor>,
    policy: Option<Arc<SitePolicy>>,
}

impl Agent {
    /// An agent with the executor its configuration names.
    pub fn new(config: AgentConfig) -> anyhow::Result<Agent> {
        let policy = load_policy(&config)?;
        let executor: Arc<dyn Executor> = match config.executor {
            ExecutorKind::Shell => {
                Arc::new(ShellExecutor::new(config.kill_grace, &config.state_dir()))
            }
            ExecutorKind::Noop => Arc::new(NoopExecutor),
            ExecutorKind::Docker | ExecutorKind::Podman => {
                let (engine, settings) = match config.executor {
                    ExecutorKind::Docker => (
                        Engine::Docker,
                        policy.as_ref().and_then(|p| p.executors().docker.clone()),
                    ),
                    _ => (
                        Engine::Podman,
                        policy.as_ref().and_then(|p| p.executors().podman.clone()),
                    ),
                };
                Arc::new(ContainerExecutor {
                    engine,
                    settings: settings.unwrap_or_else(ContainerSettings::private_fleet),
                    instance: ContainerExecutor::instance_of(&config.state_dir()),
                    records: JobRecords::new(config.state_dir().join(engine.program())),
                    kill_grace: config.kill_grace,
                })
            }
            ExecutorKind::Kubernetes => {
                let settings = policy
                    .as_ref()
                    .and_then(|p| p.executors().kubernetes.clone())
                    .context(
                        "executor kubernetes needs a site policy with an [executors.kubernetes] table (its namespace and allowed images)",
                    )?;
                Arc::new(KubernetesExecutor::new(
                    settings,
                    config.kubernetes.clone(),
                    ContainerExecutor::instance_of(&config.state_dir()),
                    JobRecords::new(config.state_dir().join("kubernetes")),
                    config.kill_grace,
                ))
            }
            ExecutorKind::Slurm => Arc::new(SlurmExecutor {
                settings: policy
                    .as_ref()
                    .and_then(|p| p.executors().slurm.clone())
                    .unwrap_or_default(),
                records: JobRecords::new(config.state_dir().join("slurm")),
            }),
        };
        Agent::build(config, executor, policy)
    }

    /// An agent running jobs with `executor` (benchmarks and tests plug in their own).
    pub fn with_executor(
        config: AgentConfig,
        executor: Arc<dyn Executor>,
    ) -> anyhow::Result<Agent> {
        let policy = load_policy(&config)?;
        Agent::build(config, executor, policy)
    }

    fn build(
        config: AgentConfig,
        executor: Arc<dyn Executor>,
        policy: Option<Arc<SitePolicy>>,
    ) -> anyhow::Result<Agent> {
        if let Some(label) = config.labels.iter().find(|l| l.starts_with("site:")) {
            anyhow::bail!(
                "label {label:?} is refused: the broker gives every agent the label site:SITE of \
                 the site it enrolled in; remove {label:?} from the agent's labels"
            );
        }
        let name = config.resolve_name();
        if let Some(policy) = &policy {
            check_accounts(&config, policy)?;
        }
        prepare_state_dir(&config)?;
        let jobs = config.work_dir.join("jobs");
        std::fs::create_dir_all(&jobs).map_err(|e| {
            anyhow::anyhow!(
                "Cannot create work directory {}: {e}",
                config.work_dir.display()
            )
        })?;
        // Job accounts pass through to their own directories, but cannot list the others.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&jobs, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("Cannot set the mode of {}", jobs.display()))?;
        Ok(Agent {
            name,
            config,
            executor,
            policy,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs until drained (first signal: running jobs finish) or stopped (second: they are
    /// cancelled and reported).
    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        let Agent {
            name,
            config,
            executor,
            policy,
        } = self;
        executor
            .prepare()
            .await
            .with_context(|| format!("The {} executor cannot run jobs here", executor.name()))?;
        let summary = policy.as_ref().map(|p| p.summary());
        let identity = {
            let drain = shutdown.drain.clone();
            AgentIdentity::load_or_enroll(
                &config.state_dir(),
                &config.broker_url,
                &name,
                config.resolve_enrollment_token()?,
                summary.as_ref(),
                move || drain.is_cancelled(),
            )
            .await?
        };
        let runner = Arc::new(JobRunner {
            client: identity.client(&config.broker_url)?,
            executor,
            agent: name.clone(),
            work_dir: config.work_dir.clone(),
            max_job_time: config.max_job_time,
            keep_job_dirs: config.keep_job_dirs,
            site: match policy.as_ref() {
                None => None,
                Some(policy) => Some(SiteGate {
                    policy: policy.clone(),
                    verifier: OidcVerifier::new(policy.oidc()),
                    github: crate::job::AppJobs::from_policy(policy)?,
                    allow_agent_account: config.allow_jobs_as_agent_account,
                }),
            },
            workflow_jobs_without_policy: config.allow_workflow_jobs_without_policy,
        });
        // The site caps how many jobs run at once, whatever the agent's own setting (the broker
        // also counts the jobs of all the site's agents against it).
        let concurrency = policy.as_ref().map_or(config.concurrency, |p| {
            config.concurrency.min(p.max_concurrent_jobs())
        });
        tracing::info!(
            agent = %name,
            agent_id = %identity.agent_id,
            site = %identity.site,
            broker = %config.broker_url,
            executor = runner.executor.name(),
            concurrency,
            policy = ?config.policy,
            workflow_jobs_without_policy = policy.is_none() && config.allow_workflow_jobs_without_policy,
            "Agent started."
        );
        let mut workers = tokio::task::JoinSet::new();
        // Jobs the executor was running when the agent last stopped (Slurm jobs survive an
        // agent restart): follow them to their end alongside new work.
        runner.executor.reap().await;
        for detached in runner.executor.detached() {
            let runner = runner.clone();
            let hard = shutdown.hard.clone();
            let id = detached.job_id;
            workers.spawn(
                async move { runner.resume(detached, &hard).await }
                    .instrument(tracing::info_span!("job", job_id = %id)),
            );
        }
        for slot in 0..concurrency {
            let worker = Worker {
                runner: runner.clone(),
                poll: PollRequest {
                    agent: name.clone(),
                    labels: config.labels.clone(),
                    executor: runner.executor.name().to_string(),
                    wait_ms: Some(config.poll_wait.as_millis() as u64),
                    policy: summary.clone(),
                    workflow_jobs_without_policy: policy.is_none()
                        && config.allow_workflow_jobs_without_policy,
                },
                shutdown: shutdown.clone(),
            };
            workers.spawn(worker.run().instrument(tracing::info_span!("worker", slot)));
        }
        while let Some(result) = workers.join_next().await {
            result?;
        }
        tracing::info!(agent = %name, "Agent stopped.");
        Ok(())
    }
}

struct Worker {
    runner: Arc<JobRunner>,
    poll: PollRequest,
    shutdown: Shutdown,
}

impl Worker {
    async fn run(self) {
        let mut backoff = Backoff::standard();
        let mut unreachable_since = None;
        while !self.shutdown.drain.is_cancelled() {
            let polled = tokio::select! {
                polled = self.runner.client.poll(&self.poll) => polled,
                _ = self.shutdown.drain.cancelled() => break,
            };
            match polled {
                Ok(Some(assignment)) => {
                    backoff.reset();
                    if unreachable_since.take().is_some() {
                        tracing::info!("Broker reachable again.");
                    }
                    let id = assignment.job_id;
                    self.runner
                        .run(assignment, &self.shutdown.hard)
                        .instrument(tracing::info_span!("job", job_id = %id))
                        .await;
                }
                Ok(None) => {
                    backoff.reset();
                    if unreachable_since.take().is_some() {
                        tracing::info!("Broker reachable again.");
                    }
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    if err.is_retryable() {
                        if unreachable_since.is_none() {
                            unreachable_since = Some(tokio::time::Instant::now());
                        }
                        tracing::warn!(%err, ?delay, "Broker unreachable; retrying.");
                    } else {
                        tracing::error!(%err, ?delay, "The broker refused the poll; retrying.");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.drain.cancelled() => break,
                    }
                }
            }
        }
    }
}
