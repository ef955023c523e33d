//! What this process made and must undo however it ends: namespaces, child processes
//! and temporary directories, tracked while they live, and undone on SIGINT, SIGTERM or
//! SIGHUP by [`clean_up_on_signals`] (drops run only on a normal exit or a panic).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::unistd::Pid;

static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn add<T>(list: &Mutex<Vec<T>>, item: T) {
    list.lock().unwrap_or_else(|e| e.into_inner()).push(item);
}

fn remove<T: PartialEq>(list: &Mutex<Vec<T>>, item: &T) {
    list.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|x| x != item);
}

pub(crate) fn track_namespace(name: &str) {
    add(&NAMESPACES, name.to_string());
}

pub(crate) fn untrack_namespace(name: &str) {
    remove(&NAMESPACES, &name.to_string());
}

pub(crate) fn track_dir(path: &Path) {
    add(&DIRS, path.to_path_buf());
}

pub(crate) fn untrack_dir(path: &Path) {
    remove(&DIRS, &path.to_path_buf());
}

/// Notes a child process (by PID) to stop if this process is interrupted; untrack it
/// once it has been reaped, before its PID can be reused.
pub fn track_child(pid: u32) {
    add(&CHILDREN, pid);
}

pub fn untrack_child(pid: u32) {
    remove(&CHILDREN, &pid);
}

/// The tracked children still running.
pub fn tracked_children() -> Vec<u32> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM and SIGHUP stop every tracked child (SIGTERM, then SIGKILL
/// after 2 s), delete every tracked namespace and directory, and exit with 130. The
/// handler only sets a flag (child processes get default handlers back at exec); a
/// thread polls it every 50 ms.
pub fn clean_up_on_signals() {
    let action = SigAction::new(
        SigHandler::Handler(note_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &action) }.expect("sigaction");
    }
    std::thread::spawn(|| {
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("interrupted: stopping children, deleting namespaces and temporary files");
        undo_everything();
        std::process::exit(130);
    });
}

fn undo_everything() {
    let children = tracked_children();
    for &pid in &children {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for &pid in &children {
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    for name in NAMESPACES.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = Command::new("ip").args(["netns", "delete", name]).status();
    }
    for dir in DIRS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
