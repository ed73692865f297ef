//! Throwaway PostgreSQL databases, for tests and benchmarks of brokers on PostgreSQL.

use sqlx::Connection as _;

/// An empty database of its own on a PostgreSQL server, dropped (with whatever is still
/// connected to it) when this is dropped, also while a test panics.
pub struct ScratchDatabase {
    maintenance_url: String,
    name: String,
    /// The database's URL, for `--database-url`.
    pub url: String,
}

impl ScratchDatabase {
    /// Creates `PREFIX_<random>` on the server whose maintenance database `maintenance_url`
    /// names (`postgres://USER@HOST:PORT/postgres`; the user may create databases).
    pub async fn create(maintenance_url: &str, prefix: &str) -> anyhow::Result<ScratchDatabase> {
        let name = format!("{prefix}_{}", testbot_proto::signing::random_hex(8));
        let mut admin = sqlx::PgConnection::connect(maintenance_url)
            .await
            .map_err(|err| anyhow::anyhow!("Cannot connect to {maintenance_url}: {err}"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .map_err(|err| anyhow::anyhow!("Cannot create database {name}: {err}"))?;
        let _ = admin.close().await;
        Ok(ScratchDatabase {
            url: with_database(maintenance_url, &name),
            maintenance_url: maintenance_url.to_string(),
            name,
        })
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.maintenance_url.clone(), self.name.clone());
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
            panic!("cannot drop database {}: {dropped:?}", self.name);
        }
    }
}

/// `url` with its database (the path) replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let query = path.find('?').map_or("", |q| &path[q..]);
    format!("{scheme}://{authority}/{database}{query}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_database_of_a_url_is_replaced_and_its_query_kept() {
        assert_eq!(
            super::with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(super::with_database("postgres://h", "x"), "postgres://h/x");
    }
}
