//! Kernel convergence property: for generated flags and a generated config A, then a
//! generated config B committed at run time (kubelet's ..data swap), on iptables-nft,
//! iptables-legacy and nftables, each step leaves the kernel in a state `status` accepts
//! (kernel == render), and the next resyncs write nothing and log no rewrite, while
//! another process commits to nf_tables between them. Configs cover every key:
//! nonMasqueradeCIDRs (IPv4 and IPv6), forceMasqueradeCIDRs, masqueradeSourceCIDRs,
//! masqLinkLocal(IPv6), cidrLimit, resyncInterval; flags --enable-ipv6, --to-ports,
//! --random-fully, --masq-chain.
//!
//! Seeded and reproducible: `IMA_SEED=N` reruns the same cases (the seed is printed at
//! the start and in every failure), `IMA_CASE=I` runs only case I of that seed, and
//! `IMA_CASES=N` changes how many cases a setup runs (default 40). Each setup uses one
//! namespace of its own; the agent is restarted per case and the namespace is cleaned
//! (`ip-masq-agent cleanup`) between cases, so a verdict depends on its case alone.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ima_harness::seeded::{self, Rng};
use ima_harness::*;

use crate::AGENT;

const DEFAULT_CASES: usize = 24;
/// Idle resyncs watched after the first sync.
const RESYNCS: usize = 3;
const FIRST_SYNC_TIMEOUT: Duration = Duration::from_secs(15);
const RESYNC_TIMEOUT: Duration = Duration::from_secs(10);
const MONITOR_TIMEOUT: Duration = Duration::from_secs(3);
/// A setup stops starting new cases after this long (and fails saying so).
const BUDGET: Duration = Duration::from_secs(240);

/// The agent's log texts (src/agent.rs).
const APPLIED: &str = "rules applied";
const RESYNCED: &str = "rules resynced";
const REWRITTEN: &str = "the kernel's rules differed from the config; rewritten";
const SYNC_FAILED: &str = "syncing masquerade rules failed";
const REJECTED: [&str; 2] = ["config rejected", "config still rejected"];

/// The marker table that brackets the watched resyncs in `nft monitor`'s output.
const MARKER: &str = "inet ima-convergence-marker";
/// A neighbour's table, committed to between the agent's resyncs.
const NEIGHBOUR: &str = "ima-convergence-neighbour";

#[derive(Clone, Copy)]
enum Setup {
    IptablesNft,
    IptablesLegacy,
    Nftables,
}

impl Setup {
    /// The test function's name, for the reproduce line.
    fn test_name(self) -> &'static str {
        match self {
            Setup::IptablesNft => "iptables_nft",
            Setup::IptablesLegacy => "iptables_legacy",
            Setup::Nftables => "nftables",
        }
    }

    fn flags(self) -> &'static [&'static str] {
        match self {
            Setup::IptablesNft => &["--backend=iptables", "--iptables-mode=nft"],
            Setup::IptablesLegacy => &["--backend=iptables", "--iptables-mode=legacy"],
            Setup::Nftables => &["--backend=nftables"],
        }
    }

    /// nft-based setups are watched with `nft monitor`; legacy by comparing saves.
    fn uses_nft(self) -> bool {
        !matches!(self, Setup::IptablesLegacy)
    }
}

root_test!(
    fn iptables_nft() {
        run(Setup::IptablesNft);
    }
);

root_test!(
    fn iptables_legacy() {
        run(Setup::IptablesLegacy);
    }
);

root_test!(
    fn nftables() {
        run(Setup::Nftables);
    }
);

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={text:?} is not a number")))
}

/// One prefix as a (family width, network, length) triple.
#[derive(Clone, Copy)]
struct Prefix {
    bits: u32,
    network: u128,
    len: u32,
}

impl Prefix {
    fn new(bits: u32, address: u128, len: u32) -> Prefix {
        let host_bits = bits - len;
        let mask = if host_bits >= 128 {
            0
        } else {
            !((1u128 << host_bits) - 1)
        };
        let width_mask = if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        Prefix {
            bits,
            network: address & mask & width_mask,
            len,
        }
    }

