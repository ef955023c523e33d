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

use std::time::{Duration, Instant};

use ima_harness::*;

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
    let seed = seed_from_env();
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
