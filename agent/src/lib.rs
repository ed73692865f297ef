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

pub mod agent;
pub mod config;
pub mod executor;
pub mod job;
pub mod ship;

pub use agent::{Agent, Shutdown};
pub use config::AgentConfig;
