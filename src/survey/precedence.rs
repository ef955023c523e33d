//! The NAT rules of others that act on the srcnat hook before the agent's own rules.
//!
//! Masquerading is decided by the first NAT rule that matches a new connection on the
//! postrouting hook: nf_nat runs the nat chains of every table in priority order and
//! stops at the first one that sets up a mapping. iptables-nft's and iptables-legacy's
//! nat POSTROUTING both hook at priority srcnat (100), where the iptables backend's jump
//! sits; the nftables backend's chain hooks at srcnat + 10 (110). Within one iptables
//! POSTROUTING, a rule before the agent's jump runs first. Hooks of equal priority run in
//! the order they were registered, which no listing shows, so a rule at the agent's own
//! priority in another table is reported as "same priority: order not defined" rather
//! than guessed.
//!
//! A rule counts when it can rewrite a packet's source: its target is MASQUERADE, SNAT or
//! NETMAP (`masquerade`, `snat`, `snat prefix`, `snat ... map` in nft), or it jumps to a
//! chain that (transitively) holds such a rule. An nft rule that only matches one family
//! (`meta nfproto ipv6`, `ip6 saddr ...`, `snat ip to`) is judged for that family alone. kube-proxy's mark-guarded masquerade (a `! --mark M/M -j RETURN` before the
//! MASQUERADE in `KUBE-POSTROUTING`, or `meta mark & M == 0 return` in table ip/ip6
//! kube-proxy) is listed as expected. The agent's own jump and chain, where the agent
//! works now, and its nft table are never listed; its jump and chain left in the other
//! iptables flavour (or, with the nftables backend, in iptables) are: they still decide
//! traffic, with whatever config they were written for (`Preceding::leftover`). Verdict maps by name (`vmap @map`) are not followed (`nft -t` omits
//! their elements).
//!
//! Pure: it classifies iptables-save-form nat text and `nft -t list chain` listings
//! (one `table` block each, as many as the caller read) that the caller (survey/mod.rs)
//! gathered; it runs nothing. Rules after the agent's that can NAT what it keeps are
//! listed too (`Order::After`).

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::policy::{Family, FamilyPolicy, Policy};

/// The hook priority of iptables' nat POSTROUTING (both flavours) and nft's `srcnat`.
pub const SRCNAT: i32 = 100;
/// At most this many rules are listed; the rest are counted.
const MAX_LISTED: usize = 100;
/// Rule visits per survey, so a hostile web of chains cannot make it expensive.
const MAX_STEPS: usize = 200_000;
/// Prefixes named in one effect line.
const MAX_PREFIXES_SHOWN: usize = 4;

/// One iptables implementation's nat table in iptables-save's form (saved whole, or the
/// chains that matter listed one by one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedNat {
    /// `nft` or `legacy`.
    pub flavour: &'static str,
    pub family: Family,
    pub text: String,
}

impl SavedNat {
    /// e.g. `ip6tables-legacy`.
    pub fn tool(&self) -> String {
        format!("{}-{}", xt_base(self.family), self.flavour)
    }
}

fn xt_base(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

/// What a survey read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listings {
    pub saved: Vec<SavedNat>,
    /// The native nft chains on the srcnat path, as `nft -t list chain` prints them
    /// (one `table` block each); None when they could not be read.
    pub ruleset: Option<String>,
    /// What was read, e.g. `iptables-nft nat (IPv4)`, `nft ruleset`.
    pub read: Vec<String>,
    /// What could not be read, and why.
    pub notes: Vec<String>,
}

/// Where the agent's own rules sit and how to recognise them.
#[derive(Clone, Debug)]
pub struct Ours {
    /// The iptables flavour (`nft`/`legacy`) whose nat POSTROUTING holds the agent's
    /// jump; None for the nftables backend.
    pub xtables: Option<&'static str>,
    /// The agent's hook priority: srcnat (100) for iptables, srcnat + 10 for nftables.
    pub priority: i32,
    /// The agent's nft table, `(family, name)`: never surveyed.
    pub nft_table: (&'static str, &'static str),
    /// The agent's nat chain where it works now (the iptables backend): a rule that
    /// jumps into it runs the agent's own rules, which decide as the agent does.
    pub chain: Option<String>,
    /// True for a nat POSTROUTING rule spec (after `-A POSTROUTING `) some release wrote.
    pub is_agent_jump: fn(&str) -> bool,
}

impl Ours {
    fn describe(&self) -> String {
        match self.xtables {
            Some(flavour) => format!("iptables-{flavour} nat POSTROUTING, priority srcnat (100)"),
            None => format!(
                "nft chain, priority {} ({})",
                priority_text(self.priority),
                self.priority
            ),
        }
    }
}

/// How a listed rule is ordered against the agent's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// It runs first.
    Before,
    /// Another table at the agent's own hook priority: the kernel runs them in
    /// registration order, which no listing shows.
    SamePriority,
    /// It runs after the agent's rules, on what they kept (a RETURN or an accept ends
    /// no later NAT rule); listed only when it can NAT a destination the agent keeps.
    After,
}

/// One rule that can masquerade or SNAT a packet before the agent's rules get to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preceding {
    /// e.g. `iptables-nft nat POSTROUTING`, `nft table inet t chain post`.
    pub place: String,
    /// e.g. `rule 1, before the agent's jump (rule 3)`, `priority 50, ...`.
    pub position: String,
    pub order: Order,
    /// The rule as listed (an `-A POSTROUTING` line, or an nft rule).
    pub rule: String,
    /// The MASQUERADE/SNAT rule it reaches through jumps: `CHAIN: rule`.
    pub via: Option<String>,
    /// kube-proxy's mark-guarded masquerade.
    pub expected: bool,
    /// Which of the agent's decisions it can override (or why it is expected).
    pub effect: String,
    /// The agent's own jump, left in a flavour (or backend) it no longer works in.
    pub leftover: bool,
}

impl Preceding {
    /// What identifies the rule from one survey to the next (positions shift when a
    /// neighbour inserts an unrelated rule; that is not news).
    pub fn key(&self) -> (&str, &str, Option<&str>) {
        (&self.place, &self.rule, self.via.as_deref())
    }
}

impl fmt::Display for Preceding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: `{}`", self.place, self.position, self.rule)?;
        if let Some(via) = &self.via {
            write!(f, " -> {via}")?;
        }
        write!(f, "; {}", self.effect)
    }
}

