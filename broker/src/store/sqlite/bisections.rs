//! [`BisectionStore`] on SQLite.

use rusqlite::{OptionalExtension as _, params};
use testbot_proto::bisect::Bisection;

use super::SqliteStore;
use crate::store::StoreResult;
use crate::store::bisections::{BisectionStore, document};

#[async_trait::async_trait]
impl BisectionStore for SqliteStore {
    async fn insert_bisection(&self, bisection: &Bisection) -> StoreResult<Bisection> {
        let doc = serde_json::to_string(bisection)?;
        let (repository, test, bad, state, at) = (
            bisection.repository.clone(),
            bisection.test_id(),
            bisection.commits.last().cloned().unwrap_or_default(),
            bisection.state.as_str(),
            bisection.created_at_ms,
        );
        let id = self
            .writer
            .write(move |tx| {
                tx.prepare_cached(
                    "INSERT INTO bisections (repository, test, bad_sha, state, doc, created_at_ms,
                         updated_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) RETURNING id",
                )?
                .query_row(params![repository, test, bad, state, doc, at], |row| {
                    row.get::<_, i64>(0)
                })
            })
            .await?;
        let mut stored = bisection.clone();
        stored.id = id;
        Ok(stored)
    }

    async fn update_bisection(&self, bisection: &Bisection) -> StoreResult<()> {
        let doc = serde_json::to_string(bisection)?;
        let (id, state, at) = (
            bisection.id,
            bisection.state.as_str(),
            bisection.updated_at_ms,
        );
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "UPDATE bisections SET state = ?2, doc = ?3, updated_at_ms = ?4 WHERE id = ?1",
                )?
                .execute(params![id, state, doc, at])?;
                Ok(())
            })
            .await
    }

    async fn bisection(&self, id: i64) -> StoreResult<Option<Bisection>> {
        let doc: Option<String> = self
            .readers
            .read(move |conn| {
                conn.prepare_cached("SELECT doc FROM bisections WHERE id = ?1")?
                    .query_row([id], |row| row.get(0))
                    .optional()
            })
            .await?;
        doc.map(|doc| document(id, &doc)).transpose()
    }

    async fn running_bisections(&self) -> StoreResult<Vec<Bisection>> {
        let rows: Vec<(i64, String)> = self
            .readers
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT id, doc FROM bisections WHERE state = 'running' ORDER BY id",
                )?
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect()
            })
            .await?;
        rows.iter().map(|(id, doc)| document(*id, doc)).collect()
    }

    async fn repo_bisections(&self, repository: &str, limit: i64) -> StoreResult<Vec<Bisection>> {
        let repository = repository.to_owned();
        let rows: Vec<(i64, String)> = self
            .readers
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT id, doc FROM bisections WHERE repository = ?1
                     ORDER BY id DESC LIMIT ?2",
                )?
                .query_map(params![repository, limit], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })?
                .collect()
            })
            .await?;
        rows.iter().map(|(id, doc)| document(*id, doc)).collect()
    }

    async fn bisection_exists(
        &self,
        repository: &str,
        test: &str,
        bad_sha: &str,
    ) -> StoreResult<bool> {
        let (repository, test, bad) = (repository.to_owned(), test.to_owned(), bad_sha.to_owned());
        self.readers
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT 1 FROM bisections WHERE repository = ?1 AND test = ?2 AND bad_sha = ?3",
                )?
                .query_row(params![repository, test, bad], |_| Ok(()))
                .optional()
                .map(|found| found.is_some())
            })
            .await
    }
}
