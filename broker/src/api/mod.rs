//! The HTTP API under `/api/v1`, one file per resource (as `testbot_proto` has one per wire
//! type), and the router with its layers and JSON fallbacks.
//!
//! Layout:
//! - [`jobs`]: submitting, listing, reading and cancelling jobs.
//! - [`batches`]: N runs of one job, submitted, read and cancelled as one.
//! - [`results`]: result files agents upload, and the test results read from them.
//! - [`logs`]: reading and following a job's log, and agents appending to it.
//! - [`agent`]: the signed `/agent` endpoints: poll, start, heartbeat, metadata, release,
//!   finish.
//! - [`repos`]: repository registrations.
//! - [`sites`]: sites, enrollment tokens, enrolling agents, listing and revoking them.

mod agent;
mod batches;
mod bisections;
mod jobs;
mod logs;
mod repos;
mod results;
mod sites;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use testbot_proto::jobs::{Job, JobId};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::LeaseRefusal;

use self::{agent::*, batches::*, bisections::*, jobs::*, logs::*, repos::*, results::*, sites::*};
pub(crate) use logs::FOLLOW_RECHECK;

/// The broker's router: every route, the JSON error fallbacks, and the layers.
pub fn create_app(state: AppState) -> Router {
    let max_body_bytes = state.settings.max_body_bytes;
    let api = Router::new()
        .route("/health", get(health_handler))
        .route("/jobs", post(submit_handler).get(list_handler))
        .route("/jobs/{id}", get(job_handler))
        .route("/jobs/{id}/cancel", post(cancel_handler))
        .route("/jobs/{id}/log", get(log_handler))
        .route("/batches", post(submit_batch_handler))
        .route("/batches/{id}", get(batch_handler))
        .route("/batches/{id}/cancel", post(cancel_batch_handler))
        .route("/batches/{id}/results", get(batch_results_handler))
        .route("/repos/{owner}/{name}/flaky", get(flaky_handler))
        .route("/repos/{owner}/{name}/history", get(test_history_handler))
        .route(
            "/repos/{owner}/{name}/bisections",
            post(start_bisection_handler).get(repo_bisections_handler),
        )
        .route("/bisections/{id}", get(bisection_handler))
        .route("/jobs/{id}/results", get(job_results_handler))
        .route("/jobs/{id}/results/file", get(result_file_handler))
        .route(
            "/repos",
            post(register_repo_handler).get(list_repos_handler),
        )
        .route(
            "/repos/{owner}/{name}",
            get(repo_handler).delete(remove_repo_handler),
        )
        .route("/sites", post(create_site_handler).get(list_sites_handler))
        .route(
            "/sites/{name}/enrollment-tokens",
            post(enrollment_token_handler),
        )
        .route("/sites/{name}/revoke", post(revoke_site_handler))
        .route("/agents", get(list_agents_handler))
        .route("/agents/{id}/revoke", post(revoke_agent_handler))
        .route("/agent/enroll", post(enroll_handler));
    // Every other agent route is authenticated by the request's signature.
    let agent = Router::new()
        .route("/agent/poll", post(poll_handler))
        .route("/agent/jobs/{id}/start", post(start_handler))
        .route("/agent/jobs/{id}/heartbeat", post(heartbeat_handler))
        .route("/agent/jobs/{id}/log", post(append_log_handler))
        .route("/agent/jobs/{id}/finish", post(finish_handler))
        .route("/agent/jobs/{id}/metadata", post(metadata_handler))
        .route("/agent/jobs/{id}/release", post(release_handler))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::verify_agent_signature,
        ));
    // Result files are larger than other agent requests; the same signature, a larger limit.
    let uploads = Router::new()
        .route(
            "/agent/jobs/{id}/files",
            axum::routing::put(upload_result_handler),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::verify_agent_upload_signature,
        ))
        .layer(DefaultBodyLimit::max(
            testbot_proto::test_results::MAX_RESULT_FILE_BYTES as usize,
        ));
    // GitHub's deliveries are larger than API requests, and verified by their own signature.
    let github = Router::new()
        .route(
            crate::github::webhook::WEBHOOK_PATH,
            post(crate::github::webhook::webhook_handler),
        )
        .layer(DefaultBodyLimit::max(
            crate::github::webhook::MAX_WEBHOOK_BYTES,
        ));
    let api = api.merge(agent).merge(uploads).merge(github);
    Router::new()
        .nest(testbot_proto::API_PREFIX, api)
        .merge(crate::health::routes())
        .merge(crate::metrics::routes())
        .merge(crate::web::routes())
        .fallback(not_found_handler)
        .method_not_allowed_fallback(method_not_allowed_handler)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_deadline,
        ))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track_http,
        ))
        .with_state(state)
}

/// Cuts off a request that has not arrived and been answered within the request timeout, so a
/// client that trickles its body in cannot hold a connection and a handler for good. A streamed
/// response body (a followed log) is not counted.
async fn request_deadline(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = state.settings.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::RequestTimeout(format!(
            "the request was not received and answered within {} (--request-timeout)",
            humantime::format_duration(limit)
        ))
        .into_response(),
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("A request handler panicked.");
    ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()
}

async fn not_found_handler() -> ApiError {
    ApiError::NotFound("no such endpoint; the API lives under /api/v1".into())
}

async fn method_not_allowed_handler() -> Response {
    let body = testbot_proto::error::ErrorBody::new(
        "method_not_allowed",
        "this endpoint does not accept that HTTP method",
    );
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

async fn health_handler() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

pub(crate) fn to_job(model: &crate::store::JobModel) -> Result<Job, ApiError> {
    Ok(model.to_job()?)
}

pub(crate) async fn find_job(
    state: &AppState,
    id: JobId,
) -> Result<crate::store::JobModel, ApiError> {
    state
        .store
        .job(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("job {id} does not exist")))
}

pub(crate) fn refusal_error(id: JobId, refusal: LeaseRefusal) -> ApiError {
    match refusal {
        LeaseRefusal::NoSuchJob => ApiError::NotFound(refusal.describe(id)),
        other => ApiError::LeaseLost(other.describe(id)),
    }
}

pub(crate) fn replayed(jti: Option<(&str, i64)>) -> ApiError {
    ApiError::Unauthorized(format!(
        "OIDC token refused: {}",
        testbot_proto::oidc::OidcError::Replayed(jti.map(|(j, _)| j).unwrap_or("").into())
    ))
}
