//! Two agents with the same config in one network namespace — a DaemonSet rolling update
//! with `maxSurge`, or a copy started by hand — must keep exactly one complete, right set
//! of rules in the kernel at every moment, whatever their timing.
//!
//! [`two_agents_keep_the_rules_right`] is backend-agnostic: it takes the backend's flags
//! and a closure that samples the agent's kernel state as text. It first learns the
//! state one agent alone writes for each of two configs, then, round after round in a
//! fresh namespace, starts two agents at a random offset from each other, switches the
//! ConfigMap between the two configs at random moments, stops the first agent as a
//! rolling update does, and samples the kernel as fast as it can: once anything was
//! written, every sample must be exactly one of the two learned states (no missing
//! rule, no duplicate, no mix of the two configs). Seeded (`IMA_SEED`, printed);
//! `IMA_ROUNDS` sets the number of rounds.
//!
//! On iptables the race that broke nodes (issue 16 #1: both agents append a jump, then
//! both delete "the duplicate" and leave none) needs both to read at the same instant,
//! which random starts seldom hit: [`both_agents_repair_a_deleted_jump_at_once`] deletes
//! the jump by hand and tells both agents to sync at the same moment (SIGHUP to both),
//! many times; exactly one jump must be there once both have.

use std::time::{Duration, Instant};

use ima_harness::seeded::{self, Rng};
use ima_harness::*;
use nix::sys::signal::Signal;

use crate::AGENT;

const CONFIGS: [&str; 2] = [
    "nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\nresyncInterval: 100ms\n",
    "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 100.64.0.0/10]\nresyncInterval: 100ms\n",
];
const DEFAULT_ROUNDS: u64 = 8;
/// How long a round samples, from the first agent's start.
const ROUND: Duration = Duration::from_millis(2500);

/// The agent's rules as `state` sees them, with one agent alone, for each config.
fn learn(flags: &[&str], state: &dyn Fn(&Netns) -> String) -> Vec<String> {
    CONFIGS
        .iter()
        .map(|config| {
            let ns = Netns::new("alone");
            let volume = ConfigMapVolume::new(config);
            let mut agent = AGENT.start_synced(&ns, &volume, flags);
            let learned = state(&ns);
            agent.terminate();
            assert!(!learned.trim().is_empty(), "no state for {config}");
            learned
        })
        .collect()
}

/// Runs the rounds (see the module's comment); panics with the seed, the round and
/// the wrong sample at the first violation.
pub fn two_agents_keep_the_rules_right(flags: &[&str], state: &dyn Fn(&Netns) -> String) {
    let seed = seeded::seed();
    let rounds = std::env::var("IMA_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS);
    eprintln!("two agents {flags:?}: seed {seed}, {rounds} rounds (IMA_SEED={seed} reproduces)");
    let expected = learn(flags, state);
    assert_ne!(expected[0], expected[1], "the two configs must differ");
    let mut rng = Rng::new(seed);
    for round in 0..rounds {
        let ns = Netns::new("two");
        let mut volume = ConfigMapVolume::new(CONFIGS[0]);
        let path = volume.path();
        let mut args = vec!["--config", path.to_str().expect("utf-8 path")];
        args.extend_from_slice(flags);
        // The second agent's start, two config switches and the first agent's stop, at
        // random moments of the round.
        let second_at = Duration::from_millis(rng.below(400));
        let mut switches = [
            Duration::from_millis(200 + rng.below(1000)),
            Duration::from_millis(400 + rng.below(1400)),
        ];
        switches.sort();
        let stop_first_at = Duration::from_millis(1200 + rng.below(1000));
        let context = format!(
            "seed {seed}, round {round}: second agent at {second_at:?}, config switches at {switches:?}, first stopped at {stop_first_at:?}"
        );
        let started = Instant::now();
        let mut first = Some(AGENT.start(&ns, &args));
        let mut second = None;
        let mut switched = 0;
        let mut written = false;
        let mut samples = 0;
        while started.elapsed() < ROUND {
            let now = started.elapsed();
            if second.is_none() && now >= second_at {
                second = Some(AGENT.start(&ns, &args));
            }
            if switched < switches.len() && now >= switches[switched] {
                switched += 1;
                volume.update(CONFIGS[switched % 2]);
            }
            if now >= stop_first_at
                && let Some(mut agent) = first.take()
            {
                // A rolling update stops the old pod with SIGTERM: its rules stay.
                agent.terminate();
            }
            let sample = state(&ns);
            if !written && sample.trim().is_empty() {
                // Nothing written yet by either agent.
                continue;
            }
            written = true;
            samples += 1;
            assert!(
                expected.contains(&sample),
                "{context}: after {:?} the kernel held neither config's rules:\n{sample}\nexpected one of:\n{}\n---\n{}",
                started.elapsed(),
                expected[0],
                expected[1]
            );
        }
        // Both settled on the config the volume holds now.
        let last = &expected[switched % 2];
        assert!(
            eventually(Duration::from_secs(3), || state(&ns) == *last),
            "{context}: never settled on the last config:\n{}",
            state(&ns)
        );
        let survivor = second.as_mut().expect("second agent started");
        assert!(survivor.is_running(), "{context}: the second agent exited");
        let failures = survivor
            .log()
            .matches("syncing masquerade rules failed")
            .count();
        assert_eq!(
            failures,
            0,
            "{context}: the second agent failed to sync:\n{}",
            survivor.log()
        );
        eprintln!("  round {round}: {samples} samples, all right ({context})");
    }
}

/// The nftables backend's table as nft lists it ("" when there is none).
fn nft_table(ns: &Netns) -> String {
    let out = ns.output(&["nft", "list", "table", "inet", "ip-masq-agent"]);
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        String::new()
    }
}