    fn text(&self) -> String {
        if self.bits == 32 {
            format!("{}/{}", Ipv4Addr::from(self.network as u32), self.len)
        } else {
            format!("{}/{}", Ipv6Addr::from(self.network), self.len)
        }
    }

    fn is_host(&self) -> bool {
        self.len == self.bits
    }
}

/// How often a generated prefix is /0 or a host prefix (/32, /128), in percent; set
/// per case, so that some cases have neither and a failure points at its feature.
#[derive(Clone, Copy)]
struct Lengths {
    zero_percent: u64,
    host_percent: u64,
}

fn random_len(rng: &mut Rng, bits: u32, lengths: Lengths) -> u32 {
    if rng.chance(lengths.zero_percent) {
        0
    } else if rng.chance(lengths.host_percent) {
        bits
    } else {
        1 + rng.below(u64::from(bits) - 1) as u32
    }
}

fn random_prefix(rng: &mut Rng, bits: u32, lengths: Lengths) -> Prefix {
    let len = random_len(rng, bits, lengths);
    let random = u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64());
    let address = if bits == 32 {
        let low = random as u32;
        u128::from(match rng.below(5) {
            0 => 0x0A00_0000 | (low & 0x00FF_FFFF), // 10.0.0.0/8
            1 => 0xA9FE_0000 | (low & 0x0000_FFFF), // 169.254.0.0/16
            2 => 0xC0A8_0000 | (low & 0x0000_FFFF), // 192.168.0.0/16
            _ => low,
        })
    } else {
        match rng.below(5) {
            0 => 0xFD00u128 << 112 | (random >> 8),      // fd00::/8
            1 => 0xFE80u128 << 112 | (random >> 10),     // fe80::/10
            2 => 0x2001_0DB8u128 << 96 | (random >> 32), // 2001:db8::/32
            _ => random,
        }
    };
    Prefix::new(bits, address, len)
}

/// A prefix overlapping `other`: a supernet or a subnet of it.
fn overlapping(rng: &mut Rng, other: Prefix, lengths: Lengths) -> Prefix {
    let len = random_len(rng, other.bits, lengths);
    let noise = u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64());
    let host_bits = other.bits - other.len;
    let host_mask = if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    Prefix::new(other.bits, other.network | (noise & host_mask), len)
}

fn random_chain(rng: &mut Rng) -> String {
    const FIRST: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    const REST: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let len = 1 + rng.below(28) as usize;
    let mut name = String::with_capacity(len);
    name.push(*rng.pick(FIRST) as char);
    while name.len() < len {
        name.push(*rng.pick(REST) as char);
    }
    name
}

