//! `testbot-bench-idle`: one broker process with thousands of idle agents long-polling it.
//!
//! Starts `testbot-broker` as a process of its own (so its memory and CPU can be read from
//! `/proc`) on loopback with a fresh SQLite data directory, enrolls N agent identities through
//! the API, and keeps one signed long poll per identity held at the broker. The idle agents offer
//! a label no measured job asks for, so they are never woken. While they wait it reads the
//! broker's RSS and CPU use, and measures how fast a job reaches one real `testbot-agent` process
//! (noop executor) that does match: first with no idle fleet (the 1-agent baseline), then with
//! the fleet's polls held, then once more after the fleet stopped polling.
//!
//! Progress goes to stderr, the report to stdout.

#[path = "../stats.rs"]
#[allow(dead_code)] // Shared with `testbot-bench`; not every helper is used here.
mod stats;

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::Parser;
use futures_util::{StreamExt as _, TryStreamExt as _};
use ring::signature::Ed25519KeyPair;
use secrecy::SecretString;
use testbot_proto::agents::PollRequest;
use testbot_proto::client::{BrokerClient, Credentials};
use testbot_proto::jobs::{JobId, JobSpec, JobState};
use testbot_proto::sites::{EnrollRequest, EnrollmentTokenRequest};
use tokio::io::AsyncBufReadExt as _;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::stats::{ms, percentile};

/// The fleet size the targets are stated for.
const TARGET_AGENTS: usize = 10_000;
/// Target: the broker's resident memory with the fleet's polls held.
const TARGET_RSS_BYTES: u64 = 1 << 30;
/// Target: submit → start p50 with the idle fleet, relative to the 1-agent figure.
const TARGET_START_RATIO: f64 = 2.0;

/// The site every agent enrolls in.
const SITE: &str = "bench";
/// The label the idle agents offer; no measured job asks for it.
const IDLE_LABEL: &str = "idle";
/// The label the measuring agent offers and every measured job asks for, so idle agents never
/// match them.
const MEASURED_LABEL: &str = "measured";
/// The gauge of polls waiting at the broker now.
const POLLS_GAUGE: &str = "testbot_agents_connected";
/// The broker's queued → claimed histogram.
const DISPATCH_HISTOGRAM: &str = "testbot_dispatch_latency_seconds";

/// Jobs run before each latency measurement, not counted.
const WARMUP_JOBS: usize = 10;
/// The longest one step may make no progress (a job not finishing, no more polls held).
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle polls started at once; the next wave starts when these are held, so the broker's accept
/// queue never overflows.
const RAMP_WAVE: usize = 250;
/// How often the polls gauge is read while waiting on it.
const GAUGE_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Connections allowed beyond the fleet's: the measuring agent's poll and heartbeat, the
/// operator client, log followers, scrapes.
const CONNECTION_HEADROOM: usize = 1024;
/// Open files allowed beyond `--max-connections`: the database, its WAL, logs, the runtime.
const FD_HEADROOM: u64 = 1024;
/// How long a broker or agent may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle agent waits after a failed poll before polling again.
const POLL_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// How long to wait for the agent's "Job started." line of a finished job to be read.
const AGENT_LOG_WAIT: Duration = Duration::from_secs(5);
/// `/proc/PID/stat` counts CPU time in USER_HZ ticks, which Linux fixes at 100 per second.
const TICKS_PER_SEC: f64 = 100.0;

