//! The SQLite store (WAL mode): the embedded default.
//!
//! All writes run on one thread of their own ([`writer`]), which owns the writing connection
//! (rusqlite) and commits every write waiting in its queue as one transaction, each write in a
//! savepoint of its own (group commit); so SQLite never makes a writer wait on its busy handler,
//! and a batch of writes costs one hand-off between threads and one commit. A new write is a
//! closure: `self.writer.write(move |tx| { ...; Ok(value) }).await`, or `write_or_undo` for one
//! that must undo what it did when it refuses. Reads borrow one of a few connections of their
//! own on tokio's blocking threads ([`readers`]) and see every committed write; migrations run
//! through sqlx before the writer opens, and a connection of its own copies the WAL back into
//! the database (see [`Checkpointer`]). Each state change is one write, so a crash leaves
//! either the old or the new state, never half of one.
//!
//! Layout:
//! - [`writer`]: the writer thread and its queue.
//! - [`readers`]: the reading connections.

mod readers;
mod writer;

use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rusqlite::{OptionalExtension as _, Transaction, params};
use sqlx::Connection as _;
use sqlx::SqliteConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
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
use readers::Readers;
use writer::Writer;

mod bisections;
mod github;
mod test_results;

/// The SQLite schema's migrations, applied at start-up.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How many read connections to keep.
const READ_CONNECTIONS: usize = 4;

/// How long the writing connection waits for a lock held by another connection (a
/// checkpoint, or another process opening the file) before the write fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Prepared statements the writing connection keeps: more than the store has.
const STATEMENT_CACHE: usize = 128;

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
    /// Told after every batch of writes (a stored permit stands for any number of them).
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

/// The columns of [`JobModel`], in its field order (a macro, so that statements can be
/// `concat!`ed at compile time and cached by their text).
macro_rules! job_columns {
    () => {
        "id, spec, state, reason, exit_code, signal, attempts, agent, lease, \
         lease_expires_at_ms, cancel_requested, log_bytes, created_at_ms, started_at_ms, \
         finished_at_ms, repository, run_id, submitted_by, oidc_token, metadata, secret_env, public, cause, \
         batch_id, batch_run, batch_runs, commit_sha, git_ref, job_name"
    };
}

/// The columns of [`BatchModel`], in its field order.
macro_rules! batch_columns {
    () => {
        "id, runs, created_at_ms, submitted_by, repository, until"
    };
}

fn batch_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<BatchModel> {
    Ok(BatchModel {
        id: row.get(0)?,
        runs: row.get(1)?,
        created_at_ms: row.get(2)?,
        submitted_by: row.get(3)?,
        repository: row.get(4)?,
        until: row.get(5)?,
    })
}

/// The columns of [`RepoModel`], in its field order.
macro_rules! repo_columns {
    () => {
        "name, settings, registered_by, created_at_ms, updated_at_ms, repository_id, \
         repository_owner_id"
    };
}

/// The columns of [`AgentModel`], in its field order.
macro_rules! agent_columns {
    () => {
        "agents.id, agents.site, agents.name, agents.public_key, agents.policy, \
         agents.enrolled_at_ms, agents.last_seen_ms, agents.revoked_at_ms, \
         sites.revoked_at_ms AS site_revoked_at_ms"
    };
}

/// The columns of [`RoutingRow`], in its field order: an App job's provenance from its row in
/// `github_jobs`, looked up only for App jobs (`submitted_by` is `APP_SUBMITTER`), so that the
/// claims of every other job do not pay for it.
macro_rules! routing_columns {
    () => {
        "id, spec, sites, repository, oidc_token, \
         CASE WHEN submitted_by = 'github-app' THEN \
         (SELECT provenance FROM github_jobs g WHERE g.job_id = jobs.id) END AS provenance, \
         priority"
    };
}

fn job_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobModel> {
    Ok(JobModel {
        id: row.get(0)?,
        spec: row.get(1)?,
        state: row.get(2)?,
        reason: row.get(3)?,
        exit_code: row.get(4)?,
        signal: row.get(5)?,
        attempts: row.get(6)?,
        agent: row.get(7)?,
        lease: row.get(8)?,
        lease_expires_at_ms: row.get(9)?,
        cancel_requested: row.get(10)?,
        log_bytes: row.get(11)?,
        created_at_ms: row.get(12)?,
        started_at_ms: row.get(13)?,
        finished_at_ms: row.get(14)?,
        repository: row.get(15)?,
        run_id: row.get(16)?,
        submitted_by: row.get(17)?,
        oidc_token: row.get(18)?,
        metadata: row.get(19)?,
        secret_env: row.get(20)?,
        public: row.get(21)?,
        cause: row.get(22)?,
        batch_id: row.get(23)?,
        batch_run: row.get(24)?,
        batch_runs: row.get(25)?,
        commit_sha: row.get(26)?,
        git_ref: row.get(27)?,
        job_name: row.get(28)?,
    })
}

/// A batch's row, for `runs` runs of `origin`'s job, with its stopping rule (JSON).
fn insert_batch_row(
    tx: &Transaction<'_>,
    runs: u32,
    origin: &JobOrigin,
    until: Option<&str>,
) -> rusqlite::Result<BatchModel> {
    tx.prepare_cached(concat!(
        "INSERT INTO batches (runs, created_at_ms, submitted_by, repository, until)
         VALUES (?1, ?2, ?3, ?4, ?5) RETURNING ",
        batch_columns!()
    ))?
    .query_row(
        params![
            runs,
            now_ms(),
            origin.submitted_by,
            origin.repository,
            until
        ],
        batch_row,
    )
}

fn repo_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RepoModel> {
    Ok(RepoModel {
        name: row.get(0)?,
        settings: row.get(1)?,
        registered_by: row.get(2)?,
        created_at_ms: row.get(3)?,
        updated_at_ms: row.get(4)?,
        repository_id: row.get(5)?,
        repository_owner_id: row.get(6)?,
    })
}

fn agent_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AgentModel> {
    Ok(AgentModel {
        id: row.get(0)?,
        site: row.get(1)?,
        name: row.get(2)?,
        public_key: row.get(3)?,
        policy: row.get(4)?,
        enrolled_at_ms: row.get(5)?,
        last_seen_ms: row.get(6)?,
        revoked_at_ms: row.get(7)?,
        site_revoked_at_ms: row.get(8)?,
    })
}

fn routing_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RoutingRow> {
    Ok(RoutingRow {
        id: row.get(0)?,
        spec: row.get(1)?,
        sites: row.get(2)?,
        repository: row.get(3)?,
        oidc_token: row.get(4)?,
        provenance: row.get(5)?,
        priority: row.get(6)?,
    })
}

fn site_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SiteModel> {
    Ok(SiteModel {
        name: row.get(0)?,
        created_at_ms: row.get(1)?,
        revoked_at_ms: row.get(2)?,
    })
}

fn renewal_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<LeaseRenewal> {
    Ok(LeaseRenewal {
        cancel_requested: row.get(0)?,
        log_bytes: row.get::<_, i64>(1)? as u64,
    })
}

