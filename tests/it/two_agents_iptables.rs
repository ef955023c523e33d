//! Two agents in one network namespace (a DaemonSet rolling update with maxSurge, or a
//! copy started by hand), on the same ConfigMap, started with random offsets while the
//! ConfigMap changes and others commit to nf_tables: at every sample after the first
//! sync the kernel holds exactly one jump and one whole chain. Then the jump is deleted
//! by hand and both are told to sync at the same instant (SIGHUP to both): once both
//! have, there is exactly one jump again. Seeded (`IMA_SEED`).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ima_harness::*;
use nix::sys::signal::Signal;

use crate::AGENT;

const ROUNDS: usize = 8;
/// Deleted jumps repaired by both agents at once, per round.
const REPAIRS: usize = 4;
const ROUND_LENGTH: Duration = Duration::from_millis(1500);
const JUMP_SPEC: &str = "-m comment --comment \"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain\" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT";
const MASQUERADE_LAST: &str = "-A IP-MASQ-AGENT -m comment --comment \"ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)\" -j MASQUERADE";
const CONFIGS: [&str; 2] = [
    "nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 100ms\n",
    "nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\nresyncInterval: 100ms\n",
];

fn seed() -> u64 {
    std::env::var("IMA_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007)
        })
}

/// xorshift: enough to spread start offsets.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The agent's jumps and whether its chain is whole, as the flavour lists them.
fn sample(ns: &Netns, save: &str) -> (usize, bool) {
    let saved = ns.sh(&[save, "-t", "nat"]);
    let jumps = saved
        .lines()
        .filter(|line| line.strip_prefix("-A POSTROUTING ") == Some(JUMP_SPEC))
        .count();
    let chain: Vec<&str> = saved
        .lines()
        .filter(|line| line.starts_with("-A IP-MASQ-AGENT "))
        .collect();
    let whole = chain
        .last()
        .is_some_and(|last| last.starts_with(MASQUERADE_LAST));
    (jumps, whole)
}

fn two_agents_keep_one_jump(mode: &str, save: &str) {
    let seed = seed();
    eprintln!("two agents on iptables-{mode}: seed {seed} (IMA_SEED={seed} to replay)");
    let mut rng = seed | 1;
    let node = Netns::new("node");
    let mut volume = ConfigMapVolume::new(CONFIGS[0]);
    let path = volume.path();
    let flags = [
        "--config",
        path.to_str().expect("utf-8 path"),
        &format!("--iptables-mode={mode}"),
        "--metrics-address=",
    ]
    .map(str::to_string);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut problems = Vec::new();
    for round in 0..ROUNDS {
        let out = AGENT.run(&node, ["cleanup"]);
        assert!(out.status.success(), "cleanup before round {round}");
        let offset = Duration::from_millis(next(&mut rng) % 8);
        let mut first = AGENT.start(&node, &flags);
        std::thread::sleep(offset);
        let mut second = AGENT.start(&node, &flags);
        first.wait_for_log("rules applied", 1, Duration::from_secs(10));
        let started = Instant::now();
        let mut samples = 0;
        let mut swapped = Instant::now();
        let mut config = 0;
        while started.elapsed() < ROUND_LENGTH {
            if swapped.elapsed() > Duration::from_millis(300 + next(&mut rng) % 300) {
                config = 1 - config;
                volume.update(CONFIGS[config]);
                swapped = Instant::now();
            }
            if next(&mut rng).is_multiple_of(3) {
                // Someone else commits: iptables-nft's idle resyncs read again.
                node.sh(&["nft", "add table inet ima-bump; delete table inet ima-bump"]);
            }
            let (jumps, whole) = sample(&node, save);
            samples += 1;
            if jumps != 1 || !whole {
                problems.push(format!(
                    "round {round} (offset {offset:?}), {:?} in: {jumps} jump(s), chain whole: {whole}",
                    started.elapsed()
                ));
            }
            std::thread::sleep(Duration::from_millis(next(&mut rng) % 25));
        }
        second.wait_for_log("rules applied", 1, Duration::from_secs(10));
        for repair in 0..REPAIRS {
            // Settled first: one jump, and neither agent mid-sync.
            std::thread::sleep(Duration::from_millis(150));
            let syncs = |agent: &AgentProcess| {
                let log = agent.log();
                log.matches("rules resynced").count() + log.matches("rewritten").count()
            };
            let before = (syncs(&first), syncs(&second));
            node.sh(&[&format!("iptables-{mode}"), "-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment",
                "ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain",
                "-m", "addrtype", "!", "--dst-type", "LOCAL", "-j", "IP-MASQ-AGENT"]);
            first.signal(Signal::SIGHUP);
            second.signal(Signal::SIGHUP);
            let both_synced = eventually(Duration::from_secs(10), || {
                syncs(&first) > before.0 && syncs(&second) > before.1
            });
            assert!(
                both_synced,
                "round {round} repair {repair}: the agents did not sync"
            );
            // A sync that waited for the other's lock may still be writing: give it the
            // moment it needs, then the kernel must hold exactly one jump.
            let settled = eventually(Duration::from_secs(2), || sample(&node, save) == (1, true));
            if !settled {
                let (jumps, whole) = sample(&node, save);
                problems.push(format!(
                    "round {round}, repair {repair}: {jumps} jump(s) after both agents repaired at once, chain whole: {whole}"
                ));
            }
        }
        for agent in [&mut first, &mut second] {
            assert!(agent.is_running(), "{}", agent.log());
        }
        let (jumps, whole) = sample(&node, save);
        assert!(
            jumps == 1 && whole,
            "round {round}: at the end {jumps} jump(s)"
        );
        assert!(samples > 10, "round {round}: only {samples} samples");
        drop(first);
        drop(second);
    }
    assert!(
        problems.is_empty(),
        "seed {seed}: {} bad sample(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

root_test!(
    /// Issue 16 #1: both agents appended a jump (2 jumps), then both deleted "the
    /// duplicate" (0 jumps for a whole interval: nothing masqueraded).
    fn regression_two_agents_in_one_namespace_keep_exactly_one_jump_on_iptables_nft() {
        two_agents_keep_one_jump("nft", "iptables-nft-save");
    }
);

root_test!(
    fn regression_two_agents_in_one_namespace_keep_exactly_one_jump_on_iptables_legacy() {
        two_agents_keep_one_jump("legacy", "iptables-legacy-save");
    }
);
