//! What the GitHub App keeps: webhook deliveries queued for processing, installations and
//! their repositories, the App's jobs with their provenance and check runs, and the comments
//! it acted on. A part of [`super::Store`] of its own, implemented beside each backend
//! (`sqlite/github.rs`, `postgres/github.rs`).

use testbot_proto::jobs::{JobId, JobSpec};

use super::{JobModel, JobOrigin, StoreResult};

/// A verified webhook delivery, to queue.
#[derive(Debug, Clone)]
pub struct NewDelivery<'a> {
    /// `X-GitHub-Delivery`.
    pub id: &'a str,
    /// `X-GitHub-Event`.
    pub event: &'a str,
    /// The payload's `action`, when it has one.
    pub action: Option<&'a str>,
    pub payload: &'a [u8],
    pub received_at_ms: i64,
}

/// A queued delivery, as claimed for processing.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryModel {
    pub id: String,
    pub event: String,
    pub action: Option<String>,
    pub payload: Vec<u8>,
    pub received_at_ms: i64,
    pub state: String,
    /// Including the attempt just claimed.
    pub attempts: i64,
    pub error: Option<String>,
}

/// How processing a delivery ended.
#[derive(Debug, Clone, Copy)]
pub enum DeliveryOutcome<'a> {
    Done,
    /// Try again at `retry_at_ms`.
    Retry {
        error: &'a str,
        retry_at_ms: i64,
    },
    /// Given up on (the error is kept for the operator).
    Failed {
        error: &'a str,
    },
}

/// A repository an installation lets the App act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledRepo {
    pub id: i64,
    pub full_name: String,
}

/// The check run to keep for a new App job.
#[derive(Debug, Clone)]
pub struct NewAppJob<'a> {
    /// `Provenance` as JSON.
    pub provenance: &'a str,
    pub installation_id: i64,
    pub repository: &'a str,
    pub head_sha: &'a str,
    /// The check run's name (the job's, with the run's number when there are several).
    pub check_name: &'a str,
    /// Whether the job shows as a check run on its commit (a bisection's runs on older
    /// commits do not).
    pub check_run: bool,
}

/// The `synced_state` of an App job that has no check run: never among the states synced.
pub const NO_CHECK_RUN: &str = "none";

/// An App job, with its check run and the job's present state.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AppJobModel {
    pub job_id: i64,
    /// `Provenance` as JSON; None for a workflow job (its check run only).
    pub provenance: Option<String>,
    pub installation_id: i64,
    pub repository: String,
    pub head_sha: String,
    pub check_name: String,
    pub check_run_id: Option<i64>,
    /// The job state the check run shows; None: not created yet.
    pub synced_state: Option<String>,
    pub sync_attempts: i64,
    /// The job's state now.
    pub state: String,
}

impl AppJobModel {
    pub fn job_id(&self) -> JobId {
        JobId(self.job_id)
    }
}

/// What carried a command: an issue comment or a pull request review.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommentKind {
    Comment,
    Review,
}

impl CommentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CommentKind::Comment => "comment",
            CommentKind::Review => "review",
        }
    }
}

/// A scheduled job of a repository (`on.schedule`), and when it runs next.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ScheduleModel {
    pub repository_id: i64,
    pub repository: String,
    pub installation_id: i64,
    pub job: String,
    pub cron: String,
    pub branch: String,
    pub next_run_ms: i64,
}

/// A job whose history the broker fills: `runs` runs on each of the last `commits` commits
/// of `branch` that ran it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct HistoryTargetModel {
    pub repository_id: i64,
    pub repository: String,
    pub installation_id: i64,
    pub public: bool,
    pub branch: String,
    pub job: String,
    pub commits: i64,
    pub runs: i64,
}

/// A commit a job ran at, with when it first ran there and its runs that count: all but the
/// cancelled ones (queued and running ones count, and so do runs that ended in an error, so a
/// commit no site will run is not tried again without end).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CommitRunCount {
    pub commit_sha: String,
    pub first_at_ms: i64,
    pub runs: i64,
}

/// What both backends read [`GitHubStore::commit_runs`] with.
pub(crate) const COMMIT_RUNS_SQL: &str = "SELECT commit_sha, MIN(created_at_ms) AS first_at_ms,
                SUM(CASE WHEN state = 'cancelled' THEN 0 ELSE 1 END) AS runs
         FROM jobs
         WHERE repository = $1 AND git_ref = $2 AND job_name = $3 AND commit_sha IS NOT NULL
         GROUP BY commit_sha ORDER BY first_at_ms DESC LIMIT $4";

