//! Live reload, write-free resyncs, drift repair, hostile input, lock contention,
//! failing tools and cleanup — each in namespaces the test creates.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use ima_harness::*;
use nix::sys::signal::Signal;

use crate::AGENT;

const CHAIN: &str = "IP-MASQ-AGENT";

fn our_lines(ns: &Netns) -> Vec<String> {
    chain_lines(&ns.save("iptables-nft-save"), CHAIN)
}

fn nft_table(ns: &Netns) -> Option<String> {
    let out = ns.output(&["nft", "list", "table", "inet", "ip-masq-agent"]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the backend wrote, as the kernel lists it.
fn kernel_state(ns: &Netns, backend: &str) -> String {
    if backend.ends_with("nftables") {
        nft_table(ns).unwrap_or_default()
    } else {
        our_lines(ns).join("\n")
    }
}

on_both_backends!(swap_applies_without_waiting_for_the_resync);
on_both_backends!(idle_resyncs_write_nothing);

fn swap_applies_without_waiting_for_the_resync(backend: &str) {
    let node = Netns::new("node");
    let mut volume = ConfigMapVolume::new("nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 1h\n");
    let mut agent = AGENT.start_synced(&node, &volume, &[backend]);
    volume.update("nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]\nresyncInterval: 1h\n");
    // With a one-hour resync only the directory watch can explain the change.
    agent.wait_for_log("config changed; rules applied", 1, Duration::from_secs(5));
    assert!(kernel_state(&node, backend).contains("198.51.100.0/24"));
}

fn idle_resyncs_write_nothing(backend: &str) {
    let node = Netns::new("node");
    let volume = ConfigMapVolume::new("resyncInterval: 100ms\n");
    let mut agent = AGENT.start_synced(&node, &volume, &[backend, "--iptables-mode=nft"]);
    let monitor = NftMonitor::start(&node);
    std::thread::sleep(Duration::from_millis(300));
    let before = agent.log().matches("rules resynced").count();
    agent.wait_for_log("rules resynced", before + 10, Duration::from_secs(5));
    // A marker proves the monitor was listening the whole time.
    node.sh(&["nft", "add table inet marker"]);
    assert!(eventually(Duration::from_secs(3), || {
        monitor.text().contains("marker")
    }));
    let seen: String = monitor
        .text()
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| format!("{line}\n"))
        .collect();
    let before_marker = &seen[..seen.find("add table inet marker").unwrap_or(seen.len())];
    assert_eq!(before_marker.trim(), "", "idle resyncs wrote to the kernel");
}

struct MonitorGuard(Child);
impl MonitorGuard {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
impl Drop for MonitorGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

root_test!(
    fn sighup_forces_a_reload() {
        let node = Netns::new("node");
        // The config is a symlink into a directory the agent does not watch.
        let target_dir = TempDir::new("target");
        let link_dir = TempDir::new("link");
        let target = target_dir.path.join("config");
        std::fs::write(
            &target,
            "nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 1h\n",
        )
        .unwrap();
        let link = link_dir.path.join("ip-masq-agent");
        symlink(&target, &link).unwrap();
        let mut agent = AGENT.start(&node, &["--config", link.to_str().unwrap()]);
        agent.wait_for_log("rules applied", 1, Duration::from_secs(10));
        std::fs::write(
            &target,
            "nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]\nresyncInterval: 1h\n",
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !our_lines(&node).join("\n").contains("198.51.100.0/24"),
            "changed without SIGHUP"
        );
        agent.signal(Signal::SIGHUP);
        agent.wait_for_log("config changed; rules applied", 1, Duration::from_secs(5));
        assert!(our_lines(&node).join("\n").contains("198.51.100.0/24"));
    }
);

root_test!(
    fn iptables_drift_is_repaired_at_the_next_resync() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new("resyncInterval: 200ms\n");
        let mut agent = AGENT.start_synced(&node, &volume, &["--iptables-mode=nft"]);
        let good = our_lines(&node);
        let jump: Vec<String> = shell_words(&good[1]).into_iter().skip(2).collect();
        let drifts: Vec<Vec<String>> = vec![
            vec!["-F".into(), CHAIN.into()],
            vec![
                "-R".into(),
                CHAIN.into(),
                "2".into(),
                "-d".into(),
                "10.0.0.0/9".into(),
                "-j".into(),
                "RETURN".into(),
            ],
            vec![
                "-I".into(),
                CHAIN.into(),
                "1".into(),
                "-j".into(),
                "RETURN".into(),
            ],
            [vec!["-D".into(), "POSTROUTING".into()], jump].concat(),
        ];
        for (i, drift) in drifts.iter().enumerate() {
            let mut args = vec!["iptables-nft", "-t", "nat"];
            args.extend(drift.iter().map(String::as_str));
            node.sh(&args);
            assert_ne!(our_lines(&node), good, "drift {drift:?} did nothing");
            assert!(
                eventually(Duration::from_secs(3), || our_lines(&node) == good),
                "drift {drift:?} not repaired: {:#?}",
                our_lines(&node)
            );
            agent.wait_for_log(
                "differed from the config; rewritten",
                i + 1,
                Duration::from_secs(3),
            );
        }
    }
);

root_test!(
    fn nftables_drift_is_repaired_at_the_next_resync() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new("resyncInterval: 200ms\n");
        let mut agent = AGENT.start_synced(&node, &volume, &["--backend=nftables"]);
        let good = nft_table(&node).expect("table");
        for (i, drift) in [
            "delete table inet ip-masq-agent",
            "add element inet ip-masq-agent non-masq-v4 { 198.51.100.0/24 }",
            "flush chain inet ip-masq-agent masq-v4",
        ]
        .iter()
        .enumerate()
        {
            node.sh(&["nft", drift]);
            assert_ne!(
                nft_table(&node).as_ref(),
                Some(&good),
                "{drift} did nothing"
            );
            assert!(
                eventually(Duration::from_secs(3), || nft_table(&node).as_ref()
                    == Some(&good)),
                "{drift} not repaired"
            );
            agent.wait_for_log(
                "differed from the config; rewritten",
                i + 1,
                Duration::from_secs(3),
            );
        }
    }
);

