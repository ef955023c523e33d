//! What every scenario uses: the binaries, knobs, the machine's load, statistics,
//! Markdown tables, /proc readers, `perf stat` and `nft monitor`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ima_harness::{Agent, AgentProcess, ConfigMapVolume, Netns, TempDir};

/// A sample during which other processes used more than this share of the machine's
/// CPU is taken again (at most twice).
pub const DISTURBED_PERCENT: f64 = 20.0;
/// Before each sample, wait (at most 60 s) until others use at most this much.
pub const QUIET_PERCENT: f64 = 15.0;

pub struct Ctx {
    /// The agent under test: the shipped static build when present.
    pub agent: Agent,
    /// `cargo bench`'s own (dynamic) build of the agent.
    pub dynamic: Agent,
    pub upstream: Option<Agent>,
    knobs: BTreeMap<String, String>,
    _bins: TempDir,
}

impl Ctx {
    pub fn new(knobs: BTreeMap<String, String>) -> Ctx {
        let bins = TempDir::new("bench-bin");
        // Private copies: a concurrent cargo build must not swap a binary mid-run.
        let copy = |from: &Path, name: &str| -> Agent {
            let to = bins.path.join(name);
            std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
            Agent::new(to)
        };
        let dynamic_src = PathBuf::from(env!("CARGO_BIN_EXE_ip-masq-agent"));
        let static_src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/x86_64-unknown-linux-gnu/release/ip-masq-agent");
        let agent_src = knobs.get("agent").map(PathBuf::from).unwrap_or_else(|| {
            if static_src.exists() {
                static_src.clone()
            } else {
                eprintln!(
                    "note: no static build (scripts/build-release.sh); measuring {}",
                    dynamic_src.display()
                );
                dynamic_src.clone()
            }
        });
        if agent_src == static_src && newer_source_than(&static_src) {
            eprintln!(
                "warning: {} is older than src/; run scripts/build-release.sh",
                static_src.display()
            );
        }
        Ctx {
            agent: copy(&agent_src, "ip-masq-agent"),
            dynamic: copy(&dynamic_src, "ip-masq-agent-dynamic"),
            upstream: knobs
                .get("upstream")
                .map(|p| copy(Path::new(p), "upstream-ip-masq-agent")),
            knobs,
            _bins: bins,
        }
    }

    pub fn knob(&self, key: &str, default: usize) -> usize {
        self.knobs.get(key).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("--{key}={v}: not a number"))
        })
    }

    /// A comma- or space-separated knob, e.g. `--sizes=64,1000`.
    pub fn list(&self, key: &str, default: &[&str]) -> Vec<String> {
        match self.knobs.get(key) {
            Some(v) => v
                .split([',', ' '])
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            None => default.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn sizes(&self, default: &[&str]) -> Vec<usize> {
        self.list("sizes", default)
            .iter()
            .map(|s| s.parse().expect("--sizes: numbers"))
            .collect()
    }

    pub fn header(&self) -> String {
        let git = |args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        };
        let mut commit = git(&["rev-parse", "--short", "HEAD"]);
        if !git(&[
            "status",
            "--porcelain",
            "--",
            "src",
            "Cargo.toml",
            "Cargo.lock",
        ])
        .is_empty()
        {
            commit.push_str(" (with uncommitted changes in src/ or Cargo.*)");
        }
        let version = |tool: &str| {
            tool_output(&[tool, "--version"])
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        };
        format!(
            "<!-- cargo bench --bench kernel, {} UTC, commit {commit} -->\n\
             - Machine: {} CPUs, kernel {}, {}, {}, {}\n\
             - Agent: `{}` ({} bytes); dynamic build {} bytes\n",
            tool_output(&["date", "-u", "+%Y-%m-%d %H:%M"]).trim(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            tool_output(&["uname", "-r"]).trim(),
            version("iptables-nft"),
            version("iptables-legacy"),
            version("nft"),
            tool_output(&[self.agent.path_str(), "--version"]).trim(),
            file_size(self.agent.path()),
            file_size(self.dynamic.path()),
        )
    }

    /// Takes one sample after waiting for a quiet machine; takes it again (at most twice)
    /// when other processes used more than [`DISTURBED_PERCENT`] of the CPU meanwhile.
    pub fn sample<T>(&self, load: &mut LoadLog, take: impl FnMut() -> T) -> T {
        self.sample_with(load, (QUIET_PERCENT, DISTURBED_PERCENT), take)
    }

    /// [`Ctx::sample`] with other limits: (quiet before, disturbed during), in percent.
    pub fn sample_with<T>(
        &self,
        load: &mut LoadLog,
        (quiet, disturbed): (f64, f64),
        mut take: impl FnMut() -> T,
    ) -> T {
        // `--busy=1`: on a machine that is never quiet, take each sample once, without
        // waiting; the tables still say how much of the CPU others used.
        let busy = self.knobs.contains_key("busy");
        for attempt in 0.. {
            let window = if busy {
                Load::start()
            } else {
                wait_quiet(quiet)
            };
            let value = take();
            let others = window.others_percent();
            load.worst = load.worst.max(others);
            if busy || others <= disturbed || attempt == 2 {
                return value;
            }
            load.retaken += 1;
            eprintln!(
                "  disturbed: other processes used {others:.0} % of the CPU; taking it again"
            );
        }
        unreachable!()
    }
}

fn newer_source_than(binary: &Path) -> bool {
    let built = std::fs::metadata(binary).and_then(|m| m.modified()).ok();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if entry.metadata().and_then(|m| m.modified()).ok() > built {
                return true;
            }
        }
    }
    false
}

