//! Storage: the [`Store`] trait, the rows it returns, and the two implementations.
//!
//! The store keeps and fetches; it decides nothing. What a state change means (the reason a job
//! is given, the `testbot:` line in its log, whether it runs again) is decided above it, in
//! [`crate::lifecycle`], and handed to the store as a [`Transition`]. So both backends behave
//! the same by construction, and [`tests`] checks them against one contract.
//!
//! Layout:
//! - [`sqlite`]: the embedded default (one file in the data directory, nothing to install).
//! - [`postgres`]: for several brokers sharing one database (`--database-url postgres://…`);
//!   claims skip rows other brokers are claiming, and one broker at a time sweeps.
//! - [`notify`]: job events between brokers sharing a PostgreSQL database.
//! - [`github`]: what the GitHub App keeps; [`test_results`]: result files and test cases.
//! - [`scratch`]: throwaway PostgreSQL databases for tests and benchmarks.
//! - [`tests`]: the conformance suite both run, and what only a shared database must do.

use std::sync::Arc;

use anyhow::Context as _;
use testbot_proto::batches::{BatchId, BatchPlace};
use testbot_proto::jobs::{Job, JobId, JobSpec, JobState};
use testbot_proto::repos::{Repo, RepoSettings};
use testbot_proto::results::{FailureCause, Outcome};

pub mod bisections;
pub mod github;
pub mod notify;
pub mod postgres;
pub mod scratch;
pub mod sqlite;
pub mod test_results;
#[cfg(test)]
mod tests;

/// A store shared by the broker's tasks.
pub type SharedStore = Arc<dyn Store>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached now (closed, connection lost, pool exhausted): the
    /// request may be retried.
    #[error("the database is unavailable: {0:#}")]
    Unavailable(#[source] anyhow::Error),
    /// Anything else: a failed statement, a stored value that does not parse.
    #[error("{0:#}")]
    Internal(#[source] anyhow::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::PoolClosed | sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => {
                StoreError::Unavailable(anyhow::Error::new(err))
            }
            sqlx::Error::Database(ref db) if db.code().is_some_and(|c| server_unavailable(&c)) => {
                StoreError::Unavailable(anyhow::Error::new(err))
            }
            other => StoreError::Internal(anyhow::Error::new(other).context("Database error")),
        }
    }
}

/// Whether a PostgreSQL error code (SQLSTATE) says the server cannot serve now, rather than that
/// the statement failed: a lost connection (class 08), a server shutting down or starting
/// (57P01-57P03), too many connections (53300).
fn server_unavailable(sqlstate: &str) -> bool {
    sqlstate.starts_with("08") || matches!(sqlstate, "57P01" | "57P02" | "57P03" | "53300")
}

impl From<anyhow::Error> for StoreError {
    fn from(err: anyhow::Error) -> Self {
        StoreError::Internal(err)
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(err: serde_json::Error) -> Self {
        StoreError::Internal(anyhow::Error::new(err).context("Cannot encode a stored value"))
    }
}

/// A change of a job's state that the lifecycle decided, for the store to apply as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// [`JobState::Queued`] (the job runs again) or an end state.
    pub state: JobState,
    /// For an end state other than success, why.
    pub cause: Option<FailureCause>,
    /// The job's reason.
    pub reason: String,
    /// Appended to the job's log: one whole system line (see [`testbot_proto::logs`]).
    pub log_line: String,
}

/// The job's row as an append reads it (in the append's transaction).
pub(crate) struct LogRow<'a> {
    pub lease: Option<&'a str>,
    pub state: &'a str,
    pub log_bytes: u64,
    /// Whether the log was cut at its limit already.
    pub cut: bool,
}

