//! Ours against upstream's binary (`--upstream=PATH`, built from its v2.12.6 tag), run
//! the same way: in a namespace, behind the same wrapper, on iptables-nft.
//!
//! Upstream reads only /etc/config/ip-masq-agent and runs `iptables`, so both agents
//! start under `unshare -m` with an overlay on /etc whose `config` is a symlink to a
//! ConfigMap volume of ours (nothing changes outside that private mount namespace), and
//! with a PATH directory where iptables, iptables-save, iptables-restore and the ip6tables
//! ones are symlinks to the -nft tools.

use std::os::unix::fs::symlink;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ima_harness::workload::{dense_v4, yaml_config};
use ima_harness::{
    Agent, AgentProcess, ConfigMapVolume, Netns, TempDir, Topology, log_field, wall_now,
};

use crate::common::{Ctx, Helper, LoadLog, NftMonitor, PerfStat, median, ms, spread, table};
use crate::reload::{SWAP_HEAD, SwapSetup, Swapper, keep_config, series_row};

#[derive(Clone, Copy, PartialEq)]
enum Which {
    Ours,
    Upstream,
}

impl Which {
    fn label(self) -> &'static str {
        match self {
            Which::Ours => "ours",
            Which::Upstream => "upstream v2.12.6",
        }
    }
}

/// The PATH directory that makes `iptables` mean iptables-nft.
struct NftPath {
    dir: TempDir,
}

impl NftPath {
    fn new() -> NftPath {
        let dir = TempDir::new("nftpath");
        for family in ["iptables", "ip6tables"] {
            for suffix in ["", "-save", "-restore"] {
                symlink(
                    format!("/usr/sbin/{family}-nft{suffix}"),
                    dir.path.join(format!("{family}{suffix}")),
                )
                .expect("symlink");
            }
        }
        NftPath { dir }
    }

    fn path(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path.display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }
}

/// An agent started behind the /etc overlay; the overlay's directories go with it.
struct Running {
    process: AgentProcess,
    _etc: TempDir,
}

fn launch(
    ctx: &Ctx,
    which: Which,
    ns: &Netns,
    volume: &ConfigMapVolume,
    path: &NftPath,
) -> Running {
    let etc = TempDir::new("etc");
    for sub in ["upper", "work"] {
        std::fs::create_dir(etc.path.join(sub)).expect("mkdir");
    }
    symlink(&volume.dir.path, etc.path.join("upper/config")).expect("config symlink");
    let script = format!(
        "mount -t overlay overlay -o lowerdir=/etc,upperdir={0}/upper,workdir={0}/work /etc && date +%s.%N > {0}/exec && exec \"$0\" \"$@\"",
        etc.path.display()
    );
    let wrapper = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ];
    let env = [("PATH", path.path())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let process = match which {
        Which::Ours => ctx.agent.launch(
            ns,
            &[
                "--config",
                "/etc/config/ip-masq-agent",
                "--iptables-mode=nft",
                "--v=2",
            ],
            &wrapper,
            &env,
        ),
        Which::Upstream => upstream(ctx).launch(ns, &[], &wrapper, &env),
    };
    Running { process, _etc: etc }
}

fn upstream(ctx: &Ctx) -> &Agent {
    ctx.upstream
        .as_ref()
        .expect("--upstream=PATH: upstream's binary (see BENCHMARKS.md for how to build it)")
}

