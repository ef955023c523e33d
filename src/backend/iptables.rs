//! The upstream-compatible backend: one nat chain per family, replaced atomically by
//! `iptables-restore --noflush`, and one POSTROUTING jump into it.

use std::fmt;
use std::time::Duration;

use super::{Backend, ChainName, Doing, ReplacedDecisions, SrcnatPlace, SyncError, SyncReport};
use crate::kernel::{Program, SharedRunner, ToolError};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::egress::{AddressRange, InterfacePattern};
use crate::policy::{
    Decision, Family, FamilyPolicy, Masquerade, PORT_PROTOCOLS, Policy, PortRange,
};

const NON_MASQ_COMMENT: &str = "ip-masq-agent: local traffic is not subject to MASQUERADE";
const MASQ_COMMENT: &str =
    "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)";
/// On the SNAT rules that stand for MASQUERADE when outputAddress(IPv6) is set.
const SNAT_COMMENT: &str =
    "ip-masq-agent: outbound traffic is subject to SNAT (must be last in chain)";
/// On the RETURN rules for sources outside masqueradeSourceCIDRs (only with that key).
const SOURCE_COMMENT: &str =
    "ip-masq-agent: traffic from outside masqueradeSourceCIDRs is not subject to MASQUERADE";
/// How long iptables-restore waits for the xtables lock (`-w`), as upstream passes it.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Which of the two iptables implementations holds the host's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Nft,
    Legacy,
}

impl Flavour {
    /// The flavour that is not this one.
    pub fn other(self) -> Flavour {
        match self {
            Flavour::Nft => Flavour::Legacy,
            Flavour::Legacy => Flavour::Nft,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Flavour::Nft => "nft",
            Flavour::Legacy => "legacy",
        }
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--iptables-mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IptablesMode {
    #[default]
    Auto,
    Nft,
    Legacy,
}

/// kubelet (1.17+) creates one of these chains in the mangle table of the flavour it uses.
const KUBELET_HINT_CHAINS: [&str; 2] = [":KUBE-IPTABLES-HINT", ":KUBE-KUBELET-CANARY"];

/// kubernetes-sigs/iptables-wrappers' test: `^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)`.
pub fn has_kubelet_hint(saved: &str) -> bool {
    saved.lines().any(|line| {
        KUBELET_HINT_CHAINS
            .iter()
            .any(|hint| line.starts_with(hint))
    })
}

/// The probes of kubernetes-sigs/iptables-wrappers' `DetectMode`, in its order: the first
/// that shows kubelet's hint decides; none does, nft. There is no rule-count heuristic.
pub const FLAVOUR_PROBES: [(Flavour, Family); 4] = [
    (Flavour::Nft, Family::V4),
    (Flavour::Nft, Family::V6),
    (Flavour::Legacy, Family::V4),
    (Flavour::Legacy, Family::V6),
];

/// kubelet's hint chains without the save format's `:`.
const KUBELET_HINT_NAMES: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

/// The tools of one flavour and family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyTools {
    pub save: Program,
    pub restore: Program,
    /// `iptables-nft` itself, for `-S CHAIN` when iptables-nft-save cannot print the
    /// table (iptables-nft only; None when it is not installed).
    pub list: Option<Program>,
}

fn base_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

/// `iptables-nft-save`, else `xtables-nft-multi iptables-save`, else plain `iptables-save`.
fn resolve_tool(
    family: Family,
    flavour: Flavour,
    suffix: &str,
    runner: &SharedRunner,
) -> Option<Program> {
    let base = base_name(family);
    let flavoured = format!("{base}-{}-{suffix}", flavour.as_str());
    if runner.exists(&flavoured) {
        return Some(Program::new(flavoured));
    }
    let multi = format!("xtables-{}-multi", flavour.as_str());
    if runner.exists(&multi) {
        return Some(Program {
            path: multi,
            leading_args: vec![format!("{base}-{suffix}")],
        });
    }
    let plain = format!("{base}-{suffix}");
    runner.exists(&plain).then(|| Program::new(plain))
}

pub fn resolve_tools(
    family: Family,
    flavour: Flavour,
    runner: &SharedRunner,
) -> Option<FamilyTools> {
    Some(FamilyTools {
        save: resolve_tool(family, flavour, "save", runner)?,
        restore: resolve_tool(family, flavour, "restore", runner)?,
        list: match flavour {
            Flavour::Nft => resolve_list_tool(family, flavour, runner),
            Flavour::Legacy => None,
        },
    })
}

/// `iptables-nft`, else `xtables-nft-multi iptables` (never a plain `iptables`, which
/// may be the other flavour).
fn resolve_list_tool(family: Family, flavour: Flavour, runner: &SharedRunner) -> Option<Program> {
    let base = base_name(family);
    let flavoured = format!("{base}-{}", flavour.as_str());
    if runner.exists(&flavoured) {
        return Some(Program::new(flavoured));
    }
    let multi = format!("xtables-{}-multi", flavour.as_str());
    runner.exists(&multi).then(|| Program {
        path: multi,
        leading_args: vec![base.to_string()],
    })
}

/// What iptables-nft-save prints instead of a table holding rules it cannot express
/// (a native nft rule in `ip nat`, e.g. `snat to` with a map, or a bare `masquerade` in
/// a chain of its own); it exits 0.
const INCOMPATIBLE_TABLE: &str = "# Table `nat' is incompatible";

/// Whether iptables-nft-save printed "incompatible" instead of the table.
pub fn is_incompatible_listing(saved: &str) -> bool {
    saved
        .lines()
        .any(|line| line.starts_with(INCOMPATIBLE_TABLE))
}

/// One flavour and family's nat table as the agent read it: iptables-save's text, or,
/// for iptables-nft, the same form rebuilt from listing the chains that matter one by
/// one (`by_chain`): POSTROUTING, every chain reached from it, and the agent's chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatRead {
    pub text: String,
    pub by_chain: bool,
    /// Chains reached from POSTROUTING that iptables could not list (they hold native
    /// nft rules); their rules are not in `text`.
    pub unlisted: Vec<String>,
    /// Chains reached from POSTROUTING past [`MAX_LISTED_CHAINS`], not read.
    pub left_out: usize,
}

/// Why `saved` (iptables-save output, possibly of several tables) is not a listing the
/// agent can act on; None when it is. A write computed from a listing that was not
/// understood could add a jump at every resync, so nothing is ever written on one.
pub fn saved_nat_problem(saved: &str) -> Option<String> {
    let mut in_nat = false;
    let mut committed = false;
    for (index, line) in saved.lines().enumerate() {
        let problem = |what: &str| Some(format!("line {}: {what}", index + 1));
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(table) = line.strip_prefix('*') {
            if table.is_empty() || table.contains(char::is_whitespace) {
                return problem("a table line without a plain name");
            }
            in_nat = table == "nat";
            continue;
        }
        if line == "COMMIT" {
            committed |= in_nat;
            in_nat = false;
            continue;
        }
        if let Some(declaration) = line.strip_prefix(':') {
            let parts: Vec<&str> = declaration.split(' ').collect();
            let counters = parts.get(2).is_some_and(|c| {
                c.strip_prefix('[')
                    .and_then(|c| c.strip_suffix(']'))
                    .and_then(|c| c.split_once(':'))
                    .is_some_and(|(p, b)| {
                        p.bytes().all(|b| b.is_ascii_digit())
                            && b.bytes().all(|b| b.is_ascii_digit())
                    })
            });
            if parts.len() != 3 || parts[0].is_empty() || !counters {
                return problem("a chain declaration that is not `:NAME POLICY [packets:bytes]`");
            }
            continue;
        }
        if line.starts_with("-A ") {
            if !quotes_balanced(line) {
                return problem("unbalanced quotes");
            }
            if line.split(' ').nth(1).is_none_or(str::is_empty) {
                return problem("a rule without a chain");
            }
            continue;
        }
        return problem("not a table, chain, rule or COMMIT line");
    }
    if !committed {
        return Some("no complete *nat table (no `*nat` ... `COMMIT`)".to_string());
    }
    None
}

