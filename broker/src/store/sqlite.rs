//! The SQLite store (WAL mode): the embedded default.
//!
//! All writes go through one connection, so SQLite never makes a writer wait on its busy
//! handler (whose sleeps would show up as dispatch latency); reads use a separate pool and see
//! every committed write, and a connection of its own copies the WAL back into the database
//! (see [`Checkpointer`]). Each state change is one statement or one transaction, so a crash
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
use testbot_proto::jobs::{JobId, JobSpec, JobState};
use testbot_proto::now_ms;
use testbot_proto::results::Outcome;

use super::{
    AgentModel, AgentOffer, ApiTokenModel, AppendPlan, AppendResult, EnrollRefusal,
    FirstRegistration, JobModel, JobOrigin, JobTaker, LeaseRefusal, LeaseRenewal, LogCut, LogRow,
    QueuedJob, Release, RepoModel, RepositoryIds, RoutingRow, SiteModel, Store, StoreError,
    StoreResult, StoredJob, Transition, check_migrations, plan_append,
};

mod github;

/// The SQLite schema's migrations, applied at start-up.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The locked writing connection. Letting it go tells the checkpointer that the WAL may have
/// grown.
struct WriteGuard<'a>(
    tokio::sync::MutexGuard<'a, Option<SqliteConnection>>,
    &'a Checkpointer,
);

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.1.wrote.notify_one();
    }
}

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

/// How often, at most, the checkpointer copies the WAL back into the database file while writes
/// go on.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(25);

/// WAL pages after which the writer checkpoints by itself, when the checkpointer has not kept
/// up (about 16 MB; SQLite's default is 1000). Under a steady stream of writes the WAL is only
/// rewound after a checkpoint that caught up with the writer, which the writer's own does.
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 4_000;

/// Copies the WAL back into the database file on a connection of its own, after writes: a
/// checkpoint costs about twice the write that filled the WAL (every page read back and written
/// again), and done by the writer at commit, as SQLite does by default, it held up the write and
/// every write waiting behind it: SQLite alone took 2.5 ms to append a 512 KiB log chunk with it
/// and 0.8 ms without.
/// The writer still checkpoints by itself when the WAL grows past
/// [`WRITER_AUTOCHECKPOINT_PAGES`], so it stays bounded whatever happens here.
struct Checkpointer {
    /// Told after every write (a stored permit stands for any number of them).
    wrote: Arc<tokio::sync::Notify>,
    /// Ends the checkpointer: at `close`, or when the last clone of the store is dropped.
    stop: tokio_util::sync::CancellationToken,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Checkpointer {
    fn start(conn: SqliteConnection) -> Arc<Checkpointer> {
        let checkpointer = Arc::new(Checkpointer {
            wrote: Arc::new(tokio::sync::Notify::new()),
            stop: tokio_util::sync::CancellationToken::new(),
            task: std::sync::Mutex::new(None),
        });
        // The task holds only what it needs, not the checkpointer: dropping the store ends it.
        let task = tokio::spawn(checkpoint_loop(
            conn,
            checkpointer.wrote.clone(),
            checkpointer.stop.clone(),
        ));
        *checkpointer.task.lock().expect("not poisoned") = Some(task);
        checkpointer
    }

    /// Stops the checkpointer and closes its connection.
    async fn stop(&self) {
        self.stop.cancel();
        let task = self.task.lock().expect("not poisoned").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

async fn checkpoint_loop(
    mut conn: SqliteConnection,
    wrote: Arc<tokio::sync::Notify>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = wrote.notified() => {}
            () = stop.cancelled() => break,
        }
        // Writes of a while make one checkpoint.
        tokio::select! {
            () = tokio::time::sleep(CHECKPOINT_INTERVAL) => {}
            () = stop.cancelled() => break,
        }
        // PASSIVE: copies what no reader still needs, without waiting for anyone or blocking
        // the writer.
        if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(%err, "Cannot checkpoint the SQLite WAL.");
        }
    }
    let _ = conn.close().await;
}

