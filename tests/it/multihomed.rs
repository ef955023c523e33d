//! Multihomed nodes (issue 17): a node with two uplinks, remote A behind eth1 and remote B
//! behind eth2, each reporting the source it saw. outputInterface masquerades only what
//! leaves by a listed interface; outputAddress(IPv6) makes it a SNAT to a secondary address
//! of the uplink (the IPv6 one with preferred_lft 0, so MASQUERADE would never pick it);
//! combined with forceMasqueradeCIDRs and masqueradeSourceCIDRs the decision is the rule
//! (source in scope, longest prefix says masquerade, interface listed). On iptables-nft,
//! iptables-legacy and nftables, IPv4 and IPv6, switched at run time by ConfigMap swaps.

use std::net::IpAddr;
use std::time::Duration;

use ima_harness::*;

use crate::AGENT;

const ENDPOINT: &str = "127.0.0.1:9910";
const A_V4: &str = "203.0.113.10";
const A_V4_OTHER: &str = "100.64.0.10";
const A_V6: &str = "2001:db8:99::10";
const B_V4: &str = "100.100.0.10";
const B_V6: &str = "2001:db8:b::10";

fn ip(text: &str) -> IpAddr {
    text.parse().expect("address")
}

/// Each destination with the source its remote must see.
fn assert_seen(mh: &Multihomed, step: &str, cases: &[(&str, &str)]) {
    for (destination, expected) in cases {
        assert_eq!(
            mh.observed_source(destination),
            ip(expected),
            "{step}: the remote behind {destination} saw the wrong source"
        );
    }
}

struct Run<'a> {
    mh: &'a Multihomed,
    volume: ConfigMapVolume,
    agent: AgentProcess,
    flags: Vec<String>,
    applied: usize,
}

impl Run<'_> {
    /// Commits `config` as kubelet does and waits until the agent applied it.
    fn switch(&mut self, config: &str) {
        self.volume.update(config);
        self.applied += 1;
        self.agent.wait_for_log(
            "config changed; rules applied",
            self.applied,
            Duration::from_secs(10),
        );
    }

    fn status(&self) -> String {
        let mut args = vec!["status".to_string()];
        args.extend(self.flags.iter().cloned());
        let out = AGENT.run(&self.mh.topology.node, &args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "status:\n{text}");
        text
    }
}

