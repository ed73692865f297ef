//! End-to-end tests of the fleet: real brokers, agents and CLI processes on loopback.

mod action;
mod admin_token;
mod agent_account;
mod bad_input;
mod cli;
mod containers;
mod drain;
mod enrollment;
mod forwarded_tokens;
mod identity_script;
mod job_env;
mod kubernetes;
mod leases;
mod load;
mod logs;
mod policy_cli;
mod queued_tokens;
mod quotas;
mod registration;
mod restart;
mod revocation;
mod robustness;
mod routing;
mod site_policy;
mod slurm;
mod trust;
