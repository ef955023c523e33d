//! A recording stand-in for the firewall tools, for unit tests without root (modelled on
//! kubernetes-sigs/knftables' `Fake`). It keeps a small model of each iptables flavour's
//! nat table and of the nft tables, applies `iptables-restore --noflush` inputs to it the
//! way the kernel would (atomically, printing rules back as iptables-save does), models
//! the `inet` tables written and read over netlink (the nftables backend's batches, with
//! the kernel's refusals and its generation check: [`FakeNftTable`]), records every call,
//! and fails or times out on demand.
//!
//! The real tools stay covered by the namespace tests; this makes every sync, diff,
//! ownership, switch, clean-up and dry-run path reachable from `cargo test` too.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{
    ConntrackDeleteReport, ConntrackDumpFilter, ConntrackDumpReport, ConntrackEntry, ConntrackKey,
    Program, Runner, ToolError,
};

/// One tool run, as the backend asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// Program and arguments joined by spaces, e.g. `iptables-nft-save -t nat`.
    pub command: String,
    pub stdin: Option<String>,
}

impl Call {
    /// True for runs that change the kernel.
    pub fn writes(&self) -> bool {
        self.stdin.is_some()
    }
}

/// How a faulty tool behaves.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Exits 1 with this on stderr.
    Fails(&'static str),
    /// Hangs past its deadline.
    TimesOut,
    /// Is not there.
    Missing,
    /// Exits 0 after printing this.
    Prints(&'static str),
}

struct Injected {
    /// A substring of the command line that selects the runs this fault hits.
    matching: String,
    fault: Fault,
    /// How many more runs it hits; None: all of them.
    remaining: Option<u32>,
}

const BUILTIN_CHAINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

#[derive(Clone, Debug)]
struct Chain {
    name: String,
    builtin: bool,
    rules: Vec<String>,
}

/// One flavour and family's nat table, as the kernel holds it.
#[derive(Clone, Debug)]
struct NatTable {
    chains: Vec<Chain>,
}

impl Default for NatTable {
    fn default() -> Self {
        NatTable {
            chains: BUILTIN_CHAINS
                .iter()
                .map(|name| Chain {
                    name: name.to_string(),
                    builtin: true,
                    rules: Vec::new(),
                })
                .collect(),
        }
    }
}

/// A rule as the kernel gives it back: iptables-save drops `-d 0.0.0.0/0` and `-d ::/0`
/// and prints a probability as the stored `round(p * 2^31)` over 2^31 with 11 decimals.
fn as_kernel_prints(spec: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut words = spec.split(' ').peekable();
    while let Some(word) = words.next() {
        match (word, words.peek()) {
            ("-d", Some(&"0.0.0.0/0" | &"::/0")) => {
                words.next();
            }
            ("--probability", Some(value)) => {
                let p: f64 = value.parse().unwrap_or(0.0);
                let stored = (p * 2_147_483_648.0).round();
                out.push(word.to_string());
                out.push(format!("{:.11}", stored / 2_147_483_648.0));
                words.next();
            }
            _ => out.push(word.to_string()),
        }
    }
    out.join(" ")
}

impl NatTable {
    fn chain_mut(&mut self, name: &str) -> Result<&mut Chain, String> {
        self.chains
            .iter_mut()
            .find(|c| c.name == name)
            .ok_or_else(|| format!("chain {name} does not exist"))
    }

    fn referenced(&self, name: &str) -> bool {
        let jump = format!("-j {name}");
        self.chains.iter().any(|c| {
            c.rules
                .iter()
                .any(|r| r.ends_with(&jump) || r.contains(&format!("{jump} ")))
        })
    }

    fn apply_line(&mut self, line: &str) -> Result<(), String> {
        if let Some(declaration) = line.strip_prefix(':') {
            let name = declaration.split(' ').next().unwrap_or_default();
            match self.chains.iter_mut().find(|c| c.name == name) {
                Some(chain) if chain.builtin => {}
                // `:CHAIN - [0:0]` in a --noflush restore flushes just that chain.
                Some(chain) => chain.rules.clear(),
                None => self.chains.push(Chain {
                    name: name.to_string(),
                    builtin: false,
                    rules: Vec::new(),
                }),
            }
            return Ok(());
        }
        let (op, rest) = line.split_once(' ').unwrap_or((line, ""));
        let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
        match op {
            "-A" => {
                let target = spec.rsplit_once(" -j ").map(|(_, t)| t.split(' ').next());
                if let Some(Some(target)) = target
                    && target.chars().all(|c| c.is_ascii_uppercase() || c == '-')
                    && !["RETURN", "MASQUERADE", "ACCEPT", "DROP", "SNAT"].contains(&target)
                    && !self.chains.iter().any(|c| c.name == target)
                {
                    return Err(format!("Couldn't load target `{target}'"));
                }
                let printed = as_kernel_prints(spec);
                self.chain_mut(chain)?.rules.push(printed);
            }
            // Neighbours insert at the top (Docker, Calico); the agent never does.
            "-I" => {
                let printed = as_kernel_prints(spec);
                self.chain_mut(chain)?.rules.insert(0, printed);
            }
            "-D" => {
                let printed = as_kernel_prints(spec);
                let rules = &mut self.chain_mut(chain)?.rules;
                let at = rules
                    .iter()
                    .position(|r| *r == printed)
                    .ok_or_else(|| format!("-D {chain}: no such rule"))?;
                rules.remove(at);
            }
            "-F" => self.chain_mut(chain)?.rules.clear(),
            "-X" => {
                let found = self.chain_mut(chain)?;
                if found.builtin || !found.rules.is_empty() {
                    return Err(format!("-X {chain}: Directory not empty"));
                }
                if self.referenced(chain) {
                    return Err(format!("-X {chain}: Too many links"));
                }
                self.chains.retain(|c| c.name != chain);
            }
            other => return Err(format!("unsupported line {other}")),
        }
        Ok(())
    }

    /// `iptables-restore --noflush`: all lines or none.
    fn restore(&mut self, input: &str) -> Result<(), String> {
        let mut next = self.clone();
        let mut in_nat = false;
        for (number, line) in input.lines().enumerate() {
            match line {
                "*nat" => in_nat = true,
                "COMMIT" => in_nat = false,
                "" => {}
                _ if line.starts_with('#') => {}
                _ if in_nat => next
                    .apply_line(line)
                    .map_err(|e| format!("line {}: {e}", number + 1))?,
                _ => return Err(format!("line {}: outside *nat", number + 1)),
            }
        }
        *self = next;
        Ok(())
    }

    fn save(&self) -> String {
        let mut out = String::from("*nat\n");
        for chain in &self.chains {
            let policy = if chain.builtin { "ACCEPT" } else { "-" };
            out.push_str(&format!(":{} {policy} [0:0]\n", chain.name));
        }
        for chain in &self.chains {
            for rule in &chain.rules {
                out.push_str(&format!("-A {} {rule}\n", chain.name));
            }
        }
        out.push_str("COMMIT\n");
        out
    }
}

/// A change to an `inet` table (by name) that another process commits.
type Racing = (String, Box<dyn FnOnce(&mut FakeNftTable) + Send>);

#[derive(Default)]
struct State {
    installed: BTreeSet<String>,
    /// Keyed by `iptables-nft`, `ip6tables-legacy`, ...
    nat: BTreeMap<String, NatTable>,
    /// Extra text printed for the mangle table (kubelet's hint chains).
    mangle: BTreeMap<String, String>,
    /// Keyed by `ip kube-proxy`, `inet foreign`, ...: the listing nft prints.
    nft_tables: BTreeMap<String, String>,
    /// The `inet` tables written and read over netlink, by name (the agent's).
    netlink_tables: BTreeMap<String, FakeNftTable>,
    /// Another process's change, committed just before the next netlink batch arrives.
    racing: Option<Racing>,
    /// Batches still to come that each meet a commit of someone else's first.
    raced_batches: u32,
    calls: Vec<Call>,
    faults: Vec<Injected>,
    /// What `iptables-restore --version` prints (None: a current release).
    iptables_version: Option<String>,
    /// The conntrack table, both families, in dump order; a deleted entry leaves a hole,
    /// so a dump under way goes on where it was, as the kernel's does.
    conntrack: Vec<Option<ConntrackEntry>>,
    /// Entries made up one at a time as a dump reaches them instead of stored: how
    /// many, and the maker (for tests of a table far larger than anything held).
    conntrack_generated: Option<(u64, MakeEntry)>,
    /// Whether dumps leave out what the filter names, as kernel 6.x does (true), or
    /// send everything, as an older kernel does.
    conntrack_kernel_filters: bool,
    conntrack_stats: ConntrackStats,
    /// The `local` routes, by family; None: loopback only.
    local_prefixes: Vec<(crate::policy::Family, Vec<ipnet::IpNet>)>,
    /// The namespace's interface names.
    interfaces: Vec<String>,
    /// The routing table: destination prefix -> interface.
    routes: Vec<(ipnet::IpNet, String)>,
    /// The nf_tables generation: bumped by every write to an nft-based table.
    generation: u64,
    /// Chains of an iptables-nft table (by key) holding native nft rules iptables cannot
    /// list: while any exists, `-save` prints only "incompatible", and `-S` of such a
    /// chain (or of a missing one) fails as iptables-nft 1.8.9 does.
    incompatible: BTreeMap<String, BTreeSet<String>>,
    /// How often the agent lock was taken.
    locks_taken: u64,
}

/// Makes entry `i` of a generated conntrack table.
type MakeEntry = fn(u64) -> ConntrackEntry;

/// What the fake conntrack table saw: how it was read and written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    pub dumps: u64,
    /// Entries fed to dumps so far.
    pub fed: u64,
    pub delete_calls: u64,
    pub deleted: u64,
    /// The most keys one delete call carried.
    pub largest_delete: usize,
    /// Entries the dump under way had fed when the first delete arrived; None when no
    /// delete came during a dump.
    pub fed_at_first_delete: Option<u64>,
    dumping: bool,
}

