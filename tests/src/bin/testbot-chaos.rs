//! `testbot-chaos`: the long chaos run (1,000 jobs, three brokers on PostgreSQL, four agents,
//! a process killed every few seconds, a proxy that drops, delays and resets connections).
//! Exits non-zero when a promise was broken; prints the seed to replay it.
//!
//!     cargo run -p testbot-e2e --bin testbot-chaos -- [--jobs N] [--seed N] [--sqlite]
//!
//! PostgreSQL: `eval "$(tests/postgres/start.sh)"` first (it sets TESTBOT_TEST_DATABASE_URL).

use std::time::Duration;

use testbot_e2e::chaos::{Faults, Plan, run};
use testbot_e2e::postgres::test_database;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let mut jobs = 1000;
    let mut seed = testbot_proto::now_ms() as u64;
    let mut sqlite = false;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "--jobs" => jobs = value("--jobs") as usize,
            "--seed" => seed = value("--seed"),
            "--sqlite" => sqlite = true,
            other => {
                eprintln!(
                    "testbot-chaos: unknown argument {other:?} (--jobs N, --seed N, --sqlite)"
                );
                return std::process::ExitCode::from(2);
            }
        }
    }
    let db = if sqlite {
        None
    } else {
        Some(test_database().await)
    };
    let report = run(Plan {
        seed,
        jobs,
        brokers: if sqlite { 1 } else { 3 },
        agents: 4,
        concurrency: 8,
        database_url: db.as_ref().map(|db| db.url.clone()),
        kill_every: Duration::from_secs(4),
        faults: Faults {
            drop: 3,
            reset: 3,
            delay: 10,
            max_delay: Duration::from_millis(200),
        },
        timeout: Duration::from_secs(1800),
    })
    .await;
    drop(db);
    for violation in &report.violations {
        eprintln!("{violation}");
    }
    if report.violations.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
