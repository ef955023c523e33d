//! Faults injected with real processes in namespaces the tests create: tools that hang,
//! fail or lie (PATH shims), SIGTERM and SIGKILL at bad moments, backend switches whose
//! clean-up fails, and hostile neighbours that look like the agent's own rules. Each
//! test is named after the defect it guards against.

use std::time::{Duration, Instant};

use ima_harness::*;

use crate::AGENT;

const CHAIN: &str = "IP-MASQ-AGENT";
const ENDPOINT: &str = "127.0.0.1:9910";

/// The agent's lines in the iptables-nft nat table (its jump and chain).
fn our_lines(ns: &Netns) -> Vec<String> {
    chain_lines(&ns.save("iptables-nft-save"), CHAIN)
}

fn health(ns: &Netns) -> (u16, String) {
    ns.http_get(ENDPOINT, "/healthz")
}

/// Moves the nf_tables ruleset generation on, as any change by anyone would: an idle
/// resync that finds it where it was reads nothing, so a faulty tool is only met after it.
fn touch_nf_tables(ns: &Netns) {
    ns.sh(&[
        "nft",
        "add table inet ima-touch; delete table inet ima-touch",
    ]);
}

/// `status` with `flags` exits 0: the kernel matches the config.
fn in_sync(ns: &Netns, config: &str, flags: &[&str]) -> bool {
    let mut args = vec!["status", "--config", config];
    args.extend_from_slice(flags);
    AGENT.run(ns, &args).status.success()
}

root_test!(
    /// A tool that hangs: the sync fails at the tool deadline, /healthz turns 503 within its
    /// bound although the stuck sync never returns by itself, the hung process and its
    /// children are killed, NAT is repaired once the tool works again, and SIGTERM exits
    /// within a second while a tool hangs.
    fn regression_a_hung_tool_is_killed_healthz_tells_and_sigterm_is_prompt() {
        let node = Netns::new("node");
        let shims = Shims::new();
        // A marker no other test uses, to find the hung children. iptables-nft itself
        // lists the chains the agent reads.
        shims.add("iptables-nft", "sleep 987");
        let volume = ConfigMapVolume::new("resyncInterval: 200ms\n");
        let config = volume.path();
        let path = shims.path();
        let mut agent = AGENT.start_with(
            &node,
            &[
                "--config",
                config.to_str().unwrap(),
                "--iptables-mode=nft",
                "--tool-timeout=1s",
            ],
            &[],
            &[("PATH", &path)],
        );
        agent.wait_for_log("rules applied", 1, Duration::from_secs(10));
        assert_eq!(health(&node).0, 200);

        shims.fault_on("iptables-nft");
        touch_nf_tables(&node);
        agent.wait_for_log(
            "did not finish within 1s; killed",
            1,
            Duration::from_secs(5),
        );
        // 3 x 200 ms + the 1 s tool deadline after the last success.
        assert!(
            eventually(Duration::from_secs(6), || health(&node).0 == 503),
            "{:?}\n{}",
            health(&node),
            agent.log()
        );
        assert!(
            health(&node).1.contains("did not finish within"),
            "{:?}",
            health(&node)
        );
        assert!(agent.is_running());
        assert!(
            pids_matching("sleep 987").len() <= 1,
            "hung tools pile up: {:?}",
            pids_matching("sleep 987")
        );

        shims.fault_off("iptables-nft");
        assert!(
            eventually(Duration::from_secs(5), || health(&node).0 == 200),
            "{:?}",
            health(&node)
        );
        assert_eq!(our_lines(&node).len(), 7);

        shims.fault_on("iptables-nft");
        touch_nf_tables(&node);
        assert!(eventually(Duration::from_secs(5), || !pids_matching(
            "sleep 987"
        )
        .is_empty()));
        let asked = Instant::now();
        let status = agent.terminate();
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
        assert!(status.success(), "{status:?}");
        shims.fault_off("iptables-nft");
        assert_eq!(
            our_lines(&node).len(),
            7,
            "SIGTERM leaves the rules in place"
        );
        assert!(
            eventually(Duration::from_secs(2), || pids_matching("sleep 987")
                .is_empty()),
            "the hung tool outlived the agent"
        );
    }
);

