//! Running firewall tools: the one seam through which backends spawn processes
//! ([`Runner`]), the real implementation ([`SystemRunner`]: spawns, feeds stdin, enforces
//! a deadline, and turns a failure into an error that carries the tool's own words), and
//! a recording fake for unit tests (`fake`, test builds only).
//!
//! Every child gets a deadline: a hung `iptables-save` (iptables-nft 1.8.3 is known to
//! loop) or `nft` must not stall the sync loop, and a SIGTERM must not wait for it.
//! Children run in their own process group, so a deadline or a stop kills the tool and
//! anything it started (a shell wrapper and its `sleep`, say) and every pipe closes.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crate::policy::Family;

#[cfg(test)]
pub mod fake;
pub mod lock;
pub mod netlink;
pub mod words;

pub use netlink::conntrack::{
    DeleteReport as ConntrackDeleteReport, DumpFilter as ConntrackDumpFilter,
    DumpReport as ConntrackDumpReport, Entry as ConntrackEntry, FlowKey as ConntrackKey,
};
pub use netlink::nftables as nf_tables;

static SPAWNED: AtomicU64 = AtomicU64::new(0);
/// The deadline for one tool run, in milliseconds (`--tool-timeout`).
static TOOL_TIMEOUT_MS: AtomicU64 = AtomicU64::new(DEFAULT_TOOL_TIMEOUT.as_millis() as u64);
/// Set on SIGTERM: running tools are killed and no new one starts until cleared.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// How long one tool may run before it is killed and the sync counts as failed.
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// What a tool that waits for the xtables lock gets beyond its wait: the wait itself
/// must never be cut short by our deadline.
const LOCK_WAIT_MARGIN: Duration = Duration::from_secs(2);
/// How often a waiting run looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(20);
/// After a kill, how long to wait for the pipes to close before giving up on them.
const REAP_GRACE: Duration = Duration::from_secs(1);

/// Processes started by this process so far (for sync reports and benchmarks).
pub fn spawned_processes() -> u64 {
    SPAWNED.load(Ordering::Relaxed)
}

