//! Whole-fleet test harness: brokers and agents on loopback, in process or as real processes.
//!
//! - [`Fleet`] starts a broker in this process on `127.0.0.1:0` with a fresh data directory,
//!   and adds agents (in process, or as `testbot-agent` processes).
//! - [`Process`] is a child process (broker, agent, CLI) that is killed by PID when dropped, so
//!   no test leaves anything running; [`BrokerProcess`] is a real broker process, also on a
//!   data directory that already holds data.
//! - [`oidc::TestIssuer`] is a local OIDC issuer of GitHub's shape; [`github::FakeGitHub`] is a
//!   stateful fake GitHub (REST, git over HTTP, webhooks, an App), checked against GitHub's
//!   OpenAPI description.
//! - [`postgres::TestDatabase`] is an empty database on the test PostgreSQL, for brokers started
//!   with `--database-url` (or [`BrokerConfig::database_url`]).
//! - [`wait_for`] waits on a condition with a deadline; tests never sleep a fixed time to let
//!   something happen.
//!
//! Real binaries are found next to the test executable (`target/debug`), so run
//! `cargo build --workspace --bins` before the tests (`scripts/test.sh` does).

pub mod chaos;
pub mod github;
pub mod oidc;
pub mod postgres;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};
use testbot_agent::{Agent, AgentConfig, Shutdown};
use testbot_broker::{Broker, BrokerConfig};
use testbot_proto::client::BrokerClient;
use testbot_proto::jobs::{Job, JobId, JobSpec};
use tokio::task::JoinHandle;

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// Waits until `check` returns `Some`, polling every 20 ms, for at most `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A path to one of the workspace's binaries (built by `cargo build --workspace --bins`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // A test binary is target/debug/deps/integration-HASH, a program of this crate (such as
    // testbot-chaos) target/debug/NAME: the workspace's binaries are in target/debug.
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// `WORK-state`: where the harness keeps the state of the agent whose work directory is `work`
/// (as [`AgentConfig::new`] does).
pub fn state_dir_beside(work: &Path) -> PathBuf {
    PathBuf::from(format!("{}-state", work.display()))
}

/// A free TCP port on loopback (for a broker that must restart on the same address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process killed (by its PID) when dropped; with [`Process::spawn_at`], its whole
/// process group.
pub struct Process {
    pub child: tokio::process::Child,
    pub name: String,
    /// The process group to kill on drop (the process leads it).
    group: Option<nix::unistd::Pid>,
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(group) = self.group {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Process {
    /// Spawns `bin` with `args`, stdout and stderr captured to files in `log_dir`.
    pub fn spawn(
        bin: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        log_dir: &Path,
    ) -> anyhow::Result<Process> {
        let name = format!("{bin}-{}", free_port());
        let stdout = std::fs::File::create(log_dir.join(format!("{name}.out")))?;
        let stderr = std::fs::File::create(log_dir.join(format!("{name}.err")))?;
        let child = tokio::process::Command::new(bin_path(bin))
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("Cannot start {bin}"))?;
        Ok(Process {
            child,
            name,
            group: None,
        })
    }

    /// Spawns `program` in `cwd`, leading its own process group (so everything it starts is
    /// killed with it), stdout and stderr captured to files in `log_dir`.
    pub fn spawn_at(
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        cwd: &Path,
        log_dir: &Path,
    ) -> anyhow::Result<Process> {
        let name = format!(
            "{}-{}",
            program.file_name().unwrap_or_default().to_string_lossy(),
            free_port()
        );
        let stdout = std::fs::File::create(log_dir.join(format!("{name}.out")))?;
        let stderr = std::fs::File::create(log_dir.join(format!("{name}.err")))?;
        let child = tokio::process::Command::new(program)
            .args(args)
            .envs(envs.iter().copied())
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("Cannot start {}", program.display()))?;
        let group = child.id().map(|pid| nix::unistd::Pid::from_raw(pid as i32));
        Ok(Process { child, name, group })
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id().expect("process still running") as i32)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("signal process");
    }

    /// SIGKILL, then reap.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {timeout:?}", self.name))
            .expect("wait for process")
    }
}

/// A real `testbot-broker` process on loopback whose data directory may already hold data: a
/// broker restarted on its own data, or a newer broker started on an older release's database.
pub struct BrokerProcess {
    pub process: Process,
    pub url: String,
    /// The operator token: `DATA_DIR/admin.token`, as found there or written by the broker.
    pub admin_token: SecretString,
    log_dir: PathBuf,
}

