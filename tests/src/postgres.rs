//! Databases on the test PostgreSQL, for brokers that share one (`--database-url`).
//!
//! `TESTBOT_TEST_DATABASE_URL` names the server's maintenance database
//! (`postgres://postgres@127.0.0.1:15432/postgres`); `tests/postgres/start.sh` starts the server
//! and prints it, and `scripts/test.sh` does both.

/// The environment variable naming the test PostgreSQL's maintenance database.
pub const TEST_DATABASE_URL: &str = "TESTBOT_TEST_DATABASE_URL";

/// An empty database on the test PostgreSQL, dropped when this is dropped (also when the test
/// fails); its `url` is for `--database-url`.
pub type TestDatabase = testbot_broker::store::scratch::ScratchDatabase;

/// Creates a [`TestDatabase`]; panics with how to start the server when it is not running.
pub async fn test_database() -> TestDatabase {
    let admin_url = std::env::var(TEST_DATABASE_URL).unwrap_or_else(|_| {
        panic!(
            "{TEST_DATABASE_URL} is not set: start the test PostgreSQL with \
             `eval \"$(tests/postgres/start.sh)\"`; scripts/test.sh does"
        )
    });
    TestDatabase::create(&admin_url, "testbot_e2e")
        .await
        .unwrap_or_else(|err| panic!("{err:#}"))
}
