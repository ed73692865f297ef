//! The HTTP API under `/api/v1`: the job endpoints clients use and the `/agent` endpoints.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::ExposeSecret as _;
use testbot_proto::agents::{
    Assignment, LeaseRequest, LeaseStatus, MetadataRequest, PollRequest, ReleaseOutcome,
    ReleaseRequest,
};
use testbot_proto::glob::any_match;
use testbot_proto::jobs::{
    Job, JobId, JobList, JobListQuery, JobSpec, validate_label, validate_word,
};
use testbot_proto::logs::{LogAck, LogChunk, LogQuery, MAX_CHUNK_BYTES};
use testbot_proto::now_ms;
use testbot_proto::oidc::WorkflowClaims;
use testbot_proto::repos::{Repo, RepoList, RepoRegistration, validate_repo_name};
use testbot_proto::results::FinishRequest;
use testbot_proto::signing::decode_public_key;
use testbot_proto::sites::{
    AgentInfo, AgentList, EnrollRequest, Enrollment, EnrollmentToken, EnrollmentTokenRequest, Site,
    SiteList, SiteRequest,
};
use tokio::time::Instant;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::access::{JobAccess, authorize_job_access, check_repository_ids};
use crate::auth::Principal;
use crate::auth::{Role, generate_token, token_hash};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::github::GitHubError;
use crate::lifecycle::jobs;
use crate::state::AppState;
use crate::store::{
    AgentModel, AppendResult, EnrollRefusal, JobOrigin, JobTaker, LeaseRefusal, LeaseRenewal,
    RepositoryIds, SiteModel,
};

/// How stale an agent's `last_seen` may get before a poll refreshes it.
const AGENT_SEEN_RESOLUTION: Duration = Duration::from_secs(30);

/// Most bytes one log response reads from the database at a time.
const LOG_READ_BYTES: usize = 256 * 1024;
/// A log follower re-checks the job this often even without a wake-up.
const FOLLOW_RECHECK: Duration = Duration::from_secs(15);

/// The broker's router: every route, the JSON error fallbacks, and the layers.
pub fn create_app(state: AppState) -> Router {
    let max_body_bytes = state.settings.max_body_bytes;
    let api = Router::new()
        .route("/health", get(health_handler))
        .route("/jobs", post(submit_handler).get(list_handler))
        .route("/jobs/{id}", get(job_handler))
        .route("/jobs/{id}/cancel", post(cancel_handler))
        .route("/jobs/{id}/log", get(log_handler))
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
    let api = api.merge(agent);
    Router::new()
        .nest(testbot_proto::API_PREFIX, api)
        .fallback(not_found_handler)
        .method_not_allowed_fallback(method_not_allowed_handler)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_deadline,
        ))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
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

fn to_job(model: &crate::store::JobModel) -> Result<Job, ApiError> {
    Ok(model.to_job()?)
}

async fn submit_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(spec): ApiJson<JobSpec>,
) -> Result<(StatusCode, axum::Json<Job>), ApiError> {
    spec.validate()
        .map_err(|e| ApiError::BadRequest(format!("invalid job: {e}")))?;
    let (origin, jti) = match &principal {
        Principal::Operator { .. } => (
            JobOrigin {
                submitted_by: principal.describe(),
                ..JobOrigin::default()
            },
            None,
        ),
        Principal::Workflow { claims, token } => {
            let sites = admit_workflow_job(&state, claims, &spec).await?;
            crate::limits::check_queue_quota(
                &*state.store,
                &state.settings.limits,
                &claims.repository,
                &spec,
                &sites,
            )
            .await?;
            (
                JobOrigin {
                    repository: Some(claims.repository.clone()),
                    run_id: Some(claims.run_id.clone()),
                    submitted_by: principal.describe(),
                    oidc_token: Some(token.expose_secret().to_string()),
                    sites,
                },
                Some((claims.jti.as_str(), claims.exp)),
            )
        }
        other => {
            return Err(ApiError::Forbidden(format!(
                "submitting jobs needs a workflow OIDC token or an operator token; {} was given",
                match other {
                    Principal::Agent(_) => "an agent's signature",
                    _ => "a GitHub user token",
                }
            )));
        }
    };
    let model = jobs::submit(&state, &spec, &origin, jti)
        .await?
        .ok_or_else(|| replayed(jti))?;
    tracing::debug!(job_id = model.id, "Job queued.");
    Ok((StatusCode::CREATED, axum::Json(to_job(&model)?)))
}

