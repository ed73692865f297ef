//! Throwaway PostgreSQL databases for tests, on the server `tests/postgres/start.sh` starts
//! (`TESTBOT_TEST_DATABASE_URL` names its maintenance database).

use sqlx::Connection as _;

/// The variable naming the test server's maintenance database.
pub const URL_VARIABLE: &str = "TESTBOT_TEST_DATABASE_URL";

/// A database of its own for one test; [`TestDatabase::drop_database`] removes it.
pub struct TestDatabase {
    /// `postgres://…/testbot_test_…`: give it to brokers as `--database-url`.
    pub url: String,
    maintenance_url: String,
    name: String,
}

fn maintenance_url() -> String {
    std::env::var(URL_VARIABLE).unwrap_or_else(|_| {
        panic!(
            "{URL_VARIABLE} is not set: start the test PostgreSQL with \
             `eval \"$(tests/postgres/start.sh)\"` (scripts/test.sh does)"
        )
    })
}

impl TestDatabase {
    /// Creates an empty database.
    pub async fn create() -> TestDatabase {
        let maintenance_url = maintenance_url();
        let name = format!("testbot_test_{}", testbot_proto::signing::random_hex(8));
        let mut conn = sqlx::PgConnection::connect(&maintenance_url)
            .await
            .unwrap_or_else(|err| panic!("cannot connect to {maintenance_url}: {err}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create the test database");
        let _ = conn.close().await;
        let base = maintenance_url
            .rsplit_once('/')
            .map_or(maintenance_url.as_str(), |(base, _)| base);
        TestDatabase {
            url: format!("{base}/{name}"),
            maintenance_url,
            name,
        }
    }

    /// Drops the database, closing whatever is still connected to it.
    pub async fn drop_database(self) {
        let mut conn = sqlx::PgConnection::connect(&self.maintenance_url)
            .await
            .expect("connect to drop the test database");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await
        .expect("drop the test database");
        let _ = conn.close().await;
    }
}