/// What an append stores, decided from the job's row alone: the same in every store.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AppendPlan<'a> {
    /// Nothing to store; the answer.
    Answer(AppendResult),
    /// Store `bytes` at the end of the log.
    Store(&'a [u8]),
    /// Store `bytes` (the whole lines that fit) at the end of the log, then the cut notice.
    Cut(&'a [u8]),
}

/// See [`Store::append_log`]: refusals, a gap, bytes stored already (skipped), the cut.
pub(crate) fn plan_append<'a>(
    row: Option<LogRow<'_>>,
    lease: &str,
    offset: u64,
    data: &'a [u8],
    max_log_bytes: u64,
) -> AppendPlan<'a> {
    let Some(row) = row else {
        return AppendPlan::Answer(AppendResult::Refused(LeaseRefusal::NoSuchJob));
    };
    let state = row.state.parse::<JobState>().unwrap_or(JobState::Error);
    if state.is_terminal() {
        return AppendPlan::Answer(AppendResult::Refused(LeaseRefusal::Finished(state)));
    }
    if row.lease != Some(lease) {
        return AppendPlan::Answer(AppendResult::Refused(LeaseRefusal::Superseded));
    }
    let log_bytes = row.log_bytes;
    // Once cut, the log takes nothing more, whatever the chunk: the notice may end short of the
    // limit, and a chunk that fits in what is left must not land after it.
    if row.cut {
        return AppendPlan::Answer(AppendResult::TooLarge { log_bytes });
    }
    if offset > log_bytes {
        return AppendPlan::Answer(AppendResult::Gap { log_bytes });
    }
    let end = offset + data.len() as u64;
    if end <= log_bytes {
        return AppendPlan::Answer(AppendResult::Appended(log_bytes));
    }
    let tail = &data[(log_bytes - offset) as usize..];
    if end <= max_log_bytes {
        return AppendPlan::Store(tail);
    }
    let room = max_log_bytes.saturating_sub(log_bytes) as usize;
    let fits = tail[..room.min(tail.len())]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |nl| nl + 1);
    AppendPlan::Cut(&tail[..fits])
}

/// What the store writes when a job's log reaches its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogCut {
    /// The system line appended after the last whole line that fits.
    pub log_line: String,
    /// The job's `log_truncated` metadata entry.
    pub note: String,
}
/// A row of `jobs`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobModel {
    pub id: i64,
    pub spec: String,
    pub state: String,
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub attempts: i64,
    pub agent: Option<String>,
    pub lease: Option<String>,
    pub lease_expires_at_ms: Option<i64>,
    pub cancel_requested: bool,
    pub log_bytes: i64,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub repository: Option<String>,
    pub run_id: Option<String>,
    pub submitted_by: Option<String>,
    pub oidc_token: Option<String>,
    pub metadata: Option<String>,
    /// The values of the spec's secret variables (a JSON object), until the job ends; `spec`
    /// holds `***` in their place.
    pub secret_env: Option<String>,
    /// Its repository is public: its page and log are readable without signing in.
    pub public: bool,
    /// Why it did not succeed (a [`FailureCause`] by name), once it ended without success.
    pub cause: Option<String>,
    /// Its batch, its run in it (from 1) and the batch's size, when it is a run of one.
    pub batch_id: Option<i64>,
    pub batch_run: Option<i64>,
    pub batch_runs: Option<i64>,
    /// The commit, ref and job name GitHub vouched for at submission, when it did.
    pub commit_sha: Option<String>,
    pub git_ref: Option<String>,
    pub job_name: Option<String>,
}

/// A batch's row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BatchModel {
    pub id: i64,
    pub runs: i64,
    pub created_at_ms: i64,
    pub submitted_by: Option<String>,
    pub repository: Option<String>,
    /// Its stopping rule, JSON ([`testbot_proto::batches::Until`]).
    pub until: Option<String>,
}

impl BatchModel {
    pub fn until(&self) -> Option<testbot_proto::batches::Until> {
        self.until
            .as_deref()
            .and_then(|until| serde_json::from_str(until).ok())
    }
}

/// Who a job is for, recorded with it at submission.
#[derive(Debug, Clone, Default)]
pub struct JobOrigin {
    pub repository: Option<String>,
    pub run_id: Option<String>,
    pub submitted_by: String,
    pub oidc_token: Option<String>,
    /// Sites the job may run on; empty: any.
    pub sites: Vec<String>,
    /// The repository is public, as GitHub says (see [`JobModel::public`]).
    pub public: bool,
    /// The commit and ref GitHub vouched for (a workflow's token, an App job's provenance).
    pub commit_sha: Option<String>,
    pub git_ref: Option<String>,
    /// Where the job goes in the queue; the runs of a batch of several go no earlier than
    /// [`Priority::Repeat`].
    pub priority: Priority,
}

