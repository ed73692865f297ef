//! Sites, their enrollment tokens, enrolling agents, and listing and revoking both.

use axum::extract::State;
use axum::http::StatusCode;
use secrecy::ExposeSecret as _;
use testbot_proto::jobs::{validate_label, validate_word};
use testbot_proto::now_ms;
use testbot_proto::signing::decode_public_key;
use testbot_proto::sites::{
    AgentInfo, AgentList, EnrollRequest, Enrollment, EnrollmentToken, EnrollmentTokenRequest, Site,
    SiteList, SiteRequest,
};

use crate::auth::Principal;
use crate::auth::{Role, generate_token, token_hash};
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::state::AppState;
use crate::store::{AgentModel, EnrollRefusal, SiteModel};

pub(super) fn to_site(model: &SiteModel) -> Site {
    Site {
        name: model.name.clone(),
        created_at_ms: model.created_at_ms,
        revoked_at_ms: model.revoked_at_ms,
    }
}

pub(super) fn to_agent_info(model: &AgentModel) -> AgentInfo {
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

pub(super) async fn create_site_handler(
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

pub(super) async fn list_sites_handler(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<axum::Json<SiteList>, ApiError> {
    principal.require_operator()?;
    let sites = state.store.sites().await?.iter().map(to_site).collect();
    Ok(axum::Json(SiteList { sites }))
}

/// Issues an enrollment token for a site: shown once, stored as a hash.
pub(super) async fn enrollment_token_handler(
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

pub(super) async fn revoke_site_handler(
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

pub(super) async fn list_agents_handler(
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

pub(super) async fn revoke_agent_handler(
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
pub(super) async fn enroll_handler(
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
