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

/// What the agent's rules decided before a sync replaced them: the destinations they
/// kept (RETURN) and whether everything else was masqueraded. No rules in force (no
/// chain, no jump) kept everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplacedDecisions {
    pub keep: Vec<ipnet::IpNet>,
    pub masquerades: bool,
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
    /// A tool run failed while doing `doing` (said once when the error already says it).
    #[error("{}", tool_error_text(doing, error))]
    Tool { doing: String, error: ToolError },
    /// The backend cannot work here (tools missing, a family not enabled).
    #[error("{0}")]
    Unusable(String),
    /// The kernel's rules could not be read in a form the agent understands; nothing
    /// was written on them.
    #[error("{0}")]
    Unreadable(String),
    /// Another agent in this network namespace held the agent lock too long.
    #[error(
        "another ip-masq-agent in this network namespace held the sync lock ({name}) for {waited:.1?}; not touching the rules meanwhile"
    )]
    LockBusy {
        name: String,
        waited: std::time::Duration,
    },
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
    Unreadable,
    LockBusy,
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
            SyncErrorKind::Unreadable => "unreadable",
            SyncErrorKind::LockBusy => "lock_busy",
        }
    }
}

impl SyncError {
    pub fn kind(&self) -> SyncErrorKind {
        match self {
            SyncError::ForeignChain { .. } => SyncErrorKind::ForeignChain,
            SyncError::Unusable(_) => SyncErrorKind::Unusable,
            SyncError::Unreadable(_) => SyncErrorKind::Unreadable,
            SyncError::LockBusy { .. } => SyncErrorKind::LockBusy,
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

/// Takes the agent lock (see [`crate::kernel::lock`]) for one read-and-write of the
/// rules, waiting up to one tool deadline. Without a socket to be had it goes on
/// unlocked, warning once: a second agent is rare, a node without NAT is not an option.
pub fn lock_agents(runner: &SharedRunner) -> Result<crate::kernel::lock::AgentLock, SyncError> {
    use crate::kernel::lock::{AgentLock, LockError};
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    match runner.lock_agents(crate::kernel::tool_timeout()) {
        Ok(lock) => Ok(lock),
        Err(LockError::Busy { name, waited }) => Err(SyncError::LockBusy { name, waited }),
        Err(LockError::Unavailable(why)) => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "cannot take the lock that keeps two agents of this node from writing at once ({why}); going on without it"
                );
            }
            Ok(AgentLock::none())
        }
    }
}

/// Attaches what was being done to a tool's failure.
pub trait Doing<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, SyncError>;
}

/// `doing: error`, or only the error when it begins with `doing` already (a netlink
/// error names what it was writing, as the backend's context does).
fn tool_error_text(doing: &str, error: &ToolError) -> String {
    let error = error.to_string();
    if error.starts_with(doing) {
        error
    } else {
        format!("{doing}: {error}")
    }
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
    /// own read of its nat table), so the survey reuses them instead of reading again.
    fn last_read_nat(&self) -> Vec<(Family, &str)> {
        Vec::new()
    }

    /// The agent's nat chain, for the iptables backend.
    fn agent_chain(&self) -> Option<&ChainName> {
        None
    }

    /// What the agent's own rules decided just before the last sync wrote over them,
    /// when that is known exactly (the existing flows started under it); None when the
    /// last sync wrote nothing or the old rules were of a shape it does not read back.
    fn replaced_decisions(&self) -> Option<ReplacedDecisions> {
        None
    }

    /// What the operator should know about how the last `sync` or `diff` had to read
    /// the kernel (e.g. a nat table iptables-nft could only list chain by chain); empty
    /// when nothing is out of the ordinary.
    fn read_notes(&self) -> Vec<String> {
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
    if let Some(interfaces) = &policy.out_interfaces {
        let names: Vec<String> = interfaces.iter().map(ToString::to_string).collect();
        out.push_str(&format!(
            "# masqueraded only when leaving through: {}\n",
            if names.is_empty() {
                "none (outputInterface is empty)".to_string()
            } else {
                names.join(", ")
            }
        ));
    }
    for family in &policy.families {
        if let Some(to) = &family.snat_to {
            out.push_str(&format!(
                "# {} masqueraded to {to} (SNAT, outputAddress{})\n",
                family.family,
                if to.is_ipv6() { "IPv6" } else { "" }
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

/// The agent's rules where a running backend no longer works, which it removes once its
/// own are in force: the other backend's, and with the iptables backend the other
/// iptables flavour's (both flavours hook srcnat at priority 100, so a chain left there
/// keeps deciding traffic by the config it was written for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leftovers {
    chain: ChainName,
    /// The iptables flavours whose agent jumps and chains go.
    iptables: Vec<iptables::Flavour>,
    /// Whether the nftables backend's table goes.
    nft_table: bool,
    /// Which backend works now, for the log lines.
    working: SrcnatPlace,
}

impl Leftovers {
    /// Of the nftables backend: the iptables backend's rules, in both flavours.
    pub fn of_nftables_backend(chain: &ChainName) -> Leftovers {
        Leftovers {
            chain: chain.clone(),
            iptables: vec![iptables::Flavour::Nft, iptables::Flavour::Legacy],
            nft_table: false,
            working: SrcnatPlace::Nftables,
        }
    }

    /// Of the iptables backend in `flavour`: the nftables backend's table, and the
    /// agent's rules in the other flavour.
    pub fn of_iptables_backend(chain: &ChainName, flavour: iptables::Flavour) -> Leftovers {
        Leftovers {
            chain: chain.clone(),
            iptables: vec![flavour.other()],
            nft_table: true,
            working: SrcnatPlace::Iptables(flavour),
        }
    }

    /// Removes them; returns a log line per place they were removed from. Run after a
    /// successful sync (so traffic is never left unmasqueraded) and retried until it
    /// succeeds.
    pub fn remove(&self, runner: &SharedRunner) -> Result<Vec<String>, SyncError> {
        let mut lines = Vec::new();
        for place in iptables::remove_agent_rules_in(&self.iptables, &self.chain, runner)? {
            lines.push(match self.working {
                SrcnatPlace::Nftables => {
                    format!("removed the iptables backend's rules from {place}")
                }
                SrcnatPlace::Iptables(flavour) => format!(
                    "removed the agent's rules left in {place} (the agent works in iptables-{flavour})"
                ),
            });
        }
        if self.nft_table && remove_nft_table(runner)?.is_some() {
            lines.push("removed the nftables backend's table".to_string());
        }
        Ok(lines)
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
            Leftovers::of_nftables_backend(chain),
        ),
        BackendChoice::Windows => {
            return Err(SyncError::Unusable(
                "--backend=windows only renders; the agent is Linux-only (use windows-cni on Windows nodes)".into(),
            ));
        }
        BackendChoice::Iptables | BackendChoice::Auto => {
            let backend =
                iptables::IptablesBackend::new(chain.clone(), mode, enable_ipv6, runner.clone())?;
            let leftovers = Leftovers::of_iptables_backend(chain, backend.flavour());
            (Box::new(backend), leftovers)
        }
    })
}
