//! Serving HTTP connections: at most `--max-connections` at once, each closed when its request
//! headers take longer than `--header-read-timeout` (a client trickling them in, or a kept-alive
//! connection left idle), and all drained on shutdown.
//!
//! Every open connection costs a file descriptor and buffers. Without these bounds a flood of
//! connections that never send a byte, or send their headers a byte at a time, exhausts the
//! broker's descriptors, and then it can accept no heartbeat and open no database file. Each
//! connection's buffer is bounded too ([`MAX_CONNECTION_BUFFER`]: larger headers get `431`).
//!
//! When every place is taken, a newcomer that has sent bytes (an idle flood never does) takes
//! the place of the oldest connection that has not sent a whole request within
//! [`DISPLACE_AFTER`]: real clients send theirs the moment they connect, so those are the ones
//! that connect and wait, or trickle their headers, and a flood of them displaces only itself.
//! A newcomer that finds no such place is not left in the kernel's accept queue, where it would
//! sit behind the flood until its connect timed out: it is accepted and answered
//! `503 unavailable` with `Retry-After`, which agents and the CLI retry. Both need the newcomer to
//! send its request, so up to [`MAX_REFUSING`] newcomers at once are given
//! [`REFUSAL_HEADER_TIMEOUT`] for it; one that sends nothing, and any past those, is closed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::response::IntoResponse as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::ApiError;

/// Default of `--max-connections`: a fleet of a few hundred agents (each holds a poll and a
/// heartbeat), their log followers and CLIs.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Default of `--header-read-timeout`: well above the heartbeat interval, so an agent's
/// kept-alive connection is reused rather than closed between two heartbeats.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How many newcomers that found every place taken may be waiting at once for their request (to
/// take a place or be refused).
pub const MAX_REFUSING: usize = 64;

/// How long a newcomer that found every place taken may take to send its request.
pub const REFUSAL_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// The most a connection may make the broker buffer: a request's headers must fit (the
/// largest the broker's clients send, an OIDC token in `authorization`, is a few KiB). hyper's
/// default, ~400 KiB, would let `--max-connections` slow clients hold 400 MiB.
pub const MAX_CONNECTION_BUFFER: usize = 64 * 1024;

/// What the client is told to wait before connecting again, in seconds.
const RETRY_AFTER_SECS: u64 = 1;

/// How long to wait before accepting again after the listener failed (out of descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// How long a connection has to send its first request before a newcomer may take its place.
/// Real clients send theirs within a round trip; the grace keeps a flood that reconnects as fast
/// as it is displaced from displacing them before they could.
const DISPLACE_AFTER: Duration = Duration::from_secs(1);

/// How long a connection that displaced another waits for its place.
const DISPLACE_WAIT: Duration = Duration::from_secs(1);

/// How often at most newcomers that found every place taken are logged.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Bounds on the connections the broker serves.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// The connections that have not yet sent a whole request, oldest first, each with when it got
/// its place and the token that closes it.
#[derive(Clone, Default)]
struct Unrequested(Arc<Mutex<UnrequestedMap>>);

#[derive(Default)]
struct UnrequestedMap {
    next_key: u64,
    by_age: BTreeMap<u64, (tokio::time::Instant, CancellationToken)>,
}

impl Unrequested {
    /// Adds a connection; returns its key and the token that closes it.
    fn insert(&self) -> (u64, CancellationToken) {
        let token = CancellationToken::new();
        let mut map = self.lock();
        map.next_key += 1;
        let key = map.next_key;
        map.by_age
            .insert(key, (tokio::time::Instant::now(), token.clone()));
        (key, token)
    }

    fn remove(&self, key: u64) {
        self.lock().by_age.remove(&key);
    }