/// A `conntrack -L` line (plain or `-o extended`, `zone=`, `id=` and `[DNAT]`-style
/// flags honoured) as the entry the kernel would dump; None for other lines.
pub fn parse_conntrack_line(line: &str, index: u32) -> Option<ConntrackEntry> {
    use super::netlink::conntrack::{IPS_DST_NAT, IPS_SRC_NAT, Tuple};
    let mut words = line.split_whitespace();
    // `udp 17 ...`, or `ipv4 2 udp 17 ...`: the protocol's number follows its name.
    if matches!(words.next()?, "ipv4" | "ipv6") {
        words.next()?;
        words.next()?;
    }
    let protocol: u8 = words.next()?.parse().ok()?;
    let (mut addresses, mut ports) = (Vec::new(), Vec::new());
    let (mut zone, mut id) = (0u16, index + 1);
    for word in words {
        match word.split_once('=') {
            Some(("src" | "dst", value)) => addresses.push(value.parse().ok()?),
            Some(("sport" | "dport", value)) => ports.push(value.parse::<u16>().ok()?),
            Some(("zone", value)) => zone = value.parse().ok()?,
            Some(("id", value)) => id = value.parse().ok()?,
            _ => {}
        }
    }
    if addresses.len() < 4 {
        return None;
    }
    let port = |i: usize| ports.get(i).copied().unwrap_or(0);
    let original = Tuple {
        source: addresses[0],
        destination: addresses[1],
        source_port: port(0),
        destination_port: port(1),
    };
    let reply = Tuple {
        source: addresses[2],
        destination: addresses[3],
        source_port: port(2),
        destination_port: port(3),
    };
    let mut status = 0;
    if reply.destination != original.source || reply.destination_port != original.source_port {
        status |= IPS_SRC_NAT;
    }
    if reply.source != original.destination || reply.source_port != original.destination_port {
        status |= IPS_DST_NAT;
    }
    Some(ConntrackEntry {
        protocol,
        original,
        reply,
        zone,
        status,
        id,
    })
}

/// The fake tools. Every flavour's tools and nft are installed unless removed.
pub struct FakeRunner {
    state: Mutex<State>,
}

pub const INSTALLED: [&str; 14] = [
    "iptables-nft",
    "ip6tables-nft",
    "iptables-legacy",
    "ip6tables-legacy",
    "iptables-nft-save",
    "iptables-nft-restore",
    "ip6tables-nft-save",
    "ip6tables-nft-restore",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-legacy-save",
    "ip6tables-legacy-restore",
    "nft",
    "conntrack",
];

/// How the fake names its netlink requests in the calls it records.
pub const NETLINK: &str = "netlink nf_tables";