root_test!(
    fn nftables() {
        two_agents_keep_the_rules_right(&["--backend=nftables"], &nft_table);
    }
);

/// The agent's objects in one iptables flavour's nat table, as `save -t nat` prints them
/// (jump, chain declaration, chain rules; counters left out).
fn iptables_state(ns: &Netns, save: &str) -> String {
    ns.sh(&[save, "-t", "nat"])
        .lines()
        .filter(|line| line.contains("IP-MASQ-AGENT"))
        .map(|line| match line.rsplit_once(" [") {
            Some((head, _)) if line.starts_with(':') => format!("{head}\n"),
            _ => format!("{line}\n"),
        })
        .collect()
}

root_test!(
    fn iptables_nft() {
        two_agents_keep_the_rules_right(&["--iptables-mode=nft"], &|ns| {
            iptables_state(ns, "iptables-nft-save")
        });
    }
);

root_test!(
    fn iptables_legacy() {
        two_agents_keep_the_rules_right(&["--iptables-mode=legacy"], &|ns| {
            iptables_state(ns, "iptables-legacy-save")
        });
    }
);

const JUMP_SPEC: &str = "-m comment --comment \"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain\" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT";
const MASQUERADE_LAST: &str = "-A IP-MASQ-AGENT -m comment --comment \"ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)\" -j MASQUERADE";
/// Jumps deleted by hand and repaired by both agents at once, per round.
const REPAIRS: usize = 4;
const REPAIR_ROUNDS: usize = 6;

/// The agent's jumps in POSTROUTING and whether its chain is whole.
fn jumps_and_chain(ns: &Netns, save: &str) -> (usize, bool) {
    let saved = ns.sh(&[save, "-t", "nat"]);
    let jumps = saved
        .lines()
        .filter(|line| line.strip_prefix("-A POSTROUTING ") == Some(JUMP_SPEC))
        .count();
    let last = saved
        .lines()
        .rfind(|line| line.starts_with("-A IP-MASQ-AGENT "));
    (jumps, last.is_some_and(|l| l.starts_with(MASQUERADE_LAST)))
}

