//! Config changes reach flows that already exist. NAT is decided on a flow's first
//! packet, so after a change a UDP flow that keeps sending (DNS to a fixed server, a
//! metrics push, QUIC) would keep its old decision for as long as it lives. After a sync
//! that changed the policy, the entries of UDP flows whose decision changed and whose NAT
//! state disagrees with the new decision are deleted, so their next packet is decided by
//! the new rules. TCP and SCTP flows are left alone (deleting them would break
//! established connections) but counted.
//!
//! Through conntrack-tools (`conntrack -L` / `conntrack -D`), spawned like every tool via
//! the runner: no netlink code in the agent, and the tool ships in the image.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::backend::{Doing, SyncError};
use crate::kernel::{Program, SharedRunner};
use crate::policy::{Family, Policy, changed_destinations};

/// Up to this many changed blocks are listed one filtered `conntrack -L` each; more, and
/// one listing of the whole table is cheaper.
const MAX_FILTERED_LISTINGS: usize = 16;

/// `--conntrack-cleanup`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ConntrackCleanup {
    /// Delete the entries of UDP flows whose decision changed.
    #[default]
    Udp,
    /// Touch no conntrack entry.
    None,
}

/// One conntrack entry, as `conntrack -L` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub protocol: String,
    pub source: IpAddr,
    pub destination: IpAddr,
    pub source_port: Option<u16>,
    pub destination_port: Option<u16>,
    /// The reply direction's destination and port: where replies go after NAT.
    pub reply_destination: IpAddr,
    pub reply_destination_port: Option<u16>,
}

impl Flow {
    /// Whether the flow's source was rewritten (masqueraded or otherwise SNATed).
    pub fn is_source_natted(&self) -> bool {
        self.reply_destination != self.source || self.reply_destination_port != self.source_port
    }
}

/// Parses one line of `conntrack -L` (plain or `-o extended`); None for lines that are not
/// entries (the summary, protocols without addresses).
pub fn parse_flow(line: &str) -> Option<Flow> {
    let mut words = line.split_whitespace();
    let mut protocol = words.next()?;
    if protocol == "ipv4" || protocol == "ipv6" {
        words.next()?;
        protocol = words.next()?;
    }
    let mut addresses: Vec<IpAddr> = Vec::new();
    let mut ports: Vec<Option<u16>> = Vec::new();
    let (mut sports, mut dports): (Vec<u16>, Vec<u16>) = (Vec::new(), Vec::new());
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "src" | "dst" => addresses.push(value.parse().ok()?),
            "sport" => sports.push(value.parse().ok()?),
            "dport" => dports.push(value.parse().ok()?),
            _ => {}
        }
    }
    if addresses.len() < 4 {
        return None;
    }
    for i in 0..2 {
        ports.push(sports.get(i).copied());
        ports.push(dports.get(i).copied());
    }
    Some(Flow {
        protocol: protocol.to_string(),
        source: addresses[0],
        destination: addresses[1],
        source_port: ports[0],
        destination_port: ports[1],
        reply_destination: addresses[3],
        reply_destination_port: ports[3],
    })
}

/// What a reconciliation did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// UDP entries deleted.
    pub deleted_udp: usize,
    /// Flows (by protocol) that still carry the old decision and were left alone.
    pub stale: Vec<(String, usize)>,
}

/// The flows whose decision changed from `old` to `new` and whose NAT state now disagrees
/// with `new`. Flows whose decision did not change are never returned, whatever their
/// NAT state (someone else's NAT is not ours to undo).
pub fn disagreeing<'a>(flows: &'a [Flow], old: &Policy, new: &Policy) -> Vec<&'a Flow> {
    flows
        .iter()
        .filter(|flow| {
            let decide = |policy: &Policy| {
                policy
                    .explain(Some(flow.source), flow.destination)
                    .decision
                    .masquerades()
            };
            let (before, after) = (decide(old), decide(new));
            before != after && flow.is_source_natted() != after
        })
        .collect()
}

/// The `conntrack -L` runs that cover `changed` (None: everything) in `family`, as args.
fn listings(family: &str, changed: Option<Vec<IpNet>>) -> Vec<Vec<String>> {
    let whole = vec!["-L".to_string(), "-f".to_string(), family.to_string()];
    match changed {
        Some(blocks) if blocks.len() <= MAX_FILTERED_LISTINGS => blocks
            .iter()
            .map(|block| {
                let mut args = whole.clone();
                args.extend([
                    "-d".to_string(),
                    block.network().to_string(),
                    "--mask-dst".to_string(),
                    block.netmask().to_string(),
                ]);
                args
            })
            .collect(),
        _ => vec![whole],
    }
}

