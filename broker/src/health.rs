//! Probes for process supervisors and load balancers, at the root (not under `/api/v1`) and
//! without credentials: `GET /healthz` (the process serves) and `GET /readyz` (it can do its
//! work: the database answers, its schema is the one this broker expects, and the broker is
//! not shutting down).

use axum::Router;
use axum::extract::State;
use axum::routing::get;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::Store;

/// `GET /healthz` and `GET /readyz`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz_handler))
        .route("/readyz", get(readyz_handler))
}

/// Liveness: answering at all is the answer.
async fn healthz_handler() -> &'static str {
    "ok"
}

async fn readyz_handler(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::Unavailable(
            "the broker is shutting down; send requests to another one".into(),
        ));
    }
    readiness(&*state.store).await
}

/// `ok`, or `503 unavailable` naming what is wrong with the database.
async fn readiness(store: &dyn Store) -> Result<&'static str, ApiError> {
    match store.health().await {
        Ok(()) => Ok("ok"),
        Err(err) => {
            tracing::warn!(?err, "Not ready: the database check failed.");
            Err(ApiError::Unavailable(format!(
                "the broker is not ready: {err}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::response::IntoResponse as _;

    /// A store whose database has a migration applied that this broker does not know (a newer
    /// broker migrated it). sqlx refuses to start on such a database, so the probe is tested on
    /// a store opened before the newer migration was applied.
    #[tokio::test]
    async fn a_database_migrated_past_this_broker_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(dir.path())
            .await
            .unwrap();
        assert_eq!(readiness(&store).await.unwrap(), "ok");

        let applied: i64 = {
            let url = format!("sqlite://{}", dir.path().join("testbot.db").display());
            let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
                .await
                .unwrap();
            let newest: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
                .fetch_one(&mut db)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO _sqlx_migrations
                     (version, description, success, checksum, execution_time)
                 VALUES (?1, 'from a newer broker', 1, x'00', 0)",
            )
            .bind(newest + 1)
            .execute(&mut db)
            .await
            .unwrap();
            newest
        };

        let response = readiness(&store).await.unwrap_err().into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "unavailable");
        assert_eq!(
            body["error"]["message"],
            format!(
                "the broker is not ready: the database schema is at migration {} but this broker \
                 expects {applied}",
                applied + 1
            )
        );

        store.close().await;
        let response = readiness(&store).await.unwrap_err().into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