/// Starts a broker process, keeps N idle agents long-polling it, and reports its memory and CPU
/// and the submit → start latency of one real agent beside them. Progress goes to stderr, the
/// report to stdout.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Opts {
    /// Idle agents to enroll and keep long-polling.
    #[arg(long, env = "TESTBOT_BENCH_IDLE_AGENTS", default_value_t = TARGET_AGENTS)]
    agents: usize,
    /// Jobs per latency measurement, submitted one at a time.
    #[arg(long, env = "TESTBOT_BENCH_LATENCY_JOBS", default_value_t = 100)]
    latency_jobs: usize,
    /// Enrollment requests in flight at once.
    #[arg(long, env = "TESTBOT_BENCH_ENROLL_CONCURRENCY", default_value_t = 16)]
    enroll_concurrency: usize,
    /// The broker's --poll-timeout; every idle poll asks to be held this long.
    #[arg(long, env = "TESTBOT_BENCH_POLL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    poll_timeout: Duration,
    /// The broker's --max-connections. Default: --agents + 1024.
    #[arg(long, env = "TESTBOT_BENCH_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// How long the broker's CPU use is measured while the agents idle.
    #[arg(long, env = "TESTBOT_BENCH_IDLE_WINDOW", default_value = "10s", value_parser = humantime::parse_duration)]
    idle_window: Duration,
    /// The `testbot-broker` binary. Default: the one beside this program.
    #[arg(long, env = "TESTBOT_BENCH_BROKER_BIN")]
    broker_bin: Option<PathBuf>,
    /// The `testbot-agent` binary. Default: the one beside this program.
    #[arg(long, env = "TESTBOT_BENCH_AGENT_BIN")]
    agent_bin: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    testbot_proto::init_tracing("warn");
    match try_main(Opts::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("testbot-bench-idle: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn try_main(opts: Opts) -> anyhow::Result<()> {
    anyhow::ensure!(opts.agents >= 1, "--agents must be at least 1");
    anyhow::ensure!(opts.latency_jobs >= 1, "--latency-jobs must be at least 1");
    anyhow::ensure!(
        opts.enroll_concurrency >= 1,
        "--enroll-concurrency must be at least 1"
    );
    anyhow::ensure!(
        opts.poll_timeout >= Duration::from_secs(1),
        "--poll-timeout must be at least 1s"
    );
    let max_connections = opts
        .max_connections
        .unwrap_or(opts.agents + CONNECTION_HEADROOM);
    anyhow::ensure!(
        max_connections >= opts.agents + 16,
        "--max-connections {max_connections} leaves no room beside {} idle polls for the \
         measuring agent and the client; give at least {}",
        opts.agents,
        opts.agents + 16
    );
    let open_files = raise_open_file_limit(max_connections as u64 + FD_HEADROOM, &opts)?;
    let broker_bin = binary(opts.broker_bin.as_deref(), "testbot-broker", "--broker-bin")?;
    let agent_bin = binary(opts.agent_bin.as_deref(), "testbot-agent", "--agent-bin")?;
    let dir = tempfile::tempdir().context("Cannot create a temporary directory")?;
    let settings = Settings {
        agents: opts.agents,
        latency_jobs: opts.latency_jobs,
        enroll_concurrency: opts.enroll_concurrency,
        poll_timeout: opts.poll_timeout,
        idle_window: opts.idle_window,
        max_connections,
        open_files,
    };
    eprintln!(
        "testbot-bench-idle: {}; {} idle agents; broker --max-connections {max_connections}, \
         open-file limit {open_files}",
        machine(),
        opts.agents
    );
    let mut bench = Bench::start(&broker_bin, dir.path(), &settings)?;
    let outcome = bench.run(&settings, &agent_bin).await;
    if outcome.is_err() {
        eprintln!("{}", bench.logs());
    }
    let stopped = bench.stop().await;
    let report = outcome?;
    stopped?;
    std::io::stdout()
        .write_all(render_report(&settings, &report).as_bytes())
        .context("Cannot write the report")?;
    Ok(())
}

/// What a run was told, as the report states it.
struct Settings {
    agents: usize,
    latency_jobs: usize,
    enroll_concurrency: usize,
    poll_timeout: Duration,
    idle_window: Duration,
    max_connections: usize,
    open_files: u64,
}

/// Raises this process's soft open-file limit to `needed` (the broker and the agent inherit
/// it): this process holds one connection per idle agent, the broker one more per poll.
fn raise_open_file_limit(needed: u64, opts: &Opts) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).context("Cannot read the open-file limit")?;
    if soft >= needed {
        return Ok(soft);
    }
    if hard < needed {
        let fits = (hard.saturating_sub(FD_HEADROOM) as usize).saturating_sub(CONNECTION_HEADROOM);
        anyhow::bail!(
            "the hard open-file limit (RLIMIT_NOFILE) is {hard}, but {} idle agents need {needed} \
             open files, in this process and in the broker (--max-connections plus {FD_HEADROOM}): \
             raise the hard limit (as root: `ulimit -Hn {needed}`, or LimitNOFILE= for a service) \
             or run fewer agents (--agents {fits} fits)",
            opts.agents
        );
    }
    setrlimit(Resource::RLIMIT_NOFILE, needed, hard)
        .with_context(|| format!("Cannot raise the open-file limit to {needed}"))?;
    Ok(needed)
}

/// `flag`'s value, or `name` beside this program.
fn binary(given: Option<&Path>, name: &str, flag: &str) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()
            .context("Cannot find this program's path")?
            .parent()
            .context("This program's path has no directory")?
            .join(name),
    };
    anyhow::ensure!(
        path.is_file(),
        "{} does not exist: build it (cargo build --release -p testbot-broker -p testbot-agent) \
         or name it with {flag}",
        path.display()
    );
    Ok(path)
}

/// A child process, stopped with SIGTERM (SIGKILL if it does not stop), by its PID.
struct Proc {
    name: &'static str,
    pid: nix::unistd::Pid,
    child: tokio::process::Child,
}

impl Proc {
    fn spawn(name: &'static str, command: &mut tokio::process::Command) -> anyhow::Result<Proc> {
        // The benchmark's own settings are no business of the broker's or the agent's.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TESTBOT_") {
                command.env_remove(key);
            }
        }
        let child = command
            .stdin(Stdio::null())
            // A last resort: a benchmark that panics must not leave them behind.
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("Cannot start {name}"))?;
        let pid = child
            .id()
            .with_context(|| format!("{name} exited at once"))?;
        Ok(Proc {
            name,
            pid: nix::unistd::Pid::from_raw(pid as i32),
            child,
        })
    }

    /// Why the process is gone, if it is.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then waits for it to exit; SIGKILL if it does not within [`STOP_TIMEOUT`].
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(status) = self.exited() {
            anyhow::bail!("{} had exited by itself ({status})", self.name);
        }
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGTERM);
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => anyhow::bail!("{} exited {status} after SIGTERM", self.name),
            Ok(Err(err)) => {
                Err(anyhow::Error::new(err).context(format!("Cannot reap {}", self.name)))
            }
            Err(_) => {
                let _ = self.child.kill().await;
                anyhow::bail!(
                    "{} did not stop within {STOP_TIMEOUT:?} of SIGTERM and was killed",
                    self.name
                )
            }
        }
    }
}

/// What the measuring agent's log says: when it started each job (its own clock).
#[derive(Default)]
struct AgentLog {
    started: Mutex<HashMap<JobId, SystemTime>>,
    /// The last lines, for an error message.
    tail: Mutex<VecDeque<String>>,
}

impl AgentLog {
    const TAIL_LINES: usize = 20;

