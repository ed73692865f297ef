//! Running one assignment: start → run (with heartbeats and live log) → finish.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use testbot_proto::agents::{Assignment, ReleaseKind, ReleaseRequest};
use testbot_proto::client::{Backoff, BrokerClient, ClientError};
use testbot_proto::jobs::JobState;
use testbot_proto::results::{FailureCause, FinishRequest, Outcome};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use testbot_proto::oidc::OidcVerifier;

use crate::executor::{Detached, ExecOutcome, Executor, JobContext, LogSink, fresh_dir};
use crate::identity::LocalAccount;
use crate::policy::{Decision, SitePolicy};
use crate::ship::{ShipEnd, ship_log};

/// Lines buffered between the executor and the shipper.
const LOG_CHANNEL_CAPACITY: usize = 4096;

/// Longest the agent looks for a job's result files (a workspace can be huge, or a job can
/// leave a file system there that never answers).
const COLLECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a running job was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// A user cancelled it.
    Cancelled,
    /// The broker no longer honours our lease; the job belongs to someone else now.
    LeaseLost,
}

/// What a worker needs to run jobs.
pub struct JobRunner {
    pub client: BrokerClient,
    pub executor: Arc<dyn Executor>,
    pub agent: String,
    pub work_dir: std::path::PathBuf,
    pub max_job_time: Duration,
    pub keep_job_dirs: bool,
    /// The site policy and the verifier of job tokens it configures. `None`: a private fleet
    /// whose agent runs the operators' jobs it is given, as itself.
    pub site: Option<SiteGate>,
    /// Without a site policy: also run workflow jobs (`allow_workflow_jobs_without_policy`).
    pub workflow_jobs_without_policy: bool,
}

/// Why the agent will not run a job it was given: handed back to the broker, which offers it to
/// another agent or ends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    pub kind: ReleaseKind,
}

impl Refusal {
    fn refused(reason: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
            kind: ReleaseKind::Refused,
        }
    }
}

impl From<String> for Refusal {
    fn from(reason: String) -> Refusal {
        Refusal::refused(reason)
    }
}

/// What an agent without a site policy checks itself, whatever the broker sent: the job asks
/// for no other executor than the agent's, for no image unless the executor runs images, and is
/// an operator's job unless the configuration allows workflow jobs.
pub fn check_without_policy(
    assignment: &Assignment,
    executor: &str,
    workflow_jobs: bool,
) -> Result<(), Refusal> {
    let spec = &assignment.spec;
    if let Some(wanted) = &spec.executor
        && wanted != executor
    {
        return Err(Refusal::refused(format!(
            "the job asks for executor {wanted}; this agent runs {executor}"
        )));
    }
    if let Some(image) = &spec.image
        && !["docker", "podman", "kubernetes"].contains(&executor)
    {
        return Err(Refusal::refused(format!(
            "the job asks for image {image}; executor {executor} runs no images"
        )));
    }
    if assignment.provenance.is_some() {
        return Err(Refusal::refused(
            "this agent has no site policy; GitHub App jobs need one with a [github] table, so \
             that the agent checks each job with GitHub itself",
        ));
    }
    if assignment.oidc_token.is_some() && !workflow_jobs {
        return Err(Refusal::refused(
            "this agent has no site policy and takes operator jobs only (a site policy, or \
             allow_workflow_jobs_without_policy = true in its configuration, lets it take \
             workflow jobs)",
        ));
    }
    Ok(())
}

/// What the agent checks before it runs anything: the job's GitHub OIDC token, verified here
/// (the broker's word is not taken), and the site policy.
pub struct SiteGate {
    pub policy: Arc<SitePolicy>,
    pub verifier: OidcVerifier,
    /// GitHub App jobs, when the policy's `[github]` table takes them.
    pub github: Option<AppJobs>,
    /// The configuration's `allow_jobs_as_agent_account`: whether a job may run as the agent's
    /// own account.
    pub allow_agent_account: bool,
}

