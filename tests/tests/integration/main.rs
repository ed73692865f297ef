//! End-to-end tests of the fleet: real brokers, agents and CLI processes on loopback.

mod bad_input;
mod cli;
mod drain;
mod leases;
mod load;
mod logs;
mod restart;
mod trust;