fn random_ports(rng: &mut Rng) -> String {
    const FIXED: [&str; 4] = [
        "1024-29999",
        "1024-29999,32768-65535",
        "20000",
        "1024-2000,3000-4000,5000-65535",
    ];
    if rng.chance(65) {
        return rng.pick(&FIXED).to_string();
    }
    // 1-4 ascending, disjoint ranges inside 1024-65535.
    let count = 1 + rng.below(4);
    let mut cuts: Vec<u64> = (0..count * 2).map(|_| 1024 + rng.below(64512)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let ranges: Vec<String> = cuts
        .chunks(2)
        .filter(|pair| pair.len() == 2)
        .map(|pair| format!("{}-{}", pair[0], pair[1] - 1))
        .collect();
    if ranges.is_empty() {
        "1024-65535".to_string()
    } else {
        ranges.join(",")
    }
}

/// One generated case: agent flags (beyond the setup's), the config the agent starts
/// with and the one committed while it runs.
struct Case {
    flags: Vec<String>,
    config: String,
    then: String,
    ipv6: bool,
    chain: String,
    /// A one-line summary of what the case exercises, for the progress lines.
    features: String,
}

/// A generated list of destination prefixes: the prefixes and their YAML.
fn destination_list(
    rng: &mut Rng,
    ipv6: bool,
    count: usize,
    lengths: Lengths,
    prefixes: &mut Vec<Prefix>,
) -> Vec<String> {
    let start = prefixes.len();
    for _ in 0..count {
        let bits = if ipv6 && rng.chance(45) { 128 } else { 32 };
        let same_family: Vec<Prefix> = prefixes
            .iter()
            .copied()
            .filter(|p| p.bits == bits)
            .collect();
        let prefix = match rng.below(10) {
            0 if !same_family.is_empty() => *rng.pick(&same_family), // duplicate
            1 | 2 if !same_family.is_empty() => {
                let other = *rng.pick(&same_family);
                overlapping(rng, other, lengths)
            }
            _ => random_prefix(rng, bits, lengths),
        };
        prefixes.push(prefix);
    }
    prefixes[start..]
        .iter()
        .map(|p| {
            // IPv6 is always quoted; IPv4 sometimes.
            if p.bits == 128 || rng.chance(30) {
                format!("\"{}\"", p.text())
            } else {
                p.text()
            }
        })
        .collect()
}

fn write_list(config: &mut String, rng: &mut Rng, key: &str, texts: &[String]) {
    if texts.is_empty() || rng.chance(40) {
        let _ = writeln!(config, "{key}: [{}]", texts.join(", "));
    } else {
        let _ = writeln!(config, "{key}:");
        for text in texts {
            let _ = writeln!(config, "  - {text}");
        }
    }
}

/// The default nonMasqueradeCIDRs: a force prefix may not repeat one of them.
const DEFAULT_LIST: [(u128, u32); 3] = [(0x0A00_0000, 8), (0xAC10_0000, 12), (0xC0A8_0000, 16)];

/// One config of the whole key space (valid: a rejected config is another test's).
fn generate_config(rng: &mut Rng, ipv6: bool, features: &mut Vec<String>) -> String {
    let mut config = String::new();
    let mut prefixes: Vec<Prefix> = Vec::new();
    let lengths = Lengths {
        zero_percent: if rng.chance(30) { 2 + rng.below(10) } else { 0 },
        host_percent: if rng.chance(50) {
            10 + rng.below(30)
        } else {
            0
        },
    };
    let list = match rng.below(100) {
        0..=7 => None, // the key is absent: the defaults
        8..=12 => Some(0),
        13..=22 => Some(100 + rng.below(201) as usize),
        _ => Some(1 + rng.below(20) as usize),
    };
    if let Some(count) = list {
        let texts = destination_list(rng, ipv6, count, lengths, &mut prefixes);
        write_list(&mut config, rng, "nonMasqueradeCIDRs", &texts);
    }
    let kept = prefixes.clone();
    // forceMasqueradeCIDRs: mostly inside kept ranges (that is what they are for),
    // never a prefix of the other list (an error), nor of the default list.
    let mut forced: Vec<Prefix> = Vec::new();
    if rng.chance(45) {
        let count = 1 + rng.below(12) as usize;
        for _ in 0..count {
            let bits = if ipv6 && rng.chance(40) { 128 } else { 32 };
            let same: Vec<Prefix> = kept.iter().copied().filter(|p| p.bits == bits).collect();
            let candidate = if !same.is_empty() && rng.chance(70) {
                let inside = *rng.pick(&same);
                overlapping(rng, inside, lengths)
            } else {
                random_prefix(rng, bits, lengths)
            };
            let clashes = kept.iter().any(|k| {
                k.bits == candidate.bits && k.network == candidate.network && k.len == candidate.len
            }) || (list.is_none()
                && candidate.bits == 32
                && DEFAULT_LIST.contains(&(candidate.network, candidate.len)));
            if !clashes {
                forced.push(candidate);
            }
        }
        let texts: Vec<String> = forced.iter().map(|p| format!("\"{}\"", p.text())).collect();
        write_list(&mut config, rng, "forceMasqueradeCIDRs", &texts);
        features.push(format!("{} forced", forced.len()));
    }
    if let Some(count) = list.filter(|c| *c + forced.len() > 64) {
        let _ = writeln!(
            config,
            "cidrLimit: {}",
            count + forced.len() + rng.below(20) as usize
        );
    } else if list.is_none() && forced.len() + 3 > 64 {
        let _ = writeln!(config, "cidrLimit: 100");
    }
    // masqueradeSourceCIDRs: absent, empty, one family or both.
    if rng.chance(40) {
        let mut sources: Vec<Prefix> = Vec::new();
        let shape = rng.below(10);
        let count = if shape == 0 {
            0
        } else {
            1 + rng.below(5) as usize
        };
        for _ in 0..count {
            let bits = match (ipv6, shape) {
                (true, 1..=3) => 128,
                (true, 4..=6) => 32,
                (true, _) if rng.chance(50) => 128,
                _ => 32,
            };
            let source_lengths = Lengths {
                zero_percent: 3,
                host_percent: 10,
            };
            sources.push(random_prefix(rng, bits, source_lengths));
        }
        let texts: Vec<String> = sources
            .iter()
            .map(|p| format!("\"{}\"", p.text()))
            .collect();
        write_list(&mut config, rng, "masqueradeSourceCIDRs", &texts);
        features.push(format!("{} source(s)", sources.len()));
    }
    for key in ["masqLinkLocal", "masqLinkLocalIPv6"] {
        match rng.below(3) {
            0 => {}
            1 => {
                let _ = writeln!(config, "{key}: true");
                features.push(key.to_string());
            }
            _ => {
                let _ = writeln!(config, "{key}: false");
            }
        }
    }
    let interval = rng.pick(&["100ms", "120ms", "0.1s", "150ms"]);
    let _ = writeln!(config, "resyncInterval: {interval}");

    let count = |bits: u32| prefixes.iter().filter(|p| p.bits == bits).count();
    let zero = prefixes.iter().filter(|p| p.len == 0).count();
    let hosts = prefixes.iter().filter(|p| p.is_host()).count();
    let mut summary = match list {
        None => "default CIDRs".to_string(),
        Some(_) => format!("{} v4 + {} v6 CIDRs", count(32), count(128)),
    };
    if zero > 0 {
        let _ = write!(summary, ", {zero} of /0");
    }
    if hosts > 0 {
        let _ = write!(summary, ", {hosts} of /32 or /128");
    }
    features.insert(0, summary);
    config
}

impl Case {
    fn generate(seed: u64, index: usize) -> Case {
        let mut rng = Rng::for_case(seed, index);
        let ipv6 = rng.chance(50);
        let mut flags = Vec::new();
        let mut features = Vec::new();
        if ipv6 {
            flags.push("--enable-ipv6".to_string());
            features.push("ipv6".to_string());
        }
        if rng.chance(40) {
            flags.push("--random-fully=false".to_string());
            features.push("random-fully=false".to_string());
        }
        let to_ports = if rng.chance(45) {
            random_ports(&mut rng)
        } else {
            String::new()
        };
        if !to_ports.is_empty() {
            features.push(format!(
                "to-ports({} range{})",
                to_ports.split(',').count(),
                if to_ports.contains(',') { "s" } else { "" }
            ));
            flags.push(format!("--to-ports={to_ports}"));
        }
        let chain = if rng.chance(30) {
            random_chain(&mut rng)
        } else {
            "IP-MASQ-AGENT".to_string()
        };
        if chain != "IP-MASQ-AGENT" || rng.chance(20) {
            features.push(format!("chain={chain}"));
            flags.push(format!("--masq-chain={chain}"));
        }

        let mut first = Vec::new();
        let config = generate_config(&mut rng, ipv6, &mut first);
        let mut second = Vec::new();
        let then = generate_config(&mut rng, ipv6, &mut second);
        features.insert(
            0,
            format!("[{}] then [{}]", first.join("; "), second.join("; ")),
        );
        Case {
            flags,
            config,
            then,
            ipv6,
            chain,
            features: features.join("; "),
        }
    }
}

/// Lines of `log` that end a sync, whatever its outcome.
fn syncs(log: &str) -> usize {
    log.lines()
        .filter(|line| {
            [APPLIED, RESYNCED, REWRITTEN, SYNC_FAILED]
                .iter()
                .chain(&REJECTED)
                .any(|text| line.contains(text))
        })
        .count()
}

fn count_lines(log: &str, text: &str) -> usize {
    log.lines().filter(|line| line.contains(text)).count()
}

/// The log lines that say something went differently from an idle resync.
fn notable_lines(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| {
            [APPLIED, REWRITTEN, SYNC_FAILED, "ERROR", "WARN"]
                .iter()
                .chain(&REJECTED)
                .any(|text| line.contains(text))
        })
        .collect();
    clip(&lines.join("\n"), 12)
}

