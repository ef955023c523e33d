//! What the agent costs while idle: CPU per resync, and memory (footprint).

use std::time::{Duration, Instant};

use ima_harness::workload::{dense_v4, spread_v4, yaml_config};
use ima_harness::{Agent, AgentProcess, ConfigMapVolume, Netns, TempDir, log_field};

use crate::common::{
    Ctx, LoadLog, PerfStat, backend_flags, file_size, median, ms, proc_ticks, rss_by_mapping,
    schedstat_ns, start_synced, status_value, table,
};

/// Upstream v2.12 over 60 s idle (given, not measured here): 370 ms at 1s, < 10 ms at 60s.
fn upstream_cpu_ms(interval: &str) -> f64 {
    if interval == "1s" { 370.0 } else { 10.0 }
}

struct Idle {
    label: String,
    interval: String,
    agent_ms: f64,
    children_ms: f64,
    sched_ms: f64,
    perf_ms: Option<f64>,
    resyncs: usize,
    /// Resyncs that read the config file (the log's `config_read=true`; builds before
    /// the field existed read it at every resync and count as reading).
    reads: usize,
    processes: usize,
    resync_elapsed: Vec<f64>,
}

/// Agents side by side, each on its own config, idle for `seconds` from `warmup` after
/// their first sync and `steady` resyncs (the first sync is followed by a full survey of
/// the NAT rules acting before the agent's, seconds at 50,000 rules: not idle):
/// CPU from /proc (ticks), schedstat (ns) and `perf stat` (ns, with children).
fn watch_idle(
    ctx: &Ctx,
    cases: &[(String, String, String)],
    warmup: Duration,
    steady: usize,
    seconds: u64,
) -> Vec<Idle> {
    let dir = TempDir::new("idle");
    let mut started: Vec<(Netns, ConfigMapVolume, AgentProcess)> = cases
        .iter()
        .map(|(_, setup, config)| {
            let ns = Netns::new("idle");
            let volume = ConfigMapVolume::new(config);
            let agent = start_synced(&ctx.agent, &ns, &volume, setup, &[]);
            (ns, volume, agent)
        })
        .collect();
    for (_, _, agent) in started.iter_mut() {
        if steady > 0 {
            agent.wait_for_log("rules resynced", steady, Duration::from_secs(300));
        }
    }
    std::thread::sleep(warmup);
    let before: Vec<_> = started
        .iter()
        .map(|(_, _, a)| {
            let perf = PerfStat::start(a.pid(), seconds, &dir.path);
            (
                perf,
                proc_ticks(&a.pid().to_string()),
                schedstat_ns(a.pid()),
                a.log().lines().count(),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    let tick_ms = 1000.0
        / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
    let mut out = Vec::new();
    for (((label, _setup, config), (_ns, _volume, mut agent)), (perf, t0, s0, lines0)) in
        cases.iter().zip(started).zip(before)
    {
        let pid = agent.pid();
        let t1 = proc_ticks(&pid.to_string());
        let s1 = schedstat_ns(pid);
        let window: Vec<String> = agent
            .log()
            .lines()
            .skip(lines0)
            .map(str::to_owned)
            .collect();
        let perf_ms = perf.map(PerfStat::finish);
        agent.terminate();
        let syncs: Vec<&String> = window
            .iter()
            .filter(|l| l.contains("rules resynced") || l.contains("rules applied"))
            .collect();
        out.push(Idle {
            label: label.clone(),
            interval: config
                .lines()
                .find_map(|l| l.strip_prefix("resyncInterval: "))
                .unwrap_or("?")
                .to_string(),
            agent_ms: (t1[0] + t1[1] - t0[0] - t0[1]) as f64 * tick_ms,
            children_ms: (t1[2] + t1[3] - t0[2] - t0[3]) as f64 * tick_ms,
            sched_ms: (s1 - s0) as f64 / 1e6,
            perf_ms,
            resyncs: syncs.len(),
            reads: syncs
                .iter()
                .filter(|l| log_field(l, "config_read") != Some("false"))
                .count(),
            processes: syncs
                .iter()
                .filter_map(|l| log_field(l, "processes")?.parse::<usize>().ok())
                .sum(),
            resync_elapsed: syncs
                .iter()
                .filter_map(|l| log_field(l, "elapsed_ms")?.parse().ok())
                .collect(),
        });
    }
    out
}

fn default_config(interval: &str) -> String {
    format!(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]\nresyncInterval: {interval}\n"
    )
}

pub fn cpu(ctx: &Ctx) -> String {
    let seconds = ctx.knob("seconds", 60) as u64;
    let load = LoadLog::start();
    let mut cases = Vec::new();
    for setup in ctx.list("setups", &["iptables-nft", "iptables-legacy", "nftables"]) {
        for interval in ["1s", "60s"] {
            cases.push((
                format!("`{}`", backend_flags(&setup).join(" ")),
                setup.clone(),
                default_config(interval),
            ));
        }
    }
    eprintln!("cpu: {} agents side by side, {seconds} s", cases.len());
    let rows: Vec<Vec<String>> = watch_idle(ctx, &cases, Duration::from_secs(1), 0, seconds)
        .iter()
        .map(|i| {
            let total = i.agent_ms + i.children_ms;
            let measure = i.perf_ms.unwrap_or(total) * 60.0 / seconds as f64;
            let upstream = upstream_cpu_ms(&i.interval);
            vec![
                i.label.clone(),
                i.interval.clone(),
                format!("{:.0} ms", i.agent_ms),
                format!("{:.0} ms", i.children_ms),
                format!("**{total:.0} ms**"),
                format!("{:.1} ms", i.sched_ms),
                i.perf_ms.map_or("n/a".into(), |p| format!("{p:.1} ms")),
                i.resyncs.to_string(),
                i.processes.to_string(),
                format!("{}", i.processes as f64 / i.resyncs.max(1) as f64),
                format!(
                    "{}{upstream:.0} ms",
                    if i.interval == "60s" { "< " } else { "" }
                ),
                if measure < upstream { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    format!(
        "### CPU time over {seconds} s idle (default CIDR list, endpoint on; six agents side by side)\n\n\
         Agent = utime + stime, children = cutime + cstime (the tools it ran), from /proc/PID/stat in ticks;\n\
         schedstat = the agent's own threads in ns; perf = `perf stat -e task-clock -p PID` over the same window\n\
         (agent and children, ns). The verdict uses perf, scaled to 60 s.\n\n{}\n{}\n",
        table(
            "llrrrrrrrrrl",
            &[
                "backend",
                "resyncInterval",
                "agent (ticks)",
                "children (ticks)",
                "total (ticks)",
                "agent, schedstat",
                "agent + children, perf",
                "syncs",
                "processes",
                "per sync",
                "upstream (given, per 60 s)",
                "better?"
            ],
            &rows
        ),
        load.sentence()
    )
}

/// CPU per idle resync at 64 and at 50,000 prefixes (target: at most 2x), on nftables and
/// iptables-nft (`--setups=`).
pub fn large_cpu(ctx: &Ctx) -> String {
    let seconds = ctx.knob("seconds", 30) as u64;
    // From 3 s after the second resync: a file written less than 2 s before a read
    // proves nothing about later ones (the same-tick margin), so the first resyncs read it.
    let warmup = Duration::from_secs(ctx.knob("warmup", 3) as u64);
    let sizes = ctx.sizes(&["64", "50000"]);
    let setups = ctx.list("setups", &["nftables", "iptables-nft"]);
    let load = LoadLog::start();
    let mut out = String::new();
    for setup in &setups {
        let cases: Vec<(String, String, String)> = sizes
            .iter()
            .map(|&n| {
                (
                    n.to_string(),
                    setup.clone(),
                    yaml_config(&spread_v4(n, 0), &[], &["resyncInterval: 1s"]),
                )
            })
            .collect();
        eprintln!("large-cpu: {setup} at {sizes:?} prefixes side by side, {seconds} s");
        let results = watch_idle(ctx, &cases, warmup, 2, seconds);
        let per =
            |i: &Idle| i.perf_ms.unwrap_or(i.agent_ms + i.children_ms) / i.resyncs.max(1) as f64;
        let small = per(&results[0]);
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|i| {
                vec![
                    i.label.clone(),
                    i.resyncs.to_string(),
                    i.reads.to_string(),
                    i.perf_ms.map_or("n/a".into(), |p| format!("{p:.0} ms")),
                    format!("{:.0} ms", i.agent_ms + i.children_ms),
                    format!("**{} ms**", ms(per(i))),
                    ms(median(&i.resync_elapsed)),
                    format!("{:.1}×", per(i) / small),
                ]
            })
            .collect();
        let ratio = per(&results[results.len() - 1]) / small;
        out.push_str(&format!(
            "### {setup}: CPU per idle resync by list size (resyncInterval 1s, {seconds} s, agents side by side)\n\n{}\n\
             At {} prefixes an idle resync costs {ratio:.1}× what it costs at {}; target ≤ 2×: **{}**.\n\n",
            table(
                "rrrrrrrr",
                &[
                    "prefixes",
                    "resyncs",
                    "of which read the file",
                    "CPU, perf (agent + children)",
                    "CPU, /proc ticks",
                    "CPU per resync",
                    "resync `elapsed_ms` (median)",
                    "vs the smallest"
                ],
                &rows
            ),
            sizes[sizes.len() - 1],
            sizes[0],
            if ratio <= 2.0 { "met" } else { "not met" },
        ));
    }
    out.push_str(&format!("{}\n", load.sentence()));
    out
}

pub fn footprint(ctx: &Ctx) -> String {
    let seconds = ctx.knob("seconds", 30) as u64;
    let dir = TempDir::new("footprint");
    let missing = dir
        .path
        .join("ip-masq-agent")
        .to_string_lossy()
        .into_owned();
    let thousand = dir.path.join("k");
    std::fs::create_dir(&thousand).expect("mkdir");
    std::fs::write(
        thousand.join("ip-masq-agent"),
        yaml_config(&dense_v4(1000), &[], &[]),
    )
    .expect("config");
    let thousand = thousand
        .join("ip-masq-agent")
        .to_string_lossy()
        .into_owned();
    let load = LoadLog::start();
    // (build, agent, setup, endpoint on, config, config label)
    let cases: Vec<(&str, &Agent, &str, bool, &str, &str)> = vec![
        (
            "static",
            &ctx.agent,
            "iptables-nft",
            true,
            &missing,
            "default",
        ),
        (
            "static",
            &ctx.agent,
            "iptables-nft",
            false,
            &missing,
            "default",
        ),
        (
            "static",
            &ctx.agent,
            "iptables-legacy",
            true,
            &missing,
            "default",
        ),
        ("static", &ctx.agent, "nftables", true, &missing, "default"),
        ("static", &ctx.agent, "nftables", false, &missing, "default"),
        (
            "static",
            &ctx.agent,
            "iptables-nft",
            true,
            &thousand,
            "1,000 CIDRs",
        ),
        (
            "dynamic",
            &ctx.dynamic,
            "iptables-nft",
            true,
            &missing,
            "default",
        ),
        (
            "dynamic",
            &ctx.dynamic,
            "iptables-nft",
            false,
            &missing,
            "default",
        ),
    ];
    eprintln!("footprint: {} agents, {seconds} s idle", cases.len());
    let started = Instant::now();
    let mut running: Vec<(Netns, AgentProcess)> = cases
        .iter()
        .map(|&(_, agent, setup, endpoint, config, _)| {
            let ns = Netns::new("fp");
            let mut args = vec!["--config", config];
            args.extend_from_slice(backend_flags(setup));
            if !endpoint {
                args.push("--metrics-address=");
            }
            let mut process = agent.start(&ns, &args);
            process.wait_for_log("rules applied", 1, Duration::from_secs(20));
            (ns, process)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds).saturating_sub(started.elapsed()));
    let idle_for = started.elapsed().as_secs();
    let statuses: Vec<String> = running
        .iter()
        .map(|(_, a)| {
            std::fs::read_to_string(format!("/proc/{}/status", a.pid())).unwrap_or_default()
        })
        .collect();
    let smaps = rss_by_mapping(running[0].1.pid());
    let mut scrapes = Vec::new();
    for (i, (ns, _)) in running.iter().enumerate() {
        let listening = ns.output(&["ss", "-Hltn", "sport = :9910"]);
        let listening = String::from_utf8_lossy(&listening.stdout).lines().count();
        let scrape = cases[i].3.then(|| {
            ["/healthz", "/readyz", "/metrics"]
                .iter()
                .map(|path| ns.try_http_get("127.0.0.1:9910", path, Duration::from_secs(2)))
                .map(|r| {
                    r.map_or("–".into(), |(code, body)| {
                        if body.len() > 100 {
                            format!("{code}, {} B", body.len())
                        } else {
                            code.to_string()
                        }
                    })
                })
                .collect::<Vec<_>>()
                .join("/")
        });
        scrapes.push((listening, scrape));
    }
    std::thread::sleep(Duration::from_secs(1));
    let after: Vec<u64> = running
        .iter()
        .map(|(_, a)| {
            status_value(
                &std::fs::read_to_string(format!("/proc/{}/status", a.pid())).unwrap_or_default(),
                "VmRSS",
            )
        })
        .collect();
    for (_, agent) in running.iter_mut() {
        agent.terminate();
    }
    let kb = |v: u64| format!("{v} kB ({:.2} MB)", v as f64 * 1024.0 / 1e6);
    let rows: Vec<Vec<String>> = cases
        .iter()
        .zip(&statuses)
        .zip(&scrapes)
        .zip(&after)
        .map(
            |((((build, _, setup, endpoint, _, config), status), (listening, scrape)), after)| {
                let rss = status_value(status, "VmRSS");
                vec![
                    build.to_string(),
                    format!("`{}`", backend_flags(setup).join(" ")),
                    config.to_string(),
                    if *endpoint { "on (default)" } else { "off" }.into(),
                    format!("**{}**", kb(rss)),
                    format!("{} kB", status_value(status, "VmHWM")),
                    format!("{} kB", status_value(status, "RssAnon")),
                    format!("{} kB", status_value(status, "RssFile")),
                    status_value(status, "Threads").to_string(),
                    listening.to_string(),
                    if (rss as f64) * 1024.0 < 4e6 {
                        "yes"
                    } else {
                        "no"
                    }
                    .into(),
                    scrape.clone().unwrap_or("–".into()),
                    format!("{after} kB"),
                ]
            },
        )
        .collect();
    let size = |a: &Agent| {
        format!(
            "{} bytes ({:.2} MiB)",
            file_size(a.path()),
            file_size(a.path()) as f64 / 1048576.0
        )
    };
    format!(
        "### Footprint after {idle_for} s idle (resyncInterval 60s, `--v=2`, agents side by side)\n\n\
         Binaries: static (`scripts/build-release.sh`, shipped) {}; dynamic (`cargo bench`'s release build) {}.\n\
         \"listening\" = sockets on :9910 in the agent's namespace (`ss`); scrape = HTTP status of /healthz, /readyz,\n\
         /metrics, then VmRSS 1 s later. MB = 10^6 bytes.\n\n{}\n\
         Resident pages of the first agent by mapping: {smaps}.\n\n{}\n",
        size(&ctx.agent),
        size(&ctx.dynamic),
        table(
            "lllrrrrrrrlll",
            &[
                "build",
                "backend",
                "config",
                "endpoint",
                "VmRSS",
                "VmHWM",
                "RssAnon",
                "RssFile",
                "threads",
                "listening",
                "under 4 MB?",
                "scrape",
                "VmRSS after scrape"
            ],
            &rows
        ),
        load.sentence()
    )
}
