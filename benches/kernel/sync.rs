//! Sync time by backend and size: the first sync after start (`rules applied`) and a
//! changed-config sync (a kubelet-style swap to a disjoint list of the same size;
//! `config changed; rules applied`), both the agent's own `elapsed_ms`.

use std::time::Duration;

use ima_harness::workload::{spread_v4, yaml_config};
use ima_harness::{ConfigMapVolume, Netns, log_field};

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
    };
    let timeout = Duration::from_secs(120);
    for _ in 0..reps {
        let (_ns, mut volume, mut agent, line) = ctx.sample(load, || {
            let ns = Netns::new("sync");
            let volume = ConfigMapVolume::new(&config(size, 0));
            let mut agent = start_synced(&ctx.agent, &ns, &volume, setup, &[]);
            let line = agent.wait_for_line("rules applied", 1, timeout);
            (ns, volume, agent, line)
        });
        cell.first.push(elapsed(&line));
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

/// nftables first (and changed) sync at 50,000 prefixes; target: first sync < 300 ms.
pub fn large_first(ctx: &Ctx) -> String {
    let sizes = ctx.sizes(&["50000"]);
    let (mut text, cells) = run(
        ctx,
        &["nftables".to_string()],
        &sizes,
        ctx.knob("reps", 5),
        ctx.knob("changes", 3),
    );
    let f = median(&cells[0].2.first);
    text.push_str(&format!(
        "\nnftables first sync at {} prefixes: {} ms; target < 300 ms: **{}**.\n",
        sizes[0],
        ms(f),
        if f < 300.0 { "met" } else { "not met" }
    ));
    text
}
