//! Config changes reach flows that already exist. NAT is decided on a flow's first
//! packet, so after a change a UDP flow that keeps sending (DNS to a fixed server, a
//! metrics push, QUIC) would keep its old decision for as long as it lives. After a sync
//! that changed the policy, the entries of the agent's UDP flows whose decision changed
//! and whose NAT state disagrees with the new decision are deleted, so their next packet
//! is decided by the new rules. TCP and SCTP flows are left alone (deleting them would
//! break established connections) but counted.
//!
//! Which flows are the agent's ([`judge`]): those whose packets the agent's jump
//! (`POSTROUTING ... ! --dst-type LOCAL`) handed to its chain and that nobody else
//! translated:
//! - the default conntrack zone only (other zones are others' datapaths: a VRF, OVS, a
//!   CNI's own tracking);
//! - not destination-NATed (the `DST_NAT` status bit, or a reply that does not come from
//!   the original destination): a Service or NodePort flow is kube-proxy's, and deleting
//!   it could send its next packet to another backend;
//! - not locally destined: the original destination is not one of the node's local
//!   addresses (the `local` routes of the kernel's `local` table: its addresses and
//!   loopback), which the jump never passes to the chain;
//! - its source either kept, or rewritten to a node address (what MASQUERADE does). A
//!   rewrite to any other address is someone else's SNAT (an egress gateway, a NAT
//!   pool, NETMAP), never ours to undo. Someone else's MASQUERADE to a node address
//!   (Docker's, a CNI's) cannot be told from the agent's by the entry, and is judged
//!   like it: at worst such an entry is deleted and its next packet gets the same
//!   translation again.
//!
//! Host-originated flows to remote addresses pass the jump too (upstream's rules
//! masquerade them as well), so they are re-decided like pods' flows.
//!
//! outputInterface and outputAddress(IPv6) change decisions too. A flow's decision is
//! then "kept", "masqueraded" or "SNATed to outputAddress"; a rewrite to an address of
//! the old or new outputAddress range counts as the agent's (a floating address need not
//! be on the node). conntrack does not record the interface a flow leaves by, so while
//! any outputInterface list is set the agent asks the routing table where the flow
//! leaves, as `ip route get DST from SRC iif IFACE` answers for a forwarded packet (the
//! interface its source is reached by standing for the one it came in on; a few netlink
//! lookups per source and destination, cached per pass): rules that route by source
//! (policy routing of pod traffic) are followed, marks are not. A flow whose interface
//! cannot be found is left alone.
//!
//! The table is read through ctnetlink ([`crate::kernel::Runner::conntrack_dump`]): one
//! streamed dump per family, entries decided one at a time as they arrive and never
//! collected; the entries to delete are held at most [`DELETE_CHUNK`] at a time and
//! deleted in batches while the dump goes on. Memory is bounded by that chunk, one
//! receive buffer and the node's local routes, whatever the size of the table.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::ControlFlow;

use ipnet::IpNet;

use crate::backend::{Doing, SyncError};
use crate::config::egress::AddressRange;
use crate::kernel::netlink::conntrack::{IPPROTO_UDP, IPS_DST_NAT};
use crate::kernel::{ConntrackDumpFilter, ConntrackEntry, ConntrackKey, SharedRunner, ToolError};
use crate::policy::{Family, Policy, changed_destinations, merged_ranges};

/// The most entries to delete held at once: deleted (in datagrams of 128) as soon as
/// this many are found, while the dump goes on.
pub const DELETE_CHUNK: usize = 512;

/// `--conntrack-cleanup`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ConntrackCleanup {
    /// Delete the entries of UDP flows whose decision changed.
    #[default]
    Udp,
    /// Touch no conntrack entry.
    None,
}

/// What one pass over the table does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Deletes the UDP entries that carry the old decision and counts the others.
    Reconcile,
    /// Only counts the flows that still carry the old decision (the stale gauge's
    /// refresh): deletes nothing.
    CountOnly,
}

/// Sorted, disjoint address ranges of one family, for a binary search per entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressRanges(Vec<(u128, u128)>);