/// The columns of [`JobModel`], in its field order.
const JOB_COLUMNS: &str = "id, spec, state, reason, exit_code, signal, attempts, agent, lease, \
     lease_expires_at_ms, cancel_requested, log_bytes, created_at_ms, started_at_ms, finished_at_ms, \
     repository, run_id, submitted_by, oidc_token, metadata, secret_env";

/// The columns of [`RepoModel`], in its field order.
const REPO_COLUMNS: &str = "name, settings, registered_by, created_at_ms, updated_at_ms, repository_id, repository_owner_id";

/// How many queued jobs a claim reads at a time while looking for one its agent may take; it
/// reads on through the whole queue, a page at a time.
const CLAIM_PAGE: i64 = 256;

const ROUTING_COLUMNS: &str = "id, spec, sites, repository, oidc_token, \
     (SELECT provenance FROM github_jobs g WHERE g.job_id = jobs.id) AS provenance";

const AGENT_COLUMNS: &str = "agents.id, agents.site, agents.name, agents.public_key, agents.policy, \
     agents.enrolled_at_ms, agents.last_seen_ms, agents.revoked_at_ms, \
     sites.revoked_at_ms AS site_revoked_at_ms";

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

impl LeaseRenewal {
    fn from_row(row: &sqlx::sqlite::SqliteRow) -> Self {
        LeaseRenewal {
            cancel_requested: row.get::<bool, _>(0),
            log_bytes: row.get::<i64, _>(1) as u64,
        }
    }
}

/// The SQLite store: one file, `testbot.db`, in the broker's data directory.
#[derive(Clone)]
pub struct SqliteStore {
    /// The one writing connection, held directly rather than through a pool of one: a pool's
    /// acquire and release cost more than most of the statements (measured in
    /// docs/performance.md).
    write: Arc<tokio::sync::Mutex<Option<SqliteConnection>>>,
    read: SqlitePool,
    checkpointer: Arc<Checkpointer>,
}