/// How the agent checks GitHub App jobs: the events the site takes, and GitHub with the site's
/// own credentials.
pub struct AppJobs {
    pub accept: Vec<String>,
    pub verifier: crate::github::GitHubVerifier,
    /// The site's read-only token, for fetching private repositories.
    pub token: Option<secrecy::SecretString>,
}

impl AppJobs {
    /// From the policy's `[github]` table (reading its `token_file`); None without one.
    pub fn from_policy(policy: &SitePolicy) -> anyhow::Result<Option<AppJobs>> {
        use anyhow::Context as _;
        let Some(github) = policy.github() else {
            return Ok(None);
        };
        let token = match &github.token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "Cannot read the site's GitHub token ([github] token_file) {}",
                        path.display()
                    )
                })?;
                let token = text.trim().to_string();
                anyhow::ensure!(
                    !token.is_empty(),
                    "{}: the GitHub token is empty",
                    path.display()
                );
                Some(secrecy::SecretString::from(token))
            }
        };
        Ok(Some(AppJobs {
            accept: github.accept.clone(),
            verifier: crate::github::GitHubVerifier::new(
                &github.api_url,
                &github.git_url,
                token.clone(),
            ),
            token,
        }))
    }
}

/// A job the site allows, and how it runs.
struct Admission {
    run_as: Option<LocalAccount>,
    timeout: Duration,
    /// What the job runs with: its own resources with the site's defaults and caps filled in
    /// (`None`: as it asked, without a policy).
    resources: Option<testbot_proto::jobs::Resources>,
    /// A GitHub App job's verified commit, checked out into the workspace before it runs.
    checkout: Option<crate::github::VerifiedJob>,
}

impl SiteGate {
    /// Verifies the job's token and applies the policy; `Err` is the denial, for the submitter.
    async fn admit(
        &self,
        assignment: &Assignment,
        executor: &str,
        agent: &str,
    ) -> Result<Admission, Refusal> {
        let (claims, checkout) = match &assignment.provenance {
            Some(provenance) => {
                // An agent is named SITE/NAME.
                let site = agent.split_once('/').map_or(agent, |(site, _)| site);
                let verified = self
                    .verify_app_job(assignment, provenance, executor, site)
                    .await?;
                (verified.claims.clone(), Some(verified))
            }
            None => (self.verify_token(assignment).await?, None),
        };
        let spec = &assignment.spec;
        if let Some(wanted) = &spec.executor
            && wanted != executor
        {
            return Err(Refusal::refused(format!(
                "the job asks for executor {wanted}; this agent runs {executor}"
            )));
        }
        match self.policy.evaluate(&claims, spec, executor) {
            Decision::Deny { reason } => Err(Refusal::refused(reason)),
            Decision::Allow { rule, account } => {
                let account = crate::identity::resolve(&account, &claims).await?;
                // The names in the policy were checked at start; an identity script's answer
                // only now.
                if account.uid == nix::unistd::geteuid() && !self.allow_agent_account {
                    return Err(Refusal::refused(format!(
                        "the site policy maps this job to account {} (uid {}), the agent's own account: a job running as the agent could read its private key, so it is refused unless the agent's configuration sets allow_jobs_as_agent_account = true",
                        account.name, account.uid
                    )));
                }
                tracing::info!(
                    job_id = %assignment.job_id,
                    repository = %claims.repository,
                    git_ref = %claims.git_ref,
                    event = %claims.event_name,
                    actor = %claims.actor,
                    %rule,
                    account = %account.name,
                    "Job allowed by the site policy."
                );
                Ok(Admission {
                    run_as: Some(account),
                    timeout: self.policy.time_limit(spec, executor),
                    resources: Some(self.policy.resources(spec, executor)),
                    checkout,
                })
            }
        }
    }

