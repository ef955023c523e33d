//! The native backend: one private `inet` table with an interval set per family, so a
//! packet costs the same whether the list holds 3 prefixes or 50,000. Each sync is one
//! `nft -f -` transaction that replaces the whole table atomically.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{Backend, Doing, SrcnatPlace, SyncError, SyncReport};
use crate::kernel::{Program, SetChange, SharedRunner, ToolError};
use crate::policy::{
    Decision, Family, FamilyPolicy, KeepReason, Masquerade, Policy, merge_prefixes,
};

pub const TABLE: &str = "ip-masq-agent";

fn set_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "non-masq-v4",
        Family::V6 => "non-masq-v6",
    }
}

fn chain_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "masq-v4",
        Family::V6 => "masq-v6",
    }
}

fn address_keyword(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// The masquerade statements, with `--to-ports` ranges weighted by size like the iptables
/// layout; `numgen random mod R < S` is the exact integer form of probability S/R.
pub fn masquerade_statements(masquerade: &Masquerade) -> Vec<String> {
    let flags = if masquerade.random_fully {
        " fully-random"
    } else {
        ""
    };
    let ranges = &masquerade.to_ports.0;
    let mut remaining: u32 = ranges.iter().map(|r| r.port_count()).sum();
    let mut statements = Vec::new();
    for (i, range) in ranges.iter().enumerate() {
        let split = if i + 1 < ranges.len() {
            format!(" numgen random mod {remaining} < {}", range.port_count())
        } else {
            String::new()
        };
        statements.push(format!(
            "meta l4proto {{ tcp, udp, sctp }}{split} masquerade to :{range}{flags}"
        ));
        remaining -= range.port_count();
    }
    statements.push(format!("masquerade{flags}"));
    statements
}

/// The set of sources that may be masqueraded (only with masqueradeSourceCIDRs).
fn source_set_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "masq-src-v4",
        Family::V6 => "masq-src-v6",
    }
}

fn render_set(out: &mut String, name: &str, family: Family, prefixes: &[IpNet]) {
    out.push_str(&format!(
        "\tset {name} {{\n\t\ttype {}\n\t\tflags interval\n",
        set_type(family)
    ));
    if !prefixes.is_empty() {
        out.push_str("\t\telements = {");
        for (i, prefix) in prefixes.iter().enumerate() {
            out.push_str(if i % 8 == 0 { "\n\t\t\t" } else { " " });
            out.push_str(&prefix.to_string());
            out.push(',');
        }
        out.push_str("\n\t\t}\n");
    }
    out.push_str("\t}\n");
}

fn render_family_chain(out: &mut String, family: &FamilyPolicy, masquerade: &[String]) {
    let keyword = address_keyword(family.family);
    out.push_str(&format!("\tchain {} {{\n", chain_name(family.family)));
    match &family.resolved {
        None => {
            if let Some(link_local) = family.link_local {
                out.push_str(&format!("\t\t{keyword} daddr {link_local} return\n"));
            }
        }
        // The flat answer: link-local is in the set already, as longest-prefix match left it.
        Some(resolved) => {
            if resolved.sources.is_some() {
                out.push_str(&format!(
                    "\t\t{keyword} saddr != @{} return\n",
                    source_set_name(family.family)
                ));
            }
        }
    }
    out.push_str(&format!(
        "\t\t{keyword} daddr @{} return\n",
        set_name(family.family)
    ));
    for statement in masquerade {
        out.push_str(&format!("\t\t{statement}\n"));
    }
    out.push_str("\t}\n");
}

fn has_source_scope(family: &FamilyPolicy) -> bool {
    family
        .resolved
        .as_ref()
        .is_some_and(|resolved| resolved.sources.is_some())
}

