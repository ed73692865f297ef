//! [`BisectionStore`] on PostgreSQL: what `sqlite/bisections.rs` does.

use testbot_proto::bisect::Bisection;

use super::PgStore;
use crate::store::StoreResult;
use crate::store::bisections::{BisectionStore, document};

#[async_trait::async_trait]
impl BisectionStore for PgStore {
    async fn insert_bisection(&self, bisection: &Bisection) -> StoreResult<Bisection> {
        let doc = serde_json::to_string(bisection)?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO bisections (repository, test, bad_sha, state, doc, created_at_ms,
                 updated_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING id",
        )
        .bind(&bisection.repository)
        .bind(bisection.test_id())
        .bind(bisection.commits.last().cloned().unwrap_or_default())
        .bind(bisection.state.as_str())
        .bind(&doc)
        .bind(bisection.created_at_ms)
        .fetch_one(&self.pool)
        .await?;
        let mut stored = bisection.clone();
        stored.id = id;
        Ok(stored)
    }

    async fn update_bisection(&self, bisection: &Bisection) -> StoreResult<()> {
        sqlx::query("UPDATE bisections SET state = $2, doc = $3, updated_at_ms = $4 WHERE id = $1")
            .bind(bisection.id)
            .bind(bisection.state.as_str())
            .bind(serde_json::to_string(bisection)?)
            .bind(bisection.updated_at_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn bisection(&self, id: i64) -> StoreResult<Option<Bisection>> {
        let doc: Option<String> = sqlx::query_scalar("SELECT doc FROM bisections WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        doc.map(|doc| document(id, &doc)).transpose()
    }

    async fn running_bisections(&self) -> StoreResult<Vec<Bisection>> {
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT id, doc FROM bisections WHERE state = 'running' ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|(id, doc)| document(*id, doc)).collect()
    }

    async fn repo_bisections(&self, repository: &str, limit: i64) -> StoreResult<Vec<Bisection>> {
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT id, doc FROM bisections WHERE repository = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(repository)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|(id, doc)| document(*id, doc)).collect()
    }

    async fn bisection_exists(
        &self,
        repository: &str,
        test: &str,
        bad_sha: &str,
    ) -> StoreResult<bool> {
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM bisections WHERE repository = $1 AND test = $2 AND bad_sha = $3",
        )
        .bind(repository)
        .bind(test)
        .bind(bad_sha)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }
}
