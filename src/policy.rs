//! The resolved decision per address family: which destination prefixes keep the
//! pod's source address, which sources are in scope, and how everything else is
//! masqueraded. Backends render this; `decide` answers the same question for one
//! address, for `explain` and for tests.
//!
//! Precedence is longest-prefix match among `nonMasqueradeCIDRs`, the link-local default
//! and `forceMasqueradeCIDRs`: the most specific prefix containing the destination wins
//! (a force prefix wins a tie with the link-local default; the same prefix in both
//! lists is a config error). A destination in none of them is masqueraded.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;

use crate::config::Config;
use crate::config::egress::{AddressRange, InterfacePattern};

pub const LINK_LOCAL_V4: &str = "169.254.0.0/16";
pub const LINK_LOCAL_V6: &str = "fe80::/10";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The lower-case name nft (`meta nfproto`) and metrics labels use.
    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    pub fn of_addr(address: IpAddr) -> Family {
        match address {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Address width in bits.
    pub fn bits(self) -> u32 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// An inclusive port range for `--to-ports`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn port_count(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// The `--to-ports` list, e.g. `1024-29999,32768-65535`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToPorts(pub Vec<PortRange>);

impl FromStr for ToPorts {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Ok(ToPorts::default());
        }
        let port = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{p:?} is not a port number from 1 to 65535")),
            }
        };
        let mut ranges = Vec::new();
        for part in text.split(',') {
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (port(a)?, port(b)?),
                None => (port(part)?, port(part)?),
            };
            if first > last {
                return Err(format!("port range {part:?} ends before it starts"));
            }
            ranges.push(PortRange { first, last });
        }
        Ok(ToPorts(ranges))
    }
}

impl fmt::Display for ToPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

/// One `--to-ports` range with the share of the remaining traffic it takes; the last
/// range of a protocol has no probability because it takes whatever is left.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WeightedRange {
    pub range: PortRange,
    pub probability: Option<f64>,
}

impl ToPorts {
    /// Splits new connections across the ranges in proportion to their sizes.
    pub fn weighted(&self) -> Vec<WeightedRange> {
        let mut remaining: u32 = self.0.iter().map(PortRange::port_count).sum();
        let count = self.0.len();
        self.0
            .iter()
            .enumerate()
            .map(|(i, range)| {
                let probability =
                    (i + 1 < count).then(|| f64::from(range.port_count()) / f64::from(remaining));
                remaining -= range.port_count();
                WeightedRange {
                    range: *range,
                    probability,
                }
            })
            .collect()
    }
}

/// Protocols whose source ports `--to-ports` rewrites.
pub const PORT_PROTOCOLS: [&str; 3] = ["tcp", "udp", "sctp"];

/// How traffic that is not kept is masqueraded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Masquerade {
    pub random_fully: bool,
    pub to_ports: ToPorts,
}

/// Destination prefixes of one family that keep the pod's address, in config order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NonMasqPrefixes(pub Vec<IpNet>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyPolicy {
    pub family: Family,
    /// The link-local prefix, kept unless masqLinkLocal(IPv6) is set; checked first.
    pub link_local: Option<IpNet>,
    pub non_masq: NonMasqPrefixes,
    /// forceMasqueradeCIDRs of this family, in config order.
    pub force: Vec<IpNet>,
    /// masqueradeSourceCIDRs of this family, in config order; None: every source.
    pub sources: Option<Vec<IpNet>>,
    /// The flat answer, present exactly when `force` or `sources` is: backends render it
    /// instead of upstream's layout, and never re-decide precedence themselves.
    pub resolved: Option<Resolved>,
    /// outputAddress(IPv6): masqueraded packets get SNAT to this instead of MASQUERADE.
    pub snat_to: Option<AddressRange>,
}

/// One family's lists resolved into disjoint sets that a backend can match directly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Destinations that keep the pod's address after longest-prefix match, as disjoint
    /// CIDR blocks in address order (link-local parts included).
    pub keep: Vec<IpNet>,
    /// Sources that may be masqueraded, merged into the fewest blocks; None: every source.
    pub sources: Option<Vec<IpNet>>,
    /// The complement of `sources`: the sources that always keep their address.
    pub out_of_scope: Vec<IpNet>,
}

