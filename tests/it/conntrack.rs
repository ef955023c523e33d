//! Config changes reach flows that already exist: a UDP flow that keeps sending on one
//! 5-tuple across a ConfigMap swap is decided again by the new rules (its conntrack entry
//! is deleted), in both directions of the flip, while a TCP connection open across the
//! swaps survives and flows outside the changed range keep their entries. On
//! iptables-nft, iptables-legacy and nftables, IPv4 and IPv6.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ima_harness::*;

use crate::AGENT;

const FLOW_PORT: u16 = 7301;
const OTHER_PORT: u16 = 7302;
const TCP_PORT: u16 = 7303;

/// One family's addresses: the flipped destination, one outside the changed range, and
/// the pod's and node's addresses.
struct Addresses {
    flipped: &'static str,
    other: &'static str,
    pod: &'static str,
    node: &'static str,
    any: &'static str,
    keep_range: &'static str,
    family: &'static str,
}

const V4: Addresses = Addresses {
    flipped: "203.0.113.10",
    other: "100.64.0.10",
    pod: POD_V4,
    node: NODE_V4,
    any: "0.0.0.0",
    keep_range: "203.0.113.0/24",
    family: "ipv4",
};

const V6: Addresses = Addresses {
    flipped: "2001:db8:99::10",
    other: "fd00:99::10",
    pod: POD_V6,
    node: NODE_V6,
    any: "::",
    keep_range: "2001:db8:99::/48",
    family: "ipv6",
};

fn config(keep_flipped: bool, addresses: &Addresses) -> String {
    let extra = if keep_flipped {
        format!(", '{}'", addresses.keep_range)
    } else {
        String::new()
    };
    format!("nonMasqueradeCIDRs: [10.0.0.0/8{extra}]\nresyncInterval: 60s\n")
}

fn socket_address(address: &str, port: u16) -> SocketAddr {
    SocketAddr::new(address.parse().expect("address"), port)
}

