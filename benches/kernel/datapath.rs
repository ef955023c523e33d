//! New connections per second through the node, for growing prefix lists.
//!
//! pod --veth--> node (the agent's rules, conntrack, NAT) --veth--> remote. Every packet
//! is a new UDP connection to 203.0.113.10, an address the remote owns and no prefix
//! contains, so every packet is conntracked, walks the whole chain (or does one set
//! lookup) and is masqueraded. The remote counts and drops the packets in a netdev
//! ingress chain. Rate = packets counted / the generator's send time.

use std::net::Ipv4Addr;
use std::time::Duration;

use ima_harness::flood::Flood;
use ima_harness::workload::{nested_force_v4, spread_v4, yaml_config};
use ima_harness::{ConfigMapVolume, POD_V4, TempDir, Topology, log_field};

use crate::common::{Ctx, LoadLog, backend_flags, median, ms, rate, start_synced, table};

const DST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Forwarding runs on one of the two cores: a run starts only when other processes use
/// at most 5 % of the machine, and is taken again when they used more than 10 %.
const QUIET: (f64, f64) = (5.0, 10.0);

#[derive(Clone, Copy)]
enum Workload {
    Plain(usize),
    /// `force` forceMasqueradeCIDRs /26s nested in every (non_masq / force)-th /24.
    Nested {
        non_masq: usize,
        force: usize,
    },
    /// outputInterface (the uplink and two wildcards) and/or outputAddress (the node's
    /// uplink address, which the remote counts as masqueraded), with no prefix.
    Egress {
        interfaces: bool,
        address: bool,
    },
}

impl Workload {
    fn label(self) -> String {
        match self {
            Workload::Plain(0) => "none".into(),
            Workload::Plain(n) => format!("{n} nonMasqueradeCIDRs"),
            Workload::Nested { non_masq, force } => {
                format!("{non_masq} nonMasqueradeCIDRs + {force} nested forceMasqueradeCIDRs")
            }
            Workload::Egress {
                interfaces,
                address,
            } => match (interfaces, address) {
                (true, true) => "outputInterface [eth1, bond+, vlan+] + outputAddress".into(),
                (true, false) => "outputInterface [eth1, bond+, vlan+]".into(),
                (false, true) => "outputAddress 192.0.2.1".into(),
                (false, false) => "none".into(),
            },
        }
    }

    fn config(self) -> String {
        let mut extra = vec!["masqLinkLocal: true", "resyncInterval: 1h"];
        let (n, force) = match self {
            Workload::Plain(n) => (n, Vec::new()),
            Workload::Nested { non_masq, force } => {
                (non_masq, nested_force_v4(force, non_masq / force))
            }
            Workload::Egress {
                interfaces,
                address,
            } => {
                if interfaces {
                    extra.push("outputInterface: [eth1, 'bond+', 'vlan+']");
                }
                if address {
                    extra.push("outputAddress: 192.0.2.1");
                }
                (0, Vec::new())
            }
        };
        // masqLinkLocal: "0" means no prefix at all.
        yaml_config(&spread_v4(n, 0), &force, &extra)
    }
}

/// A programmed topology and its samples.
struct Point {
    label: String,
    /// Dropped (namespaces deleted) once measured.
    topology: Option<Topology>,
    sync_ms: f64,
    programmed: bool,
    rates: Vec<f64>,
}