/// Everything a backend needs to program one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub families: Vec<FamilyPolicy>,
    pub masquerade: Masquerade,
    /// outputInterface: only packets leaving through one of these are masqueraded (or
    /// SNATed); None: every interface; empty: none.
    pub out_interfaces: Option<Vec<InterfacePattern>>,
}

/// Flag-derived settings that shape the policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySettings {
    pub enable_ipv6: bool,
    pub masquerade: Masquerade,
}

/// Why an address keeps the pod's source address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepReason {
    LinkLocal,
    NonMasqueradeCidr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Leaves with the pod's address because of this prefix.
    Keep { prefix: IpNet, reason: KeepReason },
    /// Leaves with the node's address: no prefix of any list contains the destination.
    Masquerade,
    /// Leaves with the node's address because this forceMasqueradeCIDRs prefix is the
    /// most specific one containing the destination.
    Forced { prefix: IpNet },
    /// Keeps its source: the source is outside masqueradeSourceCIDRs.
    SourceOutOfScope,
    /// Keeps its source: it leaves through an interface outputInterface does not list.
    OtherInterface,
    /// The agent manages no rules for this family (IPv6 without --enable-ipv6).
    Unmanaged,
}

impl Decision {
    /// Whether the packet leaves with the node's address.
    pub fn masquerades(&self) -> bool {
        matches!(self, Decision::Masquerade | Decision::Forced { .. })
    }
}

/// The list a prefix comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum List {
    LinkLocal,
    NonMasquerade,
    ForceMasquerade,
}

impl fmt::Display for List {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            List::LinkLocal => "the link-local default",
            List::NonMasquerade => "nonMasqueradeCIDRs",
            List::ForceMasquerade => "forceMasqueradeCIDRs",
        })
    }
}

/// A prefix that contains an address, and its list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    pub prefix: IpNet,
    pub list: List,
}

/// Why `decide` decided: the winning prefix, the one it beat, and the source scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub decision: Decision,
    pub deciding: Option<Match>,
    pub runner_up: Option<Match>,
    /// None when no source was given or every source is in scope.
    pub source_in_scope: Option<bool>,
    /// How outputInterface bears on it: None when every interface masquerades, or the
    /// packet is not masqueraded anyway.
    pub interface: Option<InterfaceCheck>,
}

/// What outputInterface says of a packet the lists would masquerade.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InterfaceCheck {
    /// It leaves through this listed interface (the pattern that matched).
    Listed(InterfacePattern),
    /// It leaves through an interface the list does not name.
    NotListed,
    /// No interface was given: masqueraded only when it leaves through one of these.
    Only(Vec<InterfacePattern>),
}

impl Policy {
    pub fn new(config: &Config, settings: &PolicySettings) -> Policy {
        let of_family = |list: &[IpNet], family: Family| -> Vec<IpNet> {
            list.iter()
                .filter(|net| Family::of(net) == family)
                .copied()
                .collect()
        };
        let family_policy = |family: Family, link_local: &str, masq_link_local: bool| {
            let mut policy = FamilyPolicy {
                family,
                link_local: (!masq_link_local)
                    .then(|| link_local.parse().ok())
                    .flatten(),
                non_masq: NonMasqPrefixes(of_family(&config.non_masquerade_cidrs, family)),
                force: of_family(&config.force_masquerade_cidrs, family),
                sources: config
                    .masquerade_source_cidrs
                    .as_ref()
                    .map(|sources| of_family(sources, family)),
                resolved: None,
                snat_to: match family {
                    Family::V4 => config.output_address,
                    Family::V6 => config.output_address_ipv6,
                },
            };
            if !policy.force.is_empty() || policy.sources.is_some() {
                policy.resolved = Some(policy.resolve());
            }
            policy
        };
        let mut families = vec![family_policy(
            Family::V4,
            LINK_LOCAL_V4,
            config.masq_link_local,
        )];
        if settings.enable_ipv6 {
            families.push(family_policy(
                Family::V6,
                LINK_LOCAL_V6,
                config.masq_link_local_ipv6,
            ));
        }
        Policy {
            families,
            masquerade: settings.masquerade.clone(),
            // `+` (iptables' "any interface") among them: every interface, as absent.
            out_interfaces: config
                .output_interfaces
                .clone()
                .filter(|list| !list.iter().any(|p| p.prefix() == ("", true))),
        }
    }

