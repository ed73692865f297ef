//! The testbot agent: a daemon that only dials out. It long-polls the broker for jobs, runs each
//! one with its executor in a fresh directory, streams the output back line by line while the
//! job runs, renews its lease with heartbeats, and reports the result.
//!
//! Layout:
//! - [`agent`]: the process: workers, poll loop with backoff, drain on SIGTERM.
//! - [`job`]: one assignment from start to finish, with heartbeats.
//! - [`ship`]: live log shipping with offsets and retries.
//! - [`executor`]: the [`executor::Executor`] trait; `shell` and `noop` executors.
//! - [`config`]: the TOML configuration file.
//! - [`enroll`]: the agent's identity: enrollment, its Ed25519 key, signed requests.
//! - [`policy`]: the site policy TOML: rules, executor caps, and [`policy::SitePolicy::evaluate`].
//! - [`identity`]: which local account a job runs as (static map, default, or admin script).
//! - [`github`]: GitHub App jobs checked with GitHub itself, and their commit checked out.
//! - [`results`]: a job's result files, collected from its workspace within limits and without
//!   following links.

pub mod agent;
pub mod config;
pub mod enroll;
pub mod executor;
pub mod github;
pub mod identity;
pub mod job;
pub mod policy;
pub mod results;
pub mod ship;

pub use agent::{Agent, Shutdown};
pub use config::AgentConfig;
