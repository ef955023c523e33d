//! Agents of one network namespace (a DaemonSet rolling update with maxSurge, a copy
//! started by hand) coordinate through abstract unix socket names. Such a name belongs to
//! the network namespace, so two host-network pods of a node share it whatever they mount
//! (no lock file to agree on), agents in other namespaces never see it, and the kernel
//! releases it when the process dies, however it dies.
//!
//! - The sync lock: one agent at a time between reading the kernel's rules and writing
//!   them. Two agents that both read "no jump" append one each, then both delete "the
//!   duplicate" and leave none; with the lock the second reads what the first wrote.
//!   iptables' own `flock(2)` on the xtables lock file is a separate thing: an agent
//!   holding this lock can still run iptables-legacy-restore, which never waits for it.
//! - Presence: each running agent holds a name of its own, `ip-masq-agent/running/<start>
//!   /<pid>/<metrics port>`, which the others read from `/proc/net/unix` (this
//!   namespace's sockets): an agent exiting with `--cleanup-on-exit` leaves the rules to
//!   another one still running, and an older agent hands its metrics port to a newer one
//!   that serves the same port. Each pod has a PID namespace of its own, where the agent
//!   is often PID 1 in both: the start time (CLOCK_BOOTTIME, in ns) tells them apart.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// The sync lock's name (in the abstract namespace: no file).
const SYNC_LOCK: &str = "ip-masq-agent/sync";
/// Presence names start with this.
const PRESENCE: &str = "ip-masq-agent/running/";
/// How often a waiting agent tries again.
const RETRY: Duration = Duration::from_millis(5);

/// Held while it lives; the kernel releases the name when the socket closes (also when
/// the process dies), so a killed agent never leaves it held.
pub struct AgentLock {
    _socket: Option<OwnedFd>,
}

impl AgentLock {
    /// A stand-in that excludes nothing (the fake, or no socket to be had).
    pub fn none() -> AgentLock {
        AgentLock { _socket: None }
    }
}

/// Why the lock could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// No unix socket can be made at all: the caller goes on unlocked, and says so once.
    Unavailable(String),
    /// Another agent held it for all of `waited`.
    Busy { name: String, waited: Duration },
}

/// A unix socket bound to the abstract `name`; Err(true) when another holds the name.
fn bind_abstract(name: &str) -> Result<OwnedFd, Result<std::io::Error, std::io::Error>> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_un is valid; the name is copied into it after the NUL
    // that makes it abstract, within its length (checked).
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = name.as_bytes();
    if bytes.len() + 1 > address.sun_path.len() {
        return Err(Err(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
    }
    for (slot, byte) in address.sun_path[1..].iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    let length = std::mem::size_of::<libc::sa_family_t>() + 1 + bytes.len();
    // SAFETY: bind reads `length` bytes of the live `address`.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_un).cast(),
            length as libc::socklen_t,
        )
    };
    if bound == 0 {
        return Ok(socket);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EADDRINUSE) {
        Err(Ok(err))
    } else {
        Err(Err(err))
    }
}

/// Takes the sync lock, waiting at most `within` for another agent to release it.
pub fn acquire(within: Duration) -> Result<AgentLock, LockError> {
    acquire_named(SYNC_LOCK, within)
}

fn acquire_named(name: &str, within: Duration) -> Result<AgentLock, LockError> {
    let started = Instant::now();
    loop {
        match bind_abstract(name) {
            Ok(socket) => {
                return Ok(AgentLock {
                    _socket: Some(socket),
                });
            }
            Err(Ok(_held)) => {}
            Err(Err(err)) => {
                return Err(LockError::Unavailable(format!(
                    "binding the abstract unix socket @{name}: {err}"
                )));
            }
        }
        let waited = started.elapsed();
        if waited >= within {
            return Err(LockError::Busy {
                name: format!("@{name}"),
                waited,
            });
        }
        std::thread::sleep(RETRY.min(within - waited));
    }
}

/// This process's presence name, held for its lifetime.
pub struct Presence {
    _socket: OwnedFd,
    pub me: OtherAgent,
}

/// Another running agent of this network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OtherAgent {
    /// When it started (CLOCK_BOOTTIME, ns): a later start is a newer agent.
    pub started: u64,
    /// Its PID in its own PID namespace (not necessarily this one's).
    pub pid: u32,
    /// The port it serves /metrics and /healthz on; 0 for none.
    pub metrics_port: u16,
}

