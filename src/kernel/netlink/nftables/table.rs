//! A table as the kernel should hold it ([`Table`]), the operations of one nf_tables
//! transaction that change it ([`Batch`], [`Op`]), and the comparison of what the kernel
//! holds with it ([`Comparison`], [`Found`]).
//!
//! The comparison is fed one object at a time (a set, an element, a chain, a rule), in
//! the order a dump delivers them, and keeps only what it needs to say how the kernel's
//! table differs: chains and sets are matched by name (the kernel lists them in creation
//! order, which says nothing), the rules of a chain in order (their order is their
//! meaning), a set's elements as a set. So its memory is bounded by the wanted table,
//! whatever someone else put into the kernel's.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::expr::{AnonymousSet, Expr, Rule, TYPE_IP6ADDR, TYPE_IPADDR};
use crate::policy::Family;

pub const SET_ANONYMOUS: u32 = 0x1;
pub const SET_CONSTANT: u32 = 0x2;
pub const SET_INTERVAL: u32 = 0x4;
pub const ELEMENT_INTERVAL_END: u32 = 0x1;
const CHAIN_BASE: u32 = 0x1;
/// More differences than this are summed up in one line.
const MAX_NOTES: usize = 12;
/// Elements of a set beyond what it should hold that are listed one by one for removal;
/// past this the set is flushed and refilled (and no more are kept in memory).
const MAX_EXTRA_ELEMENTS: usize = 4096;
/// What an anonymous set may hold before the reader stops keeping its elements.
pub const MAX_ANONYMOUS_ELEMENTS: usize = 256;
/// Chains and sets that are not the agent's kept by name for deletion per read; any
/// beyond are left for the next read (the first ones gone, it finds the rest).
const MAX_FOREIGN_OBJECTS: usize = 256;
/// Anonymous sets whose contents the reader keeps (the agent's table has one per
/// `--to-ports` rule).
const MAX_ANONYMOUS_SETS: usize = 64;

/// An `inet` table: its named sets (interval sets of addresses) and its chains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
}

/// An interval set of addresses of one family: `type ipv4_addr; flags interval`.
///
/// The kernel keeps such a set as interval boundaries ([`Boundary`]): a prefix is its
/// start and, flagged as an interval end, the address after it; a prefix that runs to
/// the end of the address space has no end element (nft marks its start "open" in the
/// element's user data, so it lists the prefix back). The kernel refuses overlapping
/// intervals. nft's `auto-merge` is nft's own doing (it merges in userspace before it
/// writes), not the kernel's: here the policy merges the prefixes first
/// (`policy::merge_prefixes`: sorted, no overlap, neighbours joined where they make one
/// prefix), so no two intervals overlap; two that only touch share a key, one element an
/// end and the other a start, which the kernel accepts as nft's own encoding does. nft
/// also puts an interval end at 0 before a set whose first interval starts later; the
/// kernel needs none (a key below every interval finds no start), so it is not written,
/// and one found is no difference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub family: Family,
    /// Sorted and disjoint (as `policy::merge_prefixes` leaves them).
    pub prefixes: Vec<IpNet>,
}

impl Set {
    pub fn key_type(&self) -> u32 {
        match self.family {
            Family::V4 => TYPE_IPADDR,
            Family::V6 => TYPE_IP6ADDR,
        }
    }

    pub fn key_len(&self) -> u32 {
        self.family.bits() / 8
    }
}

/// A chain; a base chain hooks into the packet path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

/// `type KIND hook HOOK priority PRIORITY; policy POLICY;`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseChain {
    pub kind: String,
    pub hook: u32,
    pub priority: i32,
    pub policy: u32,
}

pub const HOOK_POSTROUTING: u32 = 4;
pub const POLICY_ACCEPT: u32 = 1;

impl Table {
    pub fn empty(name: &str) -> Table {
        Table {
            name: name.to_string(),
            sets: Vec::new(),
            chains: Vec::new(),
        }
    }

    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| s.name == name)
    }

    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// True when `other` has the same chains and rules and the same sets (by name and
    /// family), whatever the sets hold: then only elements differ.
    pub fn same_frame(&self, other: &Table) -> bool {
        self.name == other.name && self.chains == other.chains && frame(self) == frame(other)
    }
}

