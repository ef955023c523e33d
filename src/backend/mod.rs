//! Backends turn a [`Policy`] into kernel state, one transaction per family per sync.
//! Each driver (`iptables`, `nftables`) lives in its own file, spawns tools only through
//! the [`runner`] seam, and never calls another driver: what concerns two of them (the
//! names they share, removing the other's leftovers after a switch, `cleanup`) is here.
//! What acts on the kernel without being a driver lives beside this module: the runner
//! seam (`kernel`), the survey of others' NAT rules (`survey`), existing flows
//! (`conntrack`).

pub mod dry_run;
pub mod iptables;
pub mod nftables;
pub mod windows;

#[cfg(test)]
mod agreement_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use crate::kernel::{Program, SharedRunner, ToolError};
use crate::policy::{Family, Policy};

pub const DEFAULT_CHAIN: &str = "IP-MASQ-AGENT";

/// A nat chain name iptables will accept and that cannot collide with a built-in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainName(String);

impl ChainName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ChainName {
    fn default() -> Self {
        ChainName(DEFAULT_CHAIN.to_string())
    }
}

impl fmt::Display for ChainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ChainName {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        const RESERVED: [&str; 9] = [
            "PREROUTING",
            "INPUT",
            "OUTPUT",
            "FORWARD",
            "POSTROUTING",
            "ACCEPT",
            "DROP",
            "RETURN",
            "QUEUE",
        ];
        if name.is_empty() {
            return Err("chain name is empty".into());
        }
        // XT_EXTENSION_MAXNAMELEN is 29 including the terminating NUL.
        if name.len() > 28 {
            return Err(format!(
                "chain name {name:?} is {} characters long; iptables allows at most 28",
                name.len()
            ));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\'))
        {
            return Err(format!(
                "chain name {name:?} contains {bad:?}; iptables refuses whitespace and quotes"
            ));
        }
        if name.starts_with('-') || name.starts_with('!') {
            return Err(format!(
                "chain name {name:?} starts with {:?}, which iptables reads as an option",
                &name[..1]
            ));
        }
        if RESERVED.contains(&name) {
            return Err(format!("chain name {name:?} is a built-in chain or target"));
        }
        Ok(ChainName(name.to_string()))
    }
}

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
pub fn resolve_auto(runner: &SharedRunner) -> BackendChoice {
    let has_iptables = [
        "iptables-nft-restore",
        "iptables-legacy-restore",
        "iptables-restore",
        "xtables-nft-multi",
        "xtables-legacy-multi",
    ]
    .iter()
    .any(|tool| runner.exists(tool));
    if !has_iptables {
        return BackendChoice::Nftables;
    }
    let kube_proxy_nft = runner.exists("nft")
        && runner
            .run(&Program::new("nft"), &["list", "tables"], None, None)
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

/// Why a sync (or a clean-up) did not complete, typed so the agent and `/healthz` can
/// tell a neighbour's chain from a hung tool or a held lock.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(
        "the {family} nat chain {chain} holds only rules the agent did not write ({count}, e.g. `{example}`); refusing to flush it — remove them or choose another --masq-chain"
    )]
    ForeignChain {
        family: Family,
        chain: String,
        count: usize,
        example: String,
    },
    /// A tool run failed while doing `doing`.
    #[error("{doing}: {error}")]
    Tool { doing: String, error: ToolError },
    /// The backend cannot work here (tools missing, a family not enabled).
    #[error("{0}")]
    Unusable(String),
}

/// The kinds of [`SyncError`], for metrics labels and health reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncErrorKind {
    ForeignChain,
    ToolMissing,
    ToolFailed,
    ToolTimedOut,
    Interrupted,
    Unusable,
}

impl SyncErrorKind {
    pub fn label(self) -> &'static str {
        match self {
            SyncErrorKind::ForeignChain => "foreign_chain",
            SyncErrorKind::ToolMissing => "tool_missing",
            SyncErrorKind::ToolFailed => "tool_failed",
            SyncErrorKind::ToolTimedOut => "tool_timed_out",
            SyncErrorKind::Interrupted => "interrupted",
            SyncErrorKind::Unusable => "unusable",
        }
    }
}

impl SyncError {
    pub fn kind(&self) -> SyncErrorKind {
        match self {
            SyncError::ForeignChain { .. } => SyncErrorKind::ForeignChain,
            SyncError::Unusable(_) => SyncErrorKind::Unusable,
            SyncError::Tool { error, .. } => match error {
                ToolError::Missing { .. } => SyncErrorKind::ToolMissing,
                ToolError::Failed { .. } | ToolError::Wait { .. } | ToolError::Kernel { .. } => {
                    SyncErrorKind::ToolFailed
                }
                ToolError::TimedOut { .. } => SyncErrorKind::ToolTimedOut,
                ToolError::Interrupted { .. } => SyncErrorKind::Interrupted,
            },
        }
    }
}

/// Attaches what was being done to a tool's failure.
pub trait Doing<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, SyncError>;
}

impl<T> Doing<T> for Result<T, ToolError> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, SyncError> {
        self.map_err(|error| SyncError::Tool {
            doing: what(),
            error,
        })
    }
}

pub trait Backend {
    /// A one-line description for the start-up log, e.g. "iptables (nft)".
    fn describe(&self) -> String;

    /// The backend's name for metrics labels.
    fn kind(&self) -> &'static str;

    /// Makes the kernel match `policy`.
    fn sync(&mut self, policy: &Policy) -> Result<SyncReport, SyncError>;

