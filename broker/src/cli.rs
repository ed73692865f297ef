//! The broker's command-line flags, shared by `testbot-broker` and `testbot up`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};
use testbot_proto::oidc::{KeySet, OidcSettings};

use crate::server::BrokerConfig;
use crate::state::Settings;

/// Flags for running a broker.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerOpts {
    /// Address to listen on.
    #[arg(long, env = "TESTBOT_LISTEN", default_value = "127.0.0.1:8471")]
    pub listen: SocketAddr,
    /// Directory for the database (`testbot.db`) and the token files (`admin.token`,
    /// `agent.token`). Created if missing.
    #[arg(long, env = "TESTBOT_DATA_DIR", default_value = "/var/lib/testbot")]
    pub data_dir: PathBuf,
    /// A PostgreSQL database to keep jobs in instead of SQLite in --data-dir
    /// (`postgres://USER:PASSWORD@HOST:PORT/DATABASE`): several brokers given the same database
    /// share the queue, and agents and clients may talk to any of them. Give them all the same
    /// `admin.token` in their --data-dir.
    #[arg(long, env = "TESTBOT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// How long a job's lease lasts without a heartbeat before the job is requeued.
    #[arg(long, env = "TESTBOT_LEASE_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// How often agents renew their leases (at most a third of --lease-ttl).
    #[arg(long, env = "TESTBOT_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Claims of one job before it ends with `error: agent lost`.
    #[arg(long, env = "TESTBOT_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
    /// The longest an agent's poll is held open when there is no work.
    #[arg(long, env = "TESTBOT_POLL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub poll_timeout: Duration,
    /// The largest log one job may store, in bytes. It counts the stored log: each line of
    /// output with its timestamp and stream (about 27 bytes more per line than the job printed).
    /// A log that reaches it ends with a `testbot:` line saying so; the job runs on to its end.
    #[arg(long, env = "TESTBOT_MAX_LOG_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_log_bytes: u64,
    /// The largest request body accepted, in bytes.
    #[arg(long, env = "TESTBOT_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Accept GitHub Actions OIDC tokens minted for this audience (the action's `audience`
    /// input; conventionally the broker's URL). Without it, workflows cannot submit jobs.
    #[arg(long, env = "TESTBOT_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,
    /// The OIDC issuer whose tokens are accepted (exact `iss`). GitHub Enterprise Server:
    /// `https://HOST/_services/token`.
    #[arg(long, env = "TESTBOT_OIDC_ISSUER", default_value = testbot_proto::oidc::GITHUB_ISSUER)]
    pub oidc_issuer: String,
    /// Verify OIDC tokens with the keys in this JWKS file instead of fetching the issuer's
    /// (for brokers that cannot reach the issuer).
    #[arg(long, env = "TESTBOT_OIDC_JWKS_FILE")]
    pub oidc_jwks_file: Option<PathBuf>,
    /// GitHub's REST API, for checking that a user registering a repository administers it.
    #[arg(long, env = "TESTBOT_GITHUB_API_URL", default_value = crate::github::GITHUB_API_URL)]
    pub github_api_url: String,
    /// Let a workflow's OIDC token create the first registration of its own repository. Off by
    /// default: only the operator or a GitHub admin of the repository registers it. Even when on,
    /// a workflow token never changes or removes an existing registration.
    #[arg(long, env = "TESTBOT_ALLOW_SELF_REGISTRATION")]
    pub allow_self_registration: bool,
    /// The most jobs of one repository that may wait in the queue; a workflow submitting more
    /// gets `429 quota_exceeded`. Operator jobs are not counted.
    #[arg(long, env = "TESTBOT_MAX_QUEUED_PER_REPO", default_value_t = crate::limits::DEFAULT_MAX_QUEUED_PER_REPO, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queued_per_repo: u32,
    /// The most workflow jobs for one site (labelled `site:NAME`, or from a repository whose
    /// registration allows only that site) that may wait in the queue; more get `429`.
    #[arg(long, env = "TESTBOT_MAX_QUEUED_PER_SITE", default_value_t = crate::limits::DEFAULT_MAX_QUEUED_PER_SITE, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queued_per_site: u32,
    /// How long a finished job (with its log) is kept after it ended; then it is deleted.
    #[arg(long, env = "TESTBOT_JOB_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub job_retention: Duration,
    /// The longest one request may take to arrive and be answered, held polls included (a
    /// streamed log is not counted); must be longer than --poll-timeout. Slower requests get
    /// `408 request_timeout`.
    #[arg(long, env = "TESTBOT_REQUEST_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// How many clients may follow one job's log at once; more get `429 quota_exceeded`.
    #[arg(long, env = "TESTBOT_MAX_LOG_FOLLOWERS", default_value_t = crate::limits::DEFAULT_MAX_LOG_FOLLOWERS)]
    pub max_log_followers: usize,
    /// How many connections the broker serves at once (each agent holds about two: its poll
    /// and its heartbeat; each log follower one). A client connecting past it is answered
    /// `503 unavailable` with `Retry-After` and retries. Keep it well below the broker's
    /// open-file limit (`LimitNOFILE`).
    #[arg(long, env = "TESTBOT_MAX_CONNECTIONS", default_value_t = crate::connections::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// The longest a connection may take to send a request's headers, counted from when it
    /// opened or its previous response ended: a client trickling its headers, or a kept-alive
    /// connection left idle, is closed after it.
    #[arg(long, env = "TESTBOT_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// A bearer token that `GET /metrics` asks for (`Authorization: Bearer TOKEN`; other
    /// requests get `401`). Without it, `/metrics` is open to anyone who can reach --listen, as
    /// most exporters are: the metrics show counts, timings, site names and the broker's
    /// version, never jobs, logs or tokens. `/healthz` and `/readyz` stay open either way.
    #[arg(long, env = "TESTBOT_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<SecretString>,
    /// Run the GitHub App with this App id (its settings page shows it): webhooks at
    /// `/api/v1/github/webhook`, jobs from `.github/testbot.toml`, check runs. Needs
    /// --github-app-key-file and --github-webhook-secret-file.
    #[arg(long, env = "TESTBOT_GITHUB_APP_ID")]
    pub github_app_id: Option<u64>,
    /// The App's private key, as downloaded from its settings (PEM).
    #[arg(long, env = "TESTBOT_GITHUB_APP_KEY_FILE", requires = "github_app_id")]
    pub github_app_key_file: Option<PathBuf>,
    /// A file holding the App's webhook secret.
    #[arg(
        long,
        env = "TESTBOT_GITHUB_WEBHOOK_SECRET_FILE",
        requires = "github_app_id"
    )]
    pub github_webhook_secret_file: Option<PathBuf>,
    /// The broker's URL as users and GitHub reach it (for the links the App posts). Default:
    /// http://--listen.
    #[arg(long, env = "TESTBOT_PUBLIC_URL")]
    pub public_url: Option<String>,
}