/// A table's sets by name and family, in one order.
fn frame(table: &Table) -> Vec<(&str, Family)> {
    let mut sets: Vec<(&str, Family)> = table
        .sets
        .iter()
        .map(|s| (s.name.as_str(), s.family))
        .collect();
    sets.sort_by_key(|(name, _)| *name);
    sets
}

/// One element of an interval set as the kernel keeps it: the start of an interval, or
/// (flagged) the first address after one. Addresses of either family as a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Boundary {
    pub key: u128,
    pub end: bool,
}

fn address_number(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The start of `prefix`, and the address after it unless it runs to the end of the
/// address space.
pub fn interval(prefix: &IpNet) -> (u128, Option<u128>) {
    let start = address_number(prefix.network());
    let last = address_number(prefix.broadcast());
    let top = match prefix {
        IpNet::V4(_) => u128::from(u32::MAX),
        IpNet::V6(_) => u128::MAX,
    };
    (start, (last < top).then(|| last + 1))
}

/// A key of `family`'s width from its bytes (network order).
fn key_number(bytes: &[u8]) -> Option<u128> {
    match bytes.len() {
        4 => Some(u128::from(u32::from_be_bytes(bytes.try_into().ok()?))),
        16 => Some(u128::from_be_bytes(bytes.try_into().ok()?)),
        _ => None,
    }
}

/// A key's bytes for `family` (network order), without an allocation: a batch of
/// 50,000 prefixes writes 100,000 of them.
pub fn key_bytes(key: u128, family: Family) -> KeyBytes {
    let mut bytes = [0u8; 16];
    let len = match family {
        Family::V4 => {
            bytes[..4].copy_from_slice(&(key as u32).to_be_bytes());
            4
        }
        Family::V6 => {
            bytes = key.to_be_bytes();
            16
        }
    };
    KeyBytes { bytes, len }
}

/// A key as the kernel stores it: 4 or 16 bytes.
#[derive(Clone, Copy, Debug)]
pub struct KeyBytes {
    bytes: [u8; 16],
    len: usize,
}

impl std::ops::Deref for KeyBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// One operation of a transaction on the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Creates the table, or clears its flags (a dormant table is woken).
    NewTable,
    DelTable,
    /// Deletes every rule of every chain of the table.
    FlushRules,
    /// Declares a chain (its hook, for a base chain); its rules are `NewRule`s.
    NewChain(Chain),
    DelChain(String),
    /// Declares a set; kept as it is when it exists with the same declaration.
    NewSet(Set),
    DelSet(String),
    /// Deletes every element of a set.
    FlushSet(String),
    AddPrefixes {
        set: String,
        prefixes: Vec<IpNet>,
    },
    DelPrefixes {
        set: String,
        prefixes: Vec<IpNet>,
    },
    /// Deletes single elements, as the kernel holds them.
    DelElements {
        set: String,
        family: Family,
        elements: Vec<Boundary>,
    },
    /// Appends a rule (and the anonymous sets its lookups read) to a chain.
    NewRule {
        chain: String,
        rule: Rule,
    },
}

/// One nf_tables transaction on one `inet` table: every operation or none. With a
/// `generation`, the kernel refuses the whole batch if any commit happened since that
/// generation (the state the batch was computed from is gone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub table: String,
    pub generation: Option<u32>,
    pub ops: Vec<Op>,
}

/// How a commit ended when the kernel did not refuse an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    Done,
    /// Someone committed since the batch's generation: nothing was applied.
    GenerationMoved,
}

/// What a read of the kernel found: the generation it is consistent with, and the table
/// (None: there is no such table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub generation: u32,
    pub table: Option<Found>,
}

