//! What the broker keeps of statistical bisections: each one a document
//! ([`testbot_proto::bisect::Bisection`]) that only the leading broker's bisector advances. A
//! part of [`super::Store`] of its own, implemented beside each backend.

use testbot_proto::bisect::Bisection;

use super::StoreResult;

#[async_trait::async_trait]
pub trait BisectionStore: Send + Sync {
    /// Stores a new bisection (its `id` is ignored) and returns it with the id it was given.
    async fn insert_bisection(&self, bisection: &Bisection) -> StoreResult<Bisection>;
    /// Writes `bisection` back as it now stands.
    async fn update_bisection(&self, bisection: &Bisection) -> StoreResult<()>;
    async fn bisection(&self, id: i64) -> StoreResult<Option<Bisection>>;
    /// The bisections still running, oldest first.
    async fn running_bisections(&self) -> StoreResult<Vec<Bisection>>;
    /// A repository's bisections, newest first, at most `limit`.
    async fn repo_bisections(&self, repository: &str, limit: i64) -> StoreResult<Vec<Bisection>>;
    /// Whether a bisection of `test` ending at `bad_sha` exists (in any state).
    async fn bisection_exists(
        &self,
        repository: &str,
        test: &str,
        bad_sha: &str,
    ) -> StoreResult<bool>;
}

/// A stored document, read back; one that no longer reads is an error that names it.
pub(crate) fn document(id: i64, doc: &str) -> StoreResult<Bisection> {
    let mut bisection: Bisection = serde_json::from_str(doc)?;
    bisection.id = id;
    Ok(bisection)
}