impl SqliteStore {
    /// Opens (creating if needed) `testbot.db` in `data_dir` and runs migrations.
    pub async fn open(data_dir: &Path) -> anyhow::Result<SqliteStore> {
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
        MIGRATOR
            .run(&mut write)
            .await
            .with_context(|| format!("Cannot migrate database {}", path.display()))?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES}"
        )))
        .execute(&mut write)
        .await
        .with_context(|| format!("Cannot configure database {}", path.display()))?;
        let write = Arc::new(tokio::sync::Mutex::new(Some(write)));
        let checkpointer = Checkpointer::start(
            SqliteConnection::connect_with(&options)
                .await
                .with_context(|| format!("Cannot open database {}", path.display()))?,
        );
        let read = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .connect_with(options.read_only(true))
            .await
            .with_context(|| format!("Cannot open database {} for reading", path.display()))?;
        Ok(SqliteStore {
            write,
            read,
            checkpointer,
        })
    }

    /// The writing connection, for one statement or one transaction.
    async fn writer(&self) -> sqlx::Result<WriteGuard<'_>> {
        let guard = self.write.lock().await;
        if guard.is_none() {
            return Err(sqlx::Error::PoolClosed);
        }
        Ok(WriteGuard(guard, &self.checkpointer))
    }

    async fn job_state(&self, id: i64) -> sqlx::Result<Option<String>> {
        sqlx::query_scalar("SELECT state FROM jobs WHERE id = ?1")
            .bind(id)
            .fetch_optional(&self.read)
            .await
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
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn shared(&self) -> bool {
        false
    }

    async fn health(&self) -> StoreResult<()> {
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.read)
                .await?;
        check_migrations(&MIGRATOR, applied)
    }

    async fn use_nonce(
        &self,
        agent_id: &str,
        nonce: &str,
        expires_at_ms: i64,
    ) -> StoreResult<bool> {
        let inserted = sqlx::query(
            "INSERT INTO agent_nonces (agent_id, nonce, expires_at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
        )
        .bind(agent_id)
        .bind(nonce)
        .bind(expires_at_ms)
        .execute(&mut *self.writer().await?)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    async fn jobs_by_state(&self) -> StoreResult<Vec<(JobState, u64)>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state ORDER BY state")
                .fetch_all(&self.read)
                .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(state, n)| Some((state.parse().ok()?, n as u64)))
            .collect())
    }

    async fn lead_sweeper(&self) -> StoreResult<bool> {
        // One broker owns a SQLite database: it is always the sweeper.
        Ok(true)
    }

    async fn record_sweep(&self, now_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO sweeps (id, last_sweep_ms) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET last_sweep_ms = excluded.last_sweep_ms",
        )
        .bind(now_ms)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(())
    }

    async fn last_sweep_ms(&self) -> StoreResult<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT last_sweep_ms FROM sweeps WHERE id = 1")
                .fetch_optional(&self.read)
                .await?,
        )
    }

    async fn close(&self) {
        self.checkpointer.stop().await;
        self.read.close().await;
        if let Some(write) = self.write.lock().await.take() {
            let _ = write.close().await;
        }
    }

    async fn api_tokens(&self) -> StoreResult<Vec<ApiTokenModel>> {
        sqlx::query_as("SELECT token_hash, role, name FROM api_tokens")
            .fetch_all(&self.read)
            .await
            .map_err(StoreError::from)
    }

    async fn upsert_api_token(&self, hash: &str, role: &str, name: &str) -> StoreResult<()> {
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

    async fn retire_api_tokens(&self, role: &str, name: &str, keep: &str) -> StoreResult<u64> {
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

    async fn insert_job(
        &self,
        spec: &JobSpec,
        origin: &JobOrigin,
        jti: Option<(&str, i64)>,
    ) -> StoreResult<Option<JobModel>> {
        let stored = StoredJob::new(spec, origin)?;
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
            .bind(stored.spec)
            .bind(stored.labels)
            .bind(now_ms())
            .bind(&origin.repository)
            .bind(&origin.run_id)
            .bind(&origin.submitted_by)
            .bind(&origin.oidc_token)
            .bind(stored.sites)
            .bind(jti.map(|(jti, _)| jti))
            .bind(stored.secret_env)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(model))
    }

    async fn use_jti(&self, jti: &str, expires_at: i64) -> StoreResult<bool> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        let fresh = record_jti(&mut tx, jti, expires_at).await?;
        tx.commit().await?;
        Ok(fresh)
    }

    async fn prune_jtis(&self, now_secs: i64) -> StoreResult<u64> {
        Ok(sqlx::query("DELETE FROM oidc_jtis WHERE expires_at < ?1")
            .bind(now_secs)
            .execute(&mut *self.writer().await?)
            .await?
            .rows_affected())
    }

    async fn repo(&self, name: &str) -> StoreResult<Option<RepoModel>> {
        let sql = format!("SELECT {REPO_COLUMNS} FROM repos WHERE name = ?1");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(&self.read)
            .await
            .map_err(StoreError::from)
    }

    async fn repos(&self) -> StoreResult<Vec<RepoModel>> {
        let sql = format!("SELECT {REPO_COLUMNS} FROM repos ORDER BY name");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.read)
            .await
            .map_err(StoreError::from)
    }

    async fn bind_repo_ids(
        &self,
        name: &str,
        ids: &RepositoryIds,
    ) -> StoreResult<Option<RepositoryIds>> {
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

    async fn jti_used(&self, jti: &str) -> StoreResult<bool> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM oidc_jtis WHERE jti = ?1)")
            .bind(jti)
            .fetch_one(&self.read)
            .await
            .map_err(StoreError::from)
    }

    async fn submit_jti(&self, id: JobId) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT submit_jti FROM jobs WHERE id = ?1")
                .bind(id.0)
                .fetch_optional(&self.read)
                .await?
                .flatten(),
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

    async fn insert_repo_if_absent(
        &self,
        name: &str,
        settings: &str,
        registered_by: &str,
        ids: &RepositoryIds,
        jti: Option<(&str, i64)>,
    ) -> StoreResult<FirstRegistration> {
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

    async fn create_site(&self, name: &str) -> StoreResult<Option<SiteModel>> {
        sqlx::query_as(
            "INSERT INTO sites (name, created_at_ms) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING
             RETURNING name, created_at_ms, revoked_at_ms",
        )
        .bind(name)
        .bind(now_ms())
        .fetch_optional(&mut *self.writer().await?)
        .await
        .map_err(StoreError::from)
    }

    async fn site(&self, name: &str) -> StoreResult<Option<SiteModel>> {
        sqlx::query_as("SELECT name, created_at_ms, revoked_at_ms FROM sites WHERE name = ?1")
            .bind(name)
            .fetch_optional(&self.read)
            .await
            .map_err(StoreError::from)
    }

    async fn sites(&self) -> StoreResult<Vec<SiteModel>> {
        sqlx::query_as("SELECT name, created_at_ms, revoked_at_ms FROM sites ORDER BY name")
            .fetch_all(&self.read)
            .await
            .map_err(StoreError::from)
    }

    async fn revoke_site(&self, name: &str) -> StoreResult<bool> {
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

    async fn create_enrollment_token(
        &self,
        token_hash: &str,
        site: &str,
        uses: u32,
        expires_at_ms: i64,
    ) -> StoreResult<()> {
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

    async fn enrollment_token_exists(&self, token_hash: &str) -> StoreResult<bool> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM enrollment_tokens WHERE token_hash = ?1)")
            .bind(token_hash)
            .fetch_one(&self.read)
            .await
            .map_err(StoreError::from)
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

    async fn agent(&self, id: &str) -> StoreResult<Option<AgentModel>> {
        let sql = format!(
            "SELECT {AGENT_COLUMNS} FROM agents JOIN sites ON sites.name = agents.site
             WHERE agents.id = ?1"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.read)
            .await
            .map_err(StoreError::from)
    }

    async fn agents(&self) -> StoreResult<Vec<AgentModel>> {
        let sql = format!(
            "SELECT {AGENT_COLUMNS} FROM agents JOIN sites ON sites.name = agents.site
             ORDER BY agents.site, agents.name, agents.enrolled_at_ms"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.read)
            .await
            .map_err(StoreError::from)
    }

    async fn revoke_agent(&self, id: &str) -> StoreResult<bool> {
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

    async fn insert_nonces(&self, nonces: &[(String, String, i64)]) -> StoreResult<()> {
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
        Ok(tx.commit().await?)
    }

    async fn live_nonces(&self, now_ms: i64) -> StoreResult<Vec<(String, String, i64)>> {
        sqlx::query_as(
            "SELECT agent_id, nonce, expires_at_ms FROM agent_nonces WHERE expires_at_ms >= ?1",
        )
        .bind(now_ms)
        .fetch_all(&self.read)
        .await
        .map_err(StoreError::from)
    }

    async fn prune_nonces(&self, now_ms: i64) -> StoreResult<u64> {
        Ok(
            sqlx::query("DELETE FROM agent_nonces WHERE expires_at_ms < ?1")
                .bind(now_ms)
                .execute(&mut *self.writer().await?)
                .await?
                .rows_affected(),
        )
    }

    async fn delete_repo(&self, name: &str) -> StoreResult<bool> {
        Ok(sqlx::query("DELETE FROM repos WHERE name = ?1")
            .bind(name)
            .execute(&mut *self.writer().await?)
            .await?
            .rows_affected()
            > 0)
    }

    async fn job(&self, id: JobId) -> StoreResult<Option<JobModel>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.read)
            .await
            .map_err(StoreError::from)
    }

    async fn jobs(
        &self,
        state: Option<JobState>,
        site: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<JobModel>> {
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
            .map_err(StoreError::from)
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

    async fn queued_jobs(&self, after: i64, limit: i64) -> StoreResult<Vec<QueuedJob>> {
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

    async fn routed_job(&self, id: JobId) -> StoreResult<Option<crate::routing::RoutedJob>> {
        let sql = format!("SELECT {ROUTING_COLUMNS} FROM jobs WHERE id = ?1");
        let row: Option<RoutingRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .fetch_optional(&self.read)
            .await?;
        Ok(row.map(|row| row.routed()).transpose()?)
    }

    async fn job_releases(&self, id: JobId) -> StoreResult<Option<u32>> {
        let releases: Option<i64> = sqlx::query_scalar("SELECT releases FROM jobs WHERE id = ?1")
            .bind(id.0)
            .fetch_optional(&self.read)
            .await?;
        Ok(releases.map(|r| r.clamp(0, i64::from(u32::MAX)) as u32))
    }

    async fn record_offer(&self, id: &str, policy: Option<&str>, offer: &str) -> StoreResult<()> {
        sqlx::query("UPDATE agents SET policy = ?2, offer = ?3, last_seen_ms = ?4 WHERE id = ?1")
            .bind(id)
            .bind(policy)
            .bind(offer)
            .bind(now_ms())
            .execute(&mut *self.writer().await?)
            .await?;
        Ok(())
    }

    async fn active_agent_offers(&self) -> StoreResult<Vec<AgentOffer>> {
        Ok(sqlx::query_as(
            "SELECT agents.site, agents.name, agents.policy, agents.offer FROM agents
             JOIN sites ON sites.name = agents.site
             WHERE agents.revoked_at_ms IS NULL AND sites.revoked_at_ms IS NULL",
        )
        .fetch_all(&self.read)
        .await?)
    }

    async fn release_job(
        &self,
        id: JobId,
        release: &Release<'_>,
        decide: &(dyn Fn(u32) -> Transition + Send + Sync),
    ) -> StoreResult<Result<JobModel, LeaseRefusal>> {
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
        let to = decide(releases.clamp(0, i64::from(u32::MAX)) as u32);
        let finished = to.state.is_terminal().then(now_ms);
        let sql = format!(
            "UPDATE jobs SET state = ?2, reason = ?3, lease = NULL, lease_expires_at_ms = NULL,
                 attempts = MAX(attempts - 1, 0), releases = releases + 1,
                 started_at_ms = CASE WHEN ?2 = 'queued' THEN NULL ELSE started_at_ms END,
                 finished_at_ms = ?4
             WHERE id = ?1 RETURNING {JOB_COLUMNS}"
        );
        let updated: JobModel = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .bind(to.state.as_str())
            .bind(&to.reason)
            .bind(finished)
            .fetch_one(&mut *tx)
            .await?;
        if to.state == JobState::Queued {
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

    async fn set_metadata(
        &self,
        id: JobId,
        lease: &str,
        key: &str,
        value: &str,
    ) -> StoreResult<Result<JobModel, LeaseRefusal>> {
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

    async fn start_job(
        &self,
        id: JobId,
        lease: &str,
        lease_expires_at_ms: i64,
    ) -> StoreResult<Result<LeaseRenewal, LeaseRefusal>> {
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

    async fn renew_lease(
        &self,
        id: JobId,
        lease: &str,
        lease_expires_at_ms: i64,
    ) -> StoreResult<Result<LeaseRenewal, LeaseRefusal>> {
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

    async fn append_log(
        &self,
        id: JobId,
        lease: &str,
        offset: u64,
        data: &[u8],
        max_log_bytes: u64,
        cut: &(dyn Fn(u64) -> LogCut + Send + Sync),
    ) -> StoreResult<AppendResult> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        let row: Option<(Option<String>, String, i64, bool)> = sqlx::query_as(
            "SELECT lease, state, log_bytes, json_extract(metadata, '$.log_truncated') IS NOT NULL
             FROM jobs WHERE id = ?1",
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
            "UPDATE jobs SET metadata = json_set(coalesce(metadata, '{}'), '$.log_truncated', ?2)
             WHERE id = ?1",
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

    async fn request_cancel(
        &self,
        id: JobId,
        queued: &Transition,
    ) -> StoreResult<Option<JobModel>> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT state, log_bytes FROM jobs WHERE id = ?1")
                .bind(id.0)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((state, log_bytes)) = row else {
            return Ok(None);
        };
        match state.parse::<JobState>().unwrap_or(JobState::Error) {
            JobState::Queued => {
                sqlx::query(
                    "UPDATE jobs SET state = ?2, reason = ?3, finished_at_ms = ?4,
                         cancel_requested = 1
                     WHERE id = ?1",
                )
                .bind(id.0)
                .bind(queued.state.as_str())
                .bind(&queued.reason)
                .bind(queued.state.is_terminal().then(now_ms))
                .execute(&mut *tx)
                .await?;
                append_raw(&mut tx, id, log_bytes as u64, queued.log_line.as_bytes()).await?;
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

    async fn expired_leases(&self, now_ms: i64) -> StoreResult<Vec<JobModel>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs
             WHERE state IN ('assigned', 'running') AND lease_expires_at_ms < ?1 ORDER BY id"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(now_ms)
            .fetch_all(&self.read)
            .await?)
    }

    async fn expire_lease(
        &self,
        id: JobId,
        lease: &str,
        now_ms: i64,
        to: &Transition,
    ) -> StoreResult<Result<JobModel, LeaseRefusal>> {
        let mut conn = self.writer().await?;
        let mut tx = conn.begin().await?;
        let sql = format!(
            "UPDATE jobs SET state = ?3, reason = ?4, lease = NULL, lease_expires_at_ms = NULL,
                 finished_at_ms = ?5
             WHERE id = ?1 AND lease = ?2 AND state IN ('assigned', 'running')
               AND lease_expires_at_ms < ?6
             RETURNING {JOB_COLUMNS}"
        );
        let updated: Option<JobModel> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .bind(lease)
            .bind(to.state.as_str())
            .bind(&to.reason)
            .bind(to.state.is_terminal().then_some(now_ms))
            .bind(now_ms)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(updated) = updated else {
            drop(tx);
            drop(conn);
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
        let done = sqlx::query(
            "UPDATE jobs SET lease_expires_at_ms = MAX(lease_expires_at_ms, ?1)
             WHERE state IN ('assigned', 'running')",
        )
        .bind(until_ms)
        .execute(&mut *self.writer().await?)
        .await?;
        Ok(done.rows_affected())
    }

    async fn queued_jobs_of_repo(&self, repository: &str) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE repository = ?1 AND state = 'queued'")
            .bind(repository)
            .fetch_one(&self.read)
            .await
            .map_err(StoreError::from)
    }

    async fn queued_jobs_for_site(&self, site: &str) -> StoreResult<i64> {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs
             WHERE state = 'queued' AND repository IS NOT NULL
               AND (EXISTS (SELECT 1 FROM json_each(jobs.labels) WHERE value = 'site:' || ?1)
                    OR jobs.sites = json_array(?1))",
        )
        .bind(site)
        .fetch_one(&self.read)
        .await
        .map_err(StoreError::from)
    }

    async fn delete_jobs_finished_before(&self, cutoff_ms: i64, limit: i64) -> StoreResult<u64> {
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

    async fn stored_oidc_token(&self, id: JobId) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT oidc_token FROM jobs WHERE id = ?1")
                .bind(id.0)
                .fetch_optional(&self.read)
                .await?
                .flatten(),
        )
    }

    async fn oldest_queued_at(&self) -> StoreResult<Option<i64>> {
        sqlx::query_scalar("SELECT MIN(created_at_ms) FROM jobs WHERE state = 'queued'")
            .fetch_one(&self.read)
            .await
            .map_err(StoreError::from)
    }

    async fn read_log(&self, id: JobId, offset: u64, max_bytes: usize) -> StoreResult<Vec<u8>> {
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT start_offset, data FROM log_chunks
             WHERE job_id = ?1 AND start_offset >= COALESCE(
                 (SELECT MAX(start_offset) FROM log_chunks WHERE job_id = ?1 AND start_offset <= ?2), 0)
               AND start_offset < ?3
             ORDER BY start_offset LIMIT 256",
        )
        .bind(id.0)
        .bind(offset as i64)
        .bind(i64::try_from(offset.saturating_add(max_bytes as u64)).unwrap_or(i64::MAX))
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
/// Nothing to append stores no chunk: an empty one would take the offset of the next.
async fn append_raw(
    tx: &mut Transaction<'_, Sqlite>,
    id: JobId,
    log_bytes: u64,
    data: &[u8],
) -> sqlx::Result<u64> {
    if data.is_empty() {
        return Ok(log_bytes);
    }
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
