//! The one HTTP error type. Every failure leaves as `{ "error": { "code", "message" } }`;
//! internal errors are logged and answered with a generic message.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use testbot_proto::error::{ErrorBody, codes};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    LeaseLost(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    LogGap(String),
    #[error("{0}")]
    LogTooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    /// Well-formed, but nothing can act on it (e.g. no site accepts the job).
    #[error("{0}")]
    Unprocessable(String),
    /// A queue quota is full.
    #[error("{0}")]
    QuotaExceeded(String),
    /// The request did not arrive, or was not answered, within the broker's request timeout.
    #[error("{0}")]
    RequestTimeout(String),
    /// The signing agent, or its site, was revoked (or never enrolled).
    #[error("{0}")]
    AgentRevoked(String),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, codes::BAD_REQUEST),
            ApiError::InvalidJson(_) => (StatusCode::BAD_REQUEST, codes::INVALID_JSON),
            ApiError::PayloadTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, codes::PAYLOAD_TOO_LARGE)
            }
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, codes::UNAUTHORIZED),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, codes::FORBIDDEN),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, codes::NOT_FOUND),
            ApiError::LeaseLost(_) => (StatusCode::CONFLICT, codes::LEASE_LOST),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, codes::CONFLICT),
            ApiError::LogGap(_) => (StatusCode::CONFLICT, codes::LOG_GAP),
            ApiError::LogTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, codes::LOG_TOO_LARGE),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE),
            ApiError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, codes::UNPROCESSABLE),
            ApiError::QuotaExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, codes::QUOTA_EXCEEDED),
            ApiError::AgentRevoked(_) => (StatusCode::UNAUTHORIZED, codes::AGENT_REVOKED),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, codes::REQUEST_TIMEOUT),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        match err {
            crate::store::StoreError::Unavailable(err) => {
                tracing::warn!(?err, "The database is unavailable.");
                ApiError::Unavailable("the broker's database is unavailable; try again".into())
            }
            crate::store::StoreError::Internal(err) => ApiError::Internal(err),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            ApiError::Internal(err) => {
                tracing::error!(err = ?err, "Internal error while serving a request.");
                "internal error; the broker's log has the details".to_string()
            }
            other => other.to_string(),
        };
        (status, axum::Json(ErrorBody::new(code, message))).into_response()
    }
}

/// A JSON body whose rejections come back in the [`ApiError`] shape, naming the problem.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge(
            "request body is larger than the broker accepts (see --max-body-bytes)".into(),
        );
    }
    match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::BadRequest("expected a body with Content-Type: application/json".into())
        }
        JsonRejection::JsonSyntaxError(err) => ApiError::InvalidJson(format!(
            "request body is not valid JSON: {}",
            source_text(&err)
        )),
        JsonRejection::JsonDataError(err) => ApiError::InvalidJson(format!(
            "request body does not match the expected shape: {}",
            source_text(&err)
        )),
        other => ApiError::BadRequest(other.body_text()),
    }
}

/// The innermost message of an axum rejection (serde's own words, with line and column).
fn source_text(err: &dyn std::error::Error) -> String {
    let mut innermost = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        innermost = inner.to_string();
        source = inner.source();
    }
    innermost
}

/// Query parameters whose rejections come back in the [`ApiError`] shape.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(QueryRejection::FailedToDeserializeQueryString(err)) => Err(ApiError::BadRequest(
                format!("invalid query string: {}", source_text(&err)),
            )),
            Err(other) => Err(ApiError::BadRequest(other.body_text())),
        }
    }
}

/// A path parameter parsed as `T`, with the API's error shape.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(ApiError::BadRequest(format!(
                "invalid path: {}",
                rejection.body_text()
            ))),
        }
    }
}
