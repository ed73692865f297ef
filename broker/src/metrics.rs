//! Prometheus metrics: `GET /metrics` in the text exposition format.
//!
//! Three sources feed it:
//! - the database, read at scrape time: jobs by state, queue depth per site, the oldest queued
//!   job's age, agents by state (so every broker sharing a database reports the same numbers);
//! - the job-event bus, read by one task ([`record_job_events`]) that turns Queued → Assigned
//!   into dispatch latency, Started → Finished into job duration, and log growth into bytes;
//! - a middleware layer ([`track_http`]) counting requests by route template, method and status.
//!
//! `/metrics` needs no credentials unless the broker was given `--metrics-token`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use ring::hmac;
use secrecy::{ExposeSecret as _, SecretString};
use testbot_proto::jobs::{JobId, JobState};
use testbot_proto::now_ms;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::lifecycle::events::{JobChange, JobEvent};
use crate::routing::{RoutedJob, SITE_LABEL_PREFIX};
use crate::state::AppState;
use crate::store::{AgentModel, SiteModel, Store, StoreResult};

/// The `route` label of a request that matched no route (so raw paths never become labels).
pub const ROUTE_UNMATCHED: &str = "unmatched";
/// The `site` label of queued jobs that any site may run.
pub const SITE_ANY: &str = "any";
/// The `site` label of queued jobs that ask for a site the broker does not know.
pub const SITE_UNKNOWN: &str = "unknown";

/// The most queued jobs one scrape reads to count the queue per site.
pub const QUEUE_SCAN_LIMIT: i64 = 100_000;
/// Queued jobs read from the database at a time while counting.
const QUEUE_SCAN_PAGE: i64 = 5_000;
/// The most assigned or running jobs one scrape reads to tell which agents are busy.
const BUSY_SCAN_LIMIT: u32 = 10_000;
/// How recently an agent must have polled to count as online. An idle agent's poll is
/// refreshed in the database at most every 30 s and held up to --poll-timeout; an agent whose
/// every worker is busy does not poll at all, so one holding a job counts as online too.
pub const AGENT_ONLINE_WINDOW: Duration = Duration::from_secs(120);
/// Jobs the event task keeps timestamps for, per kind. Events of jobs handled by another
/// broker sharing the database are seen only in part, so entries can be left over; past this
/// many the older half is forgotten.
const MAX_TRACKED_JOBS: usize = 50_000;

/// From 5 ms (an idle agent woken at once) to 4 h (a backlog).
const DISPATCH_LATENCY_BUCKETS: [f64; 20] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0, 7200.0, 14400.0,
];
/// From 100 ms (a trivial script) to a day.
const JOB_DURATION_BUCKETS: [f64; 18] = [
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
    14400.0, 28800.0, 43200.0, 86400.0,
];
/// From 1 ms (a cached read) to 60 s (a held poll, the default --request-timeout).
const HTTP_DURATION_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 45.0, 60.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SiteLabels {
    site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    backend: &'static str,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn dispatch_latency_histogram() -> Histogram {
    Histogram::new(DISPATCH_LATENCY_BUCKETS)
}

fn job_duration_histogram() -> Histogram {
    Histogram::new(JOB_DURATION_BUCKETS)
}

fn http_duration_histogram() -> Histogram {
    Histogram::new(HTTP_DURATION_BUCKETS)
}

/// What the job-event task measures.
#[derive(Clone, Debug)]
pub struct EventMetrics {
    dispatch_latency: Histogram,
    job_duration: HistogramFamily<StateLabels>,
    log_bytes: Counter,
    events_missed: Counter,
}

impl Default for EventMetrics {
    fn default() -> Self {
        EventMetrics {
            dispatch_latency: dispatch_latency_histogram(),
            job_duration: Family::new_with_constructor(job_duration_histogram),
            log_bytes: Counter::default(),
            events_missed: Counter::default(),
        }
    }
}

/// The token `/metrics` asks for, kept as an HMAC tag under a random key so that a presented
/// token is compared in constant time.
struct MetricsToken {
    key: hmac::Key,
    tag: hmac::Tag,
}

impl MetricsToken {
    fn new(token: &SecretString) -> anyhow::Result<MetricsToken> {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("Cannot generate a key to keep --metrics-token"))?;
        // Presented tokens are trimmed too (a token file's newline, an env file's spaces).
        let tag = hmac::sign(&key, token.expose_secret().trim().as_bytes());
        Ok(MetricsToken { key, tag })
    }

    fn admits(&self, presented: &str) -> bool {
        hmac::verify(&self.key, presented.as_bytes(), self.tag.as_ref()).is_ok()
    }
}

/// The broker's metrics that live in the process (the rest are read at scrape time).
pub struct Metrics {
    token: Option<MetricsToken>,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: HistogramFamily<RouteLabels>,
    events: EventMetrics,
}

