//! The agent binary, and the agent running in a namespace.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::{ConfigMapVolume, Netns, TempDir};

/// The agent binary under test. Integration tests name it with
/// `Agent::new(env!("CARGO_BIN_EXE_ip-masq-agent"))` (benchmarks too); examples, which
/// cargo does not tell, use [`Agent::beside_current_exe`].
#[derive(Clone, Debug)]
pub struct Agent {
    binary: PathBuf,
}

impl Agent {
    pub fn new(binary: impl Into<PathBuf>) -> Agent {
        Agent {
            binary: binary.into(),
        }
    }

    /// `ip-masq-agent` in the profile directory this executable was built into: an
    /// example runs from `target/<profile>/examples/`, a bench from `target/<profile>/deps/`.
    pub fn beside_current_exe() -> Agent {
        let exe = std::env::current_exe().expect("current exe");
        let binary = exe
            .parent()
            .and_then(Path::parent)
            .map(|dir| dir.join("ip-masq-agent"))
            .expect("a target/<profile>/<kind>/ executable");
        Agent { binary }
    }

    pub fn path(&self) -> &Path {
        &self.binary
    }

    /// The binary as a command-line word, e.g. for [`Netns::sh`].
    pub fn path_str(&self) -> &str {
        self.binary.to_str().expect("utf-8 agent path")
    }

    /// A command running the binary inside `ns`, for a subcommand such as `status`.
    pub fn command(&self, ns: &Netns) -> Command {
        ns.command(&self.binary)
    }

    /// Runs the binary's `args` (a command such as `status` or `cleanup`) in `ns`.
    pub fn run<S: AsRef<OsStr>>(&self, ns: &Netns, args: impl IntoIterator<Item = S>) -> Output {
        self.command(ns)
            .args(args)
            .output()
            .expect("run the agent binary")
    }

    /// Starts the agent with `args` in `ns`; its log is [`AgentProcess::log`].
    pub fn start(&self, ns: &Netns, args: &[&str]) -> AgentProcess {
        self.start_with(ns, args, &[], &[])
    }

    /// Starts the agent behind `wrapper` (e.g. `setpriv ...`) with extra environment.
    pub fn start_with(
        &self,
        ns: &Netns,
        args: &[&str],
        wrapper: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProcess {
        let mut args = args.to_vec();
        args.push("--v=2");
        self.launch(ns, &args, wrapper, env)
    }

    /// Like [`Agent::start_with`], with exactly `args` (no `--v=2` added): for another
    /// build, or another agent such as upstream's, that is run the same way.
    pub fn launch(
        &self,
        ns: &Netns,
        args: &[&str],
        wrapper: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProcess {
        let logdir = TempDir::new("log");
        let log = logdir.path.join("agent.log");
        let file = File::create(&log).expect("log file");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = ns.command(program);
                c.args(rest).arg(&self.binary);
                c
            }
            None => ns.command(&self.binary),
        };
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("spawn agent");
        crate::cleanup::track_child(child.id());
        AgentProcess {
            child,
            log,
            _logdir: logdir,
            signals_its_child: false,
        }
    }

    /// Starts the agent as a container runs it: PID 1 of a PID namespace of its own with
    /// its own /proc (two pods' agents then have the same PID). Signals go to the agent,
    /// not to the `unshare` that waits for it.
    pub fn start_as_container(&self, ns: &Netns, args: &[&str]) -> AgentProcess {
        let wrapper = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"];
        let mut process = self.start_with(ns, args, &wrapper, &[]);
        process.signals_its_child = true;
        process
    }

    /// Starts the agent on `volume`'s config with `extra` flags and waits for its first sync.
    pub fn start_synced(
        &self,
        ns: &Netns,
        volume: &ConfigMapVolume,
        extra: &[&str],
    ) -> AgentProcess {
        let path = volume.path();
        let mut args = vec!["--config", path.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        let mut agent = self.start(ns, &args);
        agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
        agent
    }
}

/// The agent binary running in a namespace; killed by PID on drop, and its log printed
/// when the test is failing.
pub struct AgentProcess {
    child: Child,
    log: PathBuf,
    _logdir: TempDir,
    /// Started behind `unshare --fork`, which does not pass signals on: they go to its
    /// one child.
    signals_its_child: bool,
}

impl AgentProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log lines that contain `text`.
    pub fn log_lines(&self, text: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(text))
            .map(str::to_owned)
            .collect()
    }

    /// Waits for the `occurrence`-th line containing `text` (counting from 1) and returns it.
    pub fn wait_for_line(&mut self, text: &str, occurrence: usize, timeout: Duration) -> String {
        self.wait_for_log(text, occurrence, timeout);
        self.log_lines(text).swap_remove(occurrence - 1)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits until the log has a line containing `text`, counting occurrences.
    pub fn wait_for_log(&mut self, text: &str, occurrences: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let count = BufReader::new(File::open(&self.log).expect("log"))
                .lines()
                .map_while(Result::ok)
                .filter(|l| l.contains(text))
                .count();
            if count >= occurrences {
                return;
            }
            assert!(self.is_running(), "agent exited early:\n{}", self.log());
            assert!(
                Instant::now() < deadline,
                "no {text:?} x{occurrences} in agent log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: Signal) {
        let pid = self.agent_pid();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("kill");
    }

    /// The agent's PID as this process sees it: for [`Agent::start_as_container`], that of
    /// the wrapper's child, once it has forked (e.g. for `nsenter` into its mounts).
    pub fn agent_pid(&self) -> u32 {
        if !self.signals_its_child {
            return self.child.id();
        }
        let wrapper = self.child.id();
        let children = format!("/proc/{wrapper}/task/{wrapper}/children");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let listed = std::fs::read_to_string(&children).unwrap_or_default();
            if let Some(pid) = listed.split_whitespace().find_map(|pid| pid.parse().ok()) {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "{wrapper} has no child to signal"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                crate::cleanup::untrack_child(self.child.id());
                return status;
            }
            assert!(Instant::now() < deadline, "agent ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        crate::cleanup::untrack_child(self.child.id());
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
    }
}

/// A `key=value` or `key="value"` field of one of the agent's log lines.
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = line[start..].trim_start_matches('"');
    Some(&rest[..rest.find(['"', ' ']).unwrap_or(rest.len())])
}

/// A log line's leading RFC 3339 UTC timestamp (`2026-11-23T06:05:00.123456Z`) as
/// seconds since the epoch.
pub fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let hh: i64 = t.next()?.parse().ok()?;
    let mm: i64 = t.next()?.parse().ok()?;
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

/// Now, as seconds since the epoch (to compare with [`log_time`]).
pub fn wall_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_give_their_time_and_fields() {
        let line = "2026-12-02T03:28:47.327839Z  INFO rules applied prefixes=3 elapsed_ms=\"13.062\" processes=1";
        assert_eq!(log_field(line, "elapsed_ms"), Some("13.062"));
        assert_eq!(log_field(line, "processes"), Some("1"));
        assert_eq!(log_field(line, "missing"), None);
        let t = log_time(line).unwrap();
        assert!((t - 1_796_182_127.327_839).abs() < 1e-3, "{t}");
        assert_eq!(log_time("garbage"), None);
    }
}
