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

use super::{Program, Runner, ToolError};

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
    /// `conntrack -L -f FAMILY` output, by family (`ipv4`, `ipv6`).
    conntrack: BTreeMap<String, String>,
    /// The nf_tables generation: bumped by every write to an nft-based table.
    generation: u64,
}

/// The fake tools. Every flavour's tools and nft are installed unless removed.
pub struct FakeRunner {
    state: Mutex<State>,
}

pub const INSTALLED: [&str; 10] = [
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

    /// What `conntrack -L -f FAMILY` lists; `conntrack -D` removes matching lines.
    pub fn set_conntrack(&self, family: &str, listing: &str) {
        self.state()
            .conntrack
            .insert(family.to_string(), listing.to_string());
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
        let table = state.nat.entry(key.to_string()).or_default();
        let release = version
            .split_whitespace()
            .find(|word| word.starts_with('v'))
            .unwrap_or("v1.8.9")
            .to_string();
        let header = format!("# Generated by {key}-save {release} on Wed Dec  2 03:00:00 2026\n");
        match (tool, args) {
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

    fn conntrack(state: &mut State, args: &[&str]) -> Result<String, String> {
        match args {
            // A filtered listing answers like the whole one: the agent filters again.
            ["-L", "-f", family, ..] => {
                Ok(state.conntrack.get(*family).cloned().unwrap_or_default())
            }
            ["-D", "-f", family, rest @ ..] => {
                // The filter as the words it would show in a listing: `src=A dst=B ...`.
                let wanted: Vec<String> = rest
                    .chunks(2)
                    .filter_map(|pair| match pair {
                        ["-s", v] => Some(format!("src={v}")),
                        ["-d", v] => Some(format!("dst={v}")),
                        ["--sport", v] => Some(format!("sport={v}")),
                        ["--dport", v] => Some(format!("dport={v}")),
                        ["-p", v] => Some((*v).to_string()),
                        _ => None,
                    })
                    .collect();
                let listing = state.conntrack.entry(family.to_string()).or_default();
                let before = listing.lines().count();
                let kept: Vec<&str> = listing
                    .lines()
                    .filter(|line| {
                        let words: Vec<&str> = line.split_whitespace().collect();
                        !wanted.iter().all(|w| words.contains(&w.as_str()))
                    })
                    .collect();
                let deleted = before - kept.len();
                *listing = kept.iter().map(|l| format!("{l}\n")).collect();
                if deleted == 0 {
                    return Err(
                        "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted."
                            .into(),
                    );
                }
                Ok(String::new())
            }
            _ => Err(format!("the fake does not know conntrack {args:?}")),
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
        if let Some(error) = Self::injected(&mut state, &command) {
            return Err(error);
        }
        let mut words: Vec<&str> = program.leading_args.iter().map(String::as_str).collect();
        words.extend_from_slice(args);
        let result = match program.path.rsplit_once('-') {
            _ if program.path == "nft" => Self::nft(&mut state, &words, stdin.as_deref()),
            _ if program.path == "conntrack" => Self::conntrack(&mut state, &words),
            Some((key, tool @ ("save" | "restore"))) => {
                Self::iptables(&mut state, key, tool, &words, stdin.as_deref())
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
