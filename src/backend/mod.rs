//! Backends turn a [`Policy`] into kernel state, one transaction per family per sync.

pub mod command;
pub mod dry_run;
pub mod iptables;

use crate::policy::Policy;

/// What one sync did, for logs and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Processes the sync started (iptables-save, iptables-restore, ...).
    pub processes: u64,
    /// Rules now in the agent's chain(s), summed over families.
    pub rules: usize,
}

pub trait Backend {
    /// A one-line description for the start-up log, e.g. "iptables (nft)".
    fn describe(&self) -> String;

    /// The exact text this backend would hand the kernel for `policy` on a node
    /// that carries none of the agent's rules yet.
    fn render(&self, policy: &Policy) -> String;

    /// Makes the kernel match `policy`.
    fn sync(&mut self, policy: &Policy) -> anyhow::Result<SyncReport>;
}