    /// A GitHub App job: the site takes its event, and GitHub confirms what the broker says.
    async fn verify_app_job(
        &self,
        assignment: &Assignment,
        provenance: &testbot_proto::provenance::Provenance,
        executor: &str,
        site: &str,
    ) -> Result<crate::github::VerifiedJob, Refusal> {
        let Some(app) = &self.github else {
            return Err(Refusal::refused(format!(
                "this site takes no GitHub App jobs ({}); its policy has no [github] table",
                provenance.describe()
            )));
        };
        if !app.accept.iter().any(|e| e == provenance.event()) {
            return Err(Refusal::refused(format!(
                "this site takes GitHub App jobs of events {}, not {}",
                app.accept.join(", "),
                provenance.event()
            )));
        }
        if executor == "kubernetes" {
            return Err(Refusal::refused(
                "the kubernetes executor cannot run GitHub App jobs yet: their commit is checked \
                 out on the agent's machine, which a pod does not see",
            ));
        }
        app.verifier
            .verify(provenance, &assignment.spec, site)
            .await
            .map_err(|e| match e {
                crate::github::VerifyError::Refused(reason) => {
                    Refusal::refused(format!("GitHub does not confirm the job: {reason}"))
                }
                crate::github::VerifyError::Unavailable(reason) => Refusal {
                    reason: format!("cannot check the job with GitHub now: {reason}"),
                    kind: ReleaseKind::Transient,
                },
            })
    }

    /// A workflow job: its OIDC token, verified here.
    async fn verify_token(
        &self,
        assignment: &Assignment,
    ) -> Result<testbot_proto::oidc::WorkflowClaims, Refusal> {
        let token = assignment.oidc_token.as_deref().ok_or_else(|| {
            Refusal::refused(
                "the job carries no GitHub OIDC token; this site runs only jobs from verified workflows",
            )
        })?;
        // A job can wait in the queue far longer than its token lives: check the token's
        // lifetime at the time the broker accepted the job, within the site's bound.
        let verified = match assignment.accepted_at_ms {
            Some(accepted_at_ms) => {
                self.verifier
                    .verify_queued(
                        token,
                        accepted_at_ms.div_euclid(1000),
                        self.policy.max_queue_age(),
                    )
                    .await
            }
            None => self.verifier.verify(token).await,
        };
        let claims = verified.map_err(|e| {
            use testbot_proto::oidc::OidcError;
            // The issuer's keys could not be had now (or were just rotated): try again later.
            let kind = match e {
                OidcError::KeysUnavailable(_) | OidcError::UnknownKey(_) => ReleaseKind::Transient,
                _ => ReleaseKind::Refused,
            };
            Refusal {
                reason: format!("OIDC token refused: {e}"),
                kind,
            }
        })?;
        Ok(claims)
    }
}

/// How a job's execution begins.
enum Start {
    /// In a fresh directory; a GitHub App job's verified commit is checked out first.
    Fresh(Option<Box<crate::github::VerifiedJob>>),
    /// Following a job the executor kept running while the agent restarted.
    Resume,
}

impl JobRunner {
    /// A fresh job directory, with a GitHub App job's commit checked out in its workspace.
    async fn prepare(
        &self,
        ctx: &JobContext,
        checkout: Option<&crate::github::VerifiedJob>,
        sink: &LogSink,
    ) -> anyhow::Result<()> {
        fresh_dir(&ctx.dir).await?;
        let Some(job) = checkout else {
            return Ok(());
        };
        let token = self
            .site
            .as_ref()
            .and_then(|gate| gate.github.as_ref())
            .and_then(|app| app.token.as_ref());
        crate::github::checkout(job, token, &ctx.dir.join("workspace")).await?;
        sink.system(format!(
            "checked out {}@{} (verified with GitHub)",
            job.claims.repository, job.sha
        ))
        .await;
        Ok(())
    }