impl FakeRunner {
    pub fn new() -> Arc<FakeRunner> {
        let state = State {
            installed: INSTALLED.iter().map(|s| s.to_string()).collect(),
            conntrack_kernel_filters: true,
            ..State::default()
        };
        Arc::new(FakeRunner {
            state: Mutex::new(state),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn uninstall(&self, name: &str) {
        self.state().installed.remove(name);
    }

    /// What `KEY-save -t nat` prints, e.g. key `iptables-nft`.
    pub fn nat(&self, key: &str) -> String {
        self.state().nat.entry(key.to_string()).or_default().save()
    }

    /// Applies a restore input to `key`'s nat table, as a neighbour would.
    pub fn restore_nat(&self, key: &str, input: &str) {
        let mut state = self.state();
        state.generation += 1;
        let table = state.nat.entry(key.to_string()).or_default();
        if let Err(err) = table.restore(input) {
            panic!("fake {key}-restore refused the test's input: {err}");
        }
    }

    /// Makes `chain` of `key`'s table (e.g. `iptables-nft`) hold a rule only nft can
    /// show, creating the chain if needed, as `nft add rule ip nat CHAIN ...` would.
    pub fn add_native_rule(&self, key: &str, chain: &str) {
        let mut state = self.state();
        state.generation += 1;
        state
            .incompatible
            .entry(key.to_string())
            .or_default()
            .insert(chain.to_string());
    }

    /// How often a backend took the agent lock.
    pub fn locks_taken(&self) -> u64 {
        self.state().locks_taken
    }

    /// Adds the entries of a `conntrack -L` listing to the conntrack table (`family`,
    /// `ipv4` or `ipv6`, is only a reminder: the addresses say it).
    pub fn set_conntrack(&self, _family: &str, listing: &str) {
        let mut state = self.state();
        for line in listing.lines() {
            let index = u32::try_from(state.conntrack.len()).unwrap_or(u32::MAX);
            if let Some(entry) = parse_conntrack_line(line, index) {
                state.conntrack.push(Some(entry));
            }
        }
    }

    /// Adds entries to the conntrack table.
    pub fn add_conntrack(&self, entries: &[ConntrackEntry]) {
        self.state()
            .conntrack
            .extend(entries.iter().copied().map(Some));
    }

    /// Ends every flow: the conntrack table is empty again.
    pub fn clear_conntrack(&self) {
        self.state().conntrack.clear();
    }

    /// The entries of the conntrack table now.
    pub fn conntrack_entries(&self) -> Vec<ConntrackEntry> {
        self.state().conntrack.iter().flatten().copied().collect()
    }

    /// Makes dumps feed `count` entries made by `make(i)` one at a time, none stored.
    pub fn generate_conntrack(&self, count: u64, make: MakeEntry) {
        self.state().conntrack_generated = Some((count, make));
    }

    /// Dumps ignore their filter, as a kernel before 5.x does.
    pub fn without_kernel_conntrack_filters(&self) {
        self.state().conntrack_kernel_filters = false;
    }

    pub fn conntrack_stats(&self) -> ConntrackStats {
        self.state().conntrack_stats
    }

    /// The `local` routes of `family` (the default: loopback only).
    /// Routes `prefix` out of `interface` (the longest matching prefix wins).
    pub fn add_route(&self, prefix: &str, interface: &str) {
        let prefix = prefix.parse().expect("a prefix");
        self.state().routes.push((prefix, interface.to_string()));
    }

    /// The namespace's interfaces.
    pub fn set_interfaces(&self, names: &[&str]) {
        self.state().interfaces = names.iter().map(|n| n.to_string()).collect();
    }

    pub fn set_local_prefixes(&self, family: crate::policy::Family, prefixes: &[&str]) {
        let parsed = prefixes
            .iter()
            .map(|p| p.parse().expect("a prefix"))
            .collect();
        let mut state = self.state();
        state.local_prefixes.retain(|(f, _)| *f != family);
        state.local_prefixes.push((family, parsed));
    }

    /// A change someone else made to nf_tables (the generation moves on).
    pub fn bump_generation(&self) {
        self.state().generation += 1;
    }

    pub fn set_iptables_version(&self, version: &str) {
        self.state().iptables_version = Some(version.to_string());
    }

    pub fn set_mangle(&self, key: &str, text: &str) {
        self.state()
            .mangle
            .insert(key.to_string(), text.to_string());
    }

    /// Adds a table (e.g. `ip kube-proxy`) with the listing nft prints for it; an `inet`
    /// table is also there, empty, for netlink.
    pub fn add_nft_table(&self, name: &str, listing: &str) {
        let mut state = self.state();
        state
            .nft_tables
            .insert(name.to_string(), listing.to_string());
        if let Some(inet) = name.strip_prefix("inet ") {
            state
                .netlink_tables
                .insert(inet.to_string(), FakeNftTable::default());
        }
        state.generation += 1;
    }

    /// What `nft list table NAME` prints (`inet ip-masq-agent`, ...).
    pub fn nft_table(&self, name: &str) -> Option<String> {
        let state = self.state();
        if let Some(listing) = state.nft_tables.get(name) {
            return Some(listing.clone());
        }
        let inet = name.strip_prefix("inet ")?;
        state
            .netlink_tables
            .get(inet)
            .map(|table| table.listing(inet, true))
    }

    /// The `inet` table `name` as the fake kernel holds it.
    pub fn netlink_table(&self, name: &str) -> Option<FakeNftTable> {
        self.state().netlink_tables.get(name).cloned()
    }

    /// Changes the `inet` table `name` as another process would (the generation moves).
    pub fn edit_netlink_table(&self, name: &str, edit: impl FnOnce(&mut FakeNftTable)) {
        let mut state = self.state();
        let table = state.netlink_tables.entry(name.to_string()).or_default();
        edit(table);
        state.generation += 1;
    }

    /// Lets another process commit `edit` to the `inet` table `name` right before the
    /// next netlink batch, after whatever was read to compute it: that batch must be
    /// refused as computed from a generation that is gone.
    pub fn race_next_commit(
        &self,
        name: &str,
        edit: impl FnOnce(&mut FakeNftTable) + Send + 'static,
    ) {
        self.state().racing = Some((name.to_string(), Box::new(edit)));
    }

    /// Makes each of the next `batches` netlink batches meet a commit of someone else's
    /// (elsewhere in nf_tables) made after the read it was computed from.
    pub fn race_commits(&self, batches: u32) {
        self.state().raced_batches = batches;
    }

    /// Deletes the `inet` table `name` as another process would.
    pub fn delete_netlink_table(&self, name: &str) {
        let mut state = self.state();
        state.netlink_tables.remove(name);
        state.nft_tables.remove(&format!("inet {name}"));
        state.generation += 1;
    }

    /// Makes runs whose command line contains `matching` misbehave, `times` times (None:
    /// until cleared).
    pub fn inject(&self, matching: &str, fault: Fault, times: Option<u32>) {
        self.state().faults.push(Injected {
            matching: matching.to_string(),
            fault,
            remaining: times,
        });
    }

    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The calls so far, forgetting them.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state().calls)
    }

    /// What a `Fault::Prints` injected for `command` prints, counting the run.
    fn printed(state: &mut State, command: &str) -> Option<&'static str> {
        let injected = state.faults.iter_mut().find(|f| {
            matches!(f.fault, Fault::Prints(_))
                && command.contains(&f.matching)
                && f.remaining.is_none_or(|left| left > 0)
        })?;
        if let Some(left) = injected.remaining.as_mut() {
            *left -= 1;
        }
        match injected.fault {
            Fault::Prints(text) => Some(text),
            _ => None,
        }
    }