fn replayed(jti: Option<(&str, i64)>) -> ApiError {
    ApiError::Unauthorized(format!(
        "OIDC token refused: {}",
        testbot_proto::oidc::OidcError::Replayed(jti.map(|(j, _)| j).unwrap_or("").into())
    ))
}

/// Whether a workflow may submit: its repository is registered, the registration enables the
/// token's event and ref, and some enrolled agent's site would accept the job. Returns the sites
/// the job may go to (empty: any).
async fn admit_workflow_job(
    state: &AppState,
    claims: &WorkflowClaims,
    spec: &JobSpec,
) -> Result<Vec<String>, ApiError> {
    let repo = state.store.repo(&claims.repository).await?.ok_or_else(|| {
        ApiError::Forbidden(format!(
            "repository {} is not registered with this broker; a maintainer registers it with \
             `testbot repo register {}`",
            claims.repository, claims.repository
        ))
    })?;
    check_repository_ids(state, &repo, claims).await?;
    let settings = repo.settings()?;
    if !settings.events.contains(&claims.event_name) {
        return Err(ApiError::Forbidden(format!(
            "event {} is not enabled for repository {} (enabled: [{}])",
            claims.event_name,
            claims.repository,
            settings.events.join(", ")
        )));
    }
    if !any_match(&settings.refs, &claims.git_ref) {
        return Err(ApiError::Forbidden(format!(
            "ref {} is not enabled for repository {} (enabled: [{}])",
            claims.git_ref,
            claims.repository,
            settings.refs.join(", ")
        )));
    }
    find_accepting_site(state, claims, spec, &settings.sites).await?;
    Ok(settings.sites)
}

/// Fails fast when no enrolled agent would accept the job, naming why each site refuses it.
async fn find_accepting_site(
    state: &AppState,
    claims: &WorkflowClaims,
    spec: &JobSpec,
    sites: &[String],
) -> Result<(), ApiError> {
    let job = crate::routing::RoutedJob {
        spec: spec.clone(),
        sites: (!sites.is_empty()).then(|| sites.to_vec()),
        identity: Some(claims.into()),
    };
    let reasons = match crate::routing::first_taker(state, &job, None, false).await? {
        Ok(_) => return Ok(()),
        Err(reasons) => reasons,
    };
    let sites_note = if sites.is_empty() {
        String::new()
    } else {
        format!(" (the registration allows sites [{}])", sites.join(", "))
    };
    if reasons.is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "no site can run this job: no agent is enrolled{sites_note}"
        )));
    }
    Err(ApiError::Unprocessable(format!(
        "no site accepts this job{sites_note}: {}",
        reasons.join("; ")
    )))
}

async fn list_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<JobListQuery>,
) -> Result<axum::Json<JobList>, ApiError> {
    principal.require_operator()?;
    let limit = query.limit.unwrap_or(50).clamp(1, 1000);
    if let Some(site) = &query.site {
        validate_word("site", site).map_err(ApiError::BadRequest)?;
    }
    let models = state
        .store
        .jobs(query.state, query.site.as_deref(), limit)
        .await?;
    let jobs = models.iter().map(to_job).collect::<Result<_, _>>()?;
    Ok(axum::Json(JobList { jobs }))
}

async fn find_job(state: &AppState, id: JobId) -> Result<crate::store::JobModel, ApiError> {
    state
        .store
        .job(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("job {id} does not exist")))
}

