//! A chaos run: jobs through real brokers and agents while processes are killed with SIGKILL
//! and restarted, and a fault-injecting proxy between the agents and the brokers drops, delays
//! and resets connections. At the end every job must have exactly one result and exactly the
//! log it printed, once, in order (a lost lease's attempt may come first, and then the log
//! says so), and no process may have panicked.
//!
//! Everything random comes from one seed, printed first, so a failure can be replayed
//! (`testbot-chaos --seed N`). The timing of processes is not replayable, the choices are.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret as _, SecretString};
use testbot_proto::client::BrokerClient;
use testbot_proto::jobs::{Job, JobId, JobListQuery, JobSpec, JobState};
use testbot_proto::logs::{Stream, parse_line};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::{BrokerProcess, Process, free_port, wait_for};

/// A small, seedable generator (xorshift64*): the run's choices, reproducible from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the proxy does to connections, in percent of connections.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Closed at once, before anything is forwarded.
    pub drop: u64,
    /// Reset (RST) after a random number of bytes.
    pub reset: u64,
    /// Each forwarded piece delayed by up to `max_delay`.
    pub delay: u64,
    pub max_delay: Duration,
}

impl Faults {
    pub const NONE: Faults = Faults {
        drop: 0,
        reset: 0,
        delay: 0,
        max_delay: Duration::ZERO,
    };
}

/// A TCP proxy on loopback in front of several brokers, as a load balancer would be: each
/// connection goes to the next broker that accepts it, and may meet a fault.
pub struct Proxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstreams: Vec<SocketAddr>, faults: Faults, seed: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().unwrap();
        let rng = Arc::new(Mutex::new(Rng::new(seed)));
        let task = tokio::spawn(async move {
            let mut next = 0usize;
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                next = next.wrapping_add(1);
                let (fault_seed, drop) = {
                    let mut rng = rng.lock().unwrap();
                    (rng.next_u64(), rng.percent(faults.drop))
                };
                if drop {
                    continue; // Dropped: closed before anything is forwarded.
                }
                let upstreams = upstreams.clone();
                tokio::spawn(async move {
                    for i in 0..upstreams.len() {
                        let target = upstreams[(next + i) % upstreams.len()];
                        if let Ok(server) = TcpStream::connect(target).await {
                            let _ = server.set_nodelay(true);
                            forward(client, server, faults, Rng::new(fault_seed)).await;
                            return;
                        }
                    }
                });
            }
        });
        Proxy { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways until both sides close, applying the connection's faults.
async fn forward(client: TcpStream, server: TcpStream, faults: Faults, mut rng: Rng) {
    let reset_after = rng
        .percent(faults.reset)
        .then(|| 1 + rng.below(4096) as usize);
    let delay = rng.percent(faults.delay).then_some(faults.max_delay);
    let budget = Arc::new(AtomicUsize::new(reset_after.unwrap_or(usize::MAX)));
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pipe(
        client_read,
        server_write,
        delay,
        budget.clone(),
        rng.next_u64(),
    );
    let down = pipe(server_read, client_write, delay, budget, rng.next_u64());
    tokio::pin!(up, down);
    let (first, up_done) = tokio::select! {
        flow = &mut up => (flow, true),
        flow = &mut down => (flow, false),
    };
    if first == Flow::Reset {
        return; // Dropping the other direction closes both sockets.
    }
    if up_done {
        down.await;
    } else {
        up.await;
    }
}

/// How one direction of a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Closed,
    Reset,
}

/// Copies `from` to `to` until `from` closes, or until the connection's byte budget is spent:
/// then the connection is reset (SO_LINGER 0 makes the close an RST).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Option<Duration>,
    budget: Arc<AtomicUsize>,
    seed: u64,
) -> Flow {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return Flow::Closed;
            }
            Ok(n) => n,
        };
        if let Some(max) = delay {
            let ms = rng.below(max.as_millis() as u64 + 1);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let left = budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n))
            })
            .unwrap_or(0);
        if left <= n {
            let _ = to.write_all(&buf[..left]).await;
            // Linger 0 never blocks: the close sends RST at once, which is the point.
            #[allow(deprecated)]
            let _ = to.as_ref().set_linger(Some(Duration::ZERO));
            return Flow::Reset;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return Flow::Closed;
        }
    }
}

/// One kind of job in the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Prints one line and succeeds.
    Instant,
    /// Prints 20 lines 100 ms apart (2 s) and succeeds.
    Long,
    /// Prints one line and exits 3.
    Failing,
}

