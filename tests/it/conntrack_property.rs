//! The conntrack property: after any change of config, only the agent's UDP flows
//! whose decision changed and whose NAT state disagrees with the new decision lose their
//! entries; every other entry stays, the very same entry (same id).
//!
//! Seeded and reproducible: the seed is printed, `IMA_SEED=N` replays it. Each step
//! makes a batch of generated entries in the node's namespace (`conntrack -R`, the
//! test's tool; the agent uses netlink) of every kind:
//! - pods' flows to remote addresses, kept or masqueraded to a node address (the agent's);
//! - host-originated flows to remote addresses, kept or masqueraded (the agent's);
//! - DNATed flows (Services, NodePorts), masqueraded or not (kube-proxy's);
//! - flows to the node's own addresses and loopback (never through the agent's chain);
//! - any of the agent's kinds in another conntrack zone (others');
//! - flows SNATed by someone else to an address the node does not hold (others');
//!
//! UDP and TCP, IPv4 and IPv6; then it writes a generated config (nonMasqueradeCIDRs,
//! forceMasqueradeCIDRs, masqueradeSourceCIDRs, masqLinkLocal from a pool that cuts
//! through the generated destinations and sources), waits for the agent's conntrack
//! pass and compares the table with the one before, minus what an independent oracle
//! (longest prefix match written here, not the agent's code) says must go.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ima_harness::conntrack::{self, Flow, Listed};
use ima_harness::seeded::{self, Rng};
use ima_harness::*;
use ipnet::IpNet;

use crate::AGENT;

const STEPS: usize = 25;
const FLOWS_PER_STEP: usize = 64;
/// The whole run stops taking steps after this (each step takes well under a second).
const BUDGET: Duration = Duration::from_secs(40);

/// The node's local addresses as the Topology makes them (and loopback).
const LOCAL: &[&str] = &[
    "127.0.0.0/8",
    "10.244.1.1/32",
    "192.0.2.1/32",
    "::1/128",
    "fd00:244::1/128",
    "2001:db8:1::1/128",
];
const PODS_V4: &[&str] = &["10.244.1.2", "10.244.1.3", "10.244.2.7"];
const PODS_V6: &[&str] = &["fd00:244::2", "fd00:244::3"];
/// Node addresses a flow may leave with.
const NODE_V4: &[&str] = &["192.0.2.1", "10.244.1.1"];
const NODE_V6: &[&str] = &["2001:db8:1::1", "fd00:244::1"];
const REMOTE_V4: &[&str] = &[
    "203.0.113.7",
    "203.0.113.200",
    "198.51.100.9",
    "10.99.0.10",
    "10.96.0.20",
    "100.64.3.4",
    "8.8.8.8",
    "192.0.2.77",
    "169.254.10.1",
];
const REMOTE_V6: &[&str] = &[
    "2001:db8:99::10",
    "2001:db8:5::5",
    "fd00:99::10",
    "2606:4700::1",
    "fe80::99",
];
const LOCAL_V4: &[&str] = &["127.0.0.1", "127.0.0.53", "10.244.1.1", "192.0.2.1"];
const LOCAL_V6: &[&str] = &["::1", "fd00:244::1", "2001:db8:1::1"];
/// Addresses others SNAT to: not the node's.
const FOREIGN_V4: &[&str] = &["198.51.100.200", "192.0.2.99"];
const FOREIGN_V6: &[&str] = &["2001:db8:ffff::200"];

/// The prefixes configs are drawn from: they cut through the addresses above.
const DESTINATION_POOL: &[&str] = &[
    "10.0.0.0/8",
    "10.96.0.0/12",
    "10.244.0.0/16",
    "192.0.2.0/24",
    "203.0.113.0/24",
    "203.0.113.0/25",
    "198.51.100.0/24",
    "100.64.0.0/10",
    "8.0.0.0/8",
    "0.0.0.0/0",
    "127.0.0.0/8",
    "fd00::/8",
    "2001:db8::/32",
    "2001:db8:99::/48",
    "2606:4700::/32",
    "::/0",
];
const SOURCE_POOL: &[&str] = &[
    "10.244.0.0/16",
    "10.244.1.0/24",
    "192.0.2.0/24",
    "fd00:244::/64",
    "2001:db8:1::/64",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Pod,
    Host,
    Dnat,
    Local,
    OtherZone,
    OthersSnat,
}

