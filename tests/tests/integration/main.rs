//! End-to-end tests of the fleet: real brokers, agents and CLI processes on loopback.

mod action;
mod agent_account;
mod bad_input;
mod cli;
mod containers;
mod drain;
mod enrollment;
mod identity_script;
mod kubernetes;
mod leases;
mod load;
mod logs;
mod policy_cli;
mod restart;
mod site_policy;
mod slurm;
mod trust;