/// The answer of one survey.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Survey {
    pub rules: Vec<Preceding>,
    /// Rules beyond the listing limit.
    pub omitted: usize,
    pub read: Vec<String>,
    pub notes: Vec<String>,
}

impl Survey {
    /// Whether the agent's own rules were found where it no longer works (the other
    /// iptables flavour; iptables for the nftables backend).
    pub fn has_leftovers(&self) -> bool {
        self.rules.iter().any(|rule| rule.leftover)
    }

    /// (expected, unexpected) of the rules acting before the agent's (or at its
    /// priority), the omitted ones counted as unexpected.
    pub fn counts(&self) -> (usize, usize) {
        let before = || self.rules.iter().filter(|r| r.order != Order::After);
        let expected = before().filter(|r| r.expected).count();
        (expected, before().count() - expected + self.omitted)
    }

    /// The rules acting after the agent's that can NAT what it keeps.
    pub fn following(&self) -> usize {
        self.rules
            .iter()
            .filter(|r| r.order == Order::After)
            .count()
    }
}

/// Lists the rules of `listings` that act on srcnat before `ours`, for the families
/// `policy` manages, each with the agent decision it can override.
pub fn classify(listings: &Listings, ours: &Ours, policy: &Policy) -> Survey {
    let mut found = Vec::new();
    let mut steps = 0usize;
    for saved in &listings.saved {
        let Some(family) = policy.family(saved.family) else {
            continue;
        };
        classify_saved(saved, ours, family, &mut found, &mut steps);
    }
    if let Some(ruleset) = &listings.ruleset {
        let covered: Vec<Family> = listings
            .saved
            .iter()
            .filter(|s| s.flavour == "nft")
            .map(|s| s.family)
            .collect();
        classify_ruleset(ruleset, ours, policy, &covered, &mut found, &mut steps);
    }
    let omitted = found.len().saturating_sub(MAX_LISTED);
    found.truncate(MAX_LISTED);
    Survey {
        rules: found,
        omitted,
        read: listings.read.clone(),
        notes: listings.notes.clone(),
    }
}

// ---------------------------------------------------------------------------------------
// Words

#[derive(Clone, Debug, PartialEq, Eq)]
struct Token {
    text: String,
    quoted: bool,
}

impl Token {
    fn is(&self, word: &str) -> bool {
        !self.quoted && self.text == word
    }

    fn display(&self) -> String {
        if self.quoted {
            format!(
                "\"{}\"",
                self.text.replace('\\', "\\\\").replace('"', "\\\"")
            )
        } else {
            self.text.clone()
        }
    }
}

/// A line's words (see [`crate::kernel::words`]), with whether each was quoted, so a comment
/// reading `masquerade` or `-j` is never taken for a keyword.
fn tokens(line: &str) -> Vec<Token> {
    crate::kernel::words::words(line)
        .into_iter()
        .map(|(text, quoted)| Token { text, quoted })
        .collect()
}

fn join(words: &[Token]) -> String {
    words
        .iter()
        .map(Token::display)
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|net| net.trunc())
}

/// What a NAT rule does to the source.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    Masquerade,
    /// Any other rewrite of the source, as the operator should read it:
    /// `SNAT (to 192.0.2.1)`, `NETMAP (to 192.0.2.0/24)`, `SNAT (prefix to ...)`.
    Rewrite(String),
}

impl Action {
    fn verb(&self) -> String {
        match self {
            Action::Masquerade => "masquerade".to_string(),
            Action::Rewrite(what) => what.clone(),
        }
    }
}

/// At most this many characters of a rewrite's target (a map can be long).
const MAX_TARGET_SHOWN: usize = 60;

fn shortened(text: &str) -> String {
    if text.chars().count() <= MAX_TARGET_SHOWN {
        return text.to_string();
    }
    let cut: String = text.chars().take(MAX_TARGET_SHOWN).collect();
    format!("{cut}…")
}

/// What the path from a base chain to one NAT rule adds up to.
#[derive(Clone, Debug, Default)]
struct Path {
    /// The chains entered, in order.
    chains: Vec<String>,
    /// Non-empty match texts along the way, with the chain they sit in (None: the base).
    matches: Vec<(Option<String>, String)>,
    /// Positive destination prefixes along the way.
    destinations: Vec<IpNet>,
    /// Negated destination prefixes along the way (`! -d X`, `ip daddr != X`): the
    /// packet is in none of them.
    excluded: Vec<IpNet>,
    /// The mark a packet must carry to get here (`M/M`), if any.
    guard: Option<String>,
    /// The only families packets can have here (an nft rule's `meta nfproto ipv6`,
    /// `ip saddr`, ...); None: any.
    families: Option<Vec<Family>>,
}

impl Path {
    /// Narrows the families by what one rule matches; false when none is left.
    fn restrict(&mut self, only: Option<Vec<Family>>) -> bool {
        let Some(only) = only else {
            return true;
        };
        let narrowed: Vec<Family> = match &self.families {
            Some(now) => now.iter().copied().filter(|f| only.contains(f)).collect(),
            None => only,
        };
        let any = !narrowed.is_empty();
        self.families = Some(narrowed);
        any
    }
}

/// One NAT rule reached from a base chain's rule.
struct Reached {
    path: Path,
    /// The NAT rule as listed, when it is not the base rule itself.
    via: Option<String>,
    /// The chain holding the NAT rule.
    chain: String,
    action: Action,
}

// ---------------------------------------------------------------------------------------
// iptables

struct XtRule {
    /// The whole `-A CHAIN ...` line.
    line: String,
    matches: Vec<Token>,
    target: Option<String>,
    target_args: Vec<Token>,
}

impl XtRule {
    fn parse(line: &str) -> Option<(String, XtRule)> {
        let words = tokens(line);
        if words.len() < 2 || !words[0].is("-A") {
            return None;
        }
        let chain = words[1].text.clone();
        let mut rule = XtRule {
            line: line.to_string(),
            matches: Vec::new(),
            target: None,
            target_args: Vec::new(),
        };
        let rest = &words[2..];
        let mut i = 0;
        while i < rest.len() {
            let word = &rest[i];
            let next = rest.get(i + 1);
            if word.is("-m") && next.is_some_and(|n| n.is("comment")) {
                i += 2;
                continue;
            }
            if word.is("--comment") {
                i += 2;
                continue;
            }
            if word.is("-j") || word.is("-g") {
                rule.target = next.map(|n| n.text.clone());
                rule.target_args = rest.get(i + 2..).unwrap_or_default().to_vec();
                break;
            }
            rule.matches.push(word.clone());
            i += 1;
        }
        Some((chain, rule))
    }