    /// Runs one assigned job to its reported end. `hard_stop` cancels the job (second signal).
    pub async fn run(&self, assignment: Assignment, hard_stop: &CancellationToken) {
        let id = assignment.job_id;
        let lease = assignment.lease.clone();

        // start: the broker marks the job running, or tells us it was cancelled meanwhile.
        let status = match self
            .with_retry(assignment.lease_ttl_ms, || self.client.start(id, &lease))
            .await
        {
            Ok(status) => status,
            Err(err) => {
                tracing::warn!(job_id = %id, %err, "Cannot start the job; leaving it to the broker.");
                return;
            }
        };
        if status.cancel_requested {
            let outcome = Outcome::with_cause(
                JobState::Cancelled,
                FailureCause::Cancelled,
                "cancelled before it started",
            );
            self.finish(id, &lease, outcome).await;
            return;
        }
        tracing::info!(job_id = %id, attempt = assignment.attempt, "Job started.");

        let admission = match &self.site {
            None => check_without_policy(
                &assignment,
                self.executor.name(),
                self.workflow_jobs_without_policy,
            )
            .map(|()| Admission {
                run_as: None,
                timeout: assignment
                    .spec
                    .timeout_secs
                    .map(Duration::from_secs)
                    .map_or(self.max_job_time, |t| t.min(self.max_job_time)),
                resources: None,
                checkout: None,
            }),
            Some(gate) => {
                gate.admit(&assignment, self.executor.name(), &self.agent)
                    .await
            }
        };
        let admission = match admission {
            Ok(admission) => admission,
            Err(refusal) => {
                tracing::warn!(job_id = %id, reason = %refusal.reason, kind = ?refusal.kind, "Job refused; handing it back.");
                if self.release(id, &lease, &refusal).await {
                    return;
                }
                let denial = refusal.reason;
                let reason = format!(
                    "refused by the site policy of agent {}: {denial}",
                    self.agent
                );
                self.refuse(id, &lease, assignment.log_offset, reason).await;
                return;
            }
        };
        let mut spec = assignment.spec;
        if let Some(resources) = admission.resources {
            spec.resources = resources;
        }
        // Chosen tests run through the job's own `run_tests`, each quoted by the agent: the
        // broker names tests, never shell text.
        match spec.selected_script().map(std::borrow::Cow::into_owned) {
            Ok(script) => spec.script = script,
            Err(problem) => {
                let reason = format!("the job's choice of tests cannot run: {problem}");
                tracing::warn!(job_id = %id, %reason, "Job refused.");
                self.refuse(id, &lease, assignment.log_offset, reason).await;
                return;
            }
        }
        let ctx = JobContext {
            id,
            attempt: assignment.attempt,
            agent: self.agent.clone(),
            dir: self
                .work_dir
                .join("jobs")
                .join(format!("job-{id}-{}", assignment.attempt)),
            spec,
            timeout: admission.timeout,
            run_as: admission.run_as,
            keep_dir: self.keep_job_dirs,
            lease,
            heartbeat_interval_ms: assignment.heartbeat_interval_ms,
            batch: assignment.batch,
        };
        self.execute(
            ctx,
            assignment.log_offset,
            Start::Fresh(admission.checkout.map(Box::new)),
            hard_stop,
        )
        .await;
    }

    /// Ends a job the agent will not run: the reason as a line of its log (at `offset`, best
    /// effort: the reason is in the result either way), then the result.
    async fn refuse(
        &self,
        id: testbot_proto::jobs::JobId,
        lease: &str,
        offset: u64,
        reason: String,
    ) {
        let chunk = testbot_proto::logs::format_line(
            testbot_proto::now_ms(),
            testbot_proto::logs::Stream::System,
            &format!("testbot: {reason}"),
        );
        let _ = self
            .client
            .append_log(
                id,
                &testbot_proto::logs::LogChunk {
                    lease: lease.to_string(),
                    offset,
                    data: chunk,
                },
            )
            .await;
        self.finish(
            id,
            lease,
            Outcome::with_cause(JobState::Error, FailureCause::PolicyRefusal, reason),
        )
        .await;
    }