impl BrokerProcess {
    /// Starts `testbot-broker --listen 127.0.0.1:PORT --data-dir DATA_DIR ARGS...` (output in
    /// `log_dir`) and waits until it answers. Panics with the broker's error output if it exits
    /// instead (e.g. it cannot migrate the database it was given).
    pub async fn start(port: u16, data_dir: &Path, log_dir: &Path, args: &[&str]) -> BrokerProcess {
        let listen = format!("127.0.0.1:{port}");
        let mut all = vec![
            "--listen",
            &listen,
            "--data-dir",
            data_dir.to_str().expect("UTF-8 data dir"),
        ];
        all.extend_from_slice(args);
        let mut process =
            Process::spawn("testbot-broker", &all, &[], log_dir).expect("broker process");
        let url = format!("http://{listen}");
        let health = BrokerClient::new(&url, SecretString::from(String::new())).expect("client");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = process.child.try_wait().expect("broker status") {
                let stderr = std::fs::read_to_string(log_dir.join(format!("{}.err", process.name)))
                    .unwrap_or_default();
                panic!("the broker exited ({status}) instead of serving:\n{stderr}");
            }
            if health.health().await.is_ok() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the broker did not answer within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The broker writes the token file (if missing) before it listens.
        let token = std::fs::read_to_string(data_dir.join("admin.token")).expect("admin.token");
        BrokerProcess {
            process,
            url,
            admin_token: SecretString::from(token.trim().to_string()),
            log_dir: log_dir.to_path_buf(),
        }
    }

    /// A client with the operator token.
    pub fn client(&self) -> BrokerClient {
        BrokerClient::new(&self.url, self.admin_token.clone()).expect("client")
    }

    /// What the broker wrote to its standard error so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.log_dir.join(format!("{}.err", self.process.name)))
            .unwrap_or_default()
    }

    /// SIGTERM, and checks that the broker stops cleanly.
    pub async fn stop(mut self) {
        self.process.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.process.wait(WAIT).await;
        assert!(
            status.success(),
            "the broker stops cleanly on SIGTERM ({status}):\n{}",
            self.stderr()
        );
    }
}

/// A broker in this process, its data directory, and the agents added to it.
pub struct Fleet {
    pub broker: Option<Broker>,
    pub dir: tempfile::TempDir,
    pub url: String,
    pub admin_token: SecretString,
    /// Enrolls agents in the site [`TEST_SITE`].
    pub enrollment_token: SecretString,
    agents: Vec<(Shutdown, Option<JoinHandle<anyhow::Result<()>>>)>,
    /// The OIDC issuer the broker trusts, for fleets started with [`Fleet::start_oidc`].
    pub issuer: Option<oidc::TestIssuer>,
}

