//! A job's log: read or followed by clients, appended to by the agent holding its lease.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use bytes::Bytes;
use testbot_proto::jobs::JobId;
use testbot_proto::logs::{LogAck, LogChunk, LogQuery, MAX_CHUNK_BYTES};

use super::{find_job, refusal_error};
use crate::access::{JobAccess, authorize_job_access};
use crate::auth::Principal;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::lifecycle::jobs;
use crate::state::AppState;
use crate::store::AppendResult;

/// Most bytes one log response reads from the database at a time.
pub(super) const LOG_READ_BYTES: usize = 256 * 1024;
/// A log follower re-checks the job this often even without a wake-up.
pub(crate) const FOLLOW_RECHECK: Duration = Duration::from_secs(15);

/// Streams the log from `offset` as plain text; with `follow`, until the job ends.
pub(super) async fn log_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
    ApiQuery(query): ApiQuery<LogQuery>,
) -> Result<Response, ApiError> {
    authorize_job_access(
        &state,
        &principal,
        &find_job(&state, id).await?,
        JobAccess::Read,
    )
    .await?;
    let slot = if query.follow {
        Some(
            state
                .log_followers
                .join(id, state.settings.max_log_followers)?,
        )
    } else {
        None
    };
    let follower = LogFollower {
        rx: state.log_watchers.subscribe(id),
        state,
        id,
        offset: query.offset,
        follow: query.follow,
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(Some(follower), |follower| async move {
        let mut follower = follower?;
        match follower.next_bytes().await {
            Ok(Some(bytes)) => Some((Ok(bytes), Some(follower))),
            Ok(None) => None,
            Err(err) => {
                tracing::warn!(job_id = %follower.id, ?err, "Log stream failed.");
                Some((Err(std::io::Error::other("log stream failed")), None))
            }
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream))
        .expect("static headers are valid"))
}

pub(super) struct LogFollower {
    state: AppState,
    rx: tokio::sync::watch::Receiver<u64>,
    id: JobId,
    offset: u64,
    follow: bool,
    /// The follower's place among the job's followers, given back with the stream.
    _slot: Option<crate::limits::FollowerSlot>,
}

impl LogFollower {
    /// The next bytes of the log, or `None` at its end (when not following, or the job ended).
    async fn next_bytes(&mut self) -> anyhow::Result<Option<Bytes>> {
        loop {
            // Read the state before the bytes: a job seen finished has all its log stored.
            let finished = match self.state.store.job(self.id).await? {
                Some(job) => job.state().is_terminal(),
                None => true,
            };
            let data = self
                .state
                .store
                .read_log(self.id, self.offset, LOG_READ_BYTES)
                .await?;
            if !data.is_empty() {
                self.offset += data.len() as u64;
                return Ok(Some(Bytes::from(data)));
            }
            if finished || !self.follow {
                return Ok(None);
            }
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        self.rx = self.state.log_watchers.subscribe(self.id);
                    }
                }
                _ = tokio::time::sleep(FOLLOW_RECHECK) => {}
                _ = self.state.shutdown.cancelled() => return Ok(None),
            }
        }
    }
}

pub(super) async fn append_log_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
    ApiJson(chunk): ApiJson<LogChunk>,
) -> Result<axum::Json<LogAck>, ApiError> {
    principal.require_agent()?;
    if chunk.data.len() > MAX_CHUNK_BYTES {
        return Err(ApiError::PayloadTooLarge(format!(
            "log chunk is {} bytes; the limit is {MAX_CHUNK_BYTES}",
            chunk.data.len()
        )));
    }
    let result = jobs::append_log(
        &state,
        id,
        &chunk.lease,
        chunk.offset,
        chunk.data.as_bytes(),
    )
    .await?;
    match result {
        AppendResult::Appended(log_bytes) => Ok(axum::Json(LogAck { log_bytes })),
        AppendResult::Refused(refusal) => Err(refusal_error(id, refusal)),
        AppendResult::Gap { log_bytes } => Err(ApiError::LogGap(format!(
            "chunk starts at byte {} but the log of job {id} ends at byte {log_bytes}; resend from byte {log_bytes}",
            chunk.offset
        ))),
        AppendResult::TooLarge { log_bytes } => Err(ApiError::LogTooLarge(format!(
            "the log of job {id} would pass the limit of {} bytes (it holds {log_bytes})",
            state.settings.max_log_bytes
        ))),
    }
}
