//! Short chaos runs (the long one is `cargo run -p testbot-e2e --bin testbot-chaos`): jobs
//! through real brokers and agents while processes are killed and restarted and a proxy drops,
//! delays and resets connections. Set `TESTBOT_CHAOS_SEED` to replay a run's choices.

use std::time::Duration;

use testbot_e2e::chaos::{Faults, Plan, run};
use testbot_e2e::postgres::test_database;

fn seed() -> u64 {
    std::env::var("TESTBOT_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| testbot_proto::now_ms() as u64)
}

const FAULTS: Faults = Faults {
    drop: 3,
    reset: 3,
    delay: 10,
    max_delay: Duration::from_millis(200),
};

fn assert_passed(report: &testbot_e2e::chaos::Report) {
    assert!(
        report.violations.is_empty(),
        "{} broken promises (replay with TESTBOT_CHAOS_SEED):\n{}",
        report.violations.len(),
        report.violations.join("\n")
    );
    assert!(!report.kills.is_empty(), "the run killed something");
}

#[tokio::test(flavor = "multi_thread")]
async fn three_brokers_on_postgres_lose_no_job_and_no_line_under_kills_and_faults() {
    let db = test_database().await;
    let report = run(Plan {
        seed: seed(),
        jobs: 180,
        brokers: 3,
        agents: 3,
        concurrency: 4,
        database_url: Some(db.url.clone()),
        kill_every: Duration::from_millis(1500),
        faults: FAULTS,
        timeout: Duration::from_secs(150),
    })
    .await;
    assert_passed(&report);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_broker_on_sqlite_loses_no_job_and_no_line_under_kills_and_faults() {
    let report = run(Plan {
        seed: seed(),
        jobs: 80,
        brokers: 1,
        agents: 2,
        concurrency: 4,
        database_url: None,
        kill_every: Duration::from_millis(1500),
        faults: FAULTS,
        timeout: Duration::from_secs(150),
    })
    .await;
    assert_passed(&report);
}