    /// Picks up a job the executor was running when the agent last stopped: renews its lease
    /// and follows it to its end, or gives it up when the broker has handed it on.
    pub async fn resume(&self, detached: Detached, hard_stop: &CancellationToken) {
        let id = detached.job_id;
        let log_offset = match self
            .with_retry(30_000, || {
                self.client.heartbeat(id, &detached.lease, Duration::ZERO)
            })
            .await
        {
            // The broker's end of the log, not ours: lines it took after our last record of it
            // must not be overwritten.
            Ok(status) => status.log_bytes,
            Err(err) => {
                tracing::warn!(job_id = %id, %err, "A job from before the restart is no longer ours; giving it up.");
                self.executor.abandon(&detached).await;
                return;
            }
        };
        let run_as = match &detached.run_as {
            None => None,
            Some(name) => match crate::identity::lookup_account(name) {
                Ok(account) => Some(account),
                Err(err) => {
                    tracing::error!(job_id = %id, %err, "Cannot re-attach: the job's account is gone.");
                    self.executor.abandon(&detached).await;
                    self.finish(
                        id,
                        &detached.lease,
                        Outcome::with_cause(
                            JobState::Error,
                            FailureCause::Infrastructure,
                            format!("cannot re-attach: {err}"),
                        ),
                    )
                    .await;
                    return;
                }
            },
        };
        // An agent killed while a chunk was in flight left its end in the record.
        self.executor.settle(id, log_offset);
        tracing::info!(job_id = %id, attempt = detached.attempt, "Re-attaching to a job after a restart.");
        let ctx = JobContext {
            id,
            attempt: detached.attempt,
            agent: self.agent.clone(),
            dir: detached.dir,
            spec: detached.spec,
            timeout: detached.timeout,
            run_as,
            keep_dir: self.keep_job_dirs,
            lease: detached.lease,
            heartbeat_interval_ms: detached.heartbeat_interval_ms,
            // The script started before the agent did; its environment is set already.
            batch: None,
        };
        self.execute(ctx, log_offset, Start::Resume, hard_stop)
            .await;
    }

