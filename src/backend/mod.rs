//! Backends turn a [`Policy`] into kernel state, one transaction per family per sync.
//! Each driver (`iptables`, `nftables`) lives in its own file, spawns tools only through
//! the [`runner`] seam, and never calls another driver: what concerns two of them (the
//! names they share, removing the other's leftovers after a switch, `cleanup`) is here.

pub mod conntrack;
pub mod dry_run;
pub mod iptables;
pub mod nftables;
pub mod precedence;
pub mod runner;
pub mod windows;

#[cfg(test)]
mod agreement_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use crate::policy::{Family, Policy};
use runner::{Program, SharedRunner, ToolError};

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
    /// rules that act before them ([`SrcnatWatch`]); None: nowhere to survey from.
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
pub const NFTABLES_PRIORITY: i32 = precedence::SRCNAT + 10;

fn srcnat_ours(place: SrcnatPlace) -> precedence::Ours {
    let (xtables, priority) = match place {
        SrcnatPlace::Iptables(flavour) => (Some(flavour.as_str()), precedence::SRCNAT),
        SrcnatPlace::Nftables => (None, NFTABLES_PRIORITY),
    };
    precedence::Ours {
        xtables,
        priority,
        nft_table: ("inet", nftables::TABLE),
        is_agent_jump: iptables::is_agent_jump_spec,
        is_agent_chain_rule: iptables::is_agent_chain_rule,
    }
}

/// Reads every table whose nat rules may act on srcnat before the agent's: `nft -t list
/// ruleset` (native tables; `-t` leaves out set elements, so a large set costs nothing),
/// and `iptables-save -t nat` of both flavours for each family in `families` — except
/// what `fresh` already holds (the backend's own flavour, as its sync just read it), a
/// legacy table the kernel does not have (`legacy_nat_present`; naming one would create
/// it) and an iptables-nft table the ruleset does not list.
fn read_srcnat(
    runner: &SharedRunner,
    place: SrcnatPlace,
    families: &[Family],
    fresh: &[(Family, &str)],
    legacy_nat_present: impl Fn(Family) -> bool,
) -> precedence::Listings {
    let mut listings = precedence::Listings::default();
    if runner.exists("nft") {
        match runner.run(&Program::new("nft"), &["-t", "list", "ruleset"], None, None) {
            Ok(ruleset) => {
                listings.read.push("nft ruleset".into());
                listings.ruleset = Some(ruleset);
            }
            Err(err) => listings
                .notes
                .push(format!("native nft tables not surveyed: {err}")),
        }
    }
    for flavour in [iptables::Flavour::Nft, iptables::Flavour::Legacy] {
        for &family in families {
            let mut saved = precedence::SavedNat {
                flavour: flavour.as_str(),
                family,
                text: String::new(),
            };
            let label = format!("{} nat ({family})", saved.tool());
            let own = fresh
                .iter()
                .find(|(f, _)| *f == family)
                .filter(|_| place == SrcnatPlace::Iptables(flavour));
            if let Some((_, text)) = own {
                saved.text = text.to_string();
                listings.read.push(label);
                listings.saved.push(saved);
                continue;
            }
            let present = match (flavour, &listings.ruleset) {
                (iptables::Flavour::Legacy, _) => legacy_nat_present(family),
                (iptables::Flavour::Nft, Some(ruleset)) => {
                    let name = match family {
                        Family::V4 => "table ip nat {",
                        Family::V6 => "table ip6 nat {",
                    };
                    ruleset.lines().any(|line| line == name)
                }
                (iptables::Flavour::Nft, None) => true,
            };
            if !present {
                continue;
            }
            let Some(tools) = iptables::resolve_tools(family, flavour, runner) else {
                continue;
            };
            match runner.run(&tools.save, &["-t", "nat"], None, None) {
                Ok(text) => {
                    saved.text = text;
                    listings.read.push(label);
                    listings.saved.push(saved);
                }
                Err(err) => listings.notes.push(format!("{label} not surveyed: {err}")),
            }
        }
    }
    listings
}

/// How the set of rules acting before the agent's changed since the last survey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrcnatChange {
    pub survey: precedence::Survey,
    /// Rules that were not listed the last time (all of them at the first survey).
    pub appeared: Vec<precedence::Preceding>,
    pub gone: Vec<precedence::Preceding>,
    /// Notes (what could not be read) that are new.
    pub new_notes: Vec<String>,
}

/// Keeps the survey of NAT rules acting before the agent's (see [`precedence`]) current
/// at no extra cost on an idle resync: a full survey (other iptables flavour, native nft
/// tables) runs when asked (start-up, config change); otherwise only what the backend's
/// sync read anyway is classified again, and only when it changed.
pub struct SrcnatWatch {
    runner: SharedRunner,
    /// What the last full survey read.
    listings: Option<precedence::Listings>,
    /// A hash of what the backend's sync had read at the last classification.
    fresh: Option<u64>,
    /// The policy of the last classification (what a rule can override depends on it).
    classified_for: Option<Policy>,
    last: Option<precedence::Survey>,
}