/// Inserts a queued job (also the App's, by `github.rs`); `batch`: its batch, run and the
/// batch's size.
fn insert_job_row(
    tx: &Transaction<'_>,
    stored: &StoredJob,
    origin: &JobOrigin,
    jti: Option<&str>,
    batch: Option<(i64, u32, u32)>,
) -> rusqlite::Result<JobModel> {
    tx.prepare_cached(concat!(
        "INSERT INTO jobs (spec, labels, state, created_at_ms, repository, run_id,
             submitted_by, oidc_token, sites, submit_jti, secret_env, public,
             batch_id, batch_run, batch_runs, commit_sha, git_ref, job_name, priority)
         VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
             ?16, ?17, ?18)
         RETURNING ",
        job_columns!()
    ))?
    .query_row(
        params![
            stored.spec,
            stored.labels,
            now_ms(),
            origin.repository,
            origin.run_id,
            origin.submitted_by,
            origin.oidc_token,
            stored.sites,
            jti,
            stored.secret_env,
            origin.public,
            batch.map(|b| b.0),
            batch.map(|b| b.1),
            batch.map(|b| b.2),
            origin.commit_sha,
            origin.git_ref,
            stored.name,
            super::Priority::stored(origin, batch),
        ],
        job_row,
    )
}

/// Records a token id; false if it is there already.
fn record_jti(tx: &Transaction<'_>, jti: &str, expires_at: i64) -> rusqlite::Result<bool> {
    let inserted = tx
        .prepare_cached(
            "INSERT INTO oidc_jtis (jti, expires_at) VALUES (?1, ?2) ON CONFLICT (jti) DO NOTHING",
        )?
        .execute(params![jti, expires_at])?;
    Ok(inserted == 1)
}

/// Why a call under a lease found no job it may change: read in the write's transaction.
fn lease_refusal(tx: &Transaction<'_>, id: JobId) -> rusqlite::Result<LeaseRefusal> {
    let state: Option<String> = tx
        .prepare_cached("SELECT state FROM jobs WHERE id = ?1")?
        .query_row([id.0], |row| row.get(0))
        .optional()?;
    Ok(match state.map(|s| s.parse::<JobState>()) {
        None => LeaseRefusal::NoSuchJob,
        Some(Ok(state)) if state.is_terminal() => LeaseRefusal::Finished(state),
        Some(_) => LeaseRefusal::Superseded,
    })
}

/// Appends bytes at the end of a job's log (which holds `log_bytes` bytes); returns the new size.
/// Nothing to append stores no chunk: an empty one would take the offset of the next.
fn append_raw(
    tx: &Transaction<'_>,
    id: JobId,
    log_bytes: u64,
    data: &[u8],
) -> rusqlite::Result<u64> {
    if data.is_empty() {
        return Ok(log_bytes);
    }
    tx.prepare_cached("INSERT INTO log_chunks (job_id, start_offset, data) VALUES (?1, ?2, ?3)")?
        .execute(params![id.0, log_bytes as i64, data])?;
    let total = log_bytes + data.len() as u64;
    tx.prepare_cached("UPDATE jobs SET log_bytes = ?2 WHERE id = ?1")?
        .execute(params![id.0, total as i64])?;
    Ok(total)
}

/// What a claim's read of the queue found.
enum Scan {
    /// The first jobs in the queue's order the agent may take, as (priority, id), in order.
    Admitted(Vec<(i64, i64)>),
    /// None in a page that ended at this (priority, id): read on after it.
    ReadOn((i64, i64)),
    /// None at all.
    End,
}

/// What a claim's write found.
enum Claim {
    Claimed(Box<JobModel>),
    /// The site is at its `max_concurrent_jobs`.
    SiteFull,
    /// Other agents claimed the jobs meanwhile.
    Taken,
}

/// The queued jobs an agent may take, as far as SQL can tell: see [`SqliteStore::claim_job`].
/// A claim reads on through the whole queue, 256 jobs at a time. The page is a literal: SQLite
/// prepares a statement again each time a parameter of its `LIMIT` is bound, which took most of
/// the claim's time.
const CLAIM_SCAN: &str = concat!(
    "SELECT ",
    routing_columns!(),
    " FROM jobs
     WHERE state = 'queued' AND priority = ?9 AND id > ?1
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
     ORDER BY id LIMIT 256"
);

/// The next priority after `?1` that has queued jobs: a claim reads the queue one priority at
/// a time, each by id along `jobs_queued_by_priority` (a row-value `(priority, id) > (?, ?)`
/// would seek on the priority alone and re-read the rows before the id on every page).
const NEXT_PRIORITY: &str =
    "SELECT MIN(priority) FROM jobs WHERE state = 'queued' AND priority > ?1";

/// How many jobs the agent may take a claim's read hands to its write, oldest first: agents
/// polling at once read the same oldest jobs, and the write claims the first still queued,
/// rather than each agent but one reading the queue again.
const CLAIM_CANDIDATES: usize = 16;

/// A write that needs a decision made above the store (a callback the writer thread cannot
/// borrow), taken before the write from what it expects to find, and checked in it.
enum Attempt<T, D> {
    Done(T),
    /// The row differs from what the decision was taken for: decide again for this.
    Redecide(D),
}

/// The SQLite store: one file, `testbot.db`, in the broker's data directory.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Arc<Writer>,
    readers: Arc<Readers>,
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
            .busy_timeout(BUSY_TIMEOUT);
        let mut migrate = SqliteConnection::connect_with(&options)
            .await
            .with_context(|| format!("Cannot open database {}", path.display()))?;
        MIGRATOR
            .run(&mut migrate)
            .await
            .with_context(|| format!("Cannot migrate database {}", path.display()))?;
        migrate.close().await?;
        let write = tokio::task::spawn_blocking({
            let path = path.clone();
            move || open_writer(&path)
        })
        .await?
        .with_context(|| format!("Cannot open database {} for writing", path.display()))?;
        let checkpointer = Checkpointer::start(
            SqliteConnection::connect_with(&options)
                .await
                .with_context(|| format!("Cannot open database {}", path.display()))?,
        );
        let wrote = checkpointer.wrote.clone();
        let writer = Writer::start(write, move || wrote.notify_one())
            .context("Cannot start the SQLite writer thread")?;
        let readers = Readers::open(&path, READ_CONNECTIONS)
            .with_context(|| format!("Cannot open database {} for reading", path.display()))?;
        Ok(SqliteStore {
            writer: Arc::new(writer),
            readers: Arc::new(readers),
            checkpointer,
        })
    }

    /// One column of a job's row, by a statement taking the job's id.
    async fn job_column(&self, id: JobId, sql: &'static str) -> StoreResult<Option<String>> {
        let value: Option<Option<String>> = self
            .readers
            .read(move |conn| {
                conn.prepare_cached(sql)?
                    .query_row([id.0], |row| row.get(0))
                    .optional()
            })
            .await?;
        Ok(value.flatten())
    }
}

