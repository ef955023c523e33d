//! A memory cgroup this process makes for a test (cgroup v1 or v2) and removes on drop:
//! an agent runs under the DaemonSet's memory limit, and the test reads what the
//! kernel counted (peak usage, OOM kills).

use std::path::PathBuf;

/// A memory cgroup with a hard limit; processes join it through [`MemoryCgroup::wrapper`].
pub struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    /// A new cgroup limited to `bytes`. Panics (with what is missing) when the machine
    /// has no memory controller this process may use.
    pub fn new(tag: &str, bytes: u64) -> MemoryCgroup {
        let name = crate::unique_name(&format!("ima-{tag}"));
        let v1 = PathBuf::from("/sys/fs/cgroup/memory");
        let (dir, v2) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(&name), false)
        } else {
            let root = PathBuf::from("/sys/fs/cgroup");
            let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
                .expect("no cgroup v1 memory controller and no cgroup v2 hierarchy");
            assert!(
                controllers.split_whitespace().any(|c| c == "memory"),
                "cgroup v2 without the memory controller: {controllers}"
            );
            // Children of the root get the controller once the root delegates it.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
            (root.join(&name), true)
        };
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let cgroup = MemoryCgroup { dir, v2 };
        let (file, value) = if v2 {
            ("memory.max", bytes.to_string())
        } else {
            ("memory.limit_in_bytes", bytes.to_string())
        };
        std::fs::write(cgroup.dir.join(file), value).unwrap_or_else(|e| panic!("set {file}: {e}"));
        if v2 {
            // No swap to hide in: the limit is the memory.
            let _ = std::fs::write(cgroup.dir.join("memory.swap.max"), "0");
        }
        cgroup
    }

    /// A command prefix that moves itself into the cgroup and execs the rest: give it to
    /// [`crate::Agent::start_with`].
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.dir.display()
            ),
            "sh".into(),
        ]
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// The most memory the cgroup's processes held at once.
    pub fn peak_bytes(&self) -> u64 {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        self.read(file).trim().parse().unwrap_or(0)
    }

    /// How often the kernel's OOM killer killed a process of the cgroup.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.read(file)
            .lines()
            .find_map(|line| line.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // The processes are gone by now (the test ends them first); a cgroup with none
        // left is removed with rmdir, retried briefly while the kernel lets go of them.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("left behind: cgroup {}", self.dir.display());
    }
}