root_test!(
    /// Every bad input keeps the previous rules, logs one error naming the file and what is
    /// wrong, and leaves the agent running. The agent runs without CAP_DAC_OVERRIDE so an
    /// unreadable file is unreadable even though the test runs as root.
    fn hostile_inputs_never_lose_the_rules() {
        let topology = Topology::new();
        let mut volume = ConfigMapVolume::new(
            "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 203.0.113.0/24]\nresyncInterval: 100ms\n",
        );
        let path = volume.path();
        let mut agent = AGENT.start_with(
            &topology.node,
            &["--config", path.to_str().unwrap()],
            &["setpriv", "--bounding-set=-dac_override,-dac_read_search"],
            &[],
        );
        agent.wait_for_log("rules applied", 1, Duration::from_secs(10));
        let good = our_lines(&topology.node);
        assert!(!topology.is_masqueraded("203.0.113.10"));

        type Fill = Box<dyn Fn(&Path)>;
        let text = |content: &'static str| -> Fill {
            Box::new(move |dir: &Path| std::fs::write(dir.join(CONFIG_KEY), content).unwrap())
        };
        let cases: Vec<(&str, Fill, &str)> = vec![
            (
                "invalid YAML",
                text("nonMasqueradeCIDRs: [10.0.0.0/8\n"),
                "not valid YAML or JSON",
            ),
            (
                "invalid JSON",
                text("{\"nonMasqueradeCIDRs\": [\"10.0.0.0/8\",]}"),
                "not valid YAML or JSON",
            ),
            (
                "trailing garbage",
                text("{\"masqLinkLocal\": true} and more"),
                "trailing characters",
            ),
            (
                "string for the list",
                text("nonMasqueradeCIDRs: 10.0.0.0/8\n"),
                "nonMasqueradeCIDRs: expected a list of CIDR strings",
            ),
            (
                "number for resyncInterval",
                text("resyncInterval: 60\n"),
                "resyncInterval: expected a duration string",
            ),
            (
                "invalid CIDR",
                text("nonMasqueradeCIDRs: [10.0.0.0/33]\n"),
                "could not be parsed, invalid CIDR address: 10.0.0.0/33",
            ),
            (
                "misaligned CIDR",
                text("nonMasqueradeCIDRs: [10.0.0.1/8]\n"),
                "is not aligned to a CIDR block",
            ),
            (
                "space-padded CIDR",
                text("nonMasqueradeCIDRs: [' 10.0.0.0/8']\n"),
                "could not be parsed, invalid CIDR address:  10.0.0.0/8",
            ),
            (
                "IPv4-mapped IPv6",
                text("nonMasqueradeCIDRs: ['::ffff:10.0.0.0/104']\n"),
                "IPv4-mapped IPv6 prefix",
            ),
            (
                "too many CIDRs",
                text("cidrLimit: 1\nnonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\n"),
                "can only accept up to 1 CIDRs",
            ),
            (
                "zero interval",
                text("resyncInterval: 0s\n"),
                "\"0s\" must be a positive duration",
            ),
            (
                "negative interval",
                text("resyncInterval: -1m\n"),
                "\"-1m\" must be a positive duration",
            ),
            (
                "unreadable file",
                Box::new(|dir: &Path| {
                    let file = dir.join(CONFIG_KEY);
                    std::fs::write(&file, "nonMasqueradeCIDRs: []\n").unwrap();
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000))
                        .unwrap();
                }),
                "cannot read config file: Permission denied",
            ),
            (
                "directory",
                Box::new(|dir: &Path| std::fs::create_dir(dir.join(CONFIG_KEY)).unwrap()),
                "is a directory",
            ),
            (
                "binary file",
                Box::new(|dir: &Path| {
                    std::fs::write(
                        dir.join(CONFIG_KEY),
                        [0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0xff, 0xfe],
                    )
                    .unwrap()
                }),
                "not UTF-8 text",
            ),
            (
                "100 MB file",
                Box::new(|dir: &Path| {
                    let file = std::fs::File::create(dir.join(CONFIG_KEY)).unwrap();
                    file.set_len(100 * 1024 * 1024).unwrap();
                }),
                "larger than the 4194304 bytes",
            ),
            (
                "symlink loop",
                Box::new(|dir: &Path| symlink(CONFIG_KEY, dir.join(CONFIG_KEY)).unwrap()),
                "Too many levels of symbolic links",
            ),
        ];
        for (name, fill, message) in &cases {
            volume.update_with(|dir| fill(dir));
            agent.wait_for_log(message, 1, Duration::from_secs(3));
            let line = agent
                .log()
                .lines()
                .find(|l| l.contains(message))
                .unwrap_or_default()
                .to_string();
            assert!(
                line.contains("ERROR config rejected, keeping the last good rules"),
                "{name}: {line}"
            );
            assert!(
                line.contains(&path.display().to_string()),
                "{name}: the message names the file: {line}"
            );
            assert_eq!(our_lines(&topology.node), good, "{name} changed the rules");
            assert!(agent.is_running(), "{name} stopped the agent");
        }
        // The last error, repeated at every resync, is logged once.
        std::thread::sleep(Duration::from_millis(600));
        let logged = agent
            .log()
            .lines()
            .filter(|l| l.contains("ERROR") && l.contains("Too many levels of symbolic links"))
            .count();
        assert_eq!(logged, 1);
        assert!(
            !topology.is_masqueraded("203.0.113.10"),
            "packet behaviour changed"
        );

        // Deleting the file (ConfigMap removed) reverts to the defaults, as upstream does.
        volume.update_with(|_| {});
        agent.wait_for_log(
            "config file removed; reverting to the default values",
            1,
            Duration::from_secs(3),
        );
        assert!(eventually(Duration::from_secs(3), || topology
            .is_masqueraded("203.0.113.10")));
    }
);

