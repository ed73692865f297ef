//! The testbot broker: a durable job queue with leases, a log store with live fan-out, and the
//! HTTP API that clients and agents use.
//!
//! Jobs are stored in SQLite (WAL), or in PostgreSQL shared by several brokers. Agents
//! long-poll for work and are woken the moment a job they can take is queued; each claim is a
//! lease renewed by heartbeats, and a lease that runs out requeues the job (up to a bounded
//! number of attempts), so every job gets exactly one result.
//!
//! Layout:
//! - [`server`]: process wiring ([`Broker::start`]) and the lease sweeper.
//! - [`connections`]: serving HTTP connections: the connection limit, the header-read timeout,
//!   graceful shutdown.
//! - [`api`]: the router ([`api::create_app`]) and its handlers, one file per resource.
//! - [`lifecycle`]: every change of a job, what it means (`testbot:` lines, requeues), and the
//!   job-event bus that followers, held heartbeats and waiting polls hear it on.
//! - [`store`]: the [`store::Store`] trait and its implementations: SQLite in the data directory
//!   (the default) and PostgreSQL (`--database-url`, for several brokers sharing one queue).
//! - [`routing`]: which job an agent may be offered, and jobs agents hand back.
//! - [`auth`]: bearer tokens and principals; [`error`]: the JSON error type and extractors.
//! - [`access`]: what a workflow token may do besides submitting (forwarded tokens), and the
//!   repository ids a registration is bound to.
//! - [`github`]: the GitHub App (webhooks, check runs, commands) and the GitHub REST calls the
//!   broker makes (repository permission checks).
//! - [`nonces`]: replay protection for signed agent requests.
//! - [`limits`]: queue quotas and the retention sweep of finished jobs.
//! - [`health`]: `/healthz` and `/readyz`; [`metrics`]: `/metrics` for Prometheus.
//! - [`web`]: the web pages: a job's page with its live log (what check runs link to).
//! - [`cli`]: the `testbot-broker` command-line flags.

pub mod access;
pub mod api;
pub mod auth;
pub mod cli;
pub mod connections;
pub mod error;
pub mod github;
pub mod health;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod nonces;
pub mod routing;
pub mod server;
pub mod state;
pub mod store;
pub mod web;

pub use server::{Broker, BrokerConfig};