fn only_the_listed_interface_masquerades(backend: &[&str], prepare: impl Fn(&Netns)) {
    let mh = Multihomed::new();
    prepare(&mh.topology.node);
    // Without the agent nothing is masqueraded: the remotes really see the pod.
    assert_seen(
        &mh,
        "no agent",
        &[
            (A_V4, POD_V4),
            (B_V4, POD_V4),
            (A_V6, POD_V6),
            (B_V6, POD_V6),
        ],
    );
    let volume = ConfigMapVolume::new(
        "nonMasqueradeCIDRs: [10.0.0.0/8]\noutputInterface: eth1\nresyncInterval: 1s\n",
    );
    let path = volume.path().to_str().expect("utf-8 path").to_string();
    let mut flags = vec!["--config".to_string(), path, "--enable-ipv6".to_string()];
    flags.extend(backend.iter().map(|f| f.to_string()));
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut agent = AGENT.start(&mh.topology.node, &args);
    agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
    let mut run = Run {
        mh: &mh,
        volume,
        agent,
        flags,
        applied: 0,
    };

    // 1. Only eth1 masquerades: remote A sees the node, remote B the pod.
    assert_seen(
        &mh,
        "outputInterface eth1",
        &[
            (A_V4, NODE_V4),
            (A_V6, NODE_V6),
            (B_V4, POD_V4),
            (B_V6, POD_V6),
        ],
    );
    assert!(
        run.status()
            .contains("outputInterface eth1: eth1 on this node")
    );

    // 2. A fixed address: SNAT to eth1's secondary addresses, still eth1 only.
    run.switch(
        "nonMasqueradeCIDRs: [10.0.0.0/8]\noutputInterface: eth1\noutputAddress: 192.0.2.100\noutputAddressIPv6: '2001:db8:1::100'\nresyncInterval: 1s\n",
    );
    assert_seen(
        &mh,
        "outputAddress",
        &[
            (A_V4, UPLINK_A_SECONDARY_V4),
            (A_V6, UPLINK_A_SECONDARY_V6),
            (B_V4, POD_V4),
            (B_V6, POD_V6),
        ],
    );
    let status = run.status();
    assert!(
        status.contains("outputAddress 192.0.2.100: assigned on this node")
            && status.contains("outputAddressIPv6 2001:db8:1::100: assigned on this node"),
        "{status}"
    );

    // 3. A wildcard: every eth interface masquerades, each with its own address.
    run.switch("nonMasqueradeCIDRs: [10.0.0.0/8]\noutputInterface: ['eth+']\nresyncInterval: 1s\n");
    assert_seen(
        &mh,
        "outputInterface eth+",
        &[
            (A_V4, NODE_V4),
            (A_V6, NODE_V6),
            (B_V4, UPLINK_B_NODE_V4),
            (B_V6, UPLINK_B_NODE_V6),
        ],
    );

    // 4. With exceptions and a source scope: A's 203.0.113.0/24 is kept but .10 forced,
    // B's range is kept; the pod is in scope; only eth1 SNATs.
    run.switch(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24, 100.100.0.0/16, '2001:db8:99::/48', '2001:db8:b::/48']\nforceMasqueradeCIDRs: [203.0.113.10/32, '2001:db8:99::10/128', 100.100.0.10/32]\nmasqueradeSourceCIDRs: [10.244.0.0/16, 'fd00:244::/64']\noutputInterface: [eth1]\noutputAddress: 192.0.2.100\nresyncInterval: 1s\n",
    );
    assert_seen(
        &mh,
        "exceptions, scope, eth1, outputAddress",
        &[
            // Forced, in scope, leaves by eth1: SNAT to the fixed address.
            (A_V4, UPLINK_A_SECONDARY_V4),
            // No list keeps it, in scope, eth1: SNAT too.
            (A_V4_OTHER, UPLINK_A_SECONDARY_V4),
            // Forced, but it leaves by eth2, which is not listed: the pod's address.
            (B_V4, POD_V4),
            // IPv6 has no outputAddressIPv6: MASQUERADE to eth1's preferred address.
            (A_V6, NODE_V6),
            (B_V6, POD_V6),
        ],
    );
    run.status();

    // 5. The pod outside the source scope: nothing is masqueraded on any interface.
    run.switch(
        "nonMasqueradeCIDRs: []\nmasqueradeSourceCIDRs: [10.245.0.0/16, 'fd00:245::/64']\noutputInterface: ['eth+']\nresyncInterval: 1s\n",
    );
    assert_seen(
        &mh,
        "source out of scope",
        &[
            (A_V4, POD_V4),
            (B_V4, POD_V4),
            (A_V6, POD_V6),
            (B_V6, POD_V6),
        ],
    );

    // 6. An address the node does not hold: applied (it may float here later), and said.
    run.switch("outputAddress: 192.0.2.200\nresyncInterval: 1s\n");
    assert!(
        eventually(Duration::from_secs(5), || run
            .agent
            .log()
            .contains("192.0.2.200 is not assigned on this node")),
        "{}",
        run.agent.log()
    );
    let status = run.status();
    assert!(
        status.contains("192.0.2.200 is not assigned on this node"),
        "{status}"
    );
    let (_, metrics) = mh.topology.node.http_get(ENDPOINT, "/metrics");
    assert!(
        metrics.contains("ip_masq_agent_output_address_present{family=\"ipv4\"} 0"),
        "{metrics}"
    );
    // ...and once the node holds it, it is what the remote sees.
    mh.topology
        .node
        .sh(&["ip", "addr", "add", "192.0.2.200/24", "dev", "eth1"]);
    assert_eq!(mh.observed_source(A_V4), ip("192.0.2.200"));
}

root_test!(
    fn only_the_listed_interface_masquerades_on_iptables_nft() {
        only_the_listed_interface_masquerades(&["--iptables-mode=nft"], |_| {});
    }
);

root_test!(
    fn only_the_listed_interface_masquerades_on_iptables_legacy() {
        only_the_listed_interface_masquerades(&["--iptables-mode=legacy"], |node| {
            node.sh_line("iptables-legacy -t mangle -N KUBE-IPTABLES-HINT");
        });
    }
);

root_test!(
    fn only_the_listed_interface_masquerades_on_nftables() {
        only_the_listed_interface_masquerades(&["--backend=nftables"], |_| {});
    }
);

/// A UDP flow that keeps sending on one 5-tuple across a change of outputInterface or
/// outputAddress is decided again (its conntrack entry is deleted): conntrack does not
/// record the egress interface, so the agent asks the routing table where the flow
/// leaves. Remote B is reached by eth2.
fn an_existing_udp_flow_follows_interface_and_address_changes(backend: &[&str]) {
    let mh = Multihomed::new();
    let mut volume =
        ConfigMapVolume::new("nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 60s\n");
    let path = volume.path().to_str().expect("utf-8 path").to_string();
    let mut args = vec!["--config", path.as_str()];
    args.extend_from_slice(backend);
    let mut agent = AGENT.start(&mh.topology.node, &args);
    agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
    let flow = mh
        .topology
        .pod
        .udp_socket("0.0.0.0:0".parse().expect("bind address"));
    let seen = || mh.observed_source_from(&flow, B_V4);
    assert_eq!(
        seen(),
        ip(UPLINK_B_NODE_V4),
        "masqueraded on every interface"
    );
    // eth2 is no longer listed: the same 5-tuple keeps the pod's address within a second.
    volume.update("nonMasqueradeCIDRs: [10.0.0.0/8]\noutputInterface: eth1\nresyncInterval: 60s\n");
    assert!(
        eventually(Duration::from_secs(3), || seen() == ip(POD_V4)),
        "the flow kept its masquerade after eth2 left outputInterface:\n{}",
        agent.log()
    );
    // Listed again, with a fixed address of eth2: SNAT to it, on the same 5-tuple.
    mh.topology
        .node
        .sh(&["ip", "addr", "add", "198.51.100.50/24", "dev", "eth2"]);
    volume.update(
        "nonMasqueradeCIDRs: [10.0.0.0/8]\noutputInterface: [eth1, eth2]\noutputAddress: 198.51.100.50\nresyncInterval: 60s\n",
    );
    assert!(
        eventually(Duration::from_secs(3), || seen() == ip("198.51.100.50")),
        "the flow did not follow the new outputAddress:\n{}",
        agent.log()
    );
    // Back to MASQUERADE: the flow on the old address goes to the interface's address.
    volume
        .update("nonMasqueradeCIDRs: [10.0.0.0/8]\noutputInterface: [eth2]\nresyncInterval: 60s\n");
    assert!(
        eventually(Duration::from_secs(3), || seen() == ip(UPLINK_B_NODE_V4)),
        "the flow kept the old outputAddress:\n{}",
        agent.log()
    );
}