/// Spawn of the wrapper, and exec of the agent (the wrapper notes the time just before),
/// -> the commit that holds the chain's MASQUERADE rule, seen by `nft monitor` (ms).
fn time_commit(ctx: &Ctx, which: Which, n: usize, path: &NftPath) -> (f64, f64) {
    let ns = Netns::new("cmp");
    let volume = ConfigMapVolume::new(&yaml_config(&dense_v4(n), &[], &[]));
    let monitor = NftMonitor::start(&ns);
    let t0 = Instant::now();
    let mut agent = launch(ctx, which, &ns, &volume, path);
    let committed = monitor
        .wait_for(
            |l| l.contains("IP-MASQ-AGENT") && l.to_lowercase().contains("masquerade"),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| {
            panic!(
                "{}: no MASQUERADE rule within 10 s:\n{}",
                which.label(),
                agent.process.log()
            )
        });
    let saved = ns.sh(&["iptables-nft-save", "-t", "nat"]);
    let returns = saved
        .lines()
        .filter(|l| l.starts_with("-A IP-MASQ-AGENT ") && l.ends_with("-j RETURN"))
        .count();
    assert_eq!(
        returns,
        n + 1,
        "{}: the chain was not complete at the commit",
        which.label()
    );
    agent.process.terminate();
    monitor.stop();
    let committed_wall = wall_now() - committed.elapsed().as_secs_f64();
    let exec: f64 = std::fs::read_to_string(agent._etc.path.join("exec"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(f64::NAN);
    (
        committed.duration_since(t0).as_secs_f64() * 1e3,
        (committed_wall - exec) * 1e3,
    )
}

pub fn start(ctx: &Ctx) -> String {
    upstream(ctx);
    let runs = ctx.knob("runs", 15);
    let sizes = ctx.sizes(&["3", "64", "1000"]);
    let path = NftPath::new();
    let mut load = LoadLog::start();
    let mut samples: Vec<Vec<(Which, (f64, f64))>> = vec![Vec::new(); sizes.len()];
    for which in [Which::Ours, Which::Upstream] {
        time_commit(ctx, which, 3, &path); // warm-up
    }
    for run in 1..=runs {
        eprintln!("upstream-start: run {run}/{runs}");
        for (i, &n) in sizes.iter().enumerate() {
            for which in [Which::Ours, Which::Upstream] {
                let t = ctx.sample(&mut load, || time_commit(ctx, which, n, &path));
                samples[i].push((which, t));
            }
        }
    }
    let rows: Vec<Vec<String>> = sizes
        .iter()
        .zip(&samples)
        .map(|(n, s)| {
            let of = |w: Which, exec: bool| {
                s.iter()
                    .filter(|(x, _)| *x == w)
                    .map(|(_, t)| if exec { t.1 } else { t.0 })
                    .collect::<Vec<_>>()
            };
            let ratio = median(&of(Which::Ours, true)) / median(&of(Which::Upstream, true));
            vec![
                n.to_string(),
                spread(&of(Which::Ours, false)),
                spread(&of(Which::Upstream, false)),
                format!("**{}**", spread(&of(Which::Ours, true))),
                format!("**{}**", spread(&of(Which::Upstream, true))),
                format!("{ratio:.2}"),
                if ratio <= 0.5 {
                    "**met**"
                } else {
                    "**not met**"
                }
                .into(),
            ]
        })
        .collect();
    format!(
        "### Ours against upstream v2.12.6: start → rules committed (iptables-nft, ms, median [min–max] of {runs} interleaved starts)\n\n\
         Each start in a fresh namespace; both agents behind the same `unshare` + overlay wrapper, which notes the time\n\
         just before it execs the agent. The clock runs from spawning the wrapper, or from that exec, to `nft monitor`'s\n\
         report of the commit holding the chain's MASQUERADE rule (the whole chain is in that commit: checked with\n\
         iptables-nft-save). The ratio and the verdict use exec → commit.\n\n{}\n{}\n",
        table(
            "rrrrrrl",
            &[
                "CIDRs",
                "ours, spawn → commit",
                "upstream, spawn → commit",
                "ours, exec → commit",
                "upstream, exec → commit",
                "ours / upstream",
                "target ≤ 0.5"
            ],
            &rows
        ),
        load.sentence()
    )
}

/// Tool runs per resync from `perf record` of fork/exec/exit: (processes, wall ms) per
/// group of an agent's children (children closer than 0.3 s belong to one sync).
fn syncs_from_perf(script: &str, agent_pid: u32) -> Vec<(usize, f64)> {
    let mut forks: Vec<(u32, f64)> = Vec::new();
    let mut execs = std::collections::HashSet::new();
    let mut exits = std::collections::HashMap::new();
    for line in script.lines() {
        let mut words = line.split_whitespace();
        let pid: u32 = words
            .next()
            .and_then(|p| p.split('/').next()?.parse().ok())
            .unwrap_or(0);
        let time: f64 = words
            .next()
            .and_then(|t| t.trim_end_matches(':').parse().ok())
            .unwrap_or(0.0);
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.parse::<u32>().ok())
        };
        if line.contains("sched_process_fork:") && pid == agent_pid {
            forks.extend(field("child_pid=").map(|c| (c, time)));
        } else if line.contains("sched_process_exec:") {
            execs.insert(pid);
        } else if line.contains("sched_process_exit:") && line.contains("group_dead=true") {
            exits.insert(pid, time);
        }
    }
    let mut groups: Vec<(usize, f64, f64)> = Vec::new();
    let mut last = f64::NEG_INFINITY;
    for (child, at) in forks.into_iter().filter(|(c, _)| execs.contains(c)) {
        let end = exits.get(&child).copied().unwrap_or(at);
        if at - last > 0.3 {
            groups.push((0, at, end));
        }
        let g = groups.last_mut().expect("a group");
        g.0 += 1;
        g.2 = g.2.max(end);
        last = at;
    }
    groups
        .iter()
        .map(|&(n, from, to)| (n, (to - from) * 1e3))
        .collect()
}