/// How the kernel's table compares with the wanted one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    pub flags: u32,
    pub chains: Vec<FoundChain>,
    pub sets: Vec<FoundSet>,
    /// The differences in words, `-` for what the kernel lacks, `+` for what it has but
    /// should not, `~` for what it has differently; at most [`MAX_NOTES`] and a count.
    pub notes: Vec<String>,
    /// Chains or sets that are not the agent's were left out past
    /// [`MAX_FOREIGN_OBJECTS`]: a repair from this read removes only the first ones,
    /// and the table must be read again after it.
    pub incomplete: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundChain {
    pub name: String,
    /// Wanted, and declared as wanted (base chain, hook, priority, policy).
    pub declared: bool,
    /// Holds exactly the wanted rules, in order.
    pub rules: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundSet {
    pub name: String,
    /// Wanted, and declared as wanted (flags, key type and length).
    pub declared: bool,
    pub elements: Elements,
}

/// How a set's elements compare with the wanted prefixes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Elements {
    Same,
    /// Deleting `extra` and adding `missing` makes them the same.
    Differ {
        extra: Vec<Boundary>,
        missing: Vec<IpNet>,
    },
    /// Too different to list (or not read): flush and refill.
    Refill,
}

impl Observed {
    /// True when the kernel holds exactly the wanted table.
    pub fn is_as_wanted(&self, want: &Table) -> bool {
        self.table
            .as_ref()
            .is_some_and(|found| found.is_as_wanted(want))
    }

    /// The differences in words (the table missing is one).
    pub fn differences(&self, want: &Table) -> Vec<String> {
        match &self.table {
            None => vec![format!("- table inet {}", want.name)],
            Some(found) => found.notes.clone(),
        }
    }
}

impl Found {
    pub fn is_as_wanted(&self, want: &Table) -> bool {
        self.flags == 0
            && self.chains.len() == want.chains.len()
            && self.chains.iter().all(|c| c.declared && c.rules)
            && self.sets.len() == want.sets.len()
            && self
                .sets
                .iter()
                .all(|s| s.declared && s.elements == Elements::Same)
    }

    pub fn chain(&self, name: &str) -> Option<&FoundChain> {
        self.chains.iter().find(|c| c.name == name)
    }

    pub fn set(&self, name: &str) -> Option<&FoundSet> {
        self.sets.iter().find(|s| s.name == name)
    }
}

/// The running comparison of a kernel table with the wanted one.
pub struct Comparison<'w> {
    want: &'w Table,
    found: Found,
    /// Notes beyond [`MAX_NOTES`].
    more: usize,
    /// Rules seen so far per wanted chain.
    rules_seen: BTreeMap<&'w str, usize>,
    /// Anonymous sets by name, for the lookups of rules.
    anonymous: BTreeMap<String, Option<AnonymousSet>>,
}

