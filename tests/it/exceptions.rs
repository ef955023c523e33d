//! forceMasqueradeCIDRs and masqueradeSourceCIDRs with packets: the most specific prefix
//! decides (an exception inside a non-masquerade range is masqueraded, a non-masquerade
//! prefix inside a force range is not, a /32 force inside link-local), forwarded traffic
//! from a client outside the source scope keeps its source, and a ConfigMap swap that
//! adds or removes a force prefix takes effect. On iptables-nft, iptables-legacy and
//! nftables, IPv4 and IPv6.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ima_harness::*;

use crate::AGENT;

const EXCEPTIONS: &str = "\
nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.5.0/24, 'fd00::/8', '2001:db8:99::10/128']
forceMasqueradeCIDRs: [10.99.0.0/16, 172.16.0.0/12, 169.254.5.10/32, 'fd00:99::/32', '2001:db8::/32']
resyncInterval: 60s
";

/// (destination, masqueraded?) under EXCEPTIONS.
const EXPECTED: [(&str, bool); 8] = [
    // A force /16 inside the non-masquerade /8.
    ("10.99.0.10", true),
    // A non-masquerade /24 inside the force /12.
    ("172.16.5.10", false),
    // A force /32 inside link-local, which otherwise keeps the pod address.
    ("169.254.5.10", true),
    // In no list: masqueraded, as always.
    ("192.168.5.10", true),
    ("203.0.113.10", true),
    ("100.64.0.10", true),
    ("fd00:99::10", true),
    ("2001:db8:99::10", false),
];

fn assert_decisions(topology: &Topology, expected: &[(&str, bool)], context: &str) {
    for (destination, masqueraded) in expected {
        assert_eq!(
            topology.is_masqueraded(destination),
            *masqueraded,
            "{context}: {destination}"
        );
    }
}

fn exceptions(backend: &[&str]) {
    let topology = Topology::new();
    let mut volume = ConfigMapVolume::new(EXCEPTIONS);
    let mut flags = vec!["--enable-ipv6"];
    flags.extend_from_slice(backend);
    let mut agent = AGENT.start_synced(&topology.node, &volume, &flags);
    let context = format!("{backend:?}");
    assert_decisions(&topology, &EXPECTED, &context);
    let metrics = topology.node.http_get("127.0.0.1:9910", "/metrics").1;
    assert!(
        metrics.contains("ip_masq_agent_force_prefixes{family=\"ipv4\"} 3")
            && metrics.contains("ip_masq_agent_force_prefixes{family=\"ipv6\"} 2"),
        "{context}: {metrics}"
    );

    // Removing the force /16 gives 10.99.0.10 back to the /8; adding it again takes it.
    let without = EXCEPTIONS.replace("10.99.0.0/16, ", "");
    for (config, masqueraded) in [(without.as_str(), false), (EXCEPTIONS, true)] {
        volume.update(config);
        assert!(
            eventually(Duration::from_secs(3), || topology
                .is_masqueraded("10.99.0.10")
                == masqueraded),
            "{context}: the swap did not take effect\n{}",
            agent.log()
        );
    }
    agent.terminate();
}

/// A client outside the cluster, behind the node: 198.51.100.2 and 2001:db8:2::2, routed
/// to the pod network through the node.
struct Client {
    ns: Netns,
}

impl Client {
    fn attach(topology: &Topology) -> Client {
        let ns = Netns::new("client");
        topology.node.sh_line(&format!(
            "ip link add eth2 type veth peer name eth0 netns {}",
            ns.name
        ));
        for line in [
            "ip link set eth2 up",
            "ip addr add 198.51.100.1/24 dev eth2",
            "ip -6 addr add 2001:db8:2::1/64 dev eth2 nodad",
        ] {
            topology.node.sh_line(line);
        }
        for line in [
            "ip link set eth0 up",
            "ip addr add 198.51.100.2/24 dev eth0",
            "ip -6 addr add 2001:db8:2::2/64 dev eth0 nodad",
            "ip route add 10.244.1.0/24 via 198.51.100.1",
            "ip -6 route add fd00:244::/64 via 2001:db8:2::1",
        ] {
            ns.sh_line(line);
        }
        Client { ns }
    }