pub fn set_tool_timeout(timeout: Duration) {
    let millis = u64::try_from(timeout.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    TOOL_TIMEOUT_MS.store(millis, Ordering::Relaxed);
}

pub fn tool_timeout() -> Duration {
    Duration::from_millis(TOOL_TIMEOUT_MS.load(Ordering::Relaxed))
}

/// Kills the running tool (if any) and refuses new ones: the process is exiting.
pub fn request_stop() {
    STOPPING.store(true, Ordering::SeqCst);
}

/// Lets tools run again after a stop, for the one deliberate step after it
/// (`--cleanup-on-exit`).
pub fn clear_stop() {
    STOPPING.store(false, Ordering::SeqCst);
}

fn stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

/// Spawns the firewall tools. Backends never start a process any other way, so a fake
/// can stand in for the kernel's tools in unit tests.
pub trait Runner: Send + Sync {
    /// Runs `program` with `args` (and `stdin`) to completion within the tool deadline,
    /// or within `lock_wait` plus a margin if the tool was told to wait that long for
    /// the xtables lock; stdout on success.
    fn run(
        &self,
        program: &Program,
        args: &[&str],
        stdin: Option<&[u8]>,
        lock_wait: Option<Duration>,
    ) -> Result<String, ToolError>;

    /// Whether an executable of this name is on PATH.
    fn exists(&self, name: &str) -> bool;

    /// Processes started so far (for sync reports and benchmarks).
    fn spawned(&self) -> u64;

    /// Why the ruleset generation cannot be read, if it cannot: the refused call in
    /// words, for a backend that cannot work without nf_tables over netlink.
    fn ruleset_generation_problem(&self) -> Option<String> {
        self.ruleset_generation()
            .is_none()
            .then(|| "no answer".to_string())
    }

    /// The nf_tables ruleset generation of this network namespace: it changes with every
    /// committed change to any nf_tables table (nft and iptables-nft alike). None when
    /// it cannot be read; then nothing may be concluded from it.
    fn ruleset_generation(&self) -> Option<u64>;

    /// Reads the nf_tables table `want.name` (family `inet`) over netlink and compares it
    /// with `want`, as it was at one ruleset generation; memory bounded by `want`.
    fn nft_observe(&self, want: &nf_tables::Table) -> Result<nf_tables::Observed, ToolError>;

    /// Commits `batch` as one nf_tables transaction over netlink: all of it or nothing.
    fn nft_commit(&self, batch: &nf_tables::Batch) -> Result<nf_tables::Commit, ToolError>;

    /// Keeps other agents of this network namespace from reading or writing the rules
    /// until the returned lock is dropped (see [`lock`]); waits at most `within`.
    fn lock_agents(&self, within: Duration) -> Result<lock::AgentLock, lock::LockError>;

    /// Whether nf_tables has a table `table` of `family` (ip or ip6): one netlink lookup.
    fn nft_table_exists(&self, family: Family, table: &str) -> Result<bool, ToolError>;

    /// Whether the nf_tables table `table` of `family` (ip or ip6) holds a chain named
    /// `chain` (one netlink lookup).
    fn nft_chain_exists(&self, family: Family, table: &str, chain: &str)
    -> Result<bool, ToolError>;

    /// Whether the nf_tables table `table` of `family` (ip or ip6) holds a chain whose
    /// name starts with one of `prefixes` (one streamed chain dump, no process).
    fn nft_has_chain_prefixed(
        &self,
        family: Family,
        table: &str,
        prefixes: &[&str],
    ) -> Result<bool, ToolError>;

    /// Every nf_tables base chain of type nat on the postrouting hook (ip, ip6, inet):
    /// one streamed netlink dump, no process; only those chains are kept.
    fn nft_nat_postrouting_chains(
        &self,
    ) -> Result<Vec<netlink::lookup::NatPostroutingChain>, ToolError>;

    /// The tables iptables-legacy holds for `family` (`/proc/net/ip_tables_names`,
    /// `ip6_tables_names`); an empty list when the legacy module is not loaded.
    fn legacy_tables(&self, family: Family) -> Vec<String>;

    /// Streams the conntrack entries of `family` to `visit` one at a time (ctnetlink, no
    /// process; nothing of the table is held), asking the kernel to leave out what
    /// `filter` names where it can. `visit` may delete meanwhile, or break the dump off.
    /// Each wait for the kernel is bounded by the tool deadline.
    fn conntrack_dump(
        &self,
        family: Family,
        filter: &ConntrackDumpFilter,
        visit: &mut dyn FnMut(&ConntrackEntry) -> std::ops::ControlFlow<()>,
    ) -> Result<ConntrackDumpReport, ToolError>;

    /// Deletes exactly the conntrack entries `keys` name (tuple, zone and id), many per
    /// netlink datagram. An entry already gone is counted, not an error.
    fn conntrack_delete(&self, keys: &[ConntrackKey]) -> Result<ConntrackDeleteReport, ToolError>;

    /// The prefixes the node treats as its own for `family`: the `local` routes of the
    /// `local` routing table (its addresses, loopback), what the agent's jump excludes.
    fn local_prefixes(&self, family: Family) -> Result<Vec<ipnet::IpNet>, ToolError>;

    /// The names of this network namespace's interfaces (`if_nameindex`).
    fn interface_names(&self) -> Vec<String>;

    /// The interface the routing table sends a packet from `source` to `destination`
    /// out of (`ip route get DST from SRC iif ...`); None when there is no route.
    fn egress_interface(
        &self,
        destination: std::net::IpAddr,
        source: Option<std::net::IpAddr>,
    ) -> Result<Option<String>, ToolError>;
}

pub type SharedRunner = Arc<dyn Runner>;

/// The real thing: child processes with deadlines.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemRunner;

impl SystemRunner {
    pub fn shared() -> SharedRunner {
        Arc::new(SystemRunner)
    }
}

impl Runner for SystemRunner {
    fn run(
        &self,
        program: &Program,
        args: &[&str],
        stdin: Option<&[u8]>,
        lock_wait: Option<Duration>,
    ) -> Result<String, ToolError> {
        let deadline = match lock_wait {
            Some(wait) => lock_deadline(tool_timeout(), wait),
            None => tool_timeout(),
        };
        program.run_within(args, stdin, deadline)
    }

    fn exists(&self, name: &str) -> bool {
        find_on_path(name).is_some()
    }

    fn spawned(&self) -> u64 {
        spawned_processes()
    }

    fn ruleset_generation(&self) -> Option<u64> {
        netlink::nftables::nftables_generation()
    }

    fn ruleset_generation_problem(&self) -> Option<String> {
        netlink::nftables::generation_or_why().err()
    }

    fn nft_observe(&self, want: &nf_tables::Table) -> Result<nf_tables::Observed, ToolError> {
        if stopping() {
            return Err(ToolError::Interrupted {
                command: format!("reading nft table inet {}", want.name),
            });
        }
        nf_tables::observe(want).map_err(|message| ToolError::Kernel {
            what: format!("reading nft table inet {}", want.name),
            message,
        })
    }

    fn nft_commit(&self, batch: &nf_tables::Batch) -> Result<nf_tables::Commit, ToolError> {
        if stopping() {
            return Err(ToolError::Interrupted {
                command: format!("writing nft table inet {}", batch.table),
            });
        }
        nf_tables::commit(batch).map_err(|message| ToolError::Kernel {
            what: format!("writing nft table inet {}", batch.table),
            message,
        })
    }

    fn lock_agents(&self, within: Duration) -> Result<lock::AgentLock, lock::LockError> {
        lock::acquire(within)
    }

    fn nft_table_exists(&self, family: Family, table: &str) -> Result<bool, ToolError> {
        let nfproto = match family {
            Family::V4 => libc::NFPROTO_IPV4,
            Family::V6 => libc::NFPROTO_IPV6,
        };
        netlink::lookup::table_exists(nfproto as u8, table).map_err(|message| ToolError::Kernel {
            what: format!("looking up nft table {table} ({family})"),
            message,
        })
    }

    fn nft_chain_exists(
        &self,
        family: Family,
        table: &str,
        chain: &str,
    ) -> Result<bool, ToolError> {
        let nfproto = match family {
            Family::V4 => libc::NFPROTO_IPV4,
            Family::V6 => libc::NFPROTO_IPV6,
        };
        netlink::lookup::chain_exists(nfproto as u8, table, chain).map_err(|message| {
            ToolError::Kernel {
                what: format!("looking up chain {chain} of nft table {table} ({family})"),
                message,
            }
        })
    }

    fn nft_has_chain_prefixed(
        &self,
        family: Family,
        table: &str,
        prefixes: &[&str],
    ) -> Result<bool, ToolError> {
        let nfproto = match family {
            Family::V4 => libc::NFPROTO_IPV4,
            Family::V6 => libc::NFPROTO_IPV6,
        };
        netlink::lookup::has_chain_prefixed(nfproto as u8, table, prefixes, tool_timeout()).map_err(
            |message| ToolError::Kernel {
                what: format!("listing the chains of nft table {table} ({family})"),
                message,
            },
        )
    }

    fn nft_nat_postrouting_chains(
        &self,
    ) -> Result<Vec<netlink::lookup::NatPostroutingChain>, ToolError> {
        netlink::lookup::nat_postrouting_chains(tool_timeout()).map_err(|message| {
            ToolError::Kernel {
                what: "listing the nf_tables nat chains on the postrouting hook".into(),
                message,
            }
        })
    }

    fn legacy_tables(&self, family: Family) -> Vec<String> {
        let names = match family {
            Family::V4 => "/proc/net/ip_tables_names",
            Family::V6 => "/proc/net/ip6_tables_names",
        };
        // No file: the legacy module is not loaded, so no legacy table exists.
        std::fs::read_to_string(names)
            .map(|text| text.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    fn conntrack_dump(
        &self,
        family: Family,
        filter: &ConntrackDumpFilter,
        visit: &mut dyn FnMut(&ConntrackEntry) -> std::ops::ControlFlow<()>,
    ) -> Result<ConntrackDumpReport, ToolError> {
        netlink::conntrack::dump(family, filter, tool_timeout(), &stopping, visit).map_err(
            |message| ToolError::Kernel {
                what: format!("dumping the {family} conntrack table"),
                message,
            },
        )
    }

    fn conntrack_delete(&self, keys: &[ConntrackKey]) -> Result<ConntrackDeleteReport, ToolError> {
        if stopping() {
            return Err(ToolError::Interrupted {
                command: "netlink conntrack delete".into(),
            });
        }
        netlink::conntrack::delete(keys, tool_timeout()).map_err(|message| ToolError::Kernel {
            what: format!("deleting {} conntrack entries", keys.len()),
            message,
        })
    }

    fn local_prefixes(&self, family: Family) -> Result<Vec<ipnet::IpNet>, ToolError> {
        netlink::route::local_prefixes(family, tool_timeout()).map_err(|message| {
            ToolError::Kernel {
                what: format!("reading the {family} local routes"),
                message,
            }
        })
    }

    fn egress_interface(
        &self,
        destination: std::net::IpAddr,
        source: Option<std::net::IpAddr>,
    ) -> Result<Option<String>, ToolError> {
        netlink::route::egress_interface(destination, source, tool_timeout()).map_err(|message| {
            ToolError::Kernel {
                what: format!("looking up the route to {destination}"),
                message,
            }
        })
    }

    fn interface_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        // SAFETY: if_nameindex returns a list ended by a zero entry (or null on failure),
        // each name a NUL-terminated string, all freed once by if_freenameindex.
        unsafe {
            let list = libc::if_nameindex();
            if list.is_null() {
                return names;
            }
            let mut entry = list;
            while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
                let name = std::ffi::CStr::from_ptr((*entry).if_name);
                names.push(name.to_string_lossy().into_owned());
                entry = entry.add(1);
            }
            libc::if_freenameindex(list);
        }
        names
    }
}

/// Why running a tool did not give its output.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot run {command}: {source}")]
    Missing {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}{}): {stderr}", killed_hint(status))]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{command} did not finish within {after:?}; killed")]
    TimedOut { command: String, after: Duration },
    #[error("{command} interrupted: the agent is stopping")]
    Interrupted { command: String },
    /// A request made to the kernel directly (netlink) was refused or failed.
    #[error("{what}: {message}")]
    Kernel { what: String, message: String },
    #[error("waiting for {command}: {source}")]
    Wait {
        command: String,
        source: std::io::Error,
    },
}