impl Metrics {
    /// With `token`, `/metrics` answers only requests bearing it.
    pub fn new(token: Option<&SecretString>) -> anyhow::Result<Metrics> {
        Ok(Metrics {
            token: token.map(MetricsToken::new).transpose()?,
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(http_duration_histogram),
            events: EventMetrics::default(),
        })
    }

    /// Checks the request's bearer token when one is configured.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "this broker's metrics need Authorization: Bearer <token>, the token it was \
                     given with --metrics-token"
                        .into(),
                )
            })?;
        if token.admits(presented) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized(
                "the bearer token is not this broker's --metrics-token".into(),
            ))
        }
    }

    fn observe_http(&self, route: String, method: &Method, status: StatusCode, took: Duration) {
        self.http_requests
            .get_or_create(&HttpLabels {
                route: route.clone(),
                method: method_label(method),
                status: status.as_u16(),
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels { route })
            .observe(took.as_secs_f64());
    }

    /// The exposition: `database` (read at scrape time; `None` when the read failed) and what
    /// the process measured.
    fn render(&self, scrape: &Scrape) -> String {
        let mut registry = Registry::with_prefix("testbot");
        let up: Gauge = Gauge::default();
        up.set(i64::from(scrape.database.is_some()));
        registry.register(
            "database_up",
            "1 when this scrape could read the database, else 0 (the families read from it are \
             left out then)",
            up,
        );
        if let Some(db) = &scrape.database {
            db.register(&mut registry, scrape.now_ms);
        }
        let connected: Gauge = Gauge::default();
        connected.set(scrape.waiting_polls as i64);
        registry.register(
            "agents_connected",
            "Agent polls waiting for work at this broker now (an agent waits with one poll per \
             idle worker)",
            connected,
        );
        registry.register(
            "dispatch_latency_seconds",
            "Time from a job being queued (each time it is queued) to an agent claiming it, as \
             this broker saw it",
            self.events.dispatch_latency.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "Time from a job's start to its result, by the job's final state",
            self.events.job_duration.clone(),
        );
        registry.register(
            "log_bytes_ingested",
            "Bytes added to job logs by the appends this broker served",
            self.events.log_bytes.clone(),
        );
        registry.register(
            "events_missed",
            "Job events the metrics did not see because they fell behind; the histograms and \
             log bytes miss them",
            self.events.events_missed.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template, method and status",
            self.http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by route template (for a followed log: until its \
             headers were sent)",
            self.http_duration.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                backend: scrape.backend,
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the labels say which version this broker is and which database backend it \
             uses",
            build,
        );
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .expect("encoding to a String cannot fail");
        text
    }
}

/// A metric's `method` label: the standard methods by name, anything else as `other`, so a
/// client cannot add label values.
fn method_label(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: counts each request under its route template (`/api/v1/jobs/{id}`), never its
/// raw path.
pub async fn track_http(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(ROUTE_UNMATCHED, MatchedPath::as_str)
        .to_string();
    let method = request.method().clone();
    let started = tokio::time::Instant::now();
    let response = next.run(request).await;
    metrics.observe_http(route, &method, response.status(), started.elapsed());
    response
}

/// `GET /metrics`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics_handler))
}

