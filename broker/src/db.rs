//! Storage: SQLite in WAL mode behind a small [`Db`] facade.
//!
//! All writes go through one connection, so SQLite never makes a writer wait on its busy
//! handler (whose sleeps would show up as dispatch latency); reads use a separate pool and see
//! every committed write. Each state change is one statement or one transaction, so a crash
//! leaves either the old or the new state, never half of one.

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::sync::Arc;

use sqlx::{Connection as _, Row as _, Sqlite, SqliteConnection, Transaction};
use testbot_proto::jobs::{Job, JobId, JobSpec, JobState};
use testbot_proto::logs::{Stream, format_line};
use testbot_proto::now_ms;
use testbot_proto::repos::{Repo, RepoSettings};
use testbot_proto::results::Outcome;

/// The locked writing connection.
struct WriteGuard<'a>(tokio::sync::MutexGuard<'a, Option<SqliteConnection>>);

impl std::ops::Deref for WriteGuard<'_> {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.0.as_ref().expect("checked when locked")
    }
}

impl std::ops::DerefMut for WriteGuard<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.0.as_mut().expect("checked when locked")
    }
}

/// How many read connections to keep.
const READ_CONNECTIONS: u32 = 4;

/// The columns of [`JobModel`], in its field order.
const JOB_COLUMNS: &str = "id, spec, state, reason, exit_code, signal, attempts, agent, lease, \
     lease_expires_at_ms, cancel_requested, log_bytes, created_at_ms, started_at_ms, finished_at_ms, \
     repository, run_id, submitted_by, oidc_token, metadata, secret_env";

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

    pub fn to_job(&self) -> anyhow::Result<Job> {
        Ok(Job {
            id: self.job_id(),
            // Masked again, whatever is stored: no answer but the assignment shows a secret.
            spec: self.spec()?.masked(),
            state: self.state(),
            reason: self.reason.clone(),
            exit_code: self.exit_code,
            signal: self.signal,
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

/// The columns of [`RepoModel`], in its field order.
const REPO_COLUMNS: &str = "name, settings, registered_by, created_at_ms, updated_at_ms, repository_id, repository_owner_id";

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

/// How many queued jobs a claim reads at a time while looking for one its agent may take; it
/// reads on through the whole queue, a page at a time.
const CLAIM_PAGE: i64 = 256;

/// The agent asking for work, as the claim query matches it.
#[derive(Debug, Clone, Copy)]
pub struct JobTaker<'a> {
    /// The name recorded on the job (`site/name`).
    pub agent: &'a str,
    pub offer: &'a crate::routing::Offer,
}

/// The columns of a job routing reads.
#[derive(Debug, Clone, sqlx::FromRow)]
struct RoutingRow {
    id: i64,
    spec: String,
    sites: Option<String>,
    repository: Option<String>,
    oidc_token: Option<String>,
}

const ROUTING_COLUMNS: &str = "id, spec, sites, repository, oidc_token";

impl RoutingRow {
    fn routed(&self) -> anyhow::Result<crate::routing::RoutedJob> {
        crate::routing::RoutedJob::from_stored(
            &self.spec,
            self.sites.as_deref(),
            self.repository.as_deref(),
            self.oidc_token.as_deref(),
        )
    }
}

/// A queued job as routing reads it, with its id.
#[derive(Debug, Clone)]
pub struct QueuedJob {
    pub id: i64,
    pub job: crate::routing::RoutedJob,
}

/// A job an agent handed back, and what to do with it.
#[derive(Debug, Clone)]
pub struct Release<'a> {
    pub lease: &'a str,
    /// The agent (`site/name`), held back from the job until `hold_until_ms`.
    pub agent: &'a str,
    pub hold_until_ms: i64,
    /// The job's reason and log line when it is queued again.
    pub requeue_reason: &'a str,
    /// Set when no other agent could run the job: it ends `error` with this reason.
    pub final_reason: Option<&'a str>,
    /// After this many releases the job ends `error` (with `final_reason` or the release's).
    pub max_releases: u32,
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

const AGENT_COLUMNS: &str = "agents.id, agents.site, agents.name, agents.public_key, agents.policy, \
     agents.enrolled_at_ms, agents.last_seen_ms, agents.revoked_at_ms, \
     sites.revoked_at_ms AS site_revoked_at_ms";

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

/// Records a token id inside `tx`; false if it is there already.
async fn record_jti(
    tx: &mut Transaction<'_, Sqlite>,
    jti: &str,
    expires_at: i64,
) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO oidc_jtis (jti, expires_at) VALUES (?1, ?2) ON CONFLICT (jti) DO NOTHING",
    )
    .bind(jti)
    .bind(expires_at)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Whether an agent, revoked or not, was ever enrolled with `public_key`.
async fn enrolled_key(tx: &mut Transaction<'_, Sqlite>, public_key: &[u8]) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM agents WHERE public_key = ?1)")
        .bind(public_key)
        .fetch_one(&mut **tx)
        .await
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

impl LeaseRenewal {
    fn from_row(row: &sqlx::sqlite::SqliteRow) -> Self {
        LeaseRenewal {
            cancel_requested: row.get::<bool, _>(0),
            log_bytes: row.get::<i64, _>(1) as u64,
        }
    }
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

/// The broker's database.
#[derive(Clone)]
pub struct Db {
    /// The one writing connection, held directly rather than through a pool of one: a pool's
    /// acquire and release cost more than most of the statements (measured in
    /// docs/performance.md).
    write: Arc<tokio::sync::Mutex<Option<SqliteConnection>>>,
    read: SqlitePool,
}

impl Db {
    /// Opens (creating if needed) `testbot.db` in `data_dir` and runs migrations.
    pub async fn open(data_dir: &Path) -> anyhow::Result<Db> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("Cannot create data directory {}", data_dir.display()))?;
        let path = data_dir.join("testbot.db");
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: a commit survives a process crash (SIGKILL); only an OS crash can
            // lose the last transactions.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let mut write = SqliteConnection::connect_with(&options)
            .await
            .with_context(|| format!("Cannot open database {}", path.display()))?;
        sqlx::migrate!("./migrations")
            .run(&mut write)
            .await
            .with_context(|| format!("Cannot migrate database {}", path.display()))?;
        let write = Arc::new(tokio::sync::Mutex::new(Some(write)));
        let read = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .connect_with(options.read_only(true))
            .await
            .with_context(|| format!("Cannot open database {} for reading", path.display()))?;
        Ok(Db { write, read })
    }

    pub async fn close(&self) {
        self.read.close().await;
        if let Some(write) = self.write.lock().await.take() {
            let _ = write.close().await;
        }
    }

    /// The writing connection, for one statement or one transaction.
    async fn writer(&self) -> sqlx::Result<WriteGuard<'_>> {
        let guard = self.write.lock().await;
        if guard.is_none() {
            return Err(sqlx::Error::PoolClosed);
        }
        Ok(WriteGuard(guard))
    }

    pub async fn api_tokens(&self) -> sqlx::Result<Vec<ApiTokenModel>> {
        sqlx::query_as("SELECT token_hash, role, name FROM api_tokens")
            .fetch_all(&self.read)
            .await
    }

    pub async fn upsert_api_token(&self, hash: &str, role: &str, name: &str) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (token_hash, role, name, created_at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (token_hash) DO UPDATE SET role = excluded.role, name = excluded.name",
        )
        .bind(hash)
        .bind(role)
        .bind(name)
        .bind(now_ms())
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Deletes the tokens of `role` named `name` other than the one hashed `keep`; returns how
    /// many there were.
    pub async fn retire_api_tokens(&self, role: &str, name: &str, keep: &str) -> sqlx::Result<u64> {
        Ok(
            sqlx::query(
                "DELETE FROM api_tokens WHERE role = ?1 AND name = ?2 AND token_hash != ?3",
            )
            .bind(role)
            .bind(name)
            .bind(keep)
            .execute(&mut *self.writer().await?)
            .await?
            .rows_affected(),
        )
    }

    /// Stores a queued job. With `jti`, the token's id is recorded in the same transaction, and
    /// a token seen before stores nothing: `Ok(None)`.
    pub async fn insert_job(
        &self,
        spec: &JobSpec,
        origin: &JobOrigin,
        jti: Option<(&str, i64)>,
    ) -> anyhow::Result<Option<JobModel>> {
        // Secret values are kept apart from the spec, which is shown to readers of the job.
        let spec_json = serde_json::to_string(&spec.masked())?;
        let secret_env = (!spec.secret_env.is_empty())
            .then(|| {
                serde_json::to_string(
                    &spec
                        .secret_values()
                        .collect::<std::collections::BTreeMap<_, _>>(),
                )
            })
            .transpose()?;
        let labels = serde_json::to_string(&spec.labels)?;
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        if let Some((jti, expires_at)) = jti
            && !record_jti(&mut tx, jti, expires_at).await?
        {
            return Ok(None);
        }
        let sql = format!(
            "INSERT INTO jobs (spec, labels, state, created_at_ms, repository, run_id, submitted_by,
                 oidc_token, sites, submit_jti, secret_env)
             VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             RETURNING {JOB_COLUMNS}"
        );
        let model = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(spec_json)
            .bind(labels)
            .bind(now_ms())
            .bind(&origin.repository)
            .bind(&origin.run_id)
            .bind(&origin.submitted_by)
            .bind(&origin.oidc_token)
            .bind(
                (!origin.sites.is_empty())
                    .then(|| serde_json::to_string(&origin.sites))
                    .transpose()?,
            )
            .bind(jti.map(|(jti, _)| jti))
            .bind(secret_env)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(model))
    }

    /// Records a token id; false when it was recorded before (a replay).
    pub async fn use_jti(&self, jti: &str, expires_at: i64) -> sqlx::Result<bool> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        let fresh = record_jti(&mut tx, jti, expires_at).await?;
        tx.commit().await?;
        Ok(fresh)
    }

    /// Forgets token ids whose tokens have expired (they can no longer be replayed anyway).
    pub async fn prune_jtis(&self, now_secs: i64) -> sqlx::Result<u64> {
        Ok(sqlx::query("DELETE FROM oidc_jtis WHERE expires_at < ?1")
            .bind(now_secs)
            .execute(&mut *self.writer().await?)
            .await?
            .rows_affected())
    }

    pub async fn repo(&self, name: &str) -> sqlx::Result<Option<RepoModel>> {
        let sql = format!("SELECT {REPO_COLUMNS} FROM repos WHERE name = ?1");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&self.read)
            .await
    }

    pub async fn repos(&self) -> sqlx::Result<Vec<RepoModel>> {
        let sql = format!("SELECT {REPO_COLUMNS} FROM repos ORDER BY name");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.read)
            .await
    }

    /// Binds a registration that has no ids yet to `ids`; returns the ids it is bound to now
    /// (another request may have bound it first). `None` if the repository is not registered.
    pub async fn bind_repo_ids(
        &self,
        name: &str,
        ids: &RepositoryIds,
    ) -> sqlx::Result<Option<RepositoryIds>> {
        let row: Option<(String, Option<String>)> = sqlx::query_as(
            "UPDATE repos SET repository_id = coalesce(repository_id, ?2),
                 repository_owner_id = CASE WHEN repository_id IS NULL THEN ?3
                                            ELSE repository_owner_id END
             WHERE name = ?1
             RETURNING repository_id, repository_owner_id",
        )
        .bind(name)
        .bind(&ids.repository_id)
        .bind(&ids.repository_owner_id)
        .fetch_optional(&mut *self.writer().await?)
        .await?;
        Ok(
            row.map(|(repository_id, repository_owner_id)| RepositoryIds {
                repository_id,
                repository_owner_id,
            }),
        )
    }

    /// Whether a workflow token's id has been recorded (it submitted a job or registered a
    /// repository).
    pub async fn jti_used(&self, jti: &str) -> sqlx::Result<bool> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM oidc_jtis WHERE jti = ?1)")
            .bind(jti)
            .fetch_one(&self.read)
            .await
    }

    /// The id of the workflow token that submitted a job.
    pub async fn submit_jti(&self, id: JobId) -> sqlx::Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT submit_jti FROM jobs WHERE id = ?1")
                .bind(id.0)
                .fetch_optional(&self.read)
                .await?
                .flatten(),
        )
    }

    /// Registers a repository or replaces its settings. With `ids`, binds it to them; without,
    /// keeps the ids it is bound to. With `jti`, the token's id is recorded in the same
    /// transaction; a token seen before changes nothing: `Ok(None)`.
    pub async fn upsert_repo(
        &self,
        name: &str,
        settings: &str,
        registered_by: &str,
        ids: Option<&RepositoryIds>,
        jti: Option<(&str, i64)>,
    ) -> anyhow::Result<Option<RepoModel>> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        if let Some((jti, expires_at)) = jti
            && !record_jti(&mut tx, jti, expires_at).await?
        {
            return Ok(None);
        }
        let now = now_ms();
        let sql = format!(
            "INSERT INTO repos (name, settings, registered_by, created_at_ms, updated_at_ms,
                 repository_id, repository_owner_id)
             VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6)
             ON CONFLICT (name) DO UPDATE SET settings = excluded.settings,
                 registered_by = excluded.registered_by, updated_at_ms = excluded.updated_at_ms,
                 repository_id = coalesce(excluded.repository_id, repos.repository_id),
                 repository_owner_id = CASE WHEN excluded.repository_id IS NULL
                     THEN repos.repository_owner_id ELSE excluded.repository_owner_id END
             RETURNING {REPO_COLUMNS}"
        );
        let model = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .bind(settings)
            .bind(registered_by)
            .bind(now)
            .bind(ids.map(|ids| &ids.repository_id))
            .bind(ids.and_then(|ids| ids.repository_owner_id.as_ref()))
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(model))
    }

    /// Registers a repository unless it is registered already (a workflow's self-registration).
    /// With `jti`, the token's id is recorded in the same transaction.
    pub async fn insert_repo_if_absent(
        &self,
        name: &str,
        settings: &str,
        registered_by: &str,
        ids: &RepositoryIds,
        jti: Option<(&str, i64)>,
    ) -> anyhow::Result<FirstRegistration> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        if let Some((jti, expires_at)) = jti
            && !record_jti(&mut tx, jti, expires_at).await?
        {
            return Ok(FirstRegistration::Replayed);
        }
        let sql = format!(
            "INSERT INTO repos (name, settings, registered_by, created_at_ms, updated_at_ms,
                 repository_id, repository_owner_id)
             VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6)
             ON CONFLICT (name) DO NOTHING
             RETURNING {REPO_COLUMNS}"
        );
        let model = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .bind(settings)
            .bind(registered_by)
            .bind(now_ms())
            .bind(&ids.repository_id)
            .bind(&ids.repository_owner_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(model) = model else {
            return Ok(FirstRegistration::Exists);
        };
        tx.commit().await?;
        Ok(FirstRegistration::Created(model))
    }

    pub async fn create_site(&self, name: &str) -> sqlx::Result<Option<SiteModel>> {
        sqlx::query_as(
            "INSERT INTO sites (name, created_at_ms) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING
             RETURNING name, created_at_ms, revoked_at_ms",
        )
        .bind(name)
        .bind(now_ms())
        .fetch_optional(&mut *self.writer().await?)
        .await
    }

    pub async fn site(&self, name: &str) -> sqlx::Result<Option<SiteModel>> {
        sqlx::query_as("SELECT name, created_at_ms, revoked_at_ms FROM sites WHERE name = ?1")
            .bind(name)
            .fetch_optional(&self.read)
            .await
    }

    pub async fn sites(&self) -> sqlx::Result<Vec<SiteModel>> {
        sqlx::query_as("SELECT name, created_at_ms, revoked_at_ms FROM sites ORDER BY name")
            .fetch_all(&self.read)
            .await
    }

    /// Revokes a site: its agents are refused from their next request on, and its enrollment
    /// tokens die. False when there is no such site.
    pub async fn revoke_site(&self, name: &str) -> sqlx::Result<bool> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        let found = sqlx::query(
            "UPDATE sites SET revoked_at_ms = coalesce(revoked_at_ms, ?2) WHERE name = ?1",
        )
        .bind(name)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        sqlx::query("DELETE FROM enrollment_tokens WHERE site = ?1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(found)
    }

    pub async fn create_enrollment_token(
        &self,
        token_hash: &str,
        site: &str,
        uses: u32,
        expires_at_ms: i64,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO enrollment_tokens (token_hash, site, uses_left, expires_at_ms, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(token_hash)
        .bind(site)
        .bind(uses as i64)
        .bind(expires_at_ms)
        .bind(now_ms())
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    /// Whether an enrollment token with this hash exists (used up or expired, maybe).
    pub async fn enrollment_token_exists(&self, token_hash: &str) -> sqlx::Result<bool> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM enrollment_tokens WHERE token_hash = ?1)")
            .bind(token_hash)
            .fetch_one(&self.read)
            .await
    }

    /// Spends one use of an enrollment token and records the agent, in one transaction.
    pub async fn enroll_agent(
        &self,
        token_hash: &str,
        id: &str,
        name: &str,
        public_key: &[u8],
        policy: Option<&str>,
    ) -> anyhow::Result<Result<AgentModel, EnrollRefusal>> {
        let now = now_ms();
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        let token: Option<(String, i64, i64)> = sqlx::query_as(
            "SELECT site, uses_left, expires_at_ms FROM enrollment_tokens WHERE token_hash = ?1",
        )
        .bind(token_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((site, uses_left, expires_at_ms)) = token else {
            return Ok(Err(EnrollRefusal::UnknownToken));
        };
        if expires_at_ms <= now {
            return Ok(Err(EnrollRefusal::Expired));
        }
        if uses_left <= 0 {
            return Ok(Err(EnrollRefusal::UsedUp));
        }
        let site_revoked: Option<i64> =
            sqlx::query_scalar("SELECT revoked_at_ms FROM sites WHERE name = ?1")
                .bind(&site)
                .fetch_one(&mut *tx)
                .await?;
        if site_revoked.is_some() {
            return Ok(Err(EnrollRefusal::SiteRevoked(site)));
        }
        if enrolled_key(&mut tx, public_key).await? {
            return Ok(Err(EnrollRefusal::KeyTaken));
        }
        sqlx::query("UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE token_hash = ?1")
            .bind(token_hash)
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO agents (id, site, name, public_key, policy, enrolled_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(&site)
        .bind(name)
        .bind(public_key)
        .bind(policy)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(Err(EnrollRefusal::NameTaken {
                site,
                name: name.to_string(),
            }));
        }
        let sql = format!(
            "SELECT {AGENT_COLUMNS} FROM agents JOIN sites ON sites.name = agents.site
             WHERE agents.id = ?1"
        );
        let agent = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(agent))
    }

    pub async fn agent(&self, id: &str) -> sqlx::Result<Option<AgentModel>> {
        let sql = format!(
            "SELECT {AGENT_COLUMNS} FROM agents JOIN sites ON sites.name = agents.site
             WHERE agents.id = ?1"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.read)
            .await
    }

    pub async fn agents(&self) -> sqlx::Result<Vec<AgentModel>> {
        let sql = format!(
            "SELECT {AGENT_COLUMNS} FROM agents JOIN sites ON sites.name = agents.site
             ORDER BY agents.site, agents.name, agents.enrolled_at_ms"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.read)
            .await
    }

    /// False when there is no such agent.
    pub async fn revoke_agent(&self, id: &str) -> sqlx::Result<bool> {
        Ok(sqlx::query(
            "UPDATE agents SET revoked_at_ms = coalesce(revoked_at_ms, ?2) WHERE id = ?1",
        )
        .bind(id)
        .bind(now_ms())
        .execute(&mut *self.writer().await?)
        .await?
        .rows_affected()
            > 0)
    }

    /// Stores nonces of signed requests (see [`crate::nonces`]), in one transaction.
    pub async fn insert_nonces(&self, nonces: &[(String, String, i64)]) -> sqlx::Result<()> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        for (agent_id, nonce, expires_at_ms) in nonces {
            sqlx::query(
                "INSERT INTO agent_nonces (agent_id, nonce, expires_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
            )
            .bind(agent_id)
            .bind(nonce)
            .bind(expires_at_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Nonces whose requests are still inside the clock window.
    pub async fn live_nonces(&self, now_ms: i64) -> sqlx::Result<Vec<(String, String, i64)>> {
        sqlx::query_as(
            "SELECT agent_id, nonce, expires_at_ms FROM agent_nonces WHERE expires_at_ms >= ?1",
        )
        .bind(now_ms)
        .fetch_all(&self.read)
        .await
    }

    pub async fn prune_nonces(&self, now_ms: i64) -> sqlx::Result<u64> {
        Ok(
            sqlx::query("DELETE FROM agent_nonces WHERE expires_at_ms < ?1")
                .bind(now_ms)
                .execute(&mut *self.writer().await?)
                .await?
                .rows_affected(),
        )
    }

    /// Records what an agent's policy accepts (it may change at an agent restart) and when it
    /// was last seen.
    pub async fn agent_polled(&self, id: &str, policy: Option<&str>) -> sqlx::Result<()> {
        sqlx::query("UPDATE agents SET policy = ?2, last_seen_ms = ?3 WHERE id = ?1")
            .bind(id)
            .bind(policy)
            .bind(now_ms())
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    /// Policies of the agents that can take work now: not revoked, site not revoked.
    pub async fn active_agent_policies(
        &self,
    ) -> sqlx::Result<Vec<(String, String, Option<String>)>> {
        sqlx::query_as(
            "SELECT agents.site, agents.name, agents.policy FROM agents
             JOIN sites ON sites.name = agents.site
             WHERE agents.revoked_at_ms IS NULL AND sites.revoked_at_ms IS NULL",
        )
        .fetch_all(&self.read)
        .await
    }

    /// Removes a registration; false when there was none.
    pub async fn delete_repo(&self, name: &str) -> sqlx::Result<bool> {
        Ok(sqlx::query("DELETE FROM repos WHERE name = ?1")
            .bind(name)
            .execute(&mut *self.writer().await?)
            .await?
            .rows_affected()
            > 0)
    }

    pub async fn job(&self, id: JobId) -> sqlx::Result<Option<JobModel>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.read)
            .await
    }

    /// Newest first; `site`: only jobs labelled for that site or run by one of its agents.
    pub async fn jobs(
        &self,
        state: Option<JobState>,
        site: Option<&str>,
        limit: u32,
    ) -> sqlx::Result<Vec<JobModel>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE (?1 IS NULL OR state = ?1)
               AND (?3 IS NULL
                    OR EXISTS (SELECT 1 FROM json_each(jobs.labels) WHERE value = 'site:' || ?3)
                    OR substr(agent, 1, length(?3) + 1) = ?3 || '/')
             ORDER BY id DESC LIMIT ?2"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(state.map(|s| s.as_str()))
            .bind(limit as i64)
            .bind(site)
            .fetch_all(&self.read)
            .await
    }

    /// Claims the oldest queued job `taker` may run, under a new lease. SQL narrows the queue by
    /// what it can check cheaply (labels, registered sites, executor, operator or workflow job,
    /// jobs the agent handed back lately); routing then reads on, a page at a time, through every
    /// remaining candidate, so a backlog no agent here may take never hides a job behind it.
    /// Candidates are read outside the write lock; the claim itself re-checks that the job is
    /// still queued and, for a site with `max_concurrent_jobs`, that the site is under it.
    pub async fn claim_job(
        &self,
        taker: &JobTaker<'_>,
        lease: &str,
        lease_expires_at_ms: i64,
    ) -> anyhow::Result<Option<JobModel>> {
        let offer = taker.offer;
        let labels = serde_json::to_string(&offer.all_labels())?;
        let cap = offer
            .policy
            .as_ref()
            .and_then(|p| p.max_concurrent_jobs)
            .map(i64::from);
        let workflow_only = offer.policy.is_some().then_some(1);
        let operator_only =
            (offer.policy.is_none() && !offer.workflow_jobs_without_policy).then_some(1);
        let mut after = 0i64;
        loop {
            let sql = format!(
                "SELECT {ROUTING_COLUMNS} FROM jobs
                     WHERE state = 'queued' AND id > ?1
                       AND NOT EXISTS (
                           SELECT 1 FROM json_each(jobs.labels) AS wanted
                           WHERE wanted.value NOT IN (SELECT value FROM json_each(?2)))
                       AND (jobs.sites IS NULL
                            OR EXISTS (SELECT 1 FROM json_each(jobs.sites) WHERE value = ?3))
                       AND (json_extract(jobs.spec, '$.executor') IS NULL
                            OR json_extract(jobs.spec, '$.executor') = ?4)
                       AND (?5 IS NULL OR jobs.repository IS NOT NULL)
                       AND (?6 IS NULL OR jobs.repository IS NULL)
                       AND NOT EXISTS (
                           SELECT 1 FROM job_holds
                           WHERE job_holds.job_id = jobs.id AND job_holds.agent = ?7
                             AND job_holds.until_ms > ?8)
                     ORDER BY id LIMIT ?9"
            );
            let page: Vec<RoutingRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(after)
                .bind(&labels)
                .bind(&offer.site)
                .bind(&offer.executor)
                .bind(workflow_only)
                .bind(operator_only)
                .bind(taker.agent)
                .bind(now_ms())
                .bind(CLAIM_PAGE)
                .fetch_all(&self.read)
                .await?;
            let Some(last) = page.last() else {
                return Ok(None);
            };
            after = last.id;
            for row in page {
                let id = row.id;
                let admitted = row.routed().is_ok_and(|job| offer.admits(&job).is_ok());
                if !admitted {
                    continue;
                }
                let sql = format!(
                    "UPDATE jobs SET state = 'assigned', agent = ?1, lease = ?2,
                         lease_expires_at_ms = ?3, attempts = attempts + 1, reason = NULL
                     WHERE id = ?4 AND state = 'queued'
                       AND (?5 IS NULL OR (
                           SELECT COUNT(*) FROM jobs AS busy
                           WHERE busy.state IN ('assigned', 'running')
                             AND substr(busy.agent, 1, length(?6) + 1) = ?6 || '/') < ?5)
                     RETURNING {JOB_COLUMNS}"
                );
                let claimed: Option<JobModel> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(taker.agent)
                    .bind(lease)
                    .bind(lease_expires_at_ms)
                    .bind(id)
                    .bind(cap)
                    .bind(&offer.site)
                    .fetch_optional(&mut *self.writer().await?)
                    .await?;
                if claimed.is_some() {
                    return Ok(claimed);
                }
                if cap.is_some() && self.job_state(id).await?.as_deref() == Some("queued") {
                    return Ok(None); // The site is at its max_concurrent_jobs.
                }
                // Another agent claimed it meanwhile: read on.
            }
        }
    }

    async fn job_state(&self, id: i64) -> sqlx::Result<Option<String>> {
        sqlx::query_scalar("SELECT state FROM jobs WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.read)
            .await
    }

    /// Queued jobs after id `after`, oldest first, at most `limit`, as routing reads them.
    pub async fn queued_jobs(&self, after: i64, limit: i64) -> anyhow::Result<Vec<QueuedJob>> {
        let sql = format!(
            "SELECT {ROUTING_COLUMNS} FROM jobs
             WHERE state = 'queued' AND id > ?1 ORDER BY id LIMIT ?2"
        );
        let rows: Vec<RoutingRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(after)
            .bind(limit)
            .fetch_all(&self.read)
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok(QueuedJob {
                    id: row.id,
                    job: row.routed()?,
                })
            })
            .collect()
    }

    /// One job as routing reads it, whatever its state.
    pub async fn routed_job(&self, id: JobId) -> anyhow::Result<Option<crate::routing::RoutedJob>> {
        let sql = format!("SELECT {ROUTING_COLUMNS} FROM jobs WHERE id = ?1");
        let row: Option<RoutingRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.read)
            .await?;
        row.map(|row| row.routed()).transpose()
    }

    /// How many times a job was handed back.
    pub async fn job_releases(&self, id: JobId) -> sqlx::Result<Option<u32>> {
        let releases: Option<i64> = sqlx::query_scalar("SELECT releases FROM jobs WHERE id = ?1")
            .bind(id.0)
            .fetch_optional(&self.read)
            .await?;
        Ok(releases.map(|r| r.clamp(0, i64::from(u32::MAX)) as u32))
    }

    /// Records what an agent offered in its poll (policy summary and routing offer, both as
    /// JSON) and when it was last seen, in one statement: an agent seen polling has its offer.
    pub async fn record_offer(
        &self,
        id: &str,
        policy: Option<&str>,
        offer: &str,
    ) -> sqlx::Result<()> {
        sqlx::query("UPDATE agents SET policy = ?2, offer = ?3, last_seen_ms = ?4 WHERE id = ?1")
            .bind(id)
            .bind(policy)
            .bind(offer)
            .bind(now_ms())
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    /// The agents that can take work now (not revoked, site not revoked): `site/name`, the
    /// policy they enrolled or last polled with, and their last offer (None before a poll).
    pub async fn active_agent_offers(
        &self,
    ) -> sqlx::Result<Vec<(String, String, Option<String>, Option<String>)>> {
        sqlx::query_as(
            "SELECT agents.site, agents.name, agents.policy, agents.offer FROM agents
             JOIN sites ON sites.name = agents.site
             WHERE agents.revoked_at_ms IS NULL AND sites.revoked_at_ms IS NULL",
        )
        .fetch_all(&self.read)
        .await
    }

    /// Hands a job back from the agent holding `release.lease`: queued again (without using up
    /// an attempt) with the agent held back from it, or ended `error` when no other agent could
    /// run it or it was handed back too often.
    pub async fn release_job(
        &self,
        id: JobId,
        release: &Release<'_>,
    ) -> anyhow::Result<Result<JobModel, LeaseRefusal>> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        let releases: Option<i64> = sqlx::query_scalar(
            "SELECT releases FROM jobs
             WHERE id = ?1 AND lease = ?2 AND state IN ('assigned', 'running')",
        )
        .bind(id.0)
        .bind(release.lease)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(releases) = releases else {
            drop(tx);
            drop(conn);
            return Ok(Err(self.lease_refusal(id).await?));
        };
        let now = now_ms();
        let too_often = releases + 1 >= i64::from(release.max_releases);
        let final_reason = match release.final_reason {
            Some(reason) => Some(reason.to_string()),
            None if too_often => Some(format!(
                "{}; handed back {} times, giving up",
                release.requeue_reason,
                releases + 1
            )),
            None => None,
        };
        let sql = format!(
            "UPDATE jobs SET state = ?2, reason = ?3, lease = NULL, lease_expires_at_ms = NULL,
                 attempts = MAX(attempts - 1, 0), releases = releases + 1,
                 started_at_ms = CASE WHEN ?2 = 'queued' THEN NULL ELSE started_at_ms END,
                 finished_at_ms = ?4
             WHERE id = ?1 RETURNING {JOB_COLUMNS}"
        );
        let (state, reason, finished) = match &final_reason {
            Some(reason) => (JobState::Error, reason.clone(), Some(now)),
            None => (JobState::Queued, release.requeue_reason.to_string(), None),
        };
        let updated: JobModel = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .bind(state.as_str())
            .bind(&reason)
            .bind(finished)
            .fetch_one(&mut *tx)
            .await?;
        if state == JobState::Queued {
            sqlx::query(
                "INSERT INTO job_holds (job_id, agent, until_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (job_id, agent) DO UPDATE SET until_ms = excluded.until_ms",
            )
            .bind(id.0)
            .bind(release.agent)
            .bind(release.hold_until_ms)
            .execute(&mut *tx)
            .await?;
        }
        let line = format_line(now, Stream::System, &format!("testbot: {reason}"));
        let log_bytes = append_raw(&mut tx, id, updated.log_bytes as u64, line.as_bytes()).await?;
        tx.commit().await?;
        Ok(Ok(JobModel {
            log_bytes: log_bytes as i64,
            ..updated
        }))
    }

    /// Ends the holds that ran out before `now_ms`; returns the jobs still queued that they
    /// held back, so their agents can be woken.
    pub async fn end_holds(&self, now_ms: i64) -> sqlx::Result<Vec<JobId>> {
        let ids: Vec<i64> =
            sqlx::query_scalar("DELETE FROM job_holds WHERE until_ms <= ?1 RETURNING job_id")
                .bind(now_ms)
                .fetch_all(&mut *self.writer().await?)
                .await?;
        let mut queued = Vec::new();
        for id in ids {
            if self.job_state(id).await?.as_deref() == Some("queued") {
                queued.push(JobId(id));
            }
        }
        queued.sort();
        queued.dedup();
        Ok(queued)
    }

    /// Sets one metadata entry of a leased job.
    pub async fn set_metadata(
        &self,
        id: JobId,
        lease: &str,
        key: &str,
        value: &str,
    ) -> anyhow::Result<Result<JobModel, LeaseRefusal>> {
        let sql = format!(
            "UPDATE jobs SET metadata = json_set(coalesce(metadata, '{{}}'), '$.' || ?3, ?4)
             WHERE id = ?1 AND lease = ?2 AND state IN ('assigned', 'running')
             RETURNING {JOB_COLUMNS}"
        );
        let model = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .bind(lease)
            .bind(key)
            .bind(value)
            .fetch_optional(&mut *self.writer().await?)
            .await?;
        Ok(match model {
            Some(model) => Ok(model),
            None => Err(self.lease_refusal(id).await?),
        })
    }

    /// Marks a leased job running and renews its lease. `Ok(cancel_requested)` on success.
    pub async fn start_job(
        &self,
        id: JobId,
        lease: &str,
        lease_expires_at_ms: i64,
    ) -> sqlx::Result<Result<LeaseRenewal, LeaseRefusal>> {
        let row = sqlx::query(
            "UPDATE jobs SET state = 'running', started_at_ms = ?3, lease_expires_at_ms = ?4
             WHERE id = ?1 AND lease = ?2 AND state IN ('assigned', 'running')
             RETURNING cancel_requested, log_bytes",
        )
        .bind(id.0)
        .bind(lease)
        .bind(now_ms())
        .bind(lease_expires_at_ms)
        .fetch_optional(&mut *self.writer().await?)
        .await?;
        match row {
            Some(row) => Ok(Ok(LeaseRenewal::from_row(&row))),
            None => Ok(Err(self.lease_refusal(id).await?)),
        }
    }

    /// Renews a lease. `Ok(cancel_requested)` on success.
    pub async fn renew_lease(
        &self,
        id: JobId,
        lease: &str,
        lease_expires_at_ms: i64,
    ) -> sqlx::Result<Result<LeaseRenewal, LeaseRefusal>> {
        let row = sqlx::query(
            "UPDATE jobs SET lease_expires_at_ms = MAX(lease_expires_at_ms, ?3)
             WHERE id = ?1 AND lease = ?2 AND state IN ('assigned', 'running')
             RETURNING cancel_requested, log_bytes",
        )
        .bind(id.0)
        .bind(lease)
        .bind(lease_expires_at_ms)
        .fetch_optional(&mut *self.writer().await?)
        .await?;
        match row {
            Some(row) => Ok(Ok(LeaseRenewal::from_row(&row))),
            None => Ok(Err(self.lease_refusal(id).await?)),
        }
    }

    async fn lease_refusal(&self, id: JobId) -> sqlx::Result<LeaseRefusal> {
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = ?1")
            .bind(id.0)
            .fetch_optional(&mut *self.writer().await?)
            .await?;
        Ok(match state.map(|s| s.parse::<JobState>()) {
            None => LeaseRefusal::NoSuchJob,
            Some(Ok(state)) if state.is_terminal() => LeaseRefusal::Finished(state),
            Some(_) => LeaseRefusal::Superseded,
        })
    }

    /// Appends `data` at byte `offset` of the job's log, under `lease`. Bytes the log already
    /// holds are skipped, so a re-sent chunk is a no-op.
    ///
    /// The first chunk that would pass `max_log_bytes` is cut: its whole lines that fit are
    /// stored, then the system line `cut_notice()` words (past the limit, so that it always
    /// fits), and the job's metadata `log_truncated` says where the log was cut. That chunk and
    /// every later one answer [`AppendResult::TooLarge`].
    pub async fn append_log(
        &self,
        id: JobId,
        lease: &str,
        offset: u64,
        data: &[u8],
        max_log_bytes: u64,
        cut_notice: impl FnOnce() -> String,
    ) -> sqlx::Result<AppendResult> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        let row: Option<(Option<String>, String, i64)> =
            sqlx::query_as("SELECT lease, state, log_bytes FROM jobs WHERE id = ?1")
                .bind(id.0)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((held, state, log_bytes)) = row else {
            return Ok(AppendResult::Refused(LeaseRefusal::NoSuchJob));
        };
        let state = state.parse::<JobState>().unwrap_or(JobState::Error);
        if state.is_terminal() {
            return Ok(AppendResult::Refused(LeaseRefusal::Finished(state)));
        }
        if held.as_deref() != Some(lease) {
            return Ok(AppendResult::Refused(LeaseRefusal::Superseded));
        }
        let log_bytes = log_bytes as u64;
        if offset > log_bytes {
            return Ok(AppendResult::Gap { log_bytes });
        }
        let end = offset + data.len() as u64;
        if end <= log_bytes {
            return Ok(AppendResult::Appended(log_bytes));
        }
        let tail = &data[(log_bytes - offset) as usize..];
        if end > max_log_bytes {
            let already_cut: Option<String> = sqlx::query_scalar(
                "SELECT json_extract(metadata, '$.log_truncated') FROM jobs WHERE id = ?1",
            )
            .bind(id.0)
            .fetch_one(&mut *tx)
            .await?;
            if already_cut.is_some() {
                return Ok(AppendResult::TooLarge { log_bytes });
            }
            let room = max_log_bytes.saturating_sub(log_bytes) as usize;
            let fits = tail[..room.min(tail.len())]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |nl| nl + 1);
            let kept = append_raw(&mut tx, id, log_bytes, &tail[..fits]).await?;
            let line = format_line(
                now_ms(),
                Stream::System,
                &format!("testbot: {}", cut_notice()),
            );
            let total = append_raw(&mut tx, id, kept, line.as_bytes()).await?;
            sqlx::query(
                "UPDATE jobs SET metadata = json_set(coalesce(metadata, '{}'), '$.log_truncated', ?2)
                 WHERE id = ?1",
            )
            .bind(id.0)
            .bind(format!("at byte {kept} (the limit is {max_log_bytes} bytes)"))
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(AppendResult::TooLarge { log_bytes: total });
        }
        let total = append_raw(&mut tx, id, log_bytes, tail).await?;
        tx.commit().await?;
        Ok(AppendResult::Appended(total))
    }

    /// Records a job's one result. `Err` when the lease is no longer valid, which is how a late
    /// result from an agent that lost its lease is refused.
    pub async fn finish_job(
        &self,
        id: JobId,
        lease: &str,
        outcome: &Outcome,
    ) -> sqlx::Result<Result<JobModel, LeaseRefusal>> {
        let sql = format!(
            "UPDATE jobs SET state = ?3, reason = ?4, exit_code = ?5, signal = ?6,
                 finished_at_ms = ?7, lease = NULL, lease_expires_at_ms = NULL
             WHERE id = ?1 AND lease = ?2 AND state IN ('assigned', 'running')
             RETURNING {JOB_COLUMNS}"
        );
        let row: Option<JobModel> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .bind(lease)
            .bind(outcome.state.as_str())
            .bind(outcome.reason.as_deref())
            .bind(outcome.exit_code)
            .bind(outcome.signal)
            .bind(now_ms())
            .fetch_optional(&mut *self.writer().await?)
            .await?;
        match row {
            Some(job) => Ok(Ok(job)),
            None => Ok(Err(self.lease_refusal(id).await?)),
        }
    }

    /// Cancels a queued job at once, or asks the agent running it to stop. A finished job is
    /// left as it is. `None` if there is no such job.
    pub async fn request_cancel(&self, id: JobId) -> anyhow::Result<Option<JobModel>> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = ?1")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(state) = state.map(|s| s.parse::<JobState>().unwrap_or(JobState::Error)) else {
            return Ok(None);
        };
        match state {
            JobState::Queued => {
                let reason = "cancelled before it started";
                sqlx::query(
                    "UPDATE jobs SET state = 'cancelled', reason = ?2, finished_at_ms = ?3,
                         cancel_requested = 1
                     WHERE id = ?1",
                )
                .bind(id.0)
                .bind(reason)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
                let log_bytes: i64 = sqlx::query_scalar("SELECT log_bytes FROM jobs WHERE id = ?1")
                    .bind(id.0)
                    .fetch_one(&mut *tx)
                    .await?;
                let line = format_line(now_ms(), Stream::System, &format!("testbot: {reason}"));
                append_raw(&mut tx, id, log_bytes as u64, line.as_bytes()).await?;
            }
            JobState::Assigned | JobState::Running => {
                sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1")
                    .bind(id.0)
                    .execute(&mut *tx)
                    .await?;
            }
            _ => {}
        }
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
        let job = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(job))
    }

    /// Handles every lease that expired before `now_ms`: the job is requeued, or ends `error`
    /// after `max_attempts` claims, or `cancelled` if a user had asked for that.
    pub async fn expire_leases(
        &self,
        now_ms: i64,
        max_attempts: u32,
    ) -> anyhow::Result<Vec<ExpiredLease>> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE state IN ('assigned', 'running') AND lease_expires_at_ms < ?1"
        );
        let expired: Vec<JobModel> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(now_ms)
            .fetch_all(&mut *tx)
            .await?;
        let mut handled = Vec::with_capacity(expired.len());
        for job in expired {
            let agent = job.agent.clone().unwrap_or_else(|| "?".into());
            let attempts = job.attempts as u32;
            let (state, reason) = if job.cancel_requested {
                (
                    JobState::Cancelled,
                    format!("cancelled; agent {agent} was lost before it confirmed"),
                )
            } else if attempts >= max_attempts {
                (
                    JobState::Error,
                    format!(
                        "agent lost: agent {agent} stopped renewing its lease \
                         (attempt {attempts} of {max_attempts})"
                    ),
                )
            } else {
                (
                    JobState::Queued,
                    format!(
                        "requeued: agent {agent} stopped renewing its lease \
                         (attempt {attempts} of {max_attempts})"
                    ),
                )
            };
            let finished = state.is_terminal().then_some(now_ms);
            let sql = format!(
                "UPDATE jobs SET state = ?2, reason = ?3, lease = NULL, lease_expires_at_ms = NULL,
                     finished_at_ms = ?4
                 WHERE id = ?1 RETURNING {JOB_COLUMNS}"
            );
            let updated: JobModel = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(job.id)
                .bind(state.as_str())
                .bind(&reason)
                .bind(finished)
                .fetch_one(&mut *tx)
                .await?;
            let line = format_line(now_ms, Stream::System, &format!("testbot: {reason}"));
            append_raw(
                &mut tx,
                job.job_id(),
                updated.log_bytes as u64,
                line.as_bytes(),
            )
            .await?;
            let labels = updated.spec().map(|s| s.labels).unwrap_or_default();
            handled.push(ExpiredLease {
                job: updated,
                labels,
            });
        }
        tx.commit().await?;
        Ok(handled)
    }

    /// Gives every active lease at least until `until_ms`: after a broker restart, agents must
    /// not lose their jobs for the time the broker was down.
    pub async fn extend_active_leases(&self, until_ms: i64) -> sqlx::Result<u64> {
        let done = sqlx::query(
            "UPDATE jobs SET lease_expires_at_ms = MAX(lease_expires_at_ms, ?1)
             WHERE state IN ('assigned', 'running')",
        )
        .bind(until_ms)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected())
    }

    /// How many workflow jobs of `repository` wait in the queue.
    pub async fn queued_jobs_of_repo(&self, repository: &str) -> sqlx::Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE repository = ?1 AND state = 'queued'")
            .bind(repository)
            .fetch_one(&self.read)
            .await
    }

    /// How many workflow jobs for `site` (labelled `site:NAME`, or allowed only there) wait in
    /// the queue.
    pub async fn queued_jobs_for_site(&self, site: &str) -> sqlx::Result<i64> {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs
             WHERE state = 'queued' AND repository IS NOT NULL
               AND (EXISTS (SELECT 1 FROM json_each(jobs.labels) WHERE value = 'site:' || ?1)
                    OR jobs.sites = json_array(?1))",
        )
        .bind(site)
        .fetch_one(&self.read)
        .await
    }

    /// Deletes up to `limit` jobs that ended before `cutoff_ms`, with their logs.
    pub async fn delete_jobs_finished_before(
        &self,
        cutoff_ms: i64,
        limit: i64,
    ) -> sqlx::Result<u64> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        let ids = "SELECT id FROM jobs WHERE finished_at_ms < ?1 ORDER BY finished_at_ms LIMIT ?2";
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM log_chunks WHERE job_id IN ({ids})"
        )))
        .bind(cutoff_ms)
        .bind(limit)
        .execute(&mut *tx)
        .await?;
        let deleted = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM jobs WHERE id IN ({ids})"
        )))
        .bind(cutoff_ms)
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(deleted)
    }

    /// The OIDC token stored with a job (to hand to the agent that claims it).
    pub async fn stored_oidc_token(&self, id: JobId) -> sqlx::Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT oidc_token FROM jobs WHERE id = ?1")
                .bind(id.0)
                .fetch_optional(&self.read)
                .await?
                .flatten(),
        )
    }

    /// When the oldest queued job was created, if any job is queued.
    pub async fn oldest_queued_at(&self) -> sqlx::Result<Option<i64>> {
        sqlx::query_scalar("SELECT MIN(created_at_ms) FROM jobs WHERE state = 'queued'")
            .fetch_one(&self.read)
            .await
    }

    /// Up to about `max_bytes` of the job's log from byte `offset`.
    pub async fn read_log(
        &self,
        id: JobId,
        offset: u64,
        max_bytes: usize,
    ) -> sqlx::Result<Vec<u8>> {
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT start_offset, data FROM log_chunks
             WHERE job_id = ?1 AND start_offset >= COALESCE(
                 (SELECT MAX(start_offset) FROM log_chunks WHERE job_id = ?1 AND start_offset <= ?2), 0)
             ORDER BY start_offset LIMIT 256",
        )
        .bind(id.0)
        .bind(offset as i64)
        .fetch_all(&self.read)
        .await?;
        let mut out = Vec::new();
        for (start, data) in rows {
            let start = start as u64;
            let end = start + data.len() as u64;
            if end <= offset {
                continue;
            }
            let skip = offset.saturating_sub(start) as usize;
            out.extend_from_slice(&data[skip..]);
            if out.len() >= max_bytes {
                break;
            }
        }
        Ok(out)
    }
}

/// Appends bytes at the end of a job's log (which holds `log_bytes` bytes); returns the new size.
async fn append_raw(
    tx: &mut Transaction<'_, Sqlite>,
    id: JobId,
    log_bytes: u64,
    data: &[u8],
) -> sqlx::Result<u64> {
    sqlx::query("INSERT INTO log_chunks (job_id, start_offset, data) VALUES (?1, ?2, ?3)")
        .bind(id.0)
        .bind(log_bytes as i64)
        .bind(data)
        .execute(&mut **tx)
        .await?;
    let total = log_bytes + data.len() as u64;
    sqlx::query("UPDATE jobs SET log_bytes = ?2 WHERE id = ?1")
        .bind(id.0)
        .bind(total as i64)
        .execute(&mut **tx)
        .await?;
    Ok(total)
}