    fn record(&self, line: String) {
        if let Some((id, at)) = parse_started(&line) {
            self.started
                .lock()
                .expect("agent log poisoned")
                .entry(id)
                .or_insert(at);
        }
        let mut tail = self.tail.lock().expect("agent log poisoned");
        if tail.len() == Self::TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }

    /// When the agent started job `id`; waits a moment for the line to be read.
    async fn started(&self, id: JobId) -> anyhow::Result<SystemTime> {
        let deadline = Instant::now() + AGENT_LOG_WAIT;
        loop {
            if let Some(at) = self.started.lock().expect("agent log poisoned").get(&id) {
                return Ok(*at);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "job {id} finished, but the agent's log has no \"Job started.\" line for it \
                 (has its format changed?)"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn tail(&self) -> String {
        let tail = self.tail.lock().expect("agent log poisoned");
        tail.iter().map(|line| format!("  {line}\n")).collect()
    }
}

/// The agent's `Job started.` event (`testbot_agent::job`, logged once the broker has marked the
/// job running): its job id and the event's timestamp (RFC 3339, microseconds).
///
/// `2026-01-01T12:00:00.123456Z  INFO worker{slot=0}:job{job_id=7}: testbot_agent::job: Job
/// started. job_id=7 attempt=1`
fn parse_started(line: &str) -> Option<(JobId, SystemTime)> {
    let (_, rest) = line.split_once("Job started.")?;
    let id = rest
        .split_whitespace()
        .find_map(|field| field.strip_prefix("job_id="))?
        .parse()
        .ok()?;
    let at = humantime::parse_rfc3339(line.split_whitespace().next()?).ok()?;
    Some((id, at))
}

/// Reads the broker's `/metrics`.
#[derive(Clone)]
struct Scraper {
    http: reqwest::Client,
    url: String,
}

impl Scraper {
    fn new(base: &str) -> anyhow::Result<Scraper> {
        testbot_proto::client::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .tls_certs_only(Vec::new())
            .build()
            .context("Cannot build an HTTP client")?;
        Ok(Scraper {
            http,
            url: format!("{base}/metrics"),
        })
    }

    /// The sum of every sample of metric `name` (over all its label values).
    async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(&self.url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .context("Cannot read the broker's /metrics")?
            .text()
            .await
            .context("Cannot read the broker's /metrics")?;
        let mut sum = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if series.split('{').next() == Some(name) {
                let value: f64 = value
                    .parse()
                    .with_context(|| format!("/metrics: {line:?} has no number"))?;
                *sum.get_or_insert(0.0) += value;
            }
        }
        sum.with_context(|| format!("/metrics has no {name}"))
    }

    async fn polls_held(&self) -> anyhow::Result<usize> {
        Ok(self.metric(POLLS_GAUGE).await? as usize)
    }

    /// Waits until at least `target` polls are held. Fails when the count has not grown for
    /// [`STALL_TIMEOUT`].
    async fn wait_polls(
        &self,
        target: usize,
        what: &str,
        fleet: Option<&PollCounters>,
    ) -> anyhow::Result<usize> {
        let mut best = 0;
        let mut progressed = Instant::now();
        loop {
            let held = self.polls_held().await?;
            if held >= target {
                return Ok(held);
            }
            if held > best {
                best = held;
                progressed = Instant::now();
            }
            if progressed.elapsed() > STALL_TIMEOUT {
                anyhow::bail!(
                    "only {held} of {target} polls are held ({what}), and no more for \
                     {STALL_TIMEOUT:?}{}",
                    fleet.map_or_else(String::new, |f| format!(
                        "; the idle agents: {}",
                        f.describe()
                    ))
                );
            }
            tokio::time::sleep(GAUGE_CHECK_INTERVAL).await;
        }
    }

    /// Waits until at most `target` polls are held; how long that took, or None if not within
    /// `limit`.
    async fn wait_polls_at_most(
        &self,
        target: usize,
        limit: Duration,
    ) -> anyhow::Result<Option<Duration>> {
        let began = Instant::now();
        loop {
            if self.polls_held().await? <= target {
                return Ok(Some(began.elapsed()));
            }
            if began.elapsed() > limit {
                return Ok(None);
            }
            tokio::time::sleep(GAUGE_CHECK_INTERVAL).await;
        }
    }
}

/// What the idle agents' polls came back with.
#[derive(Default)]
struct PollCounters {
    /// Polls the broker answered `204`: the wait ran out with no work, as it should.
    empty: AtomicU64,
    /// Polls that came back with a job: an idle agent was offered a job it cannot take.
    assigned: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl PollCounters {
    fn describe(&self) -> String {
        let first = self
            .first_error
            .lock()
            .expect("poll counters poisoned")
            .clone();
        format!(
            "{} polls answered empty, {} with a job, {} failed{}",
            self.empty.load(Ordering::Relaxed),
            self.assigned.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            first.map_or_else(String::new, |e| format!(" (first: {e})"))
        )
    }
}

/// An enrolled idle agent.
struct Identity {
    index: usize,
    name: String,
    agent_id: String,
    key: Arc<Ed25519KeyPair>,
}

/// The load generator: one task per idle agent, each looping a signed long poll.
struct IdleFleet {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    counters: Arc<PollCounters>,
}

impl IdleFleet {
    fn new() -> IdleFleet {
        IdleFleet {
            stop: CancellationToken::new(),
            tasks: JoinSet::new(),
            counters: Arc::default(),
        }
    }

    /// Starts `identity`'s poll loop. Its first poll asks for the wait that makes it end at the
    /// identity's place in the poll cycle (`index / agents` of the poll timeout after
    /// `cycle_start`), so the fleet's polls end spread evenly over the timeout, as those of
    /// agents started at different times do, rather than all together; every later poll asks
    /// for the whole timeout.
    fn spawn(
        &mut self,
        shared: &BrokerClient,
        identity: Identity,
        agents: usize,
        poll_timeout: Duration,
        cycle_start: Instant,
    ) {
        let cycle_ms = poll_timeout.as_millis() as u64;
        let place_ms = cycle_ms * identity.index as u64 / agents as u64;
        let into_cycle_ms = cycle_start.elapsed().as_millis() as u64 % cycle_ms;
        let first_wait_ms = match (place_ms + cycle_ms - into_cycle_ms) % cycle_ms {
            0 => cycle_ms,
            wait => wait,
        };
        let client = shared.sharing_connections(Credentials::Agent {
            id: identity.agent_id,
            key: identity.key,
        });
        let request = PollRequest {
            agent: identity.name,
            labels: vec![IDLE_LABEL.into()],
            executor: "noop".into(),
            wait_ms: Some(first_wait_ms),
            policy: None,
            workflow_jobs_without_policy: false,
        };
        self.tasks.spawn(idle_agent(
            client,
            request,
            cycle_ms,
            self.stop.clone(),
            self.counters.clone(),
        ));
    }

    /// Cancels every poll (closing its connection) and waits for the tasks to end.
    async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// One idle agent: polls until told to stop.
async fn idle_agent(
    client: BrokerClient,
    mut request: PollRequest,
    wait_ms: u64,
    stop: CancellationToken,
    counters: Arc<PollCounters>,
) {
    loop {
        let polled = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            polled = client.poll(&request) => polled,
        };
        request.wait_ms = Some(wait_ms);
        match polled {
            Ok(None) => {
                counters.empty.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(assignment)) => {
                counters.assigned.fetch_add(1, Ordering::Relaxed);
                counters
                    .first_error
                    .lock()
                    .expect("poll counters poisoned")
                    .get_or_insert_with(|| {
                        format!(
                            "idle agent {} was offered job {}",
                            request.agent, assignment.job_id
                        )
                    });
            }
            Err(err) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                counters
                    .first_error
                    .lock()
                    .expect("poll counters poisoned")
                    .get_or_insert_with(|| format!("{}: {err}", request.agent));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(POLL_ERROR_PAUSE) => {}
                }
            }
        }
    }
}

/// The broker process, the measuring agent process and the idle fleet.
struct Bench {
    dir: PathBuf,
    url: String,
    scraper: Scraper,
    broker: Option<Proc>,
    agent: Option<Proc>,
    agent_log: Arc<AgentLog>,
    fleet: Option<IdleFleet>,
}

impl Bench {
    /// Starts the broker (answering or not).
    fn start(broker_bin: &Path, dir: &Path, settings: &Settings) -> anyhow::Result<Bench> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("Cannot find a free port")?
            .port();
        let listen = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("broker.log"))?;
        let request_timeout =
            (settings.poll_timeout + Duration::from_secs(30)).max(Duration::from_secs(60));
        let mut command = tokio::process::Command::new(broker_bin);
        command
            .arg("--listen")
            .arg(&listen)
            .arg("--data-dir")
            .arg(dir.join("broker"))
            .arg("--max-connections")
            .arg(settings.max_connections.to_string())
            .arg("--poll-timeout")
            .arg(humantime::format_duration(settings.poll_timeout).to_string())
            .arg("--request-timeout")
            .arg(humantime::format_duration(request_timeout).to_string())
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log);
        let broker = Proc::spawn("the broker", &mut command)?;
        let url = format!("http://{listen}");
        Ok(Bench {
            dir: dir.to_path_buf(),
            scraper: Scraper::new(&url)?,
            url,
            broker: Some(broker),
            agent: None,
            agent_log: Arc::default(),
            fleet: None,
        })
    }

    fn broker_pid(&self) -> nix::unistd::Pid {
        self.broker.as_ref().expect("the broker runs").pid
    }

    async fn run(&mut self, settings: &Settings, agent_bin: &Path) -> anyhow::Result<Report> {
        let agents = settings.agents;
        let operator = self.wait_ready().await?;
        operator
            .create_site(SITE)
            .await
            .context("Cannot create the site")?;
        self.start_agent(&operator, agent_bin, settings.poll_timeout)
            .await?;
        self.scraper
            .wait_polls(1, "the measuring agent's", None)
            .await?;

        eprintln!("testbot-bench-idle: measuring with no idle fleet (the 1-agent baseline)");
        let pid = self.broker_pid();
        let baseline_memory = Memory::read(pid)?;
        let baseline_cpu = cpu_window(pid, settings.idle_window).await?;
        let baseline = self.measure(&operator, settings.latency_jobs).await?;
        eprintln!("  {}", baseline.summary());

        eprintln!(
            "testbot-bench-idle: enrolling {agents} agents, {} at a time",
            settings.enroll_concurrency
        );
        let shared = BrokerClient::new(&self.url, SecretString::from(String::new()))?;
        let token = operator
            .create_enrollment_token(
                SITE,
                &EnrollmentTokenRequest {
                    uses: u32::try_from(agents).context("--agents is too large")?,
                    ttl_secs: 24 * 3600,
                },
            )
            .await
            .context("Cannot issue the fleet's enrollment token")?;
        let began = Instant::now();
        let identities =
            enroll_fleet(&shared, &token.token, agents, settings.enroll_concurrency).await?;
        let enrollment = began.elapsed();
        eprintln!(
            "  {agents} enrolled in {:.1} s ({:.0}/s)",
            enrollment.as_secs_f64(),
            agents as f64 / enrollment.as_secs_f64()
        );

        eprintln!("testbot-bench-idle: starting {agents} idle polls, {RAMP_WAVE} at a time");
        let began = Instant::now();
        let fleet = self.fleet.insert(IdleFleet::new());
        let counters = fleet.counters.clone();
        let mut identities = identities.into_iter().peekable();
        let mut started = 0;
        while identities.peek().is_some() {
            for identity in identities.by_ref().take(RAMP_WAVE) {
                fleet.spawn(&shared, identity, agents, settings.poll_timeout, began);
                started += 1;
            }
            self.scraper
                .wait_polls(started, "idle agents'", Some(&counters))
                .await?;
            if started.is_multiple_of(RAMP_WAVE * 8) {
                eprintln!("  {started} held");
            }
        }
        self.scraper
            .wait_polls(
                agents + 1,
                "idle agents' and the measuring agent's",
                Some(&counters),
            )
            .await?;
        let ramp = began.elapsed();
        eprintln!("  all {agents} held after {:.1} s", ramp.as_secs_f64());

        let held_memory = Memory::read(pid)?;
        let open_files = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|entries| entries.count())
            .ok();
        let answered_before = counters.empty.load(Ordering::Relaxed);
        let own_before = cpu_ticks(nix::unistd::Pid::this());
        let idle_cpu = cpu_window(pid, settings.idle_window).await?;
        let own_cpu = own_before
            .zip(cpu_ticks(nix::unistd::Pid::this()))
            .map(|(before, after)| {
                (after - before) / TICKS_PER_SEC / settings.idle_window.as_secs_f64()
            });
        let polls_per_sec = (counters.empty.load(Ordering::Relaxed) - answered_before) as f64
            / settings.idle_window.as_secs_f64();
        eprintln!(
            "  broker RSS {} (peak {}), CPU {:.1} % of a core; {polls_per_sec:.0} polls/s answered",
            mib(held_memory.rss),
            mib(held_memory.peak),
            idle_cpu * 100.0
        );
        eprintln!("testbot-bench-idle: measuring with {agents} idle agents polling");
        let with_fleet = self.measure(&operator, settings.latency_jobs).await?;
        eprintln!("  {}", with_fleet.summary());
        let held_after = self.scraper.polls_held().await?;
        let fleet_memory = Memory::read(pid)?;
        let fleet_polls = counters.describe();
        anyhow::ensure!(
            counters.assigned.load(Ordering::Relaxed) == 0,
            "an idle agent was offered a job: {fleet_polls}"
        );

        eprintln!("testbot-bench-idle: stopping the idle polls");
        if let Some(fleet) = self.fleet.take() {
            fleet.stop().await;
        }
        let released = self
            .scraper
            .wait_polls_at_most(1, settings.poll_timeout * 2)
            .await?;
        let stopped_memory = Memory::read(pid)?;
        eprintln!(
            "testbot-bench-idle: measuring again with the {agents} agents enrolled but not polling"
        );
        let after = self.measure(&operator, settings.latency_jobs).await?;
        eprintln!("  {}", after.summary());
        Ok(Report {
            baseline,
            with_fleet,
            after,
            baseline_memory,
            held_memory,
            fleet_memory,
            stopped_memory,
            baseline_cpu,
            idle_cpu,
            own_cpu,
            polls_per_sec,
            open_files,
            enrollment,
            ramp,
            held_after,
            released,
            fleet_polls,
        })
    }

    /// Waits until the broker answers; a client with its operator token.
    async fn wait_ready(&mut self) -> anyhow::Result<BrokerClient> {
        let anonymous = BrokerClient::new(&self.url, SecretString::from(String::new()))?;
        let deadline = Instant::now() + STALL_TIMEOUT;
        loop {
            if let Some(status) = self.broker.as_mut().and_then(Proc::exited) {
                anyhow::bail!("the broker exited ({status}) instead of serving");
            }
            if anonymous.health().await.is_ok() {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the broker did not answer within {STALL_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The broker writes the token file before it listens.
        let token = std::fs::read_to_string(self.dir.join("broker/admin.token"))
            .context("Cannot read the broker's admin.token")?;
        Ok(BrokerClient::new(
            &self.url,
            SecretString::from(token.trim().to_string()),
        )?)
    }

    /// Starts one `testbot-agent` with the noop executor offering [`MEASURED_LABEL`], its log
    /// read for its "Job started." lines.
    async fn start_agent(
        &mut self,
        operator: &BrokerClient,
        agent_bin: &Path,
        poll_wait: Duration,
    ) -> anyhow::Result<()> {
        let token = operator
            .create_enrollment_token(SITE, &EnrollmentTokenRequest::default())
            .await
            .context("Cannot issue the agent's enrollment token")?;
        let token_file = self.dir.join("agent.token");
        std::fs::write(&token_file, &token.token)?;
        let config = self.dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "broker_url = \"{}\"\nenrollment_token_file = \"{}\"\nname = \"measuring\"\n\
                 labels = [\"{MEASURED_LABEL}\"]\nexecutor = \"noop\"\nconcurrency = 1\n\
                 work_dir = \"{}\"\nstate_dir = \"{}\"\npoll_wait = \"{}\"\n",
                self.url,
                token_file.display(),
                self.dir.join("agent/work").display(),
                self.dir.join("agent/state").display(),
                humantime::format_duration(poll_wait)
            ),
        )?;
        let mut command = tokio::process::Command::new(agent_bin);
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            // Only the job lines: each job's "Job started." is the measurement.
            .env("RUST_LOG", "warn,testbot_agent::job=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut agent = Proc::spawn("the agent", &mut command)?;
        let stderr = agent
            .child
            .stderr
            .take()
            .context("The agent has no stderr")?;
        self.agent = Some(agent);
        let log = self.agent_log.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                log.record(line);
            }
        });
        Ok(())
    }

    /// [`WARMUP_JOBS`] jobs, then `count` measured ones, one at a time.
    async fn measure(&self, operator: &BrokerClient, count: usize) -> anyhow::Result<Phase> {
        run_jobs(operator, WARMUP_JOBS)
            .await
            .context("Warm-up failed")?;
        let dispatch_before = self.dispatch_histogram().await?;
        let jobs = run_jobs(operator, count).await?;
        let dispatch_after = self.dispatch_histogram().await?;
        let dispatched = dispatch_after.1 - dispatch_before.1;
        let dispatch_mean = (dispatched > 0.0)
            .then(|| Duration::from_secs_f64((dispatch_after.0 - dispatch_before.0) / dispatched));
        let mut phase = Phase {
            start: Vec::with_capacity(count),
            start_broker: Vec::with_capacity(count),
            seen: Vec::with_capacity(count),
            dispatch_mean,
        };
        for job in jobs {
            let started = self.agent_log.started(job.id).await?;
            phase
                .start
                .push(started.duration_since(job.submitted).unwrap_or_default());
            let record = operator
                .job(job.id)
                .await
                .with_context(|| format!("Cannot read job {}", job.id))?;
            anyhow::ensure!(
                record.state == JobState::Succeeded,
                "job {} ended {}: {}",
                job.id,
                record.state,
                record.reason.as_deref().unwrap_or("no reason given")
            );
            let started_ms = record
                .started_at_ms
                .with_context(|| format!("job {} has no start time", job.id))?;
            phase.start_broker.push(Duration::from_millis(
                (started_ms - record.created_at_ms).max(0) as u64,
            ));
            phase.seen.push(job.seen);
        }
        Ok(phase)
    }

    /// The sum and count of the broker's dispatch latency histogram.
    async fn dispatch_histogram(&self) -> anyhow::Result<(f64, f64)> {
        Ok((
            self.scraper
                .metric(&format!("{DISPATCH_HISTOGRAM}_sum"))
                .await?,
            self.scraper
                .metric(&format!("{DISPATCH_HISTOGRAM}_count"))
                .await?,
        ))
    }

    /// The last lines of the broker's and the agent's logs.
    fn logs(&self) -> String {
        let broker = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
        let lines: Vec<&str> = broker.lines().collect();
        let tail: String = lines[lines.len().saturating_sub(20)..]
            .iter()
            .map(|line| format!("  {line}\n"))
            .collect();
        format!(
            "The broker's log ends:\n{tail}The agent's log ends:\n{}",
            self.agent_log.tail()
        )
    }

    /// Stops the idle polls, then the agent, then the broker; the first failure.
    async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(fleet) = self.fleet.take() {
            fleet.stop().await;
        }
        let mut stopped = Ok(());
        for process in [self.agent.take(), self.broker.take()]
            .into_iter()
            .flatten()
        {
            let result = process.stop().await;
            if stopped.is_ok() {
                stopped = result;
            }
        }
        stopped
    }
}

