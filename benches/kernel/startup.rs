//! Start-up time (process start -> rules in the kernel) and processes per resync.

use std::path::Path;
use std::time::{Duration, Instant};

use ima_harness::workload::{dense_v4, yaml_config};
use ima_harness::{AgentProcess, Netns, Shims, TempDir, log_field, log_time, wall_now};

use crate::common::{Ctx, LoadLog, median, spread, table};

const CHAIN: &str = "IP-MASQ-AGENT";
/// Upstream v2.12 on this kind of machine, first log line -> rules (given, not measured here).
fn upstream_start_ms(n: usize) -> f64 {
    if n >= 1000 { 53.0 } else { 13.0 }
}

/// Writes `content` as `<dir>/<name>/ip-masq-agent` (a directory of its own: the agent
/// watches its config's directory) and returns the file's path.
pub fn config_file(dir: &TempDir, name: &str, content: &str) -> String {
    let sub = dir.path.join(name);
    std::fs::create_dir_all(&sub).expect("config dir");
    let path = sub.join("ip-masq-agent");
    std::fs::write(&path, content).expect("write config");
    path.to_string_lossy().into_owned()
}

struct Start {
    polled: f64,
    logged: f64,
    first_log_to_applied: f64,
    elapsed: f64,
    poll: f64,
}

/// True when a save of the whole ruleset shows the chain complete: MASQUERADE and
/// `returns` RETURN rules. (The whole ruleset, not `-t nat`: naming the nat table would
/// make legacy iptables create it, doing part of the agent's work.)
fn chain_complete(saved: &str, returns: usize) -> bool {
    let rules: Vec<&str> = saved
        .lines()
        .filter(|l| l.starts_with(&format!("-A {CHAIN} ")))
        .collect();
    rules.iter().any(|l| l.contains("-j MASQUERADE"))
        && rules.iter().filter(|l| l.ends_with("-j RETURN")).count() == returns
}

fn time_start(ctx: &Ctx, flavour: &str, n: usize, config: &str) -> Start {
    let ns = Netns::new("start");
    let save = format!("iptables-{flavour}-save");
    let mode = format!("--iptables-mode={flavour}");
    let wall0 = wall_now();
    let t0 = Instant::now();
    let mut agent = ctx.agent.start(&ns, &["--config", config, &mode]);
    let mut polls = 0;
    loop {
        let out = ns.output(&[&save]);
        polls += 1;
        // The n CIDRs plus link-local 169.254.0.0/16.
        if chain_complete(&String::from_utf8_lossy(&out.stdout), n + 1) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10) && polls < 20_000,
            "no rules after 10 s:\n{}",
            agent.log()
        );
    }
    let polled = t0.elapsed().as_secs_f64() * 1e3;
    let applied = agent.wait_for_line("rules applied", 1, Duration::from_secs(10));
    agent.terminate();
    let first = agent
        .log()
        .lines()
        .next()
        .and_then(log_time)
        .unwrap_or(f64::NAN);
    let at = log_time(&applied).unwrap_or(f64::NAN);
    Start {
        polled,
        logged: (at - wall0) * 1e3,
        first_log_to_applied: (at - first) * 1e3,
        elapsed: log_field(&applied, "elapsed_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN),
        poll: polled / polls as f64,
    }
}

pub fn startup(ctx: &Ctx) -> String {
    let runs = ctx.knob("runs", 30);
    let sizes = ctx.sizes(&["3", "64", "1000"]);
    let dir = TempDir::new("startup");
    let mut load = LoadLog::start();
    let mut rows = Vec::new();
    for flavour in ctx.list("flavours", &["nft", "legacy"]) {
        for &n in &sizes {
            let config = config_file(&dir, &format!("c{n}"), &yaml_config(&dense_v4(n), &[], &[]));
            eprintln!("startup: iptables-{flavour}, {n} CIDRs, 1 warm-up + {runs} runs");
            time_start(ctx, &flavour, n, &config); // page cache, module loading
            let starts: Vec<Start> = (0..runs)
                .map(|_| ctx.sample(&mut load, || time_start(ctx, &flavour, n, &config)))
                .collect();
            let col = |f: fn(&Start) -> f64| spread(&starts.iter().map(f).collect::<Vec<_>>());
            let first_log = median(
                &starts
                    .iter()
                    .map(|s| s.first_log_to_applied)
                    .collect::<Vec<_>>(),
            );
            rows.push(vec![
                flavour.clone(),
                n.to_string(),
                col(|s| s.polled),
                col(|s| s.logged),
                col(|s| s.first_log_to_applied),
                col(|s| s.elapsed),
                col(|s| s.poll),
                format!("{:.0}", upstream_start_ms(n)),
                if first_log < upstream_start_ms(n) {
                    "yes"
                } else {
                    "no"
                }
                .into(),
            ]);
        }
    }
    format!(
        "### Start-up: process start → rules in the kernel (ms, median [min–max] of {runs} starts, each in a fresh namespace)\n\n{}\n{}\n",
        table(
            "lrrrrrrrl",
            &[
                "iptables",
                "CIDRs",
                "spawn → rules seen by polling",
                "spawn → `rules applied` logged",
                "first log line → `rules applied`",
                "agent `elapsed_ms`",
                "one poll takes",
                "upstream (given), first log line → rules",
                "faster?"
            ],
            &rows
        ),
        load.sentence()
    )
}