/// Lists the conntrack entries of the destinations whose decision changed from `old` to
/// `new` (a table of 250,000 flows is not listed for a change that affects none of
/// them), deletes the UDP entries that disagree with `new`, and counts the others.
pub fn reconcile(
    old: &Policy,
    new: &Policy,
    mode: ConntrackCleanup,
    runner: &SharedRunner,
) -> Result<Reconciled, SyncError> {
    let mut result = Reconciled::default();
    if mode == ConntrackCleanup::None {
        return Ok(result);
    }
    let conntrack = Program::new("conntrack");
    for family in &new.families {
        let name = match family.family {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        };
        let mut flows: Vec<Flow> = Vec::new();
        for args in listings(name, changed_destinations(old, new, family.family)) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let listing = runner
                .run(&conntrack, &args, None, None)
                .doing(|| format!("listing the {} conntrack table", family.family))?;
            flows.extend(listing.lines().filter_map(parse_flow));
        }
        for flow in disagreeing(&flows, old, new) {
            if flow.protocol != "udp" {
                match result.stale.iter_mut().find(|(p, _)| *p == flow.protocol) {
                    Some((_, count)) => *count += 1,
                    None => result.stale.push((flow.protocol.clone(), 1)),
                }
                continue;
            }
            let (source, destination) = (flow.source.to_string(), flow.destination.to_string());
            let mut args = vec![
                "-D",
                "-f",
                name,
                "-p",
                "udp",
                "-s",
                &source,
                "-d",
                &destination,
            ];
            let (sport, dport) = (
                flow.source_port.map(|p| p.to_string()),
                flow.destination_port.map(|p| p.to_string()),
            );
            if let (Some(sport), Some(dport)) = (&sport, &dport) {
                args.extend(["--sport", sport.as_str(), "--dport", dport.as_str()]);
            }
            match runner.run(&conntrack, &args, None, None) {
                Ok(_) => result.deleted_udp += 1,
                // Gone already (it expired, or its next packet raced us): nothing to do.
                Err(err) if err.to_string().contains("0 flow entries") => {}
                Err(error) => {
                    return Err(SyncError::Tool {
                        doing: format!("deleting the conntrack entry {source} -> {destination}"),
                        error,
                    });
                }
            }
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ParseOptions, parse};
    use crate::policy::PolicySettings;
    use std::path::Path;

    fn policy(yaml: &str) -> Policy {
        let config = parse(yaml, Path::new("t"), ParseOptions::default())
            .unwrap()
            .config;
        Policy::new(&config, &PolicySettings::default())
    }

    const LISTING: &str = "\
udp      17 29 src=10.244.1.2 dst=203.0.113.10 sport=40000 dport=9999 src=203.0.113.10 dst=192.0.2.1 sport=9999 dport=40000 [ASSURED] mark=0 use=1
udp      17 29 src=10.244.1.2 dst=198.51.100.7 sport=40001 dport=53 src=198.51.100.7 dst=192.0.2.1 sport=53 dport=40001 mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.244.1.2 dst=203.0.113.10 sport=40002 dport=80 src=203.0.113.10 dst=192.0.2.1 sport=80 dport=40002 [ASSURED] mark=0 use=1
ipv4     2 udp      17 29 src=10.244.1.3 dst=203.0.113.11 sport=40003 dport=9999 src=203.0.113.11 dst=10.244.1.3 sport=9999 dport=40003 mark=0 use=1
icmp     1 29 src=10.244.1.2 dst=203.0.113.10 type=8 code=0 id=7 src=203.0.113.10 dst=192.0.2.1 type=0 code=0 id=7 mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 5 flow entries have been shown.
";

    #[test]
    fn entries_parse_in_both_output_formats() {
        let flows: Vec<Flow> = LISTING.lines().filter_map(parse_flow).collect();
        assert_eq!(flows.len(), 5);
        assert_eq!(flows[0].protocol, "udp");
        assert!(flows[0].is_source_natted());
        assert_eq!(flows[2].protocol, "tcp");
        assert_eq!(flows[3].source.to_string(), "10.244.1.3");
        assert!(!flows[3].is_source_natted());
        assert_eq!(flows[4].source_port, None);
    }

    #[test]
    fn only_flows_whose_decision_changed_and_disagree_are_picked() {
        let flows: Vec<Flow> = LISTING.lines().filter_map(parse_flow).collect();
        // 203.0.113.0/24 becomes a non-masquerade range: its masqueraded flows disagree;
        // the 198.51.100.7 flow's decision did not change, so it is never touched; the
        // un-natted 203.0.113.11 flow already agrees.
        let old = policy("nonMasqueradeCIDRs: [10.0.0.0/8]\n");
        let new = policy("nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n");
        let picked: Vec<(&str, Option<u16>)> = disagreeing(&flows, &old, &new)
            .iter()
            .map(|f| (f.protocol.as_str(), f.source_port))
            .collect();
        assert_eq!(
            picked,
            [("udp", Some(40000)), ("tcp", Some(40002)), ("icmp", None)]
        );
        // The reverse flip picks the un-natted flow to 203.0.113.11.
        let back: Vec<Option<u16>> = disagreeing(&flows, &new, &old)
            .iter()
            .map(|f| f.source_port)
            .collect();
        assert_eq!(back, [Some(40003)]);
    }

    #[test]
    fn reconcile_deletes_udp_entries_and_counts_the_others() {
        use crate::kernel::fake::FakeRunner;
        let runner = FakeRunner::new();
        runner.set_conntrack("ipv4", LISTING);
        let old = policy("nonMasqueradeCIDRs: [10.0.0.0/8]\n");
        let new = policy("nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n");
        let shared: SharedRunner = runner.clone();
        let done = reconcile(&old, &new, ConntrackCleanup::Udp, &shared).unwrap();
        assert_eq!(done.deleted_udp, 1);
        assert_eq!(
            done.stale,
            vec![("tcp".to_string(), 1), ("icmp".to_string(), 1)]
        );
        let commands: Vec<String> = runner.calls().into_iter().map(|c| c.command).collect();
        // Only the changed range is listed.
        assert_eq!(
            commands[0],
            "conntrack -L -f ipv4 -d 203.0.113.0 --mask-dst 255.255.255.0"
        );
        let deletes: Vec<&String> = commands.iter().filter(|c| c.contains(" -D ")).collect();
        assert_eq!(
            deletes,
            [
                "conntrack -D -f ipv4 -p udp -s 10.244.1.2 -d 203.0.113.10 --sport 40000 --dport 9999"
            ]
        );
        let none = reconcile(&old, &new, ConntrackCleanup::None, &shared).unwrap();
        assert_eq!(none, Reconciled::default());
    }
}
