//! Routing: which job an agent may be offered.
//!
//! The broker routes on what it knows of an agent, not on what the agent says it may have: the
//! site is the one the agent enrolled in (an agent cannot offer a `site:` label), the executor is
//! the one the agent runs, and its advertised site policy can only narrow what it is sent. An
//! agent without a site policy takes operator jobs only, unless it says in so many words that it
//! also takes workflow jobs. The agent applies its own checks again before it runs anything.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use testbot_proto::agents::{
    JobIdentity, PolicySummary, ReleaseKind, ReleaseOutcome, ReleaseRequest,
};
use testbot_proto::jobs::{JobId, JobSpec};
use testbot_proto::now_ms;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::LeaseRefusal;

/// The label prefix only the broker gives out: every agent offers `site:SITE` of its enrolled
/// site, and a job asking for `site:NAME` runs only there.
pub const SITE_LABEL_PREFIX: &str = "site:";

/// Executors that run a job's `image`; others would ignore it.
const IMAGE_EXECUTORS: [&str; 3] = ["docker", "podman", "kubernetes"];

/// What a polling agent can take, as the broker knows it. Equal offers (identical agents) wait
/// for work together: see [`crate::lifecycle::dispatch`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Offer {
    /// The site the agent enrolled in (from the broker's records, never from the request).
    pub site: String,
    /// The labels the agent offers, without the `site:` label the broker adds.
    pub labels: Vec<String>,
    /// The executor the agent runs jobs with.
    pub executor: String,
    /// The agent's site policy summary; None: it has none.
    pub policy: Option<PolicySummary>,
    /// An agent without a site policy whose configuration lets it take workflow jobs.
    #[serde(default)]
    pub workflow_jobs_without_policy: bool,
}

/// A queued job as routing reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedJob {
    pub spec: JobSpec,
    /// The sites its repository's registration allows; None: any.
    pub sites: Option<Vec<String>>,
    /// Its workflow identity (for an App job: from its provenance); None: an operator
    /// submitted it.
    pub identity: Option<JobIdentity>,
    /// For a GitHub App job: its event, which a site's policy must accept.
    pub app_event: Option<String>,
}

impl RoutedJob {
    /// Reads a stored job: its spec and sites as JSON, its repository and verified token.
    pub fn from_stored(
        spec: &str,
        sites: Option<&str>,
        repository: Option<&str>,
        oidc_token: Option<&str>,
        provenance: Option<&str>,
    ) -> anyhow::Result<RoutedJob> {
        let spec: JobSpec = serde_json::from_str(spec)?;
        let sites: Option<Vec<String>> = sites.map(serde_json::from_str).transpose()?;
        if let Some(provenance) = provenance {
            let provenance: testbot_proto::provenance::Provenance =
                serde_json::from_str(provenance)?;
            return Ok(RoutedJob {
                spec,
                sites: sites.filter(|s| !s.is_empty()),
                identity: Some(provenance.identity()),
                app_event: Some(provenance.event().to_string()),
            });
        }
        let identity = repository.map(|repository| {
            // The token was verified when the job was submitted. Without one (it cannot be
            // read), only the repository is known and rules on other claims do not match.
            oidc_token
                .and_then(|t| testbot_proto::oidc::verified_token_identity(t).ok())
                .filter(|identity| identity.repository == repository)
                .unwrap_or_else(|| JobIdentity {
                    repository: repository.to_string(),
                    ..JobIdentity::default()
                })
        });
        Ok(RoutedJob {
            spec,
            sites: sites.filter(|s| !s.is_empty()),
            identity,
            app_event: None,
        })
    }
}

/// Refuses labels an agent may not offer: `site:` labels are the broker's.
pub fn check_offered_labels(labels: &[String]) -> Result<(), String> {
    match labels.iter().find(|l| l.starts_with(SITE_LABEL_PREFIX)) {
        Some(label) => Err(format!(
            "label {label:?} is refused: the broker gives every agent the label site:SITE of the \
             site it enrolled in; remove {label:?} from the agent's labels"
        )),
        None => Ok(()),
    }
}