    fn action(&self) -> Option<Action> {
        match self.target.as_deref()? {
            "MASQUERADE" => Some(Action::Masquerade),
            target @ ("SNAT" | "NETMAP") => {
                let flag = if target == "SNAT" {
                    "--to-source"
                } else {
                    "--to"
                };
                let to = self
                    .target_args
                    .windows(2)
                    .find(|pair| pair[0].is(flag))
                    .map_or_else(|| "?".to_string(), |pair| pair[1].text.clone());
                Some(Action::Rewrite(format!("{target} (to {})", shortened(&to))))
            }
            _ => None,
        }
    }

    /// `(value, negated)` of each `--mark` match.
    fn marks(&self) -> Vec<(String, bool)> {
        let m = &self.matches;
        (0..m.len())
            .filter(|&i| m[i].is("--mark") && i + 1 < m.len())
            .map(|i| (m[i + 1].text.clone(), i > 0 && m[i - 1].is("!")))
            .collect()
    }

    /// kube-proxy's guard: `-m mark ! --mark M/M -j RETURN` and nothing else, so every
    /// packet without the mark leaves the chain here.
    fn unmarked_return(&self) -> Option<String> {
        let texts: Vec<&str> = self.matches.iter().map(|t| t.text.as_str()).collect();
        match (texts.as_slice(), self.target.as_deref()) {
            (["-m", "mark", "!", "--mark", mark], Some("RETURN")) => Some(mark.to_string()),
            _ => None,
        }
    }

    fn positive_mark(&self) -> Option<String> {
        self.marks()
            .into_iter()
            .find(|(_, negated)| !negated)
            .map(|(mark, _)| mark)
    }

    fn destinations(&self) -> Vec<IpNet> {
        self.destination_matches(false)
    }

    /// `! -d X` (iptables-save prints the `!` before the option).
    fn excluded_destinations(&self) -> Vec<IpNet> {
        self.destination_matches(true)
    }

    fn destination_matches(&self, negated: bool) -> Vec<IpNet> {
        let m = &self.matches;
        (0..m.len())
            .filter(|&i| m[i].is("-d") && (i > 0 && m[i - 1].is("!")) == negated)
            .filter_map(|i| m.get(i + 1).and_then(|t| parse_net(&t.text)))
            .collect()
    }
}

struct XtTable {
    /// Chains in the order iptables-save declares them, with their rules.
    chains: Vec<(String, Vec<XtRule>)>,
}

impl XtTable {
    fn parse(text: &str) -> XtTable {
        let has_sections = text.lines().any(|l| l.starts_with('*'));
        let mut in_nat = !has_sections;
        let mut chains: Vec<(String, Vec<XtRule>)> = Vec::new();
        for line in text.lines() {
            if line.starts_with('*') {
                in_nat = line == "*nat";
                continue;
            }
            if !in_nat {
                continue;
            }
            if let Some(declaration) = line.strip_prefix(':') {
                let name = declaration.split(' ').next().unwrap_or_default();
                if !chains.iter().any(|(n, _)| n == name) {
                    chains.push((name.to_string(), Vec::new()));
                }
            } else if let Some((chain, rule)) = XtRule::parse(line) {
                match chains.iter_mut().find(|(n, _)| *n == chain) {
                    Some((_, rules)) => rules.push(rule),
                    None => chains.push((chain, vec![rule])),
                }
            }
        }
        XtTable { chains }
    }

    fn rules(&self, chain: &str) -> Option<&[XtRule]> {
        self.chains
            .iter()
            .find(|(n, _)| n == chain)
            .map(|(_, rules)| rules.as_slice())
    }
}

/// The NAT rules `rule` reaches, with the path to each; `rule` sits in the last chain of
/// `path`, or in POSTROUTING when the path is empty.
fn xt_reached(
    table: &XtTable,
    rule: &XtRule,
    mut path: Path,
    agent_chain: Option<&str>,
    steps: &mut usize,
    out: &mut Vec<Reached>,
) {
    let top = path.chains.is_empty();
    let chain = path
        .chains
        .last()
        .cloned()
        .unwrap_or_else(|| "POSTROUTING".to_string());
    *steps += 1;
    if *steps > MAX_STEPS {
        return;
    }
    let matches = join(&rule.matches);
    if !matches.is_empty() {
        let at = (!top).then(|| chain.clone());
        path.matches.push((at, matches));
    }
    path.destinations.extend(rule.destinations());
    path.excluded.extend(rule.excluded_destinations());
    if path.guard.is_none() {
        path.guard = rule.positive_mark();
    }
    if let Some(action) = rule.action() {
        out.push(Reached {
            path,
            via: (!top).then(|| rule.line.clone()),
            chain,
            action,
        });
        return;
    }
    let Some(target) = rule.target.as_deref() else {
        return;
    };
    // Into the agent's own chain, where it works: the agent's rules decide there.
    if agent_chain == Some(target) {
        return;
    }
    let Some(rules) = table.rules(target) else {
        return;
    };
    if path.chains.iter().any(|c| c == target) {
        return;
    }
    path.chains.push(target.to_string());
    let mut guard = path.guard.clone();
    for inner in rules {
        if guard.is_none() {
            guard = inner.unmarked_return();
            if guard.is_some() {
                continue;
            }
        }
        let mut next = path.clone();
        next.guard = guard.clone();
        xt_reached(table, inner, next, agent_chain, steps, out);
    }
}

