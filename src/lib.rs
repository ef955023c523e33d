//! ip-masq-agent: keeps a node's NAT so pod traffic to destinations outside the
//! configured non-masquerade CIDRs leaves with the node's address.
//!
//! The modules follow the flow of a sync, and each depends only on those before it:
//! `config` (raw document -> validated `Config`, and where it comes from) -> `policy`
//! (the decision per family) -> `backend` (drivers that render and apply it through one
//! runner seam) -> `agent` (watch, resync, apply-if-changed, health, wiring) -> `cli`
//! and `commands` (what `main` runs). `observe` (metrics, health, HTTP, logs) is told
//! things by the agent and knows none of it.

pub mod agent;
pub mod backend;
pub mod cli;
pub mod commands;
pub mod config;
pub mod conntrack;
#[doc(hidden)]
pub mod fuzzing;
pub mod kernel;
pub mod observe;
pub mod policy;
pub mod survey;
