//! ConfigMap swap -> first packet with the new behaviour, and kernel writes per idle
//! resync (`nft monitor`).

use std::net::IpAddr;
use std::time::Duration;

use ima_harness::swap::SwapProbe;
use ima_harness::workload::{spread_v4, yaml_config};
use ima_harness::{Agent, ConfigMapVolume, NODE_V4, Netns, POD_V4, Topology, log_field, log_time};

use crate::common::{
    Ctx, LoadLog, NftMonitor, backend_flags, median, min_max, ms, percentile, start_synced, table,
};

/// What one series of swaps gave.
pub struct Series {
    pub latency: Vec<f64>,
    pub to_masquerade: Vec<f64>,
    pub to_pod: Vec<f64>,
    pub logged: Vec<f64>,
    pub sync: Vec<f64>,
    pub processes: Vec<String>,
    pub old_after_new: usize,
    pub changed_syncs: usize,
    pub other_syncs: usize,
}

/// How to run a series: the agent's start and its config's other lines.
pub struct SwapSetup<'a> {
    pub topology: &'a Topology,
    pub volume: &'a mut ConfigMapVolume,
    /// The config with (true) or without 203.0.113.0/24 kept.
    pub config: &'a dyn Fn(bool) -> String,
    pub interval: Duration,
    pub max_wait: Duration,
    /// Whether the agent logs `config changed; rules applied` (ours does, upstream not).
    pub logs_changes: bool,
}

fn source(keep: bool) -> IpAddr {
    (if keep { POD_V4 } else { NODE_V4 })
        .parse()
        .expect("address")
}

/// The config of `base` plus (when `keep`) 203.0.113.0/24, resynced every `resync`.
pub fn keep_config(base: &[String], keep: bool, resync: &str) -> String {
    let mut list = base.to_vec();
    if keep {
        list.push("203.0.113.0/24".into());
    }
    yaml_config(&list, &[], &[&format!("resyncInterval: {resync}")])
}

/// One swap of a series: flips the config and measures; returns the latency (ms).
pub struct Swapper {
    probe: SwapProbe,
    keep: bool,
    count: usize,
    pub series: Series,
}

impl Swapper {
    pub fn new(topology: &Topology) -> Swapper {
        Swapper {
            probe: SwapProbe::new(topology),
            keep: true,
            count: 0,
            series: Series {
                latency: Vec::new(),
                to_masquerade: Vec::new(),
                to_pod: Vec::new(),
                logged: Vec::new(),
                sync: Vec::new(),
                processes: Vec::new(),
                old_after_new: 0,
                changed_syncs: 0,
                other_syncs: 0,
            },
        }
    }

    pub fn swap(&mut self, setup: &mut SwapSetup, agent: &mut ima_harness::AgentProcess) {
        let next = !self.keep;
        let sample = self.probe.swap(
            setup.topology,
            setup.volume,
            &(setup.config)(next),
            (source(self.keep), source(next)),
            setup.interval,
            setup.max_wait,
        );
        self.keep = next;
        self.count += 1;
        let latency = sample.latency.as_secs_f64() * 1e3;
        let s = &mut self.series;
        s.latency.push(latency);
        if next {
            &mut s.to_pod
        } else {
            &mut s.to_masquerade
        }
        .push(latency);
        s.old_after_new += usize::from(sample.old_after_new);
        if setup.logs_changes {
            let line = agent.wait_for_line(
                "config changed; rules applied",
                self.count,
                Duration::from_secs(10),
            );
            s.logged
                .push(log_time(&line).map_or(f64::NAN, |t| (t - sample.renamed_at) * 1e3));
            s.sync.push(
                log_field(&line, "elapsed_ms")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN),
            );
            s.processes
                .push(log_field(&line, "processes").unwrap_or("?").to_string());
        }
        std::thread::sleep(Duration::from_millis(150));
    }

    pub fn finish(mut self, agent: &ima_harness::AgentProcess) -> Series {
        self.series.changed_syncs = agent.log_lines("config changed; rules applied").len();
        self.series.other_syncs = agent.log_lines("rules resynced").len();
        self.series
    }
}

