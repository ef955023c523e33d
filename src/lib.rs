//! ip-masq-agent: keeps a node's NAT so pod traffic to destinations outside the
//! configured non-masquerade CIDRs leaves with the node's address.

pub mod agent;
pub mod backend;
pub mod cli;
pub mod commands;
pub mod config;
pub mod http;
pub mod logging;
pub mod policy;
pub mod telemetry;
pub mod watch;
pub mod windows;
