//! pod -> node -> remote in three namespaces, and a UDP probe of the source address the
//! remote sees.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::Netns;
use crate::netns::next_id;

pub const POD_V4: &str = "10.244.1.2";
pub const POD_V6: &str = "fd00:244::2";
pub const NODE_V4: &str = "192.0.2.1";
pub const NODE_V6: &str = "2001:db8:1::1";
pub const V4_PORT: u16 = 9999;
pub const V6_PORT: u16 = 9998;

/// Destinations the remote namespace owns.
pub const REMOTE_DESTINATIONS: [&str; 8] = [
    "203.0.113.10",
    "10.99.0.10",
    "172.16.5.10",
    "192.168.5.10",
    "169.254.5.10",
    "100.64.0.10",
    "2001:db8:99::10",
    "fd00:99::10",
];

/// pod -> node -> remote, joined by veth; the agent runs in `node`.
pub struct Topology {
    pub pod: Netns,
    pub node: Netns,
    pub remote: Netns,
    remote_v4: UdpSocket,
    remote_v6: UdpSocket,
}

impl Topology {
    pub fn new() -> Topology {
        let pod = Netns::new("pod");
        let node = Netns::new("node");
        let remote = Netns::new("remote");
        let ip = |ns: &Netns, args: &str| {
            let mut full = vec!["ip"];
            full.extend(args.split_whitespace());
            ns.sh(&full);
        };
        ip(
            &pod,
            &format!("link add eth0 type veth peer name pod0 netns {}", node.name),
        );
        ip(
            &node,
            &format!(
                "link add eth1 type veth peer name eth0 netns {}",
                remote.name
            ),
        );
        for (ns, dev) in [
            (&pod, "eth0"),
            (&node, "pod0"),
            (&node, "eth1"),
            (&remote, "eth0"),
        ] {
            ip(ns, &format!("link set {dev} up"));
        }
        for (ns, v4, v6, dev) in [
            (&pod, "10.244.1.2/24", "fd00:244::2/64", "eth0"),
            (&node, "10.244.1.1/24", "fd00:244::1/64", "pod0"),
            (&node, "192.0.2.1/24", "2001:db8:1::1/64", "eth1"),
            (&remote, "192.0.2.2/24", "2001:db8:1::2/64", "eth0"),
        ] {
            ip(ns, &format!("addr add {v4} dev {dev}"));
            ip(ns, &format!("-6 addr add {v6} dev {dev} nodad"));
        }
        for dest in REMOTE_DESTINATIONS {
            let prefix = if dest.contains(':') { "128" } else { "32" };
            ip(&remote, &format!("addr add {dest}/{prefix} dev lo"));
        }
        ip(&pod, "route add default via 10.244.1.1");
        ip(&pod, "-6 route add default via fd00:244::1");
        ip(&node, "route add default via 192.0.2.2");
        ip(&node, "-6 route add default via 2001:db8:1::2");
        ip(&remote, "route add 10.244.1.0/24 via 192.0.2.1");
        ip(&remote, "-6 route add fd00:244::/64 via 2001:db8:1::1");
        node.sh(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        node.sh(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]);
        let remote_v4 = remote.udp_socket(format!("0.0.0.0:{V4_PORT}").parse().unwrap());
        let remote_v6 = remote.udp_socket(format!("[::]:{V6_PORT}").parse().unwrap());
        for s in [&remote_v4, &remote_v6] {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
        }
        Topology {
            pod,
            node,
            remote,
            remote_v4,
            remote_v6,
        }
    }

    /// Sends UDP from the pod to `destination` (owned by the remote) from a fresh
    /// source port, so each probe is a new conntrack entry, and returns the source
    /// address the remote saw. Bounded: at most 10 sends over about 2 s.
    pub fn observed_source(&self, destination: &str) -> IpAddr {
        probe_source(&self.pod, destination, &self.remote_v4, &self.remote_v6)
    }

    pub fn is_masqueraded(&self, destination: &str) -> bool {
        let source = self.observed_source(destination);
        let (pod, node) = if destination.contains(':') {
            (POD_V6, NODE_V6)
        } else {
            (POD_V4, NODE_V4)
        };
        match source.to_string() {
            s if s == node => true,
            s if s == pod => false,
            other => panic!("remote saw unexpected source {other} for {destination}"),
        }
    }
}

/// Sends UDP from `pod` to `destination` from a fresh source port (a new conntrack entry
/// per probe) and returns the source address the receiving remote saw. Bounded: at most
/// 10 sends over about 2 s.
fn probe_source(pod: &Netns, destination: &str, v4: &UdpSocket, v6: &UdpSocket) -> IpAddr {
    let bind: SocketAddr = if destination.contains(':') {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    probe_source_from(&pod.udp_socket(bind), destination, v4, v6)
}

/// [`probe_source`] from `sender` (a pod socket: the same 5-tuple every time).
fn probe_source_from(
    sender: &UdpSocket,
    destination: &str,
    v4: &UdpSocket,
    v6: &UdpSocket,
) -> IpAddr {
    let dest: IpAddr = destination.parse().expect("destination address");
    let (port, receiver): (u16, &UdpSocket) = match dest {
        IpAddr::V4(_) => (V4_PORT, v4),
        IpAddr::V6(_) => (V6_PORT, v6),
    };
    let nonce = format!("probe-{}-{}", std::process::id(), next_id());
    let mut buf = [0u8; 128];
    for _ in 0..10 {
        // The pod's neighbour entries may still be resolving on the first send.
        let _ = sender.send_to(nonce.as_bytes(), SocketAddr::new(dest, port));
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            if let Ok((n, from)) = receiver.recv_from(&mut buf)
                && &buf[..n] == nonce.as_bytes()
            {
                return from.ip();
            }
        }
    }
    panic!("probe to {destination} never reached its remote namespace");
}

