//! Process wiring: open the database, load tokens, bind, serve, sweep expired leases, shut down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};
use testbot_proto::jobs::JobState;
use testbot_proto::now_ms;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use testbot_proto::oidc::{KeySet, OidcSettings, OidcVerifier};

use crate::auth::{Authenticator, Role};
use crate::db::Db;
use crate::state::{AppState, Settings};

/// Everything needed to start a broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    /// Holds `testbot.db`, `admin.token` and `agent.token`.
    pub data_dir: PathBuf,
    pub settings: Settings,
    /// Which workflow OIDC tokens are accepted; `None`: none are.
    pub oidc: Option<OidcSettings>,
    /// A fixed key set for the OIDC issuer instead of fetching it (air-gapped brokers, tests).
    pub oidc_keys: Option<KeySet>,
    /// The GitHub REST API, for checking a user token's permission on a repository.
    pub github_api_url: String,
}

impl BrokerConfig {
    /// Defaults for a broker on `listen` storing its data in `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        BrokerConfig {
            listen,
            data_dir,
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
    db: Db,
}

impl Broker {
    /// Opens the data directory, binds `config.listen` and starts serving in the background.
    pub async fn start(config: BrokerConfig) -> anyhow::Result<Broker> {
        let BrokerConfig {
            listen,
            data_dir,
            settings,
            oidc,
            oidc_keys,
            github_api_url,
        } = config;
        let db = Db::open(&data_dir).await?;
        let verifier = oidc.map(|settings| match oidc_keys {
            Some(keys) => OidcVerifier::with_keys(settings, keys),
            None => OidcVerifier::new(settings),
        });
        let auth = Authenticator::load(&db, verifier).await?;
        let admin_token = auth
            .ensure_token_file(&db, Role::Operator, "admin", &data_dir.join("admin.token"))
            .await?;
        let extended = db
            .extend_active_leases(now_ms() + settings.lease_ttl.as_millis() as i64)
            .await?;
        if extended > 0 {
            tracing::info!(
                jobs = extended,
                "Extended the leases of running jobs after start-up."
            );
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("Cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let state = AppState {
            db: db.clone(),
            auth,
            dispatcher: Default::default(),
            log_events: Default::default(),
            control_events: Default::default(),
            settings: Arc::new(settings),
            shutdown: shutdown.clone(),
            github: crate::github::GitHubApi::new(github_api_url),
            nonces: Arc::new(crate::nonces::NonceGuard::load(&db, now_ms()).await?),
            log_followers: Arc::default(),
        };
        let sweeper = tokio::spawn(sweep_leases(state.clone()));
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
            db,
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
        self.db.create_site(site).await?;
        let token = crate::auth::generate_token(Role::Enrollment)?;
        self.db
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
        self.db.close().await;
        result
    }

    /// Stops serving (held polls and log follows end at once) and waits until it has.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

async fn sweep_leases(state: AppState) {
    let period =
        (state.settings.lease_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune = tokio::time::Instant::now();
    let mut last_reoffer = tokio::time::Instant::now();
    let mut last_retention_sweep: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = state.shutdown.cancelled() => {
                if let Err(err) = state.nonces.persist(&state.db, now_ms()).await {
                    tracing::error!(?err, "Cannot save agent request nonces.");
                }
                return;
            }
        }
        if last_prune.elapsed() >= JTI_PRUNE_INTERVAL {
            last_prune = tokio::time::Instant::now();
            // Leeway: a token is accepted up to a minute past its expiry.
            let horizon = now_ms() / 1000 - testbot_proto::oidc::DEFAULT_LEEWAY.as_secs() as i64;
            if let Err(err) = state.db.prune_jtis(horizon).await {
                tracing::error!(?err, "Cannot prune used OIDC token ids.");
            }
            if let Err(err) = state.db.prune_nonces(now_ms()).await {
                tracing::error!(?err, "Cannot prune agent request nonces.");
            }
        }
        if last_retention_sweep
            .is_none_or(|at| at.elapsed() >= state.settings.limits.sweep_interval())
        {
            last_retention_sweep = Some(tokio::time::Instant::now());
            sweep_retention(&state).await;
        }
        if let Err(err) = state.nonces.persist(&state.db, now_ms()).await {
            tracing::error!(?err, "Cannot save agent request nonces.");
        }
        match state
            .db
            .expire_leases(now_ms(), state.settings.max_attempts)
            .await
        {
            Ok(expired) => {
                for lease in expired {
                    let id = lease.job.job_id();
                    let job_state = lease.job.state();
                    tracing::warn!(
                        job_id = %id,
                        agent = ?lease.job.agent,
                        state = %job_state,
                        reason = ?lease.job.reason,
                        "Lease expired."
                    );
                    if job_state == JobState::Queued {
                        state.log_events.notify(id);
                        crate::routing::job_queued(&state, id).await;
                    } else {
                        state.log_events.finished(id);
                        state.control_events.finished(id);
                    }
                }
            }
            Err(err) => tracing::error!(?err, "Cannot expire leases."),
        }
        let reoffer = last_reoffer.elapsed() >= crate::routing::REOFFER_INTERVAL;
        if reoffer {
            last_reoffer = tokio::time::Instant::now();
        }
        crate::routing::sweep(&state, reoffer).await;
    }
}

/// Deletes the jobs whose retention ran out, with their logs.
async fn sweep_retention(state: &AppState) {
    let retention = state.settings.limits.job_retention;
    match crate::limits::sweep_finished_jobs(&state.db, now_ms(), retention).await {
        Ok(0) => {}
        Ok(deleted) => tracing::info!(
            jobs = deleted,
            retention = %humantime::format_duration(retention),
            "Deleted finished jobs past their retention."
        ),
        Err(err) => tracing::error!(?err, "Cannot delete finished jobs past their retention."),
    }
}
