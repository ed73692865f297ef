//! The PostgreSQL store: one database shared by several brokers.
//!
//! Every broker may take every request, so what SQLite gets from its single writer is spelled
//! out here: a job's row is locked (`FOR UPDATE`) before a change that reads it first, a claim
//! takes its job with `FOR UPDATE SKIP LOCKED` (brokers claiming at once never wait on each other
//! or take one job twice), and a site's `max_concurrent_jobs` is counted under a lock on the
//! site. One broker at a time sweeps: the one holding a session-level advisory lock.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection as _, PgConnection, Postgres, Transaction};
use testbot_proto::batches::BatchId;
use testbot_proto::jobs::{JobId, JobSpec, JobState};
use testbot_proto::now_ms;
use testbot_proto::results::{FailureCause, Outcome};

use super::{
    AgentModel, AgentOffer, ApiTokenModel, AppendPlan, AppendResult, BatchModel, EnrollRefusal,
    FirstRegistration, JobModel, JobOrigin, JobTaker, LeaseRefusal, LeaseRenewal, LogCut, LogRow,
    QueuedJob, Release, RepoModel, RepositoryIds, RoutingRow, SiteModel, Store, StoreResult,
    StoredJob, Transition, check_migrations, plan_append,
};

/// The PostgreSQL schema's migrations, applied at start-up. sqlx's migrator holds an advisory
/// lock on the database while it runs, so brokers starting at once apply each migration once.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections each broker keeps to the database (besides the sweeper's).
const POOL_CONNECTIONS: u32 = 16;

/// How long connecting, or waiting for a free connection, may take before the request fails
/// as [`StoreError::Unavailable`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the sweeper's connection may take to answer before it counts as lost.
const SWEEPER_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// The session-level advisory lock the sweeping broker holds ("testbot" and 1).
const SWEEPER_LOCK: i64 = 0x7465_7374_626f_7401;

// The key spaces of transaction-level advisory locks, each taken with a second key (PostgreSQL
// keeps two-key locks apart from one-key ones such as `SWEEPER_LOCK`).
/// A site's claims (second key: the site name's hash), while one counts the site's busy jobs
/// against its cap.
const SITE_CLAIMS_LOCK_SPACE: i32 = 0x7462_0001;
/// Enrollment (second key: 0), one at a time: each checks that no agent has its key before
/// adding one.
const ENROLLMENT_LOCK_SPACE: i32 = 0x7462_0002;

/// How many queued jobs a claim reads at a time while looking for one its agent may take; it
/// reads on through the whole queue, a page at a time.
const CLAIM_PAGE: i64 = 256;

mod bisections;
mod github;
mod test_results;

/// The columns of [`JobModel`], in its field order.
const JOB_COLUMNS: &str = "id, spec, state, reason, exit_code, signal, attempts, agent, lease, \
     lease_expires_at_ms, cancel_requested, log_bytes, created_at_ms, started_at_ms, finished_at_ms, \
     repository, run_id, submitted_by, oidc_token, metadata::text AS metadata, secret_env, public, cause, batch_id, \
     batch_run, batch_runs, commit_sha, git_ref, job_name";

/// The columns of [`RepoModel`], in its field order.
const REPO_COLUMNS: &str = "name, settings, registered_by, created_at_ms, updated_at_ms, \
     repository_id, repository_owner_id";

/// The columns of [`RoutingRow`]: an App job's provenance looked up only for App jobs
/// (`submitted_by` is `APP_SUBMITTER`), so that the claims of every other job do not pay for it.
const ROUTING_COLUMNS: &str = "id, spec, sites::text AS sites, repository, oidc_token, \
     CASE WHEN submitted_by = 'github-app' THEN \
         (SELECT provenance FROM github_jobs g WHERE g.job_id = jobs.id) END AS provenance, \
     priority";

const AGENT_COLUMNS: &str = "agents.id, agents.site, agents.name, agents.public_key, agents.policy, \
     agents.enrolled_at_ms, agents.last_seen_ms, agents.revoked_at_ms, \
     sites.revoked_at_ms AS site_revoked_at_ms";

/// The sweeper's own connection, and whether it holds [`SWEEPER_LOCK`]. The lock lives as long
/// as the connection's session: when the broker stops or loses the connection, another takes it.
struct SweeperSession {
    conn: PgConnection,
    leading: bool,
}

/// The PostgreSQL store.
pub struct PgStore {
    pool: PgPool,
    options: PgConnectOptions,
    sweeper: tokio::sync::Mutex<Option<SweeperSession>>,
}

/// The database's URL as it may be shown: without the password.
fn shown_url(options: &PgConnectOptions) -> String {
    let host = match options.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    };
    let database = options.get_database().unwrap_or(options.get_username());
    format!("postgres://{}@{host}/{database}", options.get_username())
}