impl Offer {
    /// The labels routing matches a job's labels against: the agent's and its site's.
    pub fn all_labels(&self) -> Vec<String> {
        let mut labels = self.labels.clone();
        labels.push(format!("{SITE_LABEL_PREFIX}{}", self.site));
        labels
    }

    /// Whether this agent may be offered `job`, and if not, why.
    pub fn admits(&self, job: &RoutedJob) -> Result<(), String> {
        let site_label = format!("{SITE_LABEL_PREFIX}{}", self.site);
        for label in &job.spec.labels {
            if *label == site_label || self.labels.contains(label) {
                continue;
            }
            return Err(if label.starts_with(SITE_LABEL_PREFIX) {
                format!(
                    "the job asks for {label}; this agent is enrolled in site {}",
                    self.site
                )
            } else {
                format!("the job asks for label {label}, which this agent does not offer")
            });
        }
        self.admits_unlabelled(job)
    }

    /// [`Offer::admits`] without the labels (which agents may add at a restart): what a
    /// submission is checked against.
    pub fn admits_unlabelled(&self, job: &RoutedJob) -> Result<(), String> {
        if let Some(sites) = &job.sites
            && !sites.contains(&self.site)
        {
            return Err(format!(
                "the repository's registration allows sites [{}], not {}",
                sites.join(", "),
                self.site
            ));
        }
        if let Some(wanted) = &job.spec.executor
            && *wanted != self.executor
        {
            return Err(format!(
                "the job asks for executor {wanted}; this agent runs {}",
                self.executor
            ));
        }
        if let Some(image) = &job.spec.image
            && !IMAGE_EXECUTORS.contains(&self.executor.as_str())
        {
            return Err(format!(
                "the job asks for image {image}; executor {} runs no images",
                self.executor
            ));
        }
        if let Some(event) = &job.app_event {
            let accepted = self
                .policy
                .as_ref()
                .is_some_and(|policy| policy.app_events.contains(event));
            if !accepted {
                return Err(format!(
                    "this agent's site takes no GitHub App jobs of event {event} (its policy's [github] accept)"
                ));
            }
        }
        match &self.policy {
            Some(policy) => policy.admits(job.identity.as_ref(), &job.spec, Some(&self.executor)),
            None if job.identity.is_some() && !self.workflow_jobs_without_policy => Err(
                "this agent has no site policy and takes operator jobs only (a site policy, or \
                 allow_workflow_jobs_without_policy = true in its configuration, lets it take \
                 workflow jobs)"
                    .into(),
            ),
            None => Ok(()),
        }
    }
}

/// Hand-backs of one job before it ends `error`, whatever their kind.
pub const MAX_RELEASES: u32 = 10;
/// An agent that refused a job is not offered it again for this long.
pub const REFUSED_HOLD: Duration = Duration::from_secs(600);
/// An agent that could not decide on a job (transient failure) is held back from it this long
/// after the first hand-back, twice as long after each further one, up to
/// [`MAX_TRANSIENT_HOLD`].
pub const TRANSIENT_HOLD: Duration = Duration::from_secs(2);
pub const MAX_TRANSIENT_HOLD: Duration = Duration::from_secs(300);
/// The longest hand-back reason kept, in bytes.
const MAX_REASON_BYTES: usize = 2048;
/// The sweeper re-offers queued jobs to waiting agents this often, in case a wake-up was
/// missed (a site under its `max_concurrent_jobs` again, an offer that changed).
pub const REOFFER_INTERVAL: Duration = Duration::from_secs(10);
/// Most queued jobs one re-offer looks at.
const REOFFER_JOBS: i64 = 2048;

/// Wakes a waiting agent that may take job `id` (just queued or queued again).
pub async fn job_queued(state: &AppState, id: JobId) {
    match state.store.routed_job(id).await {
        Ok(Some(job)) => state.dispatcher.job_queued(id, job),
        Ok(None) => {}
        Err(err) => tracing::error!(job_id = %id, ?err, "Cannot read a queued job for routing."),
    }
}

