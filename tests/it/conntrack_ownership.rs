//! Which existing flows are the agent's to re-decide after a change, on the kernel: a
//! Service and a NodePort flow DNATed (and marked and masqueraded) by kube-proxy-style
//! rules, the host's loopback DNS flow and other flows to the node's own addresses,
//! another conntrack zone's flow (with a twin of the same tuple in the default zone), and
//! a flow someone else SNATed all keep their entries (same id) across a change that
//! re-decides their destination, while the agent's own flow beside them is deleted. And
//! the clean-up costs one dump and a few datagrams, never a process per flow.
//!
//! Flows are real packets through pod -> node -> remote; each test waits for the pass
//! to finish by the agent's log line, which the deletion of its own flow makes.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use ima_harness::conntrack::{self, Flow, Listed};
use ima_harness::*;

use crate::AGENT;

const PASS_DONE: &str = "conntrack: flows carrying the old decision updated";

fn at(address: &str) -> SocketAddr {
    address.parse().expect("socket address")
}

/// A UDP socket bound in `ns` at `from` that has sent three packets to `to` (one flow).
fn send(ns: &Netns, from: &str, to: &str) -> UdpSocket {
    let socket = ns.udp_socket(at(from));
    for _ in 0..3 {
        socket.send_to(b"flow", at(to)).expect("send");
        std::thread::sleep(Duration::from_millis(20));
    }
    socket
}

/// A listener in `ns` at `address`, reading with a 2 s timeout.
fn listen(ns: &Netns, address: &str) -> UdpSocket {
    let socket = ns.udp_socket(at(address));
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    socket
}

/// The source the listener saw on its next packet.
fn heard_from(listener: &UdpSocket) -> String {
    let mut buffer = [0u8; 64];
    let (_, from) = listener.recv_from(&mut buffer).expect("no packet arrived");
    from.ip().to_string()
}

/// The one entry whose key holds every word of `words`.
fn find<'a>(entries: &'a [Listed], words: &[&str]) -> Option<&'a Listed> {
    let mut found = entries
        .iter()
        .filter(|e| words.iter().all(|w| e.key.split(' ').any(|k| k == *w)));
    let first = found.next();
    assert!(found.next().is_none(), "more than one entry has {words:?}");
    first
}

/// Waits until every entry named by `words` exists in `node`'s table.
fn entries_with(node: &Netns, all: &[&[&str]]) -> Vec<Listed> {
    let mut entries = Vec::new();
    let seen = eventually(Duration::from_secs(3), || {
        entries = conntrack::listed(node);
        all.iter().all(|words| find(&entries, words).is_some())
    });
    assert!(seen, "missing entries among {entries:#?}");
    entries
}

/// Swaps the config to `after` and waits for the conntrack pass that follows.
fn change(agent: &mut AgentProcess, volume: &mut ConfigMapVolume, after: &str) {
    volume.update(after);
    agent.wait_for_log(PASS_DONE, 1, Duration::from_secs(20));
}

/// The entry named by `words` is there after the change, with the same id (not deleted
/// and made again).
fn assert_kept(before: &[Listed], after: &[Listed], words: &[&str], what: &str, log: &str) {
    let was = find(before, words).unwrap_or_else(|| panic!("{what}: no entry before"));
    assert_eq!(
        find(after, words),
        Some(was),
        "{what}: its entry was deleted by the agent\nafter: {after:#?}\n{log}"
    );
}

fn assert_deleted(after: &[Listed], words: &[&str], what: &str, log: &str) {
    assert_eq!(
        find(after, words),
        None,
        "{what}: the agent's own flow was not deleted\n{log}"
    );
}

/// kube-proxy's shape, in iptables-nft: a NodePort (marked, DNATed to a pod, masqueraded
/// in POSTROUTING for the mark) and a ClusterIP DNATed to an endpoint outside the node.
const KUBE_PROXY_RULES: &[&str] = &[
    "-N KUBE-TEST-MARK-MASQ",
    "-A KUBE-TEST-MARK-MASQ -j MARK --or-mark 0x4000",
    "-N KUBE-TEST-POSTROUTING",
    "-A KUBE-TEST-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    "-A KUBE-TEST-POSTROUTING -j MARK --xor-mark 0x4000",
    "-A KUBE-TEST-POSTROUTING -j MASQUERADE",
    "-N KUBE-TEST-NODEPORT",
    "-A KUBE-TEST-NODEPORT -j KUBE-TEST-MARK-MASQ",
    "-A KUBE-TEST-NODEPORT -p udp -j DNAT --to-destination 10.244.1.2:5353",
    "-N KUBE-TEST-SVC",
    "-A KUBE-TEST-SVC -p udp -j DNAT --to-destination 10.99.0.10:5353",
    "-A PREROUTING -d 192.0.2.1/32 -p udp --dport 30053 -j KUBE-TEST-NODEPORT",
    "-A PREROUTING -d 10.96.0.10/32 -p udp --dport 53 -j KUBE-TEST-SVC",
    "-I POSTROUTING -j KUBE-TEST-POSTROUTING",
];