fn set_type(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

/// The whole `nft -f -` input, one transaction. The table and sets are declared (so the
/// flushes cannot fail), emptied and refilled. The set objects are kept from one sync to
/// the next rather than deleted and recreated: a freshly created set can answer a lookup
/// made right at the commit as empty, which would masquerade traffic to listed prefixes.
pub fn render_transaction(policy: &Policy) -> String {
    render_transaction_with(policy, false)
}

/// `render_transaction`, plus (when `remove_unused` is set) the lines that delete a
/// source set an earlier run may have left: the backend always sends them, since it
/// cannot know what a previous process wrote; `render` leaves them out.
fn render_transaction_with(policy: &Policy, remove_unused: bool) -> String {
    render_with_sets(policy, &set_contents(policy), remove_unused)
}

/// What the agent's sets hold, by set name: the kept destinations (merged for nft, which
/// refuses overlapping intervals) and, with a source scope, the in-scope sources.
pub type SetContents = BTreeMap<&'static str, Vec<IpNet>>;

pub fn set_contents(policy: &Policy) -> SetContents {
    let mut sets = SetContents::new();
    for family in &policy.families {
        let kept = match &family.resolved {
            None => merge_prefixes(&family.non_masq.0),
            Some(resolved) => merge_prefixes(&resolved.keep),
        };
        sets.insert(set_name(family.family), kept);
        if let Some(sources) = family.resolved.as_ref().and_then(|r| r.sources.as_ref()) {
            sets.insert(source_set_name(family.family), sources.clone());
        }
    }
    sets
}

/// The transaction with `sets` as the sets' contents.
fn render_with_sets(policy: &Policy, sets: &SetContents, remove_unused: bool) -> String {
    let masquerade = masquerade_statements(&policy.masquerade);
    let mut out = format!("table inet {TABLE} {{}}\n");
    let declare = |out: &mut String, name: &str, family: Family| {
        out.push_str(&format!(
            "add set inet {TABLE} {name} {{ type {}; flags interval; }}\n",
            set_type(family)
        ));
    };
    for family in &policy.families {
        declare(&mut out, set_name(family.family), family.family);
        if has_source_scope(family) {
            declare(&mut out, source_set_name(family.family), family.family);
        }
    }
    out.push_str(&format!("flush table inet {TABLE}\n"));
    for family in &policy.families {
        out.push_str(&format!(
            "flush set inet {TABLE} {}\n",
            set_name(family.family)
        ));
        if has_source_scope(family) {
            out.push_str(&format!(
                "flush set inet {TABLE} {}\n",
                source_set_name(family.family)
            ));
        } else if remove_unused {
            // A source scope dropped since the last run: declare-then-delete removes it.
            let name = source_set_name(family.family);
            declare(&mut out, name, family.family);
            out.push_str(&format!("delete set inet {TABLE} {name}\n"));
        }
    }
    // A family turned off since the last run: declare-then-delete removes its objects.
    for family in [Family::V4, Family::V6] {
        if policy.family(family).is_none() {
            let chain = chain_name(family);
            out.push_str(&format!(
                "add chain inet {TABLE} {chain}\ndelete chain inet {TABLE} {chain}\n"
            ));
            let mut unused = vec![set_name(family)];
            if remove_unused {
                unused.push(source_set_name(family));
            }
            for set in unused {
                declare(&mut out, set, family);
                out.push_str(&format!("delete set inet {TABLE} {set}\n"));
            }
        }
    }
    out.push_str(&format!("table inet {TABLE} {{\n"));
    for family in &policy.families {
        for name in [set_name(family.family), source_set_name(family.family)] {
            if let Some(elements) = sets.get(name) {
                render_set(&mut out, name, family.family, elements);
            }
        }
    }
    // After kube-proxy's srcnat chains, as upstream's jump is appended after KUBE-POSTROUTING.
    out.push_str("\tchain postrouting {\n\t\ttype nat hook postrouting priority srcnat + 10; policy accept;\n\t\tfib daddr type local return\n");
    for family in &policy.families {
        out.push_str(&format!(
            "\t\tmeta nfproto {} jump {}\n",
            family.family.label(),
            chain_name(family.family)
        ));
    }
    out.push_str("\t}\n");
    for family in &policy.families {
        render_family_chain(&mut out, family, &masquerade);
    }
    out.push_str("}\n");
    out
}

/// The table's contents as comparable lines: one per set element, rule, or
/// declaration, whatever the line wrapping (so nft's listing and our own rendering of
/// the same table give the same lines).
pub fn normalized_table(text: &str) -> Vec<String> {
    let start = text.rfind(&format!("table inet {TABLE} {{")).unwrap_or(0);
    let mut lines = Vec::new();
    let mut in_elements = false;
    let mut container = String::new();
    for raw in text[start..].lines() {
        let line = raw.trim();
        if in_elements || line.starts_with("elements = {") {
            let body = line.trim_start_matches("elements = {");
            in_elements = !body.contains('}');
            for element in body.trim_end_matches('}').split(',') {
                let element = element.trim();
                if !element.is_empty() {
                    lines.push(format!(
                        "{container}: element {}",
                        normalize_element(element)
                    ));
                }
            }
            continue;
        }
        if line.is_empty() || line == "}" || line.starts_with("table ") {
            continue;
        }
        if line.starts_with("set ") || line.starts_with("chain ") {
            container = line.trim_end_matches('{').trim().to_string();
            lines.push(container.clone());
            continue;
        }
        lines.push(format!("{container}: {line}"));
    }
    lines
}

/// A set element in one spelling: nft lists a `/32` or `/128` element as a bare address
/// and prints addresses its own way, so both sides are parsed and printed again.
fn normalize_element(element: &str) -> String {
    element
        .parse::<IpNet>()
        .ok()
        .or_else(|| element.parse::<IpAddr>().ok().map(IpNet::from))
        .map_or_else(|| element.to_string(), |net| net.trunc().to_string())
}

/// The input that removes the agent's table, whether or not it exists.
pub fn render_removal() -> String {
    format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
}

/// True when `nft list tables` shows the agent's table.
pub fn lists_agent_table(tables: &str) -> bool {
    tables
        .lines()
        .any(|line| line.trim() == format!("table inet {TABLE}"))
}

/// True when kube-proxy runs in nftables mode (it owns `ip`/`ip6` tables named kube-proxy).
pub fn lists_kube_proxy_table(tables: &str) -> bool {
    tables.lines().any(|line| {
        let line = line.trim();
        line == "table ip kube-proxy" || line == "table ip6 kube-proxy"
    })
}

/// Removes the agent's nft table if it exists; returns whether it did.
pub fn remove_table(runner: &SharedRunner) -> Result<bool, SyncError> {
    let nft = Program::new("nft");
    let tables = match runner.run(&nft, &["list", "tables"], None, None) {
        Ok(tables) => tables,
        // A kernel without nf_tables cannot hold the table either.
        Err(ToolError::Failed { stderr, .. }) if stderr.contains("not supported") => {
            return Ok(false);
        }
        Err(error) => {
            return Err(SyncError::Tool {
                doing: "listing the nft tables".into(),
                error,
            });
        }
    };
    if !lists_agent_table(&tables) {
        return Ok(false);
    }
    runner
        .run(&nft, &["-f", "-"], Some(render_removal().as_bytes()), None)
        .doing(|| format!("deleting nft table inet {TABLE}"))?;
    Ok(true)
}

/// The text `render` prints for the nftables backend.
pub fn render(policy: &Policy) -> String {
    format!("# nft -f -\n{}", render_transaction(policy))
}

/// How `explain` names the nft rule behind a decision.
pub fn explain(policy: Option<&FamilyPolicy>, decision: &Decision, family: Family) -> String {
    let chain = chain_name(family);
    let resolved = policy.is_some_and(|p| p.resolved.is_some());
    match decision {
        Decision::Keep {
            prefix,
            reason: KeepReason::LinkLocal,
        } if !resolved => format!("chain {chain} daddr {prefix} return"),
        Decision::Keep { .. } => format!("set {}", set_name(family)),
        Decision::Masquerade | Decision::Forced { .. } => format!("chain {chain} masquerade"),
        Decision::SourceOutOfScope => {
            format!("chain {chain} saddr != @{} return", source_set_name(family))
        }
        Decision::Unmanaged => "no rules".to_string(),
    }
}

/// How many prefixes a change may touch and still go element by element; a bigger change
/// rewrites the table, which costs about the same and is one well-known transaction.
const MAX_DELTA_PREFIXES: usize = 1000;

/// One set's elements to delete and to add.
pub type SetDelta = (&'static str, Vec<IpNet>, Vec<IpNet>);

/// The elements that must leave and enter each set to turn `old` into `new` (which have
/// the same sets), per set; None when that is more than [`MAX_DELTA_PREFIXES`].
pub fn set_delta(old: &SetContents, new: &SetContents) -> Option<Vec<SetDelta>> {
    let mut delta = Vec::new();
    let mut touched = 0;
    for (name, wanted) in new {
        let had = old.get(name).map(Vec::as_slice).unwrap_or_default();
        let (leaving, entering) = sorted_difference(had, wanted);
        touched += leaving.len() + entering.len();
        if touched > MAX_DELTA_PREFIXES {
            return None;
        }
        if !leaving.is_empty() || !entering.is_empty() {
            delta.push((*name, leaving, entering));
        }
    }
    Some(delta)
}

/// What only `a` holds and what only `b` holds, for two lists sorted and free of
/// duplicates (as `merge_prefixes` makes them): one linear walk.
fn sorted_difference(a: &[IpNet], b: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    let (mut only_a, mut only_b) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => {
                only_a.push(*x);
                i += 1;
            }
            (Some(_), Some(y)) | (None, Some(y)) => {
                only_b.push(*y);
                j += 1;
            }
            (Some(x), None) => {
                only_a.push(*x);
                i += 1;
            }
            (None, None) => break,
        }
    }
    (only_a, only_b)
}