    fn injected(state: &mut State, command: &str) -> Option<ToolError> {
        let at = state.faults.iter().position(|f| {
            command.contains(&f.matching) && f.remaining.is_none_or(|left| left > 0)
        })?;
        let injected = &mut state.faults[at];
        if let Some(left) = injected.remaining.as_mut() {
            *left -= 1;
        }
        let command = command.to_string();
        Some(match injected.fault {
            Fault::Fails(stderr) => ToolError::Failed {
                command,
                status: ExitStatus::from_raw(1 << 8),
                stderr: stderr.to_string(),
            },
            Fault::TimesOut => ToolError::TimedOut {
                command,
                after: Duration::from_secs(30),
            },
            Fault::Missing => ToolError::Missing {
                command,
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            },
            Fault::Prints(_) => return None,
        })
    }

    fn iptables(
        state: &mut State,
        key: &str,
        tool: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, String> {
        let mangle = state.mangle.get(key).cloned().unwrap_or_default();
        let version = state
            .iptables_version
            .clone()
            .unwrap_or_else(|| "iptables-restore v1.8.9 (nf_tables)\n".into());
        let release = version
            .split_whitespace()
            .find(|word| word.starts_with('v'))
            .unwrap_or("v1.8.9")
            .to_string();
        let header = format!("# Generated by {key}-save {release} on Wed Dec  2 03:00:00 2026\n");
        let native = state.incompatible.get(key).cloned().unwrap_or_default();
        let table = state.nat.entry(key.to_string()).or_default();
        match (tool, args) {
            ("save", ["-t", "nat"]) if !native.is_empty() => {
                Ok("# Table `nat' is incompatible, use 'nft' tool.\n".to_string())
            }
            ("list", ["-t", "nat", "-S", chain]) => {
                let found = table.chains.iter().find(|c| c.name == *chain);
                match found {
                    Some(found) if !native.contains(*chain) => {
                        let mut out = if found.builtin {
                            format!("-P {chain} ACCEPT\n")
                        } else {
                            format!("-N {chain}\n")
                        };
                        for rule in &found.rules {
                            out.push_str(&format!("-A {chain} {rule}\n"));
                        }
                        Ok(out)
                    }
                    _ if native.is_empty() => {
                        Err("iptables: No chain/target/match by that name.".to_string())
                    }
                    _ => Err(format!(
                        "iptables v1.8.9 (nf_tables): chain `{chain}' in table `nat' is incompatible, use 'nft' tool."
                    )),
                }
            }
            ("save", ["-t", "nat"]) => Ok(format!("{header}{}", table.save())),
            ("save", ["-t", "mangle"]) => Ok(mangle),
            ("save", []) => Ok(format!("{mangle}{}", table.save())),
            ("restore", ["--version"]) => Ok(version),
            ("restore", [.., "--noflush"]) => table
                .restore(stdin.unwrap_or_default())
                .map(|()| String::new()),
            _ => Err(format!("the fake does not know {tool} {args:?}")),
        }
    }

    fn nft(state: &mut State, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        match args {
            ["list", "tables"] => {
                let mut names: BTreeSet<String> = state.nft_tables.keys().cloned().collect();
                names.extend(state.netlink_tables.keys().map(|n| format!("inet {n}")));
                Ok(names.iter().map(|name| format!("table {name}\n")).collect())
            }
            ["list", "table", "ip" | "ip6", "nat"] => Ok(String::new()),
            // iptables-nft's nat tables show as `table ip nat`, then every other table.
            ["-t", "list", "ruleset"] => {
                let mut out = String::new();
                for (key, table) in [("iptables-nft", "ip nat"), ("ip6tables-nft", "ip6 nat")] {
                    if state.nat.contains_key(key) {
                        out.push_str(&format!("table {table} {{\n}}\n"));
                    }
                }
                for listing in state.nft_tables.values() {
                    out.push_str(listing);
                }
                for (name, table) in &state.netlink_tables {
                    if !state.nft_tables.contains_key(&format!("inet {name}")) {
                        out.push_str(&table.listing(name, false));
                    }
                }
                Ok(out)
            }
            ["-t", "list", "chain", family, table, chain] => {
                let found = listed_chains(state.nft_tables.values())
                    .into_iter()
                    .find(|c| c.family == *family && c.table == *table && c.name == *chain)
                    .ok_or_else(|| "Error: No such file or directory".to_string())?;
                Ok(format!("table {family} {table} {{\n{}}}\n", found.block))
            }
            ["list", "table", "inet", name]
                if state.netlink_tables.contains_key(*name)
                    && !state.nft_tables.contains_key(&format!("inet {name}")) =>
            {
                Ok(state.netlink_tables[*name].listing(name, true))
            }
            ["list", "table", family, name] => state
                .nft_tables
                .get(&format!("{family} {name}"))
                .cloned()
                .ok_or_else(|| "Error: No such file or directory".to_string()),
            // Only deletions of a whole `inet` table: the agent writes through netlink.
            ["-f", "-"] => {
                let input = stdin.unwrap_or_default();
                let Some(name) = input
                    .lines()
                    .find_map(|line| line.strip_prefix("delete table inet "))
                else {
                    return Err(format!("the fake cannot apply:\n{input}"));
                };
                state.netlink_tables.remove(name.trim());
                state.nft_tables.remove(&format!("inet {}", name.trim()));
                Ok(String::new())
            }
            _ => Err(format!("the fake does not know nft {args:?}")),
        }
    }
}

/// One chain of the fake's nft listings: family, table, name, its lines from `chain
/// NAME {` to its `}`, and its hook when it is a nat base chain on postrouting.
struct ListedChain {
    family: String,
    table: String,
    name: String,
    block: String,
    nat_postrouting: Option<i32>,
}

/// The chains of nft listings (`table FAMILY NAME {` blocks holding `chain NAME {`).
fn listed_chains<'a>(listings: impl Iterator<Item = &'a String>) -> Vec<ListedChain> {
    let mut chains = Vec::new();
    for listing in listings {
        let mut table: Option<(String, String)> = None;
        let mut current: Option<ListedChain> = None;
        let mut depth = 0i64;
        for line in listing.lines() {
            let trimmed = line.trim();
            if depth == 0
                && let Some(rest) = trimmed
                    .strip_prefix("table ")
                    .and_then(|r| r.strip_suffix(" {"))
                && let Some((family, name)) = rest.split_once(' ')
            {
                table = Some((family.to_string(), name.to_string()));
            }
            if depth == 1
                && let Some(name) = trimmed
                    .strip_prefix("chain ")
                    .and_then(|r| r.strip_suffix(" {"))
                && let Some((family, table)) = &table
            {
                current = Some(ListedChain {
                    family: family.clone(),
                    table: table.clone(),
                    name: name.to_string(),
                    block: String::new(),
                    nat_postrouting: None,
                });
            }
            depth += line.matches('{').count() as i64 - line.matches('}').count() as i64;
            if let Some(chain) = current.as_mut() {
                chain.block.push_str(line);
                chain.block.push('\n');
                if let Some(rest) = trimmed.strip_prefix("type nat hook postrouting priority ") {
                    chain.nat_postrouting = rest.split(';').next().and_then(fake_priority);
                }
                if depth <= 1 {
                    chains.extend(current.take());
                }
            }
        }
    }
    chains
}