    /// Runs (or follows again, after a restart) a job with heartbeats and live log shipping,
    /// then reports its result.
    async fn execute(
        &self,
        ctx: JobContext,
        log_offset: u64,
        start: Start,
        hard_stop: &CancellationToken,
    ) {
        let id = ctx.id;
        let lease = ctx.lease.clone();
        let (sink, rx) = LogSink::new(LOG_CHANNEL_CAPACITY);
        // The job's secret values are masked in everything it sends the broker about the job.
        let masker = ctx.spec.masker();
        let shipper = tokio::spawn({
            let executor = self.executor.clone();
            let ctx = ctx.clone();
            ship_log(
                self.client.clone(),
                id,
                lease.clone(),
                masker.clone(),
                log_offset,
                rx,
                {
                    let (executor, ctx) = (executor.clone(), ctx.clone());
                    move |checkpoint| executor.sending(&ctx, checkpoint)
                },
                move |checkpoint| executor.checkpoint(&ctx, checkpoint),
            )
        });

        let stop = hard_stop.child_token();
        let stop_reason = Arc::new(Mutex::new(None::<StopReason>));
        let reporting = CancellationToken::new();
        let heartbeats = tokio::spawn(heartbeat_loop(
            self.client.clone(),
            id,
            lease.clone(),
            Duration::from_millis(ctx.heartbeat_interval_ms.max(100)),
            stop.clone(),
            stop_reason.clone(),
            reporting.clone(),
        ));

        let result = match start {
            Start::Resume => {
                sink.system(format!(
                    "agent {} restarted; re-attached to the job (attempt {})",
                    self.agent, ctx.attempt
                ))
                .await;
                self.executor.resume(&ctx, sink.clone(), stop.clone()).await
            }
            Start::Fresh(checkout) => {
                sink.system(format!(
                    "running on agent {} with the {} executor (attempt {})",
                    self.agent,
                    self.executor.name(),
                    ctx.attempt
                ))
                .await;
                match self.prepare(&ctx, checkout.as_deref(), &sink).await {
                    Ok(()) => self.executor.run(&ctx, sink.clone(), stop.clone()).await,
                    Err(err) => Err(err),
                }
            }
        };
        let reason = *stop_reason.lock().expect("stop reason poisoned");
        let mut outcome = match result {
            Ok(ExecOutcome::Exited(code)) => Outcome::exited(code),
            Ok(ExecOutcome::Signalled(signal)) => Outcome::signalled(signal),
            Ok(ExecOutcome::TimedOut(limit)) => Outcome::with_cause(
                JobState::Failed,
                FailureCause::Timeout,
                format!("timed out after {}", humantime::format_duration(limit)),
            ),
            Ok(ExecOutcome::Failed {
                state,
                cause,
                reason,
            }) => Outcome::with_cause(state, cause, reason),
            Ok(ExecOutcome::Stopped) => match reason {
                Some(StopReason::Cancelled) => Outcome::with_cause(
                    JobState::Cancelled,
                    FailureCause::Cancelled,
                    "cancelled by a user",
                ),
                Some(StopReason::LeaseLost) => {
                    Outcome::with_cause(JobState::Error, FailureCause::Infrastructure, "lease lost")
                }
                // Only the agent's own hard stop cancels without a reason.
                None => Outcome::with_cause(
                    JobState::Cancelled,
                    FailureCause::Cancelled,
                    format!("cancelled: agent {} shut down", self.agent),
                ),
            },
            Err(err) => {
                tracing::error!(job_id = %id, ?err, "The executor failed.");
                sink.system(format!("the executor failed: {err:#}")).await;
                Outcome::with_cause(
                    JobState::Error,
                    FailureCause::Infrastructure,
                    format!("executor failed: {err:#}"),
                )
            }
        };
        // Result files also of a run that failed or timed out: that is when they matter most.
        if !ctx.spec.results.is_empty()
            && reason.is_none()
            && !matches!(outcome.state, JobState::Cancelled)
        {
            self.upload_results(&ctx, &lease, &sink).await;
        }
        if let Some(reason) = &mut outcome.reason {
            *reason = masker.mask(reason).into_owned();
            sink.system(reason.clone()).await;
        }
        drop(sink);
        let shipped = shipper
            .await
            .unwrap_or(ShipEnd::Refused("log shipper panicked".into()));
        if shipped == ShipEnd::LeaseLost || reason == Some(StopReason::LeaseLost) {
            heartbeats.abort();
            tracing::warn!(job_id = %id, "The lease was lost; the broker has handed the job on. Not reporting a result.");
            self.executor.cleanup(&ctx).await;
            return;
        }
        reporting.cancel();
        self.finish(id, &lease, outcome).await;
        // The result ends the lease, which answers a held heartbeat; let it end by itself so its
        // connection is reused rather than torn down.
        let _ = tokio::time::timeout(Duration::from_secs(1), heartbeats).await;
        // After the result is reported: until then an executor's records (a Slurm job id) are
        // what a restarted agent would pick the job up from.
        self.executor.cleanup(&ctx).await;
    }

