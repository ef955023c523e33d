//! The kernel benchmarks: the agent in network namespaces this process creates and
//! deletes (also on failure or Ctrl-C), never the root namespace's firewall, packets
//! only to addresses of those namespaces, every loop bounded in count and time. Run as
//! root; each scenario prints a Markdown section for BENCHMARKS.md on stdout (progress
//! on stderr):
//!
//! ```text
//! scripts/build-release.sh                    # the shipped static build, measured when present
//! cargo bench --bench kernel -- SCENARIO... [--runs=N ...]
//! cargo bench --bench kernel -- --help        # scenarios and knobs
//! ```

mod common;
mod conntrack;
mod datapath;
mod idle;
mod reload;
mod startup;
mod sync;
mod upstream;

use std::collections::BTreeMap;

use common::Ctx;

/// Every scenario: name, what it measures, the function that runs it.
type Scenario = (&'static str, &'static str, fn(&Ctx) -> String);

const SCENARIOS: &[Scenario] = &[
    (
        "startup",
        "process start -> rules in the kernel, 3/64/1,000 CIDRs, iptables-nft and -legacy (--runs=30)",
        startup::startup,
    ),
    (
        "processes",
        "processes per resync, IPv4 and dual-stack, counted by the log, PATH wrappers and strace (--seconds=10)",
        startup::processes,
    ),
    (
        "footprint",
        "binary sizes; VmRSS after 30 s idle, endpoint on and off, static and dynamic builds (--seconds=30)",
        idle::footprint,
    ),
    (
        "datapath",
        "new connections per second through the node, 0..50,000 prefixes, three setups (--runs=5 --sizes= --setups=)",
        datapath::datapath,
    ),
    (
        "exceptions",
        "the same on nftables: none, 10,000 prefixes, 10,000 + 1,000 nested forceMasqueradeCIDRs (--runs=9)",
        datapath::exceptions,
    ),
    (
        "egress",
        "the same on nftables: neither, outputInterface, outputAddress, both (issue 17; --runs=9)",
        datapath::egress,
    ),
    (
        "sync",
        "first and changed sync time by backend and size (--reps=3 --changes=3 --sizes= --setups=)",
        sync::sync,
    ),
    (
        "swap",
        "ConfigMap swap -> first packet with the new behaviour, three backends (--swaps=20)",
        reload::swap,
    ),
    (
        "cpu",
        "CPU over 60 s idle at resyncInterval 1s and 60s, three backends (--seconds=60)",
        idle::cpu,
    ),
    (
        "writes",
        "nft monitor events per idle resync (iptables-nft, nftables)",
        reload::writes,
    ),
    (
        "large-first",
        "nftables first and changed sync at 50,000 prefixes, start -> elements in the kernel (--reps=5 --changes=3)",
        sync::large_first,
    ),
    (
        "large-change",
        "nftables, 50,000 prefixes: 5,000 added/removed and 5,000 replaced by a ConfigMap swap -> in the kernel (--swaps=10 --changed=5000)",
        sync::large_change,
    ),
    (
        "large-execs",
        "nftables, 50,000 prefixes: every process the agent starts (strace), by phase: first sync, changes, drift repair, idle",
        sync::large_execs,
    ),
    (
        "large-swap",
        "nftables, 50,000 prefixes: one prefix added/removed by a ConfigMap swap -> in the kernel (--swaps=10)",
        reload::large_swap,
    ),
    (
        "large-cpu",
        "CPU per idle resync at 64 and 50,000 prefixes, resyncInterval 1s, nftables and iptables-nft (--seconds=30 --setups=)",
        idle::large_cpu,
    ),
    (
        "conntrack",
        "re-deciding 1,000 stale flows beside 100,000 entries and a whole table of 100,000: time and VmHWM (--runs=3 --entries= --stale= --base=PATH --base-runs=1 --cap=300)",
        conntrack::conntrack,
    ),
    (
        "upstream-start",
        "ours vs upstream (--upstream=PATH): start -> rules committed, 3/64/1,000 CIDRs, iptables-nft (--runs=15)",
        upstream::start,
    ),
    (
        "upstream-sync",
        "ours vs upstream: sync at 1,000 CIDRs, wall and CPU per resync (--seconds=30)",
        upstream::sync,
    ),
    (
        "upstream-swap",
        "ours vs upstream: ConfigMap swap -> applied, resyncInterval 5s (--swaps=8)",
        upstream::swap,
    ),
];

fn usage() -> String {
    let mut out = String::from(
        "usage: cargo bench --bench kernel -- SCENARIO... [--KNOB=VALUE...]\n\
         (as root; `all` runs every scenario but the upstream ones)\n\nscenarios:\n",
    );
    for (name, what, _) in SCENARIOS {
        out.push_str(&format!("  {name:<15} {what}\n"));
    }
    out.push_str(
        "\nknobs: --agent=PATH (default: target/<host>/release/ip-masq-agent when present, \
         else this build's target/release one), --upstream=PATH, --busy=1 (take every sample at once, \
         without waiting for a quiet machine), and the per-scenario ones above\n",
    );
    out
}

fn main() {
    ima_harness::clean_up_on_signals();
    let mut names = Vec::new();
    let mut knobs = BTreeMap::new();
    let mut args = std::env::args().skip(1).peekable();
    while let Some(arg) = args.next() {
        match arg.strip_prefix("--") {
            // cargo passes --bench to every bench target.
            Some("bench") => {}
            Some("help") | Some("h") => {
                print!("{}", usage());
                return;
            }
            Some(knob) => {
                let (key, value) = match knob.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (knob.to_string(), args.next().unwrap_or_default()),
                };
                knobs.insert(key, value);
            }
            None => names.push(arg),
        }
    }
    if names.is_empty() {
        // `cargo bench` and `cargo test --all-targets` run this with no scenario.
        eprint!("{}", usage());
        return;
    }
    if names.iter().any(|n| n == "all") {
        names = SCENARIOS
            .iter()
            .map(|s| s.0.to_string())
            .filter(|n| !n.starts_with("upstream"))
            .collect();
    }
    let chosen: Vec<&Scenario> = names
        .iter()
        .map(|name| {
            SCENARIOS
                .iter()
                .find(|s| s.0 == name)
                .unwrap_or_else(|| panic!("unknown scenario {name:?}\n{}", usage()))
        })
        .collect();
    if !ima_harness::require_root() {
        std::process::exit(1);
    }
    let ctx = Ctx::new(knobs);
    println!("{}", ctx.header());
    for (name, _, run) in chosen {
        eprintln!("== {name}");
        let section = run(&ctx);
        println!("{section}");
    }
}