impl<'w> Comparison<'w> {
    /// Starts with the table's flags (0 unless, say, dormant).
    pub fn new(want: &'w Table, flags: u32) -> Comparison<'w> {
        let mut comparison = Comparison {
            want,
            found: Found {
                flags,
                ..Found::default()
            },
            more: 0,
            rules_seen: BTreeMap::new(),
            anonymous: BTreeMap::new(),
        };
        if flags != 0 {
            comparison.note(format!("~ table inet {} has flags {flags:#x}", want.name));
        }
        comparison
    }

    /// Chains and sets found that are not the agent's.
    fn foreign_objects(&self) -> usize {
        let foreign_chains = self
            .found
            .chains
            .iter()
            .filter(|c| self.want.chain(&c.name).is_none())
            .count();
        let foreign_sets = self
            .found
            .sets
            .iter()
            .filter(|s| self.want.set(&s.name).is_none())
            .count();
        foreign_chains + foreign_sets
    }

    fn note(&mut self, text: String) {
        if self.found.notes.len() < MAX_NOTES {
            self.found.notes.push(text);
        } else {
            self.more += 1;
        }
    }

    /// A set of the table. Returns whether its elements are worth reading: those of a
    /// wanted set declared as wanted, through [`Comparison::elements`].
    pub fn set(&mut self, name: &str, flags: u32, key_type: u32, key_len: u32) -> bool {
        if flags & SET_ANONYMOUS != 0 {
            // Past the cap a lookup names a set not known here: not the agent's rule.
            if self.anonymous.len() >= MAX_ANONYMOUS_SETS {
                return false;
            }
            self.anonymous.insert(
                name.to_string(),
                Some(AnonymousSet {
                    key_type,
                    key_len,
                    elements: Vec::new(),
                    typeof_meta: None,
                }),
            );
            return false;
        }
        let declared = match self.want.set(name) {
            Some(set) => {
                let same =
                    flags == SET_INTERVAL && key_type == set.key_type() && key_len == set.key_len();
                if !same {
                    self.note(format!(
                        "~ set {name}: declared differently (flags {flags:#x}, key type {key_type}, length {key_len})"
                    ));
                }
                same
            }
            None => {
                self.note(format!("+ set {name}"));
                if self.foreign_objects() >= MAX_FOREIGN_OBJECTS {
                    self.found.incomplete = true;
                    return false;
                }
                false
            }
        };
        self.found.sets.push(FoundSet {
            name: name.to_string(),
            declared,
            // Until its elements are read; a set not read is refilled.
            elements: Elements::Refill,
        });
        declared
    }

    /// Names of the anonymous sets seen, whose elements the rules' lookups need.
    pub fn anonymous_sets(&self) -> Vec<String> {
        self.anonymous.keys().cloned().collect()
    }

    /// An element of an anonymous set (its key); past [`MAX_ANONYMOUS_ELEMENTS`] the set
    /// is forgotten, and a rule reading it is not the agent's.
    pub fn anonymous_element(&mut self, set: &str, key: &[u8]) {
        if let Some(slot) = self.anonymous.get_mut(set)
            && let Some(contents) = slot
        {
            if contents.elements.len() >= MAX_ANONYMOUS_ELEMENTS {
                *slot = None;
            } else {
                contents.elements.push(key.to_vec());
            }
        }
    }

    /// The contents of an anonymous set by name.
    pub fn anonymous(&self, name: &str) -> Option<AnonymousSet> {
        self.anonymous.get(name).cloned().flatten()
    }

    /// Starts reading the elements of the wanted set `name`.
    pub fn elements(&self, name: &str) -> Option<ElementCheck<'w>> {
        self.want.set(name).map(ElementCheck::new)
    }

    /// The result of reading a set's elements.
    pub fn elements_read(&mut self, check: ElementCheck<'w>) {
        let name = check.set.name.clone();
        let (elements, notes) = check.finish();
        for note in notes {
            self.note(note);
        }
        if let Some(found) = self.found.sets.iter_mut().find(|s| s.name == name) {
            found.elements = elements;
        }
    }

    /// A chain of the table; `flags` as dumped (the base-chain bit is ignored).
    pub fn chain(&mut self, name: &str, base: Option<BaseChain>, flags: u32) {
        let declared = match self.want.chain(name) {
            Some(chain) => {
                let same = chain.base == base && flags & !CHAIN_BASE == 0;
                if !same {
                    let declared = match &base {
                        Some(b) => format!(
                            "type {} hook {} priority {} policy {}",
                            b.kind, b.hook, b.priority, b.policy
                        ),
                        None => "no hook".to_string(),
                    };
                    self.note(format!("~ chain {name}: declared differently ({declared})"));
                }
                same
            }
            None => {
                self.note(format!("+ chain {name}"));
                if self.foreign_objects() >= MAX_FOREIGN_OBJECTS {
                    self.found.incomplete = true;
                    return;
                }
                false
            }
        };
        self.found.chains.push(FoundChain {
            name: name.to_string(),
            declared,
            rules: true,
        });
    }

    /// The next rule of chain `chain`, as decoded (None: it could not be decoded).
    pub fn rule(&mut self, chain: &str, exprs: Option<&[Expr]>) {
        let Some(wanted) = self.want.chain(chain) else {
            return;
        };
        let seen = self.rules_seen.entry(wanted.name.as_str()).or_default();
        let index = *seen;
        *seen += 1;
        let same = match (wanted.rules.get(index), exprs) {
            (Some(rule), Some(exprs)) => rule.exprs == exprs,
            _ => false,
        };
        if !same {
            let note = match wanted.rules.get(index) {
                Some(rule) => format!("~ chain {chain}: rule {} is not `{}`", index + 1, rule.text),
                None => format!("+ chain {chain}: rule {}", index + 1),
            };
            self.note(note);
            self.mark_rules_differ(chain);
        }
    }