/// The same change as `nft -f -` input (for `render` and for reading).
pub fn render_delta(old: &SetContents, new: &SetContents) -> String {
    let list = |elements: &[IpNet]| -> String {
        elements
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::new();
    for (name, leaving, entering) in set_delta(old, new).unwrap_or_default() {
        if !leaving.is_empty() {
            out.push_str(&format!(
                "delete element inet {TABLE} {name} {{ {} }}\n",
                list(&leaving)
            ));
        }
        if !entering.is_empty() {
            out.push_str(&format!(
                "add element inet {TABLE} {name} {{ {} }}\n",
                list(&entering)
            ));
        }
    }
    out
}

/// What the backend last wrote: the table without its set elements, and the elements.
struct Written {
    frame: String,
    sets: SetContents,
}

pub struct NftablesBackend {
    nft: Program,
    runner: SharedRunner,
    /// The table of the last write; None until the first, and after a failed one.
    written: Option<Written>,
    /// The policy `written` was made from: an unchanged one needs no rendering at all
    /// while the generation stands still.
    written_for: Option<Policy>,
    /// The ruleset generation at which the kernel was last seen to hold `written`: while
    /// it has not moved, no one changed any nf_tables table, so there is nothing to read.
    verified_generation: Option<u64>,
}

impl NftablesBackend {
    pub fn new(runner: SharedRunner) -> Result<Self, SyncError> {
        if !runner.exists("nft") {
            return Err(SyncError::Unusable(
                "the nftables backend needs the nft binary on PATH".into(),
            ));
        }
        Ok(NftablesBackend {
            nft: Program::new("nft"),
            runner,
            written: None,
            written_for: None,
            verified_generation: None,
        })
    }

    /// The table as nft lists it, or None when it is missing or nft fails.
    fn list_table(&self) -> Option<String> {
        self.runner
            .run(&self.nft, &["list", "table", "inet", TABLE], None, None)
            .ok()
    }

    fn apply(&self, transaction: &str, doing: &str) -> Result<(), SyncError> {
        self.runner
            .run(&self.nft, &["-f", "-"], Some(transaction.as_bytes()), None)
            .doing(|| doing.to_string())
            .map(|_| ())
    }
}

impl Backend for NftablesBackend {
    fn describe(&self) -> String {
        format!("nftables (table inet {TABLE})")
    }

    fn kind(&self) -> &'static str {
        "nftables"
    }

    fn srcnat_place(&self) -> Option<SrcnatPlace> {
        Some(SrcnatPlace::Nftables)
    }

    fn diff(&mut self, policy: &Policy) -> Result<Vec<String>, SyncError> {
        let expected = normalized_table(&render_transaction(policy));
        let actual = match self.list_table() {
            Some(listing) => normalized_table(&listing),
            None => Vec::new(),
        };
        Ok(super::line_diff(&expected, &actual))
    }

    /// Writes only what differs. An unchanged config with an unmoved ruleset generation
    /// reads nothing; otherwise the kernel's listing is compared with the table it should
    /// hold. A change of set contents alone is one transaction of element deletions and
    /// additions (falling back to the whole table if nft refuses it); anything else, and
    /// any drift, rewrites the whole table in one transaction.
    fn sync(&mut self, policy: &Policy) -> Result<SyncReport, SyncError> {
        let started_with = self.runner.spawned();
        // The cheapest idle resync: same policy, and no commit to nf_tables since the
        // kernel was known to hold it.
        if self.written_for.as_ref() == Some(policy) {
            let now = self.runner.ruleset_generation();
            if now.is_some() && now == self.verified_generation {
                return Ok(SyncReport {
                    processes: 0,
                    rules: nft_rule_count(policy),
                    wrote: false,
                });
            }
        }
        let report = self.sync_changed(policy, started_with);
        self.written_for = match (&report, &self.written) {
            (Ok(_), Some(_)) => Some(policy.clone()),
            _ => None,
        };
        report
    }
}