fn classify_saved(
    saved: &SavedNat,
    ours: &Ours,
    family: &FamilyPolicy,
    found: &mut Vec<Preceding>,
    steps: &mut usize,
) {
    let table = XtTable::parse(&saved.text);
    let Some(postrouting) = table.rules("POSTROUTING") else {
        return;
    };
    let holds_agent = ours.xtables == Some(saved.flavour);
    let agent_jump = postrouting
        .iter()
        .position(|r| is_agent_jump_line(&r.line, ours));
    let place = format!("{} nat POSTROUTING", saved.tool());
    // Where a sync puts a missing jump: after every rule but stale jumps of the agent's.
    let appended_at = 1 + postrouting
        .iter()
        .filter(|r| !is_agent_jump_line(&r.line, ours))
        .count();
    let agent_chain = ours.chain.as_deref().filter(|_| holds_agent);
    let mut guard = None;
    for (index, rule) in postrouting.iter().enumerate() {
        let after = holds_agent && agent_jump.is_some_and(|at| index > at);
        if is_agent_jump_line(&rule.line, ours) {
            if !holds_agent {
                found.push(leftover(saved, index, &rule.line, ours, &place));
            }
            continue;
        }
        if guard.is_none() {
            guard = rule.unmarked_return();
            if guard.is_some() {
                continue;
            }
        }
        let mut reached = Vec::new();
        let path = Path {
            guard: guard.clone(),
            ..Path::default()
        };
        xt_reached(&table, rule, path, agent_chain, steps, &mut reached);
        let (position, order) = match (holds_agent, agent_jump, ours.xtables) {
            (true, Some(at), _) if after => (
                format!(
                    "rule {}, after the agent's jump (rule {}): it runs on what the agent's chain RETURNs",
                    index + 1,
                    at + 1
                ),
                Order::After,
            ),
            (true, Some(at), _) => (
                format!(
                    "rule {}, before the agent's jump (rule {})",
                    index + 1,
                    at + 1
                ),
                Order::Before,
            ),
            (true, None, _) => (
                format!(
                    "rule {}, before the agent's jump (absent when read; a sync appends it as rule {})",
                    index + 1,
                    appended_at
                ),
                Order::Before,
            ),
            (false, _, Some(flavour)) => (
                format!(
                    "rule {}; iptables-{} and iptables-{flavour} (the agent's) both hook srcnat at priority 100: same priority: order not defined",
                    index + 1,
                    saved.flavour
                ),
                Order::SamePriority,
            ),
            (false, _, None) => (
                format!(
                    "rule {}, priority srcnat (100), before the agent's {}",
                    index + 1,
                    ours.describe()
                ),
                Order::Before,
            ),
        };
        for reach in reached {
            let (expected, effect, overrides) = effect(
                &reach,
                reach.chain == "KUBE-POSTROUTING",
                std::slice::from_ref(family),
            );
            if order == Order::After && !overrides {
                continue;
            }
            found.push(Preceding {
                place: place.clone(),
                position: position.clone(),
                order,
                rule: rule.line.clone(),
                via: reach.via.map(|via| format!("{}: {via}", reach.chain)),
                expected,
                effect,
                leftover: false,
            });
        }
    }
}

/// The agent's own jump where it no longer works: another iptables flavour, or iptables
/// for the nftables backend. It still decides traffic with the config it was written for.
fn leftover(saved: &SavedNat, index: usize, line: &str, ours: &Ours, place: &str) -> Preceding {
    let (position, order, effect) = match ours.xtables {
        Some(flavour) => (
            format!(
                "rule {}; iptables-{} and iptables-{flavour} (the agent's) both hook srcnat at priority 100: same priority: order not defined",
                index + 1,
                saved.flavour
            ),
            Order::SamePriority,
            format!(
                "the agent's own jump and chain, left in iptables-{} from a run in that flavour: they still masquerade by the config they were written for, at the same priority as the agent's rules in iptables-{flavour}; the agent removes them after its next successful sync",
                saved.flavour
            ),
        ),
        None => (
            format!(
                "rule {}, priority srcnat (100), before the agent's {}",
                index + 1,
                ours.describe()
            ),
            Order::Before,
            "the iptables backend's jump and chain, left from before the switch to nftables: they run first and masquerade by the config they were written for; the agent removes them after its next successful sync".to_string(),
        ),
    };
    Preceding {
        place: place.to_string(),
        position,
        order,
        rule: line.to_string(),
        via: None,
        expected: false,
        effect,
        leftover: true,
    }
}

fn is_agent_jump_line(line: &str, ours: &Ours) -> bool {
    line.strip_prefix("-A POSTROUTING ")
        .is_some_and(|spec| (ours.is_agent_jump)(spec))
}

// ---------------------------------------------------------------------------------------
// nft

#[derive(Clone, Debug)]
struct BaseHook {
    kind: String,
    hook: String,
    priority: Option<i32>,
    priority_text: String,
}

#[derive(Clone, Debug)]
struct NftChain {
    family: String,
    table: String,
    name: String,
    base: Option<BaseHook>,
    rules: Vec<String>,
}

enum Context {
    Table(String, String),
    Chain(usize),
    /// A block the survey does not read (set, map, flowtable, ...), with its open braces.
    Skip(i64),
}

/// `{` minus `}` outside quotes.
fn brace_balance(line: &str) -> i64 {
    let mut balance = 0;
    crate::kernel::words::scan_outside_quotes(line, |c| match c {
        '{' => balance += 1,
        '}' => balance -= 1,
        _ => {}
    });
    balance
}

/// A rule's text without what its counter has counted (`counter packets 12 bytes 720`
/// reads `counter`): a rule is the same rule whatever traffic it saw.
fn without_counts(line: &str) -> String {
    let words: Vec<&str> = line.split(' ').collect();
    let mut out: Vec<&str> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        out.push(words[i]);
        let counted = words[i] == "counter"
            && words.get(i + 1) == Some(&"packets")
            && words.get(i + 3) == Some(&"bytes")
            && [i + 2, i + 4].iter().all(|&at| {
                words
                    .get(at)
                    .is_some_and(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit()))
            });
        i += if counted { 5 } else { 1 };
    }
    out.join(" ")
}