    fn mark_rules_differ(&mut self, chain: &str) {
        if let Some(found) = self.found.chains.iter_mut().find(|c| c.name == chain) {
            found.rules = false;
        }
    }

    /// What the kernel's table is, once everything was fed.
    pub fn finish(mut self) -> Found {
        let want = self.want;
        for chain in &want.chains {
            let present = self.found.chain(&chain.name).is_some();
            let seen = self
                .rules_seen
                .get(chain.name.as_str())
                .copied()
                .unwrap_or(0);
            if !present {
                self.note(format!("- chain {}", chain.name));
            } else if seen < chain.rules.len() {
                for rule in &chain.rules[seen..] {
                    self.note(format!("- chain {}: {}", chain.name, rule.text));
                }
                self.mark_rules_differ(&chain.name);
            }
        }
        for set in &want.sets {
            if self.found.set(&set.name).is_none() {
                self.note(format!("- set {}", set.name));
            }
        }
        if self.more > 0 {
            self.found
                .notes
                .push(format!("... and {} more differences", self.more));
        }
        self.found
    }
}

/// The elements of one wanted set, checked one at a time against its prefixes: a binary
/// search each, and a bit per boundary to tell what was seen.
pub struct ElementCheck<'w> {
    set: &'w Set,
    starts_seen: Vec<bool>,
    ends_seen: Vec<bool>,
    extra: Vec<Boundary>,
    /// Too many extras, or an element the agent never writes: flush and refill.
    refill: bool,
    extras_counted: usize,
}

impl<'w> ElementCheck<'w> {
    pub fn new(set: &'w Set) -> ElementCheck<'w> {
        ElementCheck {
            set,
            starts_seen: vec![false; set.prefixes.len()],
            ends_seen: vec![false; set.prefixes.len()],
            extra: Vec::new(),
            refill: false,
            extras_counted: 0,
        }
    }

    /// One element: its key (network order) and flags.
    pub fn element(&mut self, key: &[u8], flags: u32) {
        let number = match key_number(key) {
            Some(number) if key.len() as u32 == self.set.key_len() => number,
            // A key of another width, or a catch-all element (no key).
            _ => {
                self.refill = true;
                return;
            }
        };
        if flags & !ELEMENT_INTERVAL_END != 0 {
            self.refill = true;
            return;
        }
        let end = flags & ELEMENT_INTERVAL_END != 0;
        let prefixes = &self.set.prefixes;
        let found = if end {
            prefixes
                .binary_search_by(|p| match interval(p).1 {
                    Some(after) => after.cmp(&number),
                    // Only the last prefix can run to the end: it sorts last.
                    None => std::cmp::Ordering::Greater,
                })
                .ok()
                .map(|i| (i, &mut self.ends_seen))
        } else {
            prefixes
                .binary_search_by(|p| interval(p).0.cmp(&number))
                .ok()
                .map(|i| (i, &mut self.starts_seen))
        };
        match found {
            Some((i, seen)) if !seen[i] => seen[i] = true,
            // nft puts an interval end at 0 before a set whose first interval starts
            // later; it means nothing, so it is no difference.
            None if end && number == 0 && prefixes.first().is_none_or(|p| interval(p).0 != 0) => {}
            _ => {
                self.extras_counted += 1;
                if self.extra.len() < MAX_EXTRA_ELEMENTS {
                    self.extra.push(Boundary { key: number, end });
                } else {
                    self.refill = true;
                }
            }
        }
    }

    fn finish(self) -> (Elements, Vec<String>) {
        let name = &self.set.name;
        let missing: Vec<IpNet> = self
            .set
            .prefixes
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                !self.starts_seen[*i] || (interval(p).1.is_some() && !self.ends_seen[*i])
            })
            .map(|(_, p)| *p)
            .collect();
        let mut notes: Vec<String> = missing
            .iter()
            .take(MAX_NOTES)
            .map(|p| format!("- set {name}: element {p}"))
            .collect();
        if self.extras_counted > 0 {
            notes.push(format!(
                "+ set {name}: {} element(s) the config does not list",
                self.extras_counted
            ));
        }
        let elements = if self.refill {
            if notes.is_empty() {
                notes.push(format!("~ set {name}: elements the agent never writes"));
            }
            Elements::Refill
        } else if missing.is_empty() && self.extra.is_empty() {
            Elements::Same
        } else {
            Elements::Differ {
                extra: self.extra,
                missing,
            }
        };
        (elements, notes)
    }
}

