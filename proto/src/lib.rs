//! Wire types shared by the testbot broker, agent and CLI.
//!
//! Every type here is part of the HTTP API under `/api/v1`. Request bodies reject unknown fields,
//! so a typo in a client is an error rather than a silently ignored setting.
//!
//! Layout:
//! - [`jobs`]: what a job is ([`jobs::JobSpec`]), its lifecycle ([`jobs::JobState`]) and the view
//!   clients see ([`jobs::Job`]).
//! - [`agents`]: the agent side of the protocol: poll, assignment, start, heartbeat.
//! - [`batches`]: N runs of one job, followed and counted as one.
//! - [`logs`]: log chunks (keyed by byte offset) and the line format of a stored log.
//! - [`repos`]: repository registration.
//! - [`commands`]: the `/testbot` comment commands.
//! - [`provenance`]: what made a GitHub App job, for the agent to verify.
//! - [`repo_config`]: a repository's `.github/testbot.toml` (the GitHub App's jobs and triggers).
//! - [`results`]: how a job ended, as reported by the agent.
//! - [`junit`]: JUnit XML result files that jobs upload, read as a bounded stream.
//! - [`secrets`]: secret job variables: how they are checked, shown as `***` and masked in logs.
//! - [`signing`]: Ed25519 signatures on agent requests.
//! - [`test_results`]: result files a job uploads, and the test cases read from them.
//! - [`sites`]: sites, enrollment tokens and enrolled agents.
//! - [`error`]: the JSON error envelope every endpoint uses.
//! - [`glob`]: the `*`/`?` patterns of policy rules.
//! - [`units`]: memory sizes as people write them (`512M`, `64G`).
//! - [`toml_errors`]: errors in a TOML file placed at `LINE:COL`, with "did you mean".
//! - [`oidc`]: GitHub Actions OIDC claims and their verification (broker and agent both use it).
//! - [`client`] (feature `client`): a typed HTTP client for the broker.

pub mod agents;
pub mod batches;
pub mod bisect;
#[cfg(feature = "client")]
pub mod client;
pub mod commands;
pub mod error;
pub mod glob;
pub mod jobs;
pub mod junit;
pub mod logs;
pub mod oidc;
pub mod provenance;
pub mod repo_config;
pub mod repos;
pub mod results;
pub mod secrets;
pub mod signing;
pub mod sites;
pub mod test_results;
pub mod toml_errors;
pub mod units;

/// Sets up `tracing` for a daemon or CLI: `RUST_LOG`-style filter (default `default_filter`),
/// written to stderr, with colours only on a terminal.
#[cfg(feature = "telemetry")]
pub fn init_tracing(default_filter: &str) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// The API version prefix every route lives under.
pub const API_PREFIX: &str = "/api/v1";

/// Milliseconds since the Unix epoch, the timestamp unit of the whole API.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Formats a millisecond timestamp as RFC 3339 (UTC, millisecond precision).
pub fn format_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}
