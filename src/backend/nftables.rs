//! The native backend: one private `inet` table with an interval set per family, so a
//! packet costs the same whether the list holds 3 prefixes or 50,000.
//!
//! It talks to the kernel over netlink only (`kernel::netlink::nftables`): no sync starts
//! an `nft` process. Each write is one nf_tables batch, computed from what the kernel was
//! last seen to hold and carrying the ruleset generation it was seen at, so the kernel
//! refuses it whole if anyone (kube-proxy, a second agent) committed in between; the
//! backend then reads again and recomputes. A change of set contents alone is a batch of
//! element deletions and additions; a table someone else changed is read back and
//! repaired by exactly what differs. `nft` is only an optional reader for `status`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{Backend, Doing, ReplacedDecisions, SrcnatPlace, SyncError, SyncReport};
use crate::config::egress::{AddressRange, InterfacePattern};
use crate::kernel::nf_tables::expr::{self, Address, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};
use crate::kernel::nf_tables::table::{HOOK_POSTROUTING, POLICY_ACCEPT};
use crate::kernel::nf_tables::{
    BaseChain, Batch, Chain, Commit, Elements, Observed, Op, Rule, Set, Table,
};
use crate::kernel::{Program, SharedRunner, ToolError};
use crate::policy::{
    Decision, Family, FamilyPolicy, KeepReason, Masquerade, Policy, merge_prefixes,
};

pub const TABLE: &str = "ip-masq-agent";

/// The base chain's priority: `srcnat + 10`.
const PRIORITY: i32 = super::NFTABLES_PRIORITY;

/// How often one sync computes and sends a batch when the kernel refuses it because
/// someone committed since it was computed (another agent's batch, kube-proxy's).
const ATTEMPTS: usize = 5;
/// Repairs from reads that left chains or sets out, per sync (256 each).
const MAX_PARTIAL_REPAIRS: usize = 64;

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

/// The set of sources that may be masqueraded (only with masqueradeSourceCIDRs).
fn source_set_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "masq-src-v4",
        Family::V6 => "masq-src-v6",
    }
}

