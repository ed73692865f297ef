//! Process wiring: open the database, load tokens, bind, serve, sweep expired leases, shut down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};
use testbot_proto::now_ms;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use testbot_proto::oidc::{KeySet, OidcSettings, OidcVerifier};

use crate::auth::{Authenticator, Role};
use crate::state::{AppState, Settings};
use crate::store::SharedStore;

/// Everything needed to start a broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    /// Holds `testbot.db` (unless `database_url` names another database), `admin.token` and
    /// `agent.token`.
    pub data_dir: PathBuf,
    /// The database; `None`: SQLite in `data_dir`.
    pub database_url: Option<String>,
    pub settings: Settings,
    /// Which workflow OIDC tokens are accepted; `None`: none are.
    pub oidc: Option<OidcSettings>,
    /// A fixed key set for the OIDC issuer instead of fetching it (air-gapped brokers, tests).
    pub oidc_keys: Option<KeySet>,
    /// The GitHub REST API, for checking a user token's permission on a repository.
    pub github_api_url: String,
    /// The bearer token `/metrics` asks for; `None`: it is open.
    pub metrics_token: Option<SecretString>,
    /// The GitHub App this broker runs; `None`: no App (webhooks answer 404).
    pub github_app: Option<GitHubAppConfig>,
}

/// What the broker needs to run the GitHub App.
#[derive(Debug, Clone)]
pub struct GitHubAppConfig {
    pub credentials: crate::github::app::AppCredentials,
    /// The broker's URL as users reach it, for the links the App posts.
    pub public_url: String,
}

impl BrokerConfig {
    /// Defaults for a broker on `listen` storing its data in `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        BrokerConfig {
            listen,
            data_dir,
            database_url: None,
            settings: Settings {
                lease_ttl: Duration::from_secs(30),
                heartbeat_interval: Duration::from_secs(10),
                max_attempts: 3,
                poll_timeout: Duration::from_secs(30),
                max_log_bytes: 64 * 1024 * 1024,
                max_body_bytes: 1024 * 1024,
                allow_self_registration: false,
                limits: crate::limits::Limits::default(),
                request_timeout: Duration::from_secs(60),
                max_log_followers: crate::limits::DEFAULT_MAX_LOG_FOLLOWERS,
                max_connections: crate::connections::DEFAULT_MAX_CONNECTIONS,
                header_read_timeout: crate::connections::DEFAULT_HEADER_READ_TIMEOUT,
            },
            oidc: None,
            oidc_keys: None,
            github_api_url: crate::github::GITHUB_API_URL.into(),
            metrics_token: None,
            github_app: None,
        }
    }
}

/// How often ids of expired OIDC tokens are forgotten.
const JTI_PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// A running broker.
pub struct Broker {
    pub addr: SocketAddr,
    /// The operator token (also in `data_dir/admin.token`).
    pub admin_token: SecretString,
    shutdown: CancellationToken,
    server: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    /// Sends and hears job events to and from other brokers sharing the database.
    relay: Option<JoinHandle<()>>,
    metrics_events: JoinHandle<()>,
    /// Stops batches whose runs can say what their stopping rule asks.
    batch_stopper: JoinHandle<()>,
    /// The GitHub App's delivery consumer, check-run syncer, scheduler, bisector and history
    /// filler.
    github_tasks: Vec<JoinHandle<()>>,
    store: SharedStore,
}