/// The chains of nft listings (`list ruleset`, or `list chain` outputs one after another),
/// with their hooks and rules.
fn parse_ruleset(text: &str) -> Vec<NftChain> {
    let mut chains: Vec<NftChain> = Vec::new();
    let mut stack: Vec<Context> = Vec::new();
    // A rule whose braces open on one line and close on a later one.
    let mut pending: Option<(usize, String, i64)> = None;
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let balance = brace_balance(line);
        if let Some((chain, mut rule, open)) = pending.take() {
            rule.push(' ');
            rule.push_str(line);
            rule = without_counts(&rule);
            if open + balance > 0 {
                pending = Some((chain, rule, open + balance));
            } else {
                chains[chain].rules.push(rule);
            }
            continue;
        }
        if let Some(Context::Skip(open)) = stack.last_mut() {
            *open += balance;
            if *open <= 0 {
                stack.pop();
            }
            continue;
        }
        if line == "}" {
            stack.pop();
            continue;
        }
        let words = tokens(line);
        let first = words.first().map(|w| w.text.as_str()).unwrap_or_default();
        match stack.last() {
            None => {
                if first == "table" && words.len() >= 3 && balance > 0 {
                    stack.push(Context::Table(words[1].text.clone(), words[2].text.clone()));
                } else if balance > 0 {
                    stack.push(Context::Skip(balance));
                }
            }
            Some(Context::Table(family, table)) => {
                if first == "chain" && words.len() >= 2 && balance > 0 {
                    chains.push(NftChain {
                        family: family.clone(),
                        table: table.clone(),
                        name: words[1].text.clone(),
                        base: None,
                        rules: Vec::new(),
                    });
                    stack.push(Context::Chain(chains.len() - 1));
                } else if balance > 0 {
                    stack.push(Context::Skip(balance));
                }
            }
            Some(Context::Chain(index)) => {
                let index = *index;
                if first == "type" {
                    chains[index].base = parse_hook(&words);
                } else if matches!(first, "comment" | "policy" | "devices" | "device") {
                } else if balance > 0 {
                    pending = Some((index, without_counts(line), balance));
                } else {
                    chains[index].rules.push(without_counts(line));
                }
            }
            Some(Context::Skip(_)) => {}
        }
    }
    chains
}

/// The chains the rules of an `nft list chain` listing jump or go to (its own table).
pub(crate) fn nft_jump_targets(listing: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for chain in parse_ruleset(listing) {
        for text in &chain.rules {
            for (_, target) in NftRule::parse(text).jumps() {
                if !targets.contains(&target) {
                    targets.push(target);
                }
            }
        }
    }
    targets
}

/// `type nat hook postrouting priority srcnat - 5; policy accept;`
fn parse_hook(words: &[Token]) -> Option<BaseHook> {
    let after = |key: &str| {
        words
            .iter()
            .position(|w| w.is(key))
            .and_then(|at| words.get(at + 1))
            .map(|w| w.text.trim_end_matches(';').to_string())
    };
    let at = words.iter().position(|w| w.is("priority"))?;
    let mut text = Vec::new();
    for word in &words[at + 1..] {
        let done = word.text.ends_with(';');
        text.push(word.text.trim_end_matches(';').to_string());
        if done {
            break;
        }
    }
    let priority_text = text.join(" ");
    Some(BaseHook {
        kind: after("type")?,
        hook: after("hook")?,
        priority: eval_priority(&priority_text),
        priority_text,
    })
}

/// The standard priority names of the ip, ip6 and inet families.
const PRIORITY_NAMES: [(&str, i32); 6] = [
    ("raw", -300),
    ("mangle", -150),
    ("dstnat", -100),
    ("filter", 0),
    ("security", 50),
    ("srcnat", 100),
];

/// `srcnat`, `srcnat + 10`, `security`, `-150`, `50`.
fn eval_priority(text: &str) -> Option<i32> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let base = |word: &str| {
        PRIORITY_NAMES
            .iter()
            .find(|(name, _)| *name == word)
            .map(|(_, value)| *value)
            .or_else(|| word.parse().ok())
    };
    match words.as_slice() {
        [one] => base(one),
        [name, "+", n] => Some(base(name)? + n.parse::<i32>().ok()?),
        [name, "-", n] => Some(base(name)? - n.parse::<i32>().ok()?),
        _ => None,
    }
}

/// A priority as nft names it: `srcnat + 10`.
fn priority_text(priority: i32) -> String {
    let (name, value) = PRIORITY_NAMES
        .iter()
        .min_by_key(|(_, value)| (priority - value).abs())
        .copied()
        .unwrap_or(("srcnat", SRCNAT));
    match priority - value {
        0 => name.to_string(),
        d if d > 0 => format!("{name} + {d}"),
        d => format!("{name} - {}", -d),
    }
}

struct NftRule {
    text: String,
    /// Words without counters and comments.
    words: Vec<Token>,
}

impl NftRule {
    fn parse(text: &str) -> NftRule {
        let all = tokens(text);
        let mut words = Vec::new();
        let mut i = 0;
        while i < all.len() {
            if all[i].is("counter") {
                i += 1;
                if all.get(i).is_some_and(|w| w.is("packets")) {
                    i += 4;
                }
                continue;
            }
            if all[i].is("comment") {
                i += 2;
                continue;
            }
            words.push(all[i].clone());
            i += 1;
        }
        NftRule {
            text: text.to_string(),
            words,
        }
    }

    fn jump_target_at(&self, i: usize) -> bool {
        i > 0 && (self.words[i - 1].is("jump") || self.words[i - 1].is("goto"))
    }

    /// Where the NAT statement starts, and what it does: `masquerade ...`, or `snat [ip |
    /// ip6] [prefix] to EXPR [flags]` where EXPR may be an address, a range, a prefix or
    /// a map (`ip saddr map { ... }`).
    fn action(&self) -> Option<(usize, Action)> {
        let w = &self.words;
        (0..w.len()).find_map(|i| {
            if self.jump_target_at(i) {
                return None;
            }
            if w[i].is("masquerade") {
                return Some((i, Action::Masquerade));
            }
            if !w[i].is("snat") {
                return None;
            }
            let mut j = i + 1;
            if w.get(j).is_some_and(|n| n.is("ip") || n.is("ip6")) {
                j += 1;
            }
            let prefix = w.get(j).is_some_and(|n| n.is("prefix"));
            if prefix {
                j += 1;
            }
            if !w.get(j).is_some_and(|n| n.is("to")) {
                return None;
            }
            const FLAGS: [&str; 3] = ["persistent", "random", "fully-random"];
            let target: Vec<Token> = w[j + 1..]
                .iter()
                .take_while(|t| !FLAGS.iter().any(|f| t.is(f)))
                .cloned()
                .collect();
            let to = if target.is_empty() {
                "?".to_string()
            } else {
                shortened(&join(&target))
            };
            let what = if prefix {
                format!("SNAT (prefix to {to})")
            } else {
                format!("SNAT (to {to})")
            };
            Some((i, Action::Rewrite(what)))
        })
    }

