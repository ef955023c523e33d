//! The nftables backend in namespaces: the table it writes, switching between backends,
//! atomic replacement under rapid config changes, and 50,000 prefixes.

use std::time::{Duration, Instant};

use ima_harness::*;

use crate::AGENT;

fn agent_table(ns: &Netns) -> Option<String> {
    let out = ns.output(&["nft", "list", "table", "inet", "ip-masq-agent"]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn iptables_agent_lines(ns: &Netns) -> Vec<String> {
    let mut lines = Vec::new();
    for tool in ["iptables-nft-save", "ip6tables-nft-save"] {
        lines.extend(chain_lines(&ns.save(tool), "IP-MASQ-AGENT"));
    }
    // Legacy read whole: naming its nat table would create it.
    for tool in ["iptables-legacy-save", "ip6tables-legacy-save"] {
        lines.extend(chain_lines(&ns.sh(&[tool]), "IP-MASQ-AGENT"));
    }
    lines
}

root_test!(
    fn first_sync_lists_the_expected_table() {
        let node = Netns::new("node");
        // Overlapping and duplicate prefixes are merged before they reach the set.
        let volume = ConfigMapVolume::new(
            "nonMasqueradeCIDRs: [10.0.0.0/8, 10.1.0.0/16, 192.168.0.0/16, 10.0.0.0/8, 'fd00::/8']\n",
        );
        let mut agent = AGENT.start_synced(
            &node,
            &volume,
            &[
                "--backend=nftables",
                "--enable-ipv6",
                "--to-ports=1024-29999,32768-65535",
            ],
        );
        let expected = "\
table inet ip-masq-agent {
\tset non-masq-v4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 10.0.0.0/8, 192.168.0.0/16 }
\t}

\tset non-masq-v6 {
\t\ttype ipv6_addr
\t\tflags interval
\t\telements = { fd00::/8 }
\t}

\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat + 10; policy accept;
\t\tfib daddr type local return
\t\tmeta nfproto ipv4 jump masq-v4
\t\tmeta nfproto ipv6 jump masq-v6
\t}

\tchain masq-v4 {
\t\tip daddr 169.254.0.0/16 return
\t\tip daddr @non-masq-v4 return
\t\tmeta l4proto { tcp, udp, sctp } numgen random mod 61744 < 28976 masquerade to :1024-29999 fully-random
\t\tmeta l4proto { tcp, udp, sctp } masquerade to :32768-65535 fully-random
\t\tmasquerade fully-random
\t}

\tchain masq-v6 {
\t\tip6 daddr fe80::/10 return
\t\tip6 daddr @non-masq-v6 return
\t\tmeta l4proto { tcp, udp, sctp } numgen random mod 61744 < 28976 masquerade to :1024-29999 fully-random
\t\tmeta l4proto { tcp, udp, sctp } masquerade to :32768-65535 fully-random
\t\tmasquerade fully-random
\t}
}
";
        assert_eq!(agent_table(&node).as_deref(), Some(expected));
        // Nothing in iptables, and no other nft table was created.
        assert!(iptables_agent_lines(&node).is_empty());
        let tables = node.sh(&["nft", "list", "tables"]);
        assert_eq!(tables.trim(), "table inet ip-masq-agent");
        assert!(agent.terminate().success());
        assert!(
            agent_table(&node).is_some(),
            "SIGTERM leaves the table in place"
        );
    }
);