impl Broker {
    /// Opens the data directory, binds `config.listen` and starts serving in the background.
    pub async fn start(config: BrokerConfig) -> anyhow::Result<Broker> {
        let BrokerConfig {
            listen,
            data_dir,
            database_url,
            settings,
            oidc,
            oidc_keys,
            github_api_url,
            metrics_token,
            github_app,
        } = config;
        // The token files live here whichever database holds the jobs.
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("Cannot create data directory {}", data_dir.display()))?;
        let db = crate::store::open(database_url.as_deref(), &data_dir).await?;
        let verifier = oidc.map(|settings| match oidc_keys {
            Some(keys) => OidcVerifier::with_keys(settings, keys),
            None => OidcVerifier::new(settings),
        });
        let auth = Authenticator::load(&*db, verifier).await?;
        let admin_token = auth
            .ensure_token_file(&*db, Role::Operator, "admin", &data_dir.join("admin.token"))
            .await?;
        extend_leases_after_downtime(&*db, &settings).await?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("Cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        // Brokers sharing a PostgreSQL database hear each other's job events.
        let relay = db.shared().then(crate::store::notify::Relay::new);
        let wiring = crate::state::Wiring::with(
            relay
                .iter()
                .map(|r| r.outbox.clone() as Arc<dyn crate::lifecycle::events::Subscriber>)
                .collect(),
        );
        let state = AppState {
            store: db.clone(),
            auth,
            bus: wiring.bus,
            dispatcher: wiring.dispatcher,
            log_watchers: wiring.log_watchers,
            control_watchers: wiring.control_watchers,
            settings: Arc::new(settings),
            shutdown: shutdown.clone(),
            github: crate::github::GitHubApi::new(github_api_url.clone()),
            github_app: github_app.map(|app| {
                crate::github::GitHubApp::new(app.credentials, &github_api_url, &app.public_url)
            }),
            nonces: Arc::new(crate::nonces::NonceGuard::load(&*db, now_ms()).await?),
            log_followers: Arc::default(),
            metrics: Arc::new(crate::metrics::Metrics::new(metrics_token.as_ref())?),
        };
        let relay = match (relay, database_url.as_deref()) {
            (Some(relay), Some(url)) => Some(
                relay
                    .start(url, state.bus.clone(), db.clone(), shutdown.clone())
                    .await?,
            ),
            _ => None,
        };
        let sweeper = tokio::spawn(sweep_leases(state.clone()));
        let batch_stopper = tokio::spawn(crate::lifecycle::batches::run_stopper(state.clone()));
        let github_tasks = match &state.github_app {
            Some(app) => vec![
                tokio::spawn(crate::github::process::run_consumer(
                    state.clone(),
                    app.clone(),
                )),
                tokio::spawn(crate::github::checks::run_syncer(
                    state.clone(),
                    app.clone(),
                )),
                tokio::spawn(crate::github::schedule::run_scheduler(
                    state.clone(),
                    app.clone(),
                )),
                tokio::spawn(crate::github::bisect::run_bisector(
                    state.clone(),
                    app.clone(),
                )),
                tokio::spawn(crate::github::history::run_filler(
                    state.clone(),
                    app.clone(),
                )),
            ],
            None => Vec::new(),
        };
        let metrics_events = tokio::spawn(crate::metrics::record_job_events(
            state.metrics.clone(),
            state.bus.subscribe(),
            shutdown.clone(),
        ));
        let limits = crate::connections::ConnectionLimits {
            max_connections: state.settings.max_connections,
            header_read_timeout: state.settings.header_read_timeout,
        };
        let app = crate::api::create_app(state);
        let server = tokio::spawn(crate::connections::serve(
            listener,
            app,
            limits,
            shutdown.clone(),
        ));
        tracing::info!(%addr, data_dir = %data_dir.display(), "Broker listening.");
        Ok(Broker {
            addr,
            admin_token,
            shutdown,
            server,
            sweeper,
            relay,
            metrics_events,
            batch_stopper,
            github_tasks,
            store: db,
        })
    }