async fn job_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
) -> Result<axum::Json<Job>, ApiError> {
    let job = find_job(&state, id).await?;
    authorize_job_access(&state, &principal, &job, JobAccess::Read).await?;
    let mut job = to_job(&job)?;
    if job.state == testbot_proto::jobs::JobState::Queued {
        job.waiting = crate::routing::why_waiting(&state, id).await?;
    }
    Ok(axum::Json(job))
}

async fn cancel_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<JobId>,
) -> Result<axum::Json<Job>, ApiError> {
    authorize_job_access(
        &state,
        &principal,
        &find_job(&state, id).await?,
        JobAccess::Cancel,
    )
    .await?;
    let model = jobs::cancel(&state, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("job {id} does not exist")))?;
    tracing::info!(job_id = %id, state = %model.state(), "Cancel requested.");
    Ok(axum::Json(to_job(&model)?))
}

/// Streams the log from `offset` as plain text; with `follow`, until the job ends.
async fn log_handler(
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

struct LogFollower {
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

fn new_lease() -> Result<String, ApiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ApiError::Internal(anyhow::anyhow!("Cannot read random bytes")))?;
    Ok(hex::encode(bytes))
}

fn lease_expiry(state: &AppState) -> i64 {
    now_ms() + state.settings.lease_ttl.as_millis() as i64
}

fn refusal_error(id: JobId, refusal: LeaseRefusal) -> ApiError {
    match refusal {
        LeaseRefusal::NoSuchJob => ApiError::NotFound(refusal.describe(id)),
        other => ApiError::LeaseLost(other.describe(id)),
    }
}