/// One fault of one tool: while it lasts the agent stays up, touches nothing but its own
/// objects, and /healthz says 503 when syncs cannot succeed; once it ends, the kernel
/// matches the config again within a few resyncs and /healthz says 200.
struct Fault {
    tool: &'static str,
    script: &'static str,
    backend: &'static [&'static str],
    /// Whether every sync fails while the fault lasts.
    syncs_fail: bool,
    /// Drift made while the fault lasts, so the faulty tool is needed (idle resyncs
    /// that find the kernel in step write nothing).
    drift: &'static [&'static str],
}

const FAULTS: [Fault; 8] = [
    // iptables-nft itself lists the chains the agent reads (`-S CHAIN`).
    Fault {
        tool: "iptables-nft",
        script: "echo 'simulated failure' >&2; exit 1",
        backend: &["--iptables-mode=nft"],
        syncs_fail: true,
        drift: &[],
    },
    // A listing the agent cannot read is never written on (a jump appended on every
    // misread would pile up): the sync fails as "unreadable".
    Fault {
        tool: "iptables-nft",
        script: "printf -- '-P POSTROUTING ACCEPT\\n-A \\001\\377 garbage \"\\n:half'; exit 0",
        backend: &["--iptables-mode=nft"],
        syncs_fail: true,
        drift: &[],
    },
    Fault {
        tool: "iptables-nft-restore",
        script: "echo 'simulated failure' >&2; exit 4",
        backend: &["--iptables-mode=nft"],
        syncs_fail: true,
        drift: &["iptables-nft", "-t", "nat", "-F", CHAIN],
    },
    Fault {
        tool: "iptables-nft-restore",
        script: "sleep 986",
        backend: &["--iptables-mode=nft"],
        syncs_fail: true,
        drift: &["iptables-nft", "-t", "nat", "-F", CHAIN],
    },
    Fault {
        tool: "iptables-legacy-save",
        script: "exit 2",
        backend: &["--iptables-mode=legacy"],
        syncs_fail: true,
        drift: &[],
    },
    // The nftables backend writes and reads over netlink: a broken nft stops nothing,
    // not even the repair of drift.
    Fault {
        tool: "nft",
        script: "echo 'simulated failure' >&2; exit 1",
        backend: &["--backend=nftables"],
        syncs_fail: false,
        drift: &[
            "nft",
            "delete element inet ip-masq-agent non-masq-v4 { 10.0.0.0/8 }",
        ],
    },
    Fault {
        tool: "nft",
        script: "case \"$1\" in list) echo 'table inet ip-masq-agent { garbage'; exit 0;; esac",
        backend: &["--backend=nftables"],
        syncs_fail: false,
        drift: &[],
    },
    Fault {
        tool: "nft",
        script: "sleep 985",
        backend: &["--backend=nftables"],
        syncs_fail: false,
        drift: &["nft", "flush table inet ip-masq-agent"],
    },
];

/// Everything in the node's firewall except the agent's own objects.
fn neighbours(ns: &Netns) -> String {
    let nft = ns.sh(&["nft", "list", "table", "ip", "neighbour"]);
    let xt = foreign_lines(&ns.save("iptables-nft-save"), CHAIN);
    let legacy: String = ns
        .sh(&["iptables-legacy-save"])
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains(CHAIN))
        .map(|l| format!("{l}\n"))
        .collect();
    // Packet counters move with the health checks' own traffic.
    without_counters(&format!("{nft}\n{xt}\n{legacy}"))
}

fn without_counters(saved: &str) -> String {
    saved
        .lines()
        .map(|line| match line.rsplit_once(" [") {
            Some((head, tail)) if line.starts_with(':') && tail.ends_with(']') => {
                format!("{head} [0:0]\n")
            }
            _ => format!("{line}\n"),
        })
        .collect()
}