/// The order in which agents take queued jobs: by priority, then oldest first. Someone
/// waiting on a job (a `testbot run`, a workflow, a pull request, a comment) comes before the
/// runs after a merge, which come before repeats, which come before the broker's own runs
/// (history filling, bisection steps): a 100-run repeat does not hold back a job someone
/// waits for. A running job is never preempted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    #[default]
    Interactive = 0,
    PostMerge = 1,
    Repeat = 2,
    Background = 3,
}

impl Priority {
    /// The stored priority of a job of `origin`, run `batch` of a batch of `runs`.
    pub fn stored(origin: &JobOrigin, batch: Option<(i64, u32, u32)>) -> i64 {
        let repeat = batch.is_some_and(|(_, _, runs)| runs > 1);
        let priority = if repeat {
            origin.priority.max(Priority::Repeat)
        } else {
            origin.priority
        };
        priority as i64
    }
}

impl JobModel {
    pub fn job_id(&self) -> JobId {
        JobId(self.id)
    }

    pub fn state(&self) -> JobState {
        self.state.parse().unwrap_or(JobState::Error)
    }

    /// The spec as stored, and as everyone but the agent running the job sees it: secret
    /// variables' values are `***`.
    pub fn spec(&self) -> anyhow::Result<JobSpec> {
        serde_json::from_str(&self.spec)
            .with_context(|| format!("Stored spec of job {} is not valid JSON", self.id))
    }

    /// The spec with its secret variables' values, for the agent that claimed the job. Fails
    /// rather than hand out `***` as a value when they are gone (the job has ended).
    pub fn spec_for_agent(&self) -> anyhow::Result<JobSpec> {
        let mut spec = self.spec()?;
        if spec.secret_env.is_empty() {
            return Ok(spec);
        }
        let values: std::collections::BTreeMap<String, String> = self
            .secret_env
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .with_context(|| format!("Stored secret variables of job {} are not valid", self.id))?
            .with_context(|| format!("Job {} has ended; its secret variables are gone", self.id))?;
        for name in &spec.secret_env {
            let value = values.get(name).with_context(|| {
                format!(
                    "Job {} has no stored value for secret variable {name}",
                    self.id
                )
            })?;
            spec.env.insert(name.clone(), value.clone());
        }
        Ok(spec)
    }

    /// Its place in its batch, when it is a run of one.
    pub fn batch_place(&self) -> Option<BatchPlace> {
        match (self.batch_id, self.batch_run, self.batch_runs) {
            (Some(batch), Some(run), Some(runs)) => Some(BatchPlace {
                batch: BatchId(batch),
                run: run.clamp(0, i64::from(u32::MAX)) as u32,
                runs: runs.clamp(0, i64::from(u32::MAX)) as u32,
            }),
            _ => None,
        }
    }

    pub fn to_job(&self) -> anyhow::Result<Job> {
        Ok(Job {
            id: self.job_id(),
            // Masked again, whatever is stored: no answer but the assignment shows a secret.
            spec: self.spec()?.masked(),
            state: self.state(),
            reason: self.reason.clone(),
            exit_code: self.exit_code,
            signal: self.signal,
            cause: self.cause.as_deref().and_then(FailureCause::parse),
            batch: self.batch_place(),
            attempts: self.attempts as u32,
            agent: self.agent.clone(),
            cancel_requested: self.cancel_requested,
            log_bytes: self.log_bytes as u64,
            repository: self.repository.clone(),
            submitted_by: self.submitted_by.clone(),
            metadata: self
                .metadata
                .as_deref()
                .and_then(|m| serde_json::from_str(m).ok())
                .unwrap_or_default(),
            created_at_ms: self.created_at_ms,
            started_at_ms: self.started_at_ms,
            finished_at_ms: self.finished_at_ms,
            waiting: None,
        })
    }
}

/// A new job as both stores write it: the spec masked (it is shown to readers of the job), the
/// secret variables' values apart, and the JSON the claim query matches on.
pub(crate) struct StoredJob {
    pub spec: String,
    /// The spec's labels, a JSON array.
    pub labels: String,
    /// The values of the spec's secret variables, a JSON object; `None` without any.
    pub secret_env: Option<String>,
    /// The sites the job may run on, a JSON array; `None`: any.
    pub sites: Option<String>,
    /// The spec's name, kept apart for reading test results by job.
    pub name: Option<String>,
}