fn set_type(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

/// The masquerade rules, with `--to-ports` ranges weighted by size like the iptables
/// layout; `numgen random mod R < S` is the exact integer form of probability S/R. With
/// outputAddress(IPv6) (`snat_to`), `snat ip[6] to` that address instead of `masquerade`.
fn masquerade_rules(masquerade: &Masquerade, snat_to: Option<&AddressRange>) -> Vec<Rule> {
    let translate = |ports: Option<(u16, u16)>| match snat_to {
        Some(to) => expr::snat((to.first, to.last), ports, masquerade.random_fully, false),
        None => expr::masquerade(ports, masquerade.random_fully),
    };
    let ranges = &masquerade.to_ports.0;
    let mut remaining: u32 = ranges.iter().map(|r| r.port_count()).sum();
    let mut rules = Vec::new();
    for (i, range) in ranges.iter().enumerate() {
        let mut statements = vec![expr::l4proto_in(&[IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP])];
        if i + 1 < ranges.len() {
            statements.push(expr::random_below(remaining, range.port_count()));
        }
        statements.push(translate(Some((range.first, range.last))));
        rules.push(Rule::of(statements));
        remaining -= range.port_count();
    }
    rules.push(Rule::of([translate(None)]));
    rules
}

/// The masquerade statements as `nft list` prints them.
pub fn masquerade_statements(masquerade: &Masquerade) -> Vec<String> {
    masquerade_rules(masquerade, None)
        .into_iter()
        .map(|rule| rule.text)
        .collect()
}

fn has_source_scope(family: &FamilyPolicy) -> bool {
    family
        .resolved
        .as_ref()
        .is_some_and(|resolved| resolved.sources.is_some())
}

/// The rules of a family's chain.
fn family_rules(
    family: &FamilyPolicy,
    masquerade: &Masquerade,
    interfaces: Option<&[InterfacePattern]>,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    match &family.resolved {
        None => {
            if let Some(link_local) = family.link_local {
                rules.push(Rule::of([
                    expr::address_in_prefix(Address::Destination, link_local),
                    expr::return_verdict(),
                ]));
            }
        }
        // The flat answer: link-local is in the set already, as longest-prefix match left it.
        Some(_) => {
            if has_source_scope(family) {
                rules.push(Rule::of([
                    expr::address_in_set(
                        family.family,
                        Address::Source,
                        source_set_name(family.family),
                        true,
                    ),
                    expr::return_verdict(),
                ]));
            }
        }
    }
    rules.push(Rule::of([
        expr::address_in_set(
            family.family,
            Address::Destination,
            set_name(family.family),
            false,
        ),
        expr::return_verdict(),
    ]));
    // outputInterface: a packet leaving by none of the listed interfaces returns here
    // (one rule: consecutive matches all hold); an empty list masquerades nothing.
    match interfaces {
        Some([]) => return rules,
        Some(listed) => {
            let mut statements: Vec<_> = listed
                .iter()
                .map(|pattern| expr::oifname_not(&pattern.as_nft()))
                .collect();
            statements.push(expr::return_verdict());
            rules.push(Rule::of(statements));
        }
        None => {}
    }
    rules.extend(masquerade_rules(masquerade, family.snat_to.as_ref()));
    rules
}

/// The table the kernel should hold for `policy`: per family, the set of kept
/// destinations (and of in-scope sources), the base chain that sends each family to its
/// chain, and that chain. Rendering and writing both start from it.
pub fn table_for(policy: &Policy) -> Table {
    let mut sets = Vec::new();
    for family in &policy.families {
        let kept = match &family.resolved {
            None => merge_prefixes(&family.non_masq.0),
            Some(resolved) => merge_prefixes(&resolved.keep),
        };
        sets.push(Set {
            name: set_name(family.family).to_string(),
            family: family.family,
            prefixes: kept,
        });
        if let Some(sources) = family.resolved.as_ref().and_then(|r| r.sources.as_ref()) {
            sets.push(Set {
                name: source_set_name(family.family).to_string(),
                family: family.family,
                prefixes: merge_prefixes(sources),
            });
        }
    }
    // After kube-proxy's srcnat chains, as upstream's jump is appended after KUBE-POSTROUTING.
    let mut postrouting = vec![Rule::of([
        expr::fib_daddr_type_local(),
        expr::return_verdict(),
    ])];
    for family in &policy.families {
        postrouting.push(Rule::of([
            expr::nfproto(family.family),
            expr::jump(chain_name(family.family)),
        ]));
    }
    let mut chains = vec![Chain {
        name: "postrouting".into(),
        base: Some(BaseChain {
            kind: "nat".into(),
            hook: HOOK_POSTROUTING,
            priority: PRIORITY,
            policy: POLICY_ACCEPT,
        }),
        rules: postrouting,
    }];
    for family in &policy.families {
        chains.push(Chain {
            name: chain_name(family.family).to_string(),
            base: None,
            rules: family_rules(family, &policy.masquerade, policy.out_interfaces.as_deref()),
        });
    }
    Table {
        name: TABLE.to_string(),
        sets,
        chains,
    }
}

fn render_set(out: &mut String, set: &Set) {
    out.push_str(&format!(
        "\tset {} {{\n\t\ttype {}\n\t\tflags interval\n",
        set.name,
        set_type(set.family)
    ));
    if !set.prefixes.is_empty() {
        out.push_str("\t\telements = {");
        for (i, prefix) in set.prefixes.iter().enumerate() {
            out.push_str(if i % 8 == 0 { "\n\t\t\t" } else { " " });
            out.push_str(&prefix.to_string());
            out.push(',');
        }
        out.push_str("\n\t\t}\n");
    }
    out.push_str("\t}\n");
}

fn render_chain(out: &mut String, chain: &Chain) {
    out.push_str(&format!("\tchain {} {{\n", chain.name));
    if chain.base.is_some() {
        out.push_str("\t\ttype nat hook postrouting priority srcnat + 10; policy accept;\n");
    }
    for rule in &chain.rules {
        out.push_str(&format!("\t\t{}\n", rule.text));
    }
    out.push_str("\t}\n");
}

/// `table` as an nft table definition (`nft list`'s layout).
fn render_definition(table: &Table) -> String {
    let mut out = format!("table inet {} {{\n", table.name);
    for set in &table.sets {
        render_set(&mut out, set);
    }
    for chain in &table.chains {
        render_chain(&mut out, chain);
    }
    out.push_str("}\n");
    out
}

/// The whole table as one `nft -f -` transaction, equivalent to the batch the agent
/// sends over netlink on a node that holds none of its objects, and valid input for nft
/// on any node: the table and sets are declared (so the flushes cannot fail), emptied
/// and refilled, and the objects of a family turned off are removed. The set objects are
/// kept from one write to the next rather than deleted and recreated: a freshly created
/// set can answer a lookup made right at the commit as empty, which would masquerade
/// traffic to listed prefixes.
pub fn render_transaction(policy: &Policy) -> String {
    let table = table_for(policy);
    let mut out = format!("table inet {TABLE} {{}}\n");
    let declare = |out: &mut String, name: &str, family: Family| {
        out.push_str(&format!(
            "add set inet {TABLE} {name} {{ type {}; flags interval; }}\n",
            set_type(family)
        ));
    };
    for set in &table.sets {
        declare(&mut out, &set.name, set.family);
    }
    out.push_str(&format!("flush table inet {TABLE}\n"));
    for set in &table.sets {
        out.push_str(&format!("flush set inet {TABLE} {}\n", set.name));
    }
    // A family turned off since the last run: declare-then-delete removes its objects.
    for family in [Family::V4, Family::V6] {
        if policy.family(family).is_none() {
            let chain = chain_name(family);
            out.push_str(&format!(
                "add chain inet {TABLE} {chain}\ndelete chain inet {TABLE} {chain}\n"
            ));
            let set = set_name(family);
            declare(&mut out, set, family);
            out.push_str(&format!("delete set inet {TABLE} {set}\n"));
        }
    }
    out.push_str(&render_definition(&table));
    out
}

/// The table's contents as comparable lines: one per set element, rule, or
/// declaration, whatever the line wrapping, in one order (sets and chains by name, a
/// set's elements sorted; a chain's rules keep theirs, which is their meaning), so nft's
/// listing and our own rendering of the same table give the same lines.
pub fn normalized_table(text: &str) -> Vec<String> {
    let start = text.rfind(&format!("table inet {TABLE} {{")).unwrap_or(0);
    let mut blocks: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut in_elements = false;
    // Lines of the table itself (`flags dormant`) are named after it.
    let mut container = format!("table inet {TABLE}");
    for raw in text[start..].lines() {
        let line = raw.trim();
        if in_elements || line.starts_with("elements = {") {
            let body = line.trim_start_matches("elements = {");
            in_elements = !body.contains('}');
            for element in body.trim_end_matches('}').split(',') {
                let element = element.trim();
                if !element.is_empty() {
                    let line = format!("{container}: element {}", normalize_element(element));
                    blocks.entry(container.clone()).or_default().push(line);
                }
            }
            continue;
        }
        if line.is_empty() || line == "}" || line.starts_with("table ") {
            continue;
        }
        if line.starts_with("set ") || line.starts_with("chain ") {
            container = line.trim_end_matches('{').trim().to_string();
            blocks.entry(container.clone()).or_default();
            continue;
        }
        blocks
            .entry(container.clone())
            .or_default()
            .push(format!("{container}: {line}"));
    }
    let mut lines = Vec::new();
    for (container, mut block) in blocks {
        if container.starts_with("set ") {
            block.sort();
        }
        if !container.starts_with("table ") {
            lines.push(container);
        }
        lines.extend(block);
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

/// True when kube-proxy runs in nftables mode (it owns `ip`/`ip6` tables named kube-proxy).
pub fn lists_kube_proxy_table(tables: &str) -> bool {
    tables.lines().any(|line| {
        let line = line.trim();
        line == "table ip kube-proxy" || line == "table ip6 kube-proxy"
    })
}

/// True when a failed read means the kernel has no nf_tables: no netfilter netlink
/// (`Protocol not supported`), or no nf_tables subsystem behind it (the kernel answers
/// `Invalid argument`, and its generation cannot be asked either).
fn unsupported(error: &ToolError, runner: &SharedRunner) -> bool {
    matches!(error, ToolError::Kernel { message, .. } if message.contains("not supported"))
        || runner.ruleset_generation().is_none()
}

/// Removes the agent's nft table if it exists (over netlink); returns whether it did.
pub fn remove_table(runner: &SharedRunner) -> Result<bool, SyncError> {
    let any = Table::empty(TABLE);
    let doing = || format!("deleting nft table inet {TABLE}");
    for _ in 0..ATTEMPTS {
        let observed = match runner.nft_observe(&any) {
            Ok(observed) => observed,
            // A kernel without nf_tables cannot hold the table either.
            Err(error) if unsupported(&error, runner) => return Ok(false),
            Err(error) => return Err(error).doing(doing),
        };
        if observed.table.is_none() {
            return Ok(false);
        }
        let batch = Batch {
            table: TABLE.to_string(),
            generation: Some(observed.generation),
            ops: vec![Op::DelTable],
        };
        match runner.nft_commit(&batch).doing(doing)? {
            Commit::Done => return Ok(true),
            Commit::GenerationMoved => continue,
        }
    }
    Err(busy(doing()))
}

/// The error of a write that lost the race with other writers every time.
fn busy(doing: String) -> SyncError {
    SyncError::Tool {
        doing,
        error: ToolError::Kernel {
            what: "nf_tables".into(),
            message: format!(
                "others committed to nf_tables between reading and writing, {ATTEMPTS} times; retried at the next sync"
            ),
        },
    }
}

/// The text `render` prints for the nftables backend.
pub fn render(policy: &Policy) -> String {
    format!(
        "# nft -f - (the agent writes the same table as one netlink batch)\n{}",
        render_transaction(policy)
    )
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
        Decision::Masquerade | Decision::Forced { .. } => {
            match policy.and_then(|p| p.snat_to.as_ref()) {
                Some(to) => format!("chain {chain} snat to {to}"),
                None => format!("chain {chain} masquerade"),
            }
        }
        Decision::SourceOutOfScope => {
            format!("chain {chain} saddr != @{} return", source_set_name(family))
        }
        Decision::OtherInterface => format!("chain {chain} oifname != ... return"),
        Decision::Unmanaged => "no rules".to_string(),
    }
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

/// The operations that turn a set holding `had` into one holding `set.prefixes`: the
/// difference, or a flush and refill when that is smaller (a disjoint list).
fn element_ops(set: &Set, had: &[IpNet], ops: &mut Vec<Op>) {
    let (leaving, entering) = sorted_difference(had, &set.prefixes);
    if leaving.len() + entering.len() > set.prefixes.len() {
        refill(set, ops);
        return;
    }
    if !leaving.is_empty() {
        ops.push(Op::DelPrefixes {
            set: set.name.clone(),
            prefixes: leaving,
        });
    }
    if !entering.is_empty() {
        ops.push(Op::AddPrefixes {
            set: set.name.clone(),
            prefixes: entering,
        });
    }
}

fn refill(set: &Set, ops: &mut Vec<Op>) {
    ops.push(Op::FlushSet(set.name.clone()));
    add_all(set, ops);
}

fn add_all(set: &Set, ops: &mut Vec<Op>) {
    if !set.prefixes.is_empty() {
        ops.push(Op::AddPrefixes {
            set: set.name.clone(),
            prefixes: set.prefixes.clone(),
        });
    }
}

/// The batch that turns the table the kernel is known to hold (`held`, same chains and
/// sets as `want`) into `want`: element changes only.
pub fn element_batch(held: &Table, want: &Table, generation: u32) -> Batch {
    let mut ops = Vec::new();
    for set in &want.sets {
        let had = held.set(&set.name).map(|s| s.prefixes.as_slice());
        element_ops(set, had.unwrap_or_default(), &mut ops);
    }
    Batch {
        table: want.name.clone(),
        generation: Some(generation),
        ops,
    }
}

/// The batch that turns the table the kernel was read to hold (`observed`) into `want`:
/// what differs and nothing else. Chains and sets that are not the agent's or are
/// declared differently are deleted (a hook or a set's type cannot change in place); the
/// rules are rewritten when any differs; a set's elements change by their difference.
/// With `whole`, every rule and element is rewritten (the repair after the kernel
/// refused a smaller batch).
pub fn repair_batch(want: &Table, observed: &Observed, whole: bool) -> Batch {
    let found = observed.table.as_ref();
    let mut ops = Vec::new();
    if found.is_none_or(|f| f.flags != 0) {
        ops.push(Op::NewTable);
    }
    let doomed_chains: Vec<&str> = found
        .map(|f| {
            f.chains
                .iter()
                .filter(|c| !c.declared)
                .map(|c| c.name.as_str())
                .collect()
        })
        .unwrap_or_default();
    let doomed_sets: Vec<&str> = found
        .map(|f| {
            f.sets
                .iter()
                .filter(|s| !s.declared)
                .map(|s| s.name.as_str())
                .collect()
        })
        .unwrap_or_default();
    let rules_differ = whole
        || !doomed_chains.is_empty()
        || !doomed_sets.is_empty()
        || want.chains.iter().any(|chain| {
            found
                .and_then(|f| f.chain(&chain.name))
                .is_none_or(|c| !c.rules)
        });
    // Rules go first: a chain or set still referenced by one cannot be deleted. Then sets
    // and maps, before chains: a verdict map's `jump CHAIN` holds its chain (the kernel
    // refuses to delete that chain first, EBUSY, and the whole batch with it).
    if rules_differ {
        ops.push(Op::FlushRules);
    }
    ops.extend(doomed_sets.iter().map(|name| Op::DelSet(name.to_string())));
    ops.extend(
        doomed_chains
            .iter()
            .map(|name| Op::DelChain(name.to_string())),
    );
    for set in &want.sets {
        let seen = found.and_then(|f| f.set(&set.name)).filter(|s| s.declared);
        match seen.map(|s| &s.elements) {
            None => {
                ops.push(Op::NewSet(Set {
                    prefixes: Vec::new(),
                    ..set.clone()
                }));
                add_all(set, &mut ops);
            }
            Some(_) if whole => refill(set, &mut ops),
            Some(Elements::Same) => {}
            Some(Elements::Differ { extra, missing })
                if extra.len() / 2 + missing.len() <= set.prefixes.len() =>
            {
                if !extra.is_empty() {
                    ops.push(Op::DelElements {
                        set: set.name.clone(),
                        family: set.family,
                        elements: extra.clone(),
                    });
                }
                if !missing.is_empty() {
                    ops.push(Op::AddPrefixes {
                        set: set.name.clone(),
                        prefixes: missing.clone(),
                    });
                }
            }
            Some(_) => refill(set, &mut ops),
        }
    }
    for chain in &want.chains {
        let declared = found
            .and_then(|f| f.chain(&chain.name))
            .is_some_and(|c| c.declared);
        if !declared {
            ops.push(Op::NewChain(Chain {
                rules: Vec::new(),
                ..chain.clone()
            }));
        }
    }
    if rules_differ {
        for chain in &want.chains {
            for rule in &chain.rules {
                ops.push(Op::NewRule {
                    chain: chain.name.clone(),
                    rule: rule.clone(),
                });
            }
        }
    }
    Batch {
        table: want.name.clone(),
        generation: Some(observed.generation),
        ops,
    }
}

/// The generation after `generation` (the kernel skips 0 when it wraps).
fn next_generation(generation: u32) -> u64 {
    u64::from(generation.checked_add(1).unwrap_or(1))
}

pub struct NftablesBackend {
    runner: SharedRunner,
    /// The table the kernel was last seen (read back, or written by a batch computed from
    /// what was read) to hold; None until then, and after a failed write.
    held: Option<Table>,
    /// The policy `held` was made from, and its rule count: an unchanged one needs
    /// nothing built at all while the generation stands still.
    held_for: Option<(Policy, usize)>,
    /// The ruleset generation at which the kernel held `held`: while it has not moved,
    /// no one changed any nf_tables table, so there is nothing to read.
    verified_generation: Option<u64>,
    /// Set by a sync that found no table of the agent's and wrote one: until then
    /// nothing was masqueraded by it (see `Backend::replaced_decisions`).
    replaced: Option<ReplacedDecisions>,
}

impl NftablesBackend {
    pub fn new(runner: SharedRunner) -> Result<Self, SyncError> {
        if let Some(problem) = runner.ruleset_generation_problem() {
            return Err(SyncError::Unusable(format!(
                "the nftables backend needs nf_tables in the kernel, over netlink (NET_ADMIN); asking for its generation failed: {problem}"
            )));
        }
        Ok(NftablesBackend {
            runner,
            held: None,
            held_for: None,
            verified_generation: None,
            replaced: None,
        })
    }

    /// The table as nft lists it, or None when it is missing or nft fails.
    fn list_table(&self) -> Option<String> {
        self.runner
            .run(
                &Program::new("nft"),
                &["list", "table", "inet", TABLE],
                None,
                None,
            )
            .ok()
    }

    /// Makes the kernel hold `want`; whether it wrote. Each attempt is one batch computed
    /// from a known state: the table written at the generation that still stands, or the
    /// table as read back. A batch refused because someone committed since is computed
    /// again from a fresh read; one the kernel refuses otherwise is retried once as a
    /// rewrite of every rule and element.
    fn converge(&mut self, want: Table) -> Result<bool, SyncError> {
        let doing = || format!("writing nft table inet {TABLE}");
        let mut whole = false;
        let mut wrote = false;
        let mut attempts = 0;
        // A read keeps at most 256 chains and sets that are not the agent's: each repair
        // from such a read removes those and reads again, this many times per sync.
        let mut partial_repairs = 0;
        while attempts < ATTEMPTS {
            let now = self.runner.ruleset_generation();
            let known = match (&self.held, now) {
                (Some(held), Some(now))
                    if !whole
                        && Some(now) == self.verified_generation
                        && held.same_frame(&want) =>
                {
                    u32::try_from(now).ok().map(|now| (held, now))
                }
                _ => None,
            };
            let mut incomplete = false;
            let batch = match known {
                Some((held, _)) if *held == want => return Ok(wrote),
                // Only elements change, on top of what was verified at this generation.
                Some((held, now)) => element_batch(held, &want, now),
                None => {
                    let observed = self
                        .runner
                        .nft_observe(&want)
                        .doing(|| format!("reading nft table inet {TABLE}"))?;
                    if observed.is_as_wanted(&want) {
                        self.held = Some(want);
                        self.verified_generation = Some(u64::from(observed.generation));
                        return Ok(wrote);
                    }
                    for difference in observed.differences(&want) {
                        tracing::debug!("nft table inet {TABLE}: {difference}");
                    }
                    incomplete = observed.table.as_ref().is_some_and(|t| t.incomplete);
                    // No table at all: the rules written now replace nothing that decided.
                    if observed.table.is_none() {
                        self.replaced = Some(ReplacedDecisions::default());
                    }
                    repair_batch(&want, &observed, whole)
                }
            };
            self.held = None;
            self.verified_generation = None;
            let sent = std::time::Instant::now();
            let committed = self.runner.nft_commit(&batch);
            tracing::debug!(
                operations = batch.ops.len(),
                commit_ms = format!("{:.3}", sent.elapsed().as_secs_f64() * 1e3),
                "nf_tables batch sent"
            );
            match committed {
                Ok(Commit::Done) if incomplete && partial_repairs < MAX_PARTIAL_REPAIRS => {
                    wrote = true;
                    partial_repairs += 1;
                    tracing::debug!(
                        "the table held more chains and sets that are not the agent's than one read keeps; reading it again"
                    );
                }
                Ok(Commit::Done) if incomplete => {
                    // Not verified: the next sync reads the table again and goes on.
                    return Err(SyncError::Tool {
                        doing: doing(),
                        error: ToolError::Kernel {
                            what: "nf_tables".into(),
                            message: format!(
                                "the table still holds chains or sets that are not the agent's after {MAX_PARTIAL_REPAIRS} repairs of 256 each; going on at the next sync"
                            ),
                        },
                    });
                }
                Ok(Commit::Done) => {
                    self.held = Some(want);
                    // Committed on top of the generation it was computed at: the kernel
                    // holds `want` at the next one, unless someone committed right after.
                    let after = self.runner.ruleset_generation();
                    self.verified_generation = batch
                        .generation
                        .map(next_generation)
                        .filter(|next| Some(*next) == after);
                    return Ok(true);
                }
                Ok(Commit::GenerationMoved) => {
                    attempts += 1;
                    tracing::debug!("nf_tables changed since the table was read; reading it again");
                }
                Err(error) if !whole => {
                    attempts += 1;
                    tracing::info!(
                        "the kernel refused the change ({error}); reading the table and rewriting every rule and element"
                    );
                    whole = true;
                }
                Err(error) => return Err(error).doing(doing),
            }
        }
        Err(busy(doing()))
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

    fn replaced_decisions(&self) -> Option<ReplacedDecisions> {
        self.replaced.clone()
    }

    /// Reads the table over netlink; where it differs and nft is installed, nft's
    /// listing against the rendered table says how (in nft's words), else the read does.
    fn diff(&mut self, policy: &Policy) -> Result<Vec<String>, SyncError> {
        let want = table_for(policy);
        let observed = self
            .runner
            .nft_observe(&want)
            .doing(|| format!("reading nft table inet {TABLE}"))?;
        if observed.is_as_wanted(&want) {
            return Ok(Vec::new());
        }
        if self.runner.exists("nft") {
            let expected = normalized_table(&render_transaction(policy));
            let actual = match self.list_table() {
                Some(listing) => normalized_table(&listing),
                None => Vec::new(),
            };
            let lines = super::line_diff(&expected, &actual);
            if !lines.is_empty() {
                return Ok(lines);
            }
        }
        Ok(observed.differences(&want))
    }

    /// Writes only what differs. An unchanged config with an unmoved ruleset generation
    /// reads nothing; otherwise see [`NftablesBackend::converge`].
    fn sync(&mut self, policy: &Policy) -> Result<SyncReport, SyncError> {
        let started_with = self.runner.spawned();
        self.replaced = None;
        // The cheapest idle resync: same policy, and no commit to nf_tables since the
        // kernel was known to hold it. Nothing is built, not even to count the rules:
        // that alone cost 1 ms per resync at 50,000 prefixes.
        if let Some((held_for, rules)) = &self.held_for
            && held_for == policy
        {
            let now = self.runner.ruleset_generation();
            if now.is_some() && now == self.verified_generation {
                return Ok(SyncReport {
                    processes: 0,
                    rules: *rules,
                    wrote: false,
                });
            }
        }
        let building = std::time::Instant::now();
        let want = table_for(policy);
        let rules = want.chains.iter().map(|chain| chain.rules.len()).sum();
        tracing::debug!(
            build_ms = format!("{:.3}", building.elapsed().as_secs_f64() * 1e3),
            "nft table built"
        );
        let result = self.converge(want);
        self.held_for = match (&result, &self.held) {
            (Ok(_), Some(_)) => Some((policy.clone(), rules)),
            _ => None,
        };
        let wrote = result?;
        Ok(SyncReport {
            processes: self.runner.spawned() - started_with,
            rules,
            wrote,
        })
    }
}

#[cfg(test)]
mod tests;