    /// The families this rule can match (None: any): `meta nfproto ipv4`, a match on an
    /// `ip` or `ip6` header field, or a NAT statement of one family (`snat ip to`).
    fn families(&self) -> Option<Vec<Family>> {
        let w = &self.words;
        let mut only: Option<Family> = None;
        let mut conflict = false;
        let mut note = |family: Family| match only {
            Some(now) if now != family => conflict = true,
            _ => only = Some(family),
        };
        for i in 0..w.len() {
            if w[i].is("nfproto") && !w.get(i + 1).is_some_and(|n| n.is("!=")) {
                let value = w.get(i + 1).filter(|n| !n.is("==")).or(w.get(i + 2));
                match value.map(|v| v.text.as_str()) {
                    Some("ipv4") => note(Family::V4),
                    Some("ipv6") => note(Family::V6),
                    _ => {}
                }
            }
            let header_field = w.get(i + 1).is_some_and(|n| {
                !n.quoted && n.text.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            });
            if w[i].is("ip") && header_field {
                note(Family::V4);
            } else if w[i].is("ip6") && header_field {
                note(Family::V6);
            }
        }
        if conflict {
            return Some(Vec::new());
        }
        only.map(|family| vec![family])
    }

    fn jumps(&self) -> Vec<(usize, String)> {
        let w = &self.words;
        (1..w.len())
            .filter(|&i| self.jump_target_at(i))
            .map(|i| {
                let name = w[i].text.trim_end_matches([',', '}']).to_string();
                (i - 1, name)
            })
            .collect()
    }

    /// The words before `end`, as a match text.
    fn matches(&self, end: usize) -> String {
        join(&self.words[..end.min(self.words.len())])
    }

    /// `M` of `[meta] mark & M OP V` in `words`, when it requires the mark bits set.
    fn mark_test(words: &[&str]) -> Option<(String, bool)> {
        let at = words.iter().position(|w| *w == "mark")?;
        match &words[at + 1..] {
            ["&", mask, op, value, ..] => {
                let zero = value
                    .trim_start_matches("0x")
                    .trim_start_matches('0')
                    .is_empty();
                let set = match (*op, zero, value == mask) {
                    ("==", true, _) => false,
                    ("==", false, _) => true,
                    ("!=", true, _) => true,
                    // Not all of the mask's bits set: unmarked.
                    ("!=", false, true) => false,
                    _ => return None,
                };
                Some((format!("{mask}/{mask}"), set))
            }
            _ => None,
        }
    }

    /// kube-proxy's guard: `meta mark & M == 0 return` (or `!= M`) and nothing else.
    fn unmarked_return(&self) -> Option<String> {
        let texts: Vec<&str> = self.words.iter().map(|t| t.text.as_str()).collect();
        let (last, test) = texts.split_last()?;
        let plain = matches!(test, ["meta", "mark", _, _, _, _] | ["mark", _, _, _, _]);
        if *last != "return" || !plain {
            return None;
        }
        match Self::mark_test(test)? {
            (mark, false) => Some(mark),
            _ => None,
        }
    }

    fn positive_mark(&self, end: usize) -> Option<String> {
        let texts: Vec<&str> = self.words[..end.min(self.words.len())]
            .iter()
            .map(|t| t.text.as_str())
            .collect();
        match Self::mark_test(&texts)? {
            (mark, true) => Some(mark),
            _ => None,
        }
    }

    fn destinations(&self, end: usize) -> Vec<IpNet> {
        let w = &self.words[..end.min(self.words.len())];
        (1..w.len())
            .filter(|&i| w[i].is("daddr") && (w[i - 1].is("ip") || w[i - 1].is("ip6")))
            .filter_map(|i| w.get(i + 1).and_then(|t| parse_net(&t.text)))
            .collect()
    }

    /// `ip daddr != X` / `ip6 daddr != X`.
    /// `ip daddr != X` where X is a prefix, an address, a range `A-B` or an anonymous
    /// set `{ ... }` of those: every destination it leaves out, as prefixes.
    fn excluded_destinations(&self, end: usize) -> Vec<IpNet> {
        let w = &self.words[..end.min(self.words.len())];
        let mut out = Vec::new();
        for i in 1..w.len() {
            if !(w[i].is("daddr") && (w[i - 1].is("ip") || w[i - 1].is("ip6"))) {
                continue;
            }
            if !w.get(i + 1).is_some_and(|t| t.is("!=")) {
                continue;
            }
            let Some(first) = w.get(i + 2) else {
                continue;
            };
            if first.text.starts_with('{') {
                // `{ a, b, c }`: the items up to the closing brace.
                for token in &w[i + 2..] {
                    let item = token
                        .text
                        .trim_matches(|c| c == '{' || c == '}' || c == ',');
                    out.extend(destination_item(item));
                    if token.text.ends_with('}') {
                        break;
                    }
                }
            } else {
                out.extend(destination_item(&first.text));
            }
        }
        out
    }
}

/// One item of a destination match as prefixes: `10.0.0.0/8`, `10.0.0.1`, or the range
/// `10.0.0.0-10.255.255.255` as the prefixes that cover exactly it.
fn destination_item(item: &str) -> Vec<IpNet> {
    if item.is_empty() {
        return Vec::new();
    }
    if let Some(net) = parse_net(item) {
        return vec![net];
    }
    let Some((start, end)) = item.split_once('-') else {
        return Vec::new();
    };
    match (start.parse::<IpAddr>(), end.parse::<IpAddr>()) {
        (Ok(IpAddr::V4(a)), Ok(IpAddr::V4(b))) if a <= b => {
            ipnet::Ipv4Subnets::new(a, b, 0).map(IpNet::V4).collect()
        }
        (Ok(IpAddr::V6(a)), Ok(IpAddr::V6(b))) if a <= b => {
            ipnet::Ipv6Subnets::new(a, b, 0).map(IpNet::V6).collect()
        }
        _ => Vec::new(),
    }
}

/// The agent's POSTROUTING jump as nft lists iptables-nft's rule (the comment match is
/// not shown): `fib daddr type != local [counter ...] jump CHAIN`.
fn is_agent_nft_jump(text: &str, ours: &Ours) -> bool {
    let Some(chain) = ours.chain.as_deref() else {
        return false;
    };
    let rule = NftRule::parse(text);
    let words: Vec<&str> = rule.words.iter().map(|t| t.text.as_str()).collect();
    words == ["fib", "daddr", "type", "!=", "local", "jump", chain]
}