/// `srcnat`, `srcnat + 10`, `security`, `100`, as the fake's listings write them.
fn fake_priority(text: &str) -> Option<i32> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let base = match *words.first()? {
        "srcnat" => 100,
        "dstnat" => -100,
        "security" => 50,
        "filter" => 0,
        "mangle" => -150,
        "raw" => -300,
        number => number.parse().ok()?,
    };
    match words.as_slice() {
        [_] => Some(base),
        [_, "+", n] => Some(base + n.parse::<i32>().ok()?),
        [_, "-", n] => Some(base - n.parse::<i32>().ok()?),
        _ => None,
    }
}

impl Runner for FakeRunner {
    fn run(
        &self,
        program: &Program,
        args: &[&str],
        stdin: Option<&[u8]>,
        _lock_wait: Option<Duration>,
    ) -> Result<String, ToolError> {
        let command = program.display(args);
        let stdin = stdin.map(|bytes| String::from_utf8_lossy(bytes).into_owned());
        let mut state = self.state();
        state.calls.push(Call {
            command: command.clone(),
            stdin: stdin.clone(),
        });
        if let Some(printed) = Self::printed(&mut state, &command) {
            return Ok(printed.to_string());
        }
        if let Some(error) = Self::injected(&mut state, &command) {
            return Err(error);
        }
        let mut words: Vec<&str> = program.leading_args.iter().map(String::as_str).collect();
        words.extend_from_slice(args);
        let result = match program.path.rsplit_once('-') {
            _ if program.path == "nft" => Self::nft(&mut state, &words, stdin.as_deref()),
            Some((key, tool @ ("save" | "restore"))) => {
                Self::iptables(&mut state, key, tool, &words, stdin.as_deref())
            }
            Some((_, "nft" | "legacy")) => {
                let key = program.path.clone();
                Self::iptables(&mut state, &key, "list", &words, stdin.as_deref())
            }
            _ => Err(format!("the fake has no {}", program.path)),
        };
        let nft_based = program.path == "nft" || program.path.contains("-nft-");
        if result.is_ok() && stdin.is_some() && nft_based {
            state.generation += 1;
        }
        result.map_err(|stderr| ToolError::Failed {
            command,
            status: ExitStatus::from_raw(1 << 8),
            stderr,
        })
    }

    fn exists(&self, name: &str) -> bool {
        self.state().installed.contains(name)
    }

    /// Tool runs only: a netlink request starts no process.
    fn spawned(&self) -> u64 {
        self.state()
            .calls
            .iter()
            .filter(|c| !c.command.starts_with(NETLINK))
            .count() as u64
    }

    fn ruleset_generation(&self) -> Option<u64> {
        Some(self.state().generation)
    }

    /// Compares the fake kernel's table with `want` as a read over netlink would.
    fn nft_observe(
        &self,
        want: &super::nf_tables::Table,
    ) -> Result<super::nf_tables::Observed, ToolError> {
        let mut state = self.state();
        let command = format!("{NETLINK} read inet {}", want.name);
        state.calls.push(Call {
            command: command.clone(),
            stdin: None,
        });
        if let Some(error) = Self::injected(&mut state, &command) {
            return Err(error);
        }
        let generation = u32::try_from(state.generation).unwrap_or(u32::MAX);
        Ok(super::nf_tables::Observed {
            generation,
            table: state
                .netlink_tables
                .get(&want.name)
                .map(|table| table.compare(want)),
        })
    }

    /// Applies the batch to a copy of the fake kernel's table and keeps the copy only if
    /// every operation succeeded, as the kernel's transaction does; refuses the batch if
    /// the generation moved since the one it carries.
    fn nft_commit(
        &self,
        batch: &super::nf_tables::Batch,
    ) -> Result<super::nf_tables::Commit, ToolError> {
        let mut state = self.state();
        let command = format!("{NETLINK} batch inet {}", batch.table);
        state.calls.push(Call {
            command: command.clone(),
            stdin: Some(describe_batch(batch)),
        });
        if let Some(error) = Self::injected(&mut state, &command) {
            return Err(error);
        }
        if let Some((name, edit)) = state.racing.take() {
            edit(state.netlink_tables.entry(name).or_default());
            state.generation += 1;
        }
        if state.raced_batches > 0 {
            state.raced_batches -= 1;
            state.generation += 1;
        }
        if batch
            .generation
            .is_some_and(|g| u64::from(g) != state.generation)
        {
            return Ok(super::nf_tables::Commit::GenerationMoved);
        }
        let mut table = state.netlink_tables.get(&batch.table).cloned();
        for op in &batch.ops {
            FakeNftTable::apply(&mut table, op).map_err(|message| ToolError::Kernel {
                what: command.clone(),
                message,
            })?;
        }
        // A listing a test gave for the table no longer describes it.
        state.nft_tables.remove(&format!("inet {}", batch.table));
        match table {
            Some(table) => state.netlink_tables.insert(batch.table.clone(), table),
            None => state.netlink_tables.remove(&batch.table),
        };
        if !batch.ops.is_empty() {
            state.generation += 1;
        }
        Ok(super::nf_tables::Commit::Done)
    }

    /// A legacy table exists once something was restored into it or its mangle table
    /// was given text.
    fn lock_agents(
        &self,
        _within: Duration,
    ) -> Result<super::lock::AgentLock, super::lock::LockError> {
        self.state().locks_taken += 1;
        Ok(super::lock::AgentLock::none())
    }

