//! Sync time by backend and size: the first sync after start (`rules applied`) and a
//! changed-config sync (a kubelet-style swap to a disjoint list of the same size;
//! `config changed; rules applied`), both the agent's own `elapsed_ms`.

use std::time::Duration;

use ima_harness::workload::{spread_v4, yaml_config};
use ima_harness::{ConfigMapVolume, Netns, log_field, log_time, wall_now};

use crate::common::{Ctx, LoadLog, median, ms, start_synced, table};

fn config(size: usize, offset: usize) -> String {
    yaml_config(
        &spread_v4(size, offset),
        &[],
        &["masqLinkLocal: true", "resyncInterval: 1h"],
    )
}

fn elapsed(line: &str) -> f64 {
    log_field(line, "elapsed_ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

struct Cell {
    first: Vec<f64>,
    changed: Vec<f64>,
    processes: (String, String),
    /// The first sync's `since_start_ms`: the agent's start -> its sync done.
    since_start: Vec<f64>,
    /// Spawning the agent -> its `rules applied` line (wall clock).
    spawn_to_applied: Vec<f64>,
}

fn measure(
    ctx: &Ctx,
    load: &mut LoadLog,
    setup: &str,
    size: usize,
    reps: usize,
    changes: usize,
) -> Cell {
    let mut cell = Cell {
        first: Vec::new(),
        changed: Vec::new(),
        processes: Default::default(),
        since_start: Vec::new(),
        spawn_to_applied: Vec::new(),
    };
    let timeout = Duration::from_secs(120);
    for _ in 0..reps {
        let (_ns, mut volume, mut agent, line, spawned_at) = ctx.sample(load, || {
            let ns = Netns::new("sync");
            let volume = ConfigMapVolume::new(&config(size, 0));
            let spawned_at = wall_now();
            let mut agent = start_synced(&ctx.agent, &ns, &volume, setup, &[]);
            let line = agent.wait_for_line("rules applied", 1, timeout);
            (ns, volume, agent, line, spawned_at)
        });
        cell.first.push(elapsed(&line));
        cell.since_start.push(
            log_field(&line, "since_start_ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN),
        );
        cell.spawn_to_applied
            .push(log_time(&line).map_or(f64::NAN, |t| (t - spawned_at) * 1e3));
        cell.processes.0 = log_field(&line, "processes").unwrap_or("?").to_string();
        let mut generation = 0;
        for _ in 0..changes {
            std::thread::sleep(Duration::from_millis(200));
            let line = ctx.sample(load, || {
                generation += 1;
                volume.update(&config(size, generation % 2));
                agent.wait_for_line("config changed; rules applied", generation, timeout)
            });
            cell.changed.push(elapsed(&line));
            cell.processes.1 = log_field(&line, "processes").unwrap_or("?").to_string();
        }
        let warnings = agent.log_lines(" WARN ").len() + agent.log_lines(" ERROR ").len();
        assert_eq!(
            warnings,
            0,
            "{setup} {size}: warnings in the agent log:\n{}",
            agent.log()
        );
        agent.terminate();
        eprintln!(
            "  {setup} {size}: first {:?}, changed {:?}",
            cell.first, cell.changed
        );
    }
    cell
}

fn run(
    ctx: &Ctx,
    setups: &[String],
    sizes: &[usize],
    reps: usize,
    changes: usize,
) -> (String, Vec<(String, usize, Cell)>) {
    let mut load = LoadLog::start();
    let mut cells = Vec::new();
    for setup in setups {
        for &size in sizes {
            eprintln!("sync: {setup}, {size} prefixes, {reps} starts x {changes} changes");
            cells.push((
                setup.clone(),
                size,
                measure(ctx, &mut load, setup, size, reps, changes),
            ));
        }
    }
    let mut head = vec!["setup".to_string(), "sync".to_string()];
    head.extend(sizes.iter().map(|n| n.to_string()));
    let mut rows = Vec::new();
    let mut processes = Vec::new();
    for setup in setups {
        let of_setup: Vec<&Cell> = cells
            .iter()
            .filter(|(s, _, _)| s == setup)
            .map(|(_, _, c)| c)
            .collect();
        for (kind, pick) in [("first", 0), ("changed", 1)] {
            let mut row = vec![setup.clone(), kind.to_string()];
            row.extend(
                of_setup
                    .iter()
                    .map(|c| ms(median(if pick == 0 { &c.first } else { &c.changed }))),
            );
            rows.push(row);
        }
        if let Some(c) = of_setup.first() {
            processes.push(format!("{setup} {} / {}", c.processes.0, c.processes.1));
        }
    }
    let mut samples = String::from("```\n");
    for (setup, size, c) in &cells {
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        samples.push_str(&format!(
            "{setup:<16} {size:>6} first:   {}\n{setup:<16} {size:>6} changed: {}\n",
            list(&c.first),
            list(&c.changed)
        ));
    }
    samples.push_str("```\n");
    let head: Vec<&str> = head.iter().map(String::as_str).collect();
    let text = format!(
        "### Sync time (ms, the agent's `elapsed_ms`, median)\n\n\
         First sync: median of {reps} starts, each in a fresh namespace. Changed: median of {} swaps to a disjoint\n\
         list of the same size. Processes per sync (first / changed): {}.\n\n{}\nEvery sample (ms):\n\n{samples}\n{}\n",
        reps * changes,
        processes.join("; "),
        table(&format!("ll{}", "r".repeat(sizes.len())), &head, &rows),
        load.sentence()
    );
    (text, cells)
}

pub fn sync(ctx: &Ctx) -> String {
    let setups = ctx.list("setups", &["nftables", "iptables-nft", "iptables-legacy"]);
    let sizes = ctx.sizes(&["64", "1000", "10000", "50000"]);
    let (mut text, cells) = run(
        ctx,
        &setups,
        &sizes,
        ctx.knob("reps", 3),
        ctx.knob("changes", 3),
    );
    if let Some((_, _, c)) = cells
        .iter()
        .find(|(s, n, _)| s == "nftables" && *n == 10_000)
    {
        let (f, ch) = (median(&c.first), median(&c.changed));
        text.push_str(&format!(
            "\nnftables at 10,000 prefixes: first {} ms, changed {} ms; target < 150 ms: **{}**.\n",
            ms(f),
            ms(ch),
            if f < 150.0 && ch < 150.0 {
                "met"
            } else {
                "not met"
            }
        ));
    }
    text
}

/// nftables first (and changed) sync at 50,000 prefixes; target: start -> elements in
/// the kernel < 150 ms.
pub fn large_first(ctx: &Ctx) -> String {
    let sizes = ctx.sizes(&["50000"]);
    let (mut text, cells) = run(
        ctx,
        &["nftables".to_string()],
        &sizes,
        ctx.knob("reps", 5),
        ctx.knob("changes", 3),
    );
    let cell = &cells[0].2;
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (sync, since_start, spawned) = (
        median(&cell.first),
        median(&cell.since_start),
        median(&cell.spawn_to_applied),
    );
    text.push_str(&format!(
        "\nnftables first sync at {} prefixes, median: the sync (`elapsed_ms`: table built, one netlink batch, \
         committed) **{} ms**; the agent's start -> sync done (`since_start_ms`, which includes reading \
         and parsing the {}-line YAML) **{} ms**; spawning the process -> `rules applied` logged {} ms. \
         Target: start -> elements in the kernel < 150 ms: **{}**.\n\n\
         `since_start_ms` of each start: {}; spawn -> logged: {}.\n",
        sizes[0],
        ms(sync),
        sizes[0],
        ms(since_start),
        ms(spawned),
        if since_start < 150.0 { "met" } else { "not met" },
        list(&cell.since_start),
        list(&cell.spawn_to_applied),
    ));
    text
}

/// The config of `large-change`: `common` prefixes plus, when `with`, `changing` more
/// (and 203.0.113.0/24, which the swap probe watches).
fn change_config(common: &[String], changing: &[String], with: bool) -> String {
    let mut list = common.to_vec();
    if with {
        list.extend_from_slice(changing);
        list.push("203.0.113.0/24".into());
    }
    yaml_config(&list, &[], &["resyncInterval: 60s"])
}

/// A change of `changed` prefixes at `size` (nftables): ConfigMap swap -> in the kernel,
/// `changed` prefixes (and the probed one) added and removed in turn, or replaced by as
/// many others (`replace`). Every change is one netlink element batch.
pub fn large_change(ctx: &Ctx) -> String {
    use crate::reload::{SWAP_HEAD, SwapSetup, Swapper, series_row};
    let swaps = ctx.knob("swaps", 10);
    let size = ctx.sizes(&["50000"])[0];
    let changed = ctx.knob("changed", 5000);
    let mut load = LoadLog::start();
    let mut rows = Vec::new();
    let mut every = String::new();
    for replace in [false, true] {
        let all = spread_v4(size, 0);
        let (common, changing) = all.split_at(size - changed);
        // Replaced: the other /24s of the same stretch (odd where the others are even).
        let others: Vec<String> = spread_v4(size, 1).split_off(size - changed);
        let config = |with: bool| -> String {
            if replace {
                let mut list = common.to_vec();
                list.extend_from_slice(if with { changing } else { &others });
                if with {
                    list.push("203.0.113.0/24".into());
                }
                yaml_config(&list, &[], &["resyncInterval: 60s"])
            } else {
                change_config(common, changing, with)
            }
        };
        let what = if replace {
            format!("{changed} of {size} prefixes replaced by {changed} others")
        } else {
            format!(
                "{changed} prefixes added to / removed from {}",
                size - changed
            )
        };
        eprintln!("large-change: {what}, {swaps} swaps");
        let topology = ima_harness::Topology::new();
        let mut volume = ConfigMapVolume::new(&config(true));
        let mut process = start_synced(&ctx.agent, &topology.node, &volume, "nftables", &[]);
        let mut swapper = Swapper::new(&topology);
        let mut setup = SwapSetup {
            topology: &topology,
            volume: &mut volume,
            config: &config,
            interval: Duration::from_millis(1),
            max_wait: Duration::from_secs(10),
            logs_changes: true,
        };
        for i in 1..=swaps {
            ctx.sample(&mut load, || swapper.swap(&mut setup, &mut process));
            eprintln!(
                "  swap {i}: {:.1} ms",
                swapper.series.latency.last().unwrap_or(&f64::NAN)
            );
        }
        let series = swapper.finish(&process);
        process.terminate();
        every.push_str(&format!(
            "{what}: rename -> kernel {}; sync `elapsed_ms` {}\n",
            list_ms(&series.latency),
            list_ms(&series.sync)
        ));
        rows.push(series_row(what, &series, 100.0));
    }
    format!(
        "### A change of {changed} prefixes at {size} (nftables): ConfigMap swap → in the kernel (target < 100 ms median)\n\n\
         The swap probe of `large-swap` (kubelet's `..data` rename; the first packet with the new behaviour shows the\n\
         change is in the kernel; 203.0.113.0/24 changes with the others). {swaps} swaps each.\n\n{}\n\
         Every swap (ms):\n\n```\n{every}```\n\n{}\n",
        table("lrrrrrrrrrrl", &SWAP_HEAD, &rows),
        load.sentence()
    )
}

fn list_ms(values: &[f64]) -> String {
    values
        .iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Programs the traced agent executed, with their (wall clock) times: `strace -f -ttt
/// -e trace=execve` lines ending `= 0`, less the agent's own exec.
fn traced_execs(path: &std::path::Path) -> Vec<(f64, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut execs: Vec<(f64, String)> = text
        .lines()
        .filter(|l| l.contains("execve(") && l.ends_with("= 0"))
        .filter_map(|l| {
            let time = l.split_whitespace().nth(1)?.parse().ok()?;
            // The argv: `["nft", "-t", "list", "ruleset"]`.
            let argv = l.split_once(", [")?.1.split_once("]")?.0;
            let words: Vec<&str> = argv.split(", ").map(|w| w.trim_matches('"')).collect();
            Some((time, words.join(" ")))
        })
        .collect();
    if !execs.is_empty() {
        execs.remove(0);
    }
    execs
}

/// Every process the agent starts on the nftables backend at 50,000 prefixes, by phase:
/// the first sync, a one-prefix change, a 5,000-prefix change, a drift repair, an idle
/// resync after others committed; traced with strace (execve), as `processes` does.
pub fn large_execs(ctx: &Ctx) -> String {
    let size = ctx.sizes(&["50000"])[0];
    let dir = ima_harness::TempDir::new("execs");
    let trace = dir.path.join("strace");
    let trace_arg = trace.to_string_lossy().into_owned();
    let list = spread_v4(size, 0);
    let config = |count: usize, extra: &str| {
        let mut prefixes = list[..count].to_vec();
        if !extra.is_empty() {
            prefixes.push(extra.to_string());
        }
        yaml_config(&prefixes, &[], &["resyncInterval: 1s"])
    };
    let ns = Netns::new("execs");
    let mut volume = ConfigMapVolume::new(&config(size, ""));
    let path = volume.path();
    let timeout = Duration::from_secs(60);
    let started = wall_now();
    let mut agent = ctx.agent.start_with(
        &ns,
        &[
            "--config",
            path.to_str().expect("utf-8"),
            "--backend=nftables",
        ],
        &[
            "strace",
            "-f",
            "-qq",
            "-ttt",
            "-e",
            "trace=execve",
            "-e",
            "signal=none",
            "-o",
            &trace_arg,
        ],
        &[],
    );
    let mut phases: Vec<(String, f64, f64)> = Vec::new();
    let applied = agent.wait_for_line("rules applied", 1, timeout);
    phases.push((
        format!("first sync, {size} prefixes"),
        started,
        log_time(&applied).unwrap_or(f64::NAN),
    ));
    std::thread::sleep(Duration::from_secs(2));
    let mut phase = |agent: &mut ima_harness::AgentProcess,
                     name: String,
                     act: &mut dyn FnMut(),
                     wait: (&str, usize)| {
        let from = wall_now();
        act();
        let line = agent.wait_for_line(wait.0, wait.1, timeout);
        phases.push((name, from, log_time(&line).unwrap_or(f64::NAN)));
        std::thread::sleep(Duration::from_secs(2));
    };
    phase(
        &mut agent,
        "one prefix added (ConfigMap swap)".into(),
        &mut || {
            volume.update(&config(size, "203.0.113.0/24"));
        },
        ("config changed; rules applied", 1),
    );
    phase(
        &mut agent,
        "5,000 prefixes removed (ConfigMap swap)".into(),
        &mut || {
            volume.update(&config(size - 5000, "203.0.113.0/24"));
        },
        ("config changed; rules applied", 2),
    );
    phase(
        &mut agent,
        "drift: an element deleted by hand, repaired".into(),
        &mut || {
            ns.sh(&[
                "nft",
                "delete element inet ip-masq-agent non-masq-v4 { 203.0.113.0/24 }",
            ]);
        },
        ("differed from the config; rewritten", 1),
    );
    let resynced = agent.log_lines("rules resynced").len();
    phase(
        &mut agent,
        "idle resync after others committed (read back, nothing written)".into(),
        &mut || {
            ns.sh(&["nft", "add table inet someone-else"]);
        },
        ("rules resynced", resynced + 2),
    );
    let ended = wall_now();
    crate::startup::stop_under_strace(agent);
    let execs = traced_execs(&trace);
    let mut rows = Vec::new();
    let mut total_in_syncs = 0;
    for (i, (name, from, to)) in phases.iter().enumerate() {
        let next = phases.get(i + 1).map_or(ended, |p| p.1);
        let during: Vec<&str> = execs
            .iter()
            .filter(|(t, _)| t >= from && t <= to)
            .map(|(_, c)| c.as_str())
            .collect();
        let after: Vec<&str> = execs
            .iter()
            .filter(|(t, _)| t > to && *t < next)
            .map(|(_, c)| c.as_str())
            .collect();
        total_in_syncs += during.iter().filter(|c| c.starts_with("nft")).count();
        let show = |v: &[&str]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        rows.push(vec![
            name.clone(),
            format!("{:.1}", (to - from) * 1e3),
            show(&during),
            show(&after),
        ]);
    }
    format!(
        "### Processes the agent starts, nftables backend, {size} prefixes (strace -f, execve)\n\n\
         Each phase runs from its trigger (the agent's start, a kubelet-style ConfigMap swap, an `nft` command by\n\
         the test) to the agent's log line that ends its sync; \"after\" lists what ran until the next phase\n\
         (the survey of others' NAT rules and the iptables backend's leftover check, both outside the nftables\n\
         backend, run after the first sync only).\n\n{}\n`nft` processes during the syncs: **{total_in_syncs}**.\n",
        table(
            "lrll",
            &[
                "phase",
                "trigger → sync done (ms)",
                "processes during the sync",
                "processes after it"
            ],
            &rows
        )
    )
}