/// Whether every double quote of a saved rule is closed (`\"` and `\\` inside quotes
/// are literal characters, as iptables-save escapes a comment).
fn quotes_balanced(line: &str) -> bool {
    crate::kernel::words::scan_outside_quotes(line, |_| {})
}

/// The chains that the POSTROUTING jumps of any release of the agent lead to.
/// The most chains one read lists one by one (POSTROUTING and what it reaches); what
/// lies further is not read (kube-proxy's path from POSTROUTING is two chains long).
pub const MAX_LISTED_CHAINS: usize = 64;

/// Targets of iptables itself, never chains: not looked up.
const BUILTIN_TARGETS: &[&str] = &[
    "ACCEPT",
    "DROP",
    "RETURN",
    "QUEUE",
    "MASQUERADE",
    "SNAT",
    "DNAT",
    "REDIRECT",
    "NETMAP",
    "MARK",
    "CONNMARK",
    "LOG",
    "NFLOG",
    "TRACE",
    "CT",
    "NOTRACK",
    "CLASSIFY",
    "AUDIT",
];

/// The chains a saved rule line jumps or goes to (`-j X` / `-g X` where X is no target
/// of iptables itself).
fn jump_targets(line: &str) -> Vec<String> {
    let words = saved_words(line);
    words
        .windows(2)
        .filter(|pair| pair[0] == "-j" || pair[0] == "-g")
        .map(|pair| pair[1].clone())
        .filter(|target| !BUILTIN_TARGETS.contains(&target.as_str()))
        .collect()
}

/// Reads one flavour and family's nat table. iptables-nft (when `iptables-nft` itself is
/// installed) lists only POSTROUTING, the chains reached from it and `chain`, one by one
/// (`-S CHAIN`): iptables-nft-save of a kube-proxy table of 10,000 Services peaks at
/// about 100 MB, over the DaemonSet's memory limit, while one chain costs about 2 MB.
/// iptables-legacy loads the whole table whichever way it is asked, so it is saved
/// whole (`whole`: every table, since naming a legacy table makes the kernel create it).
/// A read the agent cannot parse, or a POSTROUTING or `chain` it cannot list, fails: the
/// agent never writes what it could not read.
pub fn read_nat_table(
    flavour: Flavour,
    family: Family,
    tools: &FamilyTools,
    chain: &ChainName,
    whole: bool,
    runner: &SharedRunner,
) -> Result<NatRead, SyncError> {
    let place = format!("the {family} nat table of iptables-{flavour}");
    if flavour == Flavour::Nft
        && let Some(list) = &tools.list
    {
        match read_nat_by_chain(family, list, chain, &place, runner) {
            // Its chain lookups go over netlink; where nf_tables cannot be reached that
            // way (user-mode emulation of another architecture refuses the socket), the
            // table is saved whole, as iptables-nft-save alone can.
            Err(SyncError::Tool {
                error: ToolError::Kernel { message, .. },
                ..
            }) => tracing::debug!(
                "{place}: chain lookups over netlink failed ({message}); saving the table whole"
            ),
            other => return other,
        }
    }
    let args: &[&str] = if whole { &[] } else { &["-t", "nat"] };
    let saved = runner
        .run(&tools.save, args, None, None)
        .doing(|| format!("reading {place}"))?;
    // A neighbour's comment may hold a newline: one rule per line again.
    let saved = crate::kernel::words::join_quoted_newlines(&saved).into_owned();
    if is_incompatible_listing(&saved) {
        return Err(SyncError::Unreadable(format!(
            "{place} holds rules iptables cannot list (native nft rules), and {} is not installed to list its chains one by one; nothing is written until the table can be read",
            resolve_list_name(family)
        )));
    }
    if let Some(problem) = saved_nat_problem(&saved) {
        return Err(SyncError::Unreadable(format!(
            "{place}: {} printed something that is not an iptables-save listing ({problem}); nothing is written on a listing the agent cannot read",
            tools.save.display(args)
        )));
    }
    Ok(NatRead {
        text: if whole { nat_section(&saved) } else { saved },
        by_chain: false,
        unlisted: Vec::new(),
        left_out: 0,
    })
}

