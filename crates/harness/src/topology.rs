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
        let dest: IpAddr = destination.parse().expect("destination address");
        let (bind, port, receiver): (SocketAddr, u16, &UdpSocket) = match dest {
            IpAddr::V4(_) => ("0.0.0.0:0".parse().unwrap(), V4_PORT, &self.remote_v4),
            IpAddr::V6(_) => ("[::]:0".parse().unwrap(), V6_PORT, &self.remote_v6),
        };
        let sender = self.pod.udp_socket(bind);
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
        panic!("probe to {destination} never reached the remote namespace");
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

impl Default for Topology {
    fn default() -> Topology {
        Topology::new()
    }
}