/// A UDP sender in the pod that sends a packet every 50 ms on one socket (one 5-tuple)
/// until dropped; bounded by `limit`.
struct KeepAlive {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KeepAlive {
    fn start(socket: UdpSocket, to: SocketAddr, tag: &'static str, limit: Duration) -> KeepAlive {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let until = Instant::now() + limit;
            while !stopped.load(Ordering::SeqCst) && Instant::now() < until {
                let _ = socket.send_to(tag.as_bytes(), to);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        KeepAlive {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits for a packet tagged `tag` whose source is `expected`; returns how long it took,
/// or None after `timeout`. Earlier packets with another source are skipped.
fn wait_for_source(
    receiver: &UdpSocket,
    tag: &str,
    expected: &str,
    timeout: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let expected: IpAddr = expected.parse().expect("address");
    let mut buffer = [0u8; 64];
    while started.elapsed() < timeout {
        if let Ok((n, from)) = receiver.recv_from(&mut buffer)
            && &buffer[..n] == tag.as_bytes()
            && from.ip() == expected
        {
            return Some(started.elapsed());
        }
    }
    None
}

/// The conntrack entries (`conntrack -L`, counters and timers dropped) whose original
/// destination is `destination`.
fn entries_to(node: &Netns, family: &str, destination: &str) -> Vec<String> {
    node.sh(&["conntrack", "-L", "-f", family, "-d", destination])
        .lines()
        .map(|line| {
            line.split_whitespace()
                .filter(|word| {
                    word.contains('=') && !word.starts_with("mark=") && !word.starts_with("use=")
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn flip_flows(backend_flags: &[&str], addresses: &Addresses) {
    let topology = Topology::new();
    let mut volume = ConfigMapVolume::new(&config(false, addresses));
    let mut flags = vec!["--enable-ipv6"];
    flags.extend_from_slice(backend_flags);
    let mut agent = AGENT.start_synced(&topology.node, &volume, &flags);
    let context = format!("{backend_flags:?} {}", addresses.family);

    let receiver = topology
        .remote
        .udp_socket(socket_address(addresses.any, FLOW_PORT));
    receiver
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let other_receiver = topology
        .remote
        .udp_socket(socket_address(addresses.any, OTHER_PORT));
    // The flow that flips, and one to a destination outside the changed range.
    let flow = KeepAlive::start(
        topology.pod.udp_socket(socket_address(addresses.pod, 0)),
        socket_address(addresses.flipped, FLOW_PORT),
        "flow",
        Duration::from_secs(20),
    );
    let _other = KeepAlive::start(
        topology.pod.udp_socket(socket_address(addresses.pod, 0)),
        socket_address(addresses.other, OTHER_PORT),
        "other",
        Duration::from_secs(20),
    );
    // A TCP connection open across both swaps.
    let listener = topology
        .remote
        .tcp_listener(socket_address(addresses.flipped, TCP_PORT));
    let target = socket_address(addresses.flipped, TCP_PORT);
    let mut client = topology.pod.run_inside(move || {
        TcpStream::connect_timeout(&target, Duration::from_secs(3)).expect("tcp connect")
    });
    let (mut server, _) = listener.accept().expect("accept");
    for stream in [&client, &server] {
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
    }

    assert!(
        wait_for_source(&receiver, "flow", addresses.node, Duration::from_secs(3)).is_some(),
        "{context}: the flow is not masqueraded before the swap"
    );
    // The other flow's first packets may still be resolving its neighbour.
    assert!(
        eventually(Duration::from_secs(3), || entries_to(
            &topology.node,
            addresses.family,
            addresses.other
        )
        .len()
            == 1),
        "{context}: the other flow has no conntrack entry"
    );
    let other_before = entries_to(&topology.node, addresses.family, addresses.other);
    assert_eq!(other_before.len(), 1, "{context}: {other_before:?}");

    for (keep, expected) in [(true, addresses.pod), (false, addresses.node)] {
        volume.update(&config(keep, addresses));
        let took = wait_for_source(&receiver, "flow", expected, Duration::from_secs(3));
        assert!(
            took.is_some_and(|t| t < Duration::from_secs(1)),
            "{context}: after the swap (keep {keep}) the flow's packets reached the remote from {expected} after {took:?}, not within 1 s\n{}",
            agent.log()
        );
        // The other flow's entry is untouched: same tuple in both directions.
        assert_eq!(
            entries_to(&topology.node, addresses.family, addresses.other),
            other_before,
            "{context}: a flow outside the changed range was touched"
        );
    }
    agent.wait_for_log(
        "conntrack: flows carrying the old decision updated",
        2,
        Duration::from_secs(3),
    );
    drop(flow);

    // The TCP connection survived both swaps.
    client
        .write_all(b"ping")
        .expect("tcp write after the swaps");
    let mut buffer = [0u8; 4];
    server
        .read_exact(&mut buffer)
        .expect("tcp read after the swaps");
    assert_eq!(&buffer, b"ping", "{context}");
    server.write_all(b"pong").expect("tcp reply");
    client.read_exact(&mut buffer).expect("tcp reply read");
    assert_eq!(&buffer, b"pong", "{context}");
    let mut other_seen = [0u8; 16];
    other_receiver
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    assert!(
        other_receiver.recv_from(&mut other_seen).is_ok(),
        "{context}"
    );
    // TCP flows that keep the old decision are counted, not broken.
    let metrics = topology.node.http_get("127.0.0.1:9910", "/metrics").1;
    assert!(
        metrics.contains("ip_masq_agent_conntrack_deleted_flows_total{protocol=\"udp\"}"),
        "{context}: {metrics}"
    );
    agent.terminate();
}

macro_rules! on_every_setup {
    ($($name:ident: $flags:expr, $addresses:expr;)*) => {
        $(
            root_test!(
                fn $name() {
                    flip_flows($flags, &$addresses);
                }
            );
        )*
    };
}

on_every_setup! {
    udp_flows_follow_a_flip_on_iptables_nft_ipv4: &["--iptables-mode=nft"], V4;
    udp_flows_follow_a_flip_on_iptables_nft_ipv6: &["--iptables-mode=nft"], V6;
    udp_flows_follow_a_flip_on_iptables_legacy_ipv4: &["--iptables-mode=legacy"], V4;
    udp_flows_follow_a_flip_on_iptables_legacy_ipv6: &["--iptables-mode=legacy"], V6;
    udp_flows_follow_a_flip_on_nftables_ipv4: &["--backend=nftables"], V4;
    udp_flows_follow_a_flip_on_nftables_ipv6: &["--backend=nftables"], V6;
}

root_test!(
    /// rv1 (live-traffic review) #3: existing flows were re-decided only after a config
    /// change while the agent ran. Restarted with another config (a rollout changing the
    /// ConfigMap), or repairing a jump someone deleted, it wrote new rules and left the
    /// UDP flows the replaced rules had decided as they were, for as long as they lived.
    fn regression_flows_decided_by_replaced_rules_are_re_decided_after_a_restart_and_a_repair() {
        let topology = Topology::new();
        let node = &topology.node;
        let mut volume = ConfigMapVolume::new("nonMasqueradeCIDRs: []\nresyncInterval: 500ms\n");
        let mut agent = AGENT.start_synced(node, &volume, &["--iptables-mode=nft"]);
        let receiver = topology
            .remote
            .udp_socket(socket_address("0.0.0.0", FLOW_PORT));
        receiver
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let _kept = KeepAlive::start(
            topology.pod.udp_socket(socket_address(V4.pod, 0)),
            socket_address("10.99.0.10", FLOW_PORT),
            "kept",
            Duration::from_secs(25),
        );
        assert!(
            wait_for_source(&receiver, "kept", V4.node, Duration::from_secs(3)).is_some(),
            "masqueraded under the first config"
        );
        // A rollout: the agent stops, the ConfigMap changes, a new agent starts.
        agent.terminate();
        volume.update("nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 500ms\n");
        let mut agent = AGENT.start_synced(node, &volume, &["--iptables-mode=nft"]);
        let took = wait_for_source(&receiver, "kept", V4.pod, Duration::from_secs(3));
        assert!(
            took.is_some(),
            "the flow kept the replaced rules' decision after the restart\n{}",
            agent.log()
        );

        // Drift: the jump deleted by hand; a flow starts unmasqueraded meanwhile.
        let postrouting = node.sh(&["iptables-nft", "-t", "nat", "-S", "POSTROUTING"]);
        let rules: Vec<&str> = postrouting
            .lines()
            .filter(|l| l.starts_with("-A "))
            .collect();
        assert!(
            rules.len() == 1 && rules[0].ends_with("-j IP-MASQ-AGENT"),
            "{postrouting}"
        );
        node.sh(&["iptables-nft", "-t", "nat", "-D", "POSTROUTING", "1"]);
        let other = topology
            .remote
            .udp_socket(socket_address("0.0.0.0", OTHER_PORT));
        other
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let _started_meanwhile = KeepAlive::start(
            topology.pod.udp_socket(socket_address(V4.pod, 0)),
            socket_address("203.0.113.10", OTHER_PORT),
            "meanwhile",
            Duration::from_secs(20),
        );
        agent.wait_for_log(
            "the kernel's rules differed from the config; rewritten",
            1,
            Duration::from_secs(5),
        );
        assert!(
            wait_for_source(&other, "meanwhile", V4.node, Duration::from_secs(3)).is_some(),
            "the flow that started while the jump was missing stayed unmasqueraded\n{}",
            agent.log()
        );
    }
);

root_test!(
    /// rv5 (hostile review of the rv4 fixes) #3: two agents of two configs in one
    /// namespace (a rolling update whose new pods read a new ConfigMap, with maxSurge)
    /// rewrite each other's rules at every resync; each rewrite counted as a drift repair
    /// and re-decided existing flows, so a live UDP flow got a new source port every few
    /// seconds for as long as both ran.
    fn regression_two_agents_of_two_configs_do_not_churn_a_live_flow() {
        let topology = Topology::new();
        let node = &topology.node;
        let keep_less =
            ConfigMapVolume::new("nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 1s\n");
        let keep_more = ConfigMapVolume::new(
            "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12]\nresyncInterval: 1s\n",
        );
        let _first = AGENT.start_synced(node, &keep_less, &["--iptables-mode=nft"]);
        let receiver = topology
            .remote
            .udp_socket(socket_address("0.0.0.0", FLOW_PORT));
        receiver
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let _flow = KeepAlive::start(
            topology.pod.udp_socket(socket_address(V4.pod, 0)),
            socket_address("172.16.5.10", FLOW_PORT),
            "flow",
            Duration::from_secs(20),
        );
        assert!(wait_for_source(&receiver, "flow", V4.node, Duration::from_secs(3)).is_some());
        let mut second = AGENT.start_synced(
            node,
            &keep_more,
            &["--iptables-mode=nft", "--metrics-address=127.0.0.1:9911"],
        );
        // Let the first sync's own re-decision (a new config taking over) finish and the
        // flow settle, then watch its source port while the two keep rewriting each
        // other's rules.
        second.wait_for_log(" examined=", 1, Duration::from_secs(10));
        std::thread::sleep(Duration::from_secs(1));
        let mut ports = std::collections::BTreeSet::new();
        let mut buffer = [0u8; 64];
        let until = Instant::now() + Duration::from_secs(6);
        while Instant::now() < until {
            if let Ok((n, from)) = receiver.recv_from(&mut buffer)
                && &buffer[..n] == b"flow"
            {
                ports.insert((from.ip(), from.port()));
            }
        }
        assert_eq!(ports.len(), 1, "{ports:?}\n{}", second.log());
        second.wait_for_log(
            "another agent runs in this network namespace and its rules differ",
            1,
            Duration::from_secs(5),
        );
    }
);