/// Issue 16 #1: two agents started within milliseconds of each other, and a jump deleted
/// by hand that both repair at the same instant: exactly one jump every time.
/// `envs` are the two agents' extra environments.
fn both_agents_repair_a_deleted_jump_at_once(mode: &str, save: &str, envs: [&[(&str, &str)]; 2]) {
    let seed = seeded::seed();
    eprintln!(
        "two agents repairing at once on iptables-{mode}: seed {seed} (IMA_SEED={seed} reproduces)"
    );
    let mut rng = Rng::new(seed);
    let node = Netns::new("node");
    let volume = ConfigMapVolume::new(CONFIGS[0]);
    let path = volume.path();
    let mode_flag = format!("--iptables-mode={mode}");
    let flags = [
        "--config",
        path.to_str().expect("utf-8 path"),
        &mode_flag,
        "--metrics-address=",
    ];
    let mut problems = Vec::new();
    for round in 0..REPAIR_ROUNDS {
        let out = AGENT.run(&node, ["cleanup"]);
        assert!(out.status.success(), "cleanup before round {round}");
        let mut first = AGENT.start_with(&node, &flags, &[], envs[0]);
        std::thread::sleep(Duration::from_millis(rng.below(8)));
        let mut second = AGENT.start_with(&node, &flags, &[], envs[1]);
        first.wait_for_log("rules applied", 1, Duration::from_secs(10));
        second.wait_for_log("rules applied", 1, Duration::from_secs(10));
        let settled = |ns: &Netns| {
            eventually(Duration::from_secs(2), || {
                jumps_and_chain(ns, save) == (1, true)
            })
        };
        if !settled(&node) {
            problems.push(format!(
                "round {round}: after both started: {:?}",
                jumps_and_chain(&node, save)
            ));
        }
        for repair in 0..REPAIRS {
            std::thread::sleep(Duration::from_millis(150));
            let syncs = |agent: &AgentProcess| {
                let log = agent.log();
                log.matches("rules resynced").count() + log.matches("rewritten").count()
            };
            let before = (syncs(&first), syncs(&second));
            let mut delete = vec![
                format!("iptables-{mode}"),
                "-t".into(),
                "nat".into(),
                "-D".into(),
                "POSTROUTING".into(),
            ];
            delete.extend(shell_words(JUMP_SPEC));
            let delete: Vec<&str> = delete.iter().map(String::as_str).collect();
            node.sh(&delete);
            first.signal(Signal::SIGHUP);
            second.signal(Signal::SIGHUP);
            assert!(
                eventually(Duration::from_secs(10), || syncs(&first) > before.0
                    && syncs(&second) > before.1),
                "round {round} repair {repair}: the agents did not sync"
            );
            if !settled(&node) {
                problems.push(format!(
                    "round {round}, repair {repair}: {:?} (jumps, chain whole) after both repaired at once",
                    jumps_and_chain(&node, save)
                ));
            }
        }
        for agent in [&mut first, &mut second] {
            assert!(agent.is_running(), "{}", agent.log());
        }
    }
    assert!(problems.is_empty(), "seed {seed}:\n{}", problems.join("\n"));
}

root_test!(
    fn regression_both_agents_repair_a_deleted_jump_at_once_on_iptables_nft() {
        both_agents_repair_a_deleted_jump_at_once("nft", "iptables-nft-save", [&[], &[]]);
    }
);

root_test!(
    fn regression_both_agents_repair_a_deleted_jump_at_once_on_iptables_legacy() {
        both_agents_repair_a_deleted_jump_at_once("legacy", "iptables-legacy-save", [&[], &[]]);
    }
);

root_test!(
    /// Hostile review of issue 16 #1: the agents coordinated through a lock on the
    /// xtables lock file, so two that mount different ones (`XTABLES_LOCKFILE` set in
    /// one manifest, not in the other) raced as before. The lock is now a name of the
    /// network namespace, which no mount changes.
    fn regression_agents_with_different_xtables_lock_files_keep_one_jump() {
        let dir = TempDir::new("locks");
        let first = dir.path.join("first.lock");
        let second = dir.path.join("second.lock");
        both_agents_repair_a_deleted_jump_at_once(
            "legacy",
            "iptables-legacy-save",
            [
                &[("XTABLES_LOCKFILE", first.to_str().expect("utf-8"))],
                &[("XTABLES_LOCKFILE", second.to_str().expect("utf-8"))],
            ],
        );
    }
);

root_test!(
    /// The same, told apart from chance: a process of the namespace holds the sync lock
    /// (as another agent between its read and its write does); an agent with its own
    /// `XTABLES_LOCKFILE` must not repair a deleted jump until it lets go. With the lock
    /// on the lock file, the agent did not see it and wrote at once.
    fn regression_an_agent_waits_for_the_sync_lock_whatever_its_xtables_lock_file() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new(CONFIGS[0]);
        let path = volume.path();
        let dir = TempDir::new("locks");
        let lock_file = dir.path.join("own.lock");
        let flags = [
            "--config",
            path.to_str().expect("utf-8 path"),
            "--iptables-mode=legacy",
            "--metrics-address=",
        ];
        let mut agent = AGENT.start_with(
            &node,
            &flags,
            &[],
            &[("XTABLES_LOCKFILE", lock_file.to_str().expect("utf-8"))],
        );
        agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
        let held = node.run_inside(|| {
            use std::os::linux::net::SocketAddrExt;
            let name = std::os::unix::net::SocketAddr::from_abstract_name("ip-masq-agent/sync")
                .expect("abstract name");
            std::os::unix::net::UnixListener::bind_addr(&name).expect("hold the sync lock")
        });
        let mut delete = vec!["iptables-legacy", "-t", "nat", "-D", "POSTROUTING"];
        let spec = shell_words(JUMP_SPEC);
        delete.extend(spec.iter().map(String::as_str));
        node.sh(&delete);
        // Resyncs come every 100 ms: for a second and a half none may write.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            jumps_and_chain(&node, "iptables-legacy-save").0,
            0,
            "the agent wrote while another held the sync lock:\n{}",
            agent.log()
        );
        drop(held);
        assert!(
            eventually(Duration::from_secs(10), || {
                jumps_and_chain(&node, "iptables-legacy-save") == (1, true)
            }),
            "the jump was not repaired once the lock was free:\n{}",
            agent.log()
        );
        assert!(agent.is_running());
    }
);

