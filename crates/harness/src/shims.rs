//! Tools that fail, hang or lie on demand, and finding the processes they leave.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use crate::TempDir;

/// Stand-ins placed before the real tools on PATH, to make a tool fail, hang or lie
/// while a flag file exists, and behave normally otherwise.
pub struct Shims {
    pub dir: TempDir,
}

impl Shims {
    pub fn new() -> Shims {
        Shims {
            dir: TempDir::new("shim"),
        }
    }

    /// The flag file that switches the fault of `tool` on while it exists.
    pub fn flag(&self, tool: &str) -> PathBuf {
        self.dir.path.join(format!("{tool}.fault"))
    }

    /// `tool` runs `fault` (sh) while its flag exists, then the real tool either way
    /// (unless `fault` exits).
    pub fn add(&self, tool: &str, fault: &str) {
        let real = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .expect("sh");
        let real = String::from_utf8_lossy(&real.stdout).trim().to_string();
        assert!(!real.is_empty(), "{tool} is not installed");
        let shim = self.dir.path.join(tool);
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\nif [ -e {flag} ]; then\n{fault}\nfi\nexec {real} \"$@\"\n",
                flag = self.flag(tool).display()
            ),
        )
        .expect("write shim");
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    pub fn fault_on(&self, tool: &str) {
        std::fs::write(self.flag(tool), "").expect("flag");
    }

    pub fn fault_off(&self, tool: &str) {
        let _ = std::fs::remove_file(self.flag(tool));
    }

    /// PATH with the shims first.
    pub fn path(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path.display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }
}

impl Default for Shims {
    fn default() -> Shims {
        Shims::new()
    }
}

/// PIDs of processes whose command line contains `needle` (our own shims' markers).
pub fn pids_matching(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmd| {
                    let cmd: Vec<u8> = cmd.iter().map(|&b| if b == 0 { b' ' } else { b }).collect();
                    String::from_utf8_lossy(&cmd).contains(needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shim_faults_only_while_its_flag_exists() {
        let shims = Shims::new();
        shims.add("cat", "echo faulty; exit 3");
        let run = || {
            Command::new("sh")
                .args(["-c", "cat /dev/null"])
                .env("PATH", shims.path())
                .output()
                .unwrap()
        };
        assert!(run().status.success());
        shims.fault_on("cat");
        let out = run();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"faulty\n");
        shims.fault_off("cat");
        assert!(run().status.success());
    }
}