/// The rules of the agent's table for `policy`, for sync reports.
fn nft_rule_count(policy: &Policy) -> usize {
    policy
        .families
        .iter()
        .map(|f| {
            2 + usize::from(f.link_local.is_some())
                + masquerade_statements(&policy.masquerade).len()
        })
        .sum()
}

impl NftablesBackend {
    fn sync_changed(
        &mut self,
        policy: &Policy,
        started_with: u64,
    ) -> Result<SyncReport, SyncError> {
        let sets = set_contents(policy);
        let empty: SetContents = sets.keys().map(|name| (*name, Vec::new())).collect();
        let frame = render_with_sets(policy, &empty, true);
        let rules = nft_rule_count(policy);
        let report = |wrote: bool, runner: &SharedRunner| SyncReport {
            processes: runner.spawned() - started_with,
            rules,
            wrote,
        };
        // The generation before a write: if the write is the only commit after it, the
        // kernel holds exactly what was verified plus what was written.
        let before = self.runner.ruleset_generation();
        let known_good = before.is_some() && before == self.verified_generation;
        if let Some(written) = &self.written
            && written.frame == frame
        {
            if written.sets == sets {
                if known_good {
                    return Ok(report(false, &self.runner));
                }
                let transaction = render_with_sets(policy, &sets, true);
                if let Some(listing) = self.list_table()
                    && normalized_table(&listing) == normalized_table(&transaction)
                {
                    self.verified_generation = before;
                    return Ok(report(false, &self.runner));
                }
            } else if let Some(delta) = set_delta(&written.sets, &sets) {
                // Straight to the kernel: nft would first load every element of the set.
                let changes: Vec<SetChange> = delta
                    .iter()
                    .map(|(set, delete, add)| SetChange { set, delete, add })
                    .collect();
                match self.runner.change_set_elements(TABLE, &changes) {
                    Ok(()) => {
                        self.written = Some(Written { frame, sets });
                        self.verified_generation = self.only_commit_since(before, known_good);
                        return Ok(report(true, &self.runner));
                    }
                    Err(err) => tracing::info!(
                        "changing the set elements failed ({err}); rewriting the table"
                    ),
                }
            }
        }
        let transaction = render_with_sets(policy, &sets, true);
        // A restarted agent (a DaemonSet rollout) usually finds its table as it left it:
        // reading it costs less than writing it again, and keeps it untouched.
        if self.written.is_none()
            && let Some(listing) = self.list_table()
            && normalized_table(&listing) == normalized_table(&transaction)
        {
            self.written = Some(Written { frame, sets });
            self.verified_generation = before;
            return Ok(report(false, &self.runner));
        }
        self.verified_generation = None;
        self.written = None;
        self.apply(&transaction, &format!("replacing nft table inet {TABLE}"))?;
        self.written = Some(Written { frame, sets });
        // The whole table was written: known good if no one else committed since.
        self.verified_generation = self.only_commit_since(before, true);
        Ok(report(true, &self.runner))
    }
}

impl NftablesBackend {
    /// The generation now, when our write was the one commit since `before` and the
    /// kernel was known good then (or the write replaced everything of ours).
    fn only_commit_since(&self, before: Option<u64>, known_good: bool) -> Option<u64> {
        let after = self.runner.ruleset_generation()?;
        (known_good && before.and_then(|b| b.checked_add(1)) == Some(after)).then_some(after)
    }
}

#[cfg(test)]
mod tests;