    /// Closes the oldest connection that has had [`DISPLACE_AFTER`] to send a request and has
    /// not; whether there was one.
    fn displace_oldest(&self) -> bool {
        let mut map = self.lock();
        let Some(entry) = map.by_age.first_entry() else {
            return false;
        };
        if entry.get().0.elapsed() < DISPLACE_AFTER {
            return false;
        }
        entry.remove().1.cancel();
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UnrequestedMap> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One served connection's place and what it needs to give it up.
struct Place {
    key: u64,
    unrequested: Unrequested,
    displaced: CancellationToken,
}

impl Place {
    /// Counts a connection that just got its place among those that sent no request yet.
    fn new(unrequested: &Unrequested) -> Place {
        let (key, displaced) = unrequested.insert();
        Place {
            key,
            displaced,
            unrequested: unrequested.clone(),
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.unrequested.remove(self.key);
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then stops accepting and waits
/// until every connection has finished its request in progress and closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let serving = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let unrequested = Unrequested::default();
    let connections = TaskTracker::new();
    let mut refusals = RefusalLog::default();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) if is_connection_error(&err) => continue,
                Err(err) => {
                    tracing::error!(?err, "Cannot accept a connection; retrying in a second.");
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Log chunks are small writes that followers wait for: do not let Nagle's algorithm
        // hold them back (it added ~40 ms to every followed line).
        let _ = tcp.set_nodelay(true);
        let serve = {
            let (app, shutdown) = (app.clone(), shutdown.clone());
            let header_read_timeout = limits.header_read_timeout;
            move |tcp, place, permit| {
                serve_connection(tcp, peer, app, header_read_timeout, shutdown, place, permit)
            }
        };
        if let Ok(permit) = serving.clone().try_acquire_owned() {
            connections.spawn(serve(tcp, Place::new(&unrequested), permit));
            continue;
        }
        let Ok(waiting) = refusing.clone().try_acquire_owned() else {
            // Dropping `tcp` closes it at once.
            refusals.refused(limits.max_connections);
            continue;
        };
        // Every place is taken. Once this client has sent something (an idle flood never
        // does), it takes the place of the oldest connection that has not sent a request, if
        // there is one; otherwise it is refused.
        let (serving, unrequested) = (serving.clone(), unrequested.clone());
        let max_connections = limits.max_connections;
        let refusal_timeout = limits.header_read_timeout.min(REFUSAL_HEADER_TIMEOUT);
        connections.spawn(async move {
            let sent = tokio::time::timeout(refusal_timeout, has_data(&tcp)).await;
            if sent != Ok(true) {
                return;
            }
            if unrequested.displace_oldest()
                && let Ok(Ok(permit)) =
                    tokio::time::timeout(DISPLACE_WAIT, serving.acquire_owned()).await
            {
                drop(waiting);
                serve(tcp, Place::new(&unrequested), permit).await;
                return;
            }
            refuse_connection(tcp, max_connections, refusal_timeout, waiting).await;
        });
        refusals.refused(limits.max_connections);
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection until it closes. On shutdown it lets the request in progress finish
/// (held polls and followed logs end by themselves) and closes; a connection that has not yet
/// sent a whole request is closed at once, so a client that connects and sends nothing, or
/// trickles its headers, cannot hold up a restart. Such a connection is also closed when a new
/// one takes its place.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    app: Router,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
    place: Place,
    _permit: OwnedSemaphorePermit,
) {
    let requested = Arc::new(AtomicBool::new(false));
    let service = hyper::service::service_fn({
        let app = hyper_util::service::TowerToHyperService::new(app);
        let (requested, unrequested, key) =
            (requested.clone(), place.unrequested.clone(), place.key);
        move |request| {
            if !requested.swap(true, Ordering::Relaxed) {
                unrequested.remove(key);
            }
            hyper::service::Service::call(&app, request)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_CONNECTION_BUFFER)
        .max_header_size(MAX_CONNECTION_BUFFER);
    let connection = builder.serve_connection(TokioIo::new(tcp), service);
    let mut connection = std::pin::pin!(connection);
    let mut displaced_too_late = false;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            _ = shutdown.cancelled() => {
                if !requested.load(Ordering::Relaxed) {
                    return;
                }
                // Closes a kept-alive connection between requests at once.
                connection.as_mut().graceful_shutdown();
                break connection.await;
            }
            _ = place.displaced.cancelled(), if !displaced_too_late => {
                if !requested.load(Ordering::Relaxed) {
                    tracing::debug!(%peer, "Closed a connection that sent no request to make room.");
                    return;
                }
                // Its request arrived meanwhile: serve it; the newcomer waits or is refused.
                displaced_too_late = true;
            }
        }
    };
    if let Err(err) = result {
        // Slow or idle clients cut off, clients that hung up: not the broker's problem.
        tracing::debug!(%peer, %err, "Connection closed with an error.");
    }
}

/// Answers the request of a connection past the limit with `503` and closes it.
async fn refuse_connection(
    tcp: TcpStream,
    max_connections: usize,
    header_read_timeout: Duration,
    _permit: OwnedSemaphorePermit,
) {
    let service = hyper::service::service_fn(move |_request| async move {
        Ok::<_, std::convert::Infallible>(refusal(max_connections))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_CONNECTION_BUFFER)
        .max_header_size(MAX_CONNECTION_BUFFER)
        .keep_alive(false);
    let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
}

/// The answer to a request on a connection past the limit.
fn refusal(max_connections: usize) -> axum::response::Response {
    let mut response = ApiError::Unavailable(format!(
        "the broker is serving {max_connections} connections, the most it allows \
         (--max-connections {max_connections}); try again in a moment"
    ))
    .into_response();
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from(RETRY_AFTER_SECS),
    );
    response
}

/// Waits until the client has sent bytes (true) or closed its side (false).
async fn has_data(tcp: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(tcp.peek(&mut first).await, Ok(n) if n > 0)
}

/// Errors of one connection that `accept` reports; the listener itself is fine.
fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Logs connections past the limit once per [`REFUSAL_LOG_INTERVAL`], not once per connection (a
/// flood would flood the log too).
#[derive(Default)]
struct RefusalLog {
    last: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl RefusalLog {
    fn refused(&mut self, max_connections: usize) {
        self.unlogged += 1;
        if self
            .last
            .is_some_and(|at| at.elapsed() < REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        self.last = Some(tokio::time::Instant::now());
        tracing::warn!(
            refused = self.unlogged,
            max_connections,
            "Connections arrived with every place taken (--max-connections): they take the \
             places of connections that sent no request, or are refused."
        );
        self.unlogged = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Serves a router answering `GET /` on loopback with `max_connections`.
    async fn start(max_connections: usize) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            app,
            ConnectionLimits {
                max_connections,
                header_read_timeout: Duration::from_secs(30),
            },
            shutdown.clone(),
        ));
        (addr, shutdown)
    }

    /// Sends `GET /` on a fresh connection; returns the answer, empty if the connection was
    /// closed without one, or `None` if nothing happened within 5 s.
    async fn get(addr: SocketAddr) -> Option<String> {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let _ = tcp
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
            .await
            .ok()
            .map(|_| String::from_utf8_lossy(&answer).into_owned())
    }

    #[tokio::test]
    async fn past_the_limit_a_client_is_told_to_retry_until_a_place_frees() {
        let (addr, shutdown) = start(2).await;
        let first = TcpStream::connect(addr).await.unwrap();
        let _second = TcpStream::connect(addr).await.unwrap();
        let refused = get(addr).await.unwrap();
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(refused.contains("retry-after: 1\r\n"), "{refused}");
        // A connection that closes frees its place.
        drop(first);
        let mut answered = None;
        for _ in 0..100 {
            let answer = get(addr).await.unwrap();
            if answer.starts_with("HTTP/1.1 200") {
                answered = Some(answer);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            answered.is_some(),
            "the closed connection's place was not freed"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_client_takes_the_place_of_a_connection_that_sent_nothing() {
        let (addr, shutdown) = start(2).await;
        let mut idle = [
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        // Refused while the idle connections are within their grace, served after it.
        let mut answer = get(addr).await.unwrap();
        for _ in 0..100 {
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            answer = get(addr).await.unwrap();
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // The oldest idle connection gave up its place.
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn past_the_refusals_too_a_connection_is_closed_at_once() {
        let (addr, shutdown) = start(1).await;
        let mut idle = Vec::new();
        for _ in 0..1 + MAX_REFUSING {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let started = tokio::time::Instant::now();
        assert_eq!(get(addr).await.as_deref(), Some(""));
        assert!(
            started.elapsed() < REFUSAL_HEADER_TIMEOUT,
            "closed only after {:?}",
            started.elapsed()
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn the_refusal_says_what_to_do_and_when_to_retry() {
        let response = refusal(8);
        assert_eq!(
            response.status(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(response.headers()[axum::http::header::RETRY_AFTER], "1");
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: testbot_proto::error::ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(body.error.code, "unavailable");
        assert_eq!(
            body.error.message,
            "the broker is serving 8 connections, the most it allows (--max-connections 8); \
             try again in a moment"
        );
    }
}