root_test!(
    /// The node's range joins nonMasqueradeCIDRs and the Service range leaves it: the
    /// NodePort flow (remote -> node:30053 -> pod, masqueraded by kube-proxy) and the
    /// Service flow (pod -> 10.96.0.10:53 -> 10.99.0.10) are kube-proxy's and keep
    /// their entries; the pod's own flow to 10.99.0.10 is deleted.
    fn regression_conntrack_cleanup_deletes_service_and_nodeport_flows() {
        let topology = Topology::new();
        let node = &topology.node;
        for rule in KUBE_PROXY_RULES {
            node.sh_line(&format!("iptables-nft -t nat {rule}"));
        }
        let mut volume = ConfigMapVolume::new("nonMasqueradeCIDRs: [10.0.0.0/8]\n");
        let mut agent = AGENT.start_synced(node, &volume, &["--iptables-mode=nft"]);

        let backend = listen(&topology.pod, "10.244.1.2:5353");
        let _client = send(&topology.remote, "192.0.2.2:41000", "192.0.2.1:30053");
        assert_eq!(heard_from(&backend), "10.244.1.1", "kube-proxy masquerades");
        let endpoint = listen(&topology.remote, "10.99.0.10:5353");
        let _service = send(&topology.pod, "10.244.1.2:41001", "10.96.0.10:53");
        assert_eq!(heard_from(&endpoint), "10.244.1.2");
        let _own = send(&topology.pod, "10.244.1.2:41002", "10.99.0.10:7611");

        let nodeport: &[&str] = &["dst=192.0.2.1", "dport=30053"];
        let service: &[&str] = &["dst=10.96.0.10", "dport=53"];
        let own: &[&str] = &["dst=10.99.0.10", "dport=7611"];
        let before = entries_with(node, &[nodeport, service, own]);
        change(
            &mut agent,
            &mut volume,
            "nonMasqueradeCIDRs: [10.244.0.0/16, 192.0.2.0/24]\n",
        );
        let after = conntrack::listed(node);
        let log = agent.log();
        assert_deleted(&after, own, "pod -> 10.99.0.10 (now masqueraded)", &log);
        assert_kept(&before, &after, nodeport, "the NodePort flow", &log);
        assert_kept(&before, &after, service, "the Service flow", &log);
    }
);

root_test!(
    /// `['0.0.0.0/0']` to `[]`: the host's loopback DNS flow, a pod's flow to the node's
    /// own address and a remote's flow to the node are never the agent's.
    fn regression_conntrack_cleanup_deletes_local_and_loopback_flows() {
        let topology = Topology::new();
        let node = &topology.node;
        let mut volume = ConfigMapVolume::new("nonMasqueradeCIDRs: ['0.0.0.0/0']\n");
        let mut agent = AGENT.start_synced(node, &volume, &["--backend=nftables"]);

        let _resolver = listen(node, "127.0.0.53:53");
        let _dns = send(node, "127.0.0.1:41010", "127.0.0.53:53");
        let _node_local = listen(node, "10.244.1.1:5300");
        let _to_node = send(&topology.pod, "10.244.1.2:41011", "10.244.1.1:5300");
        let _inbound_listener = listen(node, "192.0.2.1:2222");
        let _inbound = send(&topology.remote, "192.0.2.2:41012", "192.0.2.1:2222");
        let _own = send(&topology.pod, "10.244.1.2:41013", "203.0.113.10:7612");

        let loopback: &[&str] = &["dst=127.0.0.53", "dport=53"];
        let to_node: &[&str] = &["dst=10.244.1.1", "dport=5300"];
        let inbound: &[&str] = &["dst=192.0.2.1", "dport=2222"];
        let own: &[&str] = &["dst=203.0.113.10", "dport=7612"];
        let before = entries_with(node, &[loopback, to_node, inbound, own]);
        change(&mut agent, &mut volume, "nonMasqueradeCIDRs: []\n");
        let after = conntrack::listed(node);
        let log = agent.log();
        assert_deleted(&after, own, "pod -> 203.0.113.10 (now masqueraded)", &log);
        assert_kept(&before, &after, loopback, "the loopback DNS flow", &log);
        assert_kept(&before, &after, to_node, "pod -> the node's address", &log);
        assert_kept(&before, &after, inbound, "remote -> the node", &log);
    }
);