impl Kind {
    fn script(self, n: usize) -> String {
        match self {
            Kind::Instant => format!("echo job {n} done"),
            Kind::Long => {
                format!("for i in $(seq 1 20); do echo \"job {n} line $i\"; sleep 0.1; done")
            }
            Kind::Failing => format!("echo job {n} fails; exit 3"),
        }
    }

    fn expected(self, n: usize) -> Vec<String> {
        match self {
            Kind::Instant => vec![format!("job {n} done")],
            Kind::Long => (1..=20).map(|i| format!("job {n} line {i}")).collect(),
            Kind::Failing => vec![format!("job {n} fails")],
        }
    }

    fn outcome(self) -> (JobState, Option<i32>) {
        match self {
            Kind::Failing => (JobState::Failed, Some(3)),
            _ => (JobState::Succeeded, Some(0)),
        }
    }
}

/// A chaos run's shape.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub jobs: usize,
    pub brokers: usize,
    pub agents: usize,
    /// Jobs each agent runs at once.
    pub concurrency: usize,
    /// PostgreSQL shared by the brokers; `None`: SQLite (one broker).
    pub database_url: Option<String>,
    /// A process is killed about this often (uniformly between half and one and a half times).
    pub kill_every: Duration,
    pub faults: Faults,
    /// The whole run must end within this.
    pub timeout: Duration,
}

/// What happened.
#[derive(Debug, Default)]
pub struct Report {
    pub jobs: usize,
    /// Jobs whose log shows a lost lease (run again).
    pub rerun: usize,
    pub kills: Vec<String>,
    pub took: Duration,
    /// Every broken promise, one line each; empty when the run passed.
    pub violations: Vec<String>,
}

/// The processes of the run.
struct Cluster {
    dir: PathBuf,
    plan: Plan,
    ports: Vec<u16>,
    brokers: Vec<Option<BrokerProcess>>,
    agents: Vec<Option<Process>>,
    agent_configs: Vec<PathBuf>,
    admin_token: SecretString,
    /// Every stderr file, checked for panics at the end.
    logs: Vec<PathBuf>,
}

const BROKER_ARGS: [&str; 8] = [
    "--lease-ttl",
    "3s",
    "--heartbeat-interval",
    "500ms",
    "--poll-timeout",
    "5s",
    "--max-attempts",
    "20",
];

impl Cluster {
    fn broker_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("broker-{i}"))
    }

    async fn start_broker(&mut self, i: usize) {
        let dir = self.broker_dir(i);
        std::fs::create_dir_all(&dir).unwrap();
        if i > 0 || self.brokers[i].is_some() || dir.join("admin.token").exists() {
            std::fs::write(dir.join("admin.token"), self.admin_token.expose_secret()).unwrap();
        }
        let mut args: Vec<&str> = BROKER_ARGS.to_vec();
        let url = self.plan.database_url.clone();
        if let Some(url) = &url {
            args.extend(["--database-url", url]);
        }
        let log_dir = self.dir.join("logs");
        let broker = BrokerProcess::start(self.ports[i], &dir, &log_dir, &args).await;
        self.logs
            .push(log_dir.join(format!("{}.err", broker.process.name)));
        self.admin_token = broker.admin_token.clone();
        self.brokers[i] = Some(broker);
    }

    fn start_agent(&mut self, i: usize) {
        let log_dir = self.dir.join("logs");
        let agent = Process::spawn_at(
            &crate::bin_path("testbot-agent"),
            &["run", "--config", self.agent_configs[i].to_str().unwrap()],
            &[],
            &self.dir,
            &log_dir,
        )
        .expect("agent process");
        self.logs.push(log_dir.join(format!("{}.err", agent.name)));
        self.agents[i] = Some(agent);
    }

    /// A client of a broker that is up.
    fn client(&self) -> BrokerClient {
        let broker = self
            .brokers
            .iter()
            .flatten()
            .next()
            .expect("a broker is up");
        broker.client()
    }

    async fn stop(&mut self) {
        for agent in self.agents.iter_mut().flatten() {
            agent.signal(nix::sys::signal::Signal::SIGTERM);
        }
        for agent in self.agents.iter_mut().flatten() {
            if tokio::time::timeout(Duration::from_secs(10), agent.child.wait())
                .await
                .is_err()
            {
                agent.kill9().await;
            }
        }
        self.agents.clear();
        for broker in self.brokers.drain(..).flatten() {
            broker.stop().await;
        }
    }
}