impl Kind {
    fn is_agents(self) -> bool {
        matches!(self, Kind::Pod | Kind::Host)
    }
}

/// One generated config, as the oracle reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Config {
    non_masq: Vec<IpNet>,
    force: Vec<IpNet>,
    sources: Option<Vec<IpNet>>,
    masq_link_local: bool,
    masq_link_local_v6: bool,
}

impl Config {
    fn generate(rng: &mut Rng) -> Config {
        let mut non_masq = Vec::new();
        let mut force = Vec::new();
        for prefix in DESTINATION_POOL {
            let net: IpNet = prefix.parse().expect("pool prefix");
            match rng.below(5) {
                0 | 1 => non_masq.push(net),
                2 => force.push(net),
                _ => {}
            }
        }
        let sources = rng.chance(30).then(|| {
            SOURCE_POOL
                .iter()
                .filter(|_| rng.chance(50))
                .map(|p| p.parse().expect("pool prefix"))
                .collect()
        });
        Config {
            non_masq,
            force,
            sources,
            masq_link_local: rng.chance(20),
            masq_link_local_v6: rng.chance(20),
        }
    }

    fn yaml(&self) -> String {
        let list = |nets: &[IpNet]| {
            nets.iter()
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut yaml = format!(
            "nonMasqueradeCIDRs: [{}]\nforceMasqueradeCIDRs: [{}]\nmasqLinkLocal: {}\nmasqLinkLocalIPv6: {}\nresyncInterval: 60s\n",
            list(&self.non_masq),
            list(&self.force),
            self.masq_link_local,
            self.masq_link_local_v6,
        );
        if let Some(sources) = &self.sources {
            yaml.push_str(&format!("masqueradeSourceCIDRs: [{}]\n", list(sources)));
        }
        yaml
    }

    /// Whether a packet from `source` to `destination` leaves masqueraded: the longest
    /// prefix containing the destination decides (a force prefix beats the link-local
    /// default at equal length), none masquerades; then a source outside the scope
    /// keeps its address.
    fn masquerades(&self, source: IpAddr, destination: IpAddr) -> bool {
        let link_local: Option<IpNet> = match destination {
            IpAddr::V4(_) if !self.masq_link_local => "169.254.0.0/16".parse().ok(),
            IpAddr::V6(_) if !self.masq_link_local_v6 => "fe80::/10".parse().ok(),
            _ => None,
        };
        let mut best: Option<(u8, bool)> = None;
        let candidates = link_local
            .iter()
            .map(|p| (p, false))
            .chain(self.non_masq.iter().map(|p| (p, false)))
            .chain(self.force.iter().map(|p| (p, true)));
        for (prefix, masquerade) in candidates {
            if !prefix.contains(&destination) {
                continue;
            }
            let better = match best {
                None => true,
                Some((length, _)) => {
                    prefix.prefix_len() > length || (prefix.prefix_len() == length && masquerade)
                }
            };
            if better {
                best = Some((prefix.prefix_len(), masquerade));
            }
        }
        let by_destination = best.is_none_or(|(_, masquerade)| masquerade);
        let in_scope = match &self.sources {
            None => true,
            Some(sources) => sources.iter().any(|s| s.contains(&source)),
        };
        by_destination && in_scope
    }
}

struct Generated {
    flow: Flow,
    kind: Kind,
}

/// Unique ports: original source ports, and the ports a rewrite gives (disjoint ranges,
/// so no two entries share a tuple in either direction).
struct Ports {
    original: u16,
    rewritten: u16,
}

impl Ports {
    fn original(&mut self) -> u16 {
        self.original += 1;
        self.original
    }