/// The node's second uplink (eth2) and its remote.
pub const UPLINK_B_NODE_V4: &str = "198.51.100.1";
pub const UPLINK_B_NODE_V6: &str = "2001:db8:2::1";
/// Destinations behind the second uplink (routed there by the node), owned by remote B.
pub const REMOTE_B_DESTINATIONS: [&str; 2] = ["100.100.0.10", "2001:db8:b::10"];
/// A secondary address of the first uplink (eth1): the address a fixed SNAT can use. The
/// IPv6 one is added with `preferred_lft 0`, so it is local but never a chosen source.
pub const UPLINK_A_SECONDARY_V4: &str = "192.0.2.100";
pub const UPLINK_A_SECONDARY_V6: &str = "2001:db8:1::100";

/// A multihomed node: the [`Topology`] (pod -> node -> remote A behind eth1) plus a second
/// uplink eth2 to remote B, which owns [`REMOTE_B_DESTINATIONS`]; eth1 also holds
/// [`UPLINK_A_SECONDARY_V4`] and [`UPLINK_A_SECONDARY_V6`].
pub struct Multihomed {
    pub topology: Topology,
    pub remote_b: Netns,
    remote_b_v4: UdpSocket,
    remote_b_v6: UdpSocket,
}

impl Multihomed {
    pub fn new() -> Multihomed {
        let topology = Topology::new();
        let remote_b = Netns::new("remoteb");
        let node = &topology.node;
        let ip = |ns: &Netns, args: &str| {
            let mut full = vec!["ip"];
            full.extend(args.split_whitespace());
            ns.sh(&full);
        };
        ip(
            node,
            &format!(
                "link add eth2 type veth peer name eth0 netns {}",
                remote_b.name
            ),
        );
        ip(node, "link set eth2 up");
        ip(&remote_b, "link set eth0 up");
        ip(&remote_b, "link set lo up");
        ip(node, &format!("addr add {UPLINK_B_NODE_V4}/24 dev eth2"));
        ip(
            node,
            &format!("-6 addr add {UPLINK_B_NODE_V6}/64 dev eth2 nodad"),
        );
        ip(&remote_b, "addr add 198.51.100.2/24 dev eth0");
        ip(&remote_b, "-6 addr add 2001:db8:2::2/64 dev eth0 nodad");
        for dest in REMOTE_B_DESTINATIONS {
            let prefix = if dest.contains(':') { "128" } else { "32" };
            ip(&remote_b, &format!("addr add {dest}/{prefix} dev lo"));
        }
        ip(node, "route add 100.100.0.0/16 via 198.51.100.2");
        ip(node, "-6 route add 2001:db8:b::/48 via 2001:db8:2::2");
        ip(&remote_b, "route add 10.244.1.0/24 via 198.51.100.1");
        ip(&remote_b, "-6 route add fd00:244::/64 via 2001:db8:2::1");
        ip(
            node,
            &format!("addr add {UPLINK_A_SECONDARY_V4}/24 dev eth1"),
        );
        ip(
            node,
            &format!("-6 addr add {UPLINK_A_SECONDARY_V6}/64 dev eth1 nodad preferred_lft 0"),
        );
        let remote_b_v4 = remote_b.udp_socket(format!("0.0.0.0:{V4_PORT}").parse().unwrap());
        let remote_b_v6 = remote_b.udp_socket(format!("[::]:{V6_PORT}").parse().unwrap());
        for s in [&remote_b_v4, &remote_b_v6] {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
        }
        Multihomed {
            topology,
            remote_b,
            remote_b_v4,
            remote_b_v6,
        }
    }

    /// The source address remote B saw for a probe sent from `sender`, a socket of the
    /// pod's (one 5-tuple, one conntrack entry, across calls).
    pub fn observed_source_from(&self, sender: &UdpSocket, destination: &str) -> IpAddr {
        probe_source_from(sender, destination, &self.remote_b_v4, &self.remote_b_v6)
    }

    /// The source address the remote owning `destination` (A or B) saw for a probe.
    pub fn observed_source(&self, destination: &str) -> IpAddr {
        if REMOTE_B_DESTINATIONS.contains(&destination) {
            probe_source(
                &self.topology.pod,
                destination,
                &self.remote_b_v4,
                &self.remote_b_v6,
            )
        } else {
            self.topology.observed_source(destination)
        }
    }
}

impl Default for Multihomed {
    fn default() -> Multihomed {
        Multihomed::new()
    }
}

impl Default for Topology {
    fn default() -> Topology {
        Topology::new()
    }
}
