//! A broker killed with SIGKILL and restarted loses nothing: queued jobs and acknowledged log
//! bytes survive, the agent reconnects by itself and finishes its job, and a CLI following the
//! log resumes from its offset without losing or repeating a line.

use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use testbot_agent::{Agent, AgentConfig, Shutdown};
use testbot_e2e::{Process, WAIT, free_port, stdout_lines, wait_for};
use testbot_proto::client::BrokerClient;
use testbot_proto::jobs::{JobSpec, JobState};

fn start_broker(port: u16, data_dir: &std::path::Path, log_dir: &std::path::Path) -> Process {
    Process::spawn(
        "testbot-broker",
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data_dir.to_str().unwrap(),
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
    .expect("broker process")
}

async fn wait_healthy(client: &BrokerClient) {
    wait_for("the broker to answer", WAIT, || async {
        client.health().await.ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_killed_and_restarted_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut broker = start_broker(port, &data, dir.path());
    let read_token = |name: &str| {
        let path = data.join(name);
        std::fs::read_to_string(&path)
            .ok()
            .map(|t| SecretString::from(t.trim().to_string()))
    };
    let admin = wait_for("admin.token", WAIT, || async { read_token("admin.token") }).await;
    let client = BrokerClient::new(&url, admin.clone()).unwrap();
    wait_healthy(&client).await;
    client.create_site("restart").await.unwrap();
    let enrollment = client
        .create_enrollment_token("restart", &Default::default())
        .await
        .unwrap();

    let mut config = AgentConfig::new(
        url.clone(),
        SecretString::from(enrollment.token),
        dir.path().join("agent"),
    );
    config.name = Some("steady".into());
    config.poll_wait = Duration::from_secs(5);
    let shutdown = Shutdown::default();
    let agent = tokio::spawn(Agent::new(config).unwrap().run(shutdown.clone()));

    let job = client
        .submit(&JobSpec {
            script: "for i in $(seq 1 25); do echo line $i; sleep 0.2; done".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let parked = client
        .submit(&JobSpec {
            script: "echo parked".into(),
            labels: vec!["no-such-agent".into()],
            ..Default::default()
        })
        .await
        .unwrap();

    let mut follower = Process::spawn(
        "testbot",
        &["logs", "-f", &job.id.to_string()],
        &[
            ("TESTBOT_URL", &url),
            ("TESTBOT_TOKEN", admin.expose_secret()),
        ],
        dir.path(),
    )
    .unwrap();

    let before = wait_for("five lines before the crash", WAIT, || async {
        let job = client.job(job.id).await.ok()?;
        let log = read_log(&client, job.id).await?;
        log.contains(" O line 5\n").then_some((job.log_bytes, log))
    })
    .await;

    broker.kill9().await;
    // The agent keeps running the job while the broker is down.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut broker = start_broker(port, &data, dir.path());
    wait_healthy(&client).await;

    let status = follower.wait(WAIT).await;
    assert!(
        status.success(),
        "the follower exits with the job's code: {status}"
    );
    let printed =
        std::fs::read_to_string(dir.path().join(format!("{}.out", follower.name))).unwrap();
    let expected: String = (1..=25).map(|i| format!("line {i}\n")).collect();
    assert_eq!(printed, expected, "every line once, in order");

    let finished = client.job(job.id).await.unwrap();
    assert_eq!(finished.state, JobState::Succeeded, "{finished:?}");
    assert_eq!(
        finished.attempts, 1,
        "the agent kept its job across the restart"
    );
    let log = read_log(&client, job.id).await.unwrap();
    assert!(finished.log_bytes >= before.0);
    assert!(
        log.starts_with(&before.1),
        "acknowledged bytes survived unchanged"
    );
    assert_eq!(stdout_lines(&log).len(), 25);

    let parked = client.job(parked.id).await.unwrap();
    assert_eq!(parked.state, JobState::Queued, "the queued job survived");

    shutdown.drain.cancel();
    shutdown.hard.cancel();
    tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    broker.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        broker.wait(WAIT).await.success(),
        "the broker stops cleanly on SIGTERM"
    );
}

async fn read_log(client: &BrokerClient, id: testbot_proto::jobs::JobId) -> Option<String> {
    use futures_util::StreamExt as _;
    let stream = client.log_stream(id, 0, false).await.ok()?;
    let mut stream = std::pin::pin!(stream);
    let mut out = Vec::new();
    while let Some(bytes) = stream.next().await {
        out.extend_from_slice(&bytes.ok()?);
    }
    String::from_utf8(out).ok()
}