fn read_nat_by_chain(
    family: Family,
    list: &Program,
    chain: &ChainName,
    place: &str,
    runner: &SharedRunner,
) -> Result<NatRead, SyncError> {
    let native = |what: &str| {
        format!(
            "{place} holds rules iptables cannot list in {what} (native nft rules, `nft list table {} nat` shows them)",
            match family {
                Family::V4 => "ip",
                Family::V6 => "ip6",
            }
        )
    };
    let show = |name: &str| {
        runner
            .run(list, &["-t", "nat", "-S", name], None, None)
            .map(|listing| crate::kernel::words::join_quoted_newlines(&listing).into_owned())
    };
    let failed = |name: &str, error: ToolError| SyncError::Tool {
        doing: format!("reading {place}: listing chain {name}"),
        error,
    };
    let postrouting = match show("POSTROUTING") {
        Ok(listing) => listing,
        Err(err) if lists_native_rules(&err) => {
            return Err(SyncError::Unreadable(format!(
                "{} ({err}); the agent cannot see its jump there, so it writes nothing until those rules are gone",
                native("its POSTROUTING chain")
            )));
        }
        Err(err) => return Err(failed("POSTROUTING", err)),
    };
    // `-S NAME` prints `-P NAME POLICY` or `-N NAME`, then `-A NAME ...` lines; anything
    // else is a listing the agent does not understand and never writes on.
    let own_rules = |listing: &str, name: &str| -> Result<Vec<String>, SyncError> {
        let problem = |what: &str| {
            SyncError::Unreadable(format!(
                "{place}: {} printed something that is not a listing of chain {name} ({what}); nothing is written on a listing the agent cannot read",
                list.display(&["-t", "nat", "-S", name])
            ))
        };
        let own = format!("-A {name} ");
        let mut headed = false;
        let mut rules = Vec::new();
        for line in listing.lines().filter(|line| !line.is_empty()) {
            if line.starts_with(&format!("-P {name} ")) || line == format!("-N {name}") {
                headed = true;
            } else if line.starts_with(&own) && quotes_balanced(line) {
                rules.push(line.to_string());
            } else {
                return Err(problem("a line that is no rule of the chain"));
            }
        }
        if !headed {
            return Err(problem("no `-P` or `-N` line"));
        }
        Ok(rules)
    };
    let mut declarations = vec![":POSTROUTING ACCEPT [0:0]".to_string()];
    let mut rules = own_rules(&postrouting, "POSTROUTING")?;
    let mut unlisted = Vec::new();
    // Breadth first from POSTROUTING; the agent's chain is read wherever it stands.
    let mut queue: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut seen: Vec<String> = vec!["POSTROUTING".into()];
    let enqueue = |targets: Vec<String>,
                   queue: &mut std::collections::VecDeque<String>,
                   seen: &mut Vec<String>| {
        for target in targets {
            if !seen.contains(&target) {
                seen.push(target.clone());
                queue.push_back(target);
            }
        }
    };
    enqueue(vec![chain.to_string()], &mut queue, &mut seen);
    let targets: Vec<String> = rules.iter().flat_map(|rule| jump_targets(rule)).collect();
    enqueue(targets, &mut queue, &mut seen);
    let mut listed = 1;
    let mut left_out = 0;
    while let Some(name) = queue.pop_front() {
        let ours = name == chain.as_str();
        if !ours && listed >= MAX_LISTED_CHAINS {
            left_out += 1;
            continue;
        }
        // A target that is no chain (an extension iptables knows, e.g. TCPMSS) costs
        // one netlink lookup, not a process.
        let exists = runner
            .nft_chain_exists(family, "nat", &name)
            .map_err(|error| SyncError::Tool {
                doing: format!("reading {place}: looking up chain {name}"),
                error,
            })?;
        if !exists {
            continue;
        }
        listed += 1;
        match show(&name) {
            Ok(listing) => {
                declarations.push(format!(":{name} - [0:0]"));
                let chain_rules = own_rules(&listing, &name)?;
                let targets: Vec<String> = chain_rules
                    .iter()
                    .flat_map(|rule| jump_targets(rule))
                    .collect();
                rules.extend(chain_rules);
                enqueue(targets, &mut queue, &mut seen);
            }
            Err(err) if !lists_native_rules(&err) => return Err(failed(&name, err)),
            // Deleted since it was looked up (iptables-nft says "incompatible" of a
            // missing chain too): nothing of it to read, and nothing to say.
            Err(_)
                if !runner
                    .nft_chain_exists(family, "nat", &name)
                    .unwrap_or(true) => {}
            Err(err) if ours => {
                return Err(SyncError::Unreadable(format!(
                    "{} ({err}); refusing to flush a chain the agent cannot read",
                    native(&format!("the agent's chain {name}"))
                )));
            }
            // Native rules in a neighbour's chain (or a stale chain of an older name:
            // only the jump into it will go): left out, and said.
            Err(_) => unlisted.push(name),
        }
    }
    // nft lets anyone name a chain ACCEPT, RETURN or MASQUERADE, and iptables-nft prints
    // a jump to it exactly as its own target: the agent could not tell its RETURN from
    // a jump into someone's masquerade, nor a neighbour's ACCEPT from one. Where such a
    // chain exists, nothing read here means what it says.
    let mut named_like_targets: Vec<String> = Vec::new();
    for rule in &rules {
        let words = saved_words(rule);
        for pair in words.windows(2) {
            let target = &pair[1];
            if (pair[0] == "-j" || pair[0] == "-g")
                && BUILTIN_TARGETS.contains(&target.as_str())
                && !named_like_targets.contains(target)
            {
                named_like_targets.push(target.clone());
            }
        }
    }
    let read_chains: Vec<String> = declarations
        .iter()
        .filter_map(|line| line.strip_prefix(':'))
        .filter_map(|line| line.split(' ').next())
        .map(str::to_string)
        .collect();
    for target in named_like_targets {
        let exists = runner
            .nft_chain_exists(family, "nat", &target)
            .map_err(|error| SyncError::Tool {
                doing: format!("reading {place}: looking up chain {target}"),
                error,
            })?;
        // A chain of that name alone (nothing of what was read jumps to it) changes
        // nothing; nft's own listing tells `return` from `jump RETURN`.
        if exists && jumped_to_natively(family, &read_chains, &target, runner)? {
            return Err(SyncError::Unreadable(format!(
                "{place} holds a chain named {target} (native nft: iptables refuses that name) that a rule the agent reads jumps to, and iptables-nft prints that jump exactly as its own {target}; nothing is written until it is renamed"
            )));
        }
    }
    let mut text = String::from("*nat\n");
    for line in declarations.iter().chain(&rules) {
        text.push_str(line);
        text.push('\n');
    }
    text.push_str("COMMIT\n");
    Ok(NatRead {
        text,
        by_chain: true,
        unlisted,
        left_out,
    })
}