/// Long poll: answers at once with a matching queued job, or holds the request until one is
/// queued or the wait runs out (`204 No Content`).
async fn poll_handler(
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
    let mut unused_signal = None;
    loop {
        // Register before trying to claim, so a job queued in between still wakes this poll.
        let mut ticket = state.dispatcher.register(poll, offer.clone());
        let lease = new_lease()?;
        if let Some(model) = jobs::claim(&state, &taker, &lease, lease_expiry(&state)).await? {
            drop(ticket);
            // The wake-up may have been for another job than the one claimed: pass it on.
            if let Some(signal) = unused_signal.take() {
                state.dispatcher.pass_on(signal, poll);
            }
            tracing::debug!(job_id = model.id, agent = %agent_name, "Job claimed.");
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
                accepted_at_ms: Some(model.created_at_ms),
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
async fn release_handler(
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

fn lease_status(state: &AppState, renewal: LeaseRenewal) -> axum::Json<LeaseStatus> {
    axum::Json(LeaseStatus {
        cancel_requested: renewal.cancel_requested,
        lease_ttl_ms: state.settings.lease_ttl.as_millis() as u64,
        log_bytes: renewal.log_bytes,
    })
}

async fn start_handler(
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
async fn heartbeat_handler(
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

async fn metadata_handler(
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

async fn append_log_handler(
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

async fn finish_handler(
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

/// Registers a repository, or replaces its settings. Proof of control: the operator token, an
/// OIDC token from a workflow of that repository, or a GitHub user token with admin permission
/// on it.
async fn register_repo_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(registration): ApiJson<RepoRegistration>,
) -> Result<(StatusCode, axum::Json<Repo>), ApiError> {
    registration
        .validate()
        .map_err(|e| ApiError::BadRequest(format!("invalid registration: {e}")))?;
    let (registered_by, jti, ids) =
        prove_repo_control(&state, &principal, &registration.name).await?;
    let settings = serde_json::to_string(&registration.settings()).map_err(anyhow::Error::from)?;
    let model = match (&principal, &ids) {
        (Principal::Workflow { .. }, Some(ids)) => {
            self_register_repo(
                &state,
                &registration.name,
                &settings,
                &registered_by,
                ids,
                jti,
            )
            .await?
        }
        _ => state
            .store
            .upsert_repo(
                &registration.name,
                &settings,
                &registered_by,
                ids.as_ref(),
                jti,
            )
            .await?
            .ok_or_else(|| replayed(jti))?,
    };
    tracing::info!(repo = %model.name, %registered_by, "Repository registered.");
    Ok((StatusCode::CREATED, axum::Json(model.to_repo()?)))
}

/// Proof of control of a repository: who to record, the token id to consume, and the
/// repository ids to bind the registration to (when the proof shows them).
type RepoControl<'a> = (String, Option<(&'a str, i64)>, Option<RepositoryIds>);

/// A workflow registering its own repository: allowed only when the operator turned
/// self-registration on, and only as the first registration. Anything else would let any branch
/// or pull request of the repository widen the refs, events and sites its maintainers chose.
async fn self_register_repo(
    state: &AppState,
    name: &str,
    settings: &str,
    registered_by: &str,
    ids: &RepositoryIds,
    jti: Option<(&str, i64)>,
) -> Result<crate::store::RepoModel, ApiError> {
    if !state.settings.allow_self_registration {
        return Err(ApiError::Forbidden(format!(
            "this broker does not let workflows register repositories: the operator registers \
             {name} (or an admin of it, with a GitHub token), or starts the broker with \
             --allow-self-registration"
        )));
    }
    match state
        .store
        .insert_repo_if_absent(name, settings, registered_by, ids, jti)
        .await?
    {
        crate::store::FirstRegistration::Created(model) => Ok(model),
        crate::store::FirstRegistration::Replayed => Err(replayed(jti)),
        crate::store::FirstRegistration::Exists => Err(ApiError::Forbidden(format!(
            "repository {name} is registered already, and a workflow token cannot change a \
             registration; the operator or an admin of {name} (with a GitHub token) changes it"
        ))),
    }
}

/// Who may change `repo`'s registration: `Ok((recorded name, token id to consume, repository
/// ids to bind it to))`.
async fn prove_repo_control<'a>(
    state: &AppState,
    principal: &'a Principal,
    repo: &str,
) -> Result<RepoControl<'a>, ApiError> {
    match principal {
        Principal::Operator { .. } => Ok((principal.describe(), None, None)),
        Principal::Workflow { claims, .. } => {
            if !claims.repository.eq_ignore_ascii_case(repo) {
                return Err(ApiError::Forbidden(format!(
                    "a workflow of {} cannot register {repo}: the OIDC token must come from a workflow of {repo}",
                    claims.repository
                )));
            }
            Ok((
                principal.describe(),
                Some((claims.jti.as_str(), claims.exp)),
                Some(RepositoryIds {
                    repository_id: claims.repository_id.clone(),
                    repository_owner_id: claims.repository_owner_id.clone(),
                }),
            ))
        }
        Principal::GitHubUser { token } => {
            let permission = state
                .github
                .repo_permission(token, repo)
                .await
                .map_err(|err| match err {
                    GitHubError::Refused(why) => ApiError::Forbidden(why),
                    GitHubError::Unavailable(why) => ApiError::Unavailable(format!(
                        "cannot check your permission on {repo}: {why}"
                    )),
                })?;
            if !permission.admin {
                return Err(ApiError::Forbidden(format!(
                    "GitHub user {} does not have admin permission on {repo}; only its admins can register it",
                    permission.login
                )));
            }
            Ok((format!("github:{}", permission.login), None, permission.ids))
        }
        Principal::Agent(_) => Err(ApiError::Forbidden(
            "agents cannot register repositories".into(),
        )),
    }
}

async fn list_repos_handler(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<axum::Json<RepoList>, ApiError> {
    principal.require_operator()?;
    let repos = state
        .store
        .repos()
        .await?
        .iter()
        .map(|m| m.to_repo())
        .collect::<anyhow::Result<_>>()?;
    Ok(axum::Json(RepoList { repos }))
}

fn repo_name(owner: String, name: String) -> Result<String, ApiError> {
    let full = format!("{owner}/{name}");
    validate_repo_name(&full).map_err(ApiError::BadRequest)?;
    Ok(full)
}

async fn repo_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((owner, name)): ApiPath<(String, String)>,
) -> Result<axum::Json<Repo>, ApiError> {
    let name = repo_name(owner, name)?;
    match &principal {
        Principal::Workflow { claims, .. } if claims.repository.eq_ignore_ascii_case(&name) => {}
        other => other.require_operator()?,
    }
    let model = state
        .store
        .repo(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("repository {name} is not registered")))?;
    Ok(axum::Json(model.to_repo()?))
}

async fn remove_repo_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((owner, name)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let name = repo_name(owner, name)?;
    if let Principal::Workflow { .. } = principal {
        // Removing and registering again would widen the registration, and every agent that
        // ran one of the repository's jobs holds one of its tokens.
        return Err(ApiError::Forbidden(format!(
            "a workflow token cannot remove a registration; the operator or an admin of {name} \
             (with a GitHub token) removes it"
        )));
    }
    let (removed_by, _, _) = prove_repo_control(&state, &principal, &name).await?;
    if !state.store.delete_repo(&name).await? {
        return Err(ApiError::NotFound(format!(
            "repository {name} is not registered"
        )));
    }
    tracing::info!(repo = %name, %removed_by, "Repository removed.");
    Ok(StatusCode::NO_CONTENT)
}

fn to_site(model: &SiteModel) -> Site {
    Site {
        name: model.name.clone(),
        created_at_ms: model.created_at_ms,
        revoked_at_ms: model.revoked_at_ms,
    }
}

fn to_agent_info(model: &AgentModel) -> AgentInfo {
    AgentInfo {
        id: model.id.clone(),
        site: model.site.clone(),
        name: model.name.clone(),
        enrolled_at_ms: model.enrolled_at_ms,
        last_seen_ms: model.last_seen_ms,
        revoked_at_ms: model.revoked_at_ms,
        policy: model
            .policy
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok()),
    }
}

async fn create_site_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(req): ApiJson<SiteRequest>,
) -> Result<(StatusCode, axum::Json<Site>), ApiError> {
    principal.require_operator()?;
    validate_word("site name", &req.name).map_err(ApiError::BadRequest)?;
    let site = state
        .store
        .create_site(&req.name)
        .await?
        .ok_or_else(|| ApiError::Conflict(format!("site {} exists already", req.name)))?;
    tracing::info!(site = %site.name, "Site created.");
    Ok((StatusCode::CREATED, axum::Json(to_site(&site))))
}

async fn list_sites_handler(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<axum::Json<SiteList>, ApiError> {
    principal.require_operator()?;
    let sites = state.store.sites().await?.iter().map(to_site).collect();
    Ok(axum::Json(SiteList { sites }))
}

/// Issues an enrollment token for a site: shown once, stored as a hash.
async fn enrollment_token_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<EnrollmentTokenRequest>,
) -> Result<(StatusCode, axum::Json<EnrollmentToken>), ApiError> {
    principal.require_operator()?;
    let site = state
        .store
        .site(&name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("site {name} does not exist")))?;
    if site.revoked_at_ms.is_some() {
        return Err(ApiError::Conflict(format!(
            "site {name} was revoked; create a new site"
        )));
    }
    if req.uses == 0 || req.ttl_secs == 0 {
        return Err(ApiError::BadRequest(
            "uses and ttl_secs must be at least 1".into(),
        ));
    }
    let token = generate_token(Role::Enrollment)?;
    let expires_at_ms = now_ms() + (req.ttl_secs.min(365 * 24 * 3600) * 1000) as i64;
    state
        .store
        .create_enrollment_token(
            &token_hash(token.expose_secret()),
            &name,
            req.uses,
            expires_at_ms,
        )
        .await?;
    tracing::info!(site = %name, uses = req.uses, "Enrollment token issued.");
    Ok((
        StatusCode::CREATED,
        axum::Json(EnrollmentToken {
            site: name,
            token: token.expose_secret().to_string(),
            uses: req.uses,
            expires_at_ms,
        }),
    ))
}

