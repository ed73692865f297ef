//! The endpoints an agent signs its requests to: poll for work, then start, heartbeat, set
//! metadata, hand back or finish the job it holds a lease on.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ring::rand::{SecureRandom, SystemRandom};
use testbot_proto::agents::{
    Assignment, LeaseRequest, LeaseStatus, MetadataRequest, PollRequest, ReleaseOutcome,
    ReleaseRequest,
};
use testbot_proto::jobs::{Job, JobId, validate_label, validate_word};
use testbot_proto::now_ms;
use testbot_proto::results::FinishRequest;
use tokio::time::Instant;

use super::{refusal_error, to_job};
use crate::auth::Principal;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::lifecycle::jobs;
use crate::state::AppState;
use crate::store::{JobTaker, LeaseRenewal};

/// How stale an agent's `last_seen` may get before a poll refreshes it.
pub(super) const AGENT_SEEN_RESOLUTION: Duration = Duration::from_secs(30);

pub(super) fn new_lease() -> Result<String, ApiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ApiError::Internal(anyhow::anyhow!("Cannot read random bytes")))?;
    Ok(hex::encode(bytes))
}

pub(super) fn lease_expiry(state: &AppState) -> i64 {
    now_ms() + state.settings.lease_ttl.as_millis() as i64
}

/// Long poll: answers at once with a matching queued job, or holds the request until one is
/// queued or the wait runs out (`204 No Content`).
pub(super) async fn poll_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(req): ApiJson<PollRequest>,
) -> Result<Response, ApiError> {
    let agent = principal.agent()?;
    for label in &req.labels {
        validate_label(label).map_err(ApiError::BadRequest)?;
    }
    crate::routing::check_offered_labels(&req.labels).map_err(ApiError::BadRequest)?;
    validate_word("executor", &req.executor).map_err(ApiError::BadRequest)?;
    let policy_json = req
        .policy
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(anyhow::Error::from)?;
    // Routing reads the site from the agent's enrollment, never from the request.
    let offer = std::sync::Arc::new(crate::routing::Offer {
        site: agent.site.clone(),
        labels: req.labels.clone(),
        executor: req.executor.clone(),
        policy: req.policy.clone(),
        workflow_jobs_without_policy: req.policy.is_none() && req.workflow_jobs_without_policy,
    });
    let stale = agent
        .last_seen_ms
        .is_none_or(|at| now_ms() - at > AGENT_SEEN_RESOLUTION.as_millis() as i64);
    if stale || policy_json != agent.policy {
        let offer_json = serde_json::to_string(&*offer).map_err(anyhow::Error::from)?;
        state
            .store
            .record_offer(&agent.id, policy_json.as_deref(), &offer_json)
            .await?;
    }
    let agent_name = format!("{}/{}", agent.site, agent.name);
    let taker = JobTaker {
        agent: &agent_name,
        offer: &offer,
    };
    let max_wait = state.settings.poll_timeout;
    let wait = req
        .wait_ms
        .map(Duration::from_millis)
        .map_or(max_wait, |w| w.min(max_wait));
    let deadline = Instant::now() + wait;
    let poll = state.dispatcher.new_poll();
    // A wake-up this poll got but could not use: passed on if the next claim finds nothing.
    let mut unused_signal: Option<crate::lifecycle::dispatch::Signal> = None;
    loop {
        // Register before trying to claim, so a job queued in between still wakes this poll.
        let mut ticket = state.dispatcher.register(poll, offer.clone());
        let lease = new_lease()?;
        if let Some(model) = jobs::claim(&state, &taker, &lease, lease_expiry(&state)).await? {
            drop(ticket);
            // The wake-up may have been for another job than the one claimed: pass it on. One
            // for this very job would only wake another poll to find nothing.
            if let Some(signal) = unused_signal.take()
                && signal.id != model.job_id()
            {
                state.dispatcher.pass_on(signal, poll);
            }
            tracing::debug!(job_id = model.id, agent = %agent_name, "Job claimed.");
            let provenance = crate::github::jobs::provenance_of(&*state.store, &model).await?;
            let assignment = Assignment {
                job_id: model.job_id(),
                attempt: model.attempts as u32,
                lease,
                lease_ttl_ms: state.settings.lease_ttl.as_millis() as u64,
                heartbeat_interval_ms: state.settings.heartbeat_interval.as_millis() as u64,
                log_offset: model.log_bytes as u64,
                // The one answer that carries secret values: the agent needs them to run the job.
                spec: model.spec_for_agent()?,
                oidc_token: model.oidc_token.clone(),
                provenance,
                accepted_at_ms: Some(model.created_at_ms),
                batch: model.batch_place(),
            };
            return Ok(axum::Json(assignment).into_response());
        }
        if let Some(signal) = unused_signal.take() {
            state.dispatcher.pass_on(signal, poll);
        }
        tokio::select! {
            signal = ticket.signalled() => unused_signal = signal,
            _ = tokio::time::sleep_until(deadline) => return Ok(StatusCode::NO_CONTENT.into_response()),
            _ = state.shutdown.cancelled() => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
    }
}

/// An agent hands back a job it will not run. A transient failure queues it again at once (the
/// agent is held back from it for a short, growing time); a refusal queues it for other agents
/// (this one is held back for longer) or, when no other agent could take it, ends it `error`
/// with the refusal as its reason. Either way it does not use up an attempt, and after
/// [`crate::routing::MAX_RELEASES`] hand-backs it ends.
pub(super) async fn release_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
    ApiJson(req): ApiJson<ReleaseRequest>,
) -> Result<axum::Json<ReleaseOutcome>, ApiError> {
    let agent = principal.agent()?;
    let agent_name = format!("{}/{}", agent.site, agent.name);
    let outcome = crate::routing::release(&state, id, &agent_name, &req).await?;
    tracing::info!(
        job_id = %id,
        agent = %agent_name,
        kind = ?req.kind,
        state = %outcome.state,
        reason = %outcome.reason,
        "Job handed back."
    );
    Ok(axum::Json(outcome))
}

