//! Backends turn a [`Policy`] into kernel state, one transaction per family per sync.

pub mod command;
pub mod dry_run;
pub mod iptables;
pub mod nftables;

#[cfg(test)]
mod agreement_tests;

use crate::policy::Policy;

/// `--backend`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// Upstream's chain and rules (the drop-in default).
    #[default]
    Iptables,
    /// One private nft table with interval sets.
    Nftables,
    /// nftables when kube-proxy runs in nftables mode or no iptables is installed.
    Auto,
    /// `render` only: the OutBoundNAT exception list for Windows win-bridge networks.
    Windows,
}

/// The backend `auto` picks on this host.
pub fn resolve_auto() -> BackendChoice {
    let has_iptables = [
        "iptables-nft-restore",
        "iptables-legacy-restore",
        "iptables-restore",
        "xtables-nft-multi",
        "xtables-legacy-multi",
    ]
    .iter()
    .any(|tool| command::find_on_path(tool).is_some());
    if !has_iptables {
        return BackendChoice::Nftables;
    }
    let kube_proxy_nft = command::find_on_path("nft").is_some()
        && command::Program::new("nft")
            .run(&["list", "tables"], None)
            .is_ok_and(|tables| nftables::lists_kube_proxy_table(&tables));
    if kube_proxy_nft {
        BackendChoice::Nftables
    } else {
        BackendChoice::Iptables
    }
}

/// What one sync did, for logs and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Processes the sync started (iptables-save, iptables-restore, ...).
    pub processes: u64,
    /// Rules now in the agent's chain(s), summed over families.
    pub rules: usize,
    /// False when the kernel already matched and nothing was written.
    pub wrote: bool,
}

pub trait Backend {
    /// A one-line description for the start-up log, e.g. "iptables (nft)".
    fn describe(&self) -> String;

    /// The backend's name for metrics labels.
    fn kind(&self) -> &'static str;

    /// The exact text this backend would hand the kernel for `policy` on a node
    /// that carries none of the agent's rules yet.
    fn render(&self, policy: &Policy) -> String;

    /// Makes the kernel match `policy`.
    fn sync(&mut self, policy: &Policy) -> anyhow::Result<SyncReport>;

    /// Reads the kernel's rules and lists how they differ from `policy`: lines the
    /// kernel lacks start with `-`, lines it has but should not start with `+`.
    fn diff(&mut self, policy: &Policy) -> anyhow::Result<Vec<String>>;
}

/// Removes everything any backend of the agent installs, in every iptables flavour and
/// family and in nftables; returns where it removed something.
pub fn cleanup_everything(chain: &iptables::ChainName) -> anyhow::Result<Vec<String>> {
    let mut removed = iptables::remove_agent_rules(chain)?;
    if let Some(place) = remove_nft_table()? {
        removed.push(place);
    }
    Ok(removed)
}

/// Removes the nftables backend's table if present; where it removed it.
fn remove_nft_table() -> anyhow::Result<Option<String>> {
    if command::find_on_path("nft").is_none() {
        // A host without nft cannot hold that table either.
        return Ok(None);
    }
    let removed = nftables::remove_table(&command::Program::new("nft"))?;
    Ok(removed.then(|| format!("nft table inet {}", nftables::TABLE)))
}

/// Which backend's leftovers a running backend removes once its own rules are in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leftovers {
    /// The iptables backend's chain and jumps (every flavour and family).
    Iptables(iptables::ChainName),
    /// The nftables backend's table.
    Nftables,
}

impl Leftovers {
    fn remove(&self) -> anyhow::Result<Vec<String>> {
        match self {
            Leftovers::Iptables(chain) => iptables::remove_agent_rules(chain),
            Leftovers::Nftables => Ok(remove_nft_table()?.into_iter().collect()),
        }
    }
}

/// A backend that, after each successful sync until one removal succeeds, removes the
/// other backend's rules. Only after its own rules are in force, so traffic is never
/// left unmasqueraded; and retried, because an old iptables chain left at srcnat runs
/// before the nft table and keeps the old decisions.
pub struct RemovingLeftovers {
    inner: Box<dyn Backend>,
    leftovers: Leftovers,
    removed: bool,
}

impl RemovingLeftovers {
    pub fn new(inner: Box<dyn Backend>, leftovers: Leftovers) -> RemovingLeftovers {
        RemovingLeftovers {
            inner,
            leftovers,
            removed: false,
        }
    }
}

impl Backend for RemovingLeftovers {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn render(&self, policy: &Policy) -> String {
        self.inner.render(policy)
    }

    fn sync(&mut self, policy: &Policy) -> anyhow::Result<SyncReport> {
        let started_with = command::spawned_processes();
        let mut report = self.inner.sync(policy)?;
        if !self.removed {
            let places = self.leftovers.remove().map_err(|err| {
                err.context("removing the other backend's rules (retried at the next sync)")
            })?;
            for place in places {
                match self.leftovers {
                    Leftovers::Iptables(_) => {
                        tracing::info!("removed the iptables backend's rules from {place}")
                    }
                    Leftovers::Nftables => tracing::info!("removed the nftables backend's table"),
                }
                report.wrote = true;
            }
            self.removed = true;
            report.processes = command::spawned_processes() - started_with;
        }
        Ok(report)
    }

    fn diff(&mut self, policy: &Policy) -> anyhow::Result<Vec<String>> {
        self.inner.diff(policy)
    }
}

/// `-` for expected lines missing from `actual`, `+` for extra ones, in order.
pub fn line_diff(expected: &[String], actual: &[String]) -> Vec<String> {
    let mut out: Vec<String> = expected
        .iter()
        .filter(|line| !actual.contains(line))
        .map(|line| format!("- {line}"))
        .collect();
    out.extend(
        actual
            .iter()
            .filter(|line| !expected.contains(line))
            .map(|line| format!("+ {line}")),
    );
    if out.is_empty() && expected != actual {
        out.push("~ the same rules in a different order".to_string());
    }
    out
}

/// The backend the flags ask for, set up for this host (probing it for `auto`).
pub fn build(
    choice: BackendChoice,
    chain: &iptables::ChainName,
    mode: iptables::IptablesMode,
    enable_ipv6: bool,
) -> anyhow::Result<Box<dyn Backend>> {
    use anyhow::Context;
    let choice = match choice {
        BackendChoice::Auto => resolve_auto(),
        chosen => chosen,
    };
    Ok(match choice {
        BackendChoice::Nftables => Box::new(RemovingLeftovers::new(
            Box::new(nftables::NftablesBackend::new().context("setting up the nftables backend")?),
            Leftovers::Iptables(chain.clone()),
        )),
        BackendChoice::Windows => anyhow::bail!(
            "--backend=windows only renders; the agent is Linux-only (use windows-cni on Windows nodes)"
        ),
        BackendChoice::Iptables | BackendChoice::Auto => Box::new(RemovingLeftovers::new(
            Box::new(
                iptables::IptablesBackend::new(chain.clone(), mode, enable_ipv6)
                    .context("setting up the iptables backend")?,
            ),
            Leftovers::Nftables,
        )),
    })
}
