//! The agent's pure hot paths at 1k, 10k and 50k prefixes, no root needed:
//! `cargo bench --bench pure` (divan; filter with e.g. `-- render`).
//!
//! The inputs are the kernel benchmarks' ([`ima_harness::workload`]): distinct /24s that
//! nothing merges, and for the precedence paths one forceMasqueradeCIDRs /26 nested in
//! every 10th of them, so the flat answer is fragmented.

use std::path::Path;

use divan::{Bencher, black_box};
use ima_harness::workload::{json_config, nested_force_v4, spread_v4, yaml_config};
use ip_masq_agent::backend::{self, BackendChoice, ChainName};
use ip_masq_agent::config::{self, ParseOptions};
use ip_masq_agent::policy::{self, Policy, PolicySettings};

const SIZES: [usize; 3] = [1_000, 10_000, 50_000];

fn main() {
    divan::main();
}

/// The config of `n` prefixes, plus `n / 10` nested force prefixes when `force`.
fn config_text(n: usize, force: bool) -> String {
    let force = if force {
        nested_force_v4(n / 10, 10)
    } else {
        Vec::new()
    };
    yaml_config(&spread_v4(n, 0), &force, &["resyncInterval: 60s"])
}

fn policy(n: usize, force: bool) -> Policy {
    let loaded = config::parse(
        &config_text(n, force),
        Path::new("bench"),
        ParseOptions::default(),
    )
    .expect("valid config");
    Policy::new(&loaded.config, &PolicySettings::default())
}

#[divan::bench(args = SIZES)]
fn parse_yaml(bencher: Bencher, n: usize) {
    let text = config_text(n, false);
    bencher.bench(|| config::parse(black_box(&text), Path::new("b"), ParseOptions::default()));
}

#[divan::bench(args = SIZES)]
fn parse_json(bencher: Bencher, n: usize) {
    let text = json_config(&spread_v4(n, 0), &[]);
    bencher.bench(|| config::parse(black_box(&text), Path::new("b"), ParseOptions::default()));
}

/// `parse_yaml` through serde-saphyr alone, without the fast path for the common shape:
/// what every config cost before it, and what a config outside the shape costs still.
#[divan::bench(args = SIZES)]
fn parse_yaml_general_path(bencher: Bencher, n: usize) {
    let text = config_text(n, false);
    bencher.bench(|| {
        config::agreement::parse_general_only(
            black_box(&text),
            Path::new("b"),
            ParseOptions::default(),
        )
    });
}

/// `parse_json` without the fast path.
#[divan::bench(args = SIZES)]
fn parse_json_general_path(bencher: Bencher, n: usize) {
    let text = json_config(&spread_v4(n, 0), &[]);
    bencher.bench(|| {
        config::agreement::parse_general_only(
            black_box(&text),
            Path::new("b"),
            ParseOptions::default(),
        )
    });
}

/// Half the prefixes overlap or touch the other half: /24s and the /23s around them.
#[divan::bench(args = SIZES)]
fn merge_prefixes(bencher: Bencher, n: usize) {
    let mut nets: Vec<ipnet::IpNet> = spread_v4(n / 2, 0)
        .iter()
        .chain(&spread_v4(n / 2, 1))
        .map(|p| p.parse().expect("prefix"))
        .collect();
    nets.reverse();
    bencher.bench(|| policy::merge_prefixes(black_box(&nets)));
}

/// `Policy::new` with force prefixes: the longest-prefix resolution into the flat answer.
#[divan::bench(args = SIZES)]
fn resolve_longest_prefix(bencher: Bencher, n: usize) {
    let text = config_text(n, true);
    let loaded = config::parse(&text, Path::new("b"), ParseOptions::default()).expect("valid");
    let settings = PolicySettings::default();
    bencher.bench(|| Policy::new(black_box(&loaded.config), &settings));
}

#[divan::bench(args = SIZES, consts = [false, true])]
fn render_iptables<const FORCE: bool>(bencher: Bencher, n: usize) {
    let policy = policy(n, FORCE);
    let chain = ChainName::default();
    bencher.bench(|| backend::render(BackendChoice::Iptables, black_box(&policy), &chain));
}

#[divan::bench(args = SIZES, consts = [false, true])]
fn render_nftables<const FORCE: bool>(bencher: Bencher, n: usize) {
    let policy = policy(n, FORCE);
    let chain = ChainName::default();
    bencher.bench(|| backend::render(BackendChoice::Nftables, black_box(&policy), &chain));
}

/// What a resync does with `nft list table`'s answer (here: our own rendering of it).
#[divan::bench(args = SIZES)]
fn normalize_nftables_listing(bencher: Bencher, n: usize) {
    let text = backend::render(
        BackendChoice::Nftables,
        &policy(n, false),
        &ChainName::default(),
    );
    bencher.bench(|| backend::nftables::normalized_table(black_box(&text)));
}

/// What a resync does with `iptables-save -t nat`'s chain: every rule normalised.
#[divan::bench(args = SIZES)]
fn normalize_iptables_chain(bencher: Bencher, n: usize) {
    let text = backend::render(
        BackendChoice::Iptables,
        &policy(n, false),
        &ChainName::default(),
    );
    let rules: Vec<&str> = text.lines().filter(|l| l.starts_with("-A ")).collect();
    bencher.bench(|| {
        rules
            .iter()
            .map(|rule| backend::iptables::normalize_rule(black_box(rule)))
            .collect::<Vec<_>>()
    });
}