pub fn sync(ctx: &Ctx) -> String {
    upstream(ctx);
    let seconds = ctx.knob("seconds", 30) as u64;
    let n = ctx.sizes(&["1000"])[0];
    let path = NftPath::new();
    let dir = TempDir::new("cmp-sync");
    let load = LoadLog::start();
    eprintln!(
        "upstream-sync: ours and upstream side by side, {n} CIDRs, resyncInterval 1s, {seconds} s"
    );
    let config = yaml_config(&dense_v4(n), &[], &["resyncInterval: 1s"]);
    let agents: Vec<(Which, Netns, ConfigMapVolume)> = [Which::Ours, Which::Upstream]
        .into_iter()
        .map(|w| (w, Netns::new("cmp"), ConfigMapVolume::new(&config)))
        .collect();
    let running: Vec<Running> = agents
        .iter()
        .map(|(w, ns, v)| launch(ctx, *w, ns, v, &path))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let trace = dir.path.join("sched.data");
    let mut record = Command::new("perf");
    record
        .args([
            "record",
            "-q",
            "-e",
            "sched:sched_process_fork",
            "-e",
            "sched:sched_process_exec",
            "-e",
            "sched:sched_process_exit",
            "-a",
            "-o",
        ])
        .arg(&trace)
        .args(["--", "sleep", &seconds.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let recorder = Helper::spawn(record);
    let perfs: Vec<Option<PerfStat>> = running
        .iter()
        .map(|r| PerfStat::start(r.process.pid(), seconds, &dir.path))
        .collect();
    let lines0: Vec<usize> = running
        .iter()
        .map(|r| r.process.log().lines().count())
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    recorder.wait(Duration::from_secs(20));
    let script = Command::new("perf")
        .args(["script", "-F", "pid,tid,time,event,trace", "-i"])
        .arg(&trace)
        .output()
        .expect("perf script");
    let script = String::from_utf8_lossy(&script.stdout);
    let mut rows = Vec::new();
    for ((mut r, perf), ((which, _, _), lines0)) in running
        .into_iter()
        .zip(perfs)
        .zip(agents.iter().zip(lines0))
    {
        let cpu = perf.map_or(f64::NAN, PerfStat::finish);
        let syncs = syncs_from_perf(&script, r.process.pid());
        let log: Vec<String> = r
            .process
            .log()
            .lines()
            .skip(lines0)
            .map(str::to_owned)
            .collect();
        r.process.terminate();
        let walls: Vec<f64> = syncs.iter().map(|s| s.1).collect();
        let processes: Vec<usize> = syncs.iter().map(|s| s.0).collect();
        let elapsed: Vec<f64> = log
            .iter()
            .filter(|l| l.contains("rules resynced"))
            .filter_map(|l| log_field(l, "elapsed_ms")?.parse().ok())
            .collect();
        rows.push(vec![
            which.label().to_string(),
            syncs.len().to_string(),
            format!(
                "{}–{}",
                processes.iter().min().unwrap_or(&0),
                processes.iter().max().unwrap_or(&0)
            ),
            spread(&walls),
            if elapsed.is_empty() {
                "–".into()
            } else {
                spread(&elapsed)
            },
            format!("{} ms", ms(cpu / syncs.len().max(1) as f64)),
        ]);
    }
    format!(
        "### Ours against upstream v2.12.6: a resync at {n} CIDRs (iptables-nft, resyncInterval 1s, {seconds} s side by side)\n\n\
         \"wall\": from the fork of a resync's first tool to the exit of its last (`perf record` of the scheduler's\n\
         fork/exec/exit tracepoints, median [min–max]); CPU: `perf stat -e task-clock -p PID` (agent and children) per resync.\n\
         Upstream rewrites its chain on every resync; ours reads it back and writes nothing when nothing changed.\n\n{}\n{}\n",
        table(
            "lrrrrr",
            &[
                "agent",
                "resyncs",
                "processes per resync",
                "wall per resync (ms)",
                "agent's `elapsed_ms`",
                "CPU per resync"
            ],
            &rows
        ),
        load.sentence()
    )
}

pub fn swap(ctx: &Ctx) -> String {
    upstream(ctx);
    let swaps = ctx.knob("swaps", 8);
    let path = NftPath::new();
    let mut load = LoadLog::start();
    let config = |keep: bool| keep_config(&["10.0.0.0/8".to_string()], keep, "5s");
    let whiches = [Which::Ours, Which::Upstream];
    let topologies: Vec<Topology> = whiches.iter().map(|_| Topology::new()).collect();
    let mut volumes: Vec<ConfigMapVolume> = whiches
        .iter()
        .map(|_| ConfigMapVolume::new(&config(true)))
        .collect();
    let mut running: Vec<Running> = whiches
        .iter()
        .zip(&topologies)
        .zip(&volumes)
        .map(|((w, t), v)| launch(ctx, *w, &t.node, v, &path))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let mut swappers: Vec<Swapper> = topologies.iter().map(Swapper::new).collect();
    for i in 1..=swaps {
        for (k, which) in whiches.iter().enumerate() {
            let mut setup = SwapSetup {
                topology: &topologies[k],
                volume: &mut volumes[k],
                config: &config,
                interval: Duration::from_millis(if *which == Which::Ours { 1 } else { 5 }),
                max_wait: Duration::from_secs(8),
                logs_changes: *which == Which::Ours,
            };
            let (swapper, process) = (&mut swappers[k], &mut running[k].process);
            ctx.sample(&mut load, || swapper.swap(&mut setup, process));
            eprintln!(
                "  {} swap {i}: {:.1} ms",
                which.label(),
                swapper.series.latency.last().unwrap_or(&f64::NAN)
            );
        }
    }
    let mut rows = Vec::new();
    for ((which, swapper), r) in whiches.iter().zip(swappers).zip(running.iter_mut()) {
        let series = swapper.finish(&r.process);
        r.process.terminate();
        rows.push(series_row(which.label().to_string(), &series, 100.0));
    }
    format!(
        "### Ours against upstream v2.12.6: ConfigMap swap → applied (iptables-nft, resyncInterval 5s, {swaps} interleaved swaps each)\n\n\
         The swap benchmark's method; probes every 1 ms for ours and every 5 ms for upstream (whose answer is its next\n\
         poll, up to resyncInterval). Upstream logs no sync, so its log columns are empty.\n\n{}\n{}\n",
        table("lrrrrrrrrrrl", &SWAP_HEAD, &rows),
        load.sentence()
    )
}
