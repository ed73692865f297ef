//! Brokers on PostgreSQL (`--database-url`): a broker killed and restarted on its database loses
//! nothing, two brokers on one database share its queue, one of them sweeping at a time, and
//! what an agent sends is kept as it is on SQLite.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use testbot_agent::{Agent, AgentConfig, Shutdown};
use testbot_e2e::postgres::{TestDatabase, test_database};
use testbot_e2e::{Fleet, Process, WAIT, free_port, refusal, stdout_lines, wait_for};
use testbot_proto::agents::{MetadataRequest, PollRequest, ReleaseKind, ReleaseRequest};
use testbot_proto::client::BrokerClient;
use testbot_proto::jobs::{Job, JobId, JobSpec, JobState};
use testbot_proto::results::{FinishRequest, Outcome};

/// A `testbot-broker` process on `database`, keeping its token files in `data_dir`.
struct BrokerProcess {
    process: Process,
    port: u16,
    data_dir: PathBuf,
}

impl BrokerProcess {
    fn start(port: u16, data_dir: &Path, database: &TestDatabase, log_dir: &Path) -> Self {
        let process = Process::spawn(
            "testbot-broker",
            &[
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--database-url",
                &database.url,
                "--lease-ttl",
                "3s",
                "--heartbeat-interval",
                "500ms",
                "--poll-timeout",
                "5s",
            ],
            &[],
            log_dir,
        )
        .expect("broker process");
        BrokerProcess {
            process,
            port,
            data_dir: data_dir.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An operator client, once the broker has written its token and answers.
    async fn client(&self) -> BrokerClient {
        let file = self.data_dir.join("admin.token");
        let token = wait_for("admin.token", WAIT, || async {
            let token = std::fs::read_to_string(&file).ok()?;
            Some(SecretString::from(token.trim().to_string()))
        })
        .await;
        let client = BrokerClient::new(&self.url(), token).unwrap();
        wait_for("the broker to answer", WAIT, || async {
            client.health().await.ok()
        })
        .await;
        client
    }

    /// What the broker has logged so far.
    fn log(&self, log_dir: &Path) -> String {
        std::fs::read_to_string(log_dir.join(format!("{}.err", self.process.name)))
            .unwrap_or_default()
    }

    /// SIGTERM, and a clean exit.
    async fn stop(mut self) {
        self.process.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.process.wait(WAIT).await;
        assert!(
            status.success(),
            "the broker stops cleanly on SIGTERM: {status}"
        );
    }
}

/// An agent in this process enrolled with a fresh token of site `site` made through `client`.
async fn start_agent(
    client: &BrokerClient,
    url: &str,
    site: &str,
    work: PathBuf,
) -> (Shutdown, tokio::task::JoinHandle<anyhow::Result<()>>) {
    client.create_site(site).await.unwrap();
    let enrollment = client
        .create_enrollment_token(site, &Default::default())
        .await
        .unwrap();
    let mut config = AgentConfig::new(url.to_string(), SecretString::from(enrollment.token), work);
    config.name = Some("steady".into());
    config.poll_wait = Duration::from_secs(5);
    let shutdown = Shutdown::default();
    let agent = tokio::spawn(Agent::new(config).unwrap().run(shutdown.clone()));
    (shutdown, agent)
}

async fn stop_agent(agent: (Shutdown, tokio::task::JoinHandle<anyhow::Result<()>>)) {
    let (shutdown, task) = agent;
    shutdown.drain.cancel();
    shutdown.hard.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("the agent stops")
        .unwrap()
        .unwrap();
}

async fn wait_finished(client: &BrokerClient, id: JobId) -> Job {
    wait_for(&format!("job {id} to finish"), WAIT, || async {
        client.job(id).await.ok().filter(|j| j.state.is_terminal())
    })
    .await
}

async fn read_log(client: &BrokerClient, id: JobId) -> String {
    use futures_util::StreamExt as _;
    let stream = client.log_stream(id, 0, false).await.expect("log");
    let mut stream = std::pin::pin!(stream);
    let mut out = Vec::new();
    while let Some(bytes) = stream.next().await {
        out.extend_from_slice(&bytes.expect("log bytes"));
    }
    String::from_utf8(out).expect("utf-8 log")
}

fn script(lines: u32) -> JobSpec {
    JobSpec {
        script: format!("for i in $(seq 1 {lines}); do echo line $i; done"),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_killed_and_restarted_on_its_database_loses_nothing() {
    let database = test_database().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker");
    let port = free_port();
    let mut broker = BrokerProcess::start(port, &data, &database, dir.path());
    let client = broker.client().await;
    let agent = start_agent(&client, &broker.url(), "pg", dir.path().join("agent")).await;

    let job = client.submit(&script(10)).await.unwrap();
    let done = wait_finished(&client, job.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let log = read_log(&client, job.id).await;
    let lines: Vec<String> = (1..=10).map(|i| format!("line {i}")).collect();
    assert_eq!(stdout_lines(&log), lines, "{log}");
    let parked = client
        .submit(&JobSpec {
            script: "echo parked".into(),
            labels: vec!["no-such-agent".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        !data.join("testbot.db").exists(),
        "the broker keeps its jobs in PostgreSQL, not in SQLite"
    );

    broker.process.kill9().await;
    let broker = BrokerProcess::start(port, &data, &database, dir.path());
    let client = broker.client().await;
    let after = client.job(job.id).await.unwrap();
    assert_eq!(
        (after.state, after.log_bytes, after.finished_at_ms),
        (done.state, done.log_bytes, done.finished_at_ms)
    );
    assert_eq!(read_log(&client, job.id).await, log, "the log survived");
    assert_eq!(client.job(parked.id).await.unwrap().state, JobState::Queued);

    // The agent carries on with the restarted broker.
    let next = client.submit(&script(3)).await.unwrap();
    let next = wait_finished(&client, next.id).await;
    assert_eq!(next.state, JobState::Succeeded, "{next:?}");
    stop_agent(agent).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_brokers_on_one_database_share_the_queue_and_take_turns_sweeping() {
    let database = test_database().await;
    let dir = tempfile::tempdir().unwrap();
    let first = BrokerProcess::start(free_port(), &dir.path().join("a"), &database, dir.path());
    let first_client = first.client().await;
    // Brokers sharing a database share its operator token.
    let second_data = dir.path().join("b");
    std::fs::create_dir_all(&second_data).unwrap();
    std::fs::copy(
        dir.path().join("a/admin.token"),
        second_data.join("admin.token"),
    )
    .unwrap();
    let second = BrokerProcess::start(free_port(), &second_data, &database, dir.path());
    let second_client = second.client().await;

    // The agent polls the first broker; the job is submitted to the second.
    let agent = start_agent(&first_client, &first.url(), "pg", dir.path().join("agent")).await;
    let job = second_client.submit(&script(5)).await.unwrap();
    let done = wait_finished(&second_client, job.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.agent.as_deref(), Some("pg/steady"));
    assert_eq!(
        read_log(&second_client, job.id).await,
        read_log(&first_client, job.id).await
    );
    assert!(first_client.health().await.is_ok() && second_client.health().await.is_ok());

    // One of them sweeps; when it is gone, the other takes over.
    let sweeping = "This broker now runs the sweeper.";
    let first_sweeps = wait_for("one broker to sweep", WAIT, || async {
        match (
            first.log(dir.path()).contains(sweeping),
            second.log(dir.path()).contains(sweeping),
        ) {
            (true, true) => panic!("both brokers sweep"),
            (true, false) => Some(true),
            (false, true) => Some(false),
            (false, false) => None,
        }
    })
    .await;
    let (mut sweeper, other) = if first_sweeps {
        (first, second)
    } else {
        (second, first)
    };
    sweeper.process.kill9().await;
    wait_for(
        "the other broker to take over the sweeper",
        WAIT,
        || async { other.log(dir.path()).contains(sweeping).then_some(()) },
    )
    .await;
    stop_agent(agent).await;
    other.stop().await;
}

/// A NUL character, which no PostgreSQL text column can hold: in an agent's text, it is handled
/// as on SQLite, where it could be stored.
#[tokio::test(flavor = "multi_thread")]
async fn an_agents_text_with_a_nul_character_is_handled_alike_on_both_databases() {
    let database = test_database().await;
    let fleets = [
        Fleet::start().await,
        Fleet::start_with(|config| config.database_url = Some(database.url.clone())).await,
    ];
    for fleet in fleets {
        let agent = fleet.enroll("by-hand").await;
        let poll = PollRequest {
            agent: "by-hand".into(),
            labels: vec![],
            executor: "shell".into(),
            wait_ms: Some(5000),
            policy: None,
            workflow_jobs_without_policy: false,
        };
        let job = fleet.submit("true").await;
        let lease = agent
            .client
            .poll(&poll)
            .await
            .unwrap()
            .expect("claimed")
            .lease;
        let (status, message) = refusal(
            agent
                .client
                .set_metadata(
                    job.id,
                    &MetadataRequest {
                        lease: lease.clone(),
                        key: "note".into(),
                        value: "a\0b".into(),
                    },
                )
                .await,
        );
        assert_eq!(status, 400, "{message}");
        assert!(message.contains("NUL"), "{message}");
        let done = agent
            .client
            .finish(
                job.id,
                &FinishRequest {
                    lease,
                    outcome: Outcome::with_cause(
                        JobState::Failed,
                        testbot_proto::results::FailureCause::TestFailure,
                        "exit\0ed",
                    ),
                },
            )
            .await
            .unwrap();
        assert_eq!(done.reason.as_deref(), Some("exit\u{FFFD}ed"));

        let handed_back = fleet.submit("true").await;
        let lease = agent
            .client
            .poll(&poll)
            .await
            .unwrap()
            .expect("claimed")
            .lease;
        let released = agent
            .client
            .release(
                handed_back.id,
                &ReleaseRequest {
                    lease,
                    reason: "no\0account".into(),
                    kind: ReleaseKind::Refused,
                },
            )
            .await
            .unwrap();
        assert!(
            released.reason.contains("no\u{FFFD}account"),
            "{}",
            released.reason
        );
        fleet.stop().await;
    }
}