/// At most `max` lines of `text`, saying how many were left out.
fn clip(text: &str, max: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= max {
        return lines.join("\n");
    }
    format!(
        "{}\n... ({} more lines)",
        lines[..max].join("\n"),
        lines.len() - max
    )
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// Polls the agent's log until `done` holds; the log, or why it never did.
fn wait_log(
    agent: &mut AgentProcess,
    timeout: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = agent.log();
        if done(&log) {
            return Ok(log);
        }
        if !agent.is_running() {
            return Err(format!(
                "the agent exited while waiting for {what}; its log:\n{}",
                indent(&clip(&log, 40))
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no {what} within {timeout:?}; the agent's log:\n{}",
                indent(&clip(&log, 40))
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `nft monitor` in the namespace, killed on drop.
struct Monitor {
    child: Child,
    out: std::path::PathBuf,
    _dir: TempDir,
}

impl Monitor {
    /// Starts the monitor and returns once it has seen the start marker.
    fn start(ns: &Netns) -> Result<Monitor, String> {
        let dir = TempDir::new("monitor");
        let out = dir.path.join("monitor.log");
        let file = std::fs::File::create(&out).map_err(|e| format!("monitor log: {e}"))?;
        let child = ns
            .command("nft")
            .arg("monitor")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawning nft monitor: {e}"))?;
        let monitor = Monitor {
            child,
            out,
            _dir: dir,
        };
        // The monitor may not be listening yet: add the marker until it shows up.
        let deadline = Instant::now() + MONITOR_TIMEOUT;
        let added = format!("add table {MARKER}");
        loop {
            let _ = ns.output(&["nft", "add", "table", "inet", marker_name()]);
            std::thread::sleep(Duration::from_millis(20));
            if monitor.text().contains(&added) {
                return Ok(monitor);
            }
            if Instant::now() >= deadline {
                return Err("nft monitor never reported the start marker".into());
            }
            // `add table` of an existing table is no event: remove it and try again.
            let _ = ns.output(&["nft", "delete", "table", "inet", marker_name()]);
        }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Removes the marker and returns every event between the two markers.
    fn finish(mut self, ns: &Netns) -> Result<String, String> {
        ns.output(&["nft", "delete", "table", "inet", marker_name()]);
        let deleted = format!("delete table {MARKER}");
        let added = format!("add table {MARKER}");
        if !eventually(MONITOR_TIMEOUT, || self.text().contains(&deleted)) {
            return Err("nft monitor never reported the end marker".into());
        }
        self.stop();
        let text = self.text();
        let start = text.rfind(&added).map_or(0, |i| i + added.len());
        let end = text.rfind(&deleted).unwrap_or(text.len()).max(start);
        // Generation lines say only that someone committed; the neighbour's own
        // commits are not the agent's writes. What is left is what the agent wrote.
        let between: Vec<&str> = text[start..end]
            .lines()
            .filter(|l| !l.is_empty())
            .filter(|l| !l.starts_with("# new generation") && !l.contains(NEIGHBOUR))
            .collect();
        Ok(between.join("\n"))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop();
    }
}

fn marker_name() -> &'static str {
    MARKER.trim_start_matches("inet ")
}

fn legacy_tools(ipv6: bool) -> Vec<(&'static str, &'static str)> {
    let mut tools = vec![("iptables-legacy-save", "iptables-legacy-restore")];
    if ipv6 {
        tools.push(("ip6tables-legacy-save", "ip6tables-legacy-restore"));
    }
    tools
}

/// Sets the packet counters of every rule in iptables-legacy's nat table(s) to [1:1].
/// A rewrite resets the counters of the rules it writes, so even a rewrite with the
/// same rules shows in the save that `legacy_snapshot` compares; the agent itself
/// compares rules without counters, so this is no drift to it.
fn plant_counters(ns: &Netns, ipv6: bool) -> Result<(), String> {
    use std::io::Write;
    for (save, restore) in legacy_tools(ipv6) {
        let out = ns.output(&[save, "-c", "-t", "nat"]);
        if !out.status.success() {
            return Err(format!(
                "{save} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let planted: String = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| match line.split_once("] -A ") {
                Some((_, rule)) if line.starts_with('[') => format!("[1:1] -A {rule}\n"),
                _ => format!("{line}\n"),
            })
            .collect();
        let mut child = ns
            .command(restore)
            .args(["-w", "5", "-c"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {restore}: {e}"))?;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(planted.as_bytes())
            .map_err(|e| format!("writing to {restore}: {e}"))?;
        drop(stdin);
        let done = child.wait_with_output().expect("wait for restore");
        if !done.status.success() {
            return Err(format!(
                "{restore} -c failed: {}",
                String::from_utf8_lossy(&done.stderr)
            ));
        }
    }
    Ok(())
}

/// iptables-legacy's tables (ip6tables' too with IPv6) with rule counters, without
/// comment lines or chain counters.
fn legacy_snapshot(ns: &Netns, ipv6: bool) -> Result<String, String> {
    let mut text = String::new();
    for (save, _) in legacy_tools(ipv6) {
        let out = ns.output(&[save, "-c"]);
        if !out.status.success() {
            return Err(format!(
                "{save} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let _ = writeln!(text, "## {save}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.starts_with('#') {
                continue;
            }
            let line = match line.rfind(" [") {
                Some(at) if line.starts_with(':') && line.ends_with(']') => &line[..at],
                _ => line,
            };
            text.push_str(line);
            text.push('\n');
        }
    }
    Ok(text)
}

/// Lines only in `before` (`-`) and only in `after` (`+`).
fn line_changes(before: &str, after: &str) -> String {
    let before: Vec<&str> = before.lines().collect();
    let after: Vec<&str> = after.lines().collect();
    let mut out: Vec<String> = before
        .iter()
        .filter(|l| !after.contains(l))
        .map(|l| format!("- {l}"))
        .collect();
    out.extend(
        after
            .iter()
            .filter(|l| !before.contains(l))
            .map(|l| format!("+ {l}")),
    );
    if out.is_empty() {
        out.push("~ the same lines in a different order".into());
    }
    out.join("\n")
}

fn to_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Runs one case; the list of what went wrong (empty when it converged).
fn check_case(ns: &Netns, volume: &mut ConfigMapVolume, setup: Setup, case: &Case) -> Vec<String> {
    volume.update(&case.config);
    let config_path = volume.path().to_str().expect("utf-8 path").to_string();
    let mut flags = vec!["--config".to_string(), config_path];
    flags.extend(setup.flags().iter().map(|f| f.to_string()));
    flags.extend(case.flags.iter().cloned());

    let mut agent_args = flags.clone();
    agent_args.push("--metrics-address=".to_string());
    let mut agent = AGENT.start(ns, &to_strs(&agent_args));
    let log = match wait_log(&mut agent, FIRST_SYNC_TIMEOUT, "first sync", |log| {
        syncs(log) >= 1
    }) {
        Ok(log) => log,
        Err(why) => return vec![why],
    };
    if count_lines(&log, APPLIED) != 1 {
        return vec![format!(
            "the first sync did not apply the config; the agent's log:\n{}",
            indent(&clip(&log, 40))
        )];
    }
    let mut problems = check_step(ns, &mut agent, setup, case, &flags, "config A", 0);
    if !problems.is_empty() {
        return problems;
    }

    // Config B, committed as kubelet does while the agent runs.
    let before = agent.log().len();
    let seen = syncs(&agent.log());
    volume.update(&case.then);
    if let Err(why) = wait_log(&mut agent, RESYNC_TIMEOUT, "a sync of config B", |log| {
        syncs(log) > seen
    }) {
        return vec![why];
    }
    problems.extend(check_step(
        ns, &mut agent, setup, case, &flags, "config B", before,
    ));
    problems
}

/// After a step: the kernel is what the config asks for (`status`), and the next resyncs
/// write nothing (`nft monitor`, or iptables-legacy's counters) while a neighbour commits
/// to nf_tables between them, and log no rewrite, failure or rejection from `log_from` on.
fn check_step(
    ns: &Netns,
    agent: &mut AgentProcess,
    setup: Setup,
    case: &Case,
    flags: &[String],
    step: &str,
    log_from: usize,
) -> Vec<String> {
    let mut problems = Vec::new();
    // 1. The kernel is what the config asks for.
    let mut status_args = vec!["status".to_string()];
    status_args.extend(flags.iter().cloned());
    let status = AGENT
        .command(ns)
        .args(&status_args)
        .output()
        .expect("run status");
    if !status.status.success() {
        problems.push(format!(
            "{step}: `status` exited {:?}:\n{}{}",
            status.status.code(),
            indent(&clip(&String::from_utf8_lossy(&status.stdout), 30)),
            indent(&String::from_utf8_lossy(&status.stderr))
        ));
    }

    // 2. The next resyncs write nothing, though others commit between them.
    let before = if setup.uses_nft() {
        None
    } else {
        match plant_counters(ns, case.ipv6).and_then(|()| legacy_snapshot(ns, case.ipv6)) {
            Ok(snapshot) => Some(snapshot),
            Err(why) => {
                problems.push(why);
                return problems;
            }
        }
    };
    let monitor = if setup.uses_nft() {
        match Monitor::start(ns) {
            Ok(monitor) => Some(monitor),
            Err(why) => {
                problems.push(why);
                return problems;
            }
        }
    } else {
        None
    };
    let seen = syncs(&agent.log());
    for resync in 1..=RESYNCS {
        ns.output(&[
            "nft",
            &format!("add table inet {NEIGHBOUR}; delete table inet {NEIGHBOUR}"),
        ]);
        if let Err(why) = wait_log(agent, RESYNC_TIMEOUT, &format!("resync {resync}"), |log| {
            syncs(log) >= seen + resync
        }) {
            problems.push(format!("{step}: {why}"));
            return problems;
        }
    }
    if let Some(monitor) = monitor {
        match monitor.finish(ns) {
            Ok(events) if events.is_empty() => {}
            Ok(events) => problems.push(format!(
                "{step}: `nft monitor` saw the resyncs write:\n{}",
                indent(&clip(&events, 30))
            )),
            Err(why) => problems.push(why),
        }
    }
    if let Some(before) = before {
        match legacy_snapshot(ns, case.ipv6) {
            Ok(after) if after == before => {}
            Ok(after) => problems.push(format!(
                "{step}: iptables-legacy-save changed during the resyncs:\n{}",
                indent(&clip(&line_changes(&before, &after), 30))
            )),
            Err(why) => problems.push(why),
        }
    }

    // 3. ...and log no rewrite, failure or rejection, and at most the one apply.
    let log = agent.log();
    let log = log.get(log_from..).unwrap_or_default();
    let rewrites = count_lines(log, REWRITTEN);
    let applies = count_lines(log, APPLIED);
    let failures = count_lines(log, SYNC_FAILED);
    let rejections: usize = REJECTED.iter().map(|text| count_lines(log, text)).sum();
    if rewrites > 0 || applies > 1 || failures > 0 || rejections > 0 {
        problems.push(format!(
            "{step}: the agent logged {rewrites} rewrite(s), {applies} apply(s), {failures} failure(s) and {rejections} rejection(s) (want 0, at most 1, 0, 0):\n{}",
            indent(&notable_lines(log))
        ));
    }
    problems
}

/// Removes what the case's agent installed, so the next case starts from nothing.
fn reset(ns: &Netns, case: &Case) -> Result<(), String> {
    let chain = format!("--masq-chain={}", case.chain);
    let out = AGENT
        .command(ns)
        .args(["cleanup", &chain])
        .output()
        .expect("run cleanup");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip-masq-agent cleanup {chain}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn run(setup: Setup) {
    let seed = seeded::seed();
    let name = setup.test_name();
    let only = env_number("IMA_CASE").map(|i| i as usize);
    let count = env_number("IMA_CASES").map_or(DEFAULT_CASES, |n| n as usize);
    let indices: Vec<usize> = match only {
        Some(index) => vec![index],
        None => (0..count).collect(),
    };
    let reproduce = format!("IMA_SEED={seed} cargo test --test it convergence::{name}");
    eprintln!(
        "convergence {name}: seed {seed}, {} case(s); reproduce with: {reproduce}",
        indices.len()
    );

    let ns = Netns::new("conv");
    let mut volume = ConfigMapVolume::new("");
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut failed_cases = Vec::new();
    for &index in &indices {
        if started.elapsed() > BUDGET {
            failures.push(format!(
                "seed {seed}: stopped before case {index} after {:?} (budget {BUDGET:?}); reproduce with: {reproduce}",
                started.elapsed()
            ));
            break;
        }
        let case = Case::generate(seed, index);
        let case_started = Instant::now();
        let mut problems = check_case(&ns, &mut volume, setup, &case);
        if let Err(why) = reset(&ns, &case) {
            problems.push(why);
        }
        let verdict = if problems.is_empty() { "ok" } else { "FAILED" };
        eprintln!(
            "  case {index:>3} {verdict:<6} {:>5} ms  {}",
            case_started.elapsed().as_millis(),
            case.features
        );
        if !problems.is_empty() {
            failed_cases.push(index);
            let mut message = format!(
                "case {index} of seed {seed} on {name} failed ({})\n  reproduce: IMA_SEED={seed} IMA_CASE={index} cargo test --test it convergence::{name}\n  flags: {} {}\n  config A:\n{}  config B:\n{}",
                case.features,
                setup.flags().join(" "),
                case.flags.join(" "),
                indent(&clip(&case.config, 40)),
                indent(&clip(&case.then, 40)),
            );
            for problem in problems {
                let _ = write!(message, "  - {}", problem.replace('\n', "\n    "));
                message.push('\n');
            }
            failures.push(message);
        }
    }
    eprintln!(
        "convergence {name}: seed {seed}: {} of {} case(s) failed in {:?}",
        failed_cases.len(),
        indices.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} of {} case(s) on {name} failed (cases {failed_cases:?}); reproduce with: {reproduce}\n\n{}",
        failed_cases.len(),
        indices.len(),
        failures.join("\n")
    );
}

#[test]
fn generated_prefixes_are_network_aligned() {
    // Cheap and root-free: every generated CIDR parses back to the network it names.
    for index in 0..200 {
        let mut rng = Rng::for_case(7, index);
        for bits in [32, 128] {
            let lengths = Lengths {
                zero_percent: 10,
                host_percent: 20,
            };
            let prefix = random_prefix(&mut rng, bits, lengths);
            let sub = overlapping(&mut rng, prefix, lengths);
            for p in [prefix, sub] {
                let text = p.text();
                let (address, len) = text.split_once('/').expect("slash");
                let len: u32 = len.parse().expect("length");
                let value = if bits == 32 {
                    u128::from(u32::from(address.parse::<Ipv4Addr>().expect("v4")))
                } else {
                    u128::from(address.parse::<Ipv6Addr>().expect("v6"))
                };
                assert_eq!(Prefix::new(bits, value, len).network, value, "{text}");
            }
        }
    }
}