/// Whether a rule of `chains` (of `family`'s nat table) jumps or goes to the chain
/// `target`, as nft lists them (`jump RETURN`, where iptables-nft prints `-j RETURN` for
/// that and for a plain return alike). Without nft, or when a listing fails, it cannot
/// be told apart: true.
fn jumped_to_natively(
    family: Family,
    chains: &[String],
    target: &str,
    runner: &SharedRunner,
) -> Result<bool, SyncError> {
    if !runner.exists("nft") {
        return Ok(true);
    }
    let nft_family = match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    };
    for chain in chains {
        let listing = match runner.run(
            &Program::new("nft"),
            &["list", "chain", nft_family, "nat", chain],
            None,
            None,
        ) {
            Ok(listing) => listing,
            Err(_) => return Ok(true),
        };
        let jumps = listing.lines().any(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            words.windows(2).any(|pair| {
                matches!(pair[0], "jump" | "goto")
                    && pair[1].trim_matches(|c| matches!(c, '"' | ',' | '}')) == target
            })
        });
        if jumps {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether iptables-nft failed because the chain holds rules it cannot express ("...
/// is incompatible, use 'nft' tool"), not for want of time, a lock or the tool.
fn lists_native_rules(error: &ToolError) -> bool {
    matches!(error, ToolError::Failed { stderr, .. } if stderr.contains("incompatible"))
}

fn resolve_list_name(family: Family) -> String {
    format!("{}-nft (or xtables-nft-multi)", base_name(family))
}

/// Reads the host's tables and applies the iptables-wrapper rule. Like the wrapper, a
/// probe that fails (tool missing, error, deadline) just moves on to the next.
///
/// The wrapper reads `iptables-nft-save -t mangle`, which loads every table of the
/// family first: beside kube-proxy's nat table of 10,000 Services that is a process of
/// about 100 MB for a yes or no. For iptables-nft the same question (a chain of mangle
/// whose name starts with kubelet's) goes to the kernel as one streamed chain dump. A
/// legacy table is read only when the kernel has it (naming one would create it), and
/// then alone (`-t mangle`).
pub fn detect_flavour(runner: &SharedRunner) -> Flavour {
    // A probe that fails counts as no hint (the wrapper's rule), but never silently: the
    // flavour it picks then may not be kubelet's.
    let failed = |flavour: Flavour, family: Family, error: &dyn fmt::Display| {
        tracing::warn!(
            "looking for kubelet's iptables hint in {}-{flavour}'s mangle table failed ({error}); taken as no hint there",
            base_name(family)
        );
    };
    detect_flavour_with(|flavour, family| match flavour {
        Flavour::Nft => {
            match runner.nft_has_chain_prefixed(family, "mangle", &KUBELET_HINT_NAMES) {
                Ok(true) => Some(format!(":{} - [0:0]", KUBELET_HINT_NAMES[0])),
                Ok(false) => Some(String::new()),
                Err(error) => {
                    failed(flavour, family, &error);
                    None
                }
            }
        }
        Flavour::Legacy => {
            if !runner.legacy_tables(family).iter().any(|t| t == "mangle") {
                return None;
            }
            let save = resolve_tool(family, flavour, "save", runner)?;
            match runner.run(&save, &["-t", "mangle"], None, None) {
                Ok(saved) => Some(saved),
                Err(error) => {
                    failed(flavour, family, &error);
                    None
                }
            }
        }
    })
}

/// The wrapper's decision given a way to run each probe: what it read of the mangle
/// table, as iptables-save prints it (None: the probe failed).
pub fn detect_flavour_with(mut probe: impl FnMut(Flavour, Family) -> Option<String>) -> Flavour {
    FLAVOUR_PROBES
        .iter()
        .find(|(flavour, family)| {
            probe(*flavour, *family).is_some_and(|saved| has_kubelet_hint(&saved))
        })
        .map_or(Flavour::Nft, |(flavour, _)| *flavour)
}

/// `--random-fully` needs iptables 1.6.2 or newer (the same check kube-proxy makes).
pub fn supports_random_fully(version_output: &str) -> bool {
    let Some(version) = version_output
        .split_whitespace()
        .find_map(|word| word.strip_prefix('v'))
    else {
        return false;
    };
    let numbers: Vec<u32> = version.split('.').map(|n| n.parse().unwrap_or(0)).collect();
    let at = |i: usize| numbers.get(i).copied().unwrap_or(0);
    (at(0), at(1), at(2)) >= (1, 6, 2)
}

/// The POSTROUTING jump's comment for `chain`, as every release writes it.
fn jump_comment(chain: &str) -> String {
    format!(
        "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom {chain} chain"
    )
}

/// The jump's rule spec (after `-A POSTROUTING `), for tests that delete it by hand.
pub fn jump_spec_for(chain: &ChainName) -> String {
    jump_spec(chain.as_str())
}

/// The jump's rule spec (after `-A POSTROUTING `) as iptables-save prints it.
fn jump_spec(chain: &str) -> String {
    format!(
        "-m comment --comment \"{}\" -m addrtype ! --dst-type LOCAL -j {chain}",
        jump_comment(chain)
    )
}

/// The jump as v2.10.0-v2.12.1 wrote it: the comment itself held quote characters,
/// which iptables-save prints escaped.
fn quoted_jump_spec(chain: &str) -> String {
    format!(
        "-m comment --comment \"\\\"{}\\\"\" -m addrtype ! --dst-type LOCAL -j {chain}",
        jump_comment(chain)
    )
}

fn jump_rule(chain: &ChainName) -> String {
    format!("-A POSTROUTING {}", jump_spec(chain.as_str()))
}

/// The chain's rules as `-A` lines, in the order iptables-save prints them. With
/// `interfaces` (outputInterface), the MASQUERADE (or SNAT) rules are written once per
/// listed interface with `-o`: a packet leaving by another interface reaches the end of
/// the chain unmasqueraded. iptables has no "none of these interfaces" in one rule.
pub fn render_chain_rules(
    chain: &ChainName,
    family: &FamilyPolicy,
    masquerade: &Masquerade,
    interfaces: Option<&[InterfacePattern]>,
) -> Vec<String> {
    let mut rules = Vec::new();
    let keep = |prefix: &ipnet::IpNet| {
        format!("-A {chain} -d {prefix} -m comment --comment \"{NON_MASQ_COMMENT}\" -j RETURN")
    };
    match &family.resolved {
        // Upstream's layout, byte for byte, when neither new key is set.
        None => {
            rules.extend(family.link_local.iter().map(keep));
            rules.extend(family.non_masq.0.iter().map(keep));
        }
        // The policy's flat answer: sources out of scope return first, then the kept
        // destination blocks (disjoint, so their order does not matter).
        Some(resolved) => {
            rules.extend(resolved.out_of_scope.iter().map(|prefix| {
                format!(
                    "-A {chain} -s {prefix} -m comment --comment \"{SOURCE_COMMENT}\" -j RETURN"
                )
            }));
            rules.extend(resolved.keep.iter().map(keep));
        }
    }
    let random_fully = if masquerade.random_fully {
        " --random-fully"
    } else {
        ""
    };
    let weighted = masquerade.to_ports.weighted();
    // outputAddress: SNAT to it (ports from --to-ports) instead of MASQUERADE.
    let snat = family.snat_to.as_ref();
    let comment = if snat.is_some() {
        SNAT_COMMENT
    } else {
        MASQ_COMMENT
    };
    let target = |ports: Option<&PortRange>| match (snat, ports) {
        (Some(to), _) => format!("SNAT --to-source {}", snat_source(to, ports)),
        (None, Some(range)) => format!("MASQUERADE --to-ports {range}"),
        (None, None) => "MASQUERADE".to_string(),
    };
    let outs: Vec<String> = match interfaces {
        None => vec![String::new()],
        Some(list) => list
            .iter()
            .map(|pattern| format!(" -o {}", pattern.as_iptables()))
            .collect(),
    };
    for out in &outs {
        for protocol in PORT_PROTOCOLS {
            for w in &weighted {
                let statistic = w
                    .probability
                    .map(|p| format!(" -m statistic --mode random --probability {p}"))
                    .unwrap_or_default();
                rules.push(format!(
                    "-A {chain}{out} -p {protocol} -m comment --comment \"{comment}\"{statistic} -j {}{random_fully}",
                    target(Some(&w.range))
                ));
            }
        }
        rules.push(format!(
            "-A {chain}{out} -m comment --comment \"{comment}\" -j {}{random_fully}",
            target(None)
        ));
    }
    rules
}

/// `SNAT --to-source` as iptables-save prints it: `A`, `A-B`, `A:P-Q`; IPv6 with ports
/// in brackets, `[A-B]:P-Q`.
fn snat_source(to: &AddressRange, ports: Option<&PortRange>) -> String {
    match (ports, to.is_ipv6()) {
        (None, _) => to.to_string(),
        (Some(ports), false) => format!("{to}:{ports}"),
        (Some(ports), true) => format!("[{to}]:{ports}"),
    }
}

/// The chain a POSTROUTING rule spec (after `-A POSTROUTING `) jumps to, if some release
/// of the agent wrote exactly this rule for that chain (the v2.12.2+ comment or the quoted
/// v2.10.0-v2.12.1 one). Anything else, however much it looks like ours, is not ours.
fn agent_jump_target(spec: &str) -> Option<&str> {
    let target = spec.rsplit_once(" -j ")?.1;
    if target.is_empty() || target.contains(' ') {
        return None;
    }
    (spec == jump_spec(target) || spec == quoted_jump_spec(target)).then_some(target)
}

/// Splits an iptables-save line into its words (see [`crate::kernel::words`]).
pub fn saved_words(line: &str) -> Vec<String> {
    crate::kernel::words::words(line)
        .into_iter()
        .map(|(word, _)| word)
        .collect()
}

/// True when a rule of a chain (its iptables-save line) is exactly one the agent writes
/// into its chain: a RETURN with the non-masquerade comment, or a MASQUERADE with the
/// masquerade comment, each comment whole and alone.
pub fn is_agent_chain_rule(line: &str) -> bool {
    let words = saved_words(line);
    let after = |flag: &str| -> Vec<&str> {
        words
            .windows(2)
            .filter(|pair| pair[0] == flag)
            .map(|pair| pair[1].as_str())
            .collect()
    };
    match (after("--comment").as_slice(), after("-j").as_slice()) {
        ([comment], [target]) => {
            (matches!(*comment, NON_MASQ_COMMENT | SOURCE_COMMENT) && *target == "RETURN")
                || (*comment == MASQ_COMMENT && *target == "MASQUERADE")
                || (*comment == SNAT_COMMENT && *target == "SNAT")
        }
        _ => false,
    }
}

/// True when a POSTROUTING rule spec (after `-A POSTROUTING `) is a jump some release of
/// the agent wrote, into any chain.
pub fn is_agent_jump_spec(spec: &str) -> bool {
    agent_jump_target(spec).is_some()
}

fn is_agent_jump(spec: &str, chain: &ChainName) -> bool {
    agent_jump_target(spec) == Some(chain.as_str())
}

fn declares(saved_nat: &str, chain: &str) -> bool {
    let declared = format!(":{chain} ");
    saved_nat.lines().any(|line| line.starts_with(&declared))
}

/// True when a rule other than the agent's own jumps or the chain's own rules uses `chain`.
fn referenced_elsewhere(saved_nat: &str, chain: &str) -> bool {
    let own = format!("-A {chain} ");
    saved_nat
        .lines()
        .filter(|l| l.starts_with("-A ") && !l.starts_with(&own))
        .any(|line| {
            let agent_jump = line
                .strip_prefix("-A POSTROUTING ")
                .and_then(agent_jump_target)
                .is_some();
            !agent_jump
                && (line.ends_with(&format!(" -j {chain}"))
                    || line.ends_with(&format!(" -g {chain}"))
                    || line.contains(&format!(" -j {chain} "))
                    || line.contains(&format!(" -g {chain} ")))
        })
}

/// Restore lines removing the agent's jumps into any chain but `keep` (left by a renamed
/// `--masq-chain`, or all of them when `keep` is None), then those chains. A chain that
/// something else still uses is emptied but kept.
pub fn plan_stale_removal(saved_nat: &str, keep: Option<&ChainName>) -> Vec<String> {
    let mut lines = Vec::new();
    let mut targets: Vec<&str> = Vec::new();
    for spec in saved_nat
        .lines()
        .filter_map(|l| l.strip_prefix("-A POSTROUTING "))
    {
        let Some(target) = agent_jump_target(spec) else {
            continue;
        };
        if Some(target) == keep.map(ChainName::as_str) {
            continue;
        }
        lines.push(format!("-D POSTROUTING {spec}"));
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    for target in targets {
        lines.extend(plan_chain_removal(saved_nat, target));
    }
    lines
}

/// Lines emptying and deleting `chain`, only when every rule in it is exactly one the
/// agent writes: a chain holding anything else is never flushed, deleted or edited.
fn plan_chain_removal(saved_nat: &str, chain: &str) -> Vec<String> {
    if !declares(saved_nat, chain) {
        return Vec::new();
    }
    let own = format!("-A {chain} ");
    let all_ours = saved_nat
        .lines()
        .filter(|line| line.starts_with(&own))
        .all(is_agent_chain_rule);
    if !all_ours {
        return Vec::new();
    }
    let mut lines = vec![format!("-F {chain}")];
    if !referenced_elsewhere(saved_nat, chain) {
        lines.push(format!("-X {chain}"));
    }
    lines
}

/// What must change in POSTROUTING so exactly one canonical jump into `chain` exists:
/// restore lines that delete stale or duplicate jumps and, if needed, append ours.
pub fn plan_jump_repairs(saved_nat: &str, chain: &ChainName) -> Vec<String> {
    let canonical = jump_rule(chain);
    let mut repairs = Vec::new();
    let mut have_canonical = false;
    for line in saved_nat.lines() {
        let Some(spec) = line.strip_prefix("-A POSTROUTING ") else {
            continue;
        };
        if !is_agent_jump(spec, chain) {
            continue;
        }
        if line == canonical && !have_canonical {
            have_canonical = true;
        } else {
            repairs.push(format!("-D POSTROUTING {spec}"));
        }
    }
    if !have_canonical {
        repairs.push(canonical);
    }
    repairs
}

/// What the agent's chain (as read, before a sync replaces it) decided, when it has the
/// plain shape every release writes for `nonMasqueradeCIDRs` alone: RETURNs with `-d`,
/// then one MASQUERADE. No chain or no jump: nothing was masqueraded. Any other shape
/// (source scope, force ranges, interfaces, SNAT): None, not a guess.
pub fn replaced_decisions(saved_nat: &str, chain: &ChainName) -> Option<ReplacedDecisions> {
    let jumped = saved_nat.lines().any(|line| {
        line.strip_prefix("-A POSTROUTING ")
            .and_then(agent_jump_target)
            .is_some_and(|target| target == chain.as_str())
    });
    if !jumped || !declares(saved_nat, chain.as_str()) {
        return Some(ReplacedDecisions::default());
    }
    let own = format!("-A {chain} ");
    let mut decisions = ReplacedDecisions::default();
    for line in saved_nat.lines().filter(|line| line.starts_with(&own)) {
        if !is_agent_chain_rule(line) || decisions.masquerades {
            return None;
        }
        let words = saved_words(line);
        let value = |flag: &str| {
            words
                .windows(2)
                .find(|pair| pair[0] == flag)
                .map(|pair| pair[1].clone())
        };
        if ["-s", "-o", "!"]
            .iter()
            .any(|flag| words.iter().any(|w| w == flag))
        {
            return None;
        }
        match (value("-j").as_deref(), value("-d")) {
            (Some("RETURN"), Some(destination)) => {
                decisions.keep.push(parse_net(&destination)?);
            }
            (Some("MASQUERADE"), None) => decisions.masquerades = true,
            _ => return None,
        }
    }
    Some(decisions)
}

/// The `*nat` section of an iptables-save dump that may hold several tables.
pub fn nat_section(saved: &str) -> String {
    let mut inside = false;
    let mut out = String::new();
    for line in saved.lines() {
        if line == "*nat" {
            inside = true;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
            if line == "COMMIT" {
                break;
            }
        }
    }
    out
}

/// Restore lines that remove every jump the agent wrote (into any chain), those chains,
/// and `chain` itself.
pub fn plan_removal(saved_nat: &str, chain: &ChainName) -> Vec<String> {
    let mut lines = plan_stale_removal(saved_nat, None);
    if !lines.iter().any(|l| l == &format!("-F {chain}")) {
        lines.extend(plan_chain_removal(saved_nat, chain.as_str()));
    }
    lines
}

/// A cheap look before spawning iptables-save: legacy nat tables are listed in
/// /proc/net/ip(6)_tables_names, iptables-nft ones are asked for by name over netlink
/// (no process). True when unsure.
pub fn may_hold_nat_table(flavour: Flavour, family: Family, runner: &SharedRunner) -> bool {
    match flavour {
        Flavour::Legacy => runner.legacy_tables(family).iter().any(|t| t == "nat"),
        Flavour::Nft => runner.nft_table_exists(family, "nat").unwrap_or(true),
    }
}

/// Removes the agent's chain and jumps from every iptables flavour and family present;
/// returns where it removed something, e.g. `iptables-legacy`.
pub fn remove_agent_rules(
    chain: &ChainName,
    runner: &SharedRunner,
) -> Result<Vec<String>, SyncError> {
    remove_agent_rules_in(&[Flavour::Nft, Flavour::Legacy], chain, runner)
}

/// `remove_agent_rules` for some flavours only.
pub fn remove_agent_rules_in(
    flavours: &[Flavour],
    chain: &ChainName,
    runner: &SharedRunner,
) -> Result<Vec<String>, SyncError> {
    let mut removed = Vec::new();
    let _lock = super::lock_agents(runner)?;
    for &flavour in flavours {
        for family in [Family::V4, Family::V6] {
            let Some(tools) = resolve_tools(family, flavour, runner) else {
                continue;
            };
            if !may_hold_nat_table(flavour, family, runner) {
                continue;
            }
            // Naming a legacy table makes the kernel create it, so legacy is read whole.
            let whole = flavour == Flavour::Legacy;
            let saved = match read_nat_table(flavour, family, &tools, chain, whole, runner) {
                Ok(read) => read.text,
                // Not installed after all (a dangling link): nothing of ours there.
                Err(SyncError::Tool {
                    error: ToolError::Missing { .. },
                    ..
                }) => continue,
                Err(err) => return Err(err),
            };
            let lines = plan_removal(&saved, chain);
            if lines.is_empty() {
                continue;
            }
            let payload = render_restore_payload_lines(&lines);
            runner
                .run(
                    &tools.restore,
                    &["-w", "5", "--noflush"],
                    Some(payload.as_bytes()),
                    Some(LOCK_WAIT),
                )
                .doing(|| {
                    format!(
                        "removing chain {chain} from {}-{flavour}",
                        base_name(family)
                    )
                })?;
            removed.push(format!("{}-{flavour}", base_name(family)));
        }
    }
    Ok(removed)
}

fn render_restore_payload_lines(lines: &[String]) -> String {
    let mut payload = String::from("*nat\n");
    for line in lines {
        payload.push_str(line);
        payload.push('\n');
    }
    payload.push_str("COMMIT\n");
    payload
}

/// A rule line in one canonical form, so a rule we render and the same rule as
/// iptables-save prints it back compare equal: the kernel keeps a probability as
/// `round(p * 2^31)` (printed over 2^31 with 11 decimals), iptables-save leaves out
/// `-d 0.0.0.0/0` and `-d ::/0`, and addresses are printed in one spelling.
pub fn normalize_rule(line: &str) -> String {
    if !line.starts_with("-A ") {
        return line.to_string();
    }
    let words = saved_words(line);
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        let word = words[i].as_str();
        let value = words.get(i + 1).map(String::as_str);
        match (word, value) {
            ("-d" | "-s", Some(address)) => {
                if let Some(net) = parse_net(address) {
                    if net.prefix_len() > 0 {
                        out.push(word.to_string());
                        out.push(net.to_string());
                    }
                    i += 2;
                    continue;
                }
            }
            ("--probability", Some(text)) => {
                if let Ok(p) = text.parse::<f64>() {
                    const SCALE: f64 = 2_147_483_648.0; // 2^31
                    let stored = (p * SCALE).round();
                    out.push(word.to_string());
                    out.push(format!("{:.11}", stored / SCALE));
                    i += 2;
                    continue;
                }
            }
            _ => {}
        }
        out.push(quote_word(word));
        i += 1;
    }
    out.join(" ")
}

fn parse_net(text: &str) -> Option<ipnet::IpNet> {
    text.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| {
            text.parse::<std::net::IpAddr>()
                .ok()
                .map(ipnet::IpNet::from)
        })
        .map(|net| net.trunc())
}

fn quote_word(word: &str) -> String {
    if word.is_empty() || word.contains([' ', '"', '\\']) {
        format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        word.to_string()
    }
}

/// The rules of `chain` when it belongs to someone else: it holds rules and none of them
/// is exactly one the agent writes. A rule edited or inserted among the agent's own rules
/// is drift, repaired by the next sync; a chain with only foreign rules is not the
/// agent's to flush. Empty when the chain is the agent's (or empty, or missing).
pub fn foreign_rules(saved_nat: &str, chain: &ChainName) -> Vec<String> {
    let prefix = format!("-A {chain} ");
    let rules: Vec<&str> = saved_nat
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .collect();
    let agent_wrote_some = rules.iter().any(|line| is_agent_chain_rule(line));
    if agent_wrote_some {
        return Vec::new();
    }
    rules.into_iter().map(str::to_owned).collect()
}

/// True when the saved nat table already holds `chain` with exactly `rules`.
pub fn chain_matches(saved_nat: &str, chain: &ChainName, rules: &[String]) -> bool {
    let declared = format!(":{chain} ");
    let prefix = format!("-A {chain} ");
    if !saved_nat.lines().any(|line| line.starts_with(&declared)) {
        return false;
    }
    let current: Vec<&str> = saved_nat
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .collect();
    current.len() == rules.len()
        && current
            .iter()
            .zip(rules)
            .all(|(now, want)| normalize_rule(now) == normalize_rule(want))
}

/// The whole `iptables-restore --noflush` input for one family: declaring the chain
/// flushes it, so old and new rules never mix.
pub fn render_restore_payload(
    chain: &ChainName,
    jump_repairs: &[String],
    chain_rules: &[String],
) -> String {
    let mut payload = String::with_capacity(128 * (chain_rules.len() + 4));
    payload.push_str("*nat\n");
    payload.push_str(&format!(":{chain} - [0:0]\n"));
    for line in jump_repairs.iter().chain(chain_rules) {
        payload.push_str(line);
        payload.push('\n');
    }
    payload.push_str("COMMIT\n");
    payload
}

/// The text `render` prints for the iptables backend: one `iptables-restore --noflush`
/// input per family, as written on a node that carries none of the agent's rules yet
/// (with `--random-fully` as requested: the real backend drops it on iptables < 1.6.2).
pub fn render(policy: &Policy, chain: &ChainName) -> String {
    let mut out = String::new();
    for family in &policy.families {
        let rules = render_chain_rules(
            chain,
            family,
            &policy.masquerade,
            policy.out_interfaces.as_deref(),
        );
        let jump = plan_jump_repairs("", chain);
        out.push_str(&format!(
            "# {}-restore --noflush ({})\n",
            base_name(family.family),
            family.family
        ));
        out.push_str(&render_restore_payload(chain, &jump, &rules));
    }
    out
}

/// How `explain` names the iptables rule behind a decision for `source` -> `destination`.
pub fn explain(
    family: Option<&FamilyPolicy>,
    decision: &Decision,
    source: Option<IpAddr>,
    destination: IpAddr,
    chain: &ChainName,
) -> String {
    let resolved = family.and_then(|f| f.resolved.as_ref());
    let block_of = |blocks: &[IpNet], address: Option<IpAddr>| {
        address
            .and_then(|a| blocks.iter().find(|b| b.contains(&a)))
            .map_or_else(|| "…".to_string(), ToString::to_string)
    };
    match (decision, resolved) {
        (Decision::Keep { prefix, .. }, None) => format!("-A {chain} -d {prefix} ... -j RETURN"),
        (Decision::Keep { .. }, Some(r)) => format!(
            "-A {chain} -d {} ... -j RETURN",
            block_of(&r.keep, Some(destination))
        ),
        (Decision::SourceOutOfScope, Some(r)) => format!(
            "-A {chain} -s {} ... -j RETURN",
            block_of(&r.out_of_scope, source)
        ),
        (Decision::Masquerade | Decision::Forced { .. }, _) => {
            match family.and_then(|f| f.snat_to.as_ref()) {
                Some(to) => format!("the SNAT rules (to {to}) at the end of {chain}"),
                None => format!("the MASQUERADE rules at the end of {chain}"),
            }
        }
        (Decision::OtherInterface, _) => format!(
            "none of the -o rules at the end of {chain} matches: it leaves the chain unmasqueraded"
        ),
        (Decision::Unmanaged, _) | (Decision::SourceOutOfScope, None) => "no rules".to_string(),
    }
}

/// How the iptables backend is set up on this node.
#[derive(Clone)]
pub struct IptablesBackend {
    chain: ChainName,
    flavour: Flavour,
    /// Learnt from `iptables-restore --version` at the first sync, so a failing tool
    /// at start-up is retried like any failed sync instead of stopping the agent.
    random_fully_supported: Option<bool>,
    v4: FamilyTools,
    v6: Option<FamilyTools>,
    runner: SharedRunner,
    /// iptables-nft only: the ruleset generation at which the kernel was seen to hold the
    /// rules rendered as the key; while neither moves, an idle resync reads nothing.
    verified: Option<(u64, Vec<String>)>,
    /// The same check before anything is rendered: the generation, the policy and its
    /// rule count, so an idle resync costs the same at 50,000 prefixes as at 64.
    verified_policy: Option<(u64, Policy, usize)>,
    /// The nat tables the last sync or diff read, by family: the survey of rules acting
    /// before the agent's reuses them (`Backend::last_read_nat`).
    last_read: Vec<(Family, String)>,
    /// Chains reached from POSTROUTING that iptables-nft could not list at the last
    /// read (native nft rules), by family.
    unlisted: Vec<(Family, Vec<String>)>,
    /// What the agent's chains decided before the last sync wrote over them.
    replaced: Option<ReplacedDecisions>,
    /// Chains reached from POSTROUTING left unread past the limit at the last read.
    left_out: Vec<(Family, usize)>,
}

impl IptablesBackend {
    /// Picks the flavour (probing the host for `auto`) and finds its tools.
    pub fn new(
        chain: ChainName,
        mode: IptablesMode,
        enable_ipv6: bool,
        runner: SharedRunner,
    ) -> Result<Self, SyncError> {
        let flavour = match mode {
            IptablesMode::Auto => detect_flavour(&runner),
            IptablesMode::Nft => Flavour::Nft,
            IptablesMode::Legacy => Flavour::Legacy,
        };
        let missing = |family| {
            SyncError::Unusable(format!(
                "no {} tools for iptables-{flavour} on PATH (looked for {}-{flavour}-save/-restore, xtables-{flavour}-multi, {}-save/-restore)",
                base_name(family),
                base_name(family),
                base_name(family)
            ))
        };
        let v4 = resolve_tools(Family::V4, flavour, &runner).ok_or_else(|| missing(Family::V4))?;
        let v6 = if enable_ipv6 {
            Some(resolve_tools(Family::V6, flavour, &runner).ok_or_else(|| missing(Family::V6))?)
        } else {
            None
        };
        Ok(IptablesBackend {
            chain,
            flavour,
            random_fully_supported: None,
            v4,
            v6,
            runner,
            verified: None,
            verified_policy: None,
            last_read: Vec::new(),
            unlisted: Vec::new(),
            replaced: None,
            left_out: Vec::new(),
        })
    }

    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// None until the first sync has asked iptables-restore for its version.
    pub fn random_fully_supported(&self) -> Option<bool> {
        self.random_fully_supported
    }

    fn learn_random_fully_support(&mut self) -> Result<bool, SyncError> {
        self.learn_random_fully_support_from(None)
    }

    /// Learns it from the `# Generated by iptables-save vX.Y.Z` line of a save when there
    /// is one (the save and restore tools come from one release), else from
    /// `iptables-restore --version`: one process fewer at start-up.
    fn learn_random_fully_support_from(&mut self, saved: Option<&str>) -> Result<bool, SyncError> {
        if let Some(known) = self.random_fully_supported {
            return Ok(known);
        }
        let header = saved.and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("# Generated by ") && line.contains(" v"))
                .map(str::to_string)
        });
        let version = match header {
            Some(header) => header,
            None => self
                .runner
                .run(&self.v4.restore, &["--version"], None, None)
                .doing(|| "asking iptables-restore for its version".into())?,
        };
        let supported = supports_random_fully(&version);
        if !supported {
            tracing::warn!(
                "{} does not support --random-fully; masquerading without it",
                version.trim()
            );
        }
        self.random_fully_supported = Some(supported);
        Ok(supported)
    }

    fn effective_masquerade(&self, policy: &Policy) -> Masquerade {
        let mut masquerade = policy.masquerade.clone();
        masquerade.random_fully &= self.random_fully_supported.unwrap_or(true);
        masquerade
    }

    fn tools(&self, family: Family) -> Result<&FamilyTools, SyncError> {
        match family {
            Family::V4 => Ok(&self.v4),
            Family::V6 => self
                .v6
                .as_ref()
                .ok_or_else(|| SyncError::Unusable(format!("{family} is not enabled"))),
        }
    }

    fn read_nat(&self, family: Family) -> Result<NatRead, SyncError> {
        let tools = self.tools(family)?;
        read_nat_table(
            self.flavour,
            family,
            tools,
            &self.chain,
            false,
            &self.runner,
        )
    }

    /// Remembers how `family`'s table was read, for `read_notes`.
    fn note_read(&mut self, family: Family, read: &NatRead) {
        self.unlisted.retain(|(f, _)| *f != family);
        if !read.unlisted.is_empty() {
            self.unlisted.push((family, read.unlisted.clone()));
        }
        self.left_out.retain(|(f, _)| *f != family);
        if read.left_out > 0 {
            self.left_out.push((family, read.left_out));
        }
    }
}

