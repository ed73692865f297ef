//! The broker's web pages: what a check run's "Details" link and the Action's log link open.
//!
//! Server-rendered HTML (askama templates in `templates/`, escaped by default), a stylesheet
//! and one small script served by the broker itself (no CDN: it works on an offline site
//! network), under a Content-Security-Policy that allows no inline script or style and no
//! other origin. Job output reaches the page only as text: the log arrives as JSON segments
//! (see [`ansi`]) that the script inserts with `textContent`.
//!
//! Who may look: a public repository's jobs are readable by anyone, as on GitHub; any other
//! job needs what the API needs (an operator's or the workflow's token as a bearer token).
//! Sign-in for browsers comes with the dashboard.
//!
//! Layout:
//! - [`ansi`]: terminal colours in log lines, as CSS classes; every other escape dropped.
//! - [`job`]: the job page, its live log (server-sent events), earlier lines, the raw log.

pub mod ansi;
mod job;

use askama::Template;
use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::state::AppState;

/// What every page answers with: nothing from another origin, no inline code, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

const STYLESHEET: &str = include_str!("../../assets/testbot.css");
const JOB_SCRIPT: &str = include_str!("../../assets/job.js");

/// The pages and their assets, with the security headers on every answer.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/jobs/{id}", get(job::job_page_handler))
        .route("/jobs/{id}/log.txt", get(job::raw_log_handler))
        .route("/jobs/{id}/files", get(job::result_file_handler))
        .route("/jobs/{id}/log/lines", get(job::log_lines_handler))
        .route("/jobs/{id}/log/stream", get(job::log_stream_handler))
        .route("/assets/testbot.css", get(stylesheet_handler))
        .route("/assets/job.js", get(job_script_handler))
        .layer(axum::middleware::map_response(security_headers))
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

async fn stylesheet_handler() -> Response {
    asset("text/css; charset=utf-8", STYLESHEET)
}

async fn job_script_handler() -> Response {
    asset("text/javascript; charset=utf-8", JOB_SCRIPT)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    heading: &'a str,
    message: &'a str,
}

/// A page's failure, shown as a page (the API's errors are JSON; these are for people).
#[derive(Debug)]
pub enum WebError {
    NotFound(String),
    TooManyFollowers(String),
    Internal(anyhow::Error),
}

impl From<crate::error::ApiError> for WebError {
    fn from(err: crate::error::ApiError) -> Self {
        use crate::error::ApiError;
        match err {
            ApiError::NotFound(m) => WebError::NotFound(m),
            ApiError::QuotaExceeded(m) => WebError::TooManyFollowers(m),
            other => WebError::Internal(anyhow::anyhow!("{other:?}")),
        }
    }
}

impl From<crate::store::StoreError> for WebError {
    fn from(err: crate::store::StoreError) -> Self {
        WebError::Internal(anyhow::anyhow!("the broker's database: {err:?}"))
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let (status, heading, message) = match &self {
            WebError::NotFound(m) => (StatusCode::NOT_FOUND, "Not found", m.clone()),
            WebError::TooManyFollowers(m) => {
                (StatusCode::TOO_MANY_REQUESTS, "Too many viewers", m.clone())
            }
            WebError::Internal(err) => {
                tracing::error!(?err, "A page failed.");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Something went wrong",
                    "The broker could not show this page; its log says why.".to_string(),
                )
            }
        };
        let page = ErrorPage {
            heading,
            message: &message,
        };
        match page.render() {
            Ok(html) => (status, Html(html)).into_response(),
            Err(_) => (status, message).into_response(),
        }
    }
}
