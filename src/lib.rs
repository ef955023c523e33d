//! ip-masq-agent: keeps a node's NAT so pod traffic to destinations outside the
//! configured non-masquerade CIDRs leaves with the node's address.

pub mod config;
pub mod backend;
pub mod policy;
pub mod cli;
pub mod agent;
pub mod commands;
pub mod logging;
