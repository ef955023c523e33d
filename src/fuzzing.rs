//! What the fuzz target (fuzz/fuzz_targets/config.rs) checks for one input, here so the
//! test suite runs the same check over the target's seeds and corpus: config parsing and
//! validation never panic, whatever the bytes; whatever validates also renders for every
//! backend, and every rejection can be displayed; the fast path for the common shape reads
//! every document exactly as the general path does (the same tree where it reads it, and
//! the same config, warnings or error either way).

use std::path::Path;

use crate::backend::{BackendChoice, ChainName, render};
use crate::config::{ParseOptions, agreement, duration::parse_go_duration, parse};
use crate::policy::{Masquerade, Policy, PolicySettings};

/// Checks one input; panics (as the fuzzer wants) on a disagreement.
pub fn config_input(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_go_duration(text);
    if let Err(difference) = agreement::check(text) {
        panic!("{difference}");
    }
    // The same bytes as the items of a list, in the block, flow and JSON forms: most
    // fuzzed inputs are far from a config, and these put every line into the shape the
    // fast path reads (or nearly).
    let items: Vec<&str> = text.lines().take(64).collect();
    let block: String = items.iter().map(|item| format!("  - {item}\n")).collect();
    let quoted: Vec<String> = items.iter().map(|item| format!("\"{item}\"")).collect();
    for document in [
        format!("nonMasqueradeCIDRs:\n{block}resyncInterval: 60s\n"),
        format!(
            "forceMasqueradeCIDRs: [{}]\ncidrLimit: 100\n",
            items.join(", ")
        ),
        format!("{{\"masqueradeSourceCIDRs\": [{}]}}", quoted.join(",")),
    ] {
        if let Err(difference) = agreement::check(&document) {
            panic!("{difference}");
        }
    }
    for (enable_ipv6, nomasq_all_reserved_ranges) in [(false, false), (true, true)] {
        let options = ParseOptions {
            enable_ipv6,
            nomasq_all_reserved_ranges,
        };
        match parse(text, Path::new("/etc/config/ip-masq-agent"), options) {
            Ok(loaded) => {
                let settings = PolicySettings {
                    enable_ipv6,
                    masquerade: Masquerade {
                        random_fully: true,
                        to_ports: "1024-29999,32768-65535".parse().unwrap_or_default(),
                    },
                };
                let policy = Policy::new(&loaded.config, &settings);
                for choice in [
                    BackendChoice::Iptables,
                    BackendChoice::Nftables,
                    BackendChoice::Windows,
                ] {
                    let _ = render(choice, &policy, &ChainName::default());
                }
            }
            Err(err) => {
                let _ = err.to_string();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The fuzz target's check over its seeds, and over its corpus when one was grown
    /// here (`cargo fuzz run config`): the suite runs what the fuzzer runs.
    #[test]
    fn the_fuzz_targets_check_holds_for_its_seeds_and_corpus() {
        let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut checked = 0;
        for dir in ["seeds/config", "corpus/config"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(dir)) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(bytes) = std::fs::read(entry.path()) else {
                    continue;
                };
                super::config_input(&bytes);
                checked += 1;
            }
        }
        assert!(checked >= 5, "only {checked} inputs: the seeds are missing");
    }
}