/// A program plus the arguments that always precede ours, e.g. `xtables-nft-multi iptables-save`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    pub path: String,
    pub leading_args: Vec<String>,
}

enum Piece {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

impl Program {
    pub fn new(path: impl Into<String>) -> Program {
        Program {
            path: path.into(),
            leading_args: Vec::new(),
        }
    }

    pub fn display(&self, args: &[&str]) -> String {
        let mut words = vec![self.path.clone()];
        words.extend(self.leading_args.iter().cloned());
        words.extend(args.iter().map(|a| a.to_string()));
        words.join(" ")
    }

    fn run_within(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        deadline_after: Duration,
    ) -> Result<String, ToolError> {
        let command_text = || self.display(args);
        if stopping() {
            return Err(ToolError::Interrupted {
                command: command_text(),
            });
        }
        let mut command = Command::new(&self.path);
        command
            .args(&self.leading_args)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a kill reaches whatever the tool started too.
            .process_group(0);
        let mut child = command.spawn().map_err(|source| ToolError::Missing {
            command: command_text(),
            source,
        })?;
        SPAWNED.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + deadline_after;
        let (sender, pieces) = mpsc::channel();
        let mut open_pipes = 0;
        if let Some(pipe) = child.stdout.take() {
            open_pipes += 1;
            read_in_background(pipe, sender.clone(), Piece::Stdout);
        }
        if let Some(pipe) = child.stderr.take() {
            open_pipes += 1;
            read_in_background(pipe, sender.clone(), Piece::Stderr);
        }
        drop(sender);
        if let (Some(input), Some(pipe)) = (stdin, child.stdin.take()) {
            write_in_background(pipe, input.to_vec());
        }
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        // The pipes close when the tool (and its group) exits: wait for that, in slices
        // short enough to notice a stop.
        while open_pipes > 0 {
            if let Some(err) = self.interrupted(&mut child, deadline, deadline_after, args) {
                return Err(err);
            }
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(STOP_CHECK);
            match pieces.recv_timeout(slice) {
                Ok(Piece::Stdout(bytes)) => {
                    stdout = bytes;
                    open_pipes -= 1;
                }
                Ok(Piece::Stderr(bytes)) => {
                    stderr = bytes;
                    open_pipes -= 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        // Pipes closed; the tool itself may still be exiting (or have closed them early).
        let mut pause = Duration::from_micros(50);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(source) => {
                    kill_group(&mut child);
                    return Err(ToolError::Wait {
                        command: command_text(),
                        source,
                    });
                }
            }
            if let Some(err) = self.interrupted(&mut child, deadline, deadline_after, args) {
                return Err(err);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(STOP_CHECK);
        };
        if !status.success() {
            return Err(ToolError::Failed {
                command: command_text(),
                status,
                stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    }

    /// Kills the tool's group when the deadline passed or the agent is stopping.
    fn interrupted(
        &self,
        child: &mut Child,
        deadline: Instant,
        deadline_after: Duration,
        args: &[&str],
    ) -> Option<ToolError> {
        let error = if stopping() {
            ToolError::Interrupted {
                command: self.display(args),
            }
        } else if Instant::now() >= deadline {
            ToolError::TimedOut {
                command: self.display(args),
                after: deadline_after,
            }
        } else {
            return None;
        };
        kill_group(child);
        Some(error)
    }
}

/// What a SIGKILL the agent did not send most likely was: the kernel's OOM killer, under
/// the pod's memory limit (the agent's own deadline kills are reported as timeouts).
fn killed_hint(status: &ExitStatus) -> &'static str {
    use std::os::unix::process::ExitStatusExt;
    if status.signal() == Some(libc::SIGKILL) {
        "; killed by someone else: most likely the OOM killer, under the memory limit"
    } else {
        ""
    }
}

/// The deadline of a tool told to wait `lock_wait` for the xtables lock.
fn lock_deadline(tool_timeout: Duration, lock_wait: Duration) -> Duration {
    tool_timeout.max(lock_wait + LOCK_WAIT_MARGIN)
}

fn read_in_background<R: Read + Send + 'static>(
    mut pipe: R,
    sender: mpsc::Sender<Piece>,
    wrap: fn(Vec<u8>) -> Piece,
) {
    let spawned = std::thread::Builder::new()
        .name("tool-output".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut bytes = Vec::new();
            // A read error ends the output early; the exit status tells the rest.
            let _ = pipe.read_to_end(&mut bytes);
            let _ = sender.send(wrap(bytes));
        });
    if let Err(err) = spawned {
        // Without a reader the tool blocks on a full pipe and meets its deadline.
        tracing::warn!("cannot start a thread to read a tool's output: {err}");
    }
}

fn write_in_background<W: Write + Send + 'static>(mut pipe: W, input: Vec<u8>) {
    let spawned = std::thread::Builder::new()
        .name("tool-input".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            // A tool that exits early closes the pipe; its exit status says why.
            let _ = pipe.write_all(&input);
        });
    if let Err(err) = spawned {
        tracing::warn!("cannot start a thread to feed a tool its input: {err}");
    }
}

/// SIGKILL to the tool's whole process group, then reap the tool (bounded: a member that
/// escaped the group may hold a pipe, but the tool itself is gone).
fn kill_group(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory is touched.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let until = Instant::now() + REAP_GRACE;
    while Instant::now() < until {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Finds an executable by name on PATH.
fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(script: &str) -> (Program, Vec<String>) {
        (
            Program::new("sh"),
            vec!["-c".to_string(), script.to_string()],
        )
    }

    fn run(script: &str, timeout: Duration) -> Result<String, ToolError> {
        let (program, args) = shell(script);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        program.run_within(&args, None, timeout)
    }

    #[test]
    fn output_and_failures_carry_the_tools_words() {
        assert_eq!(
            run("echo hello", Duration::from_secs(5)).unwrap(),
            "hello\n"
        );
        let err = run("echo oops >&2; exit 3", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, ToolError::Failed { .. }), "{err}");
        assert!(err.to_string().contains("oops"), "{err}");
    }

    #[test]
    fn regression_a_hung_tool_is_killed_at_its_deadline_with_its_children() {
        let started = Instant::now();
        // The shell's child `sleep` holds the output pipe: only a group kill frees it.
        let err = run("sleep 30; echo late", Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, ToolError::TimedOut { .. }), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_large_input_and_output_do_not_deadlock() {
        let (program, _) = shell("");
        let input = vec![b'x'; 4 << 20];
        let out = program
            .run_within(&["-c", "cat"], Some(&input), Duration::from_secs(20))
            .unwrap();
        assert_eq!(out.len(), input.len());
    }

    #[test]
    fn a_lock_wait_is_never_cut_short() {
        let wait = Duration::from_secs(5);
        assert_eq!(
            lock_deadline(Duration::from_secs(1), wait),
            wait + LOCK_WAIT_MARGIN
        );
        assert_eq!(
            lock_deadline(Duration::from_secs(30), wait),
            Duration::from_secs(30)
        );
    }
}