    pub fn family(&self, family: Family) -> Option<&FamilyPolicy> {
        self.families.iter().find(|f| f.family == family)
    }

    /// What happens to a packet from a pod to `destination` (a non-local address).
    pub fn decide(&self, destination: IpAddr) -> Decision {
        self.explain(None, destination).decision
    }

    /// What happens to a packet from `source` (any source in scope when None) to
    /// `destination`, and why.
    pub fn explain(&self, source: Option<IpAddr>, destination: IpAddr) -> Explanation {
        self.explain_via(source, destination, None)
    }

    /// [`Policy::explain`] for a packet leaving through `interface` (None: not known;
    /// the answer then says which interfaces masquerade when outputInterface is set).
    pub fn explain_via(
        &self,
        source: Option<IpAddr>,
        destination: IpAddr,
        interface: Option<&str>,
    ) -> Explanation {
        let mut explanation = self.explain_by_lists(source, destination);
        let (Some(listed), true) = (&self.out_interfaces, explanation.decision.masquerades())
        else {
            return explanation;
        };
        explanation.interface = Some(match interface {
            Some(name) => match listed.iter().find(|pattern| pattern.matches(name)) {
                Some(pattern) => InterfaceCheck::Listed(pattern.clone()),
                None => {
                    explanation.decision = Decision::OtherInterface;
                    InterfaceCheck::NotListed
                }
            },
            None => InterfaceCheck::Only(listed.clone()),
        });
        explanation
    }

    /// The decision by the destination lists and the source scope alone.
    fn explain_by_lists(&self, source: Option<IpAddr>, destination: IpAddr) -> Explanation {
        let family = Family::of_addr(destination);
        let Some(policy) = self.family(family) else {
            return Explanation {
                decision: Decision::Unmanaged,
                deciding: None,
                runner_up: None,
                source_in_scope: None,
                interface: None,
            };
        };
        let matches = policy.matches(destination);
        let (deciding, runner_up) = (matches.first().copied(), matches.get(1).copied());
        let by_destination = match deciding {
            None => Decision::Masquerade,
            Some(Match {
                prefix,
                list: List::ForceMasquerade,
            }) => Decision::Forced { prefix },
            Some(Match {
                prefix,
                list: List::LinkLocal,
            }) => Decision::Keep {
                prefix,
                reason: KeepReason::LinkLocal,
            },
            Some(Match { prefix, .. }) => Decision::Keep {
                prefix,
                reason: KeepReason::NonMasqueradeCidr,
            },
        };
        let source_in_scope = match (&policy.sources, source) {
            (Some(sources), Some(source)) => {
                Some(sources.iter().any(|prefix| prefix.contains(&source)))
            }
            _ => None,
        };
        let decision = if source_in_scope == Some(false) && by_destination.masquerades() {
            Decision::SourceOutOfScope
        } else {
            by_destination
        };
        Explanation {
            decision,
            deciding,
            runner_up,
            source_in_scope,
            interface: None,
        }
    }
}

impl FamilyPolicy {
    /// Every prefix containing `destination`, the deciding one first: the longest; at
    /// equal length a force prefix beats the link-local default, and otherwise the one
    /// upstream's chain reaches first.
    pub fn matches(&self, destination: IpAddr) -> Vec<Match> {
        let mut found: Vec<(Match, usize)> = Vec::new();
        let listed = self
            .link_local
            .iter()
            .map(|p| (*p, List::LinkLocal))
            .chain(self.non_masq.0.iter().map(|p| (*p, List::NonMasquerade)))
            .chain(self.force.iter().map(|p| (*p, List::ForceMasquerade)));
        for (order, (prefix, list)) in listed.enumerate() {
            if prefix.contains(&destination)
                && !found
                    .iter()
                    .any(|(m, _)| m.prefix == prefix && m.list == list)
            {
                found.push((Match { prefix, list }, order));
            }
        }
        found.sort_by_key(|(m, order)| {
            (
                std::cmp::Reverse(m.prefix.prefix_len()),
                m.list != List::ForceMasquerade,
                *order,
            )
        });
        found.into_iter().map(|(m, _)| m).collect()
    }