    /// Reads the kernel's rules and lists how they differ from `policy`: lines the
    /// kernel lacks start with `-`, lines it has but should not start with `+`.
    fn diff(&mut self, policy: &Policy) -> Result<Vec<String>, SyncError>;

    /// Where the agent's own rules sit on the srcnat hook, for the survey of the NAT
    /// rules that act before them (`survey::SrcnatWatch`); None: nowhere to survey from.
    fn srcnat_place(&self) -> Option<SrcnatPlace> {
        None
    }

    /// The nat tables the last `sync` or `diff` read, by family (the iptables backend's
    /// own `iptables-save -t nat`), so the survey reuses them instead of reading again.
    fn last_read_nat(&self) -> Vec<(Family, &str)> {
        Vec::new()
    }
}

/// Where the agent's own rules sit on the srcnat hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrcnatPlace {
    /// At its jump in nat POSTROUTING of this iptables flavour (hook priority srcnat, 100).
    Iptables(iptables::Flavour),
    /// The chain of `table inet ip-masq-agent`, at [`NFTABLES_PRIORITY`].
    Nftables,
}

/// The nftables backend's hook priority: `srcnat + 10`, as its transaction declares it.
pub const NFTABLES_PRIORITY: i32 = SRCNAT + 10;

/// The srcnat hook priority (NF_IP_PRI_NAT_SRC), where iptables' nat POSTROUTING sits.
pub const SRCNAT: i32 = 100;

/// The exact text `choice` would hand the kernel for `policy` on a node that carries
/// none of the agent's rules yet (`auto` renders iptables: deciding needs the host).
pub fn render(choice: BackendChoice, policy: &Policy, chain: &ChainName) -> String {
    match choice {
        BackendChoice::Iptables | BackendChoice::Auto => {
            resolved_summary(policy) + &iptables::render(policy, chain)
        }
        BackendChoice::Nftables => resolved_summary(policy) + &nftables::render(policy),
        BackendChoice::Windows => windows::render(policy),
    }
}

/// Comment lines stating the policy's flat answer, when the new keys make one.
fn resolved_summary(policy: &Policy) -> String {
    let list = |nets: &[ipnet::IpNet]| -> String {
        if nets.is_empty() {
            "none".to_string()
        } else {
            nets.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let mut out = String::new();
    for family in &policy.families {
        let Some(resolved) = &family.resolved else {
            continue;
        };
        out.push_str(&format!(
            "# {} after longest-prefix match, keeps the pod address: {}\n",
            family.family,
            list(&resolved.keep)
        ));
        if let Some(sources) = &resolved.sources {
            out.push_str(&format!(
                "# {} masqueraded only from: {}\n",
                family.family,
                list(sources)
            ));
        }
    }
    out
}

/// Removes everything any backend of the agent installs, in every iptables flavour and
/// family and in nftables; returns where it removed something.
pub fn cleanup_everything(
    chain: &ChainName,
    runner: &SharedRunner,
) -> Result<Vec<String>, SyncError> {
    let mut removed = iptables::remove_agent_rules(chain, runner)?;
    if let Some(place) = remove_nft_table(runner)? {
        removed.push(place);
    }
    Ok(removed)
}

/// Removes the nftables backend's table if present (over netlink: no nft needed); where
/// it removed it.
fn remove_nft_table(runner: &SharedRunner) -> Result<Option<String>, SyncError> {
    let removed = nftables::remove_table(runner)?;
    Ok(removed.then(|| format!("nft table inet {}", nftables::TABLE)))
}

/// The other backend's rules, which a running backend removes once its own are in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leftovers {
    /// The iptables backend's chain and jumps (every flavour and family).
    Iptables(ChainName),
    /// The nftables backend's table.
    Nftables,
}

impl Leftovers {
    /// Removes them; returns a log line per place they were removed from. Run after a
    /// successful sync (so traffic is never left unmasqueraded) and retried until it
    /// succeeds: an old iptables chain at srcnat runs before the nft table and keeps
    /// the old decisions.
    pub fn remove(&self, runner: &SharedRunner) -> Result<Vec<String>, SyncError> {
        Ok(match self {
            Leftovers::Iptables(chain) => iptables::remove_agent_rules(chain, runner)?
                .into_iter()
                .map(|place| format!("removed the iptables backend's rules from {place}"))
                .collect(),
            Leftovers::Nftables => remove_nft_table(runner)?
                .map(|_| "removed the nftables backend's table".to_string())
                .into_iter()
                .collect(),
        })
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

/// The backend the flags ask for, set up for this host (probing it for `auto`), and the
/// other backend's leftovers it should remove once its own rules are in force.
pub fn build(
    choice: BackendChoice,
    chain: &ChainName,
    mode: iptables::IptablesMode,
    enable_ipv6: bool,
    runner: &SharedRunner,
) -> Result<(Box<dyn Backend>, Leftovers), SyncError> {
    let choice = match choice {
        BackendChoice::Auto => resolve_auto(runner),
        chosen => chosen,
    };
    Ok(match choice {
        BackendChoice::Nftables => (
            Box::new(nftables::NftablesBackend::new(runner.clone())?),
            Leftovers::Iptables(chain.clone()),
        ),
        BackendChoice::Windows => {
            return Err(SyncError::Unusable(
                "--backend=windows only renders; the agent is Linux-only (use windows-cni on Windows nodes)".into(),
            ));
        }
        BackendChoice::Iptables | BackendChoice::Auto => (
            Box::new(iptables::IptablesBackend::new(
                chain.clone(),
                mode,
                enable_ipv6,
                runner.clone(),
            )?),
            Leftovers::Nftables,
        ),
    })
}