fn nft_reached(
    chains: &[NftChain],
    at: usize,
    rule: &NftRule,
    mut path: Path,
    top: bool,
    steps: &mut usize,
    out: &mut Vec<Reached>,
) {
    *steps += 1;
    if *steps > MAX_STEPS {
        return;
    }
    let chain = &chains[at];
    let action = rule.action();
    let jumps = rule.jumps();
    let end = action
        .as_ref()
        .map(|(i, _)| *i)
        .or_else(|| jumps.first().map(|(i, _)| *i))
        .unwrap_or(rule.words.len());
    if !path.restrict(rule.families()) {
        return;
    }
    let matches = rule.matches(end);
    if !matches.is_empty() {
        path.matches
            .push(((!top).then(|| chain.name.clone()), matches));
    }
    path.destinations.extend(rule.destinations(end));
    path.excluded.extend(rule.excluded_destinations(end));
    if path.guard.is_none() {
        path.guard = rule.positive_mark(end);
    }
    if let Some((_, action)) = action {
        out.push(Reached {
            path,
            via: (!top).then(|| rule.text.clone()),
            chain: chain.name.clone(),
            action,
        });
        return;
    }
    for (_, target) in jumps {
        let Some(next_at) = chains
            .iter()
            .position(|c| c.family == chain.family && c.table == chain.table && c.name == target)
        else {
            continue;
        };
        if path.chains.contains(&target) {
            continue;
        }
        let mut inner_path = path.clone();
        inner_path.chains.push(target.clone());
        let mut guard = inner_path.guard.clone();
        for text in &chains[next_at].rules {
            let inner = NftRule::parse(text);
            if guard.is_none() {
                guard = inner.unmarked_return();
                if guard.is_some() {
                    continue;
                }
            }
            let mut next = inner_path.clone();
            next.guard = guard.clone();
            nft_reached(chains, next_at, &inner, next, false, steps, out);
        }
    }
}