fn run_fault(fault: &Fault) {
    let node = Netns::new("node");
    node.sh(&[
        "nft",
        "add table ip neighbour; add chain ip neighbour post { type nat hook postrouting priority 50; }; add rule ip neighbour post ip daddr 198.51.100.7 counter",
    ]);
    node.sh_line("iptables-nft -t nat -A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE");
    node.sh_line("iptables-legacy -t nat -A POSTROUTING -s 172.18.0.0/16 -j MASQUERADE");
    let before = neighbours(&node);
    let shims = Shims::new();
    shims.add(fault.tool, fault.script);
    let volume = ConfigMapVolume::new("resyncInterval: 200ms\nnonMasqueradeCIDRs: [10.0.0.0/8]\n");
    let config = volume.path();
    let path = shims.path();
    let mut args = vec!["--config", config.to_str().unwrap(), "--tool-timeout=1s"];
    args.extend_from_slice(fault.backend);
    let mut agent = AGENT.start_with(&node, &args, &[], &[("PATH", &path)]);
    agent.wait_for_log("rules applied", 1, Duration::from_secs(10));
    let context = format!("{} faulting with `{}`", fault.tool, fault.script);

    shims.fault_on(fault.tool);
    touch_nf_tables(&node);
    if !fault.drift.is_empty() {
        node.sh(fault.drift);
    }
    if fault.syncs_fail {
        assert!(
            eventually(Duration::from_secs(8), || health(&node).0 == 503),
            "{context}: {:?}\n{}",
            health(&node),
            agent.log()
        );
    } else {
        std::thread::sleep(Duration::from_millis(1500));
    }
    assert!(agent.is_running(), "{context}");
    assert_eq!(neighbours(&node), before, "{context}");

    shims.fault_off(fault.tool);
    assert!(
        eventually(Duration::from_secs(6), || health(&node).0 == 200
            && in_sync(&node, config.to_str().unwrap(), fault.backend)),
        "{context}: not repaired: {:?}\n{}",
        health(&node),
        agent.log()
    );
    assert_eq!(neighbours(&node), before, "{context}");
    agent.terminate();
}

root_test!(
    fn regression_tools_that_fail_hang_or_lie_never_break_the_node() {
        std::thread::scope(|scope| {
            for fault in &FAULTS {
                scope.spawn(move || run_fault(fault));
            }
        });
    }
);

root_test!(
    /// `--dry-run --cleanup-on-exit` used to delete the real rules on SIGTERM.
    fn regression_dry_run_never_writes_not_even_cleanup_on_exit() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new("");
        let mut agent = AGENT.start_synced(&node, &volume, &["--iptables-mode=nft"]);
        agent.terminate();
        let before = node.save("iptables-nft-save");
        assert_eq!(chain_lines(&before, CHAIN).len(), 7);
        let config = volume.path();
        let mut dry = AGENT.start(
            &node,
            &[
                "--config",
                config.to_str().unwrap(),
                "--iptables-mode=nft",
                "--dry-run",
                "--cleanup-on-exit",
            ],
        );
        dry.wait_for_log("dry run", 1, Duration::from_secs(10));
        assert!(dry.terminate().success());
        assert_eq!(node.save("iptables-nft-save"), before);
    }
);

