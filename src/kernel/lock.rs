//! One agent at a time between reading the kernel's rules and writing them: two agents
//! in one network namespace (a DaemonSet rolling update with maxSurge, a copy started by
//! hand) that both read "no jump" append one each, then both delete "the duplicate" and
//! leave none. They take an open-file-description lock (`F_OFD_SETLK`) on a byte of the
//! xtables lock file, which both mount (`/run/xtables.lock`, or `$XTABLES_LOCKFILE` as
//! iptables reads it). iptables itself takes `flock(2)` on that file, a separate kind of
//! lock on Linux, so holding ours while iptables-legacy-restore takes its own cannot
//! deadlock, and iptables never waits for ours. The byte is chosen by the network
//! namespace (its inode), so agents of different namespaces that share the file (test
//! namespaces on one host) never wait for each other: the race is within a namespace.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The locked bytes start far past anything a file lock elsewhere would cover by accident.
const FIRST_BYTE: libc::off_t = 1 << 30;
/// One byte per network namespace, by its inode modulo this.
const NAMESPACE_SLOTS: u64 = 1 << 20;
/// How often a waiting agent tries again.
const RETRY: Duration = Duration::from_millis(5);

/// The file both agents lock.
pub fn lock_path() -> PathBuf {
    std::env::var_os("XTABLES_LOCKFILE")
        .filter(|path| !path.is_empty())
        .map_or_else(|| PathBuf::from("/run/xtables.lock"), PathBuf::from)
}

/// Held while it lives; the kernel releases the lock when the file closes (also when the
/// process dies), so a killed agent never leaves it held.
pub struct AgentLock {
    _file: Option<File>,
}

impl AgentLock {
    /// A stand-in that excludes nothing (the fake, or no lock file to be had).
    pub fn none() -> AgentLock {
        AgentLock { _file: None }
    }
}

/// Why the lock could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// The file cannot be opened or locked at all (a read-only mount without it, a
    /// filesystem without OFD locks): the caller goes on unlocked, and says so once.
    Unavailable(String),
    /// Another agent held it for all of `waited`.
    Busy { path: PathBuf, waited: Duration },
}

/// Takes the lock, waiting at most `within` for another agent to release it.
pub fn acquire(within: Duration) -> Result<AgentLock, LockError> {
    acquire_at(lock_path(), within)
}

/// `acquire` on the file at `path`.
pub fn acquire_at(path: PathBuf, within: Duration) -> Result<AgentLock, LockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|err| LockError::Unavailable(format!("opening {}: {err}", path.display())))?;
    let started = Instant::now();
    loop {
        match try_lock(&file, locked_byte()) {
            Ok(true) => return Ok(AgentLock { _file: Some(file) }),
            Ok(false) => {}
            Err(err) => {
                return Err(LockError::Unavailable(format!(
                    "locking {}: {err}",
                    path.display()
                )));
            }
        }
        let waited = started.elapsed();
        if waited >= within {
            return Err(LockError::Busy { path, waited });
        }
        std::thread::sleep(RETRY.min(within - waited));
    }
}

/// This network namespace's byte of the lock file.
fn locked_byte() -> libc::off_t {
    use std::os::unix::fs::MetadataExt;
    let slot = std::fs::metadata("/proc/self/ns/net")
        .map(|namespace| namespace.ino() % NAMESPACE_SLOTS)
        .unwrap_or(0);
    FIRST_BYTE + libc::off_t::try_from(slot).unwrap_or(0)
}

/// One attempt: Ok(false) when another open file description holds the byte.
fn try_lock(file: &File, byte: libc::off_t) -> std::io::Result<bool> {
    // SAFETY: a zeroed flock is a valid value for every field; fcntl reads it.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte;
    lock.l_len = 1;
    // SAFETY: fcntl on a descriptor `file` owns, with a live flock of the right type.
    let done = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if done == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => Ok(false),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_and_gets_it_once_the_first_lets_go() {
        let dir = std::env::temp_dir().join(format!("ima-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("xtables.lock");
        let acquire = |within| acquire_at(path.clone(), within);
        let first = acquire(Duration::from_secs(1)).unwrap();
        // Open file descriptions, not processes, own OFD locks: a second one in the
        // same process is refused like another agent would be.
        match acquire(Duration::from_millis(50)) {
            Err(LockError::Busy { waited, .. }) => assert!(waited >= Duration::from_millis(50)),
            other => panic!("{:?}", other.map(|_| ())),
        }
        // flock(2), as iptables takes it, is not blocked by ours.
        let other = File::open(&path).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(
            unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
        drop(first);
        assert!(acquire(Duration::from_secs(1)).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
