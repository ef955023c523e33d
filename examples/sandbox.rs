//! A throwaway sandbox that shows the agent masquerading: a pod, a node where the
//! agent runs and a remote that owns every destination, all network namespaces made
//! here and deleted on exit. Run as root: `scripts/sandbox.sh`.

use std::time::Duration;

use ima_harness::*;

const FIRST: &str = "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 172.16.0.0/12\n  - 192.168.0.0/16\n  - fd00:99::/32\nresyncInterval: 1s\n";
const SECOND: &str =
    "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 203.0.113.0/24\nresyncInterval: 1s\n";
const DESTINATIONS: [&str; 7] = [
    "203.0.113.10",
    "100.64.0.10",
    "10.99.0.10",
    "192.168.5.10",
    "169.254.5.10",
    "2001:db8:99::10",
    "fd00:99::10",
];

fn show_sources(topology: &Topology) {
    println!("  {:<18} {:<16} result", "destination", "remote saw");
    for destination in DESTINATIONS {
        let seen = topology.observed_source(destination).to_string();
        let verdict = if seen == NODE_V4 || seen == NODE_V6 {
            "MASQUERADED (node address)"
        } else {
            "kept the pod address"
        };
        println!("  {destination:<18} {seen:<16} {verdict}");
    }
}

fn main() {
    if !require_root() {
        std::process::exit(1);
    }
    println!("sandbox: pod {POD_V4} / {POD_V6} -> node {NODE_V4} / {NODE_V6} (agent) -> remote");
    // Built beside it: `cargo build --release --bin ip-masq-agent --example sandbox`.
    let agent_binary = Agent::beside_current_exe();
    let topology = Topology::new();
    let mut volume = ConfigMapVolume::new(FIRST);
    let path = volume.path();
    println!(
        "\nConfigMap volume {} holds:\n{FIRST}",
        volume.dir.path.display()
    );
    let mut agent = agent_binary.start(
        &topology.node,
        &[
            "--config",
            path.to_str().unwrap_or_default(),
            "--enable-ipv6",
        ],
    );
    agent.wait_for_log("rules applied", 1, Duration::from_secs(10));

    println!(
        "The agent (pid {}) installed, in the node's nat table:",
        agent.pid()
    );
    for line in chain_lines(&topology.node.save("iptables-save"), "IP-MASQ-AGENT") {
        println!("  {line}");
    }
    println!("\nUDP from the pod; the remote namespace reports the source address it saw:");
    show_sources(&topology);

    println!("\nSwapping the ConfigMap the way kubelet does (new ..data) to:\n{SECOND}");
    volume.update(SECOND);
    agent.wait_for_log("config changed; rules applied", 1, Duration::from_secs(5));
    show_sources(&topology);

    println!("\nWriting a broken config; the agent keeps the last good rules:");
    volume.update("nonMasqueradeCIDRs: [10.0.0.1/8]\n");
    agent.wait_for_log("config rejected", 1, Duration::from_secs(5));
    if let Some(line) = agent.log().lines().find(|l| l.contains("config rejected")) {
        println!("  agent log: {line}");
    }
    show_sources(&topology);

    let status = agent.terminate();
    println!("\nAgent stopped ({status}); deleting the namespaces.");
}