impl StoredJob {
    pub fn new(spec: &JobSpec, origin: &JobOrigin) -> serde_json::Result<StoredJob> {
        let secret_env = (!spec.secret_env.is_empty())
            .then(|| {
                serde_json::to_string(
                    &spec
                        .secret_values()
                        .collect::<std::collections::BTreeMap<_, _>>(),
                )
            })
            .transpose()?;
        Ok(StoredJob {
            spec: serde_json::to_string(&spec.masked())?,
            labels: serde_json::to_string(&spec.labels)?,
            secret_env,
            sites: (!origin.sites.is_empty())
                .then(|| serde_json::to_string(&origin.sites))
                .transpose()?,
            // A name may hold NUL, which the spec's JSON escapes but no PostgreSQL text can.
            name: spec.name.as_ref().map(|n| n.replace('\0', "\u{FFFD}")),
        })
    }
}

/// The columns of a job routing reads.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct RoutingRow {
    pub id: i64,
    pub spec: String,
    pub sites: Option<String>,
    pub repository: Option<String>,
    pub oidc_token: Option<String>,
    /// An App job's provenance.
    pub provenance: Option<String>,
    /// Its place in the queue ([`Priority`]), read on from in a claim's next page.
    pub priority: i64,
}

impl RoutingRow {
    pub fn routed(&self) -> anyhow::Result<crate::routing::RoutedJob> {
        crate::routing::RoutedJob::from_stored(
            &self.spec,
            self.sites.as_deref(),
            self.repository.as_deref(),
            self.oidc_token.as_deref(),
            self.provenance.as_deref(),
        )
    }
}

/// A row of `repos`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RepoModel {
    pub name: String,
    pub settings: String,
    pub registered_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// GitHub's id of the repository the registration is bound to; `None` until known.
    pub repository_id: Option<String>,
    pub repository_owner_id: Option<String>,
}

/// GitHub's ids of a repository and its owner, which, unlike names, are never reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryIds {
    pub repository_id: String,
    pub repository_owner_id: Option<String>,
}

impl RepoModel {
    pub fn settings(&self) -> anyhow::Result<RepoSettings> {
        serde_json::from_str(&self.settings)
            .with_context(|| format!("Stored settings of repository {} are not valid", self.name))
    }

    pub fn to_repo(&self) -> anyhow::Result<Repo> {
        Ok(Repo {
            name: self.name.clone(),
            settings: self.settings()?,
            registered_by: self.registered_by.clone(),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            repository_id: self.repository_id.clone(),
            repository_owner_id: self.repository_owner_id.clone(),
        })
    }

    /// The ids the registration is bound to, once known.
    pub fn ids(&self) -> Option<RepositoryIds> {
        Some(RepositoryIds {
            repository_id: self.repository_id.clone()?,
            repository_owner_id: self.repository_owner_id.clone(),
        })
    }
}

/// The outcome of a first registration.
#[derive(Debug, Clone)]
pub enum FirstRegistration {
    Created(RepoModel),
    /// The repository is registered already; nothing changed.
    Exists,
    /// The token was used before; nothing changed.
    Replayed,
}

/// The agent asking for work, as the claim query matches it.
#[derive(Debug, Clone, Copy)]
pub struct JobTaker<'a> {
    /// The name recorded on the job (`site/name`).
    pub agent: &'a str,
    pub offer: &'a crate::routing::Offer,
}

/// A queued job as routing reads it, with its id.
#[derive(Debug, Clone)]
pub struct QueuedJob {
    pub id: i64,
    pub job: crate::routing::RoutedJob,
}

/// A job an agent handed back.
#[derive(Debug, Clone)]
pub struct Release<'a> {
    pub lease: &'a str,
    /// The agent (`site/name`), held back from the job until `hold_until_ms` if it is queued
    /// again.
    pub agent: &'a str,
    pub hold_until_ms: i64,
}

/// A row of `sites`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SiteModel {
    pub name: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

/// A row of `agents`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AgentModel {
    pub id: String,
    pub site: String,
    pub name: String,
    pub public_key: Vec<u8>,
    pub policy: Option<String>,
    pub enrolled_at_ms: i64,
    pub last_seen_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    /// When the agent's site was revoked, if it was.
    pub site_revoked_at_ms: Option<i64>,
}

/// Why an enrollment was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollRefusal {
    UnknownToken,
    Expired,
    UsedUp,
    SiteRevoked(String),
    NameTaken {
        site: String,
        name: String,
    },
    /// Another agent (possibly revoked) was enrolled with the same public key.
    KeyTaken,
}