/// The first active agent (other than `except`, a `site/name`) that may take `job`, or why
/// each one may not (`site S (agent N): why`). `with_labels`: match the job's labels too (at
/// submission they are not: agents may add labels at a restart). An agent that has not polled
/// yet is judged by the policy it enrolled with, on any executor and labels.
pub async fn first_taker(
    state: &AppState,
    job: &RoutedJob,
    except: Option<&str>,
    with_labels: bool,
) -> Result<Result<String, Vec<String>>, ApiError> {
    let mut reasons: Vec<String> = Vec::new();
    for crate::store::AgentOffer {
        site,
        name,
        policy,
        offer,
    } in state.store.active_agent_offers().await?
    {
        let who = format!("{site}/{name}");
        if except == Some(who.as_str()) {
            continue;
        }
        let verdict = match offer.and_then(|o| serde_json::from_str::<Offer>(&o).ok()) {
            Some(offer) if with_labels => offer.admits(job),
            Some(offer) => offer.admits_unlabelled(job),
            None => {
                let policy = policy.and_then(|p| serde_json::from_str::<PolicySummary>(&p).ok());
                unpolled_admits(&site, policy.as_ref(), job)
            }
        };
        match verdict {
            Ok(()) => return Ok(Ok(who)),
            Err(why) => {
                let reason = format!("site {site} (agent {name}): {why}");
                if !reasons.contains(&reason) {
                    reasons.push(reason);
                }
            }
        }
    }
    Ok(Err(reasons))
}

/// Whether an agent that enrolled with `policy` but has not polled yet might take `job`.
fn unpolled_admits(
    site: &str,
    policy: Option<&PolicySummary>,
    job: &RoutedJob,
) -> Result<(), String> {
    if let Some(sites) = &job.sites
        && !sites.iter().any(|s| s == site)
    {
        return Err(format!(
            "the repository's registration allows sites [{}], not {site}",
            sites.join(", ")
        ));
    }
    match policy {
        Some(policy) => policy.admits(job.identity.as_ref(), &job.spec, None),
        None if job.identity.is_some() => Err(
            "this agent has no site policy and takes operator jobs only (it has not polled yet)"
                .into(),
        ),
        None => Ok(()),
    }
}

/// Why a queued job waits, for its submitter: which agent may take it, or why none may.
pub async fn why_waiting(state: &AppState, id: JobId) -> Result<Option<String>, ApiError> {
    let Some(job) = state.store.routed_job(id).await? else {
        return Ok(None);
    };
    Ok(Some(match first_taker(state, &job, None, true).await? {
        Ok(who) => format!("waiting for agent {who}, or another that may take it, to be free"),
        Err(reasons) if reasons.is_empty() => "waiting: no agent is enrolled".into(),
        Err(reasons) => format!(
            "waiting: no enrolled agent may take this job: {}",
            reasons.join("; ")
        ),
    }))
}

/// Hands a job back from `agent` (see the `release` endpoint).
pub async fn release(
    state: &AppState,
    id: JobId,
    agent: &str,
    req: &ReleaseRequest,
) -> Result<ReleaseOutcome, ApiError> {
    let mut reason = crate::lifecycle::transitions::agent_text(req.reason.trim());
    if reason.is_empty() {
        return Err(ApiError::BadRequest(
            "reason is empty: say why the job was not run".into(),
        ));
    }
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    let job = state
        .store
        .routed_job(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("job {id} does not exist")))?;
    let now = now_ms();
    let (hold, requeue_reason, final_reason) = match req.kind {
        ReleaseKind::Transient => {
            let releases = state.store.job_releases(id).await?.unwrap_or(0);
            let hold = TRANSIENT_HOLD
                .saturating_mul(1u32 << releases.clamp(0, 16))
                .min(MAX_TRANSIENT_HOLD);
            (
                hold,
                format!(
                    "released by agent {agent}, which could not decide now: {reason}; queued again"
                ),
                None,
            )
        }
        ReleaseKind::Refused => {
            let final_reason = match first_taker(state, &job, Some(agent), true).await? {
                Ok(_) => None,
                Err(_) => Some(format!(
                    "refused by agent {agent}: {reason}; no other enrolled agent may take this job"
                )),
            };
            (
                REFUSED_HOLD,
                format!(
                    "released by agent {agent}, which refused it: {reason}; queued for another agent"
                ),
                final_reason,
            )
        }
    };
    let release = crate::store::Release {
        lease: &req.lease,
        agent,
        hold_until_ms: now + hold.as_millis() as i64,
    };
    let released = crate::lifecycle::jobs::release(
        state,
        id,
        &release,
        &requeue_reason,
        final_reason.as_deref(),
        MAX_RELEASES,
    )
    .await?;
    let model = match released {
        Ok(model) => model,
        Err(LeaseRefusal::NoSuchJob) => {
            return Err(ApiError::NotFound(LeaseRefusal::NoSuchJob.describe(id)));
        }
        Err(other) => return Err(ApiError::LeaseLost(other.describe(id))),
    };
    let job_state = model.state();
    Ok(ReleaseOutcome {
        state: job_state,
        reason: model.reason.unwrap_or_default(),
    })
}

