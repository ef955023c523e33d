//! Re-deciding existing flows after a change (`conntrack`): the time from the change's
//! sync to the end of the agent's conntrack pass, and the agent's peak RSS (VmHWM), for
//! 1,000 stale flows beside 100,000 other entries and for a whole table of 100,000
//! stale flows; the same for another build given with `--base=PATH` (the agent before
//! ctnetlink), which is given `--cap=SECONDS` (`--whole-cap=SECONDS` for the whole
//! table) to finish before it is stopped, and is never sampled twice (one run of it can
//! take many minutes).
//!
//! Entries are made by hand in the node's namespace (one `conntrack -R`): UDP from pod
//! addresses to remote ones, masqueraded to the node's address, as the agent's
//! MASQUERADE makes them. The change adds 203.0.113.0/24 to nonMasqueradeCIDRs: the
//! flows to it carry the old decision and are deleted, the others are not touched.

use std::time::{Duration, Instant};

use ima_harness::conntrack::{self, Flow};
use ima_harness::{Agent, AgentProcess, ConfigMapVolume, Topology, log_time};

use crate::common::{Ctx, LoadLog, QUIET_PERCENT, median, ms, start_synced, status_value, table};

/// Other processes' share of the CPU above which a run of this build is taken again.
const DISTURBED: f64 = crate::common::DISTURBED_PERCENT;
const PASS_DONE: &str = "conntrack: flows carrying the old decision updated";
const BEFORE: &str = "nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 60s\n";
const AFTER: &str = "nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\nresyncInterval: 60s\n";

/// `count` UDP entries from distinct pod-like sources (10.128.0.0 + i) to
/// `network`.(1 + i / 60,000), masqueraded to 192.0.2.1 with distinct ports.
fn flows(count: u32, network: &str, offset: u32) -> Vec<Flow> {
    (0..count)
        .map(|i| {
            let source = std::net::Ipv4Addr::from(0x0a80_0000 + offset + i).to_string();
            let destination = format!("{network}.{}", 1 + i / 60_000);
            Flow::udp(&source, 40_000, &destination, 9999)
                .source_natted("192.0.2.1", 1024 + (i % 60_000) as u16)
        })
        .collect()
}

/// One measurement.
struct Sample {
    /// `config changed; rules applied` -> the pass's log line, in ms; None: not done
    /// within the cap.
    took: Option<f64>,
    /// VmHWM before the change and at the end, in kB.
    peak_before: u64,
    peak_after: u64,
    entries_before: u64,
    entries_after: u64,
}

fn vm_hwm(process: &AgentProcess) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", process.pid())).unwrap_or_default();
    status_value(&status, "VmHWM")
}