pub fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// stdout of a command on the host (version strings and the like), empty on failure.
pub fn tool_output(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Load: how much CPU other processes used.

/// (busy, total) ticks of the whole machine. Busy leaves out irq and softirq time (the
/// datapath benchmark's forwarding runs there, on behalf of this process) and counts
/// steal time (the hypervisor ran something else on our CPU).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(7);
    (busy, busy + get(3) + get(4) + get(5) + get(6))
}

/// utime + stime + cutime + cstime of PID, in ticks.
pub fn proc_ticks(pid: &str) -> [u64; 4] {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    [get(11), get(12), get(13), get(14)]
}

/// CPU ticks of this process, its reaped children and its tracked live children.
fn own_ticks() -> u64 {
    let mut total: u64 = proc_ticks("self").iter().sum();
    for pid in ima_harness::tracked_children() {
        total += proc_ticks(&pid.to_string()).iter().sum::<u64>();
    }
    total
}

/// A window over which to tell how much CPU other processes used.
#[derive(Clone, Copy)]
pub struct Load {
    machine: (u64, u64),
    own: u64,
}

impl Load {
    pub fn start() -> Load {
        Load {
            machine: machine_ticks(),
            own: own_ticks(),
        }
    }

    /// Percent of the whole machine's CPU time (all cores) used by other processes.
    pub fn others_percent(&self) -> f64 {
        let (busy, total) = machine_ticks();
        let total = total.saturating_sub(self.machine.1);
        let others = (busy - self.machine.0) as f64 - (own_ticks() - self.own) as f64;
        if total == 0 {
            0.0
        } else {
            (100.0 * others / total as f64).max(0.0)
        }
    }
}

/// Waits (at most 60 s) until other processes use at most `quiet` percent over half a
/// second; returns a window that starts with that quiet half second.
pub fn wait_quiet(quiet: f64) -> Load {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let window = Load::start();
        std::thread::sleep(Duration::from_millis(500));
        let others = window.others_percent();
        if others <= quiet || Instant::now() > deadline {
            return window;
        }
        eprintln!("  other processes use {others:.0} % of the CPU; waiting");
    }
}

/// A scenario's record of the load: the whole window, the worst sample, re-takes.
pub struct LoadLog {
    window: Load,
    pub worst: f64,
    pub retaken: u32,
}

impl LoadLog {
    pub fn start() -> LoadLog {
        LoadLog {
            window: Load::start(),
            worst: 0.0,
            retaken: 0,
        }
    }

    /// The sentence every results table carries.
    pub fn sentence(&self) -> String {
        let mut s = format!(
            "Other processes used {:.0} % of the CPU over the whole run",
            self.window.others_percent()
        );
        if self.worst > 0.0 {
            s.push_str(&format!(" (worst sample {:.0} %)", self.worst));
        }
        if self.retaken > 0 {
            s.push_str(&format!(
                "; {} disturbed sample(s) were taken again",
                self.retaken
            ));
        }
        s.push('.');
        s
    }
}

// ---------------------------------------------------------------------------------------
// Statistics and formatting.

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest rank: the smallest value with at least `p` % of the samples at or below it.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank.min(v.len()).wrapping_sub(1))
        .copied()
        .unwrap_or(f64::NAN)
}

pub fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Milliseconds with a precision that suits their size.
pub fn ms(v: f64) -> String {
    match v {
        v if v.is_nan() => "n/a".into(),
        v if v >= 100.0 => format!("{v:.0}"),
        v if v >= 10.0 => format!("{v:.1}"),
        v => format!("{v:.2}"),
    }
}

/// "median [min–max]".
pub fn spread(values: &[f64]) -> String {
    let (lo, hi) = min_max(values);
    format!("{} [{}–{}]", ms(median(values)), ms(lo), ms(hi))
}

/// A rate as 163k, 2.5k or 507.
pub fn rate(r: f64) -> String {
    match r {
        r if r >= 10_000.0 => format!("{:.0}k", r / 1000.0),
        r if r >= 1000.0 => format!("{:.1}k", r / 1000.0),
        r => format!("{r:.0}"),
    }
}

/// A Markdown table; `aligns` has one letter per column, `l` or `r`.
pub fn table(aligns: &str, head: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n|", head.join(" | "));
    for a in aligns.chars() {
        out.push_str(if a == 'r' { "---:|" } else { "---|" });
    }
    out.push('\n');
    for row in rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Agents.

/// The flags of a setup name.
pub fn backend_flags(setup: &str) -> &'static [&'static str] {
    match setup {
        "iptables-nft" => &["--backend=iptables", "--iptables-mode=nft"],
        "iptables-legacy" => &["--backend=iptables", "--iptables-mode=legacy"],
        "nftables" => &["--backend=nftables"],
        other => panic!("unknown setup {other:?}"),
    }
}