impl SrcnatWatch {
    pub fn new(runner: SharedRunner) -> SrcnatWatch {
        SrcnatWatch {
            runner,
            listings: None,
            fresh: None,
            classified_for: None,
            last: None,
        }
    }

    /// Surveys again (everything when `full`, else only what `backend`'s last sync read)
    /// and returns what changed; None when nothing did or `backend` writes nowhere.
    pub fn update(
        &mut self,
        backend: &dyn Backend,
        policy: &Policy,
        full: bool,
    ) -> Option<SrcnatChange> {
        let place = backend.srcnat_place()?;
        let fresh = backend.last_read_nat();
        let hash = fingerprint(&fresh);
        let listings = match self.listings.as_mut() {
            Some(listings) if !full => {
                if self.fresh == Some(hash) && self.classified_for.as_ref() == Some(policy) {
                    return None;
                }
                for (family, text) in &fresh {
                    let flavour = match place {
                        SrcnatPlace::Iptables(flavour) => flavour.as_str(),
                        SrcnatPlace::Nftables => continue,
                    };
                    match listings
                        .saved
                        .iter_mut()
                        .find(|s| s.flavour == flavour && s.family == *family)
                    {
                        Some(saved) => saved.text = text.to_string(),
                        None => listings.saved.push(precedence::SavedNat {
                            flavour,
                            family: *family,
                            text: text.to_string(),
                        }),
                    }
                }
                listings.clone()
            }
            _ => {
                let families: Vec<Family> = policy.families.iter().map(|f| f.family).collect();
                let listings = read_srcnat(&self.runner, place, &families, &fresh, |family| {
                    iptables::may_hold_nat_table(iptables::Flavour::Legacy, family, &self.runner)
                });
                self.listings = Some(listings.clone());
                listings
            }
        };
        self.fresh = Some(hash);
        self.classified_for = Some(policy.clone());
        let survey = precedence::classify(&listings, &srcnat_ours(place), policy);
        let previous = self.last.replace(survey.clone());
        let before: &[precedence::Preceding] = previous.as_ref().map_or(&[], |s| &s.rules);
        let absent = |rule: &precedence::Preceding, among: &[precedence::Preceding]| {
            !among.iter().any(|other| other.key() == rule.key())
        };
        let appeared: Vec<_> = survey
            .rules
            .iter()
            .filter(|r| absent(r, before))
            .cloned()
            .collect();
        let gone: Vec<_> = before
            .iter()
            .filter(|r| absent(r, &survey.rules))
            .cloned()
            .collect();
        let new_notes: Vec<String> = survey
            .notes
            .iter()
            .filter(|n| previous.as_ref().is_none_or(|p| !p.notes.contains(n)))
            .cloned()
            .collect();
        let same = previous
            .as_ref()
            .is_some_and(|p| p.omitted == survey.omitted)
            && appeared.is_empty()
            && gone.is_empty()
            && new_notes.is_empty();
        (!same).then_some(SrcnatChange {
            survey,
            appeared,
            gone,
            new_notes,
        })
    }
}

/// A hash of saved nat tables that ignores what changes without a rule changing: the
/// timestamp comments and the chain policies' packet counters.
fn fingerprint(saved: &[(Family, &str)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (family, text) in saved {
        family.hash(&mut hasher);
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let line = match line.rsplit_once(" [") {
                Some((declaration, _)) if line.starts_with(':') => declaration,
                _ => line,
            };
            line.hash(&mut hasher);
        }
    }
    hasher.finish()
}

/// One full survey for `backend` (after its `diff` or `sync`, whose reads it reuses).
pub fn survey_srcnat(
    backend: &dyn Backend,
    policy: &Policy,
    runner: &SharedRunner,
) -> Option<precedence::Survey> {
    SrcnatWatch::new(runner.clone())
        .update(backend, policy, true)
        .map(|change| change.survey)
}

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

/// Removes the nftables backend's table if present; where it removed it.
fn remove_nft_table(runner: &SharedRunner) -> Result<Option<String>, SyncError> {
    if !runner.exists("nft") {
        // A host without nft cannot hold that table either.
        return Ok(None);
    }
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

/// Splits an iptables-save or nft line into words: whitespace separates, double quotes
/// group, and `\"` and `\\` inside them are literal characters (as iptables-save escapes a
/// comment). Each word comes with whether any of it was quoted.
pub fn words(line: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let (mut in_word, mut quoted, mut was_quoted) = (false, false, false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
                was_quoted = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push((std::mem::take(&mut current), was_quoted));
                    in_word = false;
                    was_quoted = false;
                }
            }
            _ => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push((current, was_quoted));
    }
    out
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