/// The broker's refusal as (status, message); panics if the call succeeded or failed otherwise.
pub fn refusal<T: std::fmt::Debug>(
    result: Result<T, testbot_proto::client::ClientError>,
) -> (u16, String) {
    match result {
        Err(testbot_proto::client::ClientError::Api {
            status, message, ..
        }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Fails the test at once, with the fix, when no Slurm is running for the tests.
pub fn require_slurm() {
    let conf = std::env::var("SLURM_CONF").unwrap_or_default();
    assert!(
        !conf.is_empty() && Path::new(&conf).exists(),
        "SLURM_CONF is not set to a slurm.conf: start the test Slurm with `eval \"$(tests/slurm/start.sh)\"` (scripts/test.sh does)"
    );
}

/// The unprivileged account site policies in tests map jobs to.
pub const JOB_ACCOUNT: &str = "testbot-job";

/// Makes sure the non-root account `name` exists (the tests run as root, as CI does).
pub fn ensure_account(name: &str) {
    if nix::unistd::User::from_name(name).unwrap().is_some() {
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "account {name} is missing and only root can create it: run the tests as root (as .ci/run does)"
    );
    let status = std::process::Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .status()
        .expect("useradd runs");
    assert!(
        status.success() || nix::unistd::User::from_name(name).unwrap().is_some(),
        "useradd {name} failed"
    );
}

/// An agent identity enrolled by a test.
pub struct EnrolledAgent {
    pub id: String,
    pub key: std::sync::Arc<ring::signature::Ed25519KeyPair>,
    /// Signs every request as this agent.
    pub client: BrokerClient,
}

/// The site the fleet's agents enroll in.
pub const TEST_SITE: &str = "test-site";

/// The audience test brokers accept OIDC tokens for.
pub const AUDIENCE: &str = "https://testbot.test";

impl Fleet {
    /// Runs the `testbot` CLI against this fleet as its operator, within [`WAIT`].
    pub async fn testbot(&self, args: &[&str]) -> std::process::Output {
        self.testbot_with_env(args, &[]).await
    }

    /// [`Fleet::testbot`] with extra environment variables.
    pub async fn testbot_with_env(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> std::process::Output {
        self.testbot_within(args, env, WAIT).await
    }

    /// [`Fleet::testbot_with_env`] for a command that runs for up to `within`.
    pub async fn testbot_within(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        within: Duration,
    ) -> std::process::Output {
        use secrecy::ExposeSecret as _;
        let out = tokio::process::Command::new(bin_path("testbot"))
            .args(args)
            .env("TESTBOT_URL", &self.url)
            .env("TESTBOT_TOKEN", self.admin_token.expose_secret())
            .envs(env.iter().copied())
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(within, out)
            .await
            .expect("testbot exits")
            .expect("testbot runs")
    }

    /// A broker with default settings but a short lease (2 s) and poll timeout (5 s).
    pub async fn start() -> Fleet {
        Fleet::start_with(|_| {}).await
    }

    /// A fleet whose broker accepts OIDC tokens from a local [`oidc::TestIssuer`] for
    /// [`AUDIENCE`].
    pub async fn start_oidc(tune: impl FnOnce(&mut BrokerConfig)) -> Fleet {
        let issuer = oidc::TestIssuer::start().await;
        let settings = testbot_proto::oidc::OidcSettings {
            issuer: issuer.url.clone(),
            audience: AUDIENCE.into(),
        };
        let mut fleet = Fleet::start_with(|config| {
            config.oidc = Some(settings);
            tune(config);
        })
        .await;
        fleet.issuer = Some(issuer);
        fleet
    }

    /// The fleet's OIDC issuer.
    /// Submits `runs` runs of `spec` as one batch of the workflow run `claims` describe (minted
    /// by the fleet's issuer), and waits until every run has ended.
    pub async fn workflow_batch(
        &self,
        claims: &serde_json::Value,
        spec: &JobSpec,
        runs: u32,
    ) -> testbot_proto::batches::Batch {
        let batch = self
            .client_with(&self.issuer().mint(claims))
            .submit_batch(spec, runs, None)
            .await
            .unwrap();
        wait_for("the batch's runs", Duration::from_secs(600), || async {
            let now = self.client().batch(batch.id).await.unwrap();
            now.is_finished().then_some(now)
        })
        .await
    }

    /// The flaky-test report of `repository`'s branch main.
    pub async fn flaky_on_main(
        &self,
        repository: &str,
    ) -> testbot_proto::test_results::FlakyReport {
        let query = testbot_proto::test_results::FlakyQuery {
            branch: Some("main".into()),
            ..Default::default()
        };
        self.client().flaky_tests(repository, &query).await.unwrap()
    }

    pub fn issuer(&self) -> &oidc::TestIssuer {
        self.issuer
            .as_ref()
            .expect("a fleet started with start_oidc")
    }

    /// A client presenting `token` (an OIDC token, a GitHub token, anything).
    pub fn client_with(&self, token: &str) -> BrokerClient {
        BrokerClient::new(&self.url, SecretString::from(token.to_string())).expect("client")
    }

    pub async fn start_with(tune: impl FnOnce(&mut BrokerConfig)) -> Fleet {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config =
            BrokerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("broker"));
        config.settings.lease_ttl = Duration::from_secs(2);
        config.settings.heartbeat_interval = Duration::from_millis(500);
        config.settings.poll_timeout = Duration::from_secs(5);
        tune(&mut config);
        let broker = Broker::start(config).await.expect("broker starts");
        let enrollment_token = broker
            .enrollment_token(TEST_SITE, 10_000, Duration::from_secs(3600))
            .await
            .expect("enrollment token");
        Fleet {
            url: broker.url(),
            admin_token: broker.admin_token.clone(),
            enrollment_token,
            broker: Some(broker),
            dir,
            agents: Vec::new(),
            issuer: None,
        }
    }

    /// A client with the operator token.
    pub fn client(&self) -> BrokerClient {
        BrokerClient::new(&self.url, self.admin_token.clone()).expect("client")
    }

    /// An enrollment token for `site` (created if needed), for agents of other sites than
    /// [`TEST_SITE`].
    pub async fn site_enrollment_token(&self, site: &str) -> SecretString {
        self.broker
            .as_ref()
            .expect("broker running")
            .enrollment_token(site, 100, Duration::from_secs(3600))
            .await
            .expect("enrollment token")
    }

    /// Enrolls an agent named `name` in `site` (for driving the agent protocol by hand).
    pub async fn enroll_in(&self, site: &str, name: &str) -> EnrolledAgent {
        let token = self.site_enrollment_token(site).await;
        self.enroll_with(&token, name).await
    }

    /// Enrolls an agent without a site policy that takes workflow jobs, and polls once (finding
    /// nothing) so the broker knows what it takes; it never polls again by itself.
    pub async fn enroll_taking_workflow_jobs(&self, name: &str) -> EnrolledAgent {
        let agent = self.enroll(name).await;
        agent
            .client
            .poll(&testbot_proto::agents::PollRequest {
                agent: name.to_string(),
                labels: vec![],
                executor: "shell".into(),
                wait_ms: Some(0),
                policy: None,
                workflow_jobs_without_policy: true,
            })
            .await
            .expect("poll");
        agent
    }

    /// A freshly enrolled agent identity's client (for driving the agent protocol by hand).
    pub async fn agent_client(&self) -> BrokerClient {
        self.enroll(&format!("manual-{}", free_port())).await.client
    }

    /// Enrolls an agent named `name` in [`TEST_SITE`].
    pub async fn enroll(&self, name: &str) -> EnrolledAgent {
        self.enroll_with(&self.enrollment_token, name).await
    }

    /// Enrolls an agent named `name` with the enrollment token `token`.
    async fn enroll_with(&self, token: &SecretString, name: &str) -> EnrolledAgent {
        let (pkcs8, public_key) = testbot_proto::signing::generate_key().unwrap();
        let enrollment = self
            .client()
            .enroll(&testbot_proto::sites::EnrollRequest {
                enrollment_token: token.expose_secret().to_string(),
                name: name.to_string(),
                public_key,
                policy: None,
            })
            .await
            .expect("enrollment");
        let key = std::sync::Arc::new(ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap());
        let client = BrokerClient::for_agent(&self.url, enrollment.agent_id.clone(), key.clone())
            .expect("client");
        EnrolledAgent {
            id: enrollment.agent_id,
            key,
            client,
        }
    }

    /// An agent configuration named `name` with its own work directory.
    pub fn agent_config(&self, name: &str) -> AgentConfig {
        let mut config = AgentConfig::new(
            self.url.clone(),
            self.enrollment_token.clone(),
            self.dir.path().join(format!("agent-{name}")),
        );
        config.name = Some(name.to_string());
        config.kill_grace = Duration::from_secs(2);
        config.poll_wait = Duration::from_secs(5);
        config
    }

    /// Starts an agent in this process; returns its index for [`Fleet::agent_shutdown`].
    pub fn add_agent(&mut self, config: AgentConfig) -> usize {
        let agent = Agent::new(config).expect("agent config");
        let shutdown = Shutdown::default();
        let task = tokio::spawn(agent.run(shutdown.clone()));
        self.agents.push((shutdown, Some(task)));
        self.agents.len() - 1
    }

    pub fn agent_shutdown(&self, index: usize) -> Shutdown {
        self.agents[index].0.clone()
    }

    /// Waits for the agent at `index` to exit.
    pub async fn agent_exit(&mut self, index: usize) -> anyhow::Result<()> {
        let task = self.agents[index]
            .1
            .take()
            .context("agent already exited")?;
        tokio::time::timeout(WAIT, task)
            .await
            .context("agent did not exit")??
    }

    /// Starts a `testbot-agent` process with this configuration (TOML written to the data dir).
    pub fn spawn_agent(&self, name: &str, extra_toml: &str) -> Process {
        let config = self.agent_config_file(name, extra_toml);
        Process::spawn(
            "testbot-agent",
            &["run", "--config", config.to_str().unwrap()],
            &[],
            self.dir.path(),
        )
        .expect("agent process")
    }

    /// Starts a `testbot-agent` process as [`Fleet::spawn_agent`] does, but through `wrapper`
    /// (a program and its arguments, e.g. `setpriv` to run it as another account).
    pub fn spawn_agent_through(&self, wrapper: &[&str], name: &str, extra_toml: &str) -> Process {
        let config = self.agent_config_file(name, extra_toml);
        let agent = bin_path("testbot-agent");
        let mut args: Vec<&str> = wrapper[1..].to_vec();
        args.extend([
            agent.to_str().unwrap(),
            "run",
            "--config",
            config.to_str().unwrap(),
        ]);
        Process::spawn_at(
            Path::new(wrapper[0]),
            &args,
            &[],
            self.dir.path(),
            self.dir.path(),
        )
        .expect("agent process")
    }

    /// The configuration file of agent `name`: work directory `agent-NAME` and state directory
    /// `agent-NAME-state` in the data dir, and `extra_toml`.
    pub fn agent_config_file(&self, name: &str, extra_toml: &str) -> PathBuf {
        let work = self.dir.path().join(format!("agent-{name}"));
        let token_file = self.dir.path().join("enrollment.token");
        std::fs::write(&token_file, self.enrollment_token.expose_secret()).unwrap();
        let config = self.dir.path().join(format!("agent-{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "broker_url = \"{}\"\nenrollment_token_file = \"{}\"\nname = \"{name}\"\nwork_dir = \"{}\"\nstate_dir = \"{}\"\npoll_wait = \"5s\"\nkill_grace = \"2s\"\n{extra_toml}\n",
                self.url,
                token_file.display(),
                work.display(),
                state_dir_beside(&work).display()
            ),
        )
        .unwrap();
        config
    }

    /// Submits a job with just a script.
    pub async fn submit(&self, script: &str) -> Job {
        self.client()
            .submit(&JobSpec {
                script: script.into(),
                ..Default::default()
            })
            .await
            .expect("submit")
    }

    /// Waits until the job has its result.
    pub async fn wait_finished(&self, id: JobId) -> Job {
        self.wait_finished_within(id, WAIT).await
    }

    /// Waits until `count` agents have enrolled (a workflow's job is refused while no enrolled
    /// agent would accept it).
    pub async fn wait_enrolled(&self, count: usize) {
        let client = self.client();
        wait_for("agents to enroll", WAIT, || async {
            let agents = client.agents().await.ok()?.agents;
            let enrolled = agents.iter().filter(|a| a.revoked_at_ms.is_none()).count();
            (enrolled >= count).then_some(())
        })
        .await
    }

    /// Waits until `count` agents have enrolled and polled (so the broker knows what they take:
    /// a workflow's job is refused while no enrolled agent would accept it).
    pub async fn wait_polling_agents(&self, count: usize) {
        let client = self.client();
        wait_for("agents to enroll and poll", WAIT, || async {
            let agents = client.agents().await.ok()?.agents;
            let ready = agents
                .iter()
                .filter(|a| a.revoked_at_ms.is_none() && a.last_seen_ms.is_some())
                .count();
            (ready >= count).then_some(())
        })
        .await
    }

    /// Waits until `count` agents have enrolled and polled with a site policy (a workflow's job
    /// is refused while no enrolled site would accept it).
    pub async fn wait_policy_agents(&self, count: usize) {
        let client = self.client();
        wait_for(
            "agents to enroll and advertise their policy",
            WAIT,
            || async {
                let agents = client.agents().await.ok()?.agents;
                let ready = agents
                    .iter()
                    .filter(|a| {
                        a.revoked_at_ms.is_none() && a.policy.is_some() && a.last_seen_ms.is_some()
                    })
                    .count();
                (ready >= count).then_some(())
            },
        )
        .await
    }

    /// A client acting as a workflow of `repo` (for fleets started with [`Fleet::start_oidc`]):
    /// a fresh token for the broker's audience, since each token is accepted once.
    pub fn workflow(&self, repo: &str) -> BrokerClient {
        let issuer = self.issuer();
        self.client_with(&issuer.mint(&issuer.claims(repo, AUDIENCE)))
    }

    /// Waits until the job has its result; returns it with the job's log.
    pub async fn finished(&self, job: &Job) -> (Job, String) {
        let done = self.wait_finished(job.id).await;
        (done, self.log(job.id).await)
    }

    /// The re-attach scenario of executors whose jobs outlive the agent: once `job` (running
    /// [`SIXTEEN_LINES`]) has printed three lines, kills the agent process with SIGKILL, starts it
    /// again as `name` with `extra_toml`, and checks that the job then succeeds at its first
    /// attempt, re-attached, with every line exactly once and in order. Returns the finished job
    /// and the new agent.
    pub async fn kill_agent_and_check_reattach(
        &self,
        agent: &mut Process,
        name: &str,
        extra_toml: &str,
        job: &Job,
    ) -> (Job, Process) {
        wait_for("a few lines before the crash", WAIT, || async {
            self.log(job.id).await.contains(" O line 3\n").then_some(())
        })
        .await;
        agent.kill9().await;
        let restarted = self.spawn_agent(name, extra_toml);
        let (done, log) = self.finished(job).await;
        assert_eq!(
            done.state,
            testbot_proto::jobs::JobState::Succeeded,
            "{log}"
        );
        assert_eq!(done.attempts, 1, "re-attached, not run again: {log}");
        let want: Vec<String> = (1..=16).map(|i| format!("line {i}")).collect();
        assert_eq!(
            stdout_lines(&log),
            want,
            "every line once, in order:\n{log}"
        );
        assert!(log.contains("re-attached to the job"), "{log}");
        (done, restarted)
    }

    /// Waits until the job has its result, for jobs that take long by design.
    pub async fn wait_finished_within(&self, id: JobId, timeout: Duration) -> Job {
        let client = self.client();
        wait_for(&format!("job {id} to finish"), timeout, || async {
            client.job(id).await.ok().filter(|j| j.state.is_terminal())
        })
        .await
    }

    /// The job's whole log as text.
    pub async fn log(&self, id: JobId) -> String {
        use futures_util::StreamExt as _;
        let stream = self.client().log_stream(id, 0, false).await.expect("log");
        let mut stream = std::pin::pin!(stream);
        let mut out = Vec::new();
        while let Some(bytes) = stream.next().await {
            out.extend_from_slice(&bytes.expect("log bytes"));
        }
        String::from_utf8(out).expect("utf-8 log")
    }

    /// Stops every in-process agent (hard) and the broker.
    pub async fn stop(mut self) {
        for (shutdown, _) in &self.agents {
            shutdown.drain.cancel();
            shutdown.hard.cancel();
        }
        for task in self.agents.drain(..).filter_map(|(_, task)| task) {
            let _ = tokio::time::timeout(WAIT, task).await;
        }
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await.expect("broker shutdown");
        }
    }
}

/// The script of re-attach tests ([`Fleet::kill_agent_and_check_reattach`]): 16 lines, half a
/// second apart.
pub const SIXTEEN_LINES: &str = "for i in $(seq 1 16); do echo line $i; sleep 0.5; done";

/// The texts of a stored log's stdout lines.
pub fn stdout_lines(log: &str) -> Vec<String> {
    log.lines()
        .map(testbot_proto::logs::parse_line)
        .filter(|l| l.stream == testbot_proto::logs::Stream::Stdout)
        .map(|l| l.text.to_string())
        .collect()
}

/// A shell command that prints `received whole` when variable `name` holds exactly `value`,
/// without the value itself in the script (a script is shown to everyone who may read the job):
/// it compares SHA-256 digests.
pub fn check_value(name: &str, value: &str) -> String {
    let digest = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        value.as_bytes(),
    ));
    format!(
        "test \"$(printf %s \"${name}\" | sha256sum | cut -d ' ' -f 1)\" = {digest} && echo received whole"
    )
}