root_test!(
    fn a_held_xtables_lock_delays_but_does_not_break_syncs() {
        let node = Netns::new("node");
        // A private lock file: holding the host's /run/xtables.lock would stall the host.
        let dir = TempDir::new("lock");
        let lock = dir.path.join("xtables.lock");
        std::fs::write(&lock, "").unwrap();
        let mut holder = MonitorGuard(
            std::process::Command::new("flock")
                .args(["-x", lock.to_str().unwrap(), "sleep", "15"])
                .spawn()
                .expect("flock"),
        );
        std::thread::sleep(Duration::from_millis(200));
        let volume = ConfigMapVolume::new("resyncInterval: 2s\n");
        let path = volume.path();
        let mut agent = AGENT.start_with(
            &node,
            &["--config", path.to_str().unwrap(), "--iptables-mode=legacy"],
            &[],
            &[("XTABLES_LOCKFILE", lock.to_str().unwrap())],
        );
        agent.wait_for_log(
            "syncing masquerade rules failed",
            1,
            Duration::from_secs(10),
        );
        assert!(agent.log().contains("xtables lock"), "{}", agent.log());
        assert!(chain_lines(&node.sh(&["iptables-legacy-save"]), CHAIN).is_empty());
        assert!(agent.is_running());
        holder.0.wait().expect("flock ends");
        agent.wait_for_log("rules applied", 1, Duration::from_secs(15));
        agent.wait_for_log("rules written again after", 1, Duration::from_secs(1));
        assert_eq!(
            chain_lines(&node.sh(&["iptables-legacy-save"]), CHAIN).len(),
            7
        );
        holder.stop();
    }
);