pub(super) fn lease_status(state: &AppState, renewal: LeaseRenewal) -> axum::Json<LeaseStatus> {
    axum::Json(LeaseStatus {
        cancel_requested: renewal.cancel_requested,
        lease_ttl_ms: state.settings.lease_ttl.as_millis() as u64,
        log_bytes: renewal.log_bytes,
    })
}

pub(super) async fn start_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
    ApiJson(req): ApiJson<LeaseRequest>,
) -> Result<axum::Json<LeaseStatus>, ApiError> {
    principal.require_agent()?;
    let renewal = jobs::start(&state, id, &req.lease, lease_expiry(&state))
        .await?
        .map_err(|r| refusal_error(id, r))?;
    Ok(lease_status(&state, renewal))
}

/// Renews the lease, then holds the answer for up to `wait_ms` (at most the heartbeat interval)
/// so a cancel request reaches the agent at once rather than at its next heartbeat.
pub(super) async fn heartbeat_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
    ApiJson(req): ApiJson<LeaseRequest>,
) -> Result<axum::Json<LeaseStatus>, ApiError> {
    principal.require_agent()?;
    let mut rx = state.control_watchers.subscribe(id);
    let renew = || async {
        state
            .store
            .renew_lease(id, &req.lease, lease_expiry(&state))
            .await?
            .map_err(|r| refusal_error(id, r))
    };
    let renewal = match renew().await {
        Ok(renewal) => renewal,
        Err(err) => {
            // A heartbeat for a job that does not exist or has ended must leave nothing behind.
            drop(rx);
            state.control_watchers.forget_unused(id);
            return Err(err);
        }
    };
    let hold =
        Duration::from_millis(req.wait_ms.unwrap_or(0)).min(state.settings.heartbeat_interval);
    if renewal.cancel_requested || hold.is_zero() {
        return Ok(lease_status(&state, renewal));
    }
    tokio::select! {
        _ = rx.changed() => {}
        _ = tokio::time::sleep(hold) => {}
        _ = state.shutdown.cancelled() => {}
    }
    let renewal = renew().await?;
    Ok(lease_status(&state, renewal))
}

pub(super) async fn metadata_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
    ApiJson(req): ApiJson<MetadataRequest>,
) -> Result<axum::Json<Job>, ApiError> {
    principal.require_agent()?;
    let key_ok = !req.key.is_empty()
        && req.key.len() <= 64
        && req
            .key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !key_ok {
        return Err(ApiError::BadRequest(format!(
            "metadata key {:?} is invalid: use 1-64 characters of a-z 0-9 _",
            req.key
        )));
    }
    if req.value.len() > 1024 {
        return Err(ApiError::BadRequest(
            "metadata value is longer than 1024 bytes".into(),
        ));
    }
    if req.value.contains('\0') {
        return Err(ApiError::BadRequest(format!(
            "metadata value of {} contains a NUL byte",
            req.key
        )));
    }
    let model = state
        .store
        .set_metadata(id, &req.lease, &req.key, &req.value)
        .await?
        .map_err(|r| refusal_error(id, r))?;
    Ok(axum::Json(to_job(&model)?))
}

pub(super) async fn finish_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
    ApiJson(req): ApiJson<FinishRequest>,
) -> Result<axum::Json<Job>, ApiError> {
    principal.require_agent()?;
    if !req.outcome.state.is_terminal() {
        return Err(ApiError::BadRequest(format!(
            "outcome.state must be succeeded, failed, cancelled or error, not {}",
            req.outcome.state
        )));
    }
    let model = jobs::finish(&state, id, &req.lease, &req.outcome)
        .await?
        .map_err(|r| {
            tracing::warn!(job_id = %id, refusal = ?r, "Refused a result under an invalid lease.");
            refusal_error(id, r)
        })?;
    tracing::info!(job_id = %id, state = %model.state(), agent = ?model.agent, "Job finished.");
    Ok(axum::Json(to_job(&model)?))
}