/// Nanoseconds since boot (CLOCK_BOOTTIME): the same clock for every process.
fn boot_time_ns() -> u64 {
    // SAFETY: a zeroed timespec is valid; clock_gettime writes it.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// Holds this agent's presence name; Err (said once by the caller) when it cannot.
pub fn announce(metrics_port: u16) -> Result<Presence, String> {
    let me = OtherAgent {
        started: boot_time_ns(),
        pid: std::process::id(),
        metrics_port,
    };
    bind_abstract(&format!(
        "{PRESENCE}{}/{}/{}",
        me.started, me.pid, me.metrics_port
    ))
    .map(|socket| Presence {
        _socket: socket,
        me,
    })
    .map_err(|err| match err {
        Ok(err) | Err(err) => format!("announcing this agent to others: {err}"),
    })
}

/// The other running agents of this network namespace, from `/proc/net/unix` (the
/// calling process's namespace).
pub fn others(own: &Presence) -> Vec<OtherAgent> {
    let Ok(listing) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    others_in(&listing, own.me)
}

/// The presence names of `/proc/net/unix` text, but `own`'s.
fn others_in(listing: &str, own: OtherAgent) -> Vec<OtherAgent> {
    let mut found: Vec<OtherAgent> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().last())
        .filter_map(|path| path.strip_prefix('@')?.strip_prefix(PRESENCE))
        .filter_map(|rest| {
            let mut fields = rest.split('/');
            let other = OtherAgent {
                started: fields.next()?.parse().ok()?,
                pid: fields.next()?.parse().ok()?,
                metrics_port: fields.next()?.parse().ok()?,
            };
            fields.next().is_none().then_some(other)
        })
        .filter(|other| *other != own)
        .collect();
    found.sort_unstable_by_key(|other| (other.started, other.pid));
    found.dedup();
    found
}

impl Presence {
    /// A running agent serving the same metrics port that started after this one (the
    /// one a rolling update brings).
    pub fn newer_agent_on_my_port(&self) -> Option<OtherAgent> {
        others(self)
            .into_iter()
            .filter(|other| other.metrics_port == self.me.metrics_port)
            .filter(|other| (other.started, other.pid) > (self.me.started, self.me.pid))
            .max_by_key(|other| other.started)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_and_gets_it_once_the_first_lets_go() {
        let name = format!("ip-masq-agent/test/{}", std::process::id());
        let first = acquire_named(&name, Duration::from_secs(1)).unwrap();
        match acquire_named(&name, Duration::from_millis(50)) {
            Err(LockError::Busy { waited, .. }) => assert!(waited >= Duration::from_millis(50)),
            other => panic!("{:?}", other.map(|_| ())),
        }
        drop(first);
        assert!(acquire_named(&name, Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn other_agents_are_read_from_the_namespaces_unix_sockets() {
        // Agents of two pods are often PID 1 each: the start time tells them apart.
        let listing = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00000000 0001 01 1 @ip-masq-agent/running/500/1/9999\n\
            0000000000000000: 00000002 00000000 00000000 0001 01 2 @ip-masq-agent/running/900/1/9999\n\
            0000000000000000: 00000002 00000000 00000000 0001 01 3 @ip-masq-agent/running/950/7/0\n\
            0000000000000000: 00000002 00000000 00000000 0001 01 4 @ip-masq-agent/running/960/7/0/x\n\
            0000000000000000: 00000002 00000000 00000000 0001 01 5 @ip-masq-agent/sync\n\
            0000000000000000: 00000002 00000000 00000000 0001 01 6 /run/other.sock\n";
        let own = OtherAgent {
            started: 500,
            pid: 1,
            metrics_port: 9999,
        };
        assert_eq!(
            others_in(listing, own),
            [
                OtherAgent {
                    started: 900,
                    pid: 1,
                    metrics_port: 9999,
                },
                OtherAgent {
                    started: 950,
                    pid: 7,
                    metrics_port: 0,
                }
            ]
        );
        // This process sees its own presence as no other agent.
        let announced = announce(0).unwrap();
        assert!(!others(&announced).contains(&announced.me));
        assert!(announced.newer_agent_on_my_port().is_none());
    }
}