root_test!(
    /// A backend switch whose removal of the other backend's rules fails is retried until it
    /// succeeds (the iptables side used to mark it done on failure; the nftables side never
    /// retried once its own table was in place). The nftables backend's table is removed
    /// over netlink now, so a failing `nft` no longer makes that removal fail: it must
    /// succeed at once (its retry is covered on the fake kernel, agent::tests).
    fn regression_backend_switch_cleanup_is_retried_until_it_succeeds() {
        for (first, second, tool, gone, removal_fails) in [
            (
                "--backend=iptables",
                "--backend=nftables",
                "iptables-nft-restore",
                "removed the iptables backend's rules",
                true,
            ),
            (
                "--backend=nftables",
                "--backend=iptables",
                "nft",
                "removed the nftables backend's table",
                false,
            ),
        ] {
            let node = Netns::new("node");
            let volume = ConfigMapVolume::new("resyncInterval: 200ms\n");
            let mut agent = AGENT.start_synced(&node, &volume, &[first, "--iptables-mode=nft"]);
            agent.terminate();
            let shims = Shims::new();
            // The new backend writes its own rules without this tool: only the removal fails.
            shims.add(tool, "echo 'simulated failure' >&2; exit 1");
            shims.fault_on(tool);
            let config = volume.path();
            let path = shims.path();
            let mut agent = AGENT.start_with(
                &node,
                &[
                    "--config",
                    config.to_str().unwrap(),
                    second,
                    "--iptables-mode=nft",
                ],
                &[],
                &[("PATH", &path)],
            );
            if removal_fails {
                agent.wait_for_log(
                    "removing the agent's rules where it no longer works failed",
                    2,
                    Duration::from_secs(10),
                );
                assert!(!agent.log().contains(gone), "{}", agent.log());
                // The agent's own rules are in force: healthy, with a note and a gauge.
                let (code, body) = health(&node);
                assert!(
                    code == 200 && body.contains("could not be removed"),
                    "{code} {body}"
                );
                let (_, metrics) = node.http_get(ENDPOINT, "/metrics");
                assert!(
                    metrics.contains("ip_masq_agent_leftover_rules_stuck 1"),
                    "{metrics}"
                );
            }
            shims.fault_off(tool);
            agent.wait_for_log(gone, 1, Duration::from_secs(10));
            let leftovers = match second {
                "--backend=nftables" => our_lines(&node),
                _ => node
                    .sh(&["nft", "list", "tables"])
                    .lines()
                    .filter(|l| l.contains("ip-masq-agent"))
                    .map(str::to_owned)
                    .collect(),
            };
            assert!(leftovers.is_empty(), "{first} -> {second}: {leftovers:?}");
            agent.terminate();
        }
    }
);

/// Neighbours that look like the agent's own objects but are not exactly what any
/// release writes: a comment that only starts like ours, our exact jump comment on a
/// jump to someone else's chain, our comment quoted inside a longer one, a chain named
/// like ours with a suffix whose jump carries an extra match, our rule comments on other
/// targets or with more text.
const HOSTILE_NAT: &str = r#"*nat
:KUBE-POSTROUTING - [0:0]
:IP-MASQ-AGENT-2 - [0:0]
:USER-CHAIN - [0:0]
-A POSTROUTING -m comment --comment "ip-masq-agent: also run kube rules" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain" -m addrtype ! --dst-type LOCAL -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment "see: ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom USER-CHAIN chain" -m addrtype ! --dst-type LOCAL -j USER-CHAIN
-A POSTROUTING -o eth0 -m comment --comment "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT-2 chain" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT-2
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A IP-MASQ-AGENT-2 -m comment --comment "ip-masq-agent: local traffic is not subject to MASQUERADE" -j ACCEPT
-A USER-CHAIN -m comment --comment "ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain) and more" -j MASQUERADE
COMMIT
"#;

/// Native nft tables named like the agent's, in other families or with a suffix.
const HOSTILE_NFT: &str = "table ip ip-masq-agent {
\tchain post {
\t\ttype nat hook postrouting priority 50; policy accept;
\t\tcounter
\t}
}
table ip6 ip-masq-agent {
\tchain post {
\t\ttype nat hook postrouting priority 50; policy accept;
\t\tcounter
\t}
}
table inet ip-masq-agent-2 {
\tset non-masq-v4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 10.0.0.0/8 }
\t}
}
";

const AGENT_CHAINS: [&str; 2] = [CHAIN, "RENAMED"];

/// A save dump without the agent's own objects (its chains, exactly its jumps) and
/// without packet counters.
fn without_agent(saved: &str) -> String {
    let ours = |line: &str| {
        AGENT_CHAINS.iter().any(|chain| {
            line.starts_with(&format!(":{chain} "))
                || line.starts_with(&format!("-A {chain} "))
                || line == format!("-A POSTROUTING -m comment --comment \"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom {chain} chain\" -m addrtype ! --dst-type LOCAL -j {chain}")
        })
    };
    without_counters(
        &saved
            .lines()
            .filter(|line| !line.starts_with('#') && !ours(line))
            .map(|line| format!("{line}\n"))
            .collect::<String>(),
    )
}