impl Backend for IptablesBackend {
    fn describe(&self) -> String {
        format!("iptables ({}; chain {})", self.flavour, self.chain)
    }

    fn kind(&self) -> &'static str {
        "iptables"
    }

    fn srcnat_place(&self) -> Option<SrcnatPlace> {
        Some(SrcnatPlace::Iptables(self.flavour))
    }

    fn last_read_nat(&self) -> Vec<(Family, &str)> {
        // A table read without some chain iptables could not list: the survey reads it
        // through nft instead.
        self.last_read
            .iter()
            .filter(|(family, _)| !self.unlisted.iter().any(|(f, _)| f == family))
            .map(|(family, text)| (*family, text.as_str()))
            .collect()
    }

    fn agent_chain(&self) -> Option<&ChainName> {
        Some(&self.chain)
    }

    fn replaced_decisions(&self) -> Option<ReplacedDecisions> {
        self.replaced.clone()
    }

    fn read_notes(&self) -> Vec<String> {
        self.unlisted
            .iter()
            .map(|(family, chains)| {
                format!(
                    "the {family} nat table of iptables-{} holds rules iptables cannot list (native nft rules) in {} reached from POSTROUTING; the agent read the chains it needs one by one (`{} -t nat -S CHAIN`) and surveys those through nft",
                    self.flavour,
                    chains.join(", "),
                    base_name(*family)
                )
            })
            .chain(self.left_out.iter().map(|(family, count)| {
                format!(
                    "the {family} nat table of iptables-{}: {MAX_LISTED_CHAINS} chains reached from POSTROUTING were read and {count} more left out; NAT rules in those are not surveyed",
                    self.flavour
                )
            }))
            .collect()
    }

    fn diff(&mut self, policy: &Policy) -> Result<Vec<String>, SyncError> {
        self.learn_random_fully_support()?;
        let masquerade = self.effective_masquerade(policy);
        let mut diff = Vec::new();
        self.last_read.clear();
        for family in &policy.families {
            let read = self.read_nat(family.family)?;
            self.note_read(family.family, &read);
            let saved = read.text;
            let mut expected = vec![
                format!(":{} - [0:0]", self.chain),
                normalize_rule(&jump_rule(&self.chain)),
            ];
            expected.extend(
                render_chain_rules(
                    &self.chain,
                    family,
                    &masquerade,
                    policy.out_interfaces.as_deref(),
                )
                .iter()
                .map(|rule| normalize_rule(rule)),
            );
            let declared = format!(":{} ", self.chain);
            let actual: Vec<String> = saved
                .lines()
                .filter(|line| {
                    line.starts_with(&declared)
                        || line.starts_with(&format!("-A {} ", self.chain))
                        || line
                            .strip_prefix("-A POSTROUTING ")
                            .and_then(agent_jump_target)
                            .is_some()
                })
                // Packet counters in the declaration are not part of the rules.
                .map(|line| match line.strip_prefix(&declared) {
                    Some(_) => format!(":{} - [0:0]", self.chain),
                    None => normalize_rule(line),
                })
                .collect();
            diff.extend(
                super::line_diff(&expected, &actual)
                    .into_iter()
                    .map(|line| format!("{}: {line}", base_name(family.family))),
            );
            self.last_read.push((family.family, saved));
        }
        Ok(diff)
    }

    fn sync(&mut self, policy: &Policy) -> Result<SyncReport, SyncError> {
        let started_with = self.runner.spawned();
        self.replaced = None;
        // The cheapest idle resync: the policy the kernel was last seen holding, and no
        // commit to nf_tables since (iptables-nft only): nothing rendered, nothing read.
        if let Some((generation, verified, rules)) = &self.verified_policy
            && verified == policy
            && self.runner.ruleset_generation() == Some(*generation)
        {
            return Ok(SyncReport {
                processes: self.runner.spawned() - started_with,
                rules: *rules,
                wrote: false,
            });
        }
        self.verified_policy = None;
        // From the first read to the last write no other agent may do either (a second
        // agent during a rolling update would otherwise add or delete a jump on a stale
        // read). An idle resync that reads nothing takes no lock.
        let mut lock = None;
        // At the first sync the IPv4 save is read first: it also tells the version.
        let mut first_read = None;
        if self.random_fully_supported.is_none() {
            lock = Some(super::lock_agents(&self.runner)?);
            let read = self.read_nat(Family::V4)?;
            self.learn_random_fully_support_from(Some(&read.text))?;
            first_read = Some(read);
        }
        let masquerade = self.effective_masquerade(policy);
        let wanted: Vec<Vec<String>> = policy
            .families
            .iter()
            .map(|family| {
                render_chain_rules(
                    &self.chain,
                    family,
                    &masquerade,
                    policy.out_interfaces.as_deref(),
                )
            })
            .collect();
        let key: Vec<String> = wanted.iter().flatten().cloned().collect();
        // iptables-nft writes to nf_tables, so its generation tells whether anything
        // changed since the rules were last seen right; legacy tables are not counted.
        let generation = match self.flavour {
            Flavour::Nft => self.runner.ruleset_generation(),
            Flavour::Legacy => None,
        };
        if let Some(generation) = generation
            && self.verified.as_ref() == Some(&(generation, key.clone()))
        {
            return Ok(SyncReport {
                processes: self.runner.spawned() - started_with,
                rules: key.len(),
                wrote: false,
            });
        }
        self.verified = None;
        let _lock = match lock {
            Some(lock) => lock,
            None => super::lock_agents(&self.runner)?,
        };
        let mut rules_total = 0;
        let mut wrote = false;
        let mut replaced = Some(ReplacedDecisions::default());
        self.last_read.clear();
        for (family, rules) in policy.families.iter().zip(wanted) {
            let read = match (family.family, first_read.take()) {
                (Family::V4, Some(read)) => read,
                _ => self.read_nat(family.family)?,
            };
            self.note_read(family.family, &read);
            let saved = read.text;
            let foreign = foreign_rules(&saved, &self.chain);
            if let Some(example) = foreign.first() {
                return Err(SyncError::ForeignChain {
                    family: family.family,
                    chain: self.chain.to_string(),
                    count: foreign.len(),
                    example: example.clone(),
                });
            }
            rules_total += rules.len();
            let mut repairs = plan_stale_removal(&saved, Some(&self.chain));
            repairs.extend(plan_jump_repairs(&saved, &self.chain));
            // Write only on difference: no xtables lock, no churn for kube-proxy.
            let unchanged = repairs.is_empty() && chain_matches(&saved, &self.chain, &rules);
            // What this family's chain decided until now (whether or not it changes).
            replaced = match (replaced, replaced_decisions(&saved, &self.chain)) {
                (Some(mut all), Some(family)) => {
                    all.keep.extend(family.keep);
                    all.masquerades |= family.masquerades;
                    Some(all)
                }
                _ => None,
            };
            self.last_read.push((family.family, saved));
            if unchanged {
                continue;
            }
            let payload = render_restore_payload(&self.chain, &repairs, &rules);
            self.runner
                .run(
                    &self.tools(family.family)?.restore,
                    &["-w", "5", "--noflush"],
                    Some(payload.as_bytes()),
                    Some(LOCK_WAIT),
                )
                .doing(|| format!("replacing the {} chain {}", family.family, self.chain))?;
            wrote = true;
        }
        self.replaced = if wrote { replaced } else { None };
        // Seen right without writing: remember at which generation (read before the
        // saves, so a change in between only costs one more read).
        if !wrote && let Some(generation) = generation {
            self.verified_policy = Some((generation, policy.clone(), key.len()));
            self.verified = Some((generation, key));
        }
        Ok(SyncReport {
            processes: self.runner.spawned() - started_with,
            rules: rules_total,
            wrote,
        })
    }
}

#[cfg(test)]
mod tests;
