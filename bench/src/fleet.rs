//! A broker and N agents in this process, talking HTTP over loopback, and an executor that
//! records when each job reached it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use testbot_agent::executor::{
    BoxFuture, ExecOutcome, Executor, JobContext, LogSink, NoopExecutor, ShellExecutor,
};
use testbot_agent::{Agent, AgentConfig, Shutdown};
use testbot_broker::{Broker, BrokerConfig};
use testbot_proto::client::BrokerClient;
use testbot_proto::jobs::JobId;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The site the agents enroll in.
const SITE: &str = "bench";
/// How long the agents' enrollment token is valid: enrolling happens as the fleet starts.
const ENROLLMENT_TTL: Duration = Duration::from_secs(600);
/// How long the agents may take to stop once told to.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The executor the agents run jobs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum ExecutorChoice {
    /// Runs nothing: the broker and the protocol alone.
    Noop,
    /// `bash` running the job's script (`true`) in a fresh directory.
    Shell,
}

impl ExecutorChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorChoice::Noop => "noop",
            ExecutorChoice::Shell => "shell",
        }
    }

    /// The executor; `dir` names the shell executor's job cgroups.
    fn executor(self, dir: &std::path::Path) -> Arc<dyn Executor> {
        match self {
            ExecutorChoice::Noop => Arc::new(NoopExecutor),
            ExecutorChoice::Shell => Arc::new(ShellExecutor::new(Duration::from_secs(2), dir)),
        }
    }
}

/// When each job first reached an executor's `run`, shared by every agent of a fleet.
#[derive(Debug)]
pub struct StartLog {
    starts: Mutex<HashMap<JobId, Instant>>,
    /// How many jobs have started; lets a measurement wait for "all of them" without polling.
    count: watch::Sender<usize>,
}

impl StartLog {
    fn new() -> Self {
        StartLog {
            starts: Mutex::new(HashMap::new()),
            count: watch::channel(0).0,
        }
    }

    fn record(&self, id: JobId, at: Instant) {
        let mut starts = self.starts.lock().expect("start log poisoned");
        // A requeued job runs again; its dispatch latency is that of the first attempt.
        if let Entry::Vacant(slot) = starts.entry(id) {
            slot.insert(at);
            self.count.send_modify(|n| *n += 1);
        }
    }

    /// When job `id` started, if it has.
    pub fn get(&self, id: JobId) -> Option<Instant> {
        self.starts
            .lock()
            .expect("start log poisoned")
            .get(&id)
            .copied()
    }

    /// How many jobs have started so far.
    pub fn count(&self) -> usize {
        *self.count.borrow()
    }

    /// Waits until at least `target` jobs have started. Fails when `stall` passes without any
    /// job starting, so a fleet that stopped working ends the benchmark instead of hanging it.
    pub async fn wait_for_count(&self, target: usize, stall: Duration) -> anyhow::Result<()> {
        let mut rx = self.count.subscribe();
        loop {
            let started = *rx.borrow_and_update();
            if started >= target {
                return Ok(());
            }
            // The sender lives in `self`, so the channel cannot close while we wait.
            if tokio::time::timeout(stall, rx.changed()).await.is_err() {
                anyhow::bail!(
                    "No job started for {stall:?}; {} more were expected (see the agents' log above)",
                    target - started
                );
            }
        }
    }
}

/// Wraps a real executor and stamps the moment `run` begins, before handing the job on.
struct RecordingExecutor {
    inner: Arc<dyn Executor>,
    starts: Arc<StartLog>,
}

impl Executor for RecordingExecutor {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn run<'a>(
        &'a self,
        job: &'a JobContext,
        log: LogSink,
        stop: CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<ExecOutcome>> {
        self.starts.record(job.id, Instant::now());
        self.inner.run(job, log, stop)
    }

    fn cleanup<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, ()> {
        self.inner.cleanup(job)
    }
}

/// Where the brokers keep their jobs.
#[derive(Debug, Clone)]
pub struct Storage {
    /// A PostgreSQL maintenance database to create each fleet's database in; `None`: SQLite.
    pub database_url: Option<String>,
    /// Brokers sharing the database.
    pub brokers: usize,
}

impl Storage {
    pub fn describe(&self) -> String {
        match (&self.database_url, self.brokers) {
            (None, _) => "SQLite, 1 broker".into(),
            (Some(_), 1) => "PostgreSQL, 1 broker".into(),
            (Some(_), n) => format!("PostgreSQL, {n} brokers sharing it"),
        }
    }
}

/// Brokers with default settings unless told otherwise (SQLite in a fresh data directory, or
/// PostgreSQL shared by several), and `agents` agents of concurrency 1 spread over them.
pub struct BenchFleet {
    /// A client with the operator token, for submitting and watching jobs.
    pub client: BrokerClient,
    pub starts: Arc<StartLog>,
    brokers: Vec<Broker>,
    /// Dropped (and so removed) after the brokers stopped.
    database: Option<testbot_broker::store::scratch::ScratchDatabase>,
    agents: Vec<(Shutdown, JoinHandle<anyhow::Result<()>>)>,
    /// Holds the broker's data and the agents' work directories; removed when dropped, after
    /// everything else has stopped.
    dir: tempfile::TempDir,
}