/// Connects once, failing after [`CONNECT_TIMEOUT`].
async fn connect(options: &PgConnectOptions) -> sqlx::Result<PgConnection> {
    tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options))
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {CONNECT_TIMEOUT:?}"),
            )))
        })
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://USER:PASSWORD@HOST:PORT/DATABASE`) and
    /// brings its schema up to date.
    pub async fn open(url: &str) -> anyhow::Result<PgStore> {
        // The URL may hold a password: errors name the database without it.
        let mut options = PgConnectOptions::from_str(url).map_err(|err| {
            anyhow::anyhow!(
                "--database-url is not a valid PostgreSQL URL \
                 (postgres://USER:PASSWORD@HOST:PORT/DATABASE): {err}"
            )
        })?;
        if options.get_application_name().is_none() {
            options = options.application_name("testbot-broker");
        }
        let shown = shown_url(&options);
        let mut conn = connect(&options)
            .await
            .map_err(|err| match err {
                // Its message is all there is to say (sqlx's wrapper would say it twice).
                sqlx::Error::Io(err) => anyhow::Error::new(err),
                sqlx::Error::Database(err) => anyhow::anyhow!("{}", err.message()),
                err => anyhow::Error::new(err),
            })
            .with_context(|| format!("Cannot connect to PostgreSQL at {shown}"))?;
        MIGRATOR
            .run(&mut conn)
            .await
            .with_context(|| format!("Cannot migrate the database at {shown}"))?;
        conn.close()
            .await
            .with_context(|| format!("Cannot connect to PostgreSQL at {shown}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_CONNECTIONS)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options.clone())
            .await
            .with_context(|| format!("Cannot connect to PostgreSQL at {shown}"))?;
        Ok(PgStore {
            pool,
            options,
            sweeper: tokio::sync::Mutex::new(None),
        })
    }

    async fn lease_refusal(&self, id: JobId) -> sqlx::Result<LeaseRefusal> {
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match state.map(|s| s.parse::<JobState>()) {
            None => LeaseRefusal::NoSuchJob,
            Some(Ok(state)) if state.is_terminal() => LeaseRefusal::Finished(state),
            Some(_) => LeaseRefusal::Superseded,
        })
    }
}

/// Inserts a queued job; `batch`: its batch, run and the batch's size.
async fn insert_job_row(
    tx: &mut sqlx::PgConnection,
    spec: &JobSpec,
    stored: &StoredJob,
    origin: &JobOrigin,
    jti: Option<&str>,
    batch: Option<(i64, u32, u32)>,
) -> Result<JobModel, sqlx::Error> {
    let sql = format!(
        "INSERT INTO jobs (spec, labels, executor, state, created_at_ms, repository, run_id,
             submitted_by, oidc_token, sites, submit_jti, secret_env, public, batch_id,
             batch_run, batch_runs, commit_sha, git_ref, job_name, priority)
         VALUES ($1, $2::jsonb, $3, 'queued', $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12,
             $13, $14, $15, $16, $17, $18, $19)
         RETURNING {JOB_COLUMNS}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&stored.spec)
        .bind(&stored.labels)
        .bind(&spec.executor)
        .bind(now_ms())
        .bind(&origin.repository)
        .bind(&origin.run_id)
        .bind(&origin.submitted_by)
        .bind(&origin.oidc_token)
        .bind(&stored.sites)
        .bind(jti)
        .bind(&stored.secret_env)
        .bind(origin.public)
        .bind(batch.map(|b| b.0))
        .bind(batch.map(|b| i64::from(b.1)))
        .bind(batch.map(|b| i64::from(b.2)))
        .bind(&origin.commit_sha)
        .bind(&origin.git_ref)
        .bind(&stored.name)
        .bind(crate::store::Priority::stored(origin, batch))
        .fetch_one(tx)
        .await
}

/// A batch's row, for `runs` runs of `origin`'s job, with its stopping rule (JSON).
async fn insert_batch_row(
    tx: &mut sqlx::PgConnection,
    runs: u32,
    origin: &JobOrigin,
    until: Option<&str>,
) -> Result<BatchModel, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO batches (runs, created_at_ms, submitted_by, repository, until)
         VALUES ($1, $2, $3, $4, $5)
         RETURNING id, runs, created_at_ms, submitted_by, repository, until",
    )
    .bind(i64::from(runs))
    .bind(now_ms())
    .bind(&origin.submitted_by)
    .bind(&origin.repository)
    .bind(until)
    .fetch_one(tx)
    .await
}

/// Records a token id inside `tx`; false if it is there already.
async fn record_jti(
    tx: &mut Transaction<'_, Postgres>,
    jti: &str,
    expires_at: i64,
) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO oidc_jtis (jti, expires_at) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING",
    )
    .bind(jti)
    .bind(expires_at)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Appends bytes at the end of a job's log (which holds `log_bytes` bytes); returns the new size.
/// Nothing to append stores no chunk: an empty one would take the offset of the next.
async fn append_raw(
    tx: &mut Transaction<'_, Postgres>,
    id: JobId,
    log_bytes: u64,
    data: &[u8],
) -> sqlx::Result<u64> {
    if data.is_empty() {
        return Ok(log_bytes);
    }
    let total = log_bytes + data.len() as u64;
    sqlx::query(
        "WITH chunk AS (
             INSERT INTO log_chunks (job_id, start_offset, data) VALUES ($1, $2, $3))
         UPDATE jobs SET log_bytes = $4 WHERE id = $1",
    )
    .bind(id.0)
    .bind(log_bytes as i64)
    .bind(data)
    .bind(total as i64)
    .execute(&mut **tx)
    .await?;
    Ok(total)
}