    /// Creates `site` if it does not exist and issues an enrollment token for it, as
    /// `POST /sites` and `POST /sites/{name}/enrollment-tokens` do: for embedding a broker with
    /// its agents in one process (`testbot up`, tests, benchmarks).
    pub async fn enrollment_token(
        &self,
        site: &str,
        uses: u32,
        ttl: Duration,
    ) -> anyhow::Result<SecretString> {
        testbot_proto::jobs::validate_word("site name", site).map_err(anyhow::Error::msg)?;
        self.store.create_site(site).await?;
        let token = crate::auth::generate_token(Role::Enrollment)?;
        self.store
            .create_enrollment_token(
                &crate::auth::token_hash(token.expose_secret()),
                site,
                uses,
                now_ms() + ttl.as_millis() as i64,
            )
            .await?;
        Ok(token)
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A token that stops the broker when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled, then closes the database.
    pub async fn wait(self) -> anyhow::Result<()> {
        let result = self.server.await.context("HTTP server task failed");
        self.shutdown.cancel();
        let _ = self.sweeper.await;
        if let Some(relay) = self.relay {
            let _ = relay.await;
        }
        let _ = self.metrics_events.await;
        let _ = self.batch_stopper.await;
        for task in self.github_tasks {
            let _ = task.await;
        }
        self.store.close().await;
        result
    }

    /// Stops serving (held polls and log follows end at once) and waits until it has.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// The sweeper's period for a lease time-to-live: a lease that runs out is noticed within it.
fn sweep_period(lease_ttl: Duration) -> Duration {
    (lease_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// After every broker was stopped for a while, gives running jobs' leases a full time-to-live
/// from now: their agents could not renew them meanwhile. A broker that starts while another
/// one sweeps (a rolling restart) extends nothing, so restarts cannot keep a lost job alive.
async fn extend_leases_after_downtime(
    store: &dyn crate::store::Store,
    settings: &Settings,
) -> anyhow::Result<()> {
    let now = now_ms();
    let quiet_for = store.last_sweep_ms().await?.map(|at| now - at);
    // Missing a few sweeps is not downtime; a whole lease time-to-live is.
    let grace = (sweep_period(settings.lease_ttl) * 3).as_millis() as i64;
    if quiet_for.is_some_and(|quiet| quiet <= grace) {
        return Ok(());
    }
    let extended = store
        .extend_active_leases(now + settings.lease_ttl.as_millis() as i64)
        .await?;
    if extended > 0 {
        tracing::info!(
            jobs = extended,
            quiet_ms = ?quiet_for,
            "Extended the leases of running jobs: no broker swept them for a while."
        );
    }
    Ok(())
}

async fn sweep_leases(state: AppState) {
    let period = sweep_period(state.settings.lease_ttl);
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut timers = SweepTimers {
        last_prune: tokio::time::Instant::now(),
        last_retention_sweep: None,
    };
    let mut last_reoffer = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = state.shutdown.cancelled() => {
                if let Err(err) = state.nonces.persist(&*state.store, now_ms()).await {
                    tracing::error!(?err, "Cannot save agent request nonces.");
                }
                return;
            }
        }
        if let Err(err) = state.nonces.persist(&*state.store, now_ms()).await {
            tracing::error!(?err, "Cannot save agent request nonces.");
        }
        // Brokers sharing a database take turns: one sweeps, the others wait their turn.
        let leading = state.store.lead_sweeper().await.unwrap_or_else(|err| {
            tracing::error!(?err, "Cannot tell whether this broker sweeps.");
            false
        });
        if leading {
            sweep_shared(&state, &mut timers).await;
        }
        let reoffer = last_reoffer.elapsed() >= crate::routing::REOFFER_INTERVAL;
        if reoffer {
            last_reoffer = tokio::time::Instant::now();
        }
        crate::routing::sweep(&state, reoffer).await;
    }
}

/// When the sweeper last did its less frequent work.
struct SweepTimers {
    last_prune: tokio::time::Instant,
    last_retention_sweep: Option<tokio::time::Instant>,
}

/// The sweeper's work on the database, done by one broker at a time: expired leases, token ids
/// and nonces, retention.
async fn sweep_shared(state: &AppState, timers: &mut SweepTimers) {
    if timers.last_prune.elapsed() >= JTI_PRUNE_INTERVAL {
        timers.last_prune = tokio::time::Instant::now();
        // Leeway: a token is accepted up to a minute past its expiry.
        let horizon = now_ms() / 1000 - testbot_proto::oidc::DEFAULT_LEEWAY.as_secs() as i64;
        if let Err(err) = state.store.prune_jtis(horizon).await {
            tracing::error!(?err, "Cannot prune used OIDC token ids.");
        }
        if let Err(err) = state.store.prune_nonces(now_ms()).await {
            tracing::error!(?err, "Cannot prune agent request nonces.");
        }
    }
    if timers
        .last_retention_sweep
        .is_none_or(|at| at.elapsed() >= state.settings.limits.sweep_interval())
    {
        timers.last_retention_sweep = Some(tokio::time::Instant::now());
        sweep_retention(state).await;
    }
    let now = now_ms();
    match crate::lifecycle::jobs::expire_leases(state, now).await {
        Ok(ended) => {
            for job in ended {
                tracing::warn!(
                    job_id = %job.id,
                    agent = ?job.agent,
                    state = %job.state(),
                    reason = ?job.reason,
                    "Lease expired."
                );
            }
        }
        Err(err) => tracing::error!(?err, "Cannot expire leases."),
    }
    if let Err(err) = state.store.record_sweep(now).await {
        tracing::error!(?err, "Cannot record the sweep.");
    }
}

/// Deletes the jobs whose retention ran out, with their logs.
async fn sweep_retention(state: &AppState) {
    let retention = state.settings.limits.job_retention;
    match crate::limits::sweep_finished_jobs(&*state.store, now_ms(), retention).await {
        Ok(0) => {}
        Ok(deleted) => tracing::info!(
            jobs = deleted,
            retention = %humantime::format_duration(retention),
            "Deleted finished jobs past their retention."
        ),
        Err(err) => tracing::error!(?err, "Cannot delete finished jobs past their retention."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Offer;
    use crate::store::{JobOrigin, JobTaker};

    #[tokio::test]
    async fn leases_are_extended_after_downtime_but_not_while_another_broker_sweeps() {
        let dir = std::env::temp_dir().join(format!(
            "testbot-downtime-{}",
            testbot_proto::signing::random_hex(8)
        ));
        let store = crate::store::open(None, &dir).await.unwrap();
        let settings = BrokerConfig::new("127.0.0.1:0".parse().unwrap(), dir.clone()).settings;
        let spec = testbot_proto::jobs::JobSpec {
            script: "true".into(),
            ..Default::default()
        };
        store
            .insert_job(&spec, &JobOrigin::default(), None)
            .await
            .unwrap()
            .unwrap();
        let offer = Offer {
            site: "s".into(),
            labels: vec![],
            executor: "shell".into(),
            policy: None,
            workflow_jobs_without_policy: false,
        };
        let taker = JobTaker {
            agent: "s/a",
            offer: &offer,
        };
        let id = store
            .claim_job(&taker, "l", 1000)
            .await
            .unwrap()
            .unwrap()
            .job_id();
        let lease_of = |store: crate::store::SharedStore| async move {
            store
                .job(id)
                .await
                .unwrap()
                .unwrap()
                .lease_expires_at_ms
                .unwrap()
        };
        // Another broker swept just now: a broker joining it extends nothing.
        store.record_sweep(now_ms()).await.unwrap();
        extend_leases_after_downtime(&*store, &settings)
            .await
            .unwrap();
        assert_eq!(lease_of(store.clone()).await, 1000);
        // Nobody swept for a minute: every broker was down; the lease gets a full time-to-live.
        store.record_sweep(now_ms() - 60_000).await.unwrap();
        extend_leases_after_downtime(&*store, &settings)
            .await
            .unwrap();
        assert!(lease_of(store.clone()).await >= now_ms() + 25_000);
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