    /// Collects the job's result files from its workspace and uploads each, saying in the log
    /// what was found, left out, and read. Never fails the job: a file that cannot be
    /// collected or uploaded is a line in the log.
    async fn upload_results(&self, ctx: &JobContext, lease: &str, sink: &LogSink) {
        // The statistics count each test where it ran (the Slurm nodes, a fact the executor
        // may have sent just now): the broker has it before the results.
        sink.facts_delivered().await;
        let Some(workspace) = self.executor.workspace(ctx) else {
            sink.system(format!(
                "results: no result files are collected: the {} executor left no workspace for them on the agent's machine",
                self.executor.name()
            ))
            .await;
            return;
        };
        let patterns = ctx.spec.results.clone();
        let limits = crate::results::CollectLimits::uploaded();
        let collecting = tokio::task::spawn_blocking(move || {
            crate::results::collect(&workspace, &patterns, &limits)
        });
        let collected = match tokio::time::timeout(COLLECT_TIMEOUT, collecting).await {
            Ok(Ok(Ok(collected))) => collected,
            Ok(Ok(Err(err))) => {
                sink.system(format!("results: {err}")).await;
                return;
            }
            Ok(Err(err)) => {
                sink.system(format!("results: collecting failed: {err}"))
                    .await;
                return;
            }
            Err(_) => {
                sink.system(format!(
                    "results: collecting the result files took longer than {}; none are uploaded",
                    humantime::format_duration(COLLECT_TIMEOUT)
                ))
                .await;
                return;
            }
        };
        for note in collected.notes {
            sink.system(note).await;
        }
        for file in collected.files {
            let path = file.path.clone();
            let data = match tokio::task::spawn_blocking(move || file.read_bounded()).await {
                Ok(Ok(data)) => data,
                Ok(Err(err)) => {
                    sink.system(format!("results: cannot read {path:?}: {err}"))
                        .await;
                    continue;
                }
                Err(err) => {
                    sink.system(format!("results: cannot read {path:?}: {err}"))
                        .await;
                    continue;
                }
            };
            let bytes = data.len();
            match self
                .client
                .upload_result_file(ctx.id, lease, &path, data)
                .await
            {
                Ok(ack) => {
                    let read = ack.report.describe();
                    sink.system(format!("results: {path} ({bytes} bytes): {read}"))
                        .await;
                }
                Err(err) => {
                    sink.system(format!("results: cannot upload {path}: {err}"))
                        .await;
                }
            }
        }
    }

    /// Hands a job this agent will not run back to the broker, retrying while the broker is
    /// unreachable. False when the broker has no `release` (an older broker): the caller then
    /// ends the job itself.
    async fn release(
        &self,
        id: testbot_proto::jobs::JobId,
        lease: &str,
        refusal: &Refusal,
    ) -> bool {
        let request = ReleaseRequest {
            lease: lease.to_string(),
            reason: refusal.reason.clone(),
            kind: refusal.kind,
        };
        let mut backoff = Backoff::standard();
        loop {
            match self.client.release(id, &request).await {
                Ok(outcome) => {
                    tracing::info!(job_id = %id, state = %outcome.state, reason = %outcome.reason, "Job handed back.");
                    return true;
                }
                Err(ClientError::Api {
                    status: 404, code, ..
                }) if code == "not_found" => {
                    // Either the job is gone or the broker predates `release`; finishing tells.
                    return false;
                }
                Err(err) if err.is_retryable() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(job_id = %id, %err, ?delay, "Cannot hand the job back; retrying.");
                    tokio::time::sleep(delay).await;
                }
                Err(err) => {
                    tracing::warn!(job_id = %id, %err, "The broker refused the hand-back.");
                    return true;
                }
            }
        }
    }

    /// Reports the result, retrying while the broker is unreachable.
    async fn finish(&self, id: testbot_proto::jobs::JobId, lease: &str, outcome: Outcome) {
        let mut request = FinishRequest {
            lease: lease.to_string(),
            outcome,
        };
        let mut backoff = Backoff::standard();
        loop {
            match self.client.finish(id, &request).await {
                Ok(job) => {
                    tracing::info!(job_id = %id, state = %job.state, reason = ?job.reason, "Job finished.");
                    return;
                }
                // A broker older than failure causes refuses the field; it infers the cause
                // from the state and reason itself, so the result goes without it.
                Err(ClientError::Api {
                    status: 400,
                    message,
                    ..
                }) if request.outcome.cause.is_some()
                    && message.contains("unknown field `cause`") =>
                {
                    tracing::info!(job_id = %id, "The broker predates failure causes; reporting the result without one.");
                    request.outcome.cause = None;
                }
                Err(err) if err.is_retryable() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(job_id = %id, %err, ?delay, "Cannot report the result; retrying.");
                    tokio::time::sleep(delay).await;
                }
                Err(err) => {
                    tracing::warn!(job_id = %id, %err, "The broker refused the result.");
                    return;
                }
            }
        }
    }

    /// Retries a call while the broker is unreachable, for at most the lease's lifetime.
    async fn with_retry<T, F, Fut>(&self, lease_ttl_ms: u64, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let give_up = Instant::now() + Duration::from_millis(lease_ttl_ms);
        let mut backoff = Backoff::standard();
        loop {
            match call().await {
                Err(err) if err.is_retryable() && Instant::now() < give_up => {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                other => return other,
            }
        }
    }
}