/// Whether a process exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Kills a process group left behind by a test (e.g. the job of an agent killed with SIGKILL).
pub fn kill_group(pgid: i32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The agent poll endpoint, and a poll body that asks for no waiting.
const POLL: &str = "/api/v1/agent/poll";
pub const POLL_BODY: &str = r#"{"agent": "x", "executor": "shell", "wait_ms": 0}"#;

/// Sends a poll to the broker at `url` signed by `agent` with the given parts (signed over
/// `signed_body`, sending `sent_body`), returning (status, error message or body).
pub async fn send_signed_poll(
    url: &str,
    agent: &EnrolledAgent,
    timestamp_ms: i64,
    nonce: &str,
    signed_body: &str,
    sent_body: &str,
) -> (u16, String) {
    let message = testbot_proto::signing::signing_string(
        &agent.id,
        "POST",
        POLL,
        timestamp_ms,
        nonce,
        signed_body.as_bytes(),
    );
    let signature = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        agent.key.sign(message.as_bytes()).as_ref(),
    );
    let resp = reqwest::Client::new()
        .post(format!("{url}{POLL}"))
        .header("content-type", "application/json")
        .header(testbot_proto::signing::AGENT_HEADER, &agent.id)
        .header(testbot_proto::signing::TIMESTAMP_HEADER, timestamp_ms)
        .header(testbot_proto::signing::NONCE_HEADER, nonce)
        .header(testbot_proto::signing::SIGNATURE_HEADER, signature)
        .body(sent_body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(text);
    (status, message)
}

/// The runs of a 40-run batch (from 1) in which [`flaky_junit_script`]'s `wobbly` fails: 8 of
/// 40, a rate of 0.2.
pub const FLAKY_RUNS: [u32; 8] = [3, 7, 12, 18, 22, 27, 33, 38];

/// A POSIX shell script (it runs in busybox too) that writes `out/junit.xml` with three tests:
/// `steady` passes, `wobbly` fails on the batch runs `fail_runs` names (chosen by
/// `TESTBOT_BATCH_RUN`, so the test itself is deterministic), `always` always fails. The script
/// itself succeeds: the failures are in the results only.
pub fn flaky_junit_script(fail_runs: &[u32]) -> String {
    let runs: Vec<String> = fail_runs.iter().map(u32::to_string).collect();
    format!(
        r#"mkdir -p out
case " {} " in *" $TESTBOT_BATCH_RUN "*) wobbly='<failure message="race"/>';; *) wobbly='';; esac
cat > out/junit.xml <<EOF
<testsuite name="pkg">
  <testcase classname="T" name="steady"/>
  <testcase classname="T" name="wobbly">$wobbly</testcase>
  <testcase classname="T" name="always"><failure message="broken"/></testcase>
</testsuite>
EOF"#,
        runs.join(" ")
    )
}