/// Enrolls `count` agents with fresh Ed25519 keys, `concurrency` at a time.
async fn enroll_fleet(
    client: &BrokerClient,
    token: &str,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Identity>> {
    let done = AtomicUsize::new(0);
    let done = &done;
    futures_util::stream::iter(0..count)
        .map(|index| async move {
            let (pkcs8, public_key) =
                testbot_proto::signing::generate_key().map_err(anyhow::Error::msg)?;
            let key = Ed25519KeyPair::from_pkcs8(&pkcs8)
                .map_err(|err| anyhow::anyhow!("The generated key is unusable: {err}"))?;
            let name = format!("idle-{index}");
            let enrollment = client
                .enroll(&EnrollRequest {
                    enrollment_token: token.to_string(),
                    name: name.clone(),
                    public_key,
                    policy: None,
                })
                .await
                .with_context(|| format!("Cannot enroll agent {name}"))?;
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_multiple_of(2000) {
                eprintln!("  {n} enrolled");
            }
            anyhow::Ok(Identity {
                index,
                name,
                agent_id: enrollment.agent_id,
                key: Arc::new(key),
            })
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await
}

/// One measured job: when it was submitted (wall clock, to compare with the agent's), and how
/// long until the client following its log saw it end.
struct RanJob {
    id: JobId,
    submitted: SystemTime,
    seen: Duration,
}

/// Submits `count` jobs for the measuring agent, each once the previous one has finished.
async fn run_jobs(operator: &BrokerClient, count: usize) -> anyhow::Result<Vec<RanJob>> {
    let spec = JobSpec {
        script: "true".into(),
        labels: vec![MEASURED_LABEL.into()],
        ..Default::default()
    };
    let mut jobs = Vec::with_capacity(count);
    for _ in 0..count {
        let submitted = SystemTime::now();
        let submit_at = Instant::now();
        let job = operator
            .submit(&spec)
            .await
            .context("Cannot submit a job")?;
        tokio::time::timeout(STALL_TIMEOUT, wait_finished(operator, job.id))
            .await
            .with_context(|| format!("Job {} did not finish within {STALL_TIMEOUT:?}", job.id))??;
        jobs.push(RanJob {
            id: job.id,
            submitted,
            seen: submit_at.elapsed(),
        });
    }
    Ok(jobs)
}

/// Follows the job's log until the broker closes it, which it does when the job has its result.
async fn wait_finished(client: &BrokerClient, id: JobId) -> anyhow::Result<()> {
    let stream = client
        .log_stream(id, 0, true)
        .await
        .with_context(|| format!("Cannot follow the log of job {id}"))?;
    let mut stream = std::pin::pin!(stream);
    while let Some(bytes) = stream.next().await {
        bytes.with_context(|| format!("The log of job {id} broke off"))?;
    }
    Ok(())
}

/// The latency samples of one phase.
struct Phase {
    /// Submit → the agent logs "Job started." (its clock; the broker has marked it running).
    start: Vec<Duration>,
    /// `created_at_ms` → `started_at_ms`: the broker's clock, to the millisecond.
    start_broker: Vec<Duration>,
    /// Submit → the client following the job's log sees it end.
    seen: Vec<Duration>,
    /// The broker's mean queued → claimed time over the measured jobs.
    dispatch_mean: Option<Duration>,
}

impl Phase {
    fn p(samples: &[Duration], p: f64) -> f64 {
        percentile(samples, p).map_or(f64::NAN, ms)
    }

    fn start_p50(&self) -> f64 {
        Phase::p(&self.start, 50.0)
    }

    fn summary(&self) -> String {
        format!(
            "start p50 {:.2} ms, p99 {:.2} ms; seen p50 {:.2} ms, p99 {:.2} ms",
            self.start_p50(),
            Phase::p(&self.start, 99.0),
            Phase::p(&self.seen, 50.0),
            Phase::p(&self.seen, 99.0)
        )
    }
}

/// A process's resident memory now and at its peak, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss: u64,
    peak: u64,
}

impl Memory {
    fn read(pid: nix::unistd::Pid) -> anyhow::Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("Cannot read /proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let kib: u64 = status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().strip_suffix("kB"))
                .and_then(|n| n.trim().parse().ok())
                .with_context(|| format!("/proc/{pid}/status has no {name}"))?;
            Ok(kib * 1024)
        };
        Ok(Memory {
            rss: field("VmRSS:")?,
            peak: field("VmHWM:")?,
        })
    }
}

/// CPU ticks (user and system) a process has used, from `/proc/PID/stat`.
fn cpu_ticks(pid: nix::unistd::Pid) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces: state is
    // field 3, utime 14 and stime 15.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The cores process `pid` kept busy over `window`.
async fn cpu_window(pid: nix::unistd::Pid, window: Duration) -> anyhow::Result<f64> {
    let read = || cpu_ticks(pid).with_context(|| format!("Cannot read /proc/{pid}/stat"));
    let before = read()?;
    let began = Instant::now();
    tokio::time::sleep(window).await;
    Ok((read()? - before) / TICKS_PER_SEC / began.elapsed().as_secs_f64())
}

/// Everything the report shows.
struct Report {
    baseline: Phase,
    with_fleet: Phase,
    after: Phase,
    baseline_memory: Memory,
    /// Once every poll was held.
    held_memory: Memory,
    /// After the measurement with the fleet.
    fleet_memory: Memory,
    /// After the fleet stopped polling.
    stopped_memory: Memory,
    baseline_cpu: f64,
    idle_cpu: f64,
    /// This process (the load generator) over the same window.
    own_cpu: Option<f64>,
    polls_per_sec: f64,
    open_files: Option<usize>,
    enrollment: Duration,
    ramp: Duration,
    /// Polls held right after the measurement with the fleet.
    held_after: usize,
    /// How long the broker took to let go of the polls once the fleet disconnected.
    released: Option<Duration>,
    fleet_polls: String,
}

fn render_report(settings: &Settings, report: &Report) -> String {
    use std::fmt::Write as _;
    let Settings {
        agents,
        latency_jobs,
        enroll_concurrency,
        poll_timeout,
        idle_window,
        max_connections,
        open_files,
    } = *settings;
    let poll_timeout_text = humantime::format_duration(poll_timeout);
    let window = idle_window.as_secs_f64();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "testbot-bench-idle on {}; SQLite; testbot-broker process with --poll-timeout \
         {poll_timeout_text}, --max-connections {max_connections}, open-file limit {open_files}",
        machine()
    );
    let _ = writeln!(
        out,
        "{agents} idle agents, each holding one signed long poll (labels [{IDLE_LABEL}]); \
         latency: {latency_jobs} jobs one at a time (after {WARMUP_JOBS} warm-up jobs) to one \
         testbot-agent process (noop executor, labels [{MEASURED_LABEL}])."
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| phase | polls held | start p50 | start p99 | start (broker) p50 | start (broker) p99 | dispatch mean (broker) | seen p50 | seen p99 |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (name, held, phase) in [
        (
            "no idle fleet (1-agent baseline)",
            "1".to_string(),
            &report.baseline,
        ),
        (
            &format!("{agents} idle agents polling"),
            format!("{}", agents + 1),
            &report.with_fleet,
        ),
        (
            &format!("after: {agents} enrolled, not polling"),
            "1".to_string(),
            &report.after,
        ),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {held} | {:.2} ms | {:.2} ms | {:.0} ms | {:.0} ms | {} | {:.2} ms | {:.2} ms |",
            phase.start_p50(),
            Phase::p(&phase.start, 99.0),
            Phase::p(&phase.start_broker, 50.0),
            Phase::p(&phase.start_broker, 99.0),
            phase
                .dispatch_mean
                .map_or_else(|| "–".to_string(), |d| format!("{:.2} ms", ms(d))),
            Phase::p(&phase.seen, 50.0),
            Phase::p(&phase.seen, 99.0),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "start: submit → the agent logs \"Job started.\" (after the broker marked the job \
         running), on one machine's clock, to the microsecond. start (broker): the job's \
         created_at_ms → started_at_ms, to the millisecond. dispatch mean: the broker's \
         {DISPATCH_HISTOGRAM} (queued → claimed), mean over the measured jobs. seen: submit → the \
         client following the job's log sees it end."
    );
    let _ = writeln!(out);
    let per_agent = |memory: Memory| {
        memory.rss.saturating_sub(report.baseline_memory.rss) as f64 / agents as f64 / 1024.0
    };
    let _ = writeln!(out, "| fleet | |");
    let _ = writeln!(out, "|---|--:|");
    let rows = [
        (
            format!("enrolling {agents} agents ({enroll_concurrency} at a time)"),
            format!(
                "{:.1} s ({:.0}/s)",
                report.enrollment.as_secs_f64(),
                agents as f64 / report.enrollment.as_secs_f64()
            ),
        ),
        (
            format!("from the first idle poll until all {agents} are held"),
            format!("{:.1} s", report.ramp.as_secs_f64()),
        ),
        (
            "broker RSS, no idle fleet".to_string(),
            mib(report.baseline_memory.rss),
        ),
        (
            format!("broker RSS, {agents} polls held"),
            format!(
                "{} ({:.1} KiB per agent)",
                mib(report.held_memory.rss),
                per_agent(report.held_memory)
            ),
        ),
        (
            "broker RSS after the measurement with them".to_string(),
            mib(report.fleet_memory.rss),
        ),
        (
            "broker peak RSS (VmHWM), enrollment included".to_string(),
            mib(report.fleet_memory.peak),
        ),
        (
            "broker RSS after the idle agents disconnected".to_string(),
            mib(report.stopped_memory.rss),
        ),
        (
            format!("broker open files, {agents} polls held"),
            report
                .open_files
                .map_or_else(|| "–".to_string(), |n| n.to_string()),
        ),
        (
            format!("broker CPU, no idle fleet ({window:.0} s)"),
            format!("{:.1} % of a core", report.baseline_cpu * 100.0),
        ),
        (
            format!("broker CPU, {agents} polls held ({window:.0} s)"),
            format!(
                "{:.1} % of a core ({:.0} polls/s answered)",
                report.idle_cpu * 100.0,
                report.polls_per_sec
            ),
        ),
        (
            "load generator CPU (this process), same window".to_string(),
            report.own_cpu.map_or_else(
                || "–".to_string(),
                |c| format!("{:.1} % of a core", c * 100.0),
            ),
        ),
        (
            "polls held right after the measurement".to_string(),
            format!("{} of {}", report.held_after, agents + 1),
        ),
        (
            "until the broker let go of the disconnected polls".to_string(),
            report.released.map_or_else(
                || format!("more than {}", humantime::format_duration(poll_timeout * 2)),
                |d| format!("{:.1} s", d.as_secs_f64()),
            ),
        ),
        ("idle agents' polls".to_string(), report.fleet_polls.clone()),
    ];
    for (name, value) in rows {
        let _ = writeln!(out, "| {name} | {value} |");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Targets:");
    let judged = if agents >= TARGET_AGENTS {
        None
    } else {
        Some(format!(
            " (measured with {agents} idle agents, not {TARGET_AGENTS}: no verdict)"
        ))
    };
    let verdict = |met: bool| {
        judged
            .clone()
            .unwrap_or_else(|| if met { ": met" } else { ": MISSED" }.to_string())
    };
    let peak = report.fleet_memory.peak;
    let _ = writeln!(
        out,
        "  broker RSS ≤ {} with {TARGET_AGENTS} idle agents: peak {}{}",
        mib(TARGET_RSS_BYTES),
        mib(peak),
        verdict(peak <= TARGET_RSS_BYTES)
    );
    let ratio = report.with_fleet.start_p50() / report.baseline.start_p50();
    let _ = writeln!(
        out,
        "  submit → start p50 with {TARGET_AGENTS} idle agents ≤ {TARGET_START_RATIO}× the \
         1-agent figure: {:.2} ms vs {:.2} ms ({ratio:.2}×){}",
        report.with_fleet.start_p50(),
        report.baseline.start_p50(),
        verdict(ratio <= TARGET_START_RATIO)
    );
    out
}

/// Bytes as MiB, for the report.
fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The CPU count and model, for the report.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs ({model})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_agents_job_started_line() {
        let line = "2026-01-01T12:00:00.123456Z  INFO worker{slot=0}:job{job_id=7}: \
                    testbot_agent::job: Job started. job_id=7 attempt=1";
        let (id, at) = parse_started(line).unwrap();
        assert_eq!(id, JobId(7));
        assert_eq!(
            at.duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros()
                % 1_000_000,
            123_456
        );
        assert_eq!(
            parse_started("2026-01-01T12:00:00Z  INFO testbot_agent::job: Job finished."),
            None
        );
    }
}