/// A row of `api_tokens`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiTokenModel {
    pub token_hash: String,
    pub role: String,
    pub name: String,
}

/// What happened to a job whose lease ran out.
#[derive(Debug, Clone)]
pub struct ExpiredLease {
    pub job: JobModel,
    /// The job's labels, for waking a matching agent when it was requeued.
    pub labels: Vec<String>,
}

/// A lease renewed (by a start or a heartbeat), and what the agent should know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRenewal {
    pub cancel_requested: bool,
    pub log_bytes: u64,
}

/// Why a call made under a lease was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseRefusal {
    NoSuchJob,
    /// The job has its result already.
    Finished(JobState),
    /// The job was requeued or handed to another lease.
    Superseded,
}

impl LeaseRefusal {
    pub fn describe(&self, id: JobId) -> String {
        match self {
            LeaseRefusal::NoSuchJob => format!("job {id} does not exist"),
            LeaseRefusal::Finished(state) => {
                format!("the lease is no longer valid: job {id} already has its result ({state})")
            }
            LeaseRefusal::Superseded => format!(
                "the lease is no longer valid: job {id} was requeued after the lease expired"
            ),
        }
    }
}

/// The outcome of a log append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendResult {
    /// The log now holds this many bytes.
    Appended(u64),
    Refused(LeaseRefusal),
    /// The chunk starts after the end of the stored log.
    Gap {
        log_bytes: u64,
    },
    /// Appending would pass the per-job log limit.
    TooLarge {
        log_bytes: u64,
    },
}
/// The broker's database: every operation the broker performs on it. Each method is one
/// transaction: a crash leaves the old state or the new one, never half of one.
#[async_trait::async_trait]
pub trait Store:
    github::GitHubStore
    + test_results::TestResultStore
    + bisections::BisectionStore
    + Send
    + Sync
    + 'static
{
    /// Which backend this is, for logs and `/metrics` (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;
    /// Whether other brokers may share this database (then replay checks must ask it).
    fn shared(&self) -> bool;
    /// Closes the connections; later calls fail with [`StoreError::Unavailable`].
    async fn close(&self);
    /// Whether the database answers and its schema is the one this broker expects.
    async fn health(&self) -> StoreResult<()>;

    // Operator and user tokens.
    async fn api_tokens(&self) -> StoreResult<Vec<ApiTokenModel>>;
    async fn upsert_api_token(&self, hash: &str, role: &str, name: &str) -> StoreResult<()>;
    /// Deletes the tokens of `role` named `name` other than the one hashed `keep`; returns how
    /// many there were.
    async fn retire_api_tokens(&self, role: &str, name: &str, keep: &str) -> StoreResult<u64>;

    // Workflow token ids (`jti`), so that a token is used once.
    /// Records a token id; false when it was recorded before (a replay).
    async fn use_jti(&self, jti: &str, expires_at: i64) -> StoreResult<bool>;
    /// Whether a token id has been recorded.
    async fn jti_used(&self, jti: &str) -> StoreResult<bool>;
    /// Forgets token ids whose tokens have expired (they can no longer be replayed anyway).
    async fn prune_jtis(&self, now_secs: i64) -> StoreResult<u64>;

    // Repositories.
    async fn repo(&self, name: &str) -> StoreResult<Option<RepoModel>>;
    async fn repos(&self) -> StoreResult<Vec<RepoModel>>;
    /// Binds a registration that has no ids yet to `ids`; returns the ids it is bound to now
    /// (another request may have bound it first). `None` if the repository is not registered.
    async fn bind_repo_ids(
        &self,
        name: &str,
        ids: &RepositoryIds,
    ) -> StoreResult<Option<RepositoryIds>>;
    /// Registers a repository or replaces its settings. With `ids`, binds it to them; without,
    /// keeps the ids it is bound to. With `jti`, the token's id is recorded in the same
    /// transaction; a token seen before changes nothing: `Ok(None)`.
    async fn upsert_repo(
        &self,
        name: &str,
        settings: &str,
        registered_by: &str,
        ids: Option<&RepositoryIds>,
        jti: Option<(&str, i64)>,
    ) -> StoreResult<Option<RepoModel>>;
    /// Registers a repository unless it is registered already (a workflow's self-registration).
    /// With `jti`, the token's id is recorded in the same transaction.
    async fn insert_repo_if_absent(
        &self,
        name: &str,
        settings: &str,
        registered_by: &str,
        ids: &RepositoryIds,
        jti: Option<(&str, i64)>,
    ) -> StoreResult<FirstRegistration>;
    /// Removes a registration; false when there was none.
    async fn delete_repo(&self, name: &str) -> StoreResult<bool>;

    // Sites, enrollment and agents.
    /// `None` when the site exists already.
    async fn create_site(&self, name: &str) -> StoreResult<Option<SiteModel>>;
    async fn site(&self, name: &str) -> StoreResult<Option<SiteModel>>;
    async fn sites(&self) -> StoreResult<Vec<SiteModel>>;
    /// Revokes a site: its agents are refused from their next request on, and its enrollment
    /// tokens die. False when there is no such site.
    async fn revoke_site(&self, name: &str) -> StoreResult<bool>;
    async fn create_enrollment_token(
        &self,
        token_hash: &str,
        site: &str,
        uses: u32,
        expires_at_ms: i64,
    ) -> StoreResult<()>;
    /// Whether an enrollment token with this hash exists (used up or expired, maybe).
    async fn enrollment_token_exists(&self, token_hash: &str) -> StoreResult<bool>;
    /// Spends one use of an enrollment token and records the agent, in one transaction.
    async fn enroll_agent(
        &self,
        token_hash: &str,
        id: &str,
        name: &str,
        public_key: &[u8],
        policy: Option<&str>,
    ) -> StoreResult<Result<AgentModel, EnrollRefusal>>;
    async fn agent(&self, id: &str) -> StoreResult<Option<AgentModel>>;
    async fn agents(&self) -> StoreResult<Vec<AgentModel>>;
    /// False when there is no such agent.
    async fn revoke_agent(&self, id: &str) -> StoreResult<bool>;
    /// Records what an agent offered in its poll (policy summary and routing offer, both as
    /// JSON) and when it was last seen: an agent seen polling has its offer.
    async fn record_offer(&self, id: &str, policy: Option<&str>, offer: &str) -> StoreResult<()>;
    /// The agents that can take work now (not revoked, site not revoked): `site`, `name`, the
    /// policy they enrolled or last polled with, and their last offer (None before a poll).
    async fn active_agent_offers(&self) -> StoreResult<Vec<AgentOffer>>;

    // Nonces of signed agent requests.
    /// Records a nonce; false when this agent used it before (a replay).
    async fn use_nonce(&self, agent_id: &str, nonce: &str, expires_at_ms: i64)
    -> StoreResult<bool>;
    /// Stores nonces seen (see [`crate::nonces`]), in one transaction.
    async fn insert_nonces(&self, nonces: &[(String, String, i64)]) -> StoreResult<()>;
    /// Nonces whose requests are still inside the clock window.
    async fn live_nonces(&self, now_ms: i64) -> StoreResult<Vec<(String, String, i64)>>;
    async fn prune_nonces(&self, now_ms: i64) -> StoreResult<u64>;

    // Jobs.
    /// Stores a queued job. With `jti`, the token's id is recorded in the same transaction, and
    /// a token seen before stores nothing: `Ok(None)`.
    async fn insert_job(
        &self,
        spec: &JobSpec,
        origin: &JobOrigin,
        jti: Option<(&str, i64)>,
    ) -> StoreResult<Option<JobModel>>;
    /// Stores `runs` queued runs of `spec` as one batch, in one transaction, with `jti` as for
    /// [`Store::insert_job`]: a token seen before stores nothing.
    async fn insert_batch(
        &self,
        spec: &JobSpec,
        origin: &JobOrigin,
        jti: Option<(&str, i64)>,
        runs: u32,
        until: Option<testbot_proto::batches::Until>,
    ) -> StoreResult<Option<(BatchModel, Vec<JobModel>)>>;
    async fn batch(&self, id: BatchId) -> StoreResult<Option<BatchModel>>;
    /// The batch's runs, in run order.
    async fn batch_jobs(&self, id: BatchId) -> StoreResult<Vec<JobModel>>;
    async fn job(&self, id: JobId) -> StoreResult<Option<JobModel>>;
    /// Newest first; `site`: only jobs labelled for that site or run by one of its agents.
    async fn jobs(
        &self,
        state: Option<JobState>,
        site: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<JobModel>>;
    /// The id of the workflow token that submitted a job.
    async fn submit_jti(&self, id: JobId) -> StoreResult<Option<String>>;
    /// The OIDC token stored with a job (to hand to the agent that claims it).
    async fn stored_oidc_token(&self, id: JobId) -> StoreResult<Option<String>>;
    /// Claims the oldest queued job `taker` may run, under a new lease: narrowed by what the
    /// database can check cheaply (labels, sites, executor, kind, holds), then by
    /// [`crate::routing::Offer::admits`] on every remaining candidate, a page at a time, so a
    /// backlog no agent here may take never hides a job behind it. For a site with
    /// `max_concurrent_jobs` the claim also checks that the site is under it.
    async fn claim_job(
        &self,
        taker: &JobTaker<'_>,
        lease: &str,
        lease_expires_at_ms: i64,
    ) -> StoreResult<Option<JobModel>>;
    /// Queued jobs after id `after`, oldest first, at most `limit`, as routing reads them.
    async fn queued_jobs(&self, after: i64, limit: i64) -> StoreResult<Vec<QueuedJob>>;
    /// One job as routing reads it, whatever its state.
    async fn routed_job(&self, id: JobId) -> StoreResult<Option<crate::routing::RoutedJob>>;
    /// How many times a job was handed back.
    async fn job_releases(&self, id: JobId) -> StoreResult<Option<u32>>;
    /// Hands a job back from the agent holding `release.lease`, without using up an attempt:
    /// `decide` is given how often it was handed back before and says what happens now. Queued
    /// again, the agent is held back from it until `release.hold_until_ms`.
    async fn release_job(
        &self,
        id: JobId,
        release: &Release<'_>,
        decide: &(dyn Fn(u32) -> Transition + Send + Sync),
    ) -> StoreResult<Result<JobModel, LeaseRefusal>>;
    /// Ends the holds that ran out before `now_ms`; returns the jobs still queued that they
    /// held back, so their agents can be woken.
    async fn end_holds(&self, now_ms: i64) -> StoreResult<Vec<JobId>>;
    /// Sets one metadata entry of a leased job.
    async fn set_metadata(
        &self,
        id: JobId,
        lease: &str,
        key: &str,
        value: &str,
    ) -> StoreResult<Result<JobModel, LeaseRefusal>>;
    /// Marks a leased job running and renews its lease.
    async fn start_job(
        &self,
        id: JobId,
        lease: &str,
        lease_expires_at_ms: i64,
    ) -> StoreResult<Result<LeaseRenewal, LeaseRefusal>>;
    /// Renews a lease (never shortening it).
    async fn renew_lease(
        &self,
        id: JobId,
        lease: &str,
        lease_expires_at_ms: i64,
    ) -> StoreResult<Result<LeaseRenewal, LeaseRefusal>>;
    /// Appends `data` at byte `offset` of the job's log, under `lease`. Bytes the log already
    /// holds are skipped, so a re-sent chunk is a no-op.
    ///
    /// The first chunk that would pass `max_log_bytes` is cut: its whole lines that fit are
    /// stored, then `cut(kept_bytes)`'s line (past the limit, so that it always fits), and the
    /// job's metadata `log_truncated` is set to its note. That chunk and every later one answer
    /// [`AppendResult::TooLarge`].
    async fn append_log(
        &self,
        id: JobId,
        lease: &str,
        offset: u64,
        data: &[u8],
        max_log_bytes: u64,
        cut: &(dyn Fn(u64) -> LogCut + Send + Sync),
    ) -> StoreResult<AppendResult>;
    /// Records a job's one result. `Err` when the lease is no longer valid, which is how a late
    /// result from an agent that lost its lease is refused.
    async fn finish_job(
        &self,
        id: JobId,
        lease: &str,
        outcome: &Outcome,
    ) -> StoreResult<Result<JobModel, LeaseRefusal>>;
    /// Applies `queued` to a queued job (it is cancelled before it starts), or asks the agent
    /// running it to stop. A finished job is left as it is. `None` if there is no such job.
    async fn request_cancel(&self, id: JobId, queued: &Transition)
    -> StoreResult<Option<JobModel>>;
    /// The jobs whose lease ran out before `now_ms`.
    async fn expired_leases(&self, now_ms: i64) -> StoreResult<Vec<JobModel>>;
    /// Ends lease `lease` of job `id` with `to` (queued again, or an end state), if it is
    /// still the job's lease and it ran out before `now_ms` (not renewed meanwhile).
    async fn expire_lease(
        &self,
        id: JobId,
        lease: &str,
        now_ms: i64,
        to: &Transition,
    ) -> StoreResult<Result<JobModel, LeaseRefusal>>;
    /// Gives every active lease at least until `until_ms`.
    async fn extend_active_leases(&self, until_ms: i64) -> StoreResult<u64>;
    /// Up to about `max_bytes` of the job's log from byte `offset`: the stored chunks that hold
    /// bytes from `offset` and start before `offset + max_bytes`, so at most `max_bytes` and one
    /// chunk. Only those chunks are read from the database.
    async fn read_log(&self, id: JobId, offset: u64, max_bytes: usize) -> StoreResult<Vec<u8>>;

    // Queue statistics, quotas and retention.
    /// How many workflow jobs of `repository` wait in the queue.
    async fn queued_jobs_of_repo(&self, repository: &str) -> StoreResult<i64>;
    /// How many workflow jobs for `site` (labelled `site:NAME`, or allowed only there) wait in
    /// the queue.
    async fn queued_jobs_for_site(&self, site: &str) -> StoreResult<i64>;
    /// When the oldest queued job was created, if any job is queued.
    async fn oldest_queued_at(&self) -> StoreResult<Option<i64>>;
    /// How many jobs are in each state (states with none are left out).
    async fn jobs_by_state(&self) -> StoreResult<Vec<(JobState, u64)>>;
    /// Deletes up to `limit` jobs that ended before `cutoff_ms`, with their logs.
    async fn delete_jobs_finished_before(&self, cutoff_ms: i64, limit: i64) -> StoreResult<u64>;

    // Coordination of the brokers sharing the database.
    /// Whether this broker runs the sweeper now (one broker at a time does); it keeps that
    /// role until it stops or loses its connection.
    async fn lead_sweeper(&self) -> StoreResult<bool>;
    /// Records that the sweeper ran at `now_ms`.
    async fn record_sweep(&self, now_ms: i64) -> StoreResult<()>;
    /// When the sweeper last ran, by any broker.
    async fn last_sweep_ms(&self) -> StoreResult<Option<i64>>;
}

/// An agent that can take work, and what it last offered.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AgentOffer {
    pub site: String,
    pub name: String,
    /// The policy summary it enrolled or last polled with (JSON).
    pub policy: Option<String>,
    /// Its last routing offer (JSON); `None` before its first poll.
    pub offer: Option<String>,
}