// ---------------------------------------------------------------------------------------
// Processes per resync.

/// Groups sorted call times into syncs (calls closer than 0.3 s belong to one sync) and
/// returns the number of calls per sync; the first is start-up.
fn calls_per_sync(times: &[f64]) -> Vec<usize> {
    let mut groups: Vec<usize> = Vec::new();
    let mut last = f64::NEG_INFINITY;
    for &t in times {
        if t - last > 0.3 || groups.is_empty() {
            groups.push(0);
        }
        *groups.last_mut().expect("a group") += 1;
        last = t;
    }
    groups
}

/// "a" when all equal, else "min–max".
fn range(values: &[usize]) -> String {
    match (values.iter().min(), values.iter().max()) {
        (Some(lo), Some(hi)) if lo == hi => lo.to_string(),
        (Some(lo), Some(hi)) => format!("{lo}–{hi}"),
        _ => "n/a".into(),
    }
}

/// The times of successful execve calls in an `strace -f -ttt` file, minus the agent's own.
fn strace_execs(path: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut times: Vec<f64> = text
        .lines()
        .filter(|l| l.contains("execve") && l.ends_with("= 0"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    if !times.is_empty() {
        times.remove(0);
    }
    times
}

/// strace passes no SIGTERM on, so the agent it runs is stopped first (by its PID).
pub(crate) fn stop_under_strace(agent: AgentProcess) {
    let pid = agent.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in children
        .split_whitespace()
        .filter_map(|c| c.parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}/task")).exists() && Instant::now() < deadline {
        let status = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if status.contains(") Z") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(agent);
}

const TOOLS: [&str; 15] = [
    "iptables-nft-save",
    "iptables-nft-restore",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-nft-save",
    "ip6tables-nft-restore",
    "ip6tables-legacy-save",
    "ip6tables-legacy-restore",
    "iptables-save",
    "iptables-restore",
    "ip6tables-save",
    "ip6tables-restore",
    "xtables-nft-multi",
    "xtables-legacy-multi",
    "nft",
];

pub fn processes(ctx: &Ctx) -> String {
    let seconds = ctx.knob("seconds", 10) as u64;
    let dir = TempDir::new("procs");
    let load = LoadLog::start();
    let v4 = config_file(
        &dir,
        "v4",
        "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]\nresyncInterval: 1s\n",
    );
    let v6 = config_file(
        &dir,
        "v6",
        "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, \"fd00::/8\"]\nresyncInterval: 1s\n",
    );
    let calls = dir.path.join("calls");
    let shims = Shims::new();
    for tool in TOOLS {
        if which(tool) {
            shims.add(
                tool,
                "echo \"$(date +%s.%N) ${0##*/} $*\" >> \"${IMA_CALLS:-/dev/null}\"",
            );
            shims.fault_on(tool);
        }
    }
    let path = shims.path();
    let cases: Vec<(&str, &str)> = vec![
        ("nft", "v4"),
        ("nft", "v6"),
        ("legacy", "v4"),
        ("legacy", "v6"),
    ];
    let mut running = Vec::new();
    for (i, &(flavour, fam)) in cases.iter().enumerate() {
        let mut args = vec!["--config", if fam == "v4" { &v4 } else { &v6 }];
        let mode = format!("--iptables-mode={flavour}");
        args.push(&mode);
        if fam == "v6" {
            args.push("--enable-ipv6");
        }
        let trace = dir.path.join(format!("strace-{i}"));
        let trace_arg = trace.to_string_lossy().into_owned();
        let plain_ns = Netns::new("procs");
        let plain = ctx.agent.start(&plain_ns, &args);
        // The wrapped agents log calls to one file each: their own copy of the shims.
        let wrapped_ns = Netns::new("procs");
        let calls_i = format!("{}-{i}", calls.display());
        let wrapped = ctx.agent.start_with(
            &wrapped_ns,
            &args,
            &[],
            &[("PATH", &path), ("IMA_CALLS", &calls_i)],
        );
        let strace_ns = Netns::new("procs");
        let traced = ctx.agent.start_with(
            &strace_ns,
            &args,
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
        running.push((
            plain,
            wrapped,
            traced,
            trace,
            [plain_ns, wrapped_ns, strace_ns],
        ));
    }
    std::thread::sleep(Duration::from_secs(seconds));
    let mut rows = Vec::new();
    let mut resync_ms = Vec::new();
    let mut one_resync = Vec::new();
    for (i, (plain, wrapped, traced, trace, _namespaces)) in running.into_iter().enumerate() {
        let (flavour, fam) = cases[i];
        let mut plain = plain;
        plain.terminate();
        let log_counts: Vec<usize> = plain
            .log_lines("rules resynced")
            .iter()
            .filter_map(|l| log_field(l, "processes")?.parse().ok())
            .collect();
        resync_ms.extend(
            plain
                .log_lines("rules resynced")
                .iter()
                .filter_map(|l| log_field(l, "elapsed_ms")?.parse::<f64>().ok()),
        );
        drop(wrapped);
        stop_under_strace(traced);
        let lines = std::fs::read_to_string(format!("{}-{i}", calls.display())).unwrap_or_default();
        let times: Vec<f64> = lines
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        let wrapper = calls_per_sync(&times);
        let straced = calls_per_sync(&strace_execs(&trace));
        let families = if fam == "v4" { 1 } else { 2 };
        let worst = log_counts
            .iter()
            .chain(wrapper.iter().skip(1))
            .chain(straced.iter().skip(1))
            .max()
            .copied()
            .unwrap_or(0);
        // The commands of the first resync (the second group of calls).
        let mut group = 0;
        let mut last = f64::NEG_INFINITY;
        let mut commands = Vec::new();
        for line in lines.lines() {
            let t: f64 = line
                .split_whitespace()
                .next()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.0);
            if t - last > 0.3 && last.is_finite() {
                group += 1;
            }
            last = t;
            if group == 1 {
                commands.push(line.split_once(' ').map_or("", |(_, c)| c).to_string());
            }
        }
        one_resync.push(format!("- {flavour}, {fam}: `{}`", commands.join("; ")));
        rows.push(vec![
            flavour.into(),
            if fam == "v4" { "IPv4" } else { "IPv4 + IPv6" }.into(),
            range(&log_counts),
            range(&wrapper[1.min(wrapper.len())..]),
            range(&straced[1.min(straced.len())..]),
            format!(
                "{} / {} / {}",
                log_counts.len(),
                wrapper.len().saturating_sub(1),
                straced.len().saturating_sub(1)
            ),
            format!(
                "{} / {}",
                wrapper.first().unwrap_or(&0),
                straced.first().unwrap_or(&0)
            ),
            (3 * families).to_string(),
            if worst <= 3 * families {
                "yes".into()
            } else {
                format!("no ({worst})")
            },
        ]);
    }
    format!(
        "### Processes per resync (resyncInterval 1s, {seconds} s)\n\n\
         \"agent log\" is `processes=` of the `rules resynced` lines; \"wrappers\" counts calls through logging\n\
         wrappers ahead on PATH; \"strace\" counts successful execve calls in the agent's process tree\n\
         (`strace -f`). Calls are grouped into syncs by time; \"start-up\" is the first group.\n\n{}\n\
         What one resync runs (wrappers):\n\n{}\n\n\
         Resync `elapsed_ms` ({} IPv4 and dual-stack agents resyncing every second side by side): {} ms.\n\n{}\n",
        table(
            "llrrrrrrl",
            &[
                "iptables",
                "families",
                "agent log, per resync",
                "wrappers, per resync",
                "strace, per resync",
                "resyncs (log / wrappers / strace)",
                "start-up (wrappers / strace)",
                "upstream",
                "no more than upstream?"
            ],
            &rows
        ),
        one_resync.join("\n"),
        cases.len() * 3,
        spread(&resync_ms),
        load.sentence()
    )
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}