root_test!(
    fn switching_backends_leaves_exactly_one() {
        for flavour in ["nft", "legacy"] {
            let node = Netns::new("node");
            let volume = ConfigMapVolume::new("");
            let mode = format!("--iptables-mode={flavour}");
            let mut agent = AGENT.start_synced(
                &node,
                &volume,
                &["--backend=iptables", &mode, "--enable-ipv6"],
            );
            agent.terminate();
            assert_eq!(
                iptables_agent_lines(&node).len(),
                11,
                "{flavour}: both families"
            );
            assert!(agent_table(&node).is_none());

            let mut agent =
                AGENT.start_synced(&node, &volume, &["--backend=nftables", "--enable-ipv6"]);
            agent.wait_for_log(
                "removed the iptables backend's rules",
                2,
                Duration::from_secs(5),
            );
            agent.terminate();
            assert!(agent_table(&node).is_some());
            assert_eq!(
                iptables_agent_lines(&node),
                Vec::<String>::new(),
                "{flavour}"
            );

            let mut agent = AGENT.start_synced(
                &node,
                &volume,
                &["--backend=iptables", &mode, "--enable-ipv6"],
            );
            agent.wait_for_log(
                "removed the nftables backend's table",
                1,
                Duration::from_secs(5),
            );
            agent.terminate();
            assert!(agent_table(&node).is_none(), "{flavour}");
            assert_eq!(iptables_agent_lines(&node).len(), 11, "{flavour}");
        }
    }
);

root_test!(
    fn auto_picks_nftables_when_kube_proxy_runs_in_nftables_mode() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new("");
        let mut agent = AGENT.start_synced(&node, &volume, &["--backend=auto"]);
        agent.terminate();
        assert!(agent_table(&node).is_none());
        assert_eq!(iptables_agent_lines(&node).len(), 7);

        node.sh(&["nft", "add table ip kube-proxy"]);
        let mut agent = AGENT.start_synced(&node, &volume, &["--backend=auto"]);
        // The other backend's rules go after the first sync's "rules applied".
        agent.wait_for_log(
            "removed the iptables backend's rules",
            1,
            Duration::from_secs(5),
        );
        agent.terminate();
        assert!(agent_table(&node).is_some());
        assert!(iptables_agent_lines(&node).is_empty());
    }
);

root_test!(
    /// While the config flips between two lists every 100 ms, a destination inside both
    /// is never masqueraded and one outside both always is: no packet sees a half-applied
    /// table.
    fn rapid_config_flips_are_atomic() {
        let topology = Topology::new();
        const A: &str = "nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\nresyncInterval: 20ms\n";
        const B: &str = "nonMasqueradeCIDRs: [172.16.0.0/12, 10.0.0.0/8]\nresyncInterval: 20ms\n";
        let volume = ConfigMapVolume::new(A);
        let mut agent = AGENT.start_synced(&topology.node, &volume, &["--backend=nftables"]);
        let path = volume.path();
        let flipper = Flipper::start(
            volume,
            [A, B],
            Duration::from_millis(100),
            Duration::from_secs(10),
        );
        let mut probes = 0;
        while !flipper.is_finished() {
            assert!(
                !topology.is_masqueraded("10.99.0.10"),
                "inside both lists but masqueraded"
            );
            assert!(
                topology.is_masqueraded("203.0.113.10"),
                "outside both lists but kept"
            );
            probes += 2;
        }
        let flips = flipper.finish();
        let applied = agent.log().matches("config changed; rules applied").count();
        eprintln!(
            "{flips} flips, {applied} applied, {probes} probes ({})",
            path.display()
        );
        assert!(flips >= 80, "{flips}");
        assert!(
            applied >= flips / 2,
            "the agent applied only {applied} of {flips} flips"
        );
        assert!(probes >= 100, "only {probes} probes");
        assert!(agent.is_running());
    }
);

/// Rewrites the volume alternately with two configs on its own thread; stopped and
/// joined on drop, so a failing assertion still removes the volume.
struct Flipper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Flipper {
    fn start(
        mut volume: ConfigMapVolume,
        configs: [&'static str; 2],
        every: Duration,
        total: Duration,
    ) -> Flipper {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_seen = stop.clone();
        let thread = std::thread::spawn(move || {
            let until = Instant::now() + total;
            let mut flips = 0;
            while Instant::now() < until && !stop_seen.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(every);
                flips += 1;
                volume.update(configs[flips % 2]);
            }
            flips
        });
        Flipper {
            stop,
            thread: Some(thread),
        }
    }

    fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    fn finish(mut self) -> usize {
        self.thread.take().map_or(0, |t| t.join().expect("flipper"))
    }
}

impl Drop for Flipper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

root_test!(
    fn fifty_thousand_prefixes_load_and_decide() {
        let topology = Topology::new();
        let mut config = String::from("cidrLimit: 50000\nnonMasqueradeCIDRs:\n");
        // 50,000 disjoint /24s in 11.0.0.0/8 and beyond, plus the remote's 10.99.0.0/16.
        for i in 0..49_999u32 {
            let base = 0x0B00_0000u32 + (i << 9);
            config.push_str(&format!(
                "  - {}.{}.{}.0/24\n",
                base >> 24,
                (base >> 16) & 0xFF,
                (base >> 8) & 0xFF
            ));
        }
        config.push_str("  - 10.99.0.0/16\n");
        let volume = ConfigMapVolume::new(&config);
        let _agent = AGENT.start_synced(&topology.node, &volume, &["--backend=nftables"]);
        let set = topology
            .node
            .sh(&["nft", "list", "set", "inet", "ip-masq-agent", "non-masq-v4"]);
        assert_eq!(set.matches("/24").count(), 49_999);
        assert!(!topology.is_masqueraded("10.99.0.10"));
        assert!(topology.is_masqueraded("203.0.113.10"));
    }
);

fn many_prefixes(count: u32, extra: &str) -> String {
    let mut config = String::from("cidrLimit: 100000\nresyncInterval: 60s\nnonMasqueradeCIDRs:\n");
    for i in 0..count {
        let v = 0x0B00_0000u32 + (i << 9);
        config.push_str(&format!(
            "- {}.{}.{}.0/24\n",
            v >> 24,
            (v >> 16) & 255,
            (v >> 8) & 255
        ));
    }
    config.push_str(extra);
    config
}

root_test!(
    /// A change of one prefix in a long list is one transaction of element changes: the
    /// table, its chains and the other elements are not rewritten. Drift (an element
    /// deleted by hand) is still repaired in full.
    fn a_changed_prefix_writes_only_that_element() {
        let topology = Topology::new();
        let mut volume = ConfigMapVolume::new(&many_prefixes(2000, "- 203.0.113.0/24\n"));
        let mut agent = AGENT.start_synced(&topology.node, &volume, &["--backend=nftables"]);
        assert!(!topology.is_masqueraded("203.0.113.10"));
        let monitor = NftMonitor::start(&topology.node);
        volume.update(&many_prefixes(2000, "- 198.51.100.0/24\n"));
        agent.wait_for_log("config changed; rules applied", 1, Duration::from_secs(10));
        assert!(topology.is_masqueraded("203.0.113.10"));
        assert!(eventually(Duration::from_secs(3), || monitor
            .text()
            .contains("198.51.100.0/24")));
        let written = monitor.text();
        let changes: Vec<&str> = written
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .collect();
        assert_eq!(
            changes,
            [
                "delete element inet ip-masq-agent non-masq-v4 { 203.0.113.0/24 }",
                "add element inet ip-masq-agent non-masq-v4 { 198.51.100.0/24 }"
            ],
            "{written}"
        );
        // Drift: an element deleted by hand, then a change that would delete it again.
        topology.node.sh(&[
            "nft",
            "delete element inet ip-masq-agent non-masq-v4 { 198.51.100.0/24 }",
        ]);
        volume.update(&many_prefixes(2000, "- 192.0.2.128/25\n"));
        agent.wait_for_log("config changed; rules applied", 2, Duration::from_secs(10));
        let path = volume.path();
        assert!(
            AGENT
                .run(
                    &topology.node,
                    [
                        "status",
                        "--backend=nftables",
                        "--config",
                        path.to_str().unwrap()
                    ]
                )
                .status
                .success(),
            "{}",
            agent.log()
        );
    }
);
