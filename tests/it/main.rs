//! The integration tests, one binary with a module per area (as ripgrep does): one link
//! step and one process instead of one per file. `cargo test --test it AREA::` runs an
//! area, e.g. `cargo test --test it faults::`.

#[macro_use]
mod common;

mod architecture;
mod convergence;
mod faults;
mod iptables_layout;
mod lifecycle;
mod manifests;
mod nftables;
mod operable;
mod packets;