fn classify_ruleset(
    ruleset: &str,
    ours: &Ours,
    policy: &Policy,
    iptables_nft_covered: &[Family],
    found: &mut Vec<Preceding>,
    steps: &mut usize,
) {
    let chains = parse_ruleset(ruleset);
    for (at, chain) in chains.iter().enumerate() {
        let agents_table = (chain.family.as_str(), chain.table.as_str()) == ours.nft_table;
        if agents_table && ours.xtables.is_none() {
            continue;
        }
        let Some(hook) = &chain.base else {
            continue;
        };
        // The nftables backend's table where the agent works in iptables: it runs at
        // srcnat + 10, after the agent's chain, on what that kept, by the config it was
        // written for, until removed after a successful sync.
        if agents_table {
            if hook.kind == "nat" && hook.hook == "postrouting" {
                found.push(Preceding {
                    place: format!("nft table {} {}", chain.family, chain.table),
                    position: format!(
                        "chain {} at priority {}, after the agent's {}: it runs on what the agent kept",
                        chain.name,
                        hook.priority_text,
                        ours.describe()
                    ),
                    order: Order::After,
                    rule: format!("table {} {}", chain.family, chain.table),
                    via: None,
                    expected: false,
                    effect: "the nftables backend's table, left where the agent no longer works: it decides traffic by the config it was written for until it is removed after a successful sync".into(),
                    leftover: true,
                });
            }
            continue;
        }
        if hook.kind != "nat" || hook.hook != "postrouting" {
            continue;
        }
        let families: Vec<Family> = match chain.family.as_str() {
            "ip" => vec![Family::V4],
            "ip6" => vec![Family::V6],
            "inet" => vec![Family::V4, Family::V6],
            _ => continue,
        };
        // iptables-nft's own base chain: read through iptables-nft-save already, unless
        // iptables-nft could not print the table (a native rule in it).
        let iptables_nft_postrouting = chain.table == "nat"
            && chain.name == "POSTROUTING"
            && matches!(chain.family.as_str(), "ip" | "ip6");
        if iptables_nft_postrouting && families.iter().all(|f| iptables_nft_covered.contains(f)) {
            continue;
        }
        // ... and where the agent works (iptables-nft), rules after its jump run later.
        let agent_here = iptables_nft_postrouting && ours.xtables == Some("nft");
        let agent_jump = if agent_here {
            chain
                .rules
                .iter()
                .position(|text| is_agent_nft_jump(text, ours))
        } else {
            None
        };
        let managed: Vec<FamilyPolicy> = families
            .iter()
            .filter_map(|f| policy.family(*f).cloned())
            .collect();
        if managed.is_empty() {
            continue;
        }
        let Some(priority) = hook.priority else {
            continue;
        };
        let named = if hook.priority_text == priority.to_string() {
            priority.to_string()
        } else {
            format!("{} ({priority})", hook.priority_text)
        };
        let (position, order) = match priority.cmp(&ours.priority) {
            _ if agent_here => (String::new(), Order::Before),
            std::cmp::Ordering::Less => (
                format!(
                    "at priority {named}, before the agent's {}",
                    ours.describe()
                ),
                Order::Before,
            ),
            std::cmp::Ordering::Equal => (
                format!(
                    "at priority {named}, the same as the agent's {}: same priority: order not defined",
                    ours.describe()
                ),
                Order::SamePriority,
            ),
            std::cmp::Ordering::Greater => (
                format!(
                    "at priority {named}, after the agent's {}: it runs on what the agent kept",
                    ours.describe()
                ),
                Order::After,
            ),
        };
        let place = format!(
            "nft table {} {} chain {}",
            chain.family, chain.table, chain.name
        );
        // kube-proxy's nftables mode, or its iptables mode as nft lists iptables-nft's table.
        let kube_proxy_table = matches!(chain.family.as_str(), "ip" | "ip6")
            && (chain.table == "kube-proxy" || chain.table == "nat");
        let mut guard = None;
        for (index, text) in chain.rules.iter().enumerate() {
            if agent_jump == Some(index) {
                continue;
            }
            let after = agent_jump.is_some_and(|at| index > at);
            let order = if after { Order::After } else { order };
            let position = if agent_here {
                match agent_jump {
                    Some(at) if after => format!(
                        "rule {}, after the agent's jump (rule {}; read through nft: iptables-nft cannot print this table): it runs on what the agent's chain RETURNs",
                        index + 1,
                        at + 1
                    ),
                    Some(at) => format!(
                        "rule {}, before the agent's jump (rule {}; read through nft: iptables-nft cannot print this table)",
                        index + 1,
                        at + 1
                    ),
                    None => format!(
                        "rule {}, before the agent's jump (absent when read; read through nft: iptables-nft cannot print this table)",
                        index + 1
                    ),
                }
            } else {
                position.clone()
            };
            let rule = NftRule::parse(text);
            if guard.is_none() {
                guard = rule.unmarked_return();
                if guard.is_some() {
                    continue;
                }
            }
            let mut reached = Vec::new();
            let path = Path {
                guard: guard.clone(),
                ..Path::default()
            };
            nft_reached(&chains, at, &rule, path, true, steps, &mut reached);
            for reach in reached {
                let kube_proxy = kube_proxy_table
                    && (chain.table == "kube-proxy" || reach.chain == "KUBE-POSTROUTING");
                // Only the families the path can carry (`meta nfproto ipv6 masquerade`
                // in an inet chain overrides nothing of IPv4).
                let reachable: Vec<FamilyPolicy> = managed
                    .iter()
                    .filter(|f| {
                        reach
                            .path
                            .families
                            .as_ref()
                            .is_none_or(|only| only.contains(&f.family))
                    })
                    .cloned()
                    .collect();
                if reachable.is_empty() {
                    continue;
                }
                let (expected, effect, overrides) = effect(&reach, kube_proxy, &reachable);
                if order == Order::After && !overrides {
                    continue;
                }
                found.push(Preceding {
                    place: place.clone(),
                    position: position.clone(),
                    order,
                    rule: text.clone(),
                    via: reach.via.map(|via| format!("{}: {via}", reach.chain)),
                    expected,
                    effect,
                    leftover: false,
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// What it overrides

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn list_prefixes(prefixes: &[IpNet]) -> String {
    let mut shown: Vec<String> = prefixes
        .iter()
        .take(MAX_PREFIXES_SHOWN)
        .map(ToString::to_string)
        .collect();
    if prefixes.len() > MAX_PREFIXES_SHOWN {
        shown.push(format!("and {} more", prefixes.len() - MAX_PREFIXES_SHOWN));
    }
    shown.join(", ")
}

/// Whether `reach` is kube-proxy's expected masquerade, and what it can override.
/// (expected, what it does to the agent's decisions, whether it can NAT a destination
/// the agent keeps).
fn effect(reach: &Reached, kube_proxy: bool, families: &[FamilyPolicy]) -> (bool, String, bool) {
    let path = &reach.path;
    if let (Some(mark), true, Action::Masquerade) = (&path.guard, kube_proxy, &reach.action) {
        return (
            true,
            format!("expected: kube-proxy masquerades only packets it marked ({mark})"),
            false,
        );
    }
    let mut lists: Vec<&str> = Vec::new();
    let mut kept: Vec<IpNet> = Vec::new();
    let mut source_scope = false;
    for family in families {
        match &family.resolved {
            None => {
                if !family.non_masq.0.is_empty() && !lists.contains(&"nonMasqueradeCIDRs") {
                    lists.push("nonMasqueradeCIDRs");
                }
                kept.extend(family.non_masq.0.iter().copied());
                if let Some(link_local) = family.link_local {
                    if !lists.contains(&"link-local") {
                        lists.push("link-local");
                    }
                    kept.push(link_local);
                }
            }
            Some(resolved) => {
                if !resolved.keep.is_empty() && !lists.contains(&"nonMasqueradeCIDRs/link-local") {
                    lists.push("nonMasqueradeCIDRs/link-local");
                }
                kept.extend(resolved.keep.iter().copied());
                source_scope |= resolved.sources.is_some() && !resolved.out_of_scope.is_empty();
            }
        }
    }
    let verb = reach.action.verb();
    let matching = if path.matches.is_empty() {
        "every packet".to_string()
    } else {
        let parts: Vec<String> = path
            .matches
            .iter()
            .map(|(chain, text)| match chain {
                Some(chain) => format!("`{text}` (in {chain})"),
                None => format!("`{text}`"),
            })
            .collect();
        format!("packets matching {}", parts.join(" then "))
    };
    let marked = match &path.guard {
        Some(mark) => format!("only packets marked {mark}: "),
        None => String::new(),
    };
    // A kept range is safe from this rule when the rule's destinations miss it, or when
    // a negated destination leaves all of it out.
    let outside_destinations = |k: &IpNet| {
        !path.destinations.is_empty() && !path.destinations.iter().any(|d| overlaps(d, k))
    };
    let left_out = |k: &IpNet| {
        path.excluded
            .iter()
            .any(|e| e.contains(&k.network()) && e.prefix_len() <= k.prefix_len())
    };
    let agrees = (!path.destinations.is_empty() || !path.excluded.is_empty())
        && !source_scope
        && kept.iter().all(|k| outside_destinations(k) || left_out(k));
    let overrides = (!kept.is_empty() || source_scope) && !agrees;
    let text = if kept.is_empty() && !source_scope {
        format!(
            "{marked}acts before the agent, but the config keeps no destination: it can {verb} only traffic the agent masquerades too, for {matching}"
        )
    } else if agrees && !path.destinations.is_empty() && path.excluded.is_empty() {
        format!(
            "{marked}overrides no decision to keep: its destinations ({}) are ones the agent masquerades too",
            list_prefixes(&path.destinations)
        )
    } else if agrees {
        format!(
            "{marked}overrides no decision to keep: it leaves out every kept destination (not {})",
            list_prefixes(&path.excluded)
        )
    } else {
        let mut what = Vec::new();
        if !kept.is_empty() {
            what.push(format!(
                "{} would keep ({})",
                lists.join("/"),
                list_prefixes(&kept)
            ));
        }
        if source_scope {
            what.push("masqueradeSourceCIDRs leaves out".to_string());
        }
        format!(
            "{marked}can {verb} traffic that {}, for {matching}",
            what.join(" or that ")
        )
    };
    (false, text, overrides)
}

#[cfg(test)]
mod tests;