/// A rolling update with `maxSurge`: the new pod's agent starts while the old one runs,
/// then the old one gets SIGTERM. Both run as containers do (PID 1 each, in PID
/// namespaces of their own), with `--cleanup-on-exit`.
struct RollingUpdate {
    topology: Topology,
    _volume: ConfigMapVolume,
    old: AgentProcess,
    new: AgentProcess,
}

fn rolling_update(backend: &[&str], extra: &[&str]) -> RollingUpdate {
    let topology = Topology::new();
    let volume = ConfigMapVolume::new("resyncInterval: 10m\n");
    let path = volume.path();
    let mut flags = vec!["--config", path.to_str().expect("utf-8 path")];
    flags.extend_from_slice(backend);
    flags.extend_from_slice(extra);
    let mut old = AGENT.start_as_container(&topology.node, &flags);
    old.wait_for_log("rules applied", 1, Duration::from_secs(20));
    let mut new = AGENT.start_as_container(&topology.node, &flags);
    new.wait_for_log("rules applied", 1, Duration::from_secs(20));
    RollingUpdate {
        topology,
        _volume: volume,
        old,
        new,
    }
}

/// Masquerades to the internet, keeps the pod's address to 10/8, as the defaults say.
fn masquerades_by_default(topology: &Topology) -> bool {
    topology.is_masqueraded("203.0.113.10") && !topology.is_masqueraded("10.99.0.10")
}

/// Hostile review of issue 16: the old pod of a rolling update, exiting with
/// `--cleanup-on-exit`, removed the rules the new pod had just written (the new one
/// does not look again until its next resync, here ten minutes away), so pod traffic
/// left unmasqueraded.
fn cleanup_on_exit_leaves_the_rules_to_a_running_agent(backend: &[&str]) {
    let RollingUpdate {
        topology,
        _volume,
        mut old,
        mut new,
    } = rolling_update(backend, &["--cleanup-on-exit", "--metrics-address="]);
    assert!(masquerades_by_default(&topology));
    old.terminate();
    let log = old.log();
    assert!(
        log.contains("runs in this network namespace; leaving the rules to it"),
        "the old agent did not leave the rules to the new one:
{log}"
    );
    assert!(
        masquerades_by_default(&topology),
        "after the old agent's exit:
old:
{log}
new:
{}",
        new.log()
    );
    // Alone now, the last agent's clean-up removes them.
    new.terminate();
    assert!(
        !topology.is_masqueraded("203.0.113.10"),
        "the last agent left its rules:
{}",
        new.log()
    );
}

root_test!(
    fn regression_cleanup_on_exit_leaves_the_rules_to_a_running_agent_on_iptables() {
        cleanup_on_exit_leaves_the_rules_to_a_running_agent(&["--iptables-mode=nft"]);
    }
);

root_test!(
    fn regression_cleanup_on_exit_leaves_the_rules_to_a_running_agent_on_nftables() {
        cleanup_on_exit_leaves_the_rules_to_a_running_agent(&["--backend=nftables"]);
    }
);

root_test!(
    /// Hostile review of issue 16: during a rolling update the old pod kept the metrics
    /// port, so kubelet's probes of the new pod (same host port) reached the old agent,
    /// and the new one never became ready on its own answer. The old agent now hands
    /// the port over within seconds of the new one's start, and the new one serves it.
    fn regression_an_older_agent_hands_its_metrics_port_to_a_newer_one() {
        let metrics = "--metrics-address=127.0.0.1:19431";
        let RollingUpdate {
            topology,
            _volume,
            mut old,
            mut new,
        } = rolling_update(&["--iptables-mode=nft"], &[metrics]);
        old.wait_for_log(
            "closing /metrics, /healthz and /readyz here so it can serve them",
            1,
            Duration::from_secs(10),
        );
        new.wait_for_log(
            "serving /metrics, /healthz and /readyz on http://127.0.0.1:19431",
            1,
            Duration::from_secs(15),
        );
        let (status, _) = topology.node.http_get("127.0.0.1:19431", "/healthz");
        assert_eq!(status, 200);
        // The old one still syncs: only its endpoint went.
        assert!(old.is_running(), "{}", old.log());
        old.terminate();
        let (status, _) = topology.node.http_get("127.0.0.1:19431", "/healthz");
        assert_eq!(status, 200, "the new agent stopped serving:\n{}", new.log());
        assert!(masquerades_by_default(&topology));
    }
);