/// A series of `swaps` on a fresh topology with `agent` started with `flags`.
fn series(
    ctx: &Ctx,
    load: &mut LoadLog,
    agent: &Agent,
    setup: &str,
    base: &[String],
    swaps: usize,
    max_wait: Duration,
) -> Series {
    let topology = Topology::new();
    let config = |keep: bool| keep_config(base, keep, "60s");
    let mut volume = ConfigMapVolume::new(&config(true));
    let mut process = start_synced(agent, &topology.node, &volume, setup, &[]);
    let mut swapper = Swapper::new(&topology);
    let mut run = SwapSetup {
        topology: &topology,
        volume: &mut volume,
        config: &config,
        interval: Duration::from_millis(1),
        max_wait,
        logs_changes: true,
    };
    for i in 1..=swaps {
        ctx.sample(load, || swapper.swap(&mut run, &mut process));
        eprintln!(
            "  {setup} swap {i}: {:.1} ms",
            swapper.series.latency.last().unwrap_or(&f64::NAN)
        );
    }
    let series = swapper.finish(&process);
    process.terminate();
    series
}

/// The row of the swap table for one series.
pub fn series_row(label: String, s: &Series, target_ms: f64) -> Vec<String> {
    let (lo, _) = min_max(&s.latency);
    let mut processes = s.processes.clone();
    processes.sort();
    processes.dedup();
    let (med, p99) = (median(&s.latency), percentile(&s.latency, 99.0));
    vec![
        label,
        format!("{} ms", ms(med)),
        format!("{} ms", ms(p99)),
        format!("{} ms", ms(lo)),
        format!("{} ms", ms(median(&s.to_masquerade))),
        format!("{} ms", ms(median(&s.to_pod))),
        with_ms(median(&s.logged)),
        with_ms(median(&s.sync)),
        processes.join("/"),
        format!("{} / {}", s.changed_syncs, s.other_syncs),
        s.old_after_new.to_string(),
        if med < target_ms && (target_ms < 100.0 || p99 < target_ms) {
            "**met**"
        } else {
            "**not met**"
        }
        .into(),
    ]
}

fn with_ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{} ms", ms(v))
    }
}

pub const SWAP_HEAD: [&str; 12] = [
    "backend",
    "median",
    "p99 (max)",
    "min",
    "→ masquerade",
    "→ pod address",
    "rename → `config changed` logged",
    "sync `elapsed_ms`",
    "processes per change",
    "syncs: changed / other",
    "old source after new",
    "target",
];