root_test!(
    fn an_existing_udp_flow_follows_interface_and_address_changes_on_iptables_nft() {
        an_existing_udp_flow_follows_interface_and_address_changes(&["--iptables-mode=nft"]);
    }
);

root_test!(
    fn an_existing_udp_flow_follows_interface_and_address_changes_on_nftables() {
        an_existing_udp_flow_follows_interface_and_address_changes(&["--backend=nftables"]);
    }
);

root_test!(
    /// Found by the hostile review: with pod traffic policy-routed by source (`ip rule
    /// from 10.244.0.0/16`), the main table's route for a destination is not where the
    /// flow leaves; the conntrack pass asked by destination only and kept a flow that
    /// had lost its masquerade.
    fn regression_an_existing_flow_follows_an_interface_change_under_policy_routing() {
        let mh = Multihomed::new();
        let node = &mh.topology.node;
        // The main table would send remote B's range out of eth1; pods use table 100,
        // which sends it out of eth2, where remote B is.
        node.sh(&[
            "ip",
            "route",
            "replace",
            "100.100.0.0/16",
            "via",
            "192.0.2.2",
            "dev",
            "eth1",
        ]);
        node.sh(&[
            "ip",
            "route",
            "add",
            "100.100.0.0/16",
            "via",
            "198.51.100.2",
            "dev",
            "eth2",
            "table",
            "100",
        ]);
        node.sh(&[
            "ip",
            "rule",
            "add",
            "from",
            "10.244.0.0/16",
            "lookup",
            "100",
        ]);
        let mut volume =
            ConfigMapVolume::new("nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 60s\n");
        let path = volume.path().to_str().expect("utf-8 path").to_string();
        let mut agent = AGENT.start(node, &["--config", path.as_str(), "--iptables-mode=nft"]);
        agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
        let flow = mh
            .topology
            .pod
            .udp_socket("0.0.0.0:0".parse().expect("bind address"));
        let seen = || mh.observed_source_from(&flow, B_V4);
        assert_eq!(seen(), ip(UPLINK_B_NODE_V4), "masqueraded out of eth2");
        volume.update(
            "nonMasqueradeCIDRs: [10.0.0.0/8]\noutputInterface: eth1\nresyncInterval: 60s\n",
        );
        assert!(
            eventually(Duration::from_secs(3), || seen() == ip(POD_V4)),
            "the policy-routed flow kept its masquerade after eth2 left outputInterface:\n{}",
            agent.log()
        );
    }
);

/// Found by the hostile review: `outputInterface: '+'` (iptables' "any interface") made
/// iptables-save drop `-o +` (a rewrite at every resync) and the kernel refuse the nft
/// batch; it means every interface, as without the key.
fn every_interface_pattern_converges(backend: &[&str]) {
    let mh = Multihomed::new();
    let volume = ConfigMapVolume::new(
        "nonMasqueradeCIDRs: [10.0.0.0/8]\noutputInterface: ['+']\nresyncInterval: 200ms\n",
    );
    let path = volume.path().to_str().expect("utf-8 path").to_string();
    let mut args = vec!["--config", path.as_str()];
    args.extend_from_slice(backend);
    let mut agent = AGENT.start(&mh.topology.node, &args);
    agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
    assert_seen(
        &mh,
        "outputInterface +",
        &[(A_V4, NODE_V4), (B_V4, UPLINK_B_NODE_V4)],
    );
    agent.wait_for_log("rules resynced", 5, Duration::from_secs(10));
    let log = agent.log();
    assert!(
        !log.contains("differed from the config")
            && !log.contains("syncing masquerade rules failed"),
        "{log}"
    );
}

root_test!(
    fn regression_every_interface_pattern_converges_on_iptables_nft() {
        every_interface_pattern_converges(&["--iptables-mode=nft"]);
    }
);

root_test!(
    fn regression_every_interface_pattern_converges_on_nftables() {
        every_interface_pattern_converges(&["--backend=nftables"]);
    }
);
