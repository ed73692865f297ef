//! The shared state of the HTTP handlers.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::lifecycle::dispatch::Dispatcher;
use crate::lifecycle::events::EventBus;
use crate::lifecycle::watch::{JobWatchers, Wakes};
use crate::store::SharedStore;

/// Tunables the handlers need at run time.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a lease lasts after a claim, start or heartbeat.
    pub lease_ttl: Duration,
    /// How often agents send heartbeats (a heartbeat may be held this long waiting for a cancel).
    pub heartbeat_interval: Duration,
    /// Claims of one job before it ends `error: agent lost`.
    pub max_attempts: u32,
    /// The longest an agent's poll is held open.
    pub poll_timeout: Duration,
    /// The largest log one job may have.
    pub max_log_bytes: u64,
    /// The largest request body accepted.
    pub max_body_bytes: usize,
    /// Whether a workflow's OIDC token may create the first registration of its own repository.
    pub allow_self_registration: bool,
    /// Queue quotas and the retention of finished jobs.
    pub limits: crate::limits::Limits,
    /// The longest one request may take to arrive and be answered (a streamed log's body is
    /// not counted): a client that trickles its request in is cut off.
    pub request_timeout: Duration,
    /// How many clients may follow one job's log at once.
    pub max_log_followers: usize,
    /// How many connections the broker serves at once; more are refused.
    pub max_connections: usize,
    /// The longest a connection may take to send a request's headers, counted from when it
    /// opened or its previous response ended: slow and idle connections are closed after it.
    pub header_read_timeout: Duration,
}

#[derive(Clone)]
pub struct AppState {
    pub store: SharedStore,
    pub auth: Authenticator,
    /// Every change of a job is published here (see [`crate::lifecycle::jobs`]).
    pub bus: Arc<EventBus>,
    /// Waiting polls, woken by the bus when a job they may take is queued.
    pub dispatcher: Arc<Dispatcher>,
    /// Wakes log followers: appends, results.
    pub log_watchers: Arc<JobWatchers>,
    /// Wakes held heartbeats: cancel requests, results.
    pub control_watchers: Arc<JobWatchers>,
    pub settings: Arc<Settings>,
    /// Cancelled when the broker shuts down: held polls and log follows end.
    pub shutdown: CancellationToken,
    /// Nonces of signed agent requests seen within the clock window.
    pub nonces: Arc<crate::nonces::NonceGuard>,
    /// GitHub's REST API: checks a user token's permission on a repository.
    pub github: crate::github::GitHubApi,
    /// Who follows which job's log, for `max_log_followers`.
    pub log_followers: Arc<crate::limits::Followers>,
    /// What `/metrics` shows besides what it reads from the store.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The GitHub App, when the broker runs one.
    pub github_app: Option<Arc<crate::github::GitHubApp>>,
}

/// The bus and its subscribers inside the broker, wired together.
pub struct Wiring {
    pub bus: Arc<EventBus>,
    pub dispatcher: Arc<Dispatcher>,
    pub log_watchers: Arc<JobWatchers>,
    pub control_watchers: Arc<JobWatchers>,
}

impl Wiring {
    /// The bus with the broker's own subscribers.
    pub fn new() -> Wiring {
        Wiring::with(Vec::new())
    }

    /// The bus with the broker's own subscribers and `more` (the relay to other brokers).
    pub fn with(more: Vec<Arc<dyn crate::lifecycle::events::Subscriber>>) -> Wiring {
        let dispatcher = Arc::new(Dispatcher::default());
        let log_watchers = Arc::new(JobWatchers::new(Wakes::Log));
        let control_watchers = Arc::new(JobWatchers::new(Wakes::Control));
        let mut subscribers: Vec<Arc<dyn crate::lifecycle::events::Subscriber>> = vec![
            dispatcher.clone(),
            log_watchers.clone(),
            control_watchers.clone(),
        ];
        subscribers.extend(more);
        let bus = Arc::new(EventBus::new(subscribers));
        Wiring {
            bus,
            dispatcher,
            log_watchers,
            control_watchers,
        }
    }
}

impl Default for Wiring {
    fn default() -> Self {
        Wiring::new()
    }
}