    /// The flat answer: longest-prefix match over the three lists resolved into disjoint
    /// kept blocks, and the source scope merged and complemented.
    fn resolve(&self) -> Resolved {
        let bits = self.family.bits();
        let mut entries: Vec<(u128, u128, u8, u8, bool)> = Vec::new();
        let mut add = |prefix: &IpNet, rank: u8, keep: bool| {
            entries.push((
                to_u128(prefix.network()),
                to_u128(prefix.broadcast()),
                prefix.prefix_len(),
                rank,
                keep,
            ));
        };
        if let Some(prefix) = &self.link_local {
            add(prefix, 0, true);
        }
        for prefix in &self.non_masq.0 {
            add(prefix, 1, true);
        }
        for prefix in &self.force {
            add(prefix, 2, false);
        }
        // Prefixes nest or are disjoint; sorted by start, then outer before inner (and a
        // force prefix after a kept one of the same length, so it wins the tie), a stack
        // walk gives every address the verdict of its innermost prefix.
        entries.sort_unstable_by_key(|&(start, _, len, rank, _)| (start, len, rank));
        let mut kept: Vec<(u128, u128)> = Vec::new();
        let mut keep_span = |from: u128, to: u128, keep: bool| {
            if !keep || from > to {
                return;
            }
            match kept.last_mut() {
                Some(last) if last.1.checked_add(1) == Some(from) => last.1 = to,
                _ => kept.push((from, to)),
            }
        };
        // The next address without a verdict yet; None once past the end of the space.
        let mut cursor: Option<u128> = Some(0);
        let mut stack: Vec<(u128, bool)> = Vec::new();
        for (start, end, _, _, keep) in entries {
            while let Some(&(top_end, top_keep)) = stack.last() {
                if top_end >= start {
                    break;
                }
                if let Some(from) = cursor {
                    keep_span(from, top_end, top_keep);
                    cursor = cursor.map(|c| c.max(top_end.saturating_add(1)));
                }
                stack.pop();
            }
            if let Some(from) = cursor
                && from < start
            {
                if let Some(&(_, outer_keep)) = stack.last() {
                    keep_span(from, start - 1, outer_keep);
                }
                cursor = Some(start);
            }
            stack.push((end, keep));
        }
        while let Some((end, keep)) = stack.pop() {
            if let Some(from) = cursor
                && from <= end
            {
                keep_span(from, end, keep);
                cursor = end.checked_add(1);
            }
        }
        let mut keep = Vec::new();
        for (start, end) in kept {
            split_range(start, end, bits, self.family, &mut keep);
        }
        let sources = self.sources.as_ref().map(|s| merge_prefixes(s));
        let out_of_scope = sources
            .as_ref()
            .map(|s| complement(s, self.family))
            .unwrap_or_default();
        Resolved {
            keep,
            sources,
            out_of_scope,
        }
    }
}

/// Sorts, de-duplicates and merges overlapping or adjacent prefixes of one family into
/// the fewest prefixes covering the same addresses (nft refuses overlapping intervals).
pub fn merge_prefixes(prefixes: &[IpNet]) -> Vec<IpNet> {
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        let bits: u32 = if family == Family::V4 { 32 } else { 128 };
        for (start, end) in merged_ranges(prefixes, family) {
            split_range(start, end, bits, family, &mut out);
        }
    }
    out
}