#[cfg(test)]
mod tests {
    use super::super::expr::{self, Address};
    use super::*;

    /// What a read of a kernel holding `held` would find.
    fn compare_held(held: &Table, want: &Table, flags: u32) -> Found {
        let mut comparison = Comparison::new(want, flags);
        for set in &held.sets {
            let key_type = set.key_type();
            if comparison.set(&set.name, SET_INTERVAL, key_type, set.key_len())
                && let Some(mut check) = comparison.elements(&set.name)
            {
                for prefix in &set.prefixes {
                    let (start, after) = interval(prefix);
                    check.element(&key_bytes(start, set.family), 0);
                    if let Some(after) = after {
                        check.element(&key_bytes(after, set.family), ELEMENT_INTERVAL_END);
                    }
                }
                comparison.elements_read(check);
            }
        }
        for chain in &held.chains {
            comparison.chain(&chain.name, chain.base.clone(), 0);
        }
        for chain in &held.chains {
            for rule in &chain.rules {
                comparison.rule(&chain.name, Some(&rule.exprs));
            }
        }
        comparison.finish()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn table(v4: &[&str], v6: Option<&[&str]>) -> Table {
        let mut sets = vec![Set {
            name: "non-masq-v4".into(),
            family: Family::V4,
            prefixes: nets(v4),
        }];
        if let Some(v6) = v6 {
            sets.push(Set {
                name: "non-masq-v6".into(),
                family: Family::V6,
                prefixes: nets(v6),
            });
        }
        Table {
            name: "t".into(),
            sets,
            chains: vec![Chain {
                name: "masq-v4".into(),
                base: None,
                rules: vec![Rule::of([
                    expr::address_in_set(Family::V4, Address::Destination, "non-masq-v4", false),
                    expr::return_verdict(),
                ])],
            }],
        }
    }

    #[test]
    fn sets_and_chains_compare_whatever_their_order() {
        let want = table(&["10.0.0.0/8"], Some(&["fd00::/8"]));
        let mut held = want.clone();
        held.sets.reverse();
        let found = compare_held(&held, &want, 0);
        assert!(found.is_as_wanted(&want), "{:?}", found.notes);
        assert!(found.notes.is_empty());
    }

    #[test]
    fn missing_and_extra_elements_are_the_delta_to_apply() {
        let want = table(&["10.0.0.0/8", "192.168.0.0/16", "255.255.255.0/24"], None);
        let held = table(&["10.0.0.0/8", "172.16.0.0/12", "255.255.255.0/24"], None);
        let found = compare_held(&held, &want, 0);
        assert!(!found.is_as_wanted(&want));
        let set = found.set("non-masq-v4").unwrap();
        assert_eq!(
            set.elements,
            Elements::Differ {
                extra: vec![
                    Boundary {
                        key: 0xAC10_0000,
                        end: false
                    },
                    Boundary {
                        key: 0xAC20_0000,
                        end: true
                    }
                ],
                missing: nets(&["192.168.0.0/16"]),
            }
        );
        assert!(
            found
                .notes
                .contains(&"- set non-masq-v4: element 192.168.0.0/16".to_string())
        );
    }

    #[test]
    fn nfts_leading_interval_end_at_zero_is_no_difference_and_adjacent_prefixes_share_a_key() {
        let want = table(&["10.0.0.0/23", "10.0.2.0/24"], None);
        let mut comparison = Comparison::new(&want, 0);
        assert!(comparison.set("non-masq-v4", SET_INTERVAL, TYPE_IPADDR, 4));
        let mut check = comparison.elements("non-masq-v4").unwrap();
        // As the kernel dumps nft's encoding: highest first, with the end at 0.
        for (key, flags) in [
            ([10, 0, 3, 0], 1),
            ([10, 0, 2, 0], 0),
            ([10, 0, 2, 0], 1),
            ([10, 0, 0, 0], 0),
            ([0, 0, 0, 0], 1),
        ] {
            check.element(&key, flags);
        }
        comparison.elements_read(check);
        comparison.chain("masq-v4", None, 0);
        comparison.rule("masq-v4", Some(&want.chains[0].rules[0].exprs));
        let found = comparison.finish();
        assert!(found.is_as_wanted(&want), "{:?}", found.notes);
    }

    #[test]
    fn a_catch_all_element_or_a_foreign_rule_is_a_difference() {
        let want = table(&["10.0.0.0/8"], None);
        let mut comparison = Comparison::new(&want, 0);
        comparison.set("non-masq-v4", SET_INTERVAL, TYPE_IPADDR, 4);
        let mut check = comparison.elements("non-masq-v4").unwrap();
        check.element(&[10, 0, 0, 0], 0);
        check.element(&[11, 0, 0, 0], 1);
        check.element(&[], 2);
        comparison.elements_read(check);
        comparison.chain("masq-v4", None, 0);
        comparison.rule("masq-v4", Some(&want.chains[0].rules[0].exprs));
        comparison.rule(
            "masq-v4",
            Some(&[Expr::Other {
                name: "counter".into(),
            }]),
        );
        comparison.chain("extra", None, 0);
        let found = comparison.finish();
        assert_eq!(found.set("non-masq-v4").unwrap().elements, Elements::Refill);
        assert!(!found.chain("masq-v4").unwrap().rules);
        assert!(!found.chain("extra").unwrap().declared);
        assert!(
            found.notes.contains(&"+ chain masq-v4: rule 2".to_string()),
            "{:?}",
            found.notes
        );
        assert!(found.notes.contains(&"+ chain extra".to_string()));
    }

    #[test]
    fn a_missing_rule_set_or_chain_and_a_dormant_table_are_differences() {
        let want = table(&["10.0.0.0/8"], Some(&[]));
        let mut held = want.clone();
        held.chains[0].rules.clear();
        held.sets.pop();
        let found = compare_held(&held, &want, 1);
        assert!(!found.is_as_wanted(&want));
        assert_eq!(
            found.notes,
            [
                "~ table inet t has flags 0x1",
                "- chain masq-v4: ip daddr @non-masq-v4 return",
                "- set non-masq-v6",
            ]
        );
        let found = compare_held(&Table::empty("t"), &want, 0);
        assert!(found.notes.contains(&"- chain masq-v4".to_string()));
    }

    #[test]
    fn what_is_kept_of_others_objects_is_bounded() {
        let want = table(&["10.0.0.0/8"], None);
        let mut comparison = Comparison::new(&want, 0);
        for i in 0..10_000 {
            comparison.chain(&format!("intruder-{i}"), None, 0);
            comparison.set(&format!("foreign-{i}"), SET_INTERVAL, TYPE_IPADDR, 4);
        }
        let found = comparison.finish();
        assert_eq!(found.chains.len() + found.sets.len(), MAX_FOREIGN_OBJECTS);
        assert!(found.notes.len() <= MAX_NOTES + 1);
        assert!(!found.is_as_wanted(&want));
    }

    #[test]
    fn intervals_run_to_the_end_of_the_address_space() {
        assert_eq!(
            interval(&"255.255.255.0/24".parse().unwrap()),
            (0xFFFF_FF00, None)
        );
        assert_eq!(interval(&"0.0.0.0/0".parse().unwrap()), (0, None));
        assert_eq!(interval(&"::/1".parse().unwrap()), (0, Some(1 << 127)));
        assert_eq!(*key_bytes(0x0A00_0000, Family::V4), [10, 0, 0, 0]);
    }
}
