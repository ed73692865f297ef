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
        std::fs::create_dir_all(config.work_dir.join("jobs")).map_err(|e| {
            anyhow::anyhow!(
                "Cannot create work directory {}: {e}",
                config.work_dir.display()
            )
        })?;
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
            site: policy.as_ref().map(|policy| SiteGate {
                policy: policy.clone(),
                verifier: OidcVerifier::new(policy.oidc()),
            }),
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
