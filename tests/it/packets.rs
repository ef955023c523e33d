//! Packets from a pod namespace through the node namespace (where the agent runs) to a
//! remote namespace that owns every destination: the remote records the source address.

use std::time::{Duration, Instant};

use ima_harness::*;

use crate::AGENT;

const DUAL_STACK_CONFIG: &str = "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 'fd00:99::/32']\nresyncInterval: 1s\n";

fn assert_sources(topology: &Topology, cases: &[(&str, bool)]) {
    for (destination, masqueraded) in cases {
        assert_eq!(
            topology.is_masqueraded(destination),
            *masqueraded,
            "{destination} should {}be masqueraded",
            if *masqueraded { "" } else { "not " }
        );
    }
}

on_both_backends!(ipv4_and_ipv6_sources_follow_the_config);
on_both_backends!(masq_link_local_and_reserved_ranges_change_the_datapath);
on_both_backends!(configmap_swap_takes_effect_within_resync_interval);
on_both_backends!(broken_config_keeps_the_old_behaviour_and_the_agent_running);
on_both_backends!(foreign_rules_in_the_node_are_untouched_while_traffic_flows);

fn ipv4_and_ipv6_sources_follow_the_config(backend: &str) {
    dual_stack_sources(backend, |_| {});
}

root_test!(
    fn ipv4_and_ipv6_sources_follow_the_config_on_iptables_legacy() {
        dual_stack_sources("--backend=iptables", |node| {
            node.sh_line("iptables-legacy -t mangle -N KUBE-IPTABLES-HINT");
        });
    }
);

fn dual_stack_sources(backend: &str, prepare_node: impl Fn(&Netns)) {
    let topology = Topology::new();
    prepare_node(&topology.node);
    // Without the agent nothing is masqueraded: the probes really see the pod address.
    assert_sources(
        &topology,
        &[("203.0.113.10", false), ("2001:db8:99::10", false)],
    );
    let volume = ConfigMapVolume::new(DUAL_STACK_CONFIG);
    let _agent = AGENT.start_synced(&topology.node, &volume, &["--enable-ipv6", backend]);
    assert_sources(
        &topology,
        &[
            ("203.0.113.10", true),
            ("100.64.0.10", true),
            ("10.99.0.10", false),
            ("172.16.5.10", false),
            ("192.168.5.10", false),
            ("169.254.5.10", false),
            ("2001:db8:99::10", true),
            ("fd00:99::10", false),
        ],
    );
}

fn masq_link_local_and_reserved_ranges_change_the_datapath(backend: &str) {
    let topology = Topology::new();
    let volume = ConfigMapVolume::new("masqLinkLocal: true\n");
    let _agent = AGENT.start_synced(
        &topology.node,
        &volume,
        &["--nomasq-all-reserved-ranges", backend],
    );
    assert_sources(
        &topology,
        &[
            ("169.254.5.10", true),
            ("100.64.0.10", false),
            ("203.0.113.10", false),
            ("10.99.0.10", false),
        ],
    );
}

fn configmap_swap_takes_effect_within_resync_interval(backend: &str) {
    let topology = Topology::new();
    let mut volume = ConfigMapVolume::new("nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 1s\n");
    let _agent = AGENT.start_synced(&topology.node, &volume, &[backend]);
    assert_sources(&topology, &[("192.168.5.10", true), ("10.99.0.10", false)]);

    volume.update("nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\nresyncInterval: 1s\n");
    let swapped = Instant::now();
    let applied = eventually(Duration::from_secs(2), || {
        !topology.is_masqueraded("192.168.5.10")
    });
    assert!(
        applied,
        "new config not in force {:?} after the swap",
        swapped.elapsed()
    );

    volume.update("nonMasqueradeCIDRs: []\nresyncInterval: 1s\n");
    let applied = eventually(Duration::from_secs(2), || {
        topology.is_masqueraded("10.99.0.10")
    });
    assert!(
        applied,
        "empty list not in force within resyncInterval + 1s"
    );
    assert_sources(&topology, &[("169.254.5.10", false)]);
}

fn broken_config_keeps_the_old_behaviour_and_the_agent_running(backend: &str) {
    let topology = Topology::new();
    let mut volume = ConfigMapVolume::new(DUAL_STACK_CONFIG);
    let mut agent = AGENT.start_synced(&topology.node, &volume, &["--enable-ipv6", backend]);
    let good = [
        ("203.0.113.10", true),
        ("192.168.5.10", false),
        ("2001:db8:99::10", true),
        ("fd00:99::10", false),
    ];
    assert_sources(&topology, &good);

    for broken in [
        "nonMasqueradeCIDRs: [10.0.0.0/8\n",
        "nonMasqueradeCIDRs: [10.0.0.1/8]\nresyncInterval: 1s\n",
        "nonMasqueradeCIDRs: ['::ffff:10.0.0.0/104']\n",
        "resyncInterval: 0s\n",
        "{\"nonMasqueradeCIDRs\": \"10.0.0.0/8\"}",
    ] {
        volume.update(broken);
        agent.wait_for_log("config rejected", 1, Duration::from_secs(3));
        // Two more resyncs with the broken file in place.
        std::thread::sleep(Duration::from_millis(2200));
        assert!(agent.is_running(), "agent exited on {broken:?}");
        assert_sources(&topology, &good);
    }
    let log = agent.log();
    assert!(log.contains("is not aligned to a CIDR block"), "{log}");
    assert!(log.contains("IPv4-mapped IPv6 prefix"), "{log}");

    volume.update("nonMasqueradeCIDRs: []\nresyncInterval: 1s\n");
    assert!(eventually(Duration::from_secs(2), || topology
        .is_masqueraded("192.168.5.10")));
}

fn foreign_rules_in_the_node_are_untouched_while_traffic_flows(backend: &str) {
    let topology = Topology::new();
    let node = &topology.node;
    node.sh_line("iptables-nft -t nat -N KUBE-POSTROUTING");
    node.sh_line("iptables-nft -t nat -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING");
    node.sh_line(
        "iptables-nft -t nat -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    );
    node.sh_line(
        "iptables-nft -t filter -A FORWARD -m comment --comment \"container runtime\" -j ACCEPT",
    );
    node.sh(&["nft", "add table inet foreign; add chain inet foreign post { type nat hook postrouting priority 50; }; add rule inet foreign post ip daddr 198.51.100.1 counter"]);
    let nat_before = node.save("iptables-nft-save");
    let filter_before = node
        .sh(&["iptables-nft-save", "-t", "filter"])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let foreign_before = node.sh(&["nft", "list", "table", "inet", "foreign"]);

    let volume = ConfigMapVolume::new("resyncInterval: 300ms\n");
    let mut agent = AGENT.start_synced(&topology.node, &volume, &[backend]);
    assert_sources(&topology, &[("203.0.113.10", true), ("10.99.0.10", false)]);
    agent.wait_for_log("rules resynced", 2, Duration::from_secs(5));

    assert_eq!(
        foreign_lines(&node.save("iptables-nft-save"), "IP-MASQ-AGENT"),
        nat_before
    );
    let filter_after = node
        .sh(&["iptables-nft-save", "-t", "filter"])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(filter_after, filter_before);
    assert_eq!(
        node.sh(&["nft", "list", "table", "inet", "foreign"]),
        foreign_before
    );
}