    fn nft_has_chain_prefixed(
        &self,
        family: crate::policy::Family,
        table: &str,
        prefixes: &[&str],
    ) -> Result<bool, ToolError> {
        let key = match family {
            crate::policy::Family::V4 => "iptables-nft",
            crate::policy::Family::V6 => "ip6tables-nft",
        };
        let mut state = self.state();
        let command = format!("{NETLINK} dump chains {key} {table}");
        state.calls.push(Call {
            command: command.clone(),
            stdin: None,
        });
        if let Some(error) = Self::injected(&mut state, &command) {
            return Err(error);
        }
        // The fake keeps kubelet's mangle chains as save text.
        let text = match table {
            "mangle" => state.mangle.get(key).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        Ok(text.lines().any(|line| {
            line.strip_prefix(':')
                .is_some_and(|name| prefixes.iter().any(|p| name.starts_with(p)))
        }))
    }

    fn nft_nat_postrouting_chains(
        &self,
    ) -> Result<Vec<super::netlink::lookup::NatPostroutingChain>, ToolError> {
        let mut state = self.state();
        let command = format!("{NETLINK} dump chains");
        state.calls.push(Call {
            command: command.clone(),
            stdin: None,
        });
        if let Some(error) = Self::injected(&mut state, &command) {
            return Err(error);
        }
        Ok(listed_chains(state.nft_tables.values())
            .into_iter()
            .filter_map(|chain| {
                let family = match chain.family.as_str() {
                    "ip" => "ip",
                    "ip6" => "ip6",
                    "inet" => "inet",
                    _ => return None,
                };
                Some(super::netlink::lookup::NatPostroutingChain {
                    family,
                    table: chain.table,
                    chain: chain.name,
                    priority: chain.nat_postrouting?,
                })
            })
            .collect())
    }

    fn nft_table_exists(
        &self,
        family: crate::policy::Family,
        table: &str,
    ) -> Result<bool, ToolError> {
        let key = match (family, table) {
            (crate::policy::Family::V4, "nat") => "iptables-nft",
            (crate::policy::Family::V6, "nat") => "ip6tables-nft",
            _ => return Ok(false),
        };
        let state = self.state();
        Ok(state.nat.contains_key(key) || state.incompatible.contains_key(key))
    }

    fn nft_chain_exists(
        &self,
        family: crate::policy::Family,
        table: &str,
        chain: &str,
    ) -> Result<bool, ToolError> {
        let key = match (family, table) {
            (crate::policy::Family::V4, "nat") => "iptables-nft",
            (crate::policy::Family::V6, "nat") => "ip6tables-nft",
            _ => return Ok(false),
        };
        let state = self.state();
        let native = state
            .incompatible
            .get(key)
            .is_some_and(|chains| chains.contains(chain));
        let listed = state
            .nat
            .get(key)
            .is_some_and(|nat| nat.chains.iter().any(|c| c.name == chain));
        Ok(native || listed)
    }

    fn legacy_tables(&self, family: crate::policy::Family) -> Vec<String> {
        let key = match family {
            crate::policy::Family::V4 => "iptables-legacy",
            crate::policy::Family::V6 => "ip6tables-legacy",
        };
        let state = self.state();
        let mut tables = Vec::new();
        if state.mangle.contains_key(key) {
            tables.push("mangle".to_string());
        }
        if state.nat.contains_key(key) {
            tables.push("nat".to_string());
        }
        tables
    }

    /// Feeds the table one entry at a time, the lock released between entries (so
    /// `visit` can delete, as on the kernel); generated entries are made as they are fed.
    fn conntrack_dump(
        &self,
        family: crate::policy::Family,
        filter: &ConntrackDumpFilter,
        visit: &mut dyn FnMut(&ConntrackEntry) -> std::ops::ControlFlow<()>,
    ) -> Result<ConntrackDumpReport, ToolError> {
        let command = format!("netlink conntrack dump {}", family.label());
        {
            let mut state = self.state();
            state.calls.push(Call {
                command: command.clone(),
                stdin: None,
            });
            if let Some(error) = Self::injected(&mut state, &command) {
                return Err(error);
            }
            state.conntrack_stats.dumps += 1;
            state.conntrack_stats.dumping = true;
        }
        let mut report = ConntrackDumpReport {
            requests: 1,
            kernel_filtered: true,
            ..ConntrackDumpReport::default()
        };
        let mut index = 0u64;
        loop {
            let next = {
                let mut state = self.state();
                let stored = state.conntrack.len() as u64;
                let generated = state.conntrack_generated.map_or(0, |(count, _)| count);
                if index >= stored + generated {
                    state.conntrack_stats.dumping = false;
                    break;
                }
                let entry = match usize::try_from(index).ok().filter(|i| (*i as u64) < stored) {
                    Some(at) => state.conntrack[at],
                    None => state
                        .conntrack_generated
                        .map(|(_, make)| make(index - stored)),
                };
                let kernel_filters = state.conntrack_kernel_filters;
                entry.filter(|e| {
                    crate::policy::Family::of_addr(e.original.source) == family
                        && !(kernel_filters
                            && (filter.zone.is_some_and(|zone| zone != e.zone)
                                || e.status & filter.without_status != 0))
                })
            };
            index += 1;
            let Some(entry) = next else { continue };
            report.entries += 1;
            self.state().conntrack_stats.fed += 1;
            if visit(&entry).is_break() {
                self.state().conntrack_stats.dumping = false;
                break;
            }
        }
        Ok(report)
    }

    /// Deletes the entries of exactly the keys' tuple, zone and id; a key that names
    /// none is counted as gone (ENOENT on the kernel).
    fn conntrack_delete(&self, keys: &[ConntrackKey]) -> Result<ConntrackDeleteReport, ToolError> {
        let mut state = self.state();
        let command = format!("netlink conntrack delete {}", keys.len());
        if let Some(error) = Self::injected(&mut state, &command) {
            return Err(error);
        }
        let generating = state.conntrack_generated.is_some();
        if !generating {
            // Recorded only for stored tables: a generated one stands for a table too
            // large to keep a record of.
            let listed = keys
                .iter()
                .map(|k| {
                    format!(
                        "{} {}:{} -> {}:{} zone {} id {}",
                        crate::conntrack::protocol_name(k.protocol),
                        k.original.source,
                        k.original.source_port,
                        k.original.destination,
                        k.original.destination_port,
                        k.zone,
                        k.id
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            state.calls.push(Call {
                command: command.clone(),
                stdin: Some(listed),
            });
        }
        let stats = &mut state.conntrack_stats;
        stats.delete_calls += 1;
        stats.largest_delete = stats.largest_delete.max(keys.len());
        if stats.dumping && stats.fed_at_first_delete.is_none() {
            stats.fed_at_first_delete = Some(stats.fed);
        }
        let mut report = ConntrackDeleteReport {
            datagrams: keys
                .len()
                .div_ceil(super::netlink::conntrack::DELETES_PER_DATAGRAM)
                as u64,
            ..ConntrackDeleteReport::default()
        };
        for key in keys {
            let found = state.conntrack.iter_mut().find(|slot| {
                slot.is_some_and(|e| {
                    e.protocol == key.protocol
                        && e.original == key.original
                        && e.zone == key.zone
                        && e.id == key.id
                })
            });
            match found {
                Some(slot) => {
                    *slot = None;
                    report.deleted += 1;
                }
                // Generated entries are all there until deleted (none is stored).
                None if generating => report.deleted += 1,
                None => report.gone += 1,
            }
        }
        state.conntrack_stats.deleted += report.deleted;
        Ok(report)
    }

    fn interface_names(&self) -> Vec<String> {
        self.state().interfaces.clone()
    }

    fn egress_interface(
        &self,
        destination: std::net::IpAddr,
        _source: Option<std::net::IpAddr>,
    ) -> Result<Option<String>, ToolError> {
        let state = self.state();
        Ok(state
            .routes
            .iter()
            .filter(|(prefix, _)| prefix.contains(&destination))
            .max_by_key(|(prefix, _)| prefix.prefix_len())
            .map(|(_, interface)| interface.clone()))
    }

    fn local_prefixes(
        &self,
        family: crate::policy::Family,
    ) -> Result<Vec<ipnet::IpNet>, ToolError> {
        let mut state = self.state();
        let command = format!("netlink local routes {}", family.label());
        if let Some(error) = Self::injected(&mut state, &command) {
            return Err(error);
        }
        let loopback = match family {
            crate::policy::Family::V4 => "127.0.0.0/8",
            crate::policy::Family::V6 => "::1/128",
        };
        Ok(state
            .local_prefixes
            .iter()
            .find(|(f, _)| *f == family)
            .map(|(_, prefixes)| prefixes.clone())
            .unwrap_or_else(|| vec![loopback.parse().expect("loopback")]))
    }
}

/// One line per operation of a batch, for the recorded call.
fn describe_batch(batch: &super::nf_tables::Batch) -> String {
    use super::nf_tables::Op;
    let list = |prefixes: &[ipnet::IpNet]| {
        prefixes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    batch
        .ops
        .iter()
        .map(|op| match op {
            Op::NewTable => "add table".to_string(),
            Op::DelTable => "delete table".to_string(),
            Op::FlushRules => "flush rules".to_string(),
            Op::NewChain(chain) => format!("add chain {}", chain.name),
            Op::DelChain(name) => format!("delete chain {name}"),
            Op::NewSet(set) => format!("add set {}", set.name),
            Op::DelSet(name) => format!("delete set {name}"),
            Op::FlushSet(name) => format!("flush set {name}"),
            Op::AddPrefixes { set, prefixes } => {
                format!("add element {set} {{ {} }}", list(prefixes))
            }
            Op::DelPrefixes { set, prefixes } => {
                format!("delete element {set} {{ {} }}", list(prefixes))
            }
            Op::DelElements { set, elements, .. } => {
                format!("delete {} single element(s) of {set}", elements.len())
            }
            Op::NewRule { chain, rule } => format!("add rule {chain} {}", rule.text),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// An `inet` table as the fake kernel holds it: sets as the interval boundaries the
/// kernel keeps, chains with their rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeNftTable {
    pub flags: u32,
    pub sets: Vec<FakeSet>,
    pub chains: Vec<super::nf_tables::Chain>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeSet {
    pub name: String,
    pub family: crate::policy::Family,
    /// `flags interval` unless a test declares it otherwise.
    pub flags: u32,
    pub elements: BTreeSet<super::nf_tables::Boundary>,
}

impl FakeSet {
    /// Removes a prefix's elements, as `nft delete element` would.
    pub fn remove_prefix(&mut self, prefix: &ipnet::IpNet) {
        for boundary in prefix_boundaries(prefix) {
            self.elements.remove(&boundary);
        }
    }

    /// The prefixes the elements stand for (each start with the next end after it).
    pub fn prefixes(&self) -> Vec<String> {
        use super::nf_tables::Boundary;
        let bits = self.family.bits();
        let top = if bits == 32 {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        let starts = self.elements.iter().filter(|b| !b.end);
        starts
            .map(|start| {
                let end = self
                    .elements
                    .range(
                        Boundary {
                            key: start.key + 1,
                            end: false,
                        }..,
                    )
                    .find(|b| b.end)
                    .map_or(top, |b| b.key - 1);
                // The interval's size less one (the whole IPv6 space does not fit a u128).
                let span = end - start.key;
                let host_bits = if span == u128::MAX {
                    128
                } else {
                    (span + 1).trailing_zeros()
                };
                let address = if bits == 32 {
                    std::net::IpAddr::from(std::net::Ipv4Addr::from(start.key as u32))
                } else {
                    std::net::IpAddr::from(std::net::Ipv6Addr::from(start.key))
                };
                ipnet::IpNet::new(address, (bits - host_bits.min(bits)) as u8)
                    .map_or_else(|_| format!("{address}-?"), |net| net.to_string())
            })
            .collect()
    }
}

fn prefix_boundaries(prefix: &ipnet::IpNet) -> Vec<super::nf_tables::Boundary> {
    use super::nf_tables::{Boundary, table::interval};
    let (start, after) = interval(prefix);
    let mut boundaries = vec![Boundary {
        key: start,
        end: false,
    }];
    if let Some(after) = after {
        boundaries.push(Boundary {
            key: after,
            end: true,
        });
    }
    boundaries
}

impl FakeNftTable {
    pub fn set_mut(&mut self, name: &str) -> Option<&mut FakeSet> {
        self.sets.iter_mut().find(|s| s.name == name)
    }

    pub fn chain_mut(&mut self, name: &str) -> Option<&mut super::nf_tables::Chain> {
        self.chains.iter_mut().find(|c| c.name == name)
    }

    /// What a read over netlink of this table against `want` finds.
    fn compare(&self, want: &super::nf_tables::Table) -> super::nf_tables::Found {
        use super::nf_tables::table::{Comparison, ELEMENT_INTERVAL_END, key_bytes};
        let mut comparison = Comparison::new(want, self.flags);
        for set in &self.sets {
            let key_type = match set.family {
                crate::policy::Family::V4 => super::nf_tables::expr::TYPE_IPADDR,
                crate::policy::Family::V6 => super::nf_tables::expr::TYPE_IP6ADDR,
            };
            let key_len = set.family.bits() / 8;
            if comparison.set(&set.name, set.flags, key_type, key_len)
                && let Some(mut check) = comparison.elements(&set.name)
            {
                // Highest first, as the kernel's tree dumps them.
                for boundary in set.elements.iter().rev() {
                    let flags = if boundary.end {
                        ELEMENT_INTERVAL_END
                    } else {
                        0
                    };
                    check.element(&key_bytes(boundary.key, set.family), flags);
                }
                comparison.elements_read(check);
            }
        }
        for chain in &self.chains {
            comparison.chain(&chain.name, chain.base.clone(), 0);
        }
        for chain in &self.chains {
            for rule in &chain.rules {
                comparison.rule(&chain.name, Some(&rule.exprs));
            }
        }
        comparison.finish()
    }

    /// What `nft list table inet NAME` prints (without elements for `-t`).
    fn listing(&self, name: &str, elements: bool) -> String {
        let mut out = format!("table inet {name} {{\n");
        if self.flags != 0 {
            out.push_str("\tflags dormant\n");
        }
        for set in &self.sets {
            let kind = match set.family {
                crate::policy::Family::V4 => "ipv4_addr",
                crate::policy::Family::V6 => "ipv6_addr",
            };
            out.push_str(&format!(
                "\tset {} {{\n\t\ttype {kind}\n\t\tflags interval\n",
                set.name
            ));
            let prefixes = set.prefixes();
            if elements && !prefixes.is_empty() {
                out.push_str(&format!("\t\telements = {{ {} }}\n", prefixes.join(", ")));
            }
            out.push_str("\t}\n");
        }
        for chain in &self.chains {
            out.push_str(&format!("\tchain {} {{\n", chain.name));
            if chain.base.is_some() {
                out.push_str(
                    "\t\ttype nat hook postrouting priority srcnat + 10; policy accept;\n",
                );
            }
            for rule in &chain.rules {
                out.push_str(&format!("\t\t{}\n", rule.text));
            }
            out.push_str("\t}\n");
        }
        out.push_str("}\n");
        out
    }

    /// One operation of a transaction, as the kernel would refuse or apply it.
    fn apply(table: &mut Option<FakeNftTable>, op: &super::nf_tables::Op) -> Result<(), String> {
        use super::nf_tables::expr::{Expr, Immediate, SetRef};
        use super::nf_tables::{Chain, Op};
        const ENOENT: &str = "No such file or directory";
        const EBUSY: &str = "Device or resource busy";
        const EEXIST: &str = "File exists";
        if let Op::NewTable = op {
            table.get_or_insert_with(FakeNftTable::default).flags = 0;
            return Ok(());
        }
        let Some(current) = table.as_mut() else {
            return Err(ENOENT.into());
        };
        let used = |current: &FakeNftTable, wanted: &dyn Fn(&Expr) -> bool| {
            current
                .chains
                .iter()
                .any(|c| c.rules.iter().any(|r| r.exprs.iter().any(wanted)))
        };
        match op {
            Op::NewTable => {}
            Op::DelTable => *table = None,
            Op::FlushRules => current.chains.iter_mut().for_each(|c| c.rules.clear()),
            Op::NewChain(chain) => match current.chains.iter().find(|c| c.name == chain.name) {
                Some(existing) if existing.base != chain.base => return Err(EBUSY.into()),
                Some(_) => {}
                None => current.chains.push(Chain {
                    rules: Vec::new(),
                    ..chain.clone()
                }),
            },
            Op::DelChain(name) => {
                let chain = current.chain_mut(name).ok_or(ENOENT)?;
                let jumped = |e: &Expr| matches!(e, Expr::Immediate { data: Immediate::Verdict { chain: Some(c), .. }, .. } if c == name);
                if !chain.rules.is_empty() || used(current, &jumped) {
                    return Err(EBUSY.into());
                }
                current.chains.retain(|c| c.name != *name);
            }
            Op::NewSet(set) => match current.sets.iter().find(|s| s.name == set.name) {
                Some(existing)
                    if existing.family != set.family
                        || existing.flags != super::nf_tables::table::SET_INTERVAL =>
                {
                    return Err(EEXIST.into());
                }
                Some(_) => {}
                None => current.sets.push(FakeSet {
                    name: set.name.clone(),
                    family: set.family,
                    flags: super::nf_tables::table::SET_INTERVAL,
                    elements: BTreeSet::new(),
                }),
            },
            Op::DelSet(name) => {
                current.set_mut(name).ok_or(ENOENT)?;
                let looked_up =
                    |e: &Expr| matches!(e, Expr::Lookup { set: SetRef::Named(s), .. } if s == name);
                if used(current, &looked_up) {
                    return Err(EBUSY.into());
                }
                current.sets.retain(|s| s.name != *name);
            }
            Op::FlushSet(name) => current.set_mut(name).ok_or(ENOENT)?.elements.clear(),
            Op::AddPrefixes { set, prefixes } => {
                let set = current.set_mut(set).ok_or(ENOENT)?;
                for prefix in prefixes {
                    set.elements.extend(prefix_boundaries(prefix));
                }
            }
            Op::DelPrefixes { set, prefixes } => {
                let set = current.set_mut(set).ok_or(ENOENT)?;
                for boundary in prefixes.iter().flat_map(prefix_boundaries) {
                    if !set.elements.remove(&boundary) {
                        return Err(ENOENT.into());
                    }
                }
            }
            Op::DelElements { set, elements, .. } => {
                let set = current.set_mut(set).ok_or(ENOENT)?;
                for boundary in elements {
                    if !set.elements.remove(boundary) {
                        return Err(ENOENT.into());
                    }
                }
            }
            Op::NewRule { chain, rule } => {
                for expr in &rule.exprs {
                    match expr {
                        Expr::Lookup {
                            set: SetRef::Named(name),
                            ..
                        } if current.sets.iter().all(|s| s.name != *name) => {
                            return Err(ENOENT.into());
                        }
                        Expr::Immediate {
                            data:
                                Immediate::Verdict {
                                    chain: Some(to), ..
                                },
                            ..
                        } if current.chains.iter().all(|c| c.name != *to) => {
                            return Err(ENOENT.into());
                        }
                        _ => {}
                    }
                }
                current
                    .chain_mut(chain)
                    .ok_or(ENOENT)?
                    .rules
                    .push(rule.clone());
            }
        }
        Ok(())
    }
}
