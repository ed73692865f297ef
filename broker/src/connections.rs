//! Serving HTTP connections: at most `--max-connections` at once, each closed when its request
//! headers take longer than `--header-read-timeout` (a client trickling them in, or a kept-alive
//! connection left idle), and all drained on shutdown.
//!
//! Every open connection costs a file descriptor and buffers. Without these bounds a flood of
//! connections that never send a byte, or send their headers a byte at a time, exhausts the
//! broker's descriptors, and then it can accept no heartbeat and open no database file. Each
//! connection's buffer is bounded too ([`MAX_CONNECTION_BUFFER`]: larger headers get `431`).
//!
//! A connection past the limit is not left waiting in the kernel's accept queue, where a flood
//! would hold real clients behind it until their connect timed out: it is accepted and answered
//! `503 unavailable` with `Retry-After`, which agents and the CLI retry. Answering needs the
//! request's headers, so up to [`MAX_REFUSING`] such connections are given
//! [`REFUSAL_HEADER_TIMEOUT`] to send them; connections past that too are closed at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// How many connections past the limit may be waiting for their `503` at once.
pub const MAX_REFUSING: usize = 64;

/// How long a connection past the limit may take to send the request it is refused.
pub const REFUSAL_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// The most a connection may make the broker buffer: a request's headers must fit (the
/// largest the broker's clients send, an OIDC token in `authorization`, is a few KiB). hyper's
/// default, ~400 KiB, would let `--max-connections` slow clients hold 400 MiB.
pub const MAX_CONNECTION_BUFFER: usize = 64 * 1024;

/// What the client is told to wait before connecting again, in seconds.
const RETRY_AFTER_SECS: u64 = 1;

/// How long to wait before accepting again after the listener failed (out of descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// How often at most a flood of refused connections is logged.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Bounds on the connections the broker serves.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
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
        if let Ok(permit) = serving.clone().try_acquire_owned() {
            connections.spawn(serve_connection(
                tcp,
                peer,
                app.clone(),
                limits.header_read_timeout,
                shutdown.clone(),
                permit,
            ));
            continue;
        }
        refusals.refused(limits.max_connections);
        if let Ok(permit) = refusing.clone().try_acquire_owned() {
            connections.spawn(refuse_connection(
                tcp,
                limits.max_connections,
                limits.header_read_timeout.min(REFUSAL_HEADER_TIMEOUT),
                permit,
            ));
        }
        // Otherwise dropping `tcp` closes it at once.
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection until it closes. On shutdown it lets the request in progress finish
/// (held polls and followed logs end by themselves) and closes; a connection that has not yet
/// sent a whole request is closed at once, so a client that connects and sends nothing, or
/// trickles its headers, cannot hold up a restart.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    app: Router,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let requested = Arc::new(AtomicBool::new(false));
    let service = hyper::service::service_fn({
        let app = hyper_util::service::TowerToHyperService::new(app);
        let requested = requested.clone();
        move |request| {
            requested.store(true, Ordering::Relaxed);
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
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            if !requested.load(Ordering::Relaxed) {
                return;
            }
            // Closes a kept-alive connection between requests at once.
            connection.as_mut().graceful_shutdown();
            connection.await
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

/// Errors of one connection that `accept` reports; the listener itself is fine.
fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Logs refused connections once per [`REFUSAL_LOG_INTERVAL`], not once per connection (a
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
            "Refused connections past --max-connections."
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