/// The sweeper's routing work: wakes agents whose hold on a job ran out, and every
/// [`REOFFER_INTERVAL`] (`reoffer`) offers the queue to the agents still waiting, each job waking
/// at most one agent that may take it.
pub async fn sweep(state: &AppState, reoffer: bool) {
    match state.store.end_holds(now_ms()).await {
        Ok(ids) => {
            for id in ids {
                job_queued(state, id).await;
            }
        }
        Err(err) => tracing::error!(?err, "Cannot end holds on released jobs."),
    }
    if !reoffer || state.dispatcher.waiting() == 0 {
        return;
    }
    match state.store.queued_jobs(0, REOFFER_JOBS).await {
        Ok(jobs) => {
            for queued in jobs {
                if state.dispatcher.waiting() == 0 {
                    break;
                }
                state.dispatcher.job_queued(JobId(queued.id), queued.job);
            }
        }
        Err(err) => tracing::error!(?err, "Cannot read the queue."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbot_proto::agents::{ExecutorCaps, RuleSummary};

    fn offer(site: &str, executor: &str, policy: Option<PolicySummary>) -> Offer {
        Offer {
            site: site.into(),
            labels: vec!["linux".into()],
            executor: executor.into(),
            policy,
            workflow_jobs_without_policy: false,
        }
    }

    fn job(spec: JobSpec, identity: Option<JobIdentity>) -> RoutedJob {
        RoutedJob {
            spec,
            sites: None,
            identity,
            app_event: None,
        }
    }

    fn identity(repository: &str, git_ref: &str) -> JobIdentity {
        JobIdentity {
            repository: repository.into(),
            git_ref: git_ref.into(),
            event_name: "push".into(),
            job_workflow_ref: format!("{repository}/.github/workflows/ci.yml@{git_ref}"),
            actor: "octocat".into(),
            environment: None,
        }
    }

    fn main_only() -> PolicySummary {
        PolicySummary {
            repositories: vec!["hpc-lab/*".into()],
            executors: vec![ExecutorCaps {
                executor: "shell".into(),
                ..ExecutorCaps::default()
            }],
            rules: vec![RuleSummary {
                name: "main".into(),
                repositories: vec!["hpc-lab/*".into()],
                refs: Some(vec!["refs/heads/main".into()]),
                events: vec!["push".into()],
                ..RuleSummary::default()
            }],
            env_allow: Some(vec![]),
            max_concurrent_jobs: None,
            app_events: vec![],
        }
    }

    /// An App job goes only to sites whose policy takes its event, and then by the same rules
    /// as a workflow job, on the identity its provenance gives it.
    #[test]
    fn app_jobs_go_to_sites_that_accept_their_event() {
        let provenance = serde_json::json!({
            "event": "push", "repository": "hpc-lab/x", "repository_id": 7,
            "sha": "a".repeat(40), "job": "unit", "config_sha": "a".repeat(40),
            "branch": "main", "pushed_by": "octocat",
        })
        .to_string();
        let app_job = RoutedJob::from_stored(
            "{\"script\":\"make\"}",
            None,
            Some("hpc-lab/x"),
            None,
            Some(&provenance),
        )
        .unwrap();
        assert_eq!(app_job.app_event.as_deref(), Some("push"));
        assert_eq!(
            app_job.identity.as_ref().unwrap().git_ref,
            "refs/heads/main"
        );

        let refusing = offer("hpc", "shell", Some(main_only()));
        let err = refusing.admits(&app_job).unwrap_err();
        assert!(
            err.contains("takes no GitHub App jobs of event push"),
            "{err}"
        );
        assert!(offer("hpc", "shell", None).admits(&app_job).is_err());

        let mut accepting = main_only();
        accepting.app_events = vec!["push".into()];
        assert_eq!(
            offer("hpc", "shell", Some(accepting.clone())).admits(&app_job),
            Ok(())
        );
        // The rules still apply: a push to another branch is not offered.
        let feature = provenance.replace("\"main\"", "\"feature\"");
        let other = RoutedJob::from_stored(
            "{\"script\":\"make\"}",
            None,
            Some("hpc-lab/x"),
            None,
            Some(&feature),
        )
        .unwrap();
        assert!(
            offer("hpc", "shell", Some(accepting))
                .admits(&other)
                .is_err()
        );
    }

    #[test]
    fn a_site_label_routes_only_to_that_site() {
        let spec = JobSpec {
            labels: vec!["site:a".into()],
            ..JobSpec::default()
        };
        assert!(
            offer("a", "shell", None)
                .admits(&job(spec.clone(), None))
                .is_ok()
        );
        assert_eq!(
            offer("b", "shell", None).admits(&job(spec, None)),
            Err("the job asks for site:a; this agent is enrolled in site b".into())
        );
        assert!(check_offered_labels(&["linux".into()]).is_ok());
        assert!(check_offered_labels(&["site:a".into()]).is_err());
    }

    #[test]
    fn executor_and_image_route_for_every_agent() {
        let slurm = JobSpec {
            executor: Some("slurm".into()),
            ..JobSpec::default()
        };
        assert_eq!(
            offer("a", "shell", None).admits(&job(slurm.clone(), None)),
            Err("the job asks for executor slurm; this agent runs shell".into())
        );
        assert!(offer("a", "slurm", None).admits(&job(slurm, None)).is_ok());
        let image = JobSpec {
            image: Some("alpine:3".into()),
            ..JobSpec::default()
        };
        assert!(
            offer("a", "shell", None)
                .admits(&job(image.clone(), None))
                .is_err()
        );
        assert!(offer("a", "docker", None).admits(&job(image, None)).is_ok());
    }

    #[test]
    fn an_agent_without_a_policy_takes_operator_jobs_unless_it_opts_in() {
        let workflow = job(JobSpec::default(), Some(identity("a/b", "refs/heads/main")));
        let mut plain = offer("a", "shell", None);
        assert!(
            plain
                .admits(&workflow)
                .unwrap_err()
                .contains("operator jobs only")
        );
        assert!(plain.admits(&job(JobSpec::default(), None)).is_ok());
        plain.workflow_jobs_without_policy = true;
        assert!(plain.admits(&workflow).is_ok());
    }

    #[test]
    fn rules_route_on_refs_events_and_env() {
        let a = offer("a", "shell", Some(main_only()));
        let main = job(
            JobSpec::default(),
            Some(identity("hpc-lab/x", "refs/heads/main")),
        );
        assert!(a.admits(&main).is_ok());
        let feature = job(
            JobSpec::default(),
            Some(identity("hpc-lab/x", "refs/heads/feature")),
        );
        assert_eq!(
            a.admits(&feature),
            Err(
                "ref refs/heads/feature is not in allowed refs [refs/heads/main] (rule \"main\")"
                    .into()
            )
        );
        let mut env = main.clone();
        env.spec.env.insert("SECRET".into(), "x".into());
        assert!(a.admits(&env).unwrap_err().contains("env_allow"));
        // An operator job never goes to a site with a policy.
        assert!(a.admits(&job(JobSpec::default(), None)).is_err());
    }
}