/// The writing connection, set up as the read pool's (WAL, `synchronous = NORMAL`, foreign keys).
fn open_writer(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)?;
    Ok(conn)
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn shared(&self) -> bool {
        false
    }

    async fn lead_sweeper(&self) -> StoreResult<bool> {
        // One broker owns a SQLite database: it is always the sweeper.
        Ok(true)
    }

    async fn close(&self) {
        self.writer.close().await;
        self.checkpointer.stop().await;
        self.readers.close();
    }

    async fn health(&self) -> StoreResult<()> {
        let applied: Option<i64> = self
            .readers
            .read(|conn| {
                conn.prepare_cached("SELECT MAX(version) FROM _sqlx_migrations WHERE success")?
                    .query_row([], |row| row.get(0))
            })
            .await?;
        check_migrations(&MIGRATOR, applied)
    }

    async fn jobs_by_state(&self) -> StoreResult<Vec<(JobState, u64)>> {
        let rows: Vec<(String, i64)> = self
            .readers
            .read(|conn| {
                conn.prepare_cached(
                    "SELECT state, COUNT(*) FROM jobs GROUP BY state ORDER BY state",
                )?
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect()
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(state, n)| Some((state.parse().ok()?, n as u64)))
            .collect())
    }

    async fn last_sweep_ms(&self) -> StoreResult<Option<i64>> {
        self.readers
            .read(|conn| {
                conn.prepare_cached("SELECT last_sweep_ms FROM sweeps WHERE id = 1")?
                    .query_row([], |row| row.get(0))
                    .optional()
            })
            .await
    }

    async fn api_tokens(&self) -> StoreResult<Vec<ApiTokenModel>> {
        self.readers
            .read(|conn| {
                conn.prepare_cached("SELECT token_hash, role, name FROM api_tokens")?
                    .query_map([], |row| {
                        Ok(ApiTokenModel {
                            token_hash: row.get(0)?,
                            role: row.get(1)?,
                            name: row.get(2)?,
                        })
                    })?
                    .collect()
            })
            .await
    }

    async fn repo(&self, name: &str) -> StoreResult<Option<RepoModel>> {
        let name = name.to_owned();
        self.readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    repo_columns!(),
                    " FROM repos WHERE name = ?1"
                ))?
                .query_row([name], repo_row)
                .optional()
            })
            .await
    }

    async fn repos(&self) -> StoreResult<Vec<RepoModel>> {
        self.readers
            .read(|conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    repo_columns!(),
                    " FROM repos ORDER BY name"
                ))?
                .query_map([], repo_row)?
                .collect()
            })
            .await
    }

    async fn jti_used(&self, jti: &str) -> StoreResult<bool> {
        let jti = jti.to_owned();
        self.readers
            .read(move |conn| {
                conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM oidc_jtis WHERE jti = ?1)")?
                    .query_row([jti], |row| row.get(0))
            })
            .await
    }

    async fn submit_jti(&self, id: JobId) -> StoreResult<Option<String>> {
        self.job_column(id, "SELECT submit_jti FROM jobs WHERE id = ?1")
            .await
    }

    async fn site(&self, name: &str) -> StoreResult<Option<SiteModel>> {
        let name = name.to_owned();
        self.readers
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT name, created_at_ms, revoked_at_ms FROM sites WHERE name = ?1",
                )?
                .query_row([name], site_row)
                .optional()
            })
            .await
    }

    async fn sites(&self) -> StoreResult<Vec<SiteModel>> {
        self.readers
            .read(|conn| {
                conn.prepare_cached(
                    "SELECT name, created_at_ms, revoked_at_ms FROM sites ORDER BY name",
                )?
                .query_map([], site_row)?
                .collect()
            })
            .await
    }

    async fn enrollment_token_exists(&self, token_hash: &str) -> StoreResult<bool> {
        let token_hash = token_hash.to_owned();
        self.readers
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM enrollment_tokens WHERE token_hash = ?1)",
                )?
                .query_row([token_hash], |row| row.get(0))
            })
            .await
    }

    async fn agent(&self, id: &str) -> StoreResult<Option<AgentModel>> {
        let id = id.to_owned();
        self.readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    agent_columns!(),
                    " FROM agents JOIN sites ON sites.name = agents.site WHERE agents.id = ?1"
                ))?
                .query_row([id], agent_row)
                .optional()
            })
            .await
    }

    async fn agents(&self) -> StoreResult<Vec<AgentModel>> {
        self.readers
            .read(|conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    agent_columns!(),
                    " FROM agents JOIN sites ON sites.name = agents.site
                     ORDER BY agents.site, agents.name, agents.enrolled_at_ms"
                ))?
                .query_map([], agent_row)?
                .collect()
            })
            .await
    }

    async fn live_nonces(&self, now_ms: i64) -> StoreResult<Vec<(String, String, i64)>> {
        self.readers
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT agent_id, nonce, expires_at_ms FROM agent_nonces
                     WHERE expires_at_ms >= ?1",
                )?
                .query_map([now_ms], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect()
            })
            .await
    }

    async fn job(&self, id: JobId) -> StoreResult<Option<JobModel>> {
        self.readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE id = ?1"
                ))?
                .query_row([id.0], job_row)
                .optional()
            })
            .await
    }

    async fn jobs(
        &self,
        state: Option<JobState>,
        site: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<JobModel>> {
        let site = site.map(str::to_owned);
        self.readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs
                     WHERE (?1 IS NULL OR state = ?1)
                       AND (?3 IS NULL
                            OR EXISTS (SELECT 1 FROM json_each(jobs.labels)
                                       WHERE value = 'site:' || ?3)
                            OR substr(agent, 1, length(?3) + 1) = ?3 || '/')
                     ORDER BY id DESC LIMIT ?2"
                ))?
                .query_map(
                    params![state.map(|s| s.as_str()), i64::from(limit), site],
                    job_row,
                )?
                .collect()
            })
            .await
    }

    async fn queued_jobs(&self, after: i64, limit: i64) -> StoreResult<Vec<QueuedJob>> {
        let rows: Vec<RoutingRow> = self
            .readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    routing_columns!(),
                    " FROM jobs WHERE state = 'queued' AND id > ?1 ORDER BY id LIMIT ?2"
                ))?
                .query_map([after, limit], routing_row)?
                .collect()
            })
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
        let row: Option<RoutingRow> = self
            .readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    routing_columns!(),
                    " FROM jobs WHERE id = ?1"
                ))?
                .query_row([id.0], routing_row)
                .optional()
            })
            .await?;
        Ok(row.map(|row| row.routed()).transpose()?)
    }

    async fn job_releases(&self, id: JobId) -> StoreResult<Option<u32>> {
        let releases: Option<i64> = self
            .readers
            .read(move |conn| {
                conn.prepare_cached("SELECT releases FROM jobs WHERE id = ?1")?
                    .query_row([id.0], |row| row.get(0))
                    .optional()
            })
            .await?;
        Ok(releases.map(|r| r.clamp(0, i64::from(u32::MAX)) as u32))
    }

    async fn active_agent_offers(&self) -> StoreResult<Vec<AgentOffer>> {
        self.readers
            .read(|conn| {
                conn.prepare_cached(
                    "SELECT agents.site, agents.name, agents.policy, agents.offer FROM agents
                     JOIN sites ON sites.name = agents.site
                     WHERE agents.revoked_at_ms IS NULL AND sites.revoked_at_ms IS NULL",
                )?
                .query_map([], |row| {
                    Ok(AgentOffer {
                        site: row.get(0)?,
                        name: row.get(1)?,
                        policy: row.get(2)?,
                        offer: row.get(3)?,
                    })
                })?
                .collect()
            })
            .await
    }

    async fn expired_leases(&self, now_ms: i64) -> StoreResult<Vec<JobModel>> {
        self.readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs
                     WHERE state IN ('assigned', 'running') AND lease_expires_at_ms < ?1
                     ORDER BY id"
                ))?
                .query_map([now_ms], job_row)?
                .collect()
            })
            .await
    }

    async fn queued_jobs_of_repo(&self, repository: &str) -> StoreResult<i64> {
        let repository = repository.to_owned();
        self.readers
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT COUNT(*) FROM jobs WHERE repository = ?1 AND state = 'queued'",
                )?
                .query_row([repository], |row| row.get(0))
            })
            .await
    }

    async fn queued_jobs_for_site(&self, site: &str) -> StoreResult<i64> {
        let site = site.to_owned();
        self.readers
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT COUNT(*) FROM jobs
                     WHERE state = 'queued' AND repository IS NOT NULL
                       AND (EXISTS (SELECT 1 FROM json_each(jobs.labels)
                                    WHERE value = 'site:' || ?1)
                            OR jobs.sites = json_array(?1))",
                )?
                .query_row([site], |row| row.get(0))
            })
            .await
    }

    async fn stored_oidc_token(&self, id: JobId) -> StoreResult<Option<String>> {
        self.job_column(id, "SELECT oidc_token FROM jobs WHERE id = ?1")
            .await
    }

    async fn oldest_queued_at(&self) -> StoreResult<Option<i64>> {
        self.readers
            .read(|conn| {
                conn.prepare_cached("SELECT MIN(created_at_ms) FROM jobs WHERE state = 'queued'")?
                    .query_row([], |row| row.get(0))
            })
            .await
    }

    async fn read_log(&self, id: JobId, offset: u64, max_bytes: usize) -> StoreResult<Vec<u8>> {
        let end = i64::try_from(offset.saturating_add(max_bytes as u64)).unwrap_or(i64::MAX);
        self.readers
            .read(move |conn| {
                let mut chunks = conn.prepare_cached(
                    "SELECT start_offset, data FROM log_chunks
                     WHERE job_id = ?1 AND start_offset >= COALESCE(
                         (SELECT MAX(start_offset) FROM log_chunks
                          WHERE job_id = ?1 AND start_offset <= ?2), 0)
                       AND start_offset < ?3
                     ORDER BY start_offset LIMIT 256",
                )?;
                let mut rows = chunks.query(params![id.0, offset as i64, end])?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    let start = row.get::<_, i64>(0)? as u64;
                    let data = row.get_ref(1)?.as_blob()?;
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
            })
            .await
    }

    async fn use_nonce(
        &self,
        agent_id: &str,
        nonce: &str,
        expires_at_ms: i64,
    ) -> StoreResult<bool> {
        let (agent_id, nonce) = (agent_id.to_owned(), nonce.to_owned());
        self.writer
            .write(move |tx| {
                let inserted = tx
                    .prepare_cached(
                        "INSERT INTO agent_nonces (agent_id, nonce, expires_at_ms)
                         VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                    )?
                    .execute(params![agent_id, nonce, expires_at_ms])?;
                Ok(inserted == 1)
            })
            .await
    }

    async fn record_sweep(&self, now_ms: i64) -> StoreResult<()> {
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "INSERT INTO sweeps (id, last_sweep_ms) VALUES (1, ?1)
                     ON CONFLICT (id) DO UPDATE SET last_sweep_ms = excluded.last_sweep_ms",
                )?
                .execute([now_ms])?;
                Ok(())
            })
            .await
    }

    async fn upsert_api_token(&self, hash: &str, role: &str, name: &str) -> StoreResult<()> {
        let (hash, role, name) = (hash.to_owned(), role.to_owned(), name.to_owned());
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "INSERT INTO api_tokens (token_hash, role, name, created_at_ms)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (token_hash) DO UPDATE
                         SET role = excluded.role, name = excluded.name",
                )?
                .execute(params![hash, role, name, now_ms()])?;
                Ok(())
            })
            .await
    }

    async fn retire_api_tokens(&self, role: &str, name: &str, keep: &str) -> StoreResult<u64> {
        let (role, name, keep) = (role.to_owned(), name.to_owned(), keep.to_owned());
        self.writer
            .write(move |tx| {
                let deleted = tx
                    .prepare_cached(
                        "DELETE FROM api_tokens
                         WHERE role = ?1 AND name = ?2 AND token_hash != ?3",
                    )?
                    .execute(params![role, name, keep])?;
                Ok(deleted as u64)
            })
            .await
    }

    async fn insert_job(
        &self,
        spec: &JobSpec,
        origin: &JobOrigin,
        jti: Option<(&str, i64)>,
    ) -> StoreResult<Option<JobModel>> {
        let stored = StoredJob::new(spec, origin)?;
        let origin = origin.clone();
        let jti = jti.map(|(jti, expires_at)| (jti.to_owned(), expires_at));
        self.writer
            .write(move |tx| {
                if let Some((jti, expires_at)) = &jti
                    && !record_jti(tx, jti, *expires_at)?
                {
                    return Ok(None);
                }
                let jti = jti.as_ref().map(|(jti, _)| jti.as_str());
                insert_job_row(tx, &stored, &origin, jti, None).map(Some)
            })
            .await
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
        let origin = origin.clone();
        let jti = jti.map(|(jti, expires_at)| (jti.to_owned(), expires_at));
        self.writer
            .write(move |tx| {
                if let Some((jti, expires_at)) = &jti
                    && !record_jti(tx, jti, *expires_at)?
                {
                    return Ok(None);
                }
                let batch = insert_batch_row(tx, runs, &origin, until.as_deref())?;
                let jti = jti.as_ref().map(|(jti, _)| jti.as_str());
                let jobs = (1..=runs)
                    .map(|run| {
                        insert_job_row(tx, &stored, &origin, jti, Some((batch.id, run, runs)))
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(Some((batch, jobs)))
            })
            .await
    }

    async fn batch(&self, id: BatchId) -> StoreResult<Option<BatchModel>> {
        self.readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    batch_columns!(),
                    " FROM batches WHERE id = ?1"
                ))?
                .query_row([id.0], batch_row)
                .optional()
            })
            .await
    }

    async fn batch_jobs(&self, id: BatchId) -> StoreResult<Vec<JobModel>> {
        self.readers
            .read(move |conn| {
                conn.prepare_cached(concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE batch_id = ?1 ORDER BY batch_run"
                ))?
                .query_map([id.0], job_row)?
                .collect()
            })
            .await
    }

    async fn use_jti(&self, jti: &str, expires_at: i64) -> StoreResult<bool> {
        let jti = jti.to_owned();
        self.writer
            .write(move |tx| record_jti(tx, &jti, expires_at))
            .await
    }

    async fn prune_jtis(&self, now_secs: i64) -> StoreResult<u64> {
        self.writer
            .write(move |tx| {
                let deleted = tx
                    .prepare_cached("DELETE FROM oidc_jtis WHERE expires_at < ?1")?
                    .execute([now_secs])?;
                Ok(deleted as u64)
            })
            .await
    }

    async fn bind_repo_ids(
        &self,
        name: &str,
        ids: &RepositoryIds,
    ) -> StoreResult<Option<RepositoryIds>> {
        let (name, ids) = (name.to_owned(), ids.clone());
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "UPDATE repos SET repository_id = coalesce(repository_id, ?2),
                         repository_owner_id = CASE WHEN repository_id IS NULL THEN ?3
                                                    ELSE repository_owner_id END
                     WHERE name = ?1
                     RETURNING repository_id, repository_owner_id",
                )?
                .query_row(
                    params![name, ids.repository_id, ids.repository_owner_id],
                    |row| {
                        Ok(RepositoryIds {
                            repository_id: row.get(0)?,
                            repository_owner_id: row.get(1)?,
                        })
                    },
                )
                .optional()
            })
            .await
    }

    async fn upsert_repo(
        &self,
        name: &str,
        settings: &str,
        registered_by: &str,
        ids: Option<&RepositoryIds>,
        jti: Option<(&str, i64)>,
    ) -> StoreResult<Option<RepoModel>> {
        let (name, settings, registered_by) = (
            name.to_owned(),
            settings.to_owned(),
            registered_by.to_owned(),
        );
        let ids = ids.cloned();
        let jti = jti.map(|(jti, expires_at)| (jti.to_owned(), expires_at));
        self.writer
            .write(move |tx| {
                if let Some((jti, expires_at)) = &jti
                    && !record_jti(tx, jti, *expires_at)?
                {
                    return Ok(None);
                }
                let repo = tx
                    .prepare_cached(concat!(
                        "INSERT INTO repos (name, settings, registered_by, created_at_ms,
                             updated_at_ms, repository_id, repository_owner_id)
                         VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6)
                         ON CONFLICT (name) DO UPDATE SET settings = excluded.settings,
                             registered_by = excluded.registered_by,
                             updated_at_ms = excluded.updated_at_ms,
                             repository_id = coalesce(excluded.repository_id, repos.repository_id),
                             repository_owner_id = CASE WHEN excluded.repository_id IS NULL
                                 THEN repos.repository_owner_id
                                 ELSE excluded.repository_owner_id END
                         RETURNING ",
                        repo_columns!()
                    ))?
                    .query_row(
                        params![
                            name,
                            settings,
                            registered_by,
                            now_ms(),
                            ids.as_ref().map(|ids| &ids.repository_id),
                            ids.as_ref()
                                .and_then(|ids| ids.repository_owner_id.as_ref()),
                        ],
                        repo_row,
                    )?;
                Ok(Some(repo))
            })
            .await
    }

    async fn insert_repo_if_absent(
        &self,
        name: &str,
        settings: &str,
        registered_by: &str,
        ids: &RepositoryIds,
        jti: Option<(&str, i64)>,
    ) -> StoreResult<FirstRegistration> {
        let (name, settings, registered_by) = (
            name.to_owned(),
            settings.to_owned(),
            registered_by.to_owned(),
        );
        let ids = ids.clone();
        let jti = jti.map(|(jti, expires_at)| (jti.to_owned(), expires_at));
        // A registration that exists already leaves the token unused.
        let registration = self
            .writer
            .write_or_undo(move |tx| {
                if let Some((jti, expires_at)) = &jti
                    && !record_jti(tx, jti, *expires_at)?
                {
                    return Ok(Err(FirstRegistration::Replayed));
                }
                let repo = tx
                    .prepare_cached(concat!(
                        "INSERT INTO repos (name, settings, registered_by, created_at_ms,
                             updated_at_ms, repository_id, repository_owner_id)
                         VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6)
                         ON CONFLICT (name) DO NOTHING
                         RETURNING ",
                        repo_columns!()
                    ))?
                    .query_row(
                        params![
                            name,
                            settings,
                            registered_by,
                            now_ms(),
                            ids.repository_id,
                            ids.repository_owner_id,
                        ],
                        repo_row,
                    )
                    .optional()?;
                Ok(repo
                    .map(FirstRegistration::Created)
                    .ok_or(FirstRegistration::Exists))
            })
            .await?;
        Ok(registration.unwrap_or_else(|refused| refused))
    }

    async fn create_site(&self, name: &str) -> StoreResult<Option<SiteModel>> {
        let name = name.to_owned();
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "INSERT INTO sites (name, created_at_ms) VALUES (?1, ?2)
                     ON CONFLICT (name) DO NOTHING
                     RETURNING name, created_at_ms, revoked_at_ms",
                )?
                .query_row(params![name, now_ms()], |row| {
                    Ok(SiteModel {
                        name: row.get(0)?,
                        created_at_ms: row.get(1)?,
                        revoked_at_ms: row.get(2)?,
                    })
                })
                .optional()
            })
            .await
    }

    async fn revoke_site(&self, name: &str) -> StoreResult<bool> {
        let name = name.to_owned();
        self.writer
            .write(move |tx| {
                let found = tx
                    .prepare_cached(
                        "UPDATE sites SET revoked_at_ms = coalesce(revoked_at_ms, ?2)
                         WHERE name = ?1",
                    )?
                    .execute(params![name, now_ms()])?
                    > 0;
                tx.prepare_cached("DELETE FROM enrollment_tokens WHERE site = ?1")?
                    .execute([&name])?;
                Ok(found)
            })
            .await
    }

    async fn create_enrollment_token(
        &self,
        token_hash: &str,
        site: &str,
        uses: u32,
        expires_at_ms: i64,
    ) -> StoreResult<()> {
        let (token_hash, site) = (token_hash.to_owned(), site.to_owned());
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "INSERT INTO enrollment_tokens
                         (token_hash, site, uses_left, expires_at_ms, created_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    token_hash,
                    site,
                    i64::from(uses),
                    expires_at_ms,
                    now_ms()
                ])?;
                Ok(())
            })
            .await
    }

    async fn enroll_agent(
        &self,
        token_hash: &str,
        id: &str,
        name: &str,
        public_key: &[u8],
        policy: Option<&str>,
    ) -> StoreResult<Result<AgentModel, EnrollRefusal>> {
        let (token_hash, id, name) = (token_hash.to_owned(), id.to_owned(), name.to_owned());
        let public_key = public_key.to_vec();
        let policy = policy.map(str::to_owned);
        self.writer
            .write_or_undo(move |tx| {
                let now = now_ms();
                let token: Option<(String, i64, i64)> = tx
                    .prepare_cached(
                        "SELECT site, uses_left, expires_at_ms FROM enrollment_tokens
                         WHERE token_hash = ?1",
                    )?
                    .query_row([&token_hash], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })
                    .optional()?;
                let Some((site, uses_left, expires_at_ms)) = token else {
                    return Ok(Err(EnrollRefusal::UnknownToken));
                };
                if expires_at_ms <= now {
                    return Ok(Err(EnrollRefusal::Expired));
                }
                if uses_left <= 0 {
                    return Ok(Err(EnrollRefusal::UsedUp));
                }
                let site_revoked: Option<i64> = tx
                    .prepare_cached("SELECT revoked_at_ms FROM sites WHERE name = ?1")?
                    .query_row([&site], |row| row.get(0))?;
                if site_revoked.is_some() {
                    return Ok(Err(EnrollRefusal::SiteRevoked(site)));
                }
                let key_taken: bool = tx
                    .prepare_cached("SELECT EXISTS (SELECT 1 FROM agents WHERE public_key = ?1)")?
                    .query_row([&public_key], |row| row.get(0))?;
                if key_taken {
                    return Ok(Err(EnrollRefusal::KeyTaken));
                }
                tx.prepare_cached(
                    "UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE token_hash = ?1",
                )?
                .execute([&token_hash])?;
                let inserted = tx
                    .prepare_cached(
                        "INSERT INTO agents (id, site, name, public_key, policy, enrolled_at_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                    )?
                    .execute(params![id, site, name, public_key, policy, now])?;
                if inserted == 0 {
                    // Undoes the token's use.
                    return Ok(Err(EnrollRefusal::NameTaken { site, name }));
                }
                let agent = tx
                    .prepare_cached(concat!(
                        "SELECT ",
                        agent_columns!(),
                        " FROM agents JOIN sites ON sites.name = agents.site
                         WHERE agents.id = ?1"
                    ))?
                    .query_row([&id], agent_row)?;
                Ok(Ok(agent))
            })
            .await
    }

    async fn revoke_agent(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_owned();
        self.writer
            .write(move |tx| {
                let found = tx
                    .prepare_cached(
                        "UPDATE agents SET revoked_at_ms = coalesce(revoked_at_ms, ?2)
                         WHERE id = ?1",
                    )?
                    .execute(params![id, now_ms()])?;
                Ok(found > 0)
            })
            .await
    }

    async fn insert_nonces(&self, nonces: &[(String, String, i64)]) -> StoreResult<()> {
        let nonces = nonces.to_vec();
        self.writer
            .write(move |tx| {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO agent_nonces (agent_id, nonce, expires_at_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT DO NOTHING",
                )?;
                for (agent_id, nonce, expires_at_ms) in &nonces {
                    insert.execute(params![agent_id, nonce, expires_at_ms])?;
                }
                Ok(())
            })
            .await
    }

    async fn prune_nonces(&self, now_ms: i64) -> StoreResult<u64> {
        self.writer
            .write(move |tx| {
                let deleted = tx
                    .prepare_cached("DELETE FROM agent_nonces WHERE expires_at_ms < ?1")?
                    .execute([now_ms])?;
                Ok(deleted as u64)
            })
            .await
    }

    async fn delete_repo(&self, name: &str) -> StoreResult<bool> {
        let name = name.to_owned();
        self.writer
            .write(move |tx| {
                let deleted = tx
                    .prepare_cached("DELETE FROM repos WHERE name = ?1")?
                    .execute([&name])?;
                Ok(deleted > 0)
            })
            .await
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
        // Where the next page starts in the queue's order: after this (priority, id).
        let mut after = (super::Priority::Interactive as i64, 0i64);
        loop {
            let (labels, agent, wanted) = (labels.clone(), taker.agent.to_owned(), offer.clone());
            // The queue is read row by row, only up to the first job the agent may take.
            let scan = self
                .readers
                .read(move |conn| {
                    let mut scan = conn.prepare_cached(CLAIM_SCAN)?;
                    let mut rows = scan.query(params![
                        after.1,
                        labels,
                        wanted.site,
                        wanted.executor,
                        workflow_only,
                        operator_only,
                        agent,
                        now_ms(),
                        after.0,
                    ])?;
                    let (mut admitted, mut last) = (Vec::new(), None);
                    while let Some(row) = rows.next()? {
                        let row = routing_row(row)?;
                        if row.routed().is_ok_and(|job| wanted.admits(&job).is_ok()) {
                            admitted.push((row.priority, row.id));
                            if admitted.len() == CLAIM_CANDIDATES {
                                break;
                            }
                        }
                        last = Some((row.priority, row.id));
                    }
                    drop(rows);
                    Ok(match last {
                        _ if !admitted.is_empty() => Scan::Admitted(admitted),
                        Some(last) => Scan::ReadOn(last),
                        None => {
                            let next: Option<i64> = conn
                                .prepare_cached(NEXT_PRIORITY)?
                                .query_row([after.0], |row| row.get(0))?;
                            match next {
                                Some(priority) => Scan::ReadOn((priority, 0)),
                                None => Scan::End,
                            }
                        }
                    })
                })
                .await?;
            let candidates = match scan {
                Scan::Admitted(candidates) => candidates,
                Scan::ReadOn(last) => {
                    after = last;
                    continue;
                }
                Scan::End => return Ok(None),
            };
            after = *candidates.last().expect("not empty");
            let (agent, lease, site) =
                (taker.agent.to_owned(), lease.to_owned(), offer.site.clone());
            let claimed = self
                .writer
                .write(move |tx| {
                    let mut claim = tx.prepare_cached(concat!(
                        "UPDATE jobs SET state = 'assigned', agent = ?1, lease = ?2,
                             lease_expires_at_ms = ?3, attempts = attempts + 1, reason = NULL
                         WHERE id = ?4 AND state = 'queued'
                           AND (?5 IS NULL OR (
                               SELECT COUNT(*) FROM jobs AS busy
                               WHERE busy.state IN ('assigned', 'running')
                                 AND substr(busy.agent, 1, length(?6) + 1) = ?6 || '/') < ?5)
                         RETURNING ",
                        job_columns!()
                    ))?;
                    let mut state = tx.prepare_cached("SELECT state FROM jobs WHERE id = ?1")?;
                    for (_, id) in candidates {
                        let claimed = claim
                            .query_row(
                                params![agent, lease, lease_expires_at_ms, id, cap, site],
                                job_row,
                            )
                            .optional()?;
                        if let Some(job) = claimed {
                            return Ok(Claim::Claimed(Box::new(job)));
                        }
                        let now: Option<String> =
                            state.query_row([id], |row| row.get(0)).optional()?;
                        if now.as_deref() == Some("queued") {
                            return Ok(Claim::SiteFull);
                        }
                    }
                    Ok(Claim::Taken)
                })
                .await?;
            match claimed {
                Claim::Claimed(job) => return Ok(Some(*job)),
                Claim::SiteFull => return Ok(None),
                // Other agents claimed them meanwhile: read on.
                Claim::Taken => {}
            }
        }
    }

    async fn record_offer(&self, id: &str, policy: Option<&str>, offer: &str) -> StoreResult<()> {
        let (id, offer) = (id.to_owned(), offer.to_owned());
        let policy = policy.map(str::to_owned);
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "UPDATE agents SET policy = ?2, offer = ?3, last_seen_ms = ?4 WHERE id = ?1",
                )?
                .execute(params![id, policy, offer, now_ms()])?;
                Ok(())
            })
            .await
    }

    async fn release_job(
        &self,
        id: JobId,
        release: &Release<'_>,
        decide: &(dyn Fn(u32) -> Transition + Send + Sync),
    ) -> StoreResult<Result<JobModel, LeaseRefusal>> {
        // The decision depends on how often the job was released; the write checks that the
        // count it was taken for still holds.
        let mut releases = self.job_releases(id).await?.unwrap_or(0);
        loop {
            let to = decide(releases);
            let (lease, agent) = (release.lease.to_owned(), release.agent.to_owned());
            let hold_until_ms = release.hold_until_ms;
            let attempt = self
                .writer
                .write(move |tx| {
                    let current: Option<i64> = tx
                        .prepare_cached(
                            "SELECT releases FROM jobs
                             WHERE id = ?1 AND lease = ?2 AND state IN ('assigned', 'running')",
                        )?
                        .query_row(params![id.0, lease], |row| row.get(0))
                        .optional()?;
                    let Some(current) = current else {
                        return Ok(Attempt::Done(Err(lease_refusal(tx, id)?)));
                    };
                    let current = current.clamp(0, i64::from(u32::MAX)) as u32;
                    if current != releases {
                        return Ok(Attempt::Redecide(current));
                    }
                    let updated = tx
                        .prepare_cached(concat!(
                            "UPDATE jobs SET state = ?2, reason = ?3, lease = NULL,
                                 lease_expires_at_ms = NULL,
                                 attempts = MAX(attempts - 1, 0), releases = releases + 1,
                                 started_at_ms = CASE WHEN ?2 = 'queued' THEN NULL
                                                      ELSE started_at_ms END,
                                 finished_at_ms = ?4, cause = ?5
                             WHERE id = ?1 RETURNING ",
                            job_columns!()
                        ))?
                        .query_row(
                            params![
                                id.0,
                                to.state.as_str(),
                                to.reason,
                                to.state.is_terminal().then(now_ms),
                                to.cause.map(FailureCause::as_str),
                            ],
                            job_row,
                        )?;
                    if to.state == JobState::Queued {
                        tx.prepare_cached(
                            "INSERT INTO job_holds (job_id, agent, until_ms) VALUES (?1, ?2, ?3)
                             ON CONFLICT (job_id, agent) DO UPDATE SET until_ms = excluded.until_ms",
                        )?
                        .execute(params![id.0, agent, hold_until_ms])?;
                    }
                    let log_bytes =
                        append_raw(tx, id, updated.log_bytes as u64, to.log_line.as_bytes())?;
                    Ok(Attempt::Done(Ok(JobModel {
                        log_bytes: log_bytes as i64,
                        ..updated
                    })))
                })
                .await?;
            match attempt {
                Attempt::Done(done) => return Ok(done),
                Attempt::Redecide(current) => releases = current,
            }
        }
    }

    async fn end_holds(&self, now_ms: i64) -> StoreResult<Vec<JobId>> {
        self.writer
            .write(move |tx| {
                let ended: Vec<i64> = tx
                    .prepare_cached("DELETE FROM job_holds WHERE until_ms <= ?1 RETURNING job_id")?
                    .query_map([now_ms], |row| row.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                let mut state = tx.prepare_cached("SELECT state FROM jobs WHERE id = ?1")?;
                let mut queued = Vec::new();
                for id in ended {
                    let now: Option<String> = state.query_row([id], |row| row.get(0)).optional()?;
                    if now.as_deref() == Some("queued") {
                        queued.push(JobId(id));
                    }
                }
                queued.sort();
                queued.dedup();
                Ok(queued)
            })
            .await
    }

    async fn set_metadata(
        &self,
        id: JobId,
        lease: &str,
        key: &str,
        value: &str,
    ) -> StoreResult<Result<JobModel, LeaseRefusal>> {
        let (lease, key, value) = (lease.to_owned(), key.to_owned(), value.to_owned());
        self.writer
            .write(move |tx| {
                let job = tx
                    .prepare_cached(concat!(
                        "UPDATE jobs SET metadata = json_set(coalesce(metadata, '{}'), '$.' || ?3, ?4)
                         WHERE id = ?1 AND lease = ?2 AND state IN ('assigned', 'running')
                         RETURNING ",
                        job_columns!()
                    ))?
                    .query_row(params![id.0, lease, key, value], job_row)
                    .optional()?;
                Ok(match job {
                    Some(job) => Ok(job),
                    None => Err(lease_refusal(tx, id)?),
                })
            })
            .await
    }

    async fn start_job(
        &self,
        id: JobId,
        lease: &str,
        lease_expires_at_ms: i64,
    ) -> StoreResult<Result<LeaseRenewal, LeaseRefusal>> {
        let lease = lease.to_owned();
        self.writer
            .write(move |tx| {
                let renewal = tx
                    .prepare_cached(
                        "UPDATE jobs SET state = 'running', started_at_ms = ?3,
                             lease_expires_at_ms = ?4
                         WHERE id = ?1 AND lease = ?2 AND state IN ('assigned', 'running')
                         RETURNING cancel_requested, log_bytes",
                    )?
                    .query_row(
                        params![id.0, lease, now_ms(), lease_expires_at_ms],
                        renewal_row,
                    )
                    .optional()?;
                Ok(match renewal {
                    Some(renewal) => Ok(renewal),
                    None => Err(lease_refusal(tx, id)?),
                })
            })
            .await
    }

    async fn renew_lease(
        &self,
        id: JobId,
        lease: &str,
        lease_expires_at_ms: i64,
    ) -> StoreResult<Result<LeaseRenewal, LeaseRefusal>> {
        let lease = lease.to_owned();
        self.writer
            .write(move |tx| {
                let renewal = tx
                    .prepare_cached(
                        "UPDATE jobs SET lease_expires_at_ms = MAX(lease_expires_at_ms, ?3)
                         WHERE id = ?1 AND lease = ?2 AND state IN ('assigned', 'running')
                         RETURNING cancel_requested, log_bytes",
                    )?
                    .query_row(params![id.0, lease, lease_expires_at_ms], renewal_row)
                    .optional()?;
                Ok(match renewal {
                    Some(renewal) => Ok(renewal),
                    None => Err(lease_refusal(tx, id)?),
                })
            })
            .await
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
        let data: Arc<[u8]> = data.into();
        // The notice of a cut depends on where the log is cut; it is made here (the writer
        // thread cannot borrow `cut`) when a first write finds that it is needed.
        let mut notice: Option<(u64, LogCut)> = None;
        loop {
            let (lease, data) = (lease.to_owned(), data.clone());
            let attempt = self
                .writer
                .write(move |tx| {
                    let row: Option<(Option<String>, String, i64, bool)> = tx
                        .prepare_cached(
                            "SELECT lease, state, log_bytes,
                                 json_extract(metadata, '$.log_truncated') IS NOT NULL
                             FROM jobs WHERE id = ?1",
                        )?
                        .query_row([id.0], |row| {
                            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                        })
                        .optional()?;
                    let row = row.as_ref().map(|(lease, state, log_bytes, cut)| LogRow {
                        lease: lease.as_deref(),
                        state,
                        log_bytes: *log_bytes as u64,
                        cut: *cut,
                    });
                    let log_bytes = row.as_ref().map_or(0, |row| row.log_bytes);
                    let bytes = match plan_append(row, &lease, offset, &data, max_log_bytes) {
                        AppendPlan::Answer(answer) => return Ok(Attempt::Done(answer)),
                        AppendPlan::Store(bytes) => {
                            let total = append_raw(tx, id, log_bytes, bytes)?;
                            return Ok(Attempt::Done(AppendResult::Appended(total)));
                        }
                        AppendPlan::Cut(bytes) => bytes,
                    };
                    let kept = log_bytes + bytes.len() as u64;
                    let notice = match notice {
                        Some((at, notice)) if at == kept => notice,
                        _ => return Ok(Attempt::Redecide(kept)),
                    };
                    append_raw(tx, id, log_bytes, bytes)?;
                    let total = append_raw(tx, id, kept, notice.log_line.as_bytes())?;
                    tx.prepare_cached(
                        "UPDATE jobs
                         SET metadata = json_set(coalesce(metadata, '{}'), '$.log_truncated', ?2)
                         WHERE id = ?1",
                    )?
                    .execute(params![id.0, notice.note])?;
                    Ok(Attempt::Done(AppendResult::TooLarge { log_bytes: total }))
                })
                .await?;
            match attempt {
                Attempt::Done(answer) => return Ok(answer),
                Attempt::Redecide(kept) => notice = Some((kept, cut(kept))),
            }
        }
    }

    async fn finish_job(
        &self,
        id: JobId,
        lease: &str,
        outcome: &Outcome,
    ) -> StoreResult<Result<JobModel, LeaseRefusal>> {
        let (lease, outcome) = (lease.to_owned(), outcome.clone());
        self.writer
            .write(move |tx| {
                let job = tx
                    .prepare_cached(concat!(
                        "UPDATE jobs SET state = ?3, reason = ?4, exit_code = ?5, signal = ?6,
                             finished_at_ms = ?7, lease = NULL, lease_expires_at_ms = NULL,
                             cause = ?8
                         WHERE id = ?1 AND lease = ?2 AND state IN ('assigned', 'running')
                         RETURNING ",
                        job_columns!()
                    ))?
                    .query_row(
                        params![
                            id.0,
                            lease,
                            outcome.state.as_str(),
                            outcome.reason,
                            outcome.exit_code,
                            outcome.signal,
                            now_ms(),
                            outcome.cause().map(FailureCause::as_str),
                        ],
                        job_row,
                    )
                    .optional()?;
                Ok(match job {
                    Some(job) => Ok(job),
                    None => Err(lease_refusal(tx, id)?),
                })
            })
            .await
    }

    async fn request_cancel(
        &self,
        id: JobId,
        queued: &Transition,
    ) -> StoreResult<Option<JobModel>> {
        let queued = queued.clone();
        self.writer
            .write(move |tx| {
                let row: Option<(String, i64)> = tx
                    .prepare_cached("SELECT state, log_bytes FROM jobs WHERE id = ?1")?
                    .query_row([id.0], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()?;
                let Some((state, log_bytes)) = row else {
                    return Ok(None);
                };
                match state.parse::<JobState>().unwrap_or(JobState::Error) {
                    JobState::Queued => {
                        tx.prepare_cached(
                            "UPDATE jobs SET state = ?2, reason = ?3, finished_at_ms = ?4,
                                 cancel_requested = 1, cause = ?5
                             WHERE id = ?1",
                        )?
                        .execute(params![
                            id.0,
                            queued.state.as_str(),
                            queued.reason,
                            queued.state.is_terminal().then(now_ms),
                            queued.cause.map(FailureCause::as_str),
                        ])?;
                        append_raw(tx, id, log_bytes as u64, queued.log_line.as_bytes())?;
                    }
                    JobState::Assigned | JobState::Running => {
                        tx.prepare_cached("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1")?
                            .execute([id.0])?;
                    }
                    _ => {}
                }
                tx.prepare_cached(concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE id = ?1"
                ))?
                .query_row([id.0], job_row)
                .map(Some)
            })
            .await
    }

    async fn expire_lease(
        &self,
        id: JobId,
        lease: &str,
        now_ms: i64,
        to: &Transition,
    ) -> StoreResult<Result<JobModel, LeaseRefusal>> {
        let (lease, to) = (lease.to_owned(), to.clone());
        self.writer
            .write(move |tx| {
                let updated = tx
                    .prepare_cached(concat!(
                        "UPDATE jobs SET state = ?3, reason = ?4, lease = NULL,
                             lease_expires_at_ms = NULL, finished_at_ms = ?5, cause = ?7
                         WHERE id = ?1 AND lease = ?2 AND state IN ('assigned', 'running')
                           AND lease_expires_at_ms < ?6
                         RETURNING ",
                        job_columns!()
                    ))?
                    .query_row(
                        params![
                            id.0,
                            lease,
                            to.state.as_str(),
                            to.reason,
                            to.state.is_terminal().then_some(now_ms),
                            now_ms,
                            to.cause.map(FailureCause::as_str),
                        ],
                        job_row,
                    )
                    .optional()?;
                let Some(updated) = updated else {
                    return Ok(Err(lease_refusal(tx, id)?));
                };
                let log_bytes =
                    append_raw(tx, id, updated.log_bytes as u64, to.log_line.as_bytes())?;
                Ok(Ok(JobModel {
                    log_bytes: log_bytes as i64,
                    ..updated
                }))
            })
            .await
    }

    async fn extend_active_leases(&self, until_ms: i64) -> StoreResult<u64> {
        self.writer
            .write(move |tx| {
                let extended = tx
                    .prepare_cached(
                        "UPDATE jobs SET lease_expires_at_ms = MAX(lease_expires_at_ms, ?1)
                         WHERE state IN ('assigned', 'running')",
                    )?
                    .execute([until_ms])?;
                Ok(extended as u64)
            })
            .await
    }

    async fn delete_jobs_finished_before(&self, cutoff_ms: i64, limit: i64) -> StoreResult<u64> {
        self.writer
            .write(move |tx| {
                tx.prepare_cached(
                    "DELETE FROM log_chunks WHERE job_id IN (
                         SELECT id FROM jobs WHERE finished_at_ms < ?1
                         ORDER BY finished_at_ms LIMIT ?2)",
                )?
                .execute([cutoff_ms, limit])?;
                let deleted = tx
                    .prepare_cached(
                        "DELETE FROM jobs WHERE id IN (
                             SELECT id FROM jobs WHERE finished_at_ms < ?1
                             ORDER BY finished_at_ms LIMIT ?2)",
                    )?
                    .execute([cutoff_ms, limit])?;
                // A batch goes with its last run; statistics with the last run they count.
                tx.prepare_cached(
                    "DELETE FROM batches WHERE created_at_ms < ?1
                       AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.batch_id = batches.id)",
                )?
                .execute([cutoff_ms])?;
                tx.prepare_cached("DELETE FROM test_commit_stats WHERE last_at_ms < ?1")?
                    .execute([cutoff_ms])?;
                tx.prepare_cached("DELETE FROM test_stats WHERE last_bad_at_ms < ?1")?
                    .execute([cutoff_ms])?;
                Ok(deleted as u64)
            })
            .await
    }
}
