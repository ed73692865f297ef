//! Several brokers on one PostgreSQL database: an agent and a client may talk to different
//! brokers and see one queue, one log, one cancel, and a signed request replayed to the other
//! broker is refused.

use std::time::{Duration, Instant};

use secrecy::ExposeSecret as _;
use testbot_broker::{Broker, BrokerConfig};
use testbot_e2e::postgres::test_database;
use testbot_e2e::{Fleet, POLL_BODY, WAIT, send_signed_poll, stdout_lines, wait_for};
use testbot_proto::client::{BrokerClient, follow_log};
use testbot_proto::jobs::{JobSpec, JobState};

/// A second broker on the fleet's database, with the fleet's operator token (brokers of one
/// database share it).
async fn second_broker(
    fleet: &Fleet,
    database_url: &str,
    tune: impl FnOnce(&mut BrokerConfig),
) -> Broker {
    let dir = fleet.dir.path().join("broker-b");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("admin.token"), fleet.admin_token.expose_secret()).unwrap();
    let mut config = BrokerConfig::new("127.0.0.1:0".parse().unwrap(), dir);
    config.database_url = Some(database_url.to_string());
    tune(&mut config);
    Broker::start(config)
        .await
        .expect("the second broker starts")
}

#[tokio::test(flavor = "multi_thread")]
async fn two_brokers_share_the_queue_the_log_and_the_cancel() {
    testbot_proto::client::install_crypto_provider();
    let db = test_database().await;
    // Heartbeats far apart, so only the event from the other broker can end a held one soon.
    let tune = |config: &mut BrokerConfig| {
        config.settings.lease_ttl = Duration::from_secs(20);
        config.settings.heartbeat_interval = Duration::from_secs(5);
        config.settings.poll_timeout = Duration::from_secs(5);
    };
    let url = db.url.clone();
    let mut fleet = Fleet::start_with(|config| {
        config.database_url = Some(url);
        tune(config);
    })
    .await;
    let b = second_broker(&fleet, &db.url, tune).await;
    let client_b = BrokerClient::new(&b.url(), fleet.admin_token.clone()).unwrap();

    // The agent talks to broker A only; the client to broker B only.
    fleet.add_agent(fleet.agent_config("a1"));
    fleet.wait_polling_agents(1).await;
    let submitted = Instant::now();
    let job = client_b
        .submit(&JobSpec {
            script: "for i in $(seq 1 20); do echo \"$i $(date +%s%N)\"; sleep 0.1; done".into(),
            ..JobSpec::default()
        })
        .await
        .unwrap();
    // Each line as it reaches the follower on B, against when the job printed it (one clock).
    let mut delays_ms = Vec::new();
    let mut pending = String::new();
    let finished = follow_log(&client_b, job.id, 0, |bytes| {
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        pending.push_str(std::str::from_utf8(bytes).unwrap());
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            if let Some(printed) = stdout_lines(&line)
                .first()
                .and_then(|l| l.split(' ').nth(1).and_then(|ns| ns.parse::<i64>().ok()))
            {
                delays_ms.push((now_ns - printed) as f64 / 1e6);
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(finished.state, JobState::Succeeded, "{finished:?}");
    assert_eq!(
        delays_ms.len(),
        20,
        "every line reached the follower on the other broker"
    );
    delays_ms.sort_by(f64::total_cmp);
    let median = delays_ms[delays_ms.len() / 2];
    eprintln!(
        "line written (agent on A) -> seen by a follower on B: median {median:.1} ms, max {:.1} ms; job took {:?}",
        delays_ms[delays_ms.len() - 1],
        submitted.elapsed()
    );
    assert!(
        median < 1000.0,
        "lines reach a follower on the other broker while the job runs (median {median:.0} ms)"
    );

    // A cancel through B reaches the agent, which holds its heartbeat on A, at once.
    let long = client_b
        .submit(&JobSpec {
            script: "echo started; sleep 60".into(),
            ..JobSpec::default()
        })
        .await
        .unwrap();
    // Past its first heartbeat: the agent's heartbeat is held by A from then on.
    wait_for(
        "the long job to run past its first heartbeat",
        WAIT,
        || async {
            let job = client_b.job(long.id).await.ok()?;
            let running_ms = testbot_proto::now_ms() - job.started_at_ms?;
            (job.state == JobState::Running && running_ms > 6_000).then_some(())
        },
    )
    .await;
    let asked = Instant::now();
    client_b.cancel(long.id).await.unwrap();
    let cancelled = wait_for("the cancel to reach the agent", WAIT, || async {
        let job = client_b.job(long.id).await.ok()?;
        job.state.is_terminal().then_some(job)
    })
    .await;
    assert_eq!(cancelled.state, JobState::Cancelled, "{cancelled:?}");
    eprintln!(
        "cancel through B -> job ended on the agent of A: {:?}",
        asked.elapsed()
    );
    assert!(
        asked.elapsed() < Duration::from_millis(2500),
        "the heartbeat held by A (for up to 5 s) was woken by the cancel on B ({:?})",
        asked.elapsed()
    );

    // A signed request that A accepted is refused by B: nonces are checked in the database.
    let agent = fleet.enroll("manual").await;
    let nonce = testbot_proto::signing::random_hex(16);
    let now = testbot_proto::now_ms();
    let first = send_signed_poll(&fleet.url, &agent, now, &nonce, POLL_BODY, POLL_BODY).await;
    assert_eq!(first.0, 204, "{first:?}");
    let replayed = send_signed_poll(&b.url(), &agent, now, &nonce, POLL_BODY, POLL_BODY).await;
    assert_eq!(
        replayed,
        (
            401,
            "the request nonce was used before: a replayed request".to_string()
        )
    );

    b.shutdown().await.unwrap();
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_without_the_shared_operator_token_refuses_to_start() {
    let db = test_database().await;
    let url = db.url.clone();
    let fleet = Fleet::start_with(|config| config.database_url = Some(url)).await;
    let dir = fleet.dir.path().join("broker-c");
    let mut config = BrokerConfig::new("127.0.0.1:0".parse().unwrap(), dir.clone());
    config.database_url = Some(db.url.clone());
    let err = match Broker::start(config).await {
        Ok(_) => panic!("a broker without admin.token started on a shared database"),
        Err(err) => format!("{err:#}"),
    };
    assert_eq!(
        err,
        format!(
            "{} is missing, but the database, which other brokers share, already has the \
             operator token admin: copy admin.token from another broker's data directory here \
             (every broker of one database uses the same token)",
            dir.join("admin.token").display()
        )
    );
    // The first broker's token still works.
    fleet.client().sites().await.unwrap();
    fleet.stop().await;
}
