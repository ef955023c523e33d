//! Whether this process may make namespaces and program them, and the sweep of
//! namespaces an earlier, killed test process left behind.

use std::path::Path;
use std::process::Command;

const TOOLS: [&str; 7] = [
    "ip",
    "iptables-nft",
    "iptables-legacy",
    "ip6tables-nft",
    "ip6tables-legacy",
    "nft",
    "sysctl",
];

/// True when the tests can make namespaces and program them. Outside CI a missing
/// prerequisite skips the test with a note; under CI=true it fails it.
pub fn require_root() -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    for tool in TOOLS {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            missing.push(tool.to_string());
        }
    }
    if missing.is_empty() {
        sweep_stale_namespaces();
        return true;
    }
    let message = format!(
        "needs {} (run as root after installing iptables nftables iproute2 procps)",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    eprintln!("SKIPPED: {message}");
    false
}

/// Deletes namespaces left by an earlier test process that was killed outright.
fn sweep_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = harness_pid(&name)
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        }
    }
}

/// The PID in a name this harness makes (`ima-<pid>-...`); None for other tools' names,
/// `ima-*` ones included.
fn harness_pid(name: &str) -> Option<&str> {
    name.strip_prefix("ima-")
        .and_then(|rest| rest.split('-').next())
        .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_the_harness_makes_are_swept() {
        assert_eq!(harness_pid("ima-4242-7-node"), Some("4242"));
        for other in ["ima-bench-1-pod", "ima--node", "imax-1-node", "cni-1234"] {
            assert_eq!(harness_pid(other), None, "{other}");
        }
    }
}