root_test!(
    fn a_failing_restore_is_retried_with_backoff() {
        let node = Netns::new("node");
        let shims = Shims::new();
        shims.add(
            "iptables-nft-restore",
            "echo 'simulated failure' >&2; exit 1",
        );
        shims.fault_on("iptables-nft-restore");
        let path = shims.path();
        let volume = ConfigMapVolume::new("resyncInterval: 10s\n");
        let config = volume.path();
        let mut agent = AGENT.start_with(
            &node,
            &["--config", config.to_str().unwrap(), "--iptables-mode=nft"],
            &[],
            &[("PATH", &path)],
        );
        // Retries after 1 s, 2 s, 4 s: the fourth attempt comes about 7 s in, well
        // before the 10 s resync interval would allow.
        agent.wait_for_log("simulated failure", 3, Duration::from_secs(6));
        assert!(agent.log().contains("attempt=3"), "{}", agent.log());
        assert!(our_lines(&node).is_empty());
        shims.fault_off("iptables-nft-restore");
        agent.wait_for_log("rules applied", 1, Duration::from_secs(10));
        assert_eq!(our_lines(&node).len(), 7);
    }
);

root_test!(
    fn cleanup_removes_everything_the_agent_installs_and_nothing_else() {
        let node = Netns::new("node");
        node.sh_line("iptables-nft -t nat -A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE");
        node.sh_line("iptables-legacy -t nat -A POSTROUTING -s 172.18.0.0/16 -j MASQUERADE");
        node.sh(&["nft", "add table inet foreign"]);
        let nft_before = node.save("iptables-nft-save");
        let legacy_before = node.sh(&["iptables-legacy-save", "-t", "nat"]);
        let volume = ConfigMapVolume::new("");
        // The agent's rules everywhere: legacy under an old chain name, the nft flavour
        // (both families) and the nftables table. A running agent removes its rules
        // from the flavour it does not work in, so only the first is written by one;
        // the others are what `render` prints, loaded by hand.
        let mut agent = AGENT.start_synced(
            &node,
            &volume,
            &["--iptables-mode=legacy", "--masq-chain=OLD-MASQ"],
        );
        agent.terminate();
        let rendered = node.sh(&[
            AGENT.path_str(),
            "render",
            "--enable-ipv6",
            "--config=/nonexistent",
        ]);
        let at = rendered.find("# ip6tables-restore").expect("an IPv6 part");
        let (v4, v6) = rendered.split_at(at);
        for (restore, input) in [("iptables-nft-restore", v4), ("ip6tables-nft-restore", v6)] {
            let mut child = node
                .command(restore)
                .arg("--noflush")
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
            assert!(child.wait().unwrap().success(), "{restore}");
        }
        let rendered = node.sh(&[
            AGENT.path_str(),
            "render",
            "--backend=nftables",
            "--config=/nonexistent",
        ]);
        let mut nft = node
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut nft.stdin.take().unwrap(), rendered.as_bytes()).unwrap();
        assert!(nft.wait().unwrap().success());

        let out = node.sh(&[AGENT.path_str(), "cleanup"]);
        for place in [
            "iptables-nft",
            "ip6tables-nft",
            "iptables-legacy",
            "nft table inet ip-masq-agent",
        ] {
            assert!(out.contains(&format!("from {place}\n")), "{out}");
        }
        assert_eq!(node.save("iptables-nft-save"), nft_before);
        assert_eq!(
            node.sh(&["iptables-legacy-save", "-t", "nat"])
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>(),
            legacy_before
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
        );
        assert!(chain_lines(&node.save("ip6tables-nft-save"), CHAIN).is_empty());
        assert_eq!(
            node.sh(&["nft", "list", "tables"])
                .lines()
                .filter(|l| l.contains("inet"))
                .collect::<Vec<_>>(),
            vec!["table inet foreign"]
        );
        assert_eq!(
            node.sh(&[AGENT.path_str(), "cleanup"]).trim(),
            "nothing to remove"
        );
    }
);