async fn metrics_handler(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.metrics.authorize(&headers)?;
    let now = now_ms();
    let database = match DatabaseCounts::read(&*state.store, now).await {
        Ok(counts) => Some(counts),
        Err(err) => {
            tracing::warn!(?err, "Cannot read the metrics kept in the database.");
            None
        }
    };
    let text = state.metrics.render(&Scrape {
        database,
        waiting_polls: state.dispatcher.waiting(),
        backend: state.store.backend(),
        now_ms: now,
    });
    Ok((
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

/// What one scrape shows besides the process's own metrics.
struct Scrape {
    database: Option<DatabaseCounts>,
    waiting_polls: usize,
    backend: &'static str,
    now_ms: i64,
}

/// The numbers read from the database at scrape time.
#[derive(Debug, Default, PartialEq)]
struct DatabaseCounts {
    jobs_by_state: Vec<(JobState, u64)>,
    /// Queued jobs by `site` label (see [`queue_site`]).
    queue_depth: BTreeMap<String, u64>,
    oldest_queued_at_ms: Option<i64>,
    agents: AgentCounts,
}

/// Agents by state.
#[derive(Debug, Default, PartialEq, Eq)]
struct AgentCounts {
    online: u64,
    offline: u64,
    revoked: u64,
}

impl DatabaseCounts {
    async fn read(store: &dyn Store, now_ms: i64) -> StoreResult<DatabaseCounts> {
        let (jobs_by_state, oldest, sites, agents, queued, busy) = tokio::join!(
            store.jobs_by_state(),
            store.oldest_queued_at(),
            store.sites(),
            store.agents(),
            queued_routed_jobs(store),
            busy_agents(store),
        );
        Ok(DatabaseCounts {
            jobs_by_state: jobs_by_state?,
            queue_depth: queue_depth(&sites?, &queued?),
            oldest_queued_at_ms: oldest?,
            agents: agent_counts(&agents?, &busy?, now_ms),
        })
    }

    fn register(&self, registry: &mut Registry, now_ms: i64) {
        let jobs: Family<StateLabels, Gauge> = Family::default();
        for state in JobState::ALL {
            let count = self
                .jobs_by_state
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            jobs.get_or_create(&StateLabels {
                state: state.as_str(),
            })
            .set(count as i64);
        }
        registry.register("jobs", "Jobs in the database, by state", jobs);

        let depth: Family<SiteLabels, Gauge> = Family::default();
        for (site, count) in &self.queue_depth {
            depth
                .get_or_create(&SiteLabels { site: site.clone() })
                .set(*count as i64);
        }
        registry.register(
            "queue_depth",
            format!(
                "Queued jobs by site: a job labelled site:NAME, or whose repository allows one \
                 site only, counts for that site ({SITE_UNKNOWN:?} for a site the broker does not \
                 know); any other job as {SITE_ANY:?}. Counts the oldest {QUEUE_SCAN_LIMIT} queued \
                 jobs at most"
            ),
            depth,
        );

        let oldest: Gauge<f64, AtomicU64> = Gauge::default();
        oldest.set(
            self.oldest_queued_at_ms
                .map_or(0.0, |at| (now_ms - at).max(0) as f64 / 1000.0),
        );
        registry.register(
            "oldest_queued_seconds",
            "Age of the oldest queued job (0 when none is queued)",
            oldest,
        );

        let agents: Family<StateLabels, Gauge> = Family::default();
        for (state, count) in [
            ("online", self.agents.online),
            ("offline", self.agents.offline),
            ("revoked", self.agents.revoked),
        ] {
            agents
                .get_or_create(&StateLabels { state })
                .set(count as i64);
        }
        registry.register(
            "agents",
            format!(
                "Enrolled agents: online (polled within the last {}s, or holding a job), offline, \
                 or revoked (the agent or its site)",
                AGENT_ONLINE_WINDOW.as_secs()
            ),
            agents,
        );
    }
}

/// The oldest queued jobs, up to [`QUEUE_SCAN_LIMIT`], read a page at a time.
async fn queued_routed_jobs(store: &dyn Store) -> StoreResult<Vec<RoutedJob>> {
    let mut jobs = Vec::new();
    let mut after = 0;
    while (jobs.len() as i64) < QUEUE_SCAN_LIMIT {
        let want = QUEUE_SCAN_PAGE.min(QUEUE_SCAN_LIMIT - jobs.len() as i64);
        let page = store.queued_jobs(after, want).await?;
        let full = page.len() as i64 == want;
        if let Some(last) = page.last() {
            after = last.id;
        }
        jobs.extend(page.into_iter().map(|queued| queued.job));
        if !full {
            break;
        }
    }
    Ok(jobs)
}

/// The agents (`site/name`) holding a job now.
async fn busy_agents(store: &dyn Store) -> StoreResult<HashSet<String>> {
    let mut busy = HashSet::new();
    for state in [JobState::Assigned, JobState::Running] {
        for job in store.jobs(Some(state), None, BUSY_SCAN_LIMIT).await? {
            busy.extend(job.agent);
        }
    }
    Ok(busy)
}

/// The `site` label a queued job counts under: the site its `site:NAME` label asks for, else
/// the one site its repository's registration allows, else [`SITE_ANY`].
fn queue_site(job: &RoutedJob) -> Option<&str> {
    if let Some(site) = job
        .spec
        .labels
        .iter()
        .find_map(|label| label.strip_prefix(SITE_LABEL_PREFIX))
    {
        return Some(site);
    }
    match job.sites.as_deref() {
        Some([only]) => Some(only),
        _ => None,
    }
}

/// Queued jobs per `site` label. Every site the broker knows is listed (at 0 when nothing
/// waits for it), and so is [`SITE_ANY`]; a name the broker does not know counts as
/// [`SITE_UNKNOWN`], so labels stay bounded whatever jobs ask for.
fn queue_depth(sites: &[SiteModel], jobs: &[RoutedJob]) -> BTreeMap<String, u64> {
    let mut depth: BTreeMap<String, u64> = sites
        .iter()
        .map(|site| (site.name.clone(), 0))
        .chain([(SITE_ANY.to_string(), 0)])
        .collect();
    for job in jobs {
        let label = match queue_site(job) {
            None => SITE_ANY,
            Some(site) if depth.contains_key(site) => site,
            Some(_) => SITE_UNKNOWN,
        };
        *depth.entry(label.to_string()).or_default() += 1;
    }
    depth
}

fn agent_counts(agents: &[AgentModel], busy: &HashSet<String>, now_ms: i64) -> AgentCounts {
    let window = AGENT_ONLINE_WINDOW.as_millis() as i64;
    let mut counts = AgentCounts::default();
    for agent in agents {
        if agent.revoked_at_ms.is_some() || agent.site_revoked_at_ms.is_some() {
            counts.revoked += 1;
        } else if agent.last_seen_ms.is_some_and(|at| now_ms - at <= window)
            || busy.contains(&format!("{}/{}", agent.site, agent.name))
        {
            counts.online += 1;
        } else {
            counts.offline += 1;
        }
    }
    counts
}

/// The bus consumer: records what the job events measure until `shutdown` (or until the bus
/// is gone). One that falls behind counts the events it missed and goes on.
pub async fn record_job_events(
    metrics: Arc<Metrics>,
    mut events: broadcast::Receiver<Arc<JobEvent>>,
    shutdown: CancellationToken,
) {
    let mut clock = JobClock::new(MAX_TRACKED_JOBS);
    loop {
        let received = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            received = events.recv() => received,
        };
        match received {
            Ok(event) => clock.record(&event, &metrics.events),
            Err(RecvError::Lagged(missed)) => {
                metrics.events.events_missed.inc_by(missed);
                tracing::warn!(
                    missed,
                    "The metrics fell behind the job events; the missed ones are not measured."
                );
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// When each job was last queued and started, and how long its log was, for the histograms.
struct JobClock {
    queued_at: TrackedJobs<()>,
    started_at: TrackedJobs<()>,
    log_bytes: TrackedJobs<u64>,
}

impl JobClock {
    fn new(capacity: usize) -> JobClock {
        JobClock {
            queued_at: TrackedJobs::new(capacity),
            started_at: TrackedJobs::new(capacity),
            log_bytes: TrackedJobs::new(capacity),
        }
    }

    fn record(&mut self, event: &JobEvent, metrics: &EventMetrics) {
        let id = event.id;
        let since = |at_ms: i64| (event.at_ms - at_ms).max(0) as f64 / 1000.0;
        // Another broker's events (see `store::notify`) set the clocks but are measured by the
        // broker that made them, so the brokers' figures add up without counting twice.
        let local = !event.remote;
        match &event.change {
            JobChange::Queued { .. } => {
                self.queued_at.insert(id, event.at_ms, ());
                // Queued again: the run that had started is over.
                self.started_at.remove(id);
            }
            JobChange::Assigned { .. } => {
                if let Some((queued_at, ())) = self.queued_at.remove(id)
                    && local
                {
                    metrics.dispatch_latency.observe(since(queued_at));
                }
            }
            JobChange::Started => self.started_at.insert(id, event.at_ms, ()),
            JobChange::LogAppended { log_bytes } => {
                let before = self.log_bytes.get(id).copied().unwrap_or(0);
                if local {
                    metrics.log_bytes.inc_by(log_bytes.saturating_sub(before));
                }
                self.log_bytes
                    .insert(id, event.at_ms, (*log_bytes).max(before));
            }
            JobChange::CancelRequested => {}
            JobChange::Finished { state } => {
                self.queued_at.remove(id);
                self.log_bytes.remove(id);
                if let Some((started_at, ())) = self.started_at.remove(id)
                    && local
                {
                    metrics
                        .job_duration
                        .get_or_create(&StateLabels {
                            state: state.as_str(),
                        })
                        .observe(since(started_at));
                }
            }
        }
    }
}

/// A value per job with when it was set, holding at most `capacity` jobs: when full, the older
/// half is forgotten.
struct TrackedJobs<V> {
    entries: HashMap<JobId, (i64, V)>,
    capacity: usize,
}

impl<V> TrackedJobs<V> {
    fn new(capacity: usize) -> Self {
        TrackedJobs {
            entries: HashMap::new(),
            capacity: capacity.max(2),
        }
    }

    fn insert(&mut self, id: JobId, at_ms: i64, value: V) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&id) {
            let mut by_age: Vec<(i64, JobId)> = self
                .entries
                .iter()
                .map(|(id, (at, _))| (*at, *id))
                .collect();
            let half = by_age.len() / 2;
            by_age.select_nth_unstable(half);
            for (_, old) in &by_age[..half] {
                self.entries.remove(old);
            }
        }
        self.entries.insert(id, (at_ms, value));
    }

    fn get(&self, id: JobId) -> Option<&V> {
        self.entries.get(&id).map(|(_, value)| value)
    }

    fn remove(&mut self, id: JobId) -> Option<(i64, V)> {
        self.entries.remove(&id)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests;