fn number(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl AddressRanges {
    /// The ranges of `prefixes` of `family` (others are ignored), merged.
    pub fn new(prefixes: &[IpNet], family: Family) -> AddressRanges {
        let mut merged = merged_ranges(prefixes, family);
        merged.shrink_to_fit();
        AddressRanges(merged)
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let n = number(address);
        let after = self.0.partition_point(|(start, _)| *start <= n);
        after > 0 && self.0[after - 1].1 >= n
    }
}

/// What a pass knows about one family besides the policies.
pub struct Scope<'a> {
    /// The node's local addresses (the `local` routes).
    pub local: AddressRanges,
    /// Where the decisions changed; None: anywhere (the source scope, the interfaces or
    /// the SNAT address changed).
    pub changed: Option<AddressRanges>,
    /// Which interface a flow to a destination leaves by (asked only while an
    /// outputInterface list is set in the old or new decisions).
    pub egress: EgressLookup<'a>,
}

/// The interface the routing table sends a destination to, cached per destination (at
/// most [`EGRESS_CACHE`] of them; beyond, each is asked again).
pub struct EgressLookup<'a> {
    lookup: Option<&'a dyn Fn(IpAddr, IpAddr) -> Option<String>>,
    /// By (source, destination).
    cache: RefCell<BTreeMap<(IpAddr, IpAddr), Option<String>>>,
}

/// Destinations whose egress interface a pass remembers.
const EGRESS_CACHE: usize = 4096;

impl<'a> EgressLookup<'a> {
    /// `lookup(source, destination)`.
    pub fn new(lookup: &'a dyn Fn(IpAddr, IpAddr) -> Option<String>) -> EgressLookup<'a> {
        EgressLookup {
            lookup: Some(lookup),
            cache: RefCell::new(BTreeMap::new()),
        }
    }

    /// No lookup: a flow whose decision depends on its interface is left alone.
    pub fn none() -> EgressLookup<'static> {
        EgressLookup {
            lookup: None,
            cache: RefCell::new(BTreeMap::new()),
        }
    }

    fn interface(&self, source: IpAddr, destination: IpAddr) -> Option<String> {
        let lookup = self.lookup?;
        if let Some(known) = self.cache.borrow().get(&(source, destination)) {
            return known.clone();
        }
        let found = lookup(source, destination);
        let mut cache = self.cache.borrow_mut();
        if cache.len() < EGRESS_CACHE {
            cache.insert((source, destination), found.clone());
        }
        found
    }
}

/// What a decision does to a flow's source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Keep,
    /// MASQUERADE (None) or SNAT to outputAddress(IPv6).
    Translate(Option<AddressRange>),
}

/// Why an entry is not the agent's to re-decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotOurs {
    OtherZone,
    DestinationNat,
    LocalDestination,
    OthersSourceNat,
}

/// What the agent makes of one entry after a change from the decisions `olds` (one, or
/// several when changes piled up while a pass ran: a flow may carry any of them) to `new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    NotOurs(NotOurs),
    /// The agent's; its decision did not change.
    Unchanged,
    /// The agent's; its decision changed and its NAT state already follows the new one.
    Agrees,
    /// The agent's; its decision changed and it still carries the old one.
    CarriesOldDecision,
}