/// Fresh namespaces, the remote's counters, and (unless `setup` is None) the node's rules:
/// the agent syncs once and is stopped with SIGTERM, so no resync runs while measuring.
fn program(ctx: &Ctx, setup: Option<&str>, workload: Workload, dir: &TempDir) -> Point {
    let topology = Topology::new();
    if let Workload::Egress {
        interfaces: true, ..
    } = workload
    {
        // Something for the wildcards to match, as on a node with a bond and a VLAN: a
        // pattern that matches nothing is warned about, and warnings fail the run. A veth
        // pair each (kernels without the dummy driver have veth); the peers' names match
        // no pattern.
        for (name, peer) in [("bond0", "xpeer0"), ("vlan0", "xpeer1")] {
            topology.node.sh(&[
                "ip", "link", "add", name, "type", "veth", "peer", "name", peer,
            ]);
        }
    }
    let counters = dir.path.join("remote.nft");
    std::fs::write(
        &counters,
        format!(
            "table netdev ima_bench {{\n  chain ingress {{\n    type filter hook ingress device \"eth0\" priority -500; policy accept;\n    \
             ip daddr {DST} ip saddr 192.0.2.1 udp dport 10000-10099 counter drop comment \"masq\"\n    \
             ip daddr {DST} udp dport 10000-10099 counter drop comment \"other\"\n    \
             ip daddr {DST} udp dport 20000-20009 drop\n  }}\n}}\n"
        ),
    )
    .expect("write counters");
    topology
        .remote
        .sh(&["nft", "-f", &counters.to_string_lossy()]);
    let mut sync_ms = f64::NAN;
    if let Some(setup) = setup {
        let volume = ConfigMapVolume::new(&workload.config());
        let mut agent = start_synced(&ctx.agent, &topology.node, &volume, setup, &[]);
        let line = agent.wait_for_line("rules applied", 1, Duration::from_secs(1));
        if let Workload::Plain(n) = workload {
            assert_eq!(
                log_field(&line, "prefixes"),
                Some(n.to_string().as_str()),
                "{line}"
            );
        }
        sync_ms = log_field(&line, "elapsed_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN);
        agent.terminate();
        let warnings = agent.log_lines(" WARN ").len() + agent.log_lines(" ERROR ").len();
        assert_eq!(warnings, 0, "warnings in the agent log:\n{}", agent.log());
    }
    Point {
        label: workload.label(),
        topology: Some(topology),
        sync_ms,
        programmed: setup.is_some(),
        rates: Vec::new(),
    }
}

/// (masqueraded, other) packets counted by the remote.
fn counts(topology: &Topology) -> (u64, u64) {
    let listing = topology
        .remote
        .sh(&["nft", "list", "chain", "netdev", "ima_bench", "ingress"]);
    let count = |tag: &str| {
        listing
            .lines()
            .find(|l| l.contains(&format!("comment \"{tag}\"")))
            .and_then(|l| {
                l.split_whitespace()
                    .skip_while(|w| *w != "packets")
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    (count("masq"), count("other"))
}

/// One measured run: packets per second delivered (and masqueraded, when `rules`).
fn run_once(topology: &Topology, rules: bool) -> f64 {
    let pod: Ipv4Addr = POD_V4.parse().expect("pod address");
    // Warm the neighbour caches on every hop (uncounted ports), then start clean.
    Flood {
        count: 200,
        duration: Duration::from_millis(500),
        dport_base: 20_000,
        ..Flood::new(pod, DST)
    }
    .run(&topology.pod);
    let _ = topology.node.output(&["conntrack", "-F"]);
    let (m0, o0) = counts(topology);
    let sent = Flood::new(pod, DST).run(&topology.pod);
    std::thread::sleep(Duration::from_millis(300));
    let (m1, o1) = counts(topology);
    let (masq, other) = (m1 - m0, o1 - o0);
    // The conntrack hash table is shared by all namespaces: leave no entries behind for
    // the next point's run.
    let _ = topology.node.output(&["conntrack", "-F"]);
    assert!(
        other == 0 || !rules,
        "{other} packets reached the remote without masquerade"
    );
    eprintln!(
        "    sent {} in {:?}, delivered {masq} masqueraded, {other} not",
        sent.packets, sent.elapsed
    );
    (masq + other) as f64 / sent.elapsed.as_secs_f64()
}

/// Runs every point `runs` times, interleaved (a run of each point in turn).
fn measure(ctx: &Ctx, load: &mut LoadLog, points: &mut [Point], runs: usize) {
    for run in 1..=runs {
        for point in points.iter_mut() {
            eprintln!("  {} run {run}", point.label);
            let topology = point.topology.as_ref().expect("not yet measured");
            let r = ctx.sample_with(load, QUIET, || run_once(topology, point.programmed));
            point.rates.push(r);
        }
    }
    for point in points.iter_mut() {
        point.topology = None;
    }
}

fn runs_block(points: &[(String, Vec<Point>)]) -> String {
    let mut out = String::from("```\n");
    for (setup, list) in points {
        for p in list {
            let runs: Vec<String> = p.rates.iter().map(|r| format!("{r:.0}")).collect();
            out.push_str(&format!("{setup:<16} {:<60} {}\n", p.label, runs.join(" ")));
        }
    }
    out.push_str("```\n");
    out
}

pub fn datapath(ctx: &Ctx) -> String {
    let runs = ctx.knob("runs", 5);
    let sizes = ctx.sizes(&["0", "64", "1000", "10000", "50000"]);
    let setups = ctx.list("setups", &["iptables-nft", "iptables-legacy", "nftables"]);
    let dir = TempDir::new("datapath");
    let mut load = LoadLog::start();
    eprintln!("datapath: the generator alone (no rules, no conntrack in the node)");
    let mut base = vec![program(ctx, None, Workload::Plain(0), &dir)];
    measure(ctx, &mut load, &mut base, runs);
    let base_rate = median(&base[0].rates);
    drop(base);
    let mut all = Vec::new();
    for setup in &setups {
        eprintln!("datapath: {setup}, programming {sizes:?}");
        let mut points: Vec<Point> = sizes
            .iter()
            .map(|&n| program(ctx, Some(setup), Workload::Plain(n), &dir))
            .collect();
        measure(ctx, &mut load, &mut points, runs);
        all.push((setup.clone(), points));
    }
    let mut head = vec!["setup".to_string()];
    head.extend(sizes.iter().map(|n| n.to_string()));
    let mut rows = Vec::new();
    let mut syncs = Vec::new();
    for (setup, points) in &all {
        let mut row = vec![setup.clone()];
        row.extend(points.iter().map(|p| rate(median(&p.rates))));
        rows.push(row);
        let mut row = vec![setup.clone()];
        row.extend(points.iter().map(|p| ms(p.sync_ms)));
        syncs.push(row);
    }
    let head: Vec<&str> = head.iter().map(String::as_str).collect();
    let aligns = format!("l{}", "r".repeat(sizes.len()));
    let mut verdict = String::new();
    if let Some((_, points)) = all.iter().find(|(s, _)| s == "nftables")
        && points.len() > 1
    {
        let (first, last) = (
            median(&points[0].rates),
            median(&points[points.len() - 1].rates),
        );
        let pct = 100.0 * last / first;
        verdict = format!(
            "nftables at {} prefixes: {}/s = **{pct:.1} %** of its rate at {} ({}/s); target ≥ 90 %: **{}**.\n\n",
            sizes[sizes.len() - 1],
            rate(last),
            sizes[0],
            rate(first),
            if pct >= 90.0 { "met" } else { "not met" }
        );
    }
    let block = runs_block(&all);
    format!(
        "### New connections per second through the node (median of {runs} interleaved runs)\n\n\
         Generator alone, node without rules (no conntrack): {}/s.\n\n{}\n{verdict}Every run (packets/s):\n\n{block}\n\
         First sync of the agent while programming each point (ms, one sample each):\n\n{}\n{}\n",
        rate(base_rate),
        table(&aligns, &head, &rows),
        table(&aligns, &head, &syncs),
        load.sentence()
    )
}

/// Task: nonMasqueradeCIDRs with forceMasqueradeCIDRs nested inside, on nftables, against none.
pub fn exceptions(ctx: &Ctx) -> String {
    let runs = ctx.knob("runs", 9);
    let setup = ctx.list("setups", &["nftables"]).remove(0);
    let dir = TempDir::new("exceptions");
    let mut load = LoadLog::start();
    let workloads = [
        Workload::Plain(0),
        Workload::Plain(10_000),
        Workload::Nested {
            non_masq: 10_000,
            force: 1_000,
        },
    ];
    eprintln!("exceptions: {setup}, programming 3 points");
    let mut points: Vec<Point> = workloads
        .iter()
        .map(|&w| program(ctx, Some(&setup), w, &dir))
        .collect();
    let flags = backend_flags(&setup).join(" ");
    measure(ctx, &mut load, &mut points, runs);
    let rows = rows_against_the_first(&points, 90.0, true);
    let block = runs_block(&[(setup.clone(), points)]);
    format!(
        "### Masquerade exceptions on the data path (`{flags}`, median of {runs} interleaved runs)\n\n{}\nEvery run (packets/s):\n\n{block}\n{}\n",
        table(
            "lrrrl",
            &[
                "prefixes",
                "new connections/s",
                "of the rate with none",
                "first sync (ms)",
                "within 10 %?"
            ],
            &rows
        ),
        load.sentence()
    )
}

/// Issue 17: outputInterface and outputAddress on the data path, on nftables, against
/// neither: the interface check is one rule of `oifname !=` matches, the SNAT a `snat ip
/// to` in place of `masquerade`.
pub fn egress(ctx: &Ctx) -> String {
    let runs = ctx.knob("runs", 9);
    let setup = ctx.list("setups", &["nftables"]).remove(0);
    let dir = TempDir::new("egress");
    let mut load = LoadLog::start();
    let workloads = [(false, false), (true, false), (false, true), (true, true)].map(
        |(interfaces, address)| Workload::Egress {
            interfaces,
            address,
        },
    );
    eprintln!("egress: {setup}, programming {} points", workloads.len());
    let mut points: Vec<Point> = workloads
        .iter()
        .map(|&w| program(ctx, Some(&setup), w, &dir))
        .collect();
    let flags = backend_flags(&setup).join(" ");
    measure(ctx, &mut load, &mut points, runs);
    let rows = rows_against_the_first(&points, 95.0, false);
    let block = runs_block(&[(setup.clone(), points)]);
    format!(
        "### outputInterface and outputAddress on the data path (`{flags}`, median of {runs} interleaved runs)\n\n{}\nEvery run (packets/s):\n\n{block}\n{}\n",
        table(
            "lrrl",
            &[
                "config",
                "new connections/s",
                "of the rate with neither",
                "within 5 %?"
            ],
            &rows
        ),
        load.sentence()
    )
}

/// One row per point: its label, median rate, that rate as a share of the first
/// point's, the first sync's time (`with_sync`), and whether the share reaches
/// `target_pct`.
fn rows_against_the_first(points: &[Point], target_pct: f64, with_sync: bool) -> Vec<Vec<String>> {
    let Some(first) = points.first() else {
        return Vec::new();
    };
    let none = median(&first.rates);
    points
        .iter()
        .map(|p| {
            let pct = 100.0 * median(&p.rates) / none;
            let mut row = vec![
                p.label.clone(),
                rate(median(&p.rates)),
                format!("{pct:.1} %"),
            ];
            if with_sync {
                row.push(ms(p.sync_ms));
            }
            row.push(if pct >= target_pct {
                "yes".into()
            } else {
                "**no**".into()
            });
            row
        })
        .collect()
}