    fn rewritten(&mut self) -> u16 {
        self.rewritten += 1;
        self.rewritten
    }
}

/// One of `items`.
fn one(rng: &mut Rng, items: &[&'static str]) -> &'static str {
    items[rng.below(items.len() as u64) as usize]
}

fn generate_flow(rng: &mut Rng, ports: &mut Ports) -> Generated {
    let v6 = rng.chance(30);
    let (pods, nodes, remotes, locals, foreign) = if v6 {
        (PODS_V6, NODE_V6, REMOTE_V6, LOCAL_V6, FOREIGN_V6)
    } else {
        (PODS_V4, NODE_V4, REMOTE_V4, LOCAL_V4, FOREIGN_V4)
    };
    let kind = *rng.pick(&[
        Kind::Pod,
        Kind::Pod,
        Kind::Pod,
        Kind::Host,
        Kind::Dnat,
        Kind::Local,
        Kind::OtherZone,
        Kind::OthersSnat,
    ]);
    let destination_port = *rng.pick(&[53u16, 443, 9999, 123]);
    let pod = one(rng, pods);
    let remote = one(rng, remotes);
    let mut flow = match kind {
        Kind::Pod | Kind::OtherZone => {
            let flow = Flow::udp(pod, ports.original(), remote, destination_port);
            if rng.chance(50) {
                flow.source_natted(one(rng, nodes), ports.rewritten())
            } else {
                flow
            }
        }
        Kind::Host => {
            let source = one(rng, nodes);
            let flow = Flow::udp(source, ports.original(), remote, destination_port);
            if rng.chance(50) {
                flow.source_natted(one(rng, nodes), ports.rewritten())
            } else {
                flow
            }
        }
        Kind::Dnat => {
            // To a Service address or the node's NodePort, answered by a backend.
            let (client, target) = if rng.chance(50) {
                (pod, remote)
            } else {
                (one(rng, remotes), one(rng, nodes))
            };
            let backend = if v6 { "fd00:244::99" } else { "10.244.3.9" };
            let flow = Flow::udp(client, ports.original(), target, 30000 + destination_port)
                .destination_natted(backend, 8080);
            if rng.chance(50) {
                flow.source_natted(one(rng, nodes), ports.rewritten())
            } else {
                flow
            }
        }
        Kind::Local => {
            let source = if rng.chance(50) {
                pod
            } else {
                one(rng, locals)
            };
            Flow::udp(source, ports.original(), one(rng, locals), destination_port)
        }
        Kind::OthersSnat => Flow::udp(pod, ports.original(), remote, destination_port)
            .source_natted(one(rng, foreign), ports.rewritten()),
    };
    if kind == Kind::OtherZone {
        flow = flow.in_zone(1 + rng.below(100) as u16);
    }
    if rng.chance(35) {
        flow = flow.tcp();
    }
    Generated { flow, kind }
}

/// Whether the oracle says the change from `old` to `new` deletes `generated`.
fn deleted(generated: &Generated, old: &Config, new: &Config) -> bool {
    let flow = &generated.flow;
    if !generated.kind.is_agents() || flow.protocol != "udp" {
        return false;
    }
    let (before, after) = (
        old.masquerades(flow.source, flow.destination),
        new.masquerades(flow.source, flow.destination),
    );
    let rewritten =
        flow.reply_destination != flow.source || flow.reply_destination_port != flow.source_port;
    before != after && rewritten != after
}

fn local_check() {
    // The generator's kinds match the oracle's idea of local addresses.
    let locals: Vec<IpNet> = LOCAL.iter().map(|p| p.parse().expect("prefix")).collect();
    for address in LOCAL_V4.iter().chain(LOCAL_V6) {
        let address: IpAddr = address.parse().expect("address");
        assert!(locals.iter().any(|l| l.contains(&address)), "{address}");
    }
    for address in REMOTE_V4.iter().chain(REMOTE_V6).chain(FOREIGN_V4) {
        let address: IpAddr = address.parse().expect("address");
        assert!(!locals.iter().any(|l| l.contains(&address)), "{address}");
    }
}

fn run(seed: u64) {
    local_check();
    let reproduce = format!("IMA_SEED={seed} cargo test --test it conntrack_property::");
    eprintln!("conntrack property: seed {seed}; reproduce with: {reproduce}");
    let mut rng = Rng::new(seed);
    let backend = *rng.pick(&["--iptables-mode=nft", "--backend=nftables"]);
    let topology = Topology::new();
    let node = &topology.node;
    let mut config = Config::generate(&mut rng);
    let mut volume = ConfigMapVolume::new(&config.yaml());
    let mut agent = AGENT.start_synced(node, &volume, &["--enable-ipv6", backend]);
    // The first sync replaced no rules (a fresh namespace): the flows pass it starts
    // finds the table empty. Waited for, so it cannot meet the flows made below.
    agent.wait_for_log(" examined=", 1, Duration::from_secs(20));
    let mut ports = Ports {
        original: 10_000,
        rewritten: 40_000,
    };
    let mut generated: Vec<Generated> = Vec::new();
    let started = Instant::now();
    let mut checked = 0;
    let mut deleted_in_all = 0;
    for step in 1..=STEPS {
        if started.elapsed() > BUDGET {
            eprintln!("seed {seed}: stopped after {checked} step(s) ({BUDGET:?} budget)");
            break;
        }
        let batch: Vec<Generated> = (0..FLOWS_PER_STEP)
            .map(|_| generate_flow(&mut rng, &mut ports))
            .collect();
        let flows: Vec<Flow> = batch.iter().map(|g| g.flow.clone()).collect();
        conntrack::insert(node, &flows, 600);
        generated.extend(batch);
        let before = conntrack::listed(node);
        let mut next = Config::generate(&mut rng);
        while next == config {
            next = Config::generate(&mut rng);
        }
        volume.update(&next.yaml());
        agent.wait_for_log(" examined=", step + 1, Duration::from_secs(20));
        let after = conntrack::listed(node);
        let gone: BTreeSet<String> = generated
            .iter()
            .filter(|g| deleted(g, &config, &next))
            .map(|g| g.flow.key())
            .collect();
        let expected: Vec<Listed> = before
            .iter()
            .filter(|e| !gone.contains(&e.key))
            .cloned()
            .collect();
        if after != expected {
            let missing: Vec<&Listed> = expected.iter().filter(|e| !after.contains(e)).collect();
            let extra: Vec<&Listed> = after.iter().filter(|e| !expected.contains(e)).collect();
            let kinds = |entries: &[&Listed]| -> Vec<String> {
                entries
                    .iter()
                    .map(|e| {
                        let kind = generated
                            .iter()
                            .find(|g| g.flow.key() == e.key)
                            .map_or("not generated".to_string(), |g| format!("{:?}", g.kind));
                        format!("{kind}: {}", e.key)
                    })
                    .collect()
            };
            panic!(
                "seed {seed}, step {step} ({backend}): the table after the change is not the one before minus the agent's changed UDP flows\n  reproduce: {reproduce}\n  deleted but should have stayed: {:#?}\n  kept but should have been deleted (or changed): {:#?}\n  old config:\n{}\n  new config:\n{}\n  pass: {:?}",
                kinds(&missing),
                kinds(&extra),
                config.yaml(),
                next.yaml(),
                agent.log_lines(" examined=").last(),
            );
        }
        // Deleted flows are gone for good (their next packet would make a new entry).
        generated.retain(|g| !gone.contains(&g.flow.key()));
        deleted_in_all += gone.len();
        config = next;
        checked = step;
    }
    assert!(checked > 0, "seed {seed}: no step ran");
    eprintln!(
        "conntrack property: seed {seed}: {checked} change(s), {deleted_in_all} entries deleted as expected, {} left at the end, in {:?}",
        conntrack::listed(node).len(),
        started.elapsed()
    );
    agent.terminate();
}

root_test!(
    fn only_the_agents_changed_udp_flows_lose_their_entries() {
        run(seeded::seed());
    }
);