/// The address ranges the prefixes of `family` cover (others are ignored), sorted and
/// merged where they overlap or touch: `(first, last)` as numbers.
pub fn merged_ranges(prefixes: &[IpNet], family: Family) -> Vec<(u128, u128)> {
    let mut ranges: Vec<(u128, u128)> = prefixes
        .iter()
        .filter(|p| Family::of(p) == family)
        .map(|p| (to_u128(p.network()), to_u128(p.broadcast())))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

fn to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(value: u128, family: Family) -> IpAddr {
    match family {
        // Values of the IPv4 family never exceed 32 bits.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(value as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(value)),
    }
}

/// Covers [start, end] with the fewest aligned prefixes.
pub fn split_range(mut start: u128, end: u128, bits: u32, family: Family, out: &mut Vec<IpNet>) {
    loop {
        let alignment = if start == 0 {
            bits
        } else {
            start.trailing_zeros().min(bits)
        };
        let span = end - start; // addresses left, minus one
        let fits = if span == u128::MAX {
            128
        } else {
            127 - (span + 1).leading_zeros()
        };
        let host_bits = alignment.min(fits).min(bits);
        // host_bits <= bits <= 128, so the prefix length fits in u8.
        let prefix_len = (bits - host_bits) as u8;
        if let Ok(net) = IpNet::new(from_u128(start, family), prefix_len) {
            out.push(net);
        }
        if host_bits >= 128 {
            return;
        }
        let size = 1u128 << host_bits;
        match start.checked_add(size) {
            Some(next) if next <= end && next > start => start = next,
            _ => return,
        }
    }
}

impl FamilyPolicy {
    /// The destinations that keep the pod address, merged into the fewest blocks: the
    /// flat answer, or upstream's link-local and non-masquerade lists.
    pub fn kept_blocks(&self) -> Vec<IpNet> {
        match &self.resolved {
            Some(resolved) => merge_prefixes(&resolved.keep),
            None => {
                let mut all: Vec<IpNet> = self.link_local.iter().copied().collect();
                all.extend(&self.non_masq.0);
                merge_prefixes(&all)
            }
        }
    }
}

/// Where the decisions for `family` differ between `old` and `new`, as CIDR blocks of
/// destinations; None when they may differ anywhere (the family was not managed before,
/// or the source scope changed).
pub fn changed_destinations(old: &Policy, new: &Policy, family: Family) -> Option<Vec<IpNet>> {
    let (before, after) = (old.family(family)?, new.family(family)?);
    // The source scope, the interfaces or the SNAT address: any destination may differ.
    if before.sources != after.sources
        || old.out_interfaces != new.out_interfaces
        || before.snat_to != after.snat_to
    {
        return None;
    }
    let ranges = |blocks: Vec<IpNet>| -> Vec<(u128, u128)> {
        blocks
            .iter()
            .map(|b| (to_u128(b.network()), to_u128(b.broadcast())))
            .collect()
    };
    let (a, b) = (ranges(before.kept_blocks()), ranges(after.kept_blocks()));
    let mut changed = subtract(&a, &b);
    changed.extend(subtract(&b, &a));
    changed.sort_unstable();
    let mut out = Vec::new();
    for (start, end) in changed {
        split_range(start, end, family.bits(), family, &mut out);
    }
    Some(merge_prefixes(&out))
}

/// The parts of the sorted, disjoint ranges `a` that no range of `b` covers: one walk
/// over both lists.
fn subtract(a: &[(u128, u128)], b: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out = Vec::new();
    let mut first = 0;
    for &(start, end) in a {
        // Ranges of `b` that end before this one starts can matter to no later one either.
        while b.get(first).is_some_and(|&(_, b_end)| b_end < start) {
            first += 1;
        }
        let mut from = Some(start);
        for &(b_start, b_end) in b[first..].iter().take_while(|(s, _)| *s <= end) {
            if let Some(f) = from
                && f < b_start
            {
                out.push((f, b_start - 1));
            }
            from = b_end.checked_add(1).filter(|next| *next <= end);
            if from.is_none() {
                break;
            }
        }
        if let Some(f) = from {
            out.push((f, end));
        }
    }
    out
}

/// The addresses of `family` outside the (merged, sorted) `prefixes`, as CIDR blocks.
pub fn complement(prefixes: &[IpNet], family: Family) -> Vec<IpNet> {
    let bits = family.bits();
    let last = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    let mut out = Vec::new();
    let mut cursor = Some(0u128);
    for prefix in merge_prefixes(prefixes) {
        let (start, end) = (to_u128(prefix.network()), to_u128(prefix.broadcast()));
        if let Some(from) = cursor
            && from < start
        {
            split_range(from, start - 1, bits, family, &mut out);
        }
        cursor = end.checked_add(1).filter(|next| *next <= last);
    }
    if let Some(from) = cursor {
        split_range(from, last, bits, family, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ParseOptions, parse};
    use std::path::Path;

    fn policy(yaml: &str, enable_ipv6: bool) -> Policy {
        let options = ParseOptions {
            enable_ipv6,
            ..ParseOptions::default()
        };
        let config = parse(yaml, Path::new("test"), options).unwrap().config;
        Policy::new(
            &config,
            &PolicySettings {
                enable_ipv6,
                ..PolicySettings::default()
            },
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn decides_like_the_chain_reads() {
        let p = policy("nonMasqueradeCIDRs: [10.0.0.0/8, 'fd00::/8']\n", true);
        assert_eq!(p.decide(ip("8.8.8.8")), Decision::Masquerade);
        assert_eq!(
            p.decide(ip("10.1.2.3")),
            Decision::Keep {
                prefix: "10.0.0.0/8".parse().unwrap(),
                reason: KeepReason::NonMasqueradeCidr
            }
        );
        assert_eq!(
            p.decide(ip("169.254.169.254")),
            Decision::Keep {
                prefix: LINK_LOCAL_V4.parse().unwrap(),
                reason: KeepReason::LinkLocal
            }
        );
        assert_eq!(p.decide(ip("192.168.1.1")), Decision::Masquerade);
        assert!(matches!(p.decide(ip("fd00::1")), Decision::Keep { .. }));
        assert!(matches!(
            p.decide(ip("fe80::1")),
            Decision::Keep {
                reason: KeepReason::LinkLocal,
                ..
            }
        ));
        assert_eq!(p.decide(ip("2001:db8::1")), Decision::Masquerade);
    }

    #[test]
    fn masq_link_local_drops_the_link_local_exception() {
        let p = policy("masqLinkLocal: true\nmasqLinkLocalIPv6: true\n", true);
        assert_eq!(p.decide(ip("169.254.1.1")), Decision::Masquerade);
        assert_eq!(p.decide(ip("fe80::1")), Decision::Masquerade);
    }

    #[test]
    fn ipv6_is_unmanaged_without_enable_ipv6() {
        let p = policy("", false);
        assert_eq!(p.families.len(), 1);
        assert_eq!(p.decide(ip("2001:db8::1")), Decision::Unmanaged);
    }

    #[test]
    fn to_ports_parse_and_weights() {
        let ports: ToPorts = "1024-29999,32768-65535".parse().unwrap();
        let weighted = ports.weighted();
        assert_eq!(
            weighted[0].probability.map(|p| p.to_string()).as_deref(),
            Some("0.469292562840114")
        );
        assert_eq!(weighted[1].probability, None);
        let three: ToPorts = "1000-1999,2000-2999,3000-3999".parse().unwrap();
        let w: Vec<Option<f64>> = three.weighted().iter().map(|w| w.probability).collect();
        assert_eq!(w, vec![Some(1.0 / 3.0), Some(0.5), None]);
        assert_eq!("80".parse::<ToPorts>().unwrap().to_string(), "80");
        for bad in ["0-10", "10-5", "a-b", "1-70000", "1024-", ","] {
            assert!(bad.parse::<ToPorts>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_readmes_worked_examples_decide_by_longest_prefix() {
        let p = policy(
            "nonMasqueradeCIDRs: [10.0.0.0/8, 10.3.9.0/24]\nforceMasqueradeCIDRs: [10.3.0.0/16, 169.254.169.254/32]\n",
            false,
        );
        let forced = |prefix: &str| Decision::Forced {
            prefix: prefix.parse().unwrap(),
        };
        assert_eq!(p.decide(ip("10.3.4.5")), forced("10.3.0.0/16"));
        assert!(matches!(p.decide(ip("10.4.0.1")), Decision::Keep { .. }));
        assert!(matches!(p.decide(ip("10.3.9.7")), Decision::Keep { .. }));
        assert_eq!(
            p.decide(ip("169.254.169.254")),
            forced("169.254.169.254/32")
        );
        assert!(matches!(
            p.decide(ip("169.254.1.1")),
            Decision::Keep {
                reason: KeepReason::LinkLocal,
                ..
            }
        ));
        let why = p.explain(None, ip("10.3.4.5"));
        assert_eq!(why.runner_up.map(|m| m.list), Some(List::NonMasquerade));
        // The flat answer keeps 10/8 minus 10.3/16 plus 10.3.9/24, and link-local minus one.
        let resolved = p.families[0].resolved.as_ref().unwrap();
        let kept = |a: &str| resolved.keep.iter().any(|n| n.contains(&ip(a)));
        assert!(kept("10.0.0.1") && kept("10.3.9.255") && kept("169.254.169.253"));
        assert!(!kept("10.3.0.1") && !kept("169.254.169.254") && !kept("8.8.8.8"));
    }

    #[test]
    fn a_source_scope_keeps_every_other_source() {
        let p = policy(
            "nonMasqueradeCIDRs: []\nmasqueradeSourceCIDRs: [10.244.0.0/16]\n",
            false,
        );
        assert_eq!(
            p.explain(Some(ip("10.244.1.2")), ip("203.0.113.10"))
                .decision,
            Decision::Masquerade
        );
        let outside = p.explain(Some(ip("198.51.100.9")), ip("10.244.1.2"));
        assert_eq!(outside.decision, Decision::SourceOutOfScope);
        assert_eq!(outside.source_in_scope, Some(false));
        let resolved = p.families[0].resolved.as_ref().unwrap();
        assert!(
            resolved
                .out_of_scope
                .iter()
                .all(|n| !n.contains(&ip("10.244.9.9")))
        );
        assert!(
            resolved
                .out_of_scope
                .iter()
                .any(|n| n.contains(&ip("198.51.100.9")))
        );
        // No key, no flat answer: backends keep upstream's layout.
        assert!(
            policy("nonMasqueradeCIDRs: [10.0.0.0/8]\n", true)
                .families
                .iter()
                .all(|f| f.resolved.is_none())
        );
    }

    #[test]
    fn changed_destinations_are_the_symmetric_difference_of_what_is_kept() {
        let a = policy("nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\n", true);
        let b = policy("nonMasqueradeCIDRs: [172.16.0.0/12, 10.0.0.0/8]\n", true);
        let nets =
            |list: &[&str]| -> Vec<IpNet> { list.iter().map(|s| s.parse().unwrap()).collect() };
        assert_eq!(
            changed_destinations(&a, &b, Family::V4),
            Some(nets(&["172.16.0.0/12", "192.168.0.0/16"]))
        );
        assert_eq!(changed_destinations(&a, &a, Family::V4), Some(Vec::new()));
        assert_eq!(changed_destinations(&a, &b, Family::V6), Some(Vec::new()));
        let forced = policy(
            "nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\nforceMasqueradeCIDRs: [10.3.0.0/16]\n",
            true,
        );
        assert_eq!(
            changed_destinations(&a, &forced, Family::V4),
            Some(nets(&["10.3.0.0/16"]))
        );
        let scoped = policy(
            "nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\nmasqueradeSourceCIDRs: [10.244.0.0/16]\n",
            true,
        );
        assert_eq!(changed_destinations(&a, &scoped, Family::V4), None);
        let v4_only = policy("nonMasqueradeCIDRs: [10.0.0.0/8]\n", false);
        assert_eq!(changed_destinations(&v4_only, &a, Family::V6), None);
        let everything = policy("nonMasqueradeCIDRs: ['0.0.0.0/0']\n", false);
        let nothing = policy("nonMasqueradeCIDRs: []\nmasqLinkLocal: true\n", false);
        assert_eq!(
            changed_destinations(&everything, &nothing, Family::V4),
            Some(nets(&["0.0.0.0/0"]))
        );
    }

    proptest::proptest! {
        /// The changed blocks hold exactly the addresses whose decision differs.
        #[test]
        fn changed_destinations_are_where_decisions_differ(
            a in proptest::collection::vec((0u32..64, 24u8..=30), 0..12),
            b in proptest::collection::vec((0u32..64, 24u8..=30), 0..12),
            probes in proptest::collection::vec(0u32..(64 * 256), 1..64),
        ) {
            let yaml = |list: &[(u32, u8)]| {
                let cidrs: Vec<String> = list
                    .iter()
                    .map(|(third, len)| {
                        IpNet::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, *third as u8, 0)), *len)
                            .map(|n| format!("'{}'", n.trunc()))
                            .unwrap_or_default()
                    })
                    .collect();
                format!("nonMasqueradeCIDRs: [{}]\n", cidrs.join(", "))
            };
            let (old, new) = (policy(&yaml(&a), false), policy(&yaml(&b), false));
            let changed = changed_destinations(&old, &new, Family::V4).unwrap();
            for probe in probes {
                let address = IpAddr::V4(std::net::Ipv4Addr::from(0x0A00_0000 | probe));
                let differs = old.decide(address).masquerades() != new.decide(address).masquerades();
                let listed = changed.iter().any(|n| n.contains(&address));
                proptest::prop_assert_eq!(differs, listed, "{}", address);
            }
        }
    }
}