#[async_trait::async_trait]
pub trait GitHubStore: Send + Sync {
    /// Queues a verified delivery; false when a delivery with its id was queued before (a
    /// redelivery), which changes nothing.
    async fn queue_delivery(&self, delivery: &NewDelivery<'_>) -> StoreResult<bool>;
    /// Claims the oldest queued delivery that is due and not claimed (or whose claim ran out),
    /// for `claim_ms`, counting an attempt.
    async fn claim_delivery(
        &self,
        now_ms: i64,
        claim_ms: i64,
    ) -> StoreResult<Option<DeliveryModel>>;
    /// Records how processing a delivery ended.
    async fn finish_delivery(&self, id: &str, outcome: DeliveryOutcome<'_>) -> StoreResult<()>;
    async fn delivery(&self, id: &str) -> StoreResult<Option<DeliveryModel>>;
    /// Forgets deliveries processed before `cutoff_ms` (their ids no longer de-duplicate).
    async fn prune_deliveries(&self, cutoff_ms: i64) -> StoreResult<u64>;

    /// Records an installation and replaces its repositories with `repos`.
    async fn save_installation(
        &self,
        id: i64,
        account: &str,
        repos: &[InstalledRepo],
    ) -> StoreResult<()>;
    /// Adds and removes repositories of a known installation (`installation_repositories`).
    /// False when the installation is not known.
    async fn change_installation_repos(
        &self,
        id: i64,
        added: &[InstalledRepo],
        removed: &[i64],
    ) -> StoreResult<bool>;
    /// Forgets an installation (uninstalled); false if it was not known.
    async fn delete_installation(&self, id: i64) -> StoreResult<bool>;
    /// The installation that lets the App act on repository `repository_id`, if any.
    async fn installation_of(&self, repository_id: i64) -> StoreResult<Option<i64>>;

    /// Inserts an App job and its check-run record in one transaction.
    async fn insert_app_job(
        &self,
        spec: &JobSpec,
        origin: &JobOrigin,
        app: &NewAppJob<'_>,
    ) -> StoreResult<JobModel>;
    /// Inserts `apps.len()` App jobs of `spec` as the runs of one batch, each with its
    /// check-run record, in one transaction.
    async fn insert_app_batch(
        &self,
        spec: &JobSpec,
        origin: &JobOrigin,
        apps: &[NewAppJob<'_>],
    ) -> StoreResult<(crate::store::BatchModel, Vec<JobModel>)>;
    async fn app_job(&self, id: JobId) -> StoreResult<Option<AppJobModel>>;
    /// Gives workflow job `id` (the Action's) a check run on `head_sha` of `repository`.
    async fn add_workflow_check_run(
        &self,
        id: JobId,
        installation_id: i64,
        repository: &str,
        head_sha: &str,
        check_name: &str,
    ) -> StoreResult<()>;
    async fn app_job_by_check_run(&self, check_run_id: i64) -> StoreResult<Option<AppJobModel>>;
    /// The App jobs of `repository` on commit `head_sha` that have not ended, oldest first.
    async fn active_app_jobs_of_commit(
        &self,
        repository: &str,
        head_sha: &str,
    ) -> StoreResult<Vec<AppJobModel>>;
    /// App jobs whose check run does not show the job's state yet, due at `now_ms`, oldest
    /// first.
    async fn check_runs_to_sync(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<AppJobModel>>;
    /// GitHub now shows `state` for the job (and the check run's id, once created).
    async fn check_run_synced(&self, id: JobId, check_run_id: i64, state: &str) -> StoreResult<()>;
    /// Updating the check run failed; try again after `retry_at_ms`.
    async fn check_run_sync_failed(&self, id: JobId, retry_at_ms: i64) -> StoreResult<()>;
    /// Replaces the schedules of repository `repository_id` with `schedules`; an entry that was
    /// there before keeps its next run.
    async fn replace_schedules(
        &self,
        repository_id: i64,
        schedules: &[ScheduleModel],
    ) -> StoreResult<()>;
    /// Replaces the history targets of a repository.
    async fn replace_history_targets(
        &self,
        repository_id: i64,
        targets: &[HistoryTargetModel],
    ) -> StoreResult<()>;
    async fn history_targets(&self) -> StoreResult<Vec<HistoryTargetModel>>;
    /// The last `limit` commits (by when they first ran) at which job `job_name` of
    /// `repository` ran on `git_ref`, newest first, with their runs that count.
    async fn commit_runs(
        &self,
        repository: &str,
        git_ref: &str,
        job_name: &str,
        limit: i64,
    ) -> StoreResult<Vec<CommitRunCount>>;
    /// Schedules due at `now_ms`, earliest first.
    async fn due_schedules(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<ScheduleModel>>;
    /// Moves a due schedule's next run from `from_ms` to `to_ms`; false when another broker
    /// did first (then it runs the job, not this one).
    async fn advance_schedule(
        &self,
        schedule: &ScheduleModel,
        from_ms: i64,
        to_ms: i64,
    ) -> StoreResult<bool>;
    /// Records that delivery `delivery_id` acts on comment or review `id` (`kind`: their ids
    /// are counted apart); false if another delivery did before. The same delivery, retried
    /// after a failure, may act again.
    async fn claim_comment(
        &self,
        kind: CommentKind,
        id: i64,
        delivery_id: &str,
        now_ms: i64,
    ) -> StoreResult<bool>;
}