/// Renews the lease until aborted. The broker holds each heartbeat up to `interval` and answers
/// early when the job is cancelled, so a cancel reaches the job within a round trip.
async fn heartbeat_loop(
    client: BrokerClient,
    id: testbot_proto::jobs::JobId,
    lease: String,
    interval: Duration,
    stop: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
    done: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), interval);
    let stop_with = |why: StopReason| {
        let mut slot = reason.lock().expect("stop reason poisoned");
        slot.get_or_insert(why);
        stop.cancel();
    };
    // The claim and the start renewed the lease just now; a job that ends soon needs no
    // heartbeat at all.
    tokio::select! {
        _ = tokio::time::sleep(interval / 2) => {}
        _ = done.cancelled() => return,
    }
    loop {
        let sent = Instant::now();
        let answer = client.heartbeat(id, &lease, interval).await;
        // Once the result is being reported, the broker ends the lease: not a loss.
        if done.is_cancelled() {
            return;
        }
        match answer {
            Ok(status) if status.cancel_requested => {
                tracing::info!(job_id = %id, "Cancel requested; stopping the job.");
                stop_with(StopReason::Cancelled);
                return;
            }
            Ok(_) => {
                backoff.reset();
                // An answer well before `interval` means the broker did not hold it.
                let elapsed = sent.elapsed();
                if elapsed < interval / 2 {
                    tokio::select! {
                        _ = tokio::time::sleep(interval - elapsed) => {}
                        _ = done.cancelled() => return,
                    }
                }
            }
            Err(err) if err.is_lease_lost() => {
                tracing::warn!(job_id = %id, %err, "Lease lost; stopping the job.");
                stop_with(StopReason::LeaseLost);
                return;
            }
            // A revoked agent's lease will not be renewed again: the broker requeues the job
            // elsewhere, so running it on here would run it twice.
            Err(err) if err.is_agent_revoked() => {
                tracing::warn!(job_id = %id, %err, "This agent was revoked; stopping the job.");
                stop_with(StopReason::LeaseLost);
                return;
            }
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(job_id = %id, %err, ?delay, "Heartbeat failed; retrying.");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = done.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// What a broker older than failure causes answers to a result that has one: its
    /// `Outcome` refused unknown fields with serde's words, which `finish` looks for.
    #[test]
    fn an_older_brokers_refusal_of_the_cause_is_recognised() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct OlderOutcome {
            state: testbot_proto::jobs::JobState,
            #[serde(default)]
            exit_code: Option<i32>,
            #[serde(default)]
            signal: Option<i32>,
            #[serde(default)]
            reason: Option<String>,
        }
        let current = testbot_proto::results::Outcome::exited(3);
        let body = serde_json::to_string(&current).unwrap();
        let err = serde_json::from_str::<OlderOutcome>(&body).unwrap_err();
        assert!(err.to_string().contains("unknown field `cause`"), "{err}");
    }
}