/// Decides one entry (see the module's documentation for which flows are the agent's).
/// Its decision changed when some policy of `olds` decides it otherwise than `new`; it
/// carries the old decision when its NAT state disagrees with `new`'s.
pub fn judge(entry: &ConntrackEntry, olds: &[Policy], new: &Policy, scope: &Scope<'_>) -> Verdict {
    let (original, reply) = (&entry.original, &entry.reply);
    if entry.zone != 0 {
        return Verdict::NotOurs(NotOurs::OtherZone);
    }
    if entry.status & IPS_DST_NAT != 0
        || reply.source != original.destination
        || reply.source_port != original.destination_port
    {
        return Verdict::NotOurs(NotOurs::DestinationNat);
    }
    if scope.local.contains(original.destination) {
        return Verdict::NotOurs(NotOurs::LocalDestination);
    }
    let rewritten =
        reply.destination != original.source || reply.destination_port != original.source_port;
    let family = Family::of_addr(original.destination);
    let snat_range = |policy: &Policy| policy.family(family).and_then(|f| f.snat_to);
    let ours_to = |address: IpAddr| {
        std::iter::once(new)
            .chain(olds)
            .filter_map(snat_range)
            .any(|range| range.contains(address))
    };
    if rewritten && !scope.local.contains(reply.destination) && !ours_to(reply.destination) {
        return Verdict::NotOurs(NotOurs::OthersSourceNat);
    }
    if let Some(changed) = &scope.changed
        && !changed.contains(original.destination)
    {
        return Verdict::Unchanged;
    }
    // outputInterface in any of the decisions: the decision depends on where it leaves.
    let interface = if std::iter::once(new)
        .chain(olds)
        .any(|policy| policy.out_interfaces.is_some())
    {
        match scope
            .egress
            .interface(original.source, original.destination)
        {
            Some(name) => Some(name),
            None => return Verdict::Unchanged,
        }
    } else {
        None
    };
    let outcome = |policy: &Policy| {
        let masquerades = policy
            .explain_via(
                Some(original.source),
                original.destination,
                interface.as_deref(),
            )
            .decision
            .masquerades();
        if masquerades {
            Outcome::Translate(snat_range(policy))
        } else {
            Outcome::Keep
        }
    };
    let after = outcome(new);
    if olds.iter().all(|old| outcome(old) == after) {
        return Verdict::Unchanged;
    }
    // Whether the entry already carries the new decision.
    let agrees = match after {
        Outcome::Keep => !rewritten,
        Outcome::Translate(Some(range)) => rewritten && range.contains(reply.destination),
        // MASQUERADE to the interface's address: not to an old outputAddress.
        Outcome::Translate(None) => {
            rewritten
                && !olds
                    .iter()
                    .filter_map(snat_range)
                    .any(|range| range.contains(reply.destination))
        }
    };
    if agrees {
        Verdict::Agrees
    } else {
        Verdict::CarriesOldDecision
    }
}

/// Entries left alone as not the agent's, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotOursCounts {
    pub other_zone: u64,
    pub destination_nat: u64,
    pub local_destination: u64,
    pub others_source_nat: u64,
}

impl NotOursCounts {
    fn count(&mut self, why: NotOurs) {
        match why {
            NotOurs::OtherZone => self.other_zone += 1,
            NotOurs::DestinationNat => self.destination_nat += 1,
            NotOurs::LocalDestination => self.local_destination += 1,
            NotOurs::OthersSourceNat => self.others_source_nat += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.other_zone + self.destination_nat + self.local_destination + self.others_source_nat
    }
}

/// What a pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// UDP entries deleted.
    pub deleted_udp: usize,
    /// UDP entries that were gone by the time their delete arrived.
    pub gone_udp: usize,
    /// Flows (by protocol) that still carry the old decision and were left alone.
    pub stale: Vec<(String, usize)>,
    /// Entries the kernel sent (after its own filtering).
    pub examined: u64,
    pub not_ours: NotOursCounts,
    /// Dump requests sent (one per family the change touched; two when a kernel
    /// refused the filters).
    pub dumps: u32,
    /// Delete datagrams sent (one netlink round trip each).
    pub delete_datagrams: u64,
    /// Whether the kernel was asked to filter zones and DNAT out.
    pub kernel_filtered: bool,
}

impl Reconciled {
    fn count_stale(&mut self, protocol: u8) {
        let name = protocol_name(protocol);
        match self.stale.iter_mut().find(|(p, _)| p == name) {
            Some((_, count)) => *count += 1,
            None => self.stale.push((name.to_string(), 1)),
        }
    }

    /// Flows left carrying the old decision, all protocols.
    pub fn stale_total(&self) -> usize {
        self.stale.iter().map(|(_, n)| n).sum()
    }
}

/// The protocol's name as the gauge's label shows it.
pub fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        33 => "dccp",
        47 => "gre",
        58 => "icmpv6",
        132 => "sctp",
        136 => "udplite",
        _ => "other",
    }
}

