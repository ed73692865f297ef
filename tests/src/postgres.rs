//! Databases on the test PostgreSQL, for brokers that share one (`--database-url`).
//!
//! `TESTBOT_TEST_DATABASE_URL` names the server's maintenance database
//! (`postgres://postgres@127.0.0.1:15432/postgres`); `tests/postgres/start.sh` starts the server
//! and prints it, and `scripts/test.sh` does both.

use sqlx::Connection as _;

/// The environment variable naming the test PostgreSQL's maintenance database.
pub const TEST_DATABASE_URL: &str = "TESTBOT_TEST_DATABASE_URL";

/// An empty database, dropped (with whatever is still connected to it) when this is dropped,
/// also when the test fails.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    /// The database's URL, for `--database-url`.
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        let admin_url = std::env::var(TEST_DATABASE_URL).unwrap_or_else(|_| {
            panic!(
                "{TEST_DATABASE_URL} is not set: start the test PostgreSQL with \
                 `eval \"$(tests/postgres/start.sh)\"`; scripts/test.sh does"
            )
        });
        let name = format!("testbot_e2e_{}", testbot_proto::signing::random_hex(8));
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|err| panic!("cannot connect to {TEST_DATABASE_URL}: {err}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create a test database");
        let _ = admin.close().await;
        let url = with_database(&admin_url, &name);
        TestDatabase {
            admin_url,
            name,
            url,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Dropped from async code, perhaps while a test panics: on a runtime of its own.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async {
                    let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await?;
                    admin.close().await
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) && !std::thread::panicking() {
            panic!("cannot drop test database {}: {dropped:?}", self.name);
        }
    }
}

/// `url` with its database (the path) replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let query = path.find('?').map_or("", |q| &path[q..]);
    format!("{scheme}://{authority}/{database}{query}")
}