root_test!(
    /// A pod's flow tracked in zone 5 (someone's `ct zone set 5`), then the same socket's
    /// flow in the default zone: the same tuple in two zones. After 203.0.113.0/24
    /// joins nonMasqueradeCIDRs only the default zone's entry is deleted.
    fn regression_conntrack_deletions_ignore_zones() {
        let topology = Topology::new();
        let node = &topology.node;
        let mut volume = ConfigMapVolume::new("nonMasqueradeCIDRs: [10.0.0.0/8]\n");
        let mut agent = AGENT.start_synced(node, &volume, &["--iptables-mode=nft"]);
        node.sh(&["nft", "add", "table", "ip", "ima_zones"]);
        node.sh_line(
            "nft add chain ip ima_zones pre { type filter hook prerouting priority raw ; }",
        );
        node.sh_line("nft add rule ip ima_zones pre iifname pod0 udp dport 7613 ct zone set 5");

        let socket = send(&topology.pod, "10.244.1.2:41020", "203.0.113.10:7613");
        let zoned: &[&str] = &["dst=203.0.113.10", "dport=7613", "zone=5"];
        entries_with(node, &[zoned]);
        node.sh(&["nft", "flush", "chain", "ip", "ima_zones", "pre"]);
        socket
            .send_to(b"flow", at("203.0.113.10:7613"))
            .expect("send");
        let twin: &[&str] = &["dst=203.0.113.10", "dport=7613", "zone=0"];
        let before = entries_with(node, &[zoned, twin]);
        change(
            &mut agent,
            &mut volume,
            "nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n",
        );
        let after = conntrack::listed(node);
        let log = agent.log();
        assert_deleted(&after, twin, "the default zone's entry", &log);
        assert_kept(&before, &after, zoned, "zone 5's entry", &log);
    }
);

root_test!(
    /// Someone else's SNAT (to an address the node does not hold, as an egress gateway
    /// does) acts before the agent's rules: not the agent's to undo.
    fn regression_conntrack_cleanup_undoes_others_snat() {
        let topology = Topology::new();
        let node = &topology.node;
        node.sh_line(
            "iptables-nft -t nat -I POSTROUTING -s 10.244.1.2/32 -p udp --dport 7614 -j SNAT --to-source 198.51.100.200",
        );
        let mut volume = ConfigMapVolume::new("nonMasqueradeCIDRs: [10.0.0.0/8]\n");
        let mut agent = AGENT.start_synced(node, &volume, &["--iptables-mode=nft"]);
        let _theirs = send(&topology.pod, "10.244.1.2:41030", "203.0.113.10:7614");
        let _own = send(&topology.pod, "10.244.1.2:41031", "203.0.113.10:7615");
        let theirs: &[&str] = &["dport=7614", "dst=198.51.100.200"];
        let own: &[&str] = &["dport=7615", "dst=192.0.2.1"];
        let before = entries_with(node, &[theirs, own]);
        change(
            &mut agent,
            &mut volume,
            "nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n",
        );
        let after = conntrack::listed(node);
        let log = agent.log();
        assert_deleted(
            &after,
            &["dport=7615"],
            "the agent's masqueraded flow",
            &log,
        );
        assert_kept(
            &before,
            &after,
            theirs,
            "the flow SNATed by someone else",
            &log,
        );
    }
);

/// UDP entries from pods to `destination_net`.x.y, masqueraded to the node.
fn masqueraded_flows(count: u16, destination_net: &str, first_port: u16) -> Vec<Flow> {
    (0..count)
        .map(|i| {
            let destination = format!("{destination_net}.{}", 1 + i % 250);
            Flow::udp(
                &format!("10.244.{}.{}", 1 + i / 250, 2 + i % 250),
                40000,
                &destination,
                9999,
            )
            .source_natted("192.0.2.1", first_port + i)
        })
        .collect()
}

root_test!(
    /// 3,000 of the agent's UDP flows change decision beside 3,000 that do not: all are
    /// handled with one dump and batched deletes, and no `conntrack` process is started
    /// (a PATH shim counts them).
    fn regression_conntrack_deletions_cost_a_process_and_a_table_dump_per_flow() {
        let topology = Topology::new();
        let node = &topology.node;
        let shims = Shims::new();
        let started = shims.dir.path.join("conntrack.started");
        shims.add(
            "conntrack",
            &format!("echo started >> {}", started.display()),
        );
        shims.fault_on("conntrack");
        let volume_text = "nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 60s\n";
        let mut volume = ConfigMapVolume::new(volume_text);
        let config = volume.path();
        let path = shims.path();
        let mut agent = AGENT.start_with(
            node,
            &[
                "--config",
                config.to_str().expect("utf-8"),
                "--iptables-mode=nft",
            ],
            &[],
            &[("PATH", &path)],
        );
        agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
        let stale = masqueraded_flows(3000, "203.0.113", 20000);
        let others = masqueraded_flows(3000, "100.64.0", 30000);
        conntrack::insert(node, &stale, 600);
        conntrack::insert(node, &others, 600);
        assert_eq!(conntrack::count(node), 6000);
        change(
            &mut agent,
            &mut volume,
            "nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\nresyncInterval: 60s\n",
        );
        let log = agent.log();
        let line = agent.wait_for_line(PASS_DONE, 1, Duration::from_secs(1));
        assert_eq!(conntrack::count(node), 3000, "{line}");
        let processes = std::fs::read_to_string(&started)
            .unwrap_or_default()
            .lines()
            .count();
        assert_eq!(processes, 0, "conntrack processes started\n{log}");
        assert_eq!(log_field(&line, "deleted_udp"), Some("3000"), "{line}");
        assert_eq!(log_field(&line, "dumps"), Some("1"), "{line}");
        let datagrams: u64 = log_field(&line, "delete_datagrams")
            .and_then(|d| d.parse().ok())
            .unwrap_or(u64::MAX);
        assert!(datagrams <= 3000u64.div_ceil(128) + 6, "{line}");
    }
);