impl BrokerOpts {
    pub fn into_config(self) -> anyhow::Result<BrokerConfig> {
        let BrokerOpts {
            listen,
            data_dir,
            database_url,
            lease_ttl,
            heartbeat_interval,
            max_attempts,
            poll_timeout,
            max_log_bytes,
            max_body_bytes,
            oidc_audience,
            oidc_issuer,
            oidc_jwks_file,
            github_api_url,
            allow_self_registration,
            max_queued_per_repo,
            max_queued_per_site,
            job_retention,
            request_timeout,
            max_log_followers,
            max_connections,
            header_read_timeout,
            metrics_token,
            github_app_id,
            github_app_key_file,
            github_webhook_secret_file,
            public_url,
        } = self;
        let public_url = public_url.unwrap_or_else(|| format!("http://{listen}"));
        let github_app = match (
            github_app_id,
            github_app_key_file,
            github_webhook_secret_file,
        ) {
            (None, None, None) => None,
            (Some(app_id), Some(key), Some(secret)) => Some(crate::server::GitHubAppConfig {
                credentials: crate::github::app::AppCredentials::load(app_id, &key, &secret)?,
                public_url: public_url.clone(),
            }),
            _ => anyhow::bail!(
                "the GitHub App needs all of --github-app-id, --github-app-key-file and \
                 --github-webhook-secret-file"
            ),
        };
        let oidc = oidc_audience.map(|audience| OidcSettings {
            issuer: oidc_issuer,
            audience,
        });
        let oidc_keys = match oidc_jwks_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("Cannot read {}", path.display()))?;
                let keys = KeySet::from_json(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                anyhow::ensure!(
                    !keys.is_empty(),
                    "{}: the key set has no RS256 signing keys",
                    path.display()
                );
                Some(keys)
            }
        };
        anyhow::ensure!(
            lease_ttl >= Duration::from_millis(300),
            "--lease-ttl must be at least 300ms"
        );
        anyhow::ensure!(
            job_retention >= Duration::from_secs(1),
            "--job-retention must be at least 1s"
        );
        anyhow::ensure!(
            request_timeout > poll_timeout && request_timeout > heartbeat_interval,
            "--request-timeout ({}) must be longer than --poll-timeout ({}) and \
             --heartbeat-interval, or held polls and heartbeats are cut off",
            humantime::format_duration(request_timeout),
            humantime::format_duration(poll_timeout)
        );
        anyhow::ensure!(max_connections >= 1, "--max-connections must be at least 1");
        anyhow::ensure!(
            header_read_timeout >= Duration::from_secs(1),
            "--header-read-timeout must be at least 1s, or clients on slow links cannot send \
             their requests"
        );
        anyhow::ensure!(
            metrics_token
                .as_ref()
                .is_none_or(|token| !token.expose_secret().trim().is_empty()),
            "--metrics-token is empty; give a token, or leave it out to serve /metrics openly"
        );
        Ok(BrokerConfig {
            listen,
            data_dir,
            database_url,
            settings: Settings {
                lease_ttl,
                heartbeat_interval: heartbeat_interval.min(lease_ttl / 3),
                max_attempts,
                poll_timeout,
                max_log_bytes,
                max_body_bytes,
                allow_self_registration,
                limits: crate::limits::Limits {
                    max_queued_per_repo,
                    max_queued_per_site,
                    job_retention,
                },
                request_timeout,
                max_log_followers,
                max_connections,
                header_read_timeout,
            },
            oidc,
            oidc_keys,
            github_api_url,
            metrics_token,
            github_app,
        })
    }
}