pub fn swap(ctx: &Ctx) -> String {
    let swaps = ctx.knob("swaps", 20);
    let mut load = LoadLog::start();
    let mut rows = Vec::new();
    let mut every = String::from("```\n");
    for setup in ctx.list("setups", &["iptables-nft", "iptables-legacy", "nftables"]) {
        eprintln!("swap: {setup}, {swaps} swaps");
        let s = series(
            ctx,
            &mut load,
            &ctx.agent,
            &setup,
            &["10.0.0.0/8".into()],
            swaps,
            Duration::from_secs(3),
        );
        every.push_str(&format!(
            "{setup:<16} {}\n",
            s.latency
                .iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        rows.push(series_row(
            format!("`{}`", backend_flags(&setup).join(" ")),
            &s,
            100.0,
        ));
    }
    every.push_str("```\n");
    format!(
        "### ConfigMap swap → first packet with the new behaviour ({swaps} swaps per backend, target < 100 ms median and p99)\n\n\
         resyncInterval 60s; probes every 1 ms, each from a fresh source port. p99 is the nearest rank (for 20 samples the maximum).\n\n{}\nEvery swap (ms):\n\n{every}\n{}\n",
        table("lrrrrrrrrrrl", &SWAP_HEAD, &rows),
        load.sentence()
    )
}

/// nftables with 50,000 prefixes: one prefix added or removed.
pub fn large_swap(ctx: &Ctx) -> String {
    let swaps = ctx.knob("swaps", 10);
    let size = ctx.sizes(&["50000"])[0];
    let mut load = LoadLog::start();
    eprintln!("large-swap: nftables, {size} prefixes, {swaps} swaps");
    let base = spread_v4(size, 0);
    let s = series(
        ctx,
        &mut load,
        &ctx.agent,
        "nftables",
        &base,
        swaps,
        Duration::from_secs(10),
    );
    let row = series_row(
        format!("`--backend=nftables`, {size} prefixes ± 1"),
        &s,
        20.0,
    );
    let every = s
        .latency
        .iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "### One prefix added or removed at {size} prefixes (nftables): ConfigMap swap → in the kernel (target < 20 ms median)\n\n\
         {size} nonMasqueradeCIDRs, alternately with and without 203.0.113.0/24; the first packet with the new behaviour\n\
         shows the change is in the kernel. {swaps} swaps.\n\n{}\nEvery swap (ms): {every}\n\n{}\n",
        table("lrrrrrrrrrrl", &SWAP_HEAD, &[row]),
        load.sentence()
    )
}

pub fn writes(ctx: &Ctx) -> String {
    let idle_resyncs = ctx.knob("resyncs", 10);
    let load = LoadLog::start();
    let mut rows = Vec::new();
    let mut listings = String::new();
    let config = |extra: &str| {
        format!(
            "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16{extra}]\nresyncInterval: 200ms\n"
        )
    };
    for setup in ctx.list("setups", &["iptables-nft", "nftables"]) {
        eprintln!("writes: {setup}");
        let ns = Netns::new("writes");
        let mut volume = ConfigMapVolume::new(&config(""));
        let mut agent = start_synced(&ctx.agent, &ns, &volume, &setup, &[]);
        let monitor = NftMonitor::start(&ns);
        std::thread::sleep(Duration::from_millis(500));
        let start = monitor.lines().len();
        let before = agent.log_lines("rules resynced").len();
        agent.wait_for_log(
            "rules resynced",
            before + idle_resyncs,
            Duration::from_secs(30),
        );
        let resyncs = agent.log_lines("rules resynced").len() - before;
        let marker = |n: u32| {
            let name = format!("ima_bench_marker_{n}");
            ns.sh(&["nft", "add", "table", "inet", &name]);
            monitor
                .wait_for(|l| l.contains(&name), Duration::from_secs(3))
                .is_some()
        };
        let seen1 = marker(1);
        volume.update(&config(", 100.64.0.0/10"));
        agent.wait_for_log("config changed; rules applied", 1, Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(300));
        let seen2 = marker(2);
        let lines: Vec<String> = monitor
            .lines()
            .into_iter()
            .skip(start)
            .map(|(_, l)| l)
            .collect();
        monitor.stop();
        agent.terminate();
        let at = |name: &str| {
            lines
                .iter()
                .position(|l| l.contains(name))
                .unwrap_or(lines.len())
        };
        let (m1, m2) = (at("ima_bench_marker_1"), at("ima_bench_marker_2"));
        // Idle: every line before marker 1, events and `# new generation` lines alike.
        let idle = lines[..m1].iter().filter(|l| !l.trim().is_empty()).count();
        // The change: between the markers, less marker 1's own generation line.
        let change: Vec<&String> = lines[(m1 + 1).min(m2)..m2]
            .iter()
            .filter(|l| !l.trim().is_empty())
            .collect();
        let generations = change
            .iter()
            .filter(|l| l.starts_with("# new generation"))
            .count()
            .saturating_sub(1);
        let events = change.iter().filter(|l| !l.starts_with('#')).count();
        rows.push(vec![
            format!("`{}`", backend_flags(&setup).join(" ")),
            resyncs.to_string(),
            idle.to_string(),
            format!("{}", idle as f64 / resyncs.max(1) as f64),
            if seen1 { "yes" } else { "no" }.into(),
            format!("{events} events in {generations} generation(s)"),
            if seen2 { "yes" } else { "no" }.into(),
            if idle == 0 && seen1 {
                "**met**"
            } else {
                "**not met**"
            }
            .into(),
        ]);
        let shown: Vec<&str> = change
            .iter()
            .skip(1)
            .filter(|l| !l.contains("ima_bench_marker"))
            .take(40)
            .map(|l| l.as_str())
            .collect();
        listings.push_str(&format!(
            "What the monitor printed for the config change ({setup}):\n\n```\n{}\n```\n\n",
            shown.join("\n")
        ));
    }
    format!(
        "### Kernel writes per idle resync (`nft monitor` in the node namespace)\n\n\
         resyncInterval 200ms, default CIDR list; the monitor runs from 0.5 s after the first sync for {idle_resyncs} idle\n\
         resyncs, then marker table 1 (the monitor is live), a config change (one CIDR added: the monitor sees the\n\
         agent's writes) and marker table 2.\n\n{}\n{listings}{}\n",
        table(
            "lrrrllll",
            &[
                "backend",
                "idle resyncs watched",
                "events during them",
                "per resync",
                "marker 1 seen",
                "one config change",
                "marker 2 seen",
                "target 0"
            ],
            &rows
        ),
        load.sentence()
    )
}