impl BenchFleet {
    pub async fn start(
        storage: &Storage,
        executor: ExecutorChoice,
        agents: usize,
    ) -> anyhow::Result<BenchFleet> {
        Self::start_with(storage, executor, agents, |_| {}).await
    }

    /// Like [`BenchFleet::start`], with each broker's configuration changed by `configure`
    /// before it starts (e.g. a larger log limit).
    pub async fn start_with(
        storage: &Storage,
        executor: ExecutorChoice,
        agents: usize,
        configure: impl Fn(&mut BrokerConfig),
    ) -> anyhow::Result<BenchFleet> {
        let dir = tempfile::tempdir().context("Cannot create a temporary directory")?;
        let database = match &storage.database_url {
            Some(url) => Some(
                testbot_broker::store::scratch::ScratchDatabase::create(url, "testbot_bench")
                    .await?,
            ),
            None => None,
        };
        let mut brokers: Vec<Broker> = Vec::with_capacity(storage.brokers);
        for i in 0..storage.brokers {
            let data_dir = dir.path().join(format!("broker-{i}"));
            if let Some(first) = brokers.first() {
                // Brokers of one database share its operator token.
                std::fs::create_dir_all(&data_dir)?;
                std::fs::write(
                    data_dir.join("admin.token"),
                    secrecy::ExposeSecret::expose_secret(&first.admin_token),
                )?;
            }
            let mut config =
                BrokerConfig::new("127.0.0.1:0".parse().expect("static address"), data_dir);
            config.database_url = database.as_ref().map(|db| db.url.clone());
            configure(&mut config);
            brokers.push(
                Broker::start(config)
                    .await
                    .with_context(|| format!("Cannot start broker {i}"))?,
            );
        }
        let urls: Vec<String> = brokers.iter().map(Broker::url).collect();
        let client = BrokerClient::new(&urls[0], brokers[0].admin_token.clone())?;
        let enrollment_token = brokers[0]
            .enrollment_token(SITE, agents.try_into()?, ENROLLMENT_TTL)
            .await
            .context("Cannot issue an enrollment token")?;
        let starts = Arc::new(StartLog::new());
        let recording: Arc<dyn Executor> = Arc::new(RecordingExecutor {
            inner: executor.executor(&dir.path().join("shell")),
            starts: starts.clone(),
        });
        let mut fleet = BenchFleet {
            client,
            starts,
            brokers,
            database,
            agents: Vec::with_capacity(agents),
            dir,
        };
        for i in 0..agents {
            let mut config = AgentConfig::new(
                urls[i % urls.len()].clone(),
                enrollment_token.clone(),
                fleet.dir.path().join(format!("agent-{i}")),
            );
            config.name = Some(format!("bench-{i}"));
            config.concurrency = 1;
            let agent = Agent::with_executor(config, recording.clone())
                .with_context(|| format!("Cannot configure agent {i}"))?;
            let shutdown = Shutdown::default();
            let task = tokio::spawn({
                let shutdown = shutdown.clone();
                async move {
                    // Said at once: a measurement waiting on this agent would only see a stall.
                    let ran = agent.run(shutdown).await;
                    if let Err(err) = &ran {
                        eprintln!("testbot-bench: agent {i} stopped: {err:#}");
                    }
                    ran
                }
            });
            fleet.agents.push((shutdown, task));
        }
        Ok(fleet)
    }

    /// Stops the agents (cancelling anything still running) and then the broker.
    pub async fn stop(self) -> anyhow::Result<()> {
        let BenchFleet {
            brokers,
            database,
            agents,
            dir,
            ..
        } = self;
        for (shutdown, _) in &agents {
            shutdown.drain.cancel();
            shutdown.hard.cancel();
        }
        let mut first_error = None;
        for (i, (_, task)) in agents.into_iter().enumerate() {
            let stopped = match tokio::time::timeout(STOP_TIMEOUT, task).await {
                Ok(Ok(ran)) => ran.with_context(|| format!("Agent {i} failed")),
                Ok(Err(join)) => {
                    Err(anyhow::Error::new(join).context(format!("Agent {i} panicked")))
                }
                Err(_) => Err(anyhow::anyhow!(
                    "Agent {i} did not stop within {STOP_TIMEOUT:?}"
                )),
            };
            if let Err(err) = stopped {
                first_error.get_or_insert(err);
            }
        }
        let mut broker_stopped = Ok(());
        for broker in brokers {
            let stopped = broker.shutdown().await.context("Cannot stop a broker");
            broker_stopped = broker_stopped.and(stopped);
        }
        drop(database);
        drop(dir);
        match first_error {
            Some(err) => Err(err),
            None => broker_stopped,
        }
    }
}
