//! A typed HTTP client for the broker API, shared by the agent, the CLI and the benchmark.

use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use reqwest::{Method, StatusCode};
use ring::signature::Ed25519KeyPair;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::agents::{Assignment, LeaseRequest, LeaseStatus, PollRequest};
use crate::error::{ErrorBody, codes};
use crate::jobs::{Job, JobId, JobList, JobListQuery, JobSpec};
use crate::logs::{LogAck, LogChunk};
use crate::repos::{Repo, RepoList, RepoRegistration};
use crate::results::FinishRequest;
use crate::sites::{
    AgentInfo, AgentList, EnrollRequest, Enrollment, EnrollmentToken, EnrollmentTokenRequest, Site,
    SiteList, SiteRequest,
};

/// Why a broker call failed. Callers retry [`ClientError::Unavailable`] and stop on the rest.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker could not be reached, timed out, or answered 5xx: worth retrying.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused the request; `code` is one of [`codes`].
    #[error("{message} ({status} {code})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The broker's answer was not what this client understands.
    #[error("unexpected answer from the broker: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Unavailable(_))
    }

    /// Whether the broker says the lease named in the request is no longer valid.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, ClientError::Api { code, .. } if code == codes::LEASE_LOST)
    }

    /// Whether the broker says the agent making the request (or its site) was revoked.
    pub fn is_agent_revoked(&self) -> bool {
        matches!(self, ClientError::Api { code, .. } if code == codes::AGENT_REVOKED)
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

impl From<reqwest::Error> for ClientError {
    fn from(err: reqwest::Error) -> Self {
        // reqwest calls a body cut short by a reset connection a decode error too: only an
        // answer that arrived whole and does not parse is the broker's fault; anything else
        // may go well when sent again.
        if err.is_decode() && caused_by_json(&err) {
            return ClientError::Protocol(err.to_string());
        }
        // Connection refused, reset, timeouts, a broken body stream: the broker may come back.
        ClientError::Unavailable(with_causes(&err))
    }
}

/// Whether a JSON parse error is among the causes of `err`.
fn caused_by_json(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(cause) = source {
        if cause.is::<serde_json::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// An error and every cause under it, `outer: inner: ...` (reqwest's own message is often just
/// "builder error" or "error sending request").
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        msg.push_str(": ");
        msg.push_str(&inner.to_string());
        source = inner.source();
    }
    msg
}

/// Installs `ring` as the process's rustls crypto provider (once; later calls do nothing).
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only if another provider was installed first, which is fine too.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// How long to wait for a TCP (and TLS) connection to the broker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default limit for one ordinary API call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle kept-alive connection is kept for reuse: less than the broker's default
/// `--header-read-timeout` (30 s), after which the broker closes it, so the client drops it first
/// rather than sending a request on a connection the broker is closing that moment.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// How a client proves who it is.
#[derive(Clone)]
pub enum Credentials {
    /// `Authorization: Bearer ...`: an operator token or a workflow's OIDC token.
    Bearer(SecretString),
    /// An enrolled agent: every request is signed with its Ed25519 key.
    Agent {
        id: String,
        key: Arc<Ed25519KeyPair>,
    },
}

/// A client for one broker.
#[derive(Clone)]
pub struct BrokerClient {
    http: reqwest::Client,
    base: String,
    credentials: Credentials,
}

impl std::fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl BrokerClient {
    /// A client for the broker at `base_url` (e.g. `https://testbot.example.org`) with a
    /// bearer token.
    pub fn new(base_url: &str, token: SecretString) -> Result<Self, ClientError> {
        Self::with_credentials(base_url, Credentials::Bearer(token))
    }

    /// A client for an enrolled agent, signing each request with `key`.
    pub fn for_agent(
        base_url: &str,
        agent_id: String,
        key: Arc<Ed25519KeyPair>,
    ) -> Result<Self, ClientError> {
        Self::with_credentials(base_url, Credentials::Agent { id: agent_id, key })
    }

    pub fn with_credentials(base_url: &str, credentials: Credentials) -> Result<Self, ClientError> {
        install_crypto_provider();
        let base = base_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Protocol(format!(
                "broker URL {base_url:?} must start with http:// or https://"
            )));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .user_agent(concat!("testbot/", env!("CARGO_PKG_VERSION")));
        if base.starts_with("http://") {
            // Loading the system's trust roots reads and parses every CA certificate on the
            // machine, which costs more than a whole API call to a loopback broker. A plain-HTTP
            // broker needs none, and a redirect to https:// then fails closed.
            builder = builder.tls_certs_only(Vec::new());
        }
        let http = builder.build().map_err(|e| {
            ClientError::Protocol(format!("cannot build HTTP client: {}", with_causes(&e)))
        })?;
        Ok(BrokerClient {
            http,
            base,
            credentials,
        })
    }

    /// A client for the same broker with other credentials that shares this client's
    /// connections: one process acting as many agents (a load generator) keeps one connection
    /// pool rather than one per identity. Each request still holds a connection of its own while
    /// it is in flight.
    pub fn sharing_connections(&self, credentials: Credentials) -> BrokerClient {
        BrokerClient {
            http: self.http.clone(),
            base: self.base.clone(),
            credentials,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}{}", self.base, crate::API_PREFIX, path)
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.request_with_body(method, path, Vec::new())
    }

    /// A request carrying `body` (JSON when not empty), authenticated by the credentials.
    fn request_with_body(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> reqwest::RequestBuilder {
        self.request_with_typed_body(method, path, body, "application/json")
    }

    /// A request carrying `body` of `content_type`. An agent signs `path` with its query.
    fn request_with_typed_body(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        content_type: &'static str,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method.clone(), self.url(path))
            .timeout(REQUEST_TIMEOUT);
        match &self.credentials {
            Credentials::Bearer(token) => req = req.bearer_auth(token.expose_secret()),
            Credentials::Agent { id, key } => {
                // The path is signed with its query, as the broker receives it.
                let path = format!("{}{path}", crate::API_PREFIX);
                let signed = crate::signing::sign_request(key, id, method.as_str(), &path, &body);
                req = req
                    .header(crate::signing::AGENT_HEADER, signed.agent)
                    .header(crate::signing::TIMESTAMP_HEADER, signed.timestamp_ms)
                    .header(crate::signing::NONCE_HEADER, signed.nonce)
                    .header(crate::signing::SIGNATURE_HEADER, signed.signature);
            }
        }
        if !body.is_empty() {
            req = req
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body);
        }
        req
    }

    fn json_request<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<reqwest::RequestBuilder, ClientError> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| ClientError::Protocol(format!("cannot encode the request: {e}")))?;
        Ok(self.request_with_body(method, path, bytes))
    }

    /// `POST /api/v1/agent/enroll`: exchanges an enrollment token and a public key for an
    /// agent identity. Needs no credentials.
    pub async fn enroll(&self, req: &EnrollRequest) -> Result<Enrollment, ClientError> {
        let resp = self
            .http
            .post(self.url("/agent/enroll"))
            .timeout(REQUEST_TIMEOUT)
            .json(req)
            .send()
            .await?;
        Ok(check(resp).await?.json().await?)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = check(req.send().await?).await?;
        Ok(resp.json::<T>().await?)
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(self.json_request(Method::POST, path, body)?)
            .await
    }

    /// `GET /api/v1/health`: whether the broker answers (no token needed).
    pub async fn health(&self) -> Result<(), ClientError> {
        check(self.http.get(self.url("/health")).send().await?).await?;
        Ok(())
    }

    pub async fn submit(&self, spec: &JobSpec) -> Result<Job, ClientError> {
        self.post("/jobs", spec).await
    }

    pub async fn job(&self, id: JobId) -> Result<Job, ClientError> {
        self.send(self.request(Method::GET, &format!("/jobs/{id}")))
            .await
    }

    pub async fn jobs(&self, query: &JobListQuery) -> Result<JobList, ClientError> {
        self.send(self.request(Method::GET, "/jobs").query(query))
            .await
    }

    pub async fn cancel(&self, id: JobId) -> Result<Job, ClientError> {
        self.post(&format!("/jobs/{id}/cancel"), &serde_json::json!({}))
            .await
    }

    /// Queues `runs` runs of `spec` as one batch, stopped early by `until` if given.
    pub async fn submit_batch(
        &self,
        spec: &JobSpec,
        runs: u32,
        until: Option<crate::batches::Until>,
    ) -> Result<crate::batches::Batch, ClientError> {
        self.post(
            "/batches",
            &crate::batches::BatchRequest {
                spec: spec.clone(),
                runs,
                until,
            },
        )
        .await
    }

    pub async fn batch(
        &self,
        id: crate::batches::BatchId,
    ) -> Result<crate::batches::Batch, ClientError> {
        self.send(self.request(Method::GET, &format!("/batches/{id}")))
            .await
    }

    /// Cancels every run of the batch that has not ended.
    pub async fn cancel_batch(
        &self,
        id: crate::batches::BatchId,
    ) -> Result<crate::batches::Batch, ClientError> {
        self.post(&format!("/batches/{id}/cancel"), &serde_json::json!({}))
            .await
    }

    pub async fn create_site(&self, name: &str) -> Result<Site, ClientError> {
        self.post(
            "/sites",
            &SiteRequest {
                name: name.to_string(),
            },
        )
        .await
    }

    pub async fn sites(&self) -> Result<SiteList, ClientError> {
        self.send(self.request(Method::GET, "/sites")).await
    }

    pub async fn create_enrollment_token(
        &self,
        site: &str,
        req: &EnrollmentTokenRequest,
    ) -> Result<EnrollmentToken, ClientError> {
        self.post(&format!("/sites/{site}/enrollment-tokens"), req)
            .await
    }

    pub async fn revoke_site(&self, site: &str) -> Result<Site, ClientError> {
        self.post(&format!("/sites/{site}/revoke"), &serde_json::json!({}))
            .await
    }

    pub async fn agents(&self) -> Result<AgentList, ClientError> {
        self.send(self.request(Method::GET, "/agents")).await
    }

    pub async fn revoke_agent(&self, id: &str) -> Result<AgentInfo, ClientError> {
        self.post(&format!("/agents/{id}/revoke"), &serde_json::json!({}))
            .await
    }

    /// `POST /api/v1/repos`: registers a repository (or replaces its settings).
    pub async fn register_repo(
        &self,
        registration: &RepoRegistration,
    ) -> Result<Repo, ClientError> {
        self.post("/repos", registration).await
    }

    pub async fn repos(&self) -> Result<RepoList, ClientError> {
        self.send(self.request(Method::GET, "/repos")).await
    }

    pub async fn repo(&self, name: &str) -> Result<Repo, ClientError> {
        self.send(self.request(Method::GET, &format!("/repos/{name}")))
            .await
    }

    pub async fn remove_repo(&self, name: &str) -> Result<(), ClientError> {
        check(
            self.request(Method::DELETE, &format!("/repos/{name}"))
                .send()
                .await?,
        )
        .await?;
        Ok(())
    }

    /// The job's log from `offset`; with `follow`, the stream stays open until the job ends.
    /// The stream may break (broker restart): resume with the offset of the bytes received.
    pub async fn log_stream(
        &self,
        id: JobId,
        offset: u64,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<Bytes, ClientError>> + use<>, ClientError> {
        use futures_util::StreamExt;
        let req = self
            .request(Method::GET, &format!("/jobs/{id}/log"))
            .timeout(Duration::from_secs(365 * 24 * 3600))
            .query(&[
                ("offset", offset.to_string()),
                ("follow", follow.to_string()),
            ]);
        let resp = check(req.send().await?).await?;
        Ok(resp.bytes_stream().map(|r| r.map_err(ClientError::from)))
    }

    /// Long-polls for a job. `Ok(None)` when the wait ran out with nothing to do.
    pub async fn poll(&self, req: &PollRequest) -> Result<Option<Assignment>, ClientError> {
        let wait = Duration::from_millis(req.wait_ms.unwrap_or(30_000));
        let resp = self
            .json_request(Method::POST, "/agent/poll", req)?
            .timeout(wait + REQUEST_TIMEOUT)
            .send()
            .await?;
        let resp = check(resp).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Ok(Some(resp.json().await?))
    }

    pub async fn start(&self, id: JobId, lease: &str) -> Result<LeaseStatus, ClientError> {
        let body = LeaseRequest {
            lease: lease.to_string(),
            wait_ms: None,
        };
        self.post(&format!("/agent/jobs/{id}/start"), &body).await
    }

    /// Renews the lease; the broker may hold the answer up to `wait` unless the job is cancelled.
    pub async fn heartbeat(
        &self,
        id: JobId,
        lease: &str,
        wait: Duration,
    ) -> Result<LeaseStatus, ClientError> {
        let body = LeaseRequest {
            lease: lease.to_string(),
            wait_ms: Some(wait.as_millis() as u64),
        };
        let req = self
            .json_request(Method::POST, &format!("/agent/jobs/{id}/heartbeat"), &body)?
            .timeout(wait + REQUEST_TIMEOUT);
        self.send(req).await
    }

    pub async fn append_log(&self, id: JobId, chunk: &LogChunk) -> Result<LogAck, ClientError> {
        self.post(&format!("/agent/jobs/{id}/log"), chunk).await
    }

    /// Records a fact about the job (e.g. its Slurm job id) under its lease.
    pub async fn set_metadata(
        &self,
        id: JobId,
        req: &crate::agents::MetadataRequest,
    ) -> Result<Job, ClientError> {
        self.post(&format!("/agent/jobs/{id}/metadata"), req).await
    }

    /// Uploads one result file of a job this agent runs under `lease`.
    pub async fn upload_result_file(
        &self,
        id: JobId,
        lease: &str,
        path: &str,
        data: Vec<u8>,
    ) -> Result<crate::test_results::UploadAck, ClientError> {
        let route = format!(
            "/agent/jobs/{id}/files?lease={}&path={}",
            encode_query_value(lease),
            encode_query_value(path)
        );
        let req = self
            .request_with_typed_body(Method::PUT, &route, data, "application/octet-stream")
            // A file of tens of megabytes takes longer than a small request.
            .timeout(UPLOAD_TIMEOUT);
        self.send(req).await
    }

    /// What the broker read from a job's result files, and its test cases.
    pub async fn job_results(
        &self,
        id: JobId,
    ) -> Result<crate::test_results::JobResults, ClientError> {
        self.send(self.request(Method::GET, &format!("/jobs/{id}/results")))
            .await
    }

    /// The tests of `repository` that failed at least once in the window, flaky ones first.
    pub async fn flaky_tests(
        &self,
        repository: &str,
        query: &crate::test_results::FlakyQuery,
    ) -> Result<crate::test_results::FlakyReport, ClientError> {
        self.send(
            self.request(Method::GET, &format!("/repos/{repository}/flaky"))
                .query(query),
        )
        .await
    }

    /// One test's record across `repository`'s history.
    pub async fn test_history(
        &self,
        repository: &str,
        query: &crate::test_results::HistoryQuery,
    ) -> Result<crate::test_results::TestRecord, ClientError> {
        self.send(
            self.request(Method::GET, &format!("/repos/{repository}/history"))
                .query(query),
        )
        .await
    }

    /// Starts a statistical bisection of a test of `repository`.
    pub async fn start_bisection(
        &self,
        repository: &str,
        request: &crate::bisect::BisectRequest,
    ) -> Result<crate::bisect::Bisection, ClientError> {
        self.post(&format!("/repos/{repository}/bisections"), request)
            .await
    }

    pub async fn bisection(&self, id: i64) -> Result<crate::bisect::Bisection, ClientError> {
        self.send(self.request(Method::GET, &format!("/bisections/{id}")))
            .await
    }

    /// A repository's bisections, newest first.
    pub async fn bisections(
        &self,
        repository: &str,
    ) -> Result<Vec<crate::bisect::Bisection>, ClientError> {
        self.send(self.request(Method::GET, &format!("/repos/{repository}/bisections")))
            .await
    }

    /// Every test of a batch across its runs.
    pub async fn batch_results(
        &self,
        id: crate::batches::BatchId,
    ) -> Result<crate::test_results::BatchResults, ClientError> {
        self.send(self.request(Method::GET, &format!("/batches/{id}/results")))
            .await
    }

    pub async fn finish(&self, id: JobId, req: &FinishRequest) -> Result<Job, ClientError> {
        self.post(&format!("/agent/jobs/{id}/finish"), req).await
    }

    /// Hands a job this agent will not run back to the broker, which queues it for another
    /// agent or ends it when none could run it.
    pub async fn release(
        &self,
        id: JobId,
        req: &crate::agents::ReleaseRequest,
    ) -> Result<crate::agents::ReleaseOutcome, ClientError> {
        self.post(&format!("/agent/jobs/{id}/release"), req).await
    }
}