fn renewal((cancel_requested, log_bytes): (bool, i64)) -> LeaseRenewal {
    LeaseRenewal {
        cancel_requested,
        log_bytes: log_bytes as u64,
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn shared(&self) -> bool {
        true
    }

    async fn close(&self) {
        // Held while the pool closes, so that no sweep opens a new session meanwhile.
        let mut sweeper = self.sweeper.lock().await;
        if let Some(session) = sweeper.take() {
            // Ending the session releases the sweeper's lock at once.
            let _ = session.conn.close().await;
        }
        self.pool.close().await;
    }

    async fn health(&self) -> StoreResult<()> {
        // Answering this also shows that the database answers.
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await?;
        check_migrations(&MIGRATOR, applied)
    }

    async fn api_tokens(&self) -> StoreResult<Vec<ApiTokenModel>> {
        Ok(
            sqlx::query_as("SELECT token_hash, role, name FROM api_tokens")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn upsert_api_token(&self, hash: &str, role: &str, name: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_tokens (token_hash, role, name, created_at_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (token_hash) DO UPDATE SET role = excluded.role, name = excluded.name",
        )
        .bind(hash)
        .bind(role)
        .bind(name)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn retire_api_tokens(&self, role: &str, name: &str, keep: &str) -> StoreResult<u64> {
        Ok(
            sqlx::query(
                "DELETE FROM api_tokens WHERE role = $1 AND name = $2 AND token_hash <> $3",
            )
            .bind(role)
            .bind(name)
            .bind(keep)
            .execute(&self.pool)
            .await?
            .rows_affected(),
        )
    }

    async fn use_jti(&self, jti: &str, expires_at: i64) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let fresh = record_jti(&mut tx, jti, expires_at).await?;
        tx.commit().await?;
        Ok(fresh)
    }

    async fn jti_used(&self, jti: &str) -> StoreResult<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM oidc_jtis WHERE jti = $1)")
                .bind(jti)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn prune_jtis(&self, now_secs: i64) -> StoreResult<u64> {
        Ok(sqlx::query("DELETE FROM oidc_jtis WHERE expires_at < $1")
            .bind(now_secs)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn repo(&self, name: &str) -> StoreResult<Option<RepoModel>> {
        let sql = format!("SELECT {REPO_COLUMNS} FROM repos WHERE name = $1");
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn repos(&self) -> StoreResult<Vec<RepoModel>> {
        let sql = format!("SELECT {REPO_COLUMNS} FROM repos ORDER BY name");
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?)
    }

    async fn bind_repo_ids(
        &self,
        name: &str,
        ids: &RepositoryIds,
    ) -> StoreResult<Option<RepositoryIds>> {
        let row: Option<(String, Option<String>)> = sqlx::query_as(
            "UPDATE repos SET repository_id = coalesce(repository_id, $2),
                 repository_owner_id = CASE WHEN repository_id IS NULL THEN $3
                                            ELSE repository_owner_id END
             WHERE name = $1
             RETURNING repository_id, repository_owner_id",
        )
        .bind(name)
        .bind(&ids.repository_id)
        .bind(&ids.repository_owner_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map(|(repository_id, repository_owner_id)| RepositoryIds {
                repository_id,
                repository_owner_id,
            }),
        )
    }

    async fn upsert_repo(
        &self,
        name: &str,
        settings: &str,
        registered_by: &str,
        ids: Option<&RepositoryIds>,
        jti: Option<(&str, i64)>,
    ) -> StoreResult<Option<RepoModel>> {
        let mut tx = self.pool.begin().await?;
        if let Some((jti, expires_at)) = jti
            && !record_jti(&mut tx, jti, expires_at).await?
        {
            return Ok(None);
        }
        let sql = format!(
            "INSERT INTO repos (name, settings, registered_by, created_at_ms, updated_at_ms,
                 repository_id, repository_owner_id)
             VALUES ($1, $2, $3, $4, $4, $5, $6)
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
            .bind(now_ms())
            .bind(ids.map(|ids| &ids.repository_id))
            .bind(ids.and_then(|ids| ids.repository_owner_id.as_ref()))
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(model))
    }

    async fn insert_repo_if_absent(
        &self,
        name: &str,
        settings: &str,
        registered_by: &str,
        ids: &RepositoryIds,
        jti: Option<(&str, i64)>,
    ) -> StoreResult<FirstRegistration> {
        let mut tx = self.pool.begin().await?;
        if let Some((jti, expires_at)) = jti
            && !record_jti(&mut tx, jti, expires_at).await?
        {
            return Ok(FirstRegistration::Replayed);
        }
        let sql = format!(
            "INSERT INTO repos (name, settings, registered_by, created_at_ms, updated_at_ms,
                 repository_id, repository_owner_id)
             VALUES ($1, $2, $3, $4, $4, $5, $6)
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
        // Registered already: the token is not spent (the transaction is rolled back).
        let Some(model) = model else {
            return Ok(FirstRegistration::Exists);
        };
        tx.commit().await?;
        Ok(FirstRegistration::Created(model))
    }

    async fn delete_repo(&self, name: &str) -> StoreResult<bool> {
        Ok(sqlx::query("DELETE FROM repos WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?
            .rows_affected()
            > 0)
    }

    async fn create_site(&self, name: &str) -> StoreResult<Option<SiteModel>> {
        Ok(sqlx::query_as(
            "INSERT INTO sites (name, created_at_ms) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING
             RETURNING name, created_at_ms, revoked_at_ms",
        )
        .bind(name)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn site(&self, name: &str) -> StoreResult<Option<SiteModel>> {
        Ok(
            sqlx::query_as("SELECT name, created_at_ms, revoked_at_ms FROM sites WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn sites(&self) -> StoreResult<Vec<SiteModel>> {
        Ok(
            sqlx::query_as("SELECT name, created_at_ms, revoked_at_ms FROM sites ORDER BY name")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn revoke_site(&self, name: &str) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        // Not while an enrollment into the site is half done.
        sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
            .bind(ENROLLMENT_LOCK_SPACE)
            .execute(&mut *tx)
            .await?;
        let found = sqlx::query(
            "UPDATE sites SET revoked_at_ms = coalesce(revoked_at_ms, $2) WHERE name = $1",
        )
        .bind(name)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        sqlx::query("DELETE FROM enrollment_tokens WHERE site = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(found)
    }

    async fn create_enrollment_token(
        &self,
        token_hash: &str,
        site: &str,
        uses: u32,
        expires_at_ms: i64,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO enrollment_tokens (token_hash, site, uses_left, expires_at_ms, created_at_ms)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token_hash)
        .bind(site)
        .bind(i64::from(uses))
        .bind(expires_at_ms)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn enrollment_token_exists(&self, token_hash: &str) -> StoreResult<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM enrollment_tokens WHERE token_hash = $1)",
        )
        .bind(token_hash)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn enroll_agent(
        &self,
        token_hash: &str,
        id: &str,
        name: &str,
        public_key: &[u8],
        policy: Option<&str>,
    ) -> StoreResult<Result<AgentModel, EnrollRefusal>> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        // One enrollment at a time: each spends a use of its token and checks that no agent has
        // its key, which two at once could both pass.
        sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
            .bind(ENROLLMENT_LOCK_SPACE)
            .execute(&mut *tx)
            .await?;
        let token: Option<(String, i64, i64)> = sqlx::query_as(
            "SELECT site, uses_left, expires_at_ms FROM enrollment_tokens WHERE token_hash = $1",
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
            sqlx::query_scalar("SELECT revoked_at_ms FROM sites WHERE name = $1")
                .bind(&site)
                .fetch_one(&mut *tx)
                .await?;
        if site_revoked.is_some() {
            return Ok(Err(EnrollRefusal::SiteRevoked(site)));
        }
        let key_taken: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM agents WHERE public_key = $1)")
                .bind(public_key)
                .fetch_one(&mut *tx)
                .await?;
        if key_taken {
            return Ok(Err(EnrollRefusal::KeyTaken));
        }
        sqlx::query("UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO agents (id, site, name, public_key, policy, enrolled_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
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
             WHERE agents.id = $1"
        );
        let agent = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(agent))
    }

    async fn agent(&self, id: &str) -> StoreResult<Option<AgentModel>> {
        let sql = format!(
            "SELECT {AGENT_COLUMNS} FROM agents JOIN sites ON sites.name = agents.site
             WHERE agents.id = $1"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn agents(&self) -> StoreResult<Vec<AgentModel>> {
        let sql = format!(
            "SELECT {AGENT_COLUMNS} FROM agents JOIN sites ON sites.name = agents.site
             ORDER BY agents.site, agents.name, agents.enrolled_at_ms"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?)
    }

    async fn revoke_agent(&self, id: &str) -> StoreResult<bool> {
        Ok(sqlx::query(
            "UPDATE agents SET revoked_at_ms = coalesce(revoked_at_ms, $2) WHERE id = $1",
        )
        .bind(id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    async fn record_offer(&self, id: &str, policy: Option<&str>, offer: &str) -> StoreResult<()> {
        sqlx::query("UPDATE agents SET policy = $2, offer = $3, last_seen_ms = $4 WHERE id = $1")
            .bind(id)
            .bind(policy)
            .bind(offer)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn active_agent_offers(&self) -> StoreResult<Vec<AgentOffer>> {
        Ok(sqlx::query_as(
            "SELECT agents.site, agents.name, agents.policy, agents.offer FROM agents
             JOIN sites ON sites.name = agents.site
             WHERE agents.revoked_at_ms IS NULL AND sites.revoked_at_ms IS NULL",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn use_nonce(
        &self,
        agent_id: &str,
        nonce: &str,
        expires_at_ms: i64,
    ) -> StoreResult<bool> {
        let inserted = sqlx::query(
            "INSERT INTO agent_nonces (agent_id, nonce, expires_at_ms) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(agent_id)
        .bind(nonce)
        .bind(expires_at_ms)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    async fn insert_nonces(&self, nonces: &[(String, String, i64)]) -> StoreResult<()> {
        let agents: Vec<&str> = nonces.iter().map(|(agent, _, _)| agent.as_str()).collect();
        let values: Vec<&str> = nonces.iter().map(|(_, nonce, _)| nonce.as_str()).collect();
        let expiries: Vec<i64> = nonces.iter().map(|(_, _, expires)| *expires).collect();
        sqlx::query(
            "INSERT INTO agent_nonces (agent_id, nonce, expires_at_ms)
             SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
             ON CONFLICT DO NOTHING",
        )
        .bind(agents)
        .bind(values)
        .bind(expiries)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn live_nonces(&self, now_ms: i64) -> StoreResult<Vec<(String, String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT agent_id, nonce, expires_at_ms FROM agent_nonces WHERE expires_at_ms >= $1",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn prune_nonces(&self, now_ms: i64) -> StoreResult<u64> {
        Ok(
            sqlx::query("DELETE FROM agent_nonces WHERE expires_at_ms < $1")
                .bind(now_ms)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    async fn insert_job(
        &self,
        spec: &JobSpec,
        origin: &JobOrigin,
        jti: Option<(&str, i64)>,
    ) -> StoreResult<Option<JobModel>> {
        let stored = StoredJob::new(spec, origin)?;
        let mut tx = self.pool.begin().await?;
        if let Some((jti, expires_at)) = jti
            && !record_jti(&mut tx, jti, expires_at).await?
        {
            return Ok(None);
        }
        let model = insert_job_row(
            &mut tx,
            spec,
            &stored,
            origin,
            jti.map(|(jti, _)| jti),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(Some(model))
    }

    async fn insert_batch(
        &self,
        spec: &JobSpec,
        origin: &JobOrigin,
        jti: Option<(&str, i64)>,
        runs: u32,
        until: Option<testbot_proto::batches::Until>,
    ) -> StoreResult<Option<(BatchModel, Vec<JobModel>)>> {
        let stored = StoredJob::new(spec, origin)?;
        let until = until.map(|u| serde_json::to_string(&u)).transpose()?;
        let mut tx = self.pool.begin().await?;
        if let Some((jti, expires_at)) = jti
            && !record_jti(&mut tx, jti, expires_at).await?
        {
            return Ok(None);
        }
        let batch = insert_batch_row(&mut tx, runs, origin, until.as_deref()).await?;
        let mut jobs = Vec::with_capacity(runs as usize);
        for run in 1..=runs {
            jobs.push(
                insert_job_row(
                    &mut tx,
                    spec,
                    &stored,
                    origin,
                    jti.map(|(jti, _)| jti),
                    Some((batch.id, run, runs)),
                )
                .await?,
            );
        }
        tx.commit().await?;
        Ok(Some((batch, jobs)))
    }

    async fn batch(&self, id: BatchId) -> StoreResult<Option<BatchModel>> {
        Ok(sqlx::query_as(
            "SELECT id, runs, created_at_ms, submitted_by, repository, until FROM batches
             WHERE id = $1",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn batch_jobs(&self, id: BatchId) -> StoreResult<Vec<JobModel>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE batch_id = $1 ORDER BY batch_run");
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn job(&self, id: JobId) -> StoreResult<Option<JobModel>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn jobs(
        &self,
        state: Option<JobState>,
        site: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<JobModel>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE ($1::text IS NULL OR state = $1)
               AND ($3::text IS NULL
                    OR labels @> jsonb_build_array('site:' || $3)
                    OR starts_with(agent, $3 || '/'))
             ORDER BY id DESC LIMIT $2"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(state.map(|s| s.as_str()))
            .bind(i64::from(limit))
            .bind(site)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn submit_jti(&self, id: JobId) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT submit_jti FROM jobs WHERE id = $1")
                .bind(id.0)
                .fetch_optional(&self.pool)
                .await?
                .flatten(),
        )
    }

    async fn stored_oidc_token(&self, id: JobId) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT oidc_token FROM jobs WHERE id = $1")
                .bind(id.0)
                .fetch_optional(&self.pool)
                .await?
                .flatten(),
        )
    }

    async fn claim_job(
        &self,
        taker: &JobTaker<'_>,
        lease: &str,
        lease_expires_at_ms: i64,
    ) -> StoreResult<Option<JobModel>> {
        let offer = taker.offer;
        let labels = serde_json::to_string(&offer.all_labels())?;
        let cap = offer
            .policy
            .as_ref()
            .and_then(|p| p.max_concurrent_jobs)
            .map(i64::from);
        let workflow_only = offer.policy.is_some();
        let operator_only = offer.policy.is_none() && !offer.workflow_jobs_without_policy;
        let candidates = format!(
            "SELECT {ROUTING_COLUMNS} FROM jobs
             WHERE state = 'queued' AND (priority, id) > ($10, $1)
               AND labels <@ $2::jsonb
               AND (sites IS NULL OR sites @> jsonb_build_array($3::text))
               AND (executor IS NULL OR executor = $4)
               AND (NOT $5 OR repository IS NOT NULL)
               AND (NOT $6 OR repository IS NULL)
               AND NOT EXISTS (
                   SELECT 1 FROM job_holds
                   WHERE job_holds.job_id = jobs.id AND job_holds.agent = $7
                     AND job_holds.until_ms > $8)
             ORDER BY priority, id LIMIT $9"
        );
        // The oldest of the admitted candidates that is still queued, not held back from this
        // agent and not being claimed by another broker this instant (a row another claim
        // has locked is skipped, never waited on).
        let take = format!(
            "UPDATE jobs SET state = 'assigned', agent = $1, lease = $2, lease_expires_at_ms = $3,
                 attempts = attempts + 1, reason = NULL
             WHERE id = (
                 SELECT candidate.id FROM jobs AS candidate
                 WHERE candidate.id = ANY($4) AND candidate.state = 'queued'
                   AND NOT EXISTS (
                       SELECT 1 FROM job_holds
                       WHERE job_holds.job_id = candidate.id AND job_holds.agent = $1
                         AND job_holds.until_ms > $5)
                 ORDER BY candidate.priority, candidate.id LIMIT 1
                 FOR UPDATE SKIP LOCKED)
             RETURNING {JOB_COLUMNS}"
        );
        // Where the next page starts in the queue's order: after this (priority, id).
        let mut after = (i64::MIN, 0i64);
        loop {
            let now = now_ms();
            let page: Vec<RoutingRow> = sqlx::query_as(sqlx::AssertSqlSafe(candidates.as_str()))
                .bind(after.1)
                .bind(&labels)
                .bind(&offer.site)
                .bind(&offer.executor)
                .bind(workflow_only)
                .bind(operator_only)
                .bind(taker.agent)
                .bind(now)
                .bind(CLAIM_PAGE)
                .bind(after.0)
                .fetch_all(&self.pool)
                .await?;
            let Some(last) = page.last() else {
                return Ok(None);
            };
            after = (last.priority, last.id);
            let admitted: Vec<i64> = page
                .iter()
                .filter(|row| row.routed().is_ok_and(|job| offer.admits(&job).is_ok()))
                .map(|row| row.id)
                .collect();
            if admitted.is_empty() {
                continue;
            }
            let mut tx = self.pool.begin().await?;
            if let Some(cap) = cap {
                // Claims for the site wait for each other from here to their commit, so two
                // brokers cannot both count the site under its cap and both claim.
                sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
                    .bind(SITE_CLAIMS_LOCK_SPACE)
                    .bind(&offer.site)
                    .execute(&mut *tx)
                    .await?;
                let busy: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM jobs
                     WHERE state IN ('assigned', 'running') AND starts_with(agent, $1 || '/')",
                )
                .bind(&offer.site)
                .fetch_one(&mut *tx)
                .await?;
                if busy >= cap {
                    return Ok(None); // The site is at its max_concurrent_jobs.
                }
            }
            let claimed: Option<JobModel> = sqlx::query_as(sqlx::AssertSqlSafe(take.as_str()))
                .bind(taker.agent)
                .bind(lease)
                .bind(lease_expires_at_ms)
                .bind(&admitted)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
            if claimed.is_some() {
                tx.commit().await?;
                return Ok(claimed);
            }
            // Other agents claimed them meanwhile: read on.
        }
    }

    async fn queued_jobs(&self, after: i64, limit: i64) -> StoreResult<Vec<QueuedJob>> {
        let sql = format!(
            "SELECT {ROUTING_COLUMNS} FROM jobs
             WHERE state = 'queued' AND id > $1 ORDER BY id LIMIT $2"
        );
        let rows: Vec<RoutingRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
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

    async fn routed_job(&self, id: JobId) -> StoreResult<Option<crate::routing::RoutedJob>> {
        let sql = format!("SELECT {ROUTING_COLUMNS} FROM jobs WHERE id = $1");
        let row: Option<RoutingRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| row.routed()).transpose()?)
    }

    async fn job_releases(&self, id: JobId) -> StoreResult<Option<u32>> {
        let releases: Option<i64> = sqlx::query_scalar("SELECT releases FROM jobs WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        Ok(releases.map(|r| r.clamp(0, i64::from(u32::MAX)) as u32))
    }

    async fn release_job(
        &self,
        id: JobId,
        release: &Release<'_>,
        decide: &(dyn Fn(u32) -> Transition + Send + Sync),
    ) -> StoreResult<Result<JobModel, LeaseRefusal>> {
        let mut tx = self.pool.begin().await?;
        let releases: Option<i64> = sqlx::query_scalar(
            "SELECT releases FROM jobs
             WHERE id = $1 AND lease = $2 AND state IN ('assigned', 'running')
             FOR UPDATE",
        )
        .bind(id.0)
        .bind(release.lease)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(releases) = releases else {
            drop(tx);
            return Ok(Err(self.lease_refusal(id).await?));
        };
        let to = decide(releases.clamp(0, i64::from(u32::MAX)) as u32);
        let sql = format!(
            "UPDATE jobs SET state = $2, reason = $3, lease = NULL, lease_expires_at_ms = NULL,
                 attempts = GREATEST(attempts - 1, 0), releases = releases + 1,
                 started_at_ms = CASE WHEN $2 = 'queued' THEN NULL ELSE started_at_ms END,
                 finished_at_ms = $4, cause = $5
             WHERE id = $1 RETURNING {JOB_COLUMNS}"
        );
        let updated: JobModel = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .bind(to.state.as_str())
            .bind(&to.reason)
            .bind(to.state.is_terminal().then(now_ms))
            .bind(to.cause.map(FailureCause::as_str))
            .fetch_one(&mut *tx)
            .await?;
        if to.state == JobState::Queued {
            sqlx::query(
                "INSERT INTO job_holds (job_id, agent, until_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (job_id, agent) DO UPDATE SET until_ms = excluded.until_ms",
            )
            .bind(id.0)
            .bind(release.agent)
            .bind(release.hold_until_ms)
            .execute(&mut *tx)
            .await?;
        }
        let log_bytes = append_raw(
            &mut tx,
            id,
            updated.log_bytes as u64,
            to.log_line.as_bytes(),
        )
        .await?;
        tx.commit().await?;
        Ok(Ok(JobModel {
            log_bytes: log_bytes as i64,
            ..updated
        }))
    }

    async fn end_holds(&self, now_ms: i64) -> StoreResult<Vec<JobId>> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "WITH ended AS (DELETE FROM job_holds WHERE until_ms <= $1 RETURNING job_id)
             SELECT DISTINCT jobs.id FROM ended JOIN jobs ON jobs.id = ended.job_id
             WHERE jobs.state = 'queued' ORDER BY jobs.id",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(JobId).collect())
    }

    async fn set_metadata(
        &self,
        id: JobId,
        lease: &str,
        key: &str,
        value: &str,
    ) -> StoreResult<Result<JobModel, LeaseRefusal>> {
        let sql = format!(
            "UPDATE jobs SET metadata = coalesce(metadata, '{{}}') || jsonb_build_object($3::text, $4::text)
             WHERE id = $1 AND lease = $2 AND state IN ('assigned', 'running')
             RETURNING {JOB_COLUMNS}"
        );
        let model = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .bind(lease)
            .bind(key)
            .bind(value)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match model {
            Some(model) => Ok(model),
            None => Err(self.lease_refusal(id).await?),
        })
    }

    async fn start_job(
        &self,
        id: JobId,
        lease: &str,
        lease_expires_at_ms: i64,
    ) -> StoreResult<Result<LeaseRenewal, LeaseRefusal>> {
        let row: Option<(bool, i64)> = sqlx::query_as(
            "UPDATE jobs SET state = 'running', started_at_ms = $3, lease_expires_at_ms = $4
             WHERE id = $1 AND lease = $2 AND state IN ('assigned', 'running')
             RETURNING cancel_requested, log_bytes",
        )
        .bind(id.0)
        .bind(lease)
        .bind(now_ms())
        .bind(lease_expires_at_ms)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Ok(renewal(row))),
            None => Ok(Err(self.lease_refusal(id).await?)),
        }
    }

    async fn renew_lease(
        &self,
        id: JobId,
        lease: &str,
        lease_expires_at_ms: i64,
    ) -> StoreResult<Result<LeaseRenewal, LeaseRefusal>> {
        let row: Option<(bool, i64)> = sqlx::query_as(
            "UPDATE jobs SET lease_expires_at_ms = GREATEST(lease_expires_at_ms, $3)
             WHERE id = $1 AND lease = $2 AND state IN ('assigned', 'running')
             RETURNING cancel_requested, log_bytes",
        )
        .bind(id.0)
        .bind(lease)
        .bind(lease_expires_at_ms)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Ok(renewal(row))),
            None => Ok(Err(self.lease_refusal(id).await?)),
        }
    }

    async fn append_log(
        &self,
        id: JobId,
        lease: &str,
        offset: u64,
        data: &[u8],
        max_log_bytes: u64,
        cut: &(dyn Fn(u64) -> LogCut + Send + Sync),
    ) -> StoreResult<AppendResult> {
        let mut tx = self.pool.begin().await?;
        // Locked: a chunk re-sent to another broker meanwhile waits, then finds it stored.
        let row: Option<(Option<String>, String, i64, bool)> = sqlx::query_as(
            // Locked: a chunk re-sent to another broker meanwhile waits, then finds it stored.
            "SELECT lease, state, log_bytes, (metadata ->> 'log_truncated') IS NOT NULL
             FROM jobs WHERE id = $1 FOR UPDATE",
        )
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?;
        let row = row.as_ref().map(|(lease, state, log_bytes, cut)| LogRow {
            lease: lease.as_deref(),
            state,
            log_bytes: *log_bytes as u64,
            cut: *cut,
        });
        let log_bytes = row.as_ref().map_or(0, |row| row.log_bytes);
        let (kept, notice) = match plan_append(row, lease, offset, data, max_log_bytes) {
            AppendPlan::Answer(answer) => return Ok(answer),
            AppendPlan::Store(bytes) => {
                let total = append_raw(&mut tx, id, log_bytes, bytes).await?;
                tx.commit().await?;
                return Ok(AppendResult::Appended(total));
            }
            AppendPlan::Cut(bytes) => {
                let kept = append_raw(&mut tx, id, log_bytes, bytes).await?;
                (kept, cut(kept))
            }
        };
        let total = append_raw(&mut tx, id, kept, notice.log_line.as_bytes()).await?;
        sqlx::query(
            "UPDATE jobs SET metadata = coalesce(metadata, '{}')
                 || jsonb_build_object('log_truncated', $2::text)
             WHERE id = $1",
        )
        .bind(id.0)
        .bind(&notice.note)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(AppendResult::TooLarge { log_bytes: total })
    }

    async fn finish_job(
        &self,
        id: JobId,
        lease: &str,
        outcome: &Outcome,
    ) -> StoreResult<Result<JobModel, LeaseRefusal>> {
        let sql = format!(
            "UPDATE jobs SET state = $3, reason = $4, exit_code = $5, signal = $6,
                 finished_at_ms = $7, lease = NULL, lease_expires_at_ms = NULL, cause = $8
             WHERE id = $1 AND lease = $2 AND state IN ('assigned', 'running')
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
            .bind(outcome.cause().map(FailureCause::as_str))
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(job) => Ok(Ok(job)),
            None => Ok(Err(self.lease_refusal(id).await?)),
        }
    }

    async fn request_cancel(
        &self,
        id: JobId,
        queued: &Transition,
    ) -> StoreResult<Option<JobModel>> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT state, log_bytes FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(id.0)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((state, log_bytes)) = row else {
            return Ok(None);
        };
        match state.parse::<JobState>().unwrap_or(JobState::Error) {
            JobState::Queued => {
                sqlx::query(
                    "UPDATE jobs SET state = $2, reason = $3, finished_at_ms = $4,
                         cancel_requested = TRUE, cause = $5
                     WHERE id = $1",
                )
                .bind(id.0)
                .bind(queued.state.as_str())
                .bind(&queued.reason)
                .bind(queued.state.is_terminal().then(now_ms))
                .bind(queued.cause.map(FailureCause::as_str))
                .execute(&mut *tx)
                .await?;
                append_raw(&mut tx, id, log_bytes as u64, queued.log_line.as_bytes()).await?;
            }
            JobState::Assigned | JobState::Running => {
                sqlx::query("UPDATE jobs SET cancel_requested = TRUE WHERE id = $1")
                    .bind(id.0)
                    .execute(&mut *tx)
                    .await?;
            }
            _ => {}
        }
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let job = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(job))
    }

    async fn expired_leases(&self, now_ms: i64) -> StoreResult<Vec<JobModel>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE state IN ('assigned', 'running') AND lease_expires_at_ms < $1 ORDER BY id"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(now_ms)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn expire_lease(
        &self,
        id: JobId,
        lease: &str,
        now_ms: i64,
        to: &Transition,
    ) -> StoreResult<Result<JobModel, LeaseRefusal>> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "UPDATE jobs SET state = $3, reason = $4, lease = NULL, lease_expires_at_ms = NULL,
                 finished_at_ms = $5, cause = $7
             WHERE id = $1 AND lease = $2 AND state IN ('assigned', 'running')
               AND lease_expires_at_ms < $6
             RETURNING {JOB_COLUMNS}"
        );
        let updated: Option<JobModel> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .bind(lease)
            .bind(to.state.as_str())
            .bind(&to.reason)
            .bind(to.state.is_terminal().then_some(now_ms))
            .bind(now_ms)
            .bind(to.cause.map(FailureCause::as_str))
            .fetch_optional(&mut *tx)
            .await?;
        let Some(updated) = updated else {
            drop(tx);
            return Ok(Err(self.lease_refusal(id).await?));
        };
        let log_bytes = append_raw(
            &mut tx,
            id,
            updated.log_bytes as u64,
            to.log_line.as_bytes(),
        )
        .await?;
        tx.commit().await?;
        Ok(Ok(JobModel {
            log_bytes: log_bytes as i64,
            ..updated
        }))
    }

    async fn extend_active_leases(&self, until_ms: i64) -> StoreResult<u64> {
        Ok(sqlx::query(
            "UPDATE jobs SET lease_expires_at_ms = GREATEST(lease_expires_at_ms, $1)
             WHERE state IN ('assigned', 'running')",
        )
        .bind(until_ms)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn read_log(&self, id: JobId, offset: u64, max_bytes: usize) -> StoreResult<Vec<u8>> {
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT start_offset, data FROM log_chunks
             WHERE job_id = $1 AND start_offset >= COALESCE(
                 (SELECT MAX(start_offset) FROM log_chunks
                  WHERE job_id = $1 AND start_offset <= $2), 0)
               AND start_offset < $3
             ORDER BY start_offset LIMIT 256",
        )
        .bind(id.0)
        .bind(offset as i64)
        .bind(i64::try_from(offset.saturating_add(max_bytes as u64)).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
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

    async fn queued_jobs_of_repo(&self, repository: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE repository = $1 AND state = 'queued'",
        )
        .bind(repository)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn queued_jobs_for_site(&self, site: &str) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs
             WHERE state = 'queued' AND repository IS NOT NULL
               AND (labels @> jsonb_build_array('site:' || $1)
                    OR sites = jsonb_build_array($1::text))",
        )
        .bind(site)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn oldest_queued_at(&self) -> StoreResult<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT MIN(created_at_ms) FROM jobs WHERE state = 'queued'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn jobs_by_state(&self) -> StoreResult<Vec<(JobState, u64)>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state ORDER BY state")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(state, n)| Some((state.parse().ok()?, n as u64)))
            .collect())
    }

    async fn delete_jobs_finished_before(&self, cutoff_ms: i64, limit: i64) -> StoreResult<u64> {
        // Their log chunks and holds go with them (ON DELETE CASCADE).
        let deleted = sqlx::query(
            "DELETE FROM jobs WHERE id IN (
                 SELECT id FROM jobs WHERE finished_at_ms < $1 ORDER BY finished_at_ms LIMIT $2)",
        )
        .bind(cutoff_ms)
        .bind(limit)
        .execute(&self.pool)
        .await?
        .rows_affected();
        // A batch goes with its last run; statistics with the last run they count.
        sqlx::query(
            "DELETE FROM batches WHERE created_at_ms < $1
               AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.batch_id = batches.id)",
        )
        .bind(cutoff_ms)
        .execute(&self.pool)
        .await?;
        for sql in [
            "DELETE FROM test_commit_stats WHERE last_at_ms < $1",
            "DELETE FROM test_stats WHERE last_bad_at_ms < $1",
        ] {
            sqlx::query(sql).bind(cutoff_ms).execute(&self.pool).await?;
        }
        Ok(deleted)
    }

    async fn lead_sweeper(&self) -> StoreResult<bool> {
        let mut sweeper = self.sweeper.lock().await;
        if self.pool.is_closed() {
            return Err(sqlx::Error::PoolClosed.into());
        }
        if let Some(session) = sweeper.as_mut() {
            let checked = if session.leading {
                // Held for as long as the session lives: it only needs to answer.
                tokio::time::timeout(SWEEPER_PING_TIMEOUT, session.conn.ping())
                    .await
                    .map(|ping| ping.map(|()| true))
            } else {
                tokio::time::timeout(SWEEPER_PING_TIMEOUT, try_sweeper_lock(&mut session.conn))
                    .await
            };
            return match checked {
                Ok(Ok(leading)) => {
                    if leading && !session.leading {
                        tracing::info!("This broker now runs the sweeper.");
                    }
                    session.leading = leading;
                    Ok(leading)
                }
                Ok(Err(err)) => {
                    // Lost with its lock, if it held it: another broker may take over, and
                    // this one tries again, on a new connection, next time.
                    tracing::warn!(?err, "Lost the sweeper's database connection.");
                    *sweeper = None;
                    Ok(false)
                }
                Err(_) => {
                    tracing::warn!(
                        timeout = ?SWEEPER_PING_TIMEOUT,
                        "The sweeper's database connection stopped answering."
                    );
                    *sweeper = None;
                    Ok(false)
                }
            };
        }
        let mut conn = connect(&self.options).await?;
        let leading = try_sweeper_lock(&mut conn).await?;
        if leading {
            tracing::info!("This broker now runs the sweeper.");
        }
        *sweeper = Some(SweeperSession { conn, leading });
        Ok(leading)
    }

    async fn record_sweep(&self, now_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO sweeps (id, last_sweep_ms) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET last_sweep_ms = excluded.last_sweep_ms",
        )
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn last_sweep_ms(&self) -> StoreResult<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT last_sweep_ms FROM sweeps WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?,
        )
    }
}

/// Takes the sweeper's lock for the session of `conn` if no other session holds it.
async fn try_sweeper_lock(conn: &mut PgConnection) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(SWEEPER_LOCK)
        .fetch_one(conn)
        .await
}