/// A fresh node with `stale` entries to re-decide beside `others`, the agent started on
/// the old config, then the change; waits at most `cap` for the pass.
fn measure(agent: &Agent, stale: u32, others: u32, cap: Duration) -> Sample {
    let topology = Topology::new();
    let node = &topology.node;
    let mut volume = ConfigMapVolume::new(BEFORE);
    let process = start_synced(agent, node, &volume, "iptables-nft", &[]);
    let mut made = flows(stale, "203.0.113", 0);
    made.extend(flows(others, "100.64.0", stale));
    conntrack::insert(node, &made, 3600);
    drop(made);
    let entries_before = conntrack::count(node);
    let peak_before = vm_hwm(&process);
    volume.update(AFTER);
    let started = Instant::now();
    let mut pass = None;
    while started.elapsed() < cap {
        if let Some(line) = process.log_lines(PASS_DONE).pop() {
            pass = Some(line);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let peak_after = vm_hwm(&process);
    let applied = process
        .log_lines("config changed; rules applied")
        .pop()
        .and_then(|l| log_time(&l));
    let took = match (pass.as_deref().and_then(log_time), applied) {
        (Some(done), Some(applied)) => Some((done - applied) * 1e3),
        _ => None,
    };
    let entries_after = conntrack::count(node);
    drop(process);
    Sample {
        took,
        peak_before,
        peak_after,
        entries_before,
        entries_after,
    }
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

pub fn conntrack(ctx: &Ctx) -> String {
    let runs = ctx.knob("runs", 3);
    let entries = ctx.knob("entries", 100_000) as u32;
    let stale = ctx.knob("stale", 1_000) as u32;
    let cap = Duration::from_secs(ctx.knob("cap", 900) as u64);
    let whole_cap = Duration::from_secs(ctx.knob("whole-cap", 120) as u64);
    let base = ctx.list("base", &[]).first().map(Agent::new);
    let mut load = LoadLog::start();
    let scenarios = [
        (
            format!("{stale} stale flows beside {entries} other entries"),
            stale,
            entries,
            1_000.0,
            cap,
        ),
        (
            format!("whole table: {entries} stale flows"),
            entries,
            0,
            5_000.0,
            whole_cap,
        ),
    ];
    // (label, agent, runs, whether a disturbed run is taken again)
    let mut agents: Vec<(String, &Agent, usize, bool)> =
        vec![("this build".into(), &ctx.agent, runs, true)];
    if let Some(base) = &base {
        agents.push((
            format!("`--base` {}", base.path().display()),
            base,
            ctx.knob("base-runs", 1),
            false,
        ));
    }
    let mut rows = Vec::new();
    for (label, stale, others, target, cap) in &scenarios {
        for (name, agent, runs, retake) in &agents {
            let mut samples = Vec::new();
            for run in 1..=*runs {
                let disturbed = if *retake { DISTURBED } else { f64::INFINITY };
                let sample = ctx.sample_with(&mut load, (QUIET_PERCENT, disturbed), || {
                    measure(agent, *stale, *others, *cap)
                });
                eprintln!(
                    "  {label}, {name}, run {run}: {} ms, VmHWM {} -> {} kB, entries {} -> {}",
                    sample.took.map_or("not done".into(), ms),
                    sample.peak_before,
                    sample.peak_after,
                    sample.entries_before,
                    sample.entries_after
                );
                samples.push(sample);
            }
            let times: Vec<f64> = samples.iter().filter_map(|s| s.took).collect();
            let unfinished = samples.len() - times.len();
            let took = if unfinished > 0 {
                let left: Vec<String> = samples
                    .iter()
                    .filter(|s| s.took.is_none())
                    .map(|s| {
                        let deleted = s.entries_before.saturating_sub(s.entries_after);
                        let all = if deleted == 0 {
                            String::new()
                        } else {
                            let seconds = cap.as_secs_f64() * f64::from(*stale) / deleted as f64;
                            format!("; all {stale} at that rate: ~{seconds:.0} s")
                        };
                        format!("{deleted} of {stale} deleted{all}")
                    })
                    .collect();
                format!("not done within {} s ({})", cap.as_secs(), left.join(", "))
            } else {
                format!("{} ms", ms(median(&times)))
            };
            let peak = samples.iter().map(|s| s.peak_after).max().unwrap_or(0);
            let before = samples.iter().map(|s| s.peak_before).max().unwrap_or(0);
            let met = unfinished == 0 && median(&times) < *target && peak < 32 * 1024;
            rows.push(vec![
                label.clone(),
                name.clone(),
                samples.len().to_string(),
                took,
                mb(before),
                mb(peak),
                if met { "**met**" } else { "**not met**" }.into(),
            ]);
        }
    }
    format!(
        "### Re-deciding existing flows after a change (iptables-nft; target < {} s and < 5 s, VmHWM < 32 MB)\n\n{}\n{}\n",
        1,
        table(
            "llrrrrl",
            &[
                "table",
                "agent",
                "runs",
                "change applied -> pass done (median)",
                "VmHWM before the change",
                "VmHWM after the pass (max)",
                "targets",
            ],
            &rows,
        ),
        load.sentence()
    )
}