/// Turns a non-2xx answer into [`ClientError`], reading the JSON error envelope when there is one.
async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => (body.error.code, body.error.message),
        Err(_) => (
            status.canonical_reason().unwrap_or("error").to_string(),
            text.chars().take(300).collect(),
        ),
    };
    if status.is_server_error() {
        return Err(ClientError::Unavailable(format!("{status}: {message}")));
    }
    Err(ClientError::Api {
        status: status.as_u16(),
        code,
        message,
    })
}

/// Exponential backoff with jitter for retrying a broker that is unreachable.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    /// The default for agents and CLIs: 100 ms doubling up to 30 s.
    pub fn standard() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(30))
    }

    /// The next delay: a random duration in [d/2, d] for the current step d, which then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(random_unit())
    }

    /// After a success: start again from the minimum.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A uniformly random number in [0, 1), from the process's random hasher keys (no extra crate
/// needed for jitter).
fn random_unit() -> f64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Follows a job's log to its end, resuming from the last byte received whenever the stream
/// breaks or the broker is unreachable (for example while it restarts). Each piece of log is
/// passed to `on_bytes` exactly once. Returns the finished job.
pub async fn follow_log(
    client: &BrokerClient,
    id: JobId,
    mut offset: u64,
    mut on_bytes: impl FnMut(&[u8]),
) -> Result<Job, ClientError> {
    use futures_util::StreamExt as _;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let mut broke = false;
        match client.log_stream(id, offset, true).await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(bytes) => {
                            backoff.reset();
                            offset += bytes.len() as u64;
                            on_bytes(&bytes);
                        }
                        Err(_) => {
                            broke = true;
                            break;
                        }
                    }
                }
            }
            Err(err) if err.is_retryable() => broke = true,
            Err(err) => return Err(err),
        }
        if !broke {
            match client.job(id).await {
                Ok(job) if job.state.is_terminal() && job.log_bytes <= offset => return Ok(job),
                Ok(_) => {}
                Err(err) if err.is_retryable() => {}
                Err(err) => return Err(err),
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// How long an upload of one result file may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// `value` percent-encoded for a query string: everything but RFC 3986's unreserved
/// characters.
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A one-shot HTTP server on loopback that answers 200 with `answer` (headers and body).
    async fn answering(answer: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let _ = socket.write_all(answer.as_bytes()).await;
            // Dropped here: a body shorter than its Content-Length is cut off.
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn an_answer_cut_off_by_the_connection_is_retried_and_a_malformed_one_is_not() {
        install_crypto_provider();
        let token = SecretString::from("t".to_string());
        let cut = answering(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":",
        )
        .await;
        let err = BrokerClient::new(&cut, token.clone())
            .unwrap()
            .job(JobId(1))
            .await
            .unwrap_err();
        assert!(
            err.is_retryable(),
            "a body cut short is worth retrying: {err:?}"
        );
        let malformed = answering(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{\"id\":}",
        )
        .await;
        let err = BrokerClient::new(&malformed, token)
            .unwrap()
            .job(JobId(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Protocol(_)),
            "a whole answer that does not parse is not retried: {err:?}"
        );
    }
}