/// Deletes the held entries and forgets them.
fn flush(
    runner: &SharedRunner,
    pending: &mut Vec<ConntrackKey>,
    result: &mut Reconciled,
) -> Result<(), SyncError> {
    if pending.is_empty() {
        return Ok(());
    }
    let report = runner
        .conntrack_delete(pending)
        .doing(|| format!("deleting {} conntrack entries", pending.len()))?;
    pending.clear();
    result.deleted_udp += usize::try_from(report.deleted).unwrap_or(usize::MAX);
    result.gone_udp += usize::try_from(report.gone).unwrap_or(usize::MAX);
    result.delete_datagrams += report.datagrams;
    if report.refused > 0 {
        return Err(SyncError::Tool {
            doing: "deleting conntrack entries".into(),
            error: ToolError::Kernel {
                what: format!("{} delete(s) refused", report.refused),
                message: report.first_refusal.unwrap_or_default(),
            },
        });
    }
    Ok(())
}

/// One pass over the conntrack table after a change from `olds` to `new`: for each
/// family whose decisions changed somewhere, reads the node's local addresses, streams
/// the table, and (in a [`Pass::Reconcile`]) deletes the agent's UDP entries that carry
/// the old decision, counting the other protocols' as stale. A family whose decisions
/// did not change is not read at all.
pub fn reconcile(
    olds: &[Policy],
    new: &Policy,
    mode: ConntrackCleanup,
    pass: Pass,
    runner: &SharedRunner,
) -> Result<Reconciled, SyncError> {
    let mut result = Reconciled::default();
    if mode == ConntrackCleanup::None {
        return Ok(result);
    }
    for family in new.families.iter().map(|f| f.family) {
        let mut blocks: Option<Vec<IpNet>> = Some(Vec::new());
        for old in olds {
            blocks = match (blocks, changed_destinations(old, new, family)) {
                (Some(mut all), Some(more)) => {
                    all.extend(more);
                    Some(all)
                }
                _ => None,
            };
        }
        let changed = match blocks {
            Some(blocks) if blocks.is_empty() => continue,
            Some(blocks) => Some(AddressRanges::new(&blocks, family)),
            None => None,
        };
        let local = runner
            .local_prefixes(family)
            .doing(|| format!("reading the node's {family} local addresses"))?;
        let route = |source: IpAddr, destination: IpAddr| {
            runner
                .egress_interface(destination, Some(source))
                .ok()
                .flatten()
        };
        let scope = Scope {
            local: AddressRanges::new(&local, family),
            changed,
            egress: EgressLookup::new(&route),
        };
        let filter = ConntrackDumpFilter {
            zone: Some(0),
            without_status: IPS_DST_NAT,
        };
        let mut pending: Vec<ConntrackKey> = Vec::with_capacity(DELETE_CHUNK);
        let mut failure = None;
        let dumped = runner.conntrack_dump(family, &filter, &mut |entry| {
            match judge(entry, olds, new, &scope) {
                Verdict::NotOurs(why) => result.not_ours.count(why),
                Verdict::Unchanged | Verdict::Agrees => {}
                Verdict::CarriesOldDecision
                    if entry.protocol == IPPROTO_UDP && pass == Pass::Reconcile =>
                {
                    pending.push(entry.key());
                    if pending.len() >= DELETE_CHUNK
                        && let Err(err) = flush(runner, &mut pending, &mut result)
                    {
                        failure = Some(err);
                        return ControlFlow::Break(());
                    }
                }
                Verdict::CarriesOldDecision => result.count_stale(entry.protocol),
            }
            ControlFlow::Continue(())
        });
        let report = dumped.doing(|| format!("reading the {family} conntrack table"))?;
        result.examined += report.entries;
        result.dumps += report.requests;
        result.kernel_filtered |= report.kernel_filtered;
        if let Some(err) = failure {
            return Err(err);
        }
        flush(runner, &mut pending, &mut result)?;
    }
    Ok(result)
}

#[cfg(test)]
mod tests;
