//! Running firewall tools: one place that spawns, feeds stdin, and turns a failure
//! into an error that carries the tool's own words.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

static SPAWNED: AtomicU64 = AtomicU64::new(0);

/// Processes started by this process so far (for sync reports and benchmarks).
pub fn spawned_processes() -> u64 {
    SPAWNED.load(Ordering::Relaxed)
}

/// A program plus the arguments that always precede ours, e.g. `xtables-nft-multi iptables-save`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    pub path: String,
    pub leading_args: Vec<String>,
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

    /// Runs to completion; stdout on success, an error quoting stderr otherwise.
    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<String> {
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
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", self.display(args)))?;
        SPAWNED.fetch_add(1, Ordering::Relaxed);
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A tool that exits early closes the pipe; its exit status says why.
            let _ = pipe.write_all(input);
        }
        let output = child
            .wait_with_output()
            .map_err(|e| anyhow::anyhow!("waiting for {}: {e}", self.display(args)))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            anyhow::bail!(
                "{} failed ({}): {}",
                self.display(args),
                output.status,
                stderr.trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Finds an executable by name on PATH.
pub fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
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