    /// Sends UDP to the pod and returns the source address the pod saw. Bounded.
    fn source_seen_by_pod(&self, topology: &Topology, pod: &str) -> IpAddr {
        let pod: IpAddr = pod.parse().expect("pod address");
        let any = if pod.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let receiver = topology.pod.udp_socket(SocketAddr::new(pod, 7400));
        receiver
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let sender = self.ns.udp_socket(any.parse().expect("any"));
        let mut buffer = [0u8; 16];
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let _ = sender.send_to(b"hello", SocketAddr::new(pod, 7400));
            if let Ok((_, from)) = receiver.recv_from(&mut buffer) {
                return from.ip();
            }
        }
        panic!("the client's packets never reached the pod");
    }
}

fn source_scope(backend: &[&str]) {
    let topology = Topology::new();
    let client = Client::attach(&topology);
    // Without a scope the forwarded client traffic is masqueraded behind the node's
    // pod-facing address; with the pod network as the scope it keeps its source.
    let everyone = "nonMasqueradeCIDRs: []\nresyncInterval: 60s\n";
    let pods = "nonMasqueradeCIDRs: []\nmasqueradeSourceCIDRs: [10.244.0.0/16, 'fd00:244::/64']\nresyncInterval: 60s\n";
    let mut volume = ConfigMapVolume::new(everyone);
    let mut flags = vec!["--enable-ipv6"];
    flags.extend_from_slice(backend);
    let mut agent = AGENT.start_synced(&topology.node, &volume, &flags);
    let context = format!("{backend:?}");
    let cases = [
        (POD_V4, "198.51.100.2", "10.244.1.1"),
        (POD_V6, "2001:db8:2::2", "fd00:244::1"),
    ];
    for (pod, _, node_side) in cases {
        assert_eq!(
            client.source_seen_by_pod(&topology, pod).to_string(),
            node_side,
            "{context}: without a scope"
        );
    }
    volume.update(pods);
    agent.wait_for_log("config changed; rules applied", 1, Duration::from_secs(5));
    for (pod, client_address, _) in cases {
        assert_eq!(
            client.source_seen_by_pod(&topology, pod).to_string(),
            client_address,
            "{context}: a client outside the scope must keep its source"
        );
    }
    // Pods themselves are still masqueraded.
    for destination in ["203.0.113.10", "2001:db8:99::10"] {
        assert!(
            topology.is_masqueraded(destination),
            "{context}: {destination}"
        );
    }
    let metrics = topology.node.http_get("127.0.0.1:9910", "/metrics").1;
    assert!(
        metrics.contains("ip_masq_agent_source_prefixes{family=\"ipv4\"} 1"),
        "{context}: {metrics}"
    );
    agent.terminate();
}

root_test!(
    fn longest_prefix_decides_on_iptables_nft() {
        exceptions(&["--iptables-mode=nft"]);
    }
);

root_test!(
    fn longest_prefix_decides_on_iptables_legacy() {
        exceptions(&["--iptables-mode=legacy"]);
    }
);

root_test!(
    fn longest_prefix_decides_on_nftables() {
        exceptions(&["--backend=nftables"]);
    }
);

root_test!(
    fn forwarded_traffic_outside_the_source_scope_keeps_its_source_on_iptables_nft() {
        source_scope(&["--iptables-mode=nft"]);
    }
);

root_test!(
    fn forwarded_traffic_outside_the_source_scope_keeps_its_source_on_iptables_legacy() {
        source_scope(&["--iptables-mode=legacy"]);
    }
);

root_test!(
    fn forwarded_traffic_outside_the_source_scope_keeps_its_source_on_nftables() {
        source_scope(&["--backend=nftables"]);
    }
);
