//! The harness of ip-masq-agent's integration tests, its sandbox example and benchmarks:
//! test hosts in network namespaces this process creates and deletes, never the root
//! namespace's firewall, never an address outside these namespaces.
//!
//! - [`require_root`], [`root_test!`], [`on_both_backends!`]: root-only tests that skip
//!   (or fail under `CI=true`) without their prerequisites.
//! - [`Netns`] and [`TempDir`], deleted on drop; [`ConfigMapVolume`], kubelet's atomic
//!   writer.
//! - [`Agent`] (the binary: the caller says where it is) starts an [`AgentProcess`],
//!   killed by PID on drop.
//! - [`Topology`]: pod -> node -> remote, with a UDP probe of the source address the
//!   remote sees.
//! - [`Shims`]: PATH stand-ins that make a tool fail, hang or lie on demand.
//! - For benchmarks: [`flood::Flood`] (raw-socket UDP, a new connection per packet),
//!   [`swap::SwapProbe`] (ConfigMap swap -> first packet with the new behaviour),
//!   [`workload`] (prefix lists and configs), [`clean_up_on_signals`].
//! - [`MemoryCgroup`]: an agent under the DaemonSet's memory limit.
//! - [`conntrack`]: conntrack entries made by hand in a namespace and listed back;
//!   [`seeded`]: the seed and generator of property tests.

mod agent;
mod cgroup;
mod cleanup;
pub mod conntrack;
pub mod flood;
mod monitor;
mod netns;
mod root;
pub mod seeded;
mod shims;
pub mod swap;
mod topology;
mod volume;
pub mod workload;

use std::time::{Duration, Instant};

pub use agent::{Agent, AgentProcess, log_field, log_time, wall_now};
pub use cgroup::MemoryCgroup;
pub use cleanup::{clean_up_on_signals, track_child, tracked_children, untrack_child};
pub use monitor::NftMonitor;
pub use netns::{Netns, TempDir, unique_name};
pub use root::require_root;
pub use shims::{Shims, pids_matching};
pub use topology::{
    Multihomed, NODE_V4, NODE_V6, POD_V4, POD_V6, REMOTE_B_DESTINATIONS, REMOTE_DESTINATIONS,
    Topology, UPLINK_A_SECONDARY_V4, UPLINK_A_SECONDARY_V6, UPLINK_B_NODE_V4, UPLINK_B_NODE_V6,
    V4_PORT, V6_PORT,
};
pub use volume::{CONFIG_KEY, ConfigMapVolume};

/// A `#[test]` that needs root and the firewall tools: `root_test!(fn name() { .. });`
/// runs the body only when [`require_root`] allows it (doc comments and attributes go
/// before `fn`).
#[macro_export]
macro_rules! root_test {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            if !$crate::require_root() {
                return;
            }
            $body
        }
    };
}

/// Runs a scenario `fn name(backend_flag: &str)` once per backend, as `name::iptables`
/// and `name::nftables`: behaviour must not depend on which backend wrote the rules.
#[macro_export]
macro_rules! on_both_backends {
    ($scenario:ident) => {
        mod $scenario {
            $crate::root_test!(
                fn iptables() {
                    super::$scenario("--backend=iptables");
                }
            );
            $crate::root_test!(
                fn nftables() {
                    super::$scenario("--backend=nftables");
                }
            );
        }
    };
}

/// Polls until `check` passes or `timeout` runs out; returns whether it passed.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Lines of the nat table that mention `chain`, plus its declaration.
pub fn chain_lines(saved: &str, chain: &str) -> Vec<String> {
    saved
        .lines()
        .filter(|l| l.contains(chain))
        .map(str::to_owned)
        .collect()
}

/// Lines of the nat table that do not mention `chain`.
pub fn foreign_lines(saved: &str, chain: &str) -> String {
    saved
        .lines()
        .filter(|l| !l.contains(chain))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Splits a command line (or an iptables-save rule) into arguments at spaces,
/// honouring double quotes: `-m comment --comment "a b"` is four arguments.
pub fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_honour_double_quotes() {
        assert_eq!(
            shell_words(r#"-A POSTROUTING  -m comment --comment "a b" -j X"#),
            [
                "-A",
                "POSTROUTING",
                "-m",
                "comment",
                "--comment",
                "a b",
                "-j",
                "X"
            ]
        );
        assert!(shell_words("   ").is_empty());
    }

    #[test]
    fn chain_and_foreign_lines_split_a_save() {
        let saved = ":MASQ - [0:0]\n:KUBE - [0:0]\n-A POSTROUTING -j MASQ\n-A KUBE -j RETURN\n";
        assert_eq!(
            chain_lines(saved, "MASQ"),
            [":MASQ - [0:0]", "-A POSTROUTING -j MASQ"]
        );
        assert_eq!(
            foreign_lines(saved, "MASQ"),
            ":KUBE - [0:0]\n-A KUBE -j RETURN\n"
        );
    }

    #[test]
    fn eventually_is_bounded() {
        let started = Instant::now();
        assert!(!eventually(Duration::from_millis(100), || false));
        assert!(started.elapsed() < Duration::from_secs(2));
        let mut calls = 0;
        assert!(eventually(Duration::from_secs(1), || {
            calls += 1;
            calls == 3
        }));
    }
}