/// Opens the database named by `url` (`postgres://…`), or without one the SQLite database in
/// `data_dir`, and brings its schema up to date.
pub async fn open(url: Option<&str>, data_dir: &std::path::Path) -> anyhow::Result<SharedStore> {
    match url {
        None => Ok(Arc::new(sqlite::SqliteStore::open(data_dir).await?)),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(postgres::PgStore::open(url).await?))
        }
        Some(url) if url.starts_with("sqlite:") => anyhow::bail!(
            "--database-url {url:?}: SQLite is the default and lives in --data-dir; give no \
             --database-url to use it"
        ),
        Some(url) => anyhow::bail!(
            "--database-url {:?} is not a PostgreSQL URL (postgres://USER@HOST:PORT/DATABASE)",
            without_password(url)
        ),
    }
}

/// `url` with the password of its user, if it has one, replaced by `***`: for messages.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) if user_info.contains(':') => {
            let user = user_info.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{path}")
        }
        _ => url.to_string(),
    }
}

/// Whether the newest migration applied (`applied`) is the newest `migrator` knows.
pub(crate) fn check_migrations(
    migrator: &sqlx::migrate::Migrator,
    applied: Option<i64>,
) -> StoreResult<()> {
    let expected = migrator.iter().map(|m| m.version).max();
    if applied == expected {
        return Ok(());
    }
    Err(StoreError::Internal(anyhow::anyhow!(
        "the database schema is at migration {} but this broker expects {}",
        applied.map_or("none".to_string(), |v| v.to_string()),
        expected.map_or("none".to_string(), |v| v.to_string()),
    )))
}