/// Writes agent `i`'s configuration, talking to the brokers through `proxy_url`.
fn agent_config(dir: &Path, i: usize, proxy_url: &str, token: &str, concurrency: usize) -> PathBuf {
    let token_file = dir.join("enrollment.token");
    std::fs::write(&token_file, token).unwrap();
    let work = dir.join(format!("agent-{i}"));
    let config = dir.join(format!("agent-{i}.toml"));
    std::fs::write(
        &config,
        format!(
            "broker_url = \"{proxy_url}\"\nenrollment_token_file = \"{}\"\nname = \"chaos-{i}\"\n\
             work_dir = \"{}\"\nstate_dir = \"{}\"\npoll_wait = \"5s\"\nkill_grace = \"1s\"\n\
             concurrency = {concurrency}\n",
            token_file.display(),
            work.display(),
            crate::state_dir_beside(&work).display()
        ),
    )
    .unwrap();
    config
}

/// Jobs submitted at once.
const SUBMITTERS: usize = 16;

/// Most jobs a run may have: the broker lists at most this many at once.
pub const MAX_JOBS: usize = 1000;

/// Runs the plan; the report's `violations` lists what went wrong.
pub async fn run(plan: Plan) -> Report {
    testbot_proto::client::install_crypto_provider();
    assert!(plan.jobs <= MAX_JOBS, "at most {MAX_JOBS} jobs");
    assert!(
        plan.brokers == 1 || plan.database_url.is_some(),
        "several brokers need a shared PostgreSQL database"
    );
    eprintln!("chaos: seed {} ({plan:?})", plan.seed);
    let started = Instant::now();
    let mut rng = Rng::new(plan.seed);
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let ports: Vec<u16> = (0..plan.brokers).map(|_| free_port()).collect();
    let mut cluster = Cluster {
        dir: dir.clone(),
        plan: plan.clone(),
        ports: ports.clone(),
        brokers: (0..plan.brokers).map(|_| None).collect(),
        agents: (0..plan.agents).map(|_| None).collect(),
        agent_configs: Vec::new(),
        admin_token: SecretString::from(String::new()),
        logs: Vec::new(),
    };
    for i in 0..plan.brokers {
        cluster.start_broker(i).await;
    }
    let upstreams = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let proxy = Proxy::start(upstreams, plan.faults, rng.next_u64()).await;
    let client = cluster.client();
    client.create_site("chaos").await.expect("site");
    let token = client
        .create_enrollment_token(
            "chaos",
            &testbot_proto::sites::EnrollmentTokenRequest {
                uses: plan.agents as u32,
                ttl_secs: 3600,
            },
        )
        .await
        .expect("enrollment token");
    cluster.agent_configs = (0..plan.agents)
        .map(|i| agent_config(&dir, i, &proxy.url(), &token.token, plan.concurrency))
        .collect();
    for i in 0..plan.agents {
        cluster.start_agent(i);
    }

    // Every job is submitted before the chaos starts, straight to a broker: a submission whose
    // answer a fault swallowed would be sent again, and the run could not tell its two jobs
    // apart from a double run.
    let kinds: Vec<Kind> = (0..plan.jobs)
        .map(|_| match rng.below(3) {
            0 => Kind::Instant,
            1 => Kind::Long,
            _ => Kind::Failing,
        })
        .collect();
    // Many at once, so that the chaos starts while most jobs are still to run.
    let jobs: Vec<(JobId, Kind, usize)> = {
        use futures_util::StreamExt as _;
        let client = &client;
        futures_util::stream::iter(kinds.into_iter().enumerate())
            .map(|(n, kind)| async move {
                let job = client
                    .submit(&JobSpec {
                        script: kind.script(n),
                        ..JobSpec::default()
                    })
                    .await
                    .expect("submit");
                (job.id, kind, n)
            })
            .buffered(SUBMITTERS)
            .collect()
            .await
    };

    let mut report = Report {
        jobs: plan.jobs,
        ..Report::default()
    };
    let deadline = started + plan.timeout;
    let mut next_kill = Instant::now() + jitter(&mut rng, plan.kill_every);
    loop {
        let done = unfinished(&cluster.client()).await == Some(0);
        if done {
            break;
        }
        if Instant::now() > deadline {
            report
                .violations
                .push(format!("jobs still unfinished after {:?}", plan.timeout));
            break;
        }
        if Instant::now() >= next_kill {
            next_kill = Instant::now() + jitter(&mut rng, plan.kill_every);
            // Brokers and agents are hit equally often, whatever their numbers.
            let victim = if rng.percent(50) {
                rng.below(plan.brokers as u64) as usize
            } else {
                plan.brokers + rng.below(plan.agents as u64) as usize
            };
            let pause = Duration::from_millis(200 + rng.below(800));
            if victim < plan.brokers {
                if let Some(mut broker) = cluster.brokers[victim].take() {
                    broker.process.kill9().await;
                    report.kills.push(format!("broker {victim}"));
                    tokio::time::sleep(pause).await;
                    cluster.start_broker(victim).await;
                }
            } else {
                let i = victim - plan.brokers;
                if let Some(mut agent) = cluster.agents[i].take() {
                    agent.kill9().await;
                    report.kills.push(format!("agent {i}"));
                    tokio::time::sleep(pause).await;
                    cluster.start_agent(i);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let client = cluster.client();
    for (id, kind, n) in &jobs {
        check_job(&client, *id, *kind, *n, &mut report).await;
    }
    cluster.stop().await;
    drop(proxy);
    for log in &cluster.logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("panicked")) {
            report
                .violations
                .push(format!("{} panicked: {line}", log.display()));
        }
    }
    report.took = started.elapsed();
    eprintln!(
        "chaos: seed {}: {} jobs, {} run again after a lost lease, {} kills ({}), {:?}, {} violations",
        plan.seed,
        report.jobs,
        report.rerun,
        report.kills.len(),
        report.kills.join(", "),
        report.took,
        report.violations.len()
    );
    if !report.violations.is_empty() {
        // Keep the processes' logs for the post-mortem.
        let kept = tmp.keep();
        let _ = std::fs::write(kept.join("violations.txt"), report.violations.join("\n\n"));
        eprintln!("chaos: logs and violations.txt kept in {}", kept.display());
    }
    report
}

fn jitter(rng: &mut Rng, every: Duration) -> Duration {
    let ms = every.as_millis() as u64;
    Duration::from_millis(ms / 2 + rng.below(ms + 1))
}

/// How many jobs have no result yet; `None` while no broker answers. One list, so that a job
/// moving between states (queued again after a lost lease) cannot slip between two queries.
async fn unfinished(client: &BrokerClient) -> Option<usize> {
    let query = JobListQuery {
        limit: Some(MAX_JOBS as u32),
        ..JobListQuery::default()
    };
    let jobs = client.jobs(&query).await.ok()?.jobs;
    Some(jobs.iter().filter(|job| !job.state.is_terminal()).count())
}

/// Checks one job's result and log against what it printed.
async fn check_job(client: &BrokerClient, id: JobId, kind: Kind, n: usize, report: &mut Report) {
    let job: Job = match wait_for("the job", crate::WAIT, || async {
        client.job(id).await.ok()
    })
    .await
    {
        job if job.state.is_terminal() => job,
        job => {
            report
                .violations
                .push(format!("job {id} ({kind:?}) has no result: {job:?}"));
            return;
        }
    };
    let (state, exit_code) = kind.outcome();
    if (job.state, job.exit_code) != (state, exit_code) {
        report.violations.push(format!(
            "job {id} ({kind:?}) ended {} (exit {:?}, reason {:?}), not {state} (exit {exit_code:?})",
            job.state, job.exit_code, job.reason
        ));
    }
    let log = read_log(client, id).await;
    // The log's attempts, split at the broker's requeue lines.
    let mut attempts: Vec<Vec<String>> = vec![Vec::new()];
    for line in log.lines().map(parse_line) {
        match line.stream {
            Stream::Stdout => attempts.last_mut().unwrap().push(line.text.to_string()),
            Stream::System if line.text.starts_with("testbot: requeued") => {
                attempts.push(Vec::new())
            }
            _ => {}
        }
    }
    let expected = kind.expected(n);
    let last = attempts.pop().unwrap();
    if last != expected {
        report.violations.push(format!(
            "job {id} ({kind:?}): its last attempt logged {last:?}, not {expected:?}; whole log:\n{log}"
        ));
    }
    for earlier in &attempts {
        if !expected.starts_with(earlier) {
            report.violations.push(format!(
                "job {id} ({kind:?}): a lost attempt logged {earlier:?}, not a beginning of \
                 {expected:?}; whole log:\n{log}"
            ));
        }
    }
    if !attempts.is_empty() {
        report.rerun += 1;
    }
}

async fn read_log(client: &BrokerClient, id: JobId) -> String {
    use futures_util::StreamExt as _;
    let mut out = Vec::new();
    let stream = client.log_stream(id, 0, false).await.expect("log");
    let mut stream = std::pin::pin!(stream);
    while let Some(bytes) = stream.next().await {
        out.extend_from_slice(&bytes.expect("log bytes"));
    }
    String::from_utf8_lossy(&out).into_owned()
}