root_test!(
    fn cleanup_on_exit_removes_the_rules_on_sigterm() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new("");
        let mut agent = AGENT.start_synced(
            &node,
            &volume,
            &["--cleanup-on-exit", "--iptables-mode=nft"],
        );
        assert_eq!(our_lines(&node).len(), 7);
        assert!(agent.terminate().success());
        assert!(our_lines(&node).is_empty());
    }
);

root_test!(
    fn a_renamed_chain_is_removed_at_start() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new("");
        let mut agent = AGENT.start_synced(
            &node,
            &volume,
            &["--masq-chain=OLD-MASQ", "--iptables-mode=nft"],
        );
        agent.terminate();
        assert_eq!(
            chain_lines(&node.save("iptables-nft-save"), "OLD-MASQ").len(),
            7
        );
        let mut agent = AGENT.start_synced(&node, &volume, &["--iptables-mode=nft"]);
        agent.terminate();
        let saved = node.save("iptables-nft-save");
        assert!(chain_lines(&saved, "OLD-MASQ").is_empty(), "{saved}");
        assert_eq!(saved.matches("-A POSTROUTING").count(), 1, "{saved}");
        assert_eq!(our_lines(&node).len(), 7);
    }
);

root_test!(
    fn config_dir_merges_every_ip_masq_file() {
        let node = Netns::new("node");
        let dir = TempDir::new("cfgdir");
        std::fs::write(
            dir.path.join("ip-masq-agent"),
            "nonMasqueradeCIDRs: [10.0.0.0/8]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path.join("ip-masq-extra"),
            "nonMasqueradeCIDRs: [10.1.0.0/16, 100.64.0.0/10]\n",
        )
        .unwrap();
        let mut agent = AGENT.start(
            &node,
            &[
                "--config-dir",
                dir.path.to_str().unwrap(),
                "--iptables-mode=nft",
            ],
        );
        agent.wait_for_log("rules applied", 1, Duration::from_secs(10));
        let lines = our_lines(&node).join("\n");
        for prefix in ["10.0.0.0/8", "10.1.0.0/16", "100.64.0.0/10"] {
            assert!(lines.contains(prefix), "{lines}");
        }
        assert!(
            agent.log().contains("which is inside 10.0.0.0/8"),
            "{}",
            agent.log()
        );
        std::fs::write(
            dir.path.join("ip-masq-more"),
            "nonMasqueradeCIDRs: [198.51.100.0/24]\n",
        )
        .unwrap();
        agent.wait_for_log("config changed; rules applied", 1, Duration::from_secs(5));
        assert!(our_lines(&node).join("\n").contains("198.51.100.0/24"));
    }
);