/// Runs `base` (its executor and image set by the caller) 40 times as one batch of a
/// workflow of `repository` on main, with [`flaky_junit_script`] failing `wobbly` on
/// [`FLAKY_RUNS`], and checks what the statistics say: `wobbly` is flaky with a failure rate
/// whose interval holds 0.2, `always` is broken and not flaky, `steady` is not reported.
/// Returns `wobbly`'s record.
pub async fn forty_runs_find_the_flaky_test(
    fleet: &Fleet,
    repository: &str,
    base: JobSpec,
) -> testbot_proto::test_results::TestHistory {
    let claims = fleet.issuer().claims(repository, AUDIENCE);
    let spec = JobSpec {
        name: Some("unit".into()),
        script: flaky_junit_script(&FLAKY_RUNS),
        results: vec!["out/*.xml".into()],
        ..base
    };
    let batch = fleet.workflow_batch(&claims, &spec, 40).await;
    assert_eq!(batch.totals.succeeded, 40, "{:?}", batch.totals);

    let across = fleet.client().batch_results(batch.id).await.unwrap();
    assert_eq!(across.runs_with_results, 40, "{across:?}");
    let wobbly = across.tests.iter().find(|t| t.name == "wobbly").unwrap();
    assert_eq!(wobbly.failed_runs, FLAKY_RUNS, "{wobbly:?}");

    let report = fleet.flaky_on_main(repository).await;
    let names: Vec<&str> = report.tests.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["wobbly", "always"], "{report:#?}");
    let wobbly = &report.tests[0];
    assert_eq!(wobbly.verdict(), "flaky", "{wobbly:#?}");
    assert_eq!((wobbly.runs, wobbly.failures), (40, 8));
    let (rate, low, high) = wobbly.failure_rate().unwrap();
    assert!(
        rate == 0.2 && low < 0.2 && 0.2 < high,
        "{rate} {low} {high}"
    );
    let always = &report.tests[1];
    assert_eq!(always.verdict(), "broken", "{always:#?}");
    assert_eq!(
        always.broken_since.as_deref(),
        Some(claims["sha"].as_str().unwrap())
    );
    wobbly.clone()
}