/// The agent (`agent`) on `volume` with a setup's flags and `extra`, after its first sync.
pub fn start_synced(
    agent: &Agent,
    ns: &Netns,
    volume: &ConfigMapVolume,
    setup: &str,
    extra: &[&str],
) -> AgentProcess {
    let mut flags = backend_flags(setup).to_vec();
    flags.extend_from_slice(extra);
    agent.start_synced(ns, volume, &flags)
}

/// A value of `/proc/PID/status` in kB (or a count, for `Threads`).
pub fn status_value(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resident kB of PID by mapping (binary, `[heap]`, anonymous, ...), largest first.
pub fn rss_by_mapping(pid: u32) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    let mut name = String::new();
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first().is_some_and(|f| {
            f.contains('-') && f.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        }) {
            name = fields.get(5).map_or("anonymous".into(), |n| {
                Path::new(n)
                    .file_name()
                    .map_or(n.to_string(), |f| f.to_string_lossy().into_owned())
            });
        } else if fields.first() == Some(&"Rss:") {
            *by.entry(name.clone()).or_default() +=
                fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    let mut list: Vec<(String, u64)> = by.into_iter().filter(|(_, kb)| *kb > 0).collect();
    list.sort_by_key(|(_, kb)| std::cmp::Reverse(*kb));
    list.iter()
        .map(|(n, kb)| format!("{kb} kB {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Nanoseconds on CPU of all of PID's threads (schedstat).
pub fn schedstat_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A child process of ours (a tool beside the agent), stopped by PID on drop.
pub struct Helper {
    pub child: Child,
}

impl Helper {
    pub fn spawn(mut command: Command) -> Helper {
        let child = command.spawn().expect("spawn helper");
        ima_harness::track_child(child.id());
        Helper { child }
    }

    /// SIGTERM (lets perf and strace write their output), then reaped.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        ima_harness::untrack_child(self.child.id());
    }

    /// Waits (bounded) for a helper that ends by itself.
    pub fn wait(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.terminate();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

/// `perf stat -e task-clock -p PID` for `seconds`: the agent and every process it starts
/// meanwhile (counters opened on a PID are inherited by its new children), in ns.
pub struct PerfStat {
    helper: Helper,
    out: PathBuf,
    seconds: u64,
}

impl PerfStat {
    pub fn start(pid: u32, seconds: u64, dir: &Path) -> Option<PerfStat> {
        tool_output(&["sh", "-c", "command -v perf"])
            .contains("perf")
            .then(|| {
                let out = dir.join(format!("perf-{pid}.csv"));
                let mut command = Command::new("perf");
                command
                    .args(["stat", "-e", "task-clock", "-x,", "-o"])
                    .arg(&out)
                    .args(["-p", &pid.to_string(), "--", "sleep", &seconds.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                PerfStat {
                    helper: Helper::spawn(command),
                    out,
                    seconds,
                }
            })
    }

    /// Milliseconds of task-clock (0 when the process never ran in the window).
    pub fn finish(self) -> f64 {
        self.helper.wait(Duration::from_secs(self.seconds + 10));
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .find(|l| l.split(',').nth(2) == Some("task-clock"))
            .and_then(|l| l.split(',').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    }
}

/// `nft monitor` in a namespace, every line timestamped as it arrives.
pub struct NftMonitor {
    helper: Helper,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NftMonitor {
    pub fn start(ns: &Netns) -> NftMonitor {
        let mut command = ns.command("stdbuf");
        command
            .args(["-oL", "nft", "monitor"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut helper = Helper::spawn(command);
        let stdout = helper.child.stdout.take().expect("monitor stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push((Instant::now(), line));
            }
        });
        let monitor = NftMonitor { helper, lines };
        // Live once it reports a change of our own (it may take a moment to subscribe).
        let live = (0..25).any(|_| {
            ns.sh(&["nft", "add", "table", "inet", "ima_bench_ready"]);
            let seen = monitor.wait_for(
                |l| l.contains("ima_bench_ready"),
                Duration::from_millis(200),
            );
            ns.sh(&["nft", "delete", "table", "inet", "ima_bench_ready"]);
            seen.is_some()
        });
        assert!(live, "nft monitor printed nothing");
        assert!(
            monitor
                .wait_for(
                    |l| l.contains("delete table inet ima_bench_ready"),
                    Duration::from_secs(5)
                )
                .is_some()
        );
        monitor
    }

    pub fn lines(&self) -> Vec<(Instant, String)> {
        self.lines.lock().expect("lines").clone()
    }

    /// The arrival time of the first line matching `wanted` (bounded by `timeout`).
    pub fn wait_for(&self, wanted: impl Fn(&str) -> bool, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((at, _)) = self.lines().iter().find(|(_, l)| wanted(l)) {
                return Some(*at);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn stop(self) {
        self.helper.stop();
    }
}