async fn revoke_site_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<Site>, ApiError> {
    principal.require_operator()?;
    if !state.store.revoke_site(&name).await? {
        return Err(ApiError::NotFound(format!("site {name} does not exist")));
    }
    tracing::warn!(site = %name, "Site revoked.");
    let site = state.store.site(&name).await?.expect("the site exists");
    Ok(axum::Json(to_site(&site)))
}

async fn list_agents_handler(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<axum::Json<AgentList>, ApiError> {
    principal.require_operator()?;
    let agents = state
        .store
        .agents()
        .await?
        .iter()
        .map(to_agent_info)
        .collect();
    Ok(axum::Json(AgentList { agents }))
}

async fn revoke_agent_handler(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<AgentInfo>, ApiError> {
    principal.require_operator()?;
    if !state.store.revoke_agent(&id).await? {
        return Err(ApiError::NotFound(format!("agent {id} does not exist")));
    }
    let agent = state.store.agent(&id).await?.expect("the agent exists");
    tracing::warn!(agent = %id, site = %agent.site, name = %agent.name, "Agent revoked.");
    Ok(axum::Json(to_agent_info(&agent)))
}

/// Exchanges an enrollment token and a public key for an agent identity.
async fn enroll_handler(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> Result<(StatusCode, axum::Json<Enrollment>), ApiError> {
    validate_label(&req.name).map_err(|e| ApiError::BadRequest(format!("agent name: {e}")))?;
    let public_key = decode_public_key(&req.public_key).map_err(ApiError::BadRequest)?;
    // Anyone can call this route: refuse unknown tokens on a read connection, so a flood of
    // them never waits for (or holds up) the one writer that heartbeats need.
    if !state
        .store
        .enrollment_token_exists(&token_hash(req.enrollment_token.trim()))
        .await?
    {
        return Err(ApiError::Unauthorized(
            "the enrollment token is not valid".into(),
        ));
    }
    let policy = req
        .policy
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(anyhow::Error::from)?;
    let id = format!("agt_{}", testbot_proto::signing::random_hex(12));
    let agent = state
        .store
        .enroll_agent(
            &token_hash(req.enrollment_token.trim()),
            &id,
            &req.name,
            &public_key,
            policy.as_deref(),
        )
        .await?
        .map_err(|refusal| match refusal {
            EnrollRefusal::UnknownToken => {
                ApiError::Unauthorized("the enrollment token is not valid".into())
            }
            EnrollRefusal::Expired => ApiError::Unauthorized(
                "the enrollment token has expired; ask the operator for a new one".into(),
            ),
            EnrollRefusal::UsedUp => ApiError::Unauthorized(
                "the enrollment token has been used up; ask the operator for a new one".into(),
            ),
            EnrollRefusal::SiteRevoked(site) => {
                ApiError::Unauthorized(format!("site {site} was revoked"))
            }
            EnrollRefusal::KeyTaken => ApiError::Conflict(
                "this public key belongs to an agent enrolled before: every agent generates its \
                 own key (remove the agent's agent-key.pk8 to have it make a new one)"
                    .into(),
            ),
            EnrollRefusal::NameTaken { site, name } => ApiError::Conflict(format!(
                "site {site} already has an agent named {name}; choose another name or revoke the old agent"
            )),
        })?;
    tracing::info!(agent = %agent.id, site = %agent.site, name = %agent.name, "Agent enrolled.");
    Ok((
        StatusCode::CREATED,
        axum::Json(Enrollment {
            agent_id: agent.id,
            site: agent.site,
        }),
    ))
}