fn feed(ns: &Netns, program: &[&str], input: &str) {
    let mut child = ns
        .command(program[0])
        .args(&program[1..])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input.as_bytes())
        .expect("write");
    assert!(child.wait().expect("wait").success(), "{program:?}");
}

/// Everything but the agent's own objects, in every flavour, family and nft table.
fn foreign_state(ns: &Netns) -> String {
    let mut state = String::new();
    for tool in ["iptables-nft-save", "ip6tables-nft-save"] {
        state.push_str(&without_agent(&ns.sh(&[tool, "-t", "nat"])));
    }
    for tool in ["iptables-legacy-save", "ip6tables-legacy-save"] {
        state.push_str(&without_agent(&ns.sh(&[tool])));
    }
    for table in [
        ["ip", "ip-masq-agent"],
        ["ip6", "ip-masq-agent"],
        ["inet", "ip-masq-agent-2"],
    ] {
        state.push_str(&ns.sh(&["nft", "list", "table", table[0], table[1]]));
    }
    state
}

root_test!(
    /// Defect: a POSTROUTING rule whose comment merely started with `ip-masq-agent:` was
    /// taken for the agent's, deleted, and its target chain (KUBE-POSTROUTING) flushed.
    fn regression_hostile_neighbours_are_byte_identical_after_sync_switch_sweep_and_cleanup() {
        let node = Netns::new("node");
        for restore in [
            "iptables-nft-restore",
            "ip6tables-nft-restore",
            "iptables-legacy-restore",
            "ip6tables-legacy-restore",
        ] {
            feed(&node, &[restore, "--noflush"], HOSTILE_NAT);
        }
        feed(&node, &["nft", "-f", "-"], HOSTILE_NFT);
        let before = foreign_state(&node);
        assert!(
            before.contains("KUBE-POSTROUTING -j MASQUERADE"),
            "{before}"
        );
        let volume = ConfigMapVolume::new("resyncInterval: 200ms\n");
        let steps: [(&[&str], Option<&str>); 5] = [
            (&["--iptables-mode=nft"], None),
            (&["--iptables-mode=legacy", "--masq-chain=RENAMED"], None),
            // The renamed chain is swept: it and its jump are the agent's, nothing else is.
            (&["--iptables-mode=legacy"], None),
            (
                &["--backend=nftables"],
                Some("removed the iptables backend's rules"),
            ),
            (
                &["--iptables-mode=nft"],
                Some("removed the nftables backend's table"),
            ),
        ];
        for (flags, wait_for) in steps {
            let mut args = vec!["--enable-ipv6"];
            args.extend_from_slice(flags);
            let mut agent = AGENT.start_synced(&node, &volume, &args);
            if let Some(text) = wait_for {
                agent.wait_for_log(text, 1, Duration::from_secs(5));
            }
            // A few resyncs too.
            agent.wait_for_log("rules resynced", 3, Duration::from_secs(5));
            agent.terminate();
            assert_eq!(foreign_state(&node), before, "after {flags:?}");
        }
        let out = AGENT.run(&node, ["cleanup"]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(foreign_state(&node), before, "after cleanup");
        let nat = node.save("iptables-nft-save");
        assert!(
            !nat.contains(":IP-MASQ-AGENT "),
            "cleanup left the agent's chain: {nat}"
        );
    }
);

fn prefixes_config(second_octet_base: u32, count: u32) -> String {
    let mut text = String::from("resyncInterval: 60s\ncidrLimit: 100000\nnonMasqueradeCIDRs:\n");
    for i in 0..count {
        text.push_str(&format!(
            "- 10.{}.{}.0/24\n",
            second_octet_base + i / 256,
            i % 256
        ));
    }
    text
}

root_test!(
    /// SIGKILL of the agent while it writes a large change: the kernel holds the old set or
    /// the new one, never a mix, and a restarted agent converges.
    fn regression_sigkill_mid_write_leaves_old_or_new_rules() {
        let configs = TempDir::new("kill");
        let old = configs.path.join("old");
        let new = configs.path.join("new");
        std::fs::write(&old, prefixes_config(0, 2000)).unwrap();
        std::fs::write(&new, prefixes_config(100, 2000)).unwrap();
        let (old, new) = (old.to_str().unwrap(), new.to_str().unwrap());
        for flags in [
            &["--iptables-mode=nft"][..],
            &["--iptables-mode=legacy"],
            &["--backend=nftables"],
        ] {
            let node = Netns::new("node");
            let mut volume = ConfigMapVolume::new(&prefixes_config(0, 2000));
            let mut current_is_new = false;
            for delay_ms in [0u64, 3, 10, 25] {
                let agent = AGENT.start_synced(&node, &volume, flags);
                current_is_new = !current_is_new;
                volume.update(&prefixes_config(if current_is_new { 100 } else { 0 }, 2000));
                std::thread::sleep(Duration::from_millis(delay_ms));
                agent.signal(nix::sys::signal::Signal::SIGKILL);
                drop(agent);
                // A tool the agent started may still be finishing its (atomic) write.
                std::thread::sleep(Duration::from_millis(300));
                let (is_old, is_new) = (in_sync(&node, old, flags), in_sync(&node, new, flags));
                assert!(
                    is_old ^ is_new,
                    "{flags:?} killed {delay_ms} ms after the swap: old {is_old}, new {is_new}"
                );
            }
            let agent = AGENT.start_synced(&node, &volume, flags);
            let current = if current_is_new { new } else { old };
            assert!(
                eventually(Duration::from_secs(5), || in_sync(&node, current, flags)),
                "{flags:?}: a restarted agent did not converge"
            );
            drop(agent);
        }
    }
);

root_test!(
    /// rv5 (hostile review of the rv4 fixes) #1: removing the agent's old chain in the
    /// other flavour ran before the sync's success was recorded; with its tool hanging
    /// until the deadline, /readyz said "the first sync has not succeeded yet" and
    /// /healthz flipped to 503 at every retry, though the agent's rules were in force.
    fn regression_a_hanging_leftover_removal_does_not_hold_up_health() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new("resyncInterval: 1s\n");
        // An earlier agent in the legacy flavour left its chain and jump.
        let mut old = AGENT.start_synced(&node, &volume, &["--iptables-mode=legacy"]);
        old.terminate();
        let shims = Shims::new();
        shims.add("iptables-legacy-restore", "sleep 984");
        shims.fault_on("iptables-legacy-restore");
        let config = volume.path();
        let path = shims.path();
        let mut agent = AGENT.start_with(
            &node,
            &[
                "--config",
                config.to_str().unwrap(),
                "--iptables-mode=nft",
                "--tool-timeout=8s",
            ],
            &[],
            &[("PATH", &path)],
        );
        agent.wait_for_log("rules applied", 1, Duration::from_secs(10));
        assert!(
            eventually(Duration::from_secs(1), || node
                .http_get(ENDPOINT, "/readyz")
                .0
                == 200),
            "{:?}\n{}",
            node.http_get(ENDPOINT, "/readyz"),
            agent.log()
        );
        // Past the liveness bound (3 x 1 s + 8 s) while removals hang and are killed at
        // their 8 s deadline, again and again.
        let until = Instant::now() + Duration::from_secs(14);
        while Instant::now() < until {
            let (code, body) = health(&node);
            assert_eq!(code, 200, "{body}\n{}", agent.log());
            std::thread::sleep(Duration::from_millis(500));
        }
        agent.wait_for_log(
            "removing the agent's rules where it no longer works failed",
            1,
            Duration::from_secs(5),
        );
        shims.fault_off("iptables-legacy-restore");
        agent.terminate();
    }
);
