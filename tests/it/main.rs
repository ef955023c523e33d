//! The integration tests, one binary with a module per area (as ripgrep does): one link
//! step and one process instead of one per file. `cargo test --test it AREA::` runs an
//! area, e.g. `cargo test --test it faults::`. The helpers are the `ima-harness` crate
//! (crates/harness).

use std::sync::LazyLock;

use ima_harness::Agent;

mod architecture;
mod conntrack;
mod conntrack_ownership;
mod conntrack_property;
mod convergence;
mod exceptions;
mod faults;
mod hostile_files;
mod image;
mod iptables_layout;
mod lifecycle;
mod manifests;
mod multihomed;
mod neighbours;
mod nftables;
mod operable;
mod packets;
mod precedence;
mod tenants;
mod two_agents;

/// The agent binary cargo built for these tests.
static AGENT: LazyLock<Agent> = LazyLock::new(|| Agent::new(env!("CARGO_BIN_EXE_ip-masq-agent")));
