//! Test hosts in network namespaces this test process creates and deletes: never the
//! root namespace's firewall, never an address outside these namespaces.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

static COUNTER: AtomicU32 = AtomicU32::new(0);

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
        // Only names this harness makes (ima-<pid>-...), never other tools' ima-* names.
        let Some(pid) = name
            .strip_prefix("ima-")
            .and_then(|rest| rest.split('-').next())
            .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        }
    }
}

fn unique(tag: &str) -> String {
    format!(
        "ima-{}-{}-{tag}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip");
        assert!(status.success(), "ip netns add {name}");
        let ns = Netns { name };
        // Duplicate address detection would hold IPv6 back for a second or two on new links.
        ns.sh(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_dad=0",
        ]);
        ns.sh(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn handle(&self) -> File {
        File::open(format!("/run/netns/{}", self.name)).expect("open netns")
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let handle = self.handle();
        let mut command = Command::new(program);
        // SAFETY: setns is async-signal-safe; the closure touches nothing else.
        unsafe {
            command.pre_exec(move || {
                setns(&handle, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        command
    }

    pub fn output(&self, args: &[&str]) -> Output {
        self.command(args[0])
            .args(&args[1..])
            .output()
            .expect("spawn in netns")
    }

    /// Runs a command in the namespace and returns stdout; panics on failure.
    pub fn sh(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "{} in {}: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A UDP socket created inside this namespace (it stays there after the thread ends).
    pub fn udp_socket(&self, bind: SocketAddr) -> UdpSocket {
        let handle = self.handle();
        std::thread::spawn(move || {
            setns(&handle, CloneFlags::CLONE_NEWNET).expect("setns");
            UdpSocket::bind(bind).expect("bind udp")
        })
        .join()
        .expect("socket thread")
    }

    /// A plain HTTP/1.1 GET from inside this namespace; returns status and body.
    pub fn http_get(&self, address: &str, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let handle = self.handle();
        let address: SocketAddr = address.parse().expect("address");
        let path = path.to_string();
        std::thread::spawn(move || {
            setns(&handle, CloneFlags::CLONE_NEWNET).expect("setns");
            let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))
                .expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
            )
            .expect("send");
            let mut response = String::new();
            stream.read_to_string(&mut response).expect("read");
            let status = response
                .split(' ')
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or(0);
            let body = response
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            (status, body)
        })
        .join()
        .expect("http thread")
    }

    /// `iptables-save -t nat` (or another save tool), without its timestamp comments.
    pub fn save(&self, tool: &str) -> String {
        self.sh(&[tool, "-t", "nat"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// A temporary directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&path).expect("mkdir");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A ConfigMap volume laid out the way kubelet's atomic writer does it.
pub struct ConfigMapVolume {
    pub dir: TempDir,
    generation: u32,
    current: Option<String>,
}

pub const CONFIG_KEY: &str = "ip-masq-agent";

impl ConfigMapVolume {
    pub fn new(content: &str) -> ConfigMapVolume {
        let mut volume = ConfigMapVolume {
            dir: TempDir::new("cm"),
            generation: 0,
            current: None,
        };
        volume.update(content);
        symlink(
            format!("..data/{CONFIG_KEY}"),
            volume.dir.path.join(CONFIG_KEY),
        )
        .expect("key symlink");
        volume
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path.join(CONFIG_KEY)
    }

    /// New timestamped directory, `..data_tmp` symlink renamed over `..data`, old directory removed.
    pub fn update(&mut self, content: &str) {
        self.update_with(|dir| {
            std::fs::write(dir.join(CONFIG_KEY), content).expect("write config")
        });
    }

    /// Like `update`, but `fill` decides what the new directory holds (nothing, a
    /// directory, a symlink loop, an unreadable file, ...).
    pub fn update_with(&mut self, fill: impl FnOnce(&Path)) {
        self.generation += 1;
        let name = format!(
            "..2026_11_23_04_30_{:02}.{:09}",
            self.generation % 60,
            self.generation
        );
        let new_dir = self.dir.path.join(&name);
        std::fs::create_dir(&new_dir).expect("mkdir ts");
        fill(&new_dir);
        let tmp = self.dir.path.join("..data_tmp");
        symlink(&name, &tmp).expect("data_tmp symlink");
        std::fs::rename(&tmp, self.dir.path.join("..data")).expect("swap ..data");
        if let Some(old) = self.current.replace(name) {
            std::fs::remove_dir_all(self.dir.path.join(old)).expect("remove old ts dir");
        }
    }
}

/// The agent binary running in a namespace; killed by PID on drop.
pub struct AgentProcess {
    child: Child,
    log: PathBuf,
    _logdir: TempDir,
}

/// The agent under test: cargo names it for integration tests; the sandbox example
/// finds it beside its own directory (target/<profile>/examples/..).
pub fn agent_binary() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_ip-masq-agent") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("ip-masq-agent"))
        .expect("agent binary next to the example")
}

impl AgentProcess {
    pub fn start(ns: &Netns, args: &[&str]) -> AgentProcess {
        Self::start_with(ns, args, &[], &[])
    }

    /// Starts the agent behind `wrapper` (e.g. `setpriv ...`) with extra environment.
    pub fn start_with(
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
                c.args(rest).arg(agent_binary());
                c
            }
            None => ns.command(agent_binary()),
        };
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .args(args)
            .arg("--v=2")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("spawn agent");
        AgentProcess {
            child,
            log,
            _logdir: logdir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
            .expect("kill");
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
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
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
    }
}

/// Starts the agent on `volume`'s config with `extra` flags and waits for its first sync.
pub fn start_synced(ns: &Netns, volume: &ConfigMapVolume, extra: &[&str]) -> AgentProcess {
    let path = volume.path();
    let mut args = vec!["--config", path.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let mut agent = AgentProcess::start(ns, &args);
    agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
    agent
}

/// Runs a scenario `fn name(backend_flag: &str)` once per backend, as `name::iptables`
/// and `name::nftables`: behaviour must not depend on which backend wrote the rules.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($scenario:ident) => {
        mod $scenario {
            #[test]
            fn iptables() {
                if super::require_root() {
                    super::$scenario("--backend=iptables");
                }
            }
            #[test]
            fn nftables() {
                if super::require_root() {
                    super::$scenario("--backend=nftables");
                }
            }
        }
    };
}

/// Polls until `check` passes or `timeout` runs out; returns whether it passed.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Lines of the nat table that mention `chain`, plus its declaration.
pub fn chain_lines(saved: &str, chain: &str) -> Vec<String> {
    saved
        .lines()
        .filter(|l| l.contains(chain))
        .map(str::to_owned)
        .collect()
}

/// Lines of the nat table that do not mention `chain`.
pub fn foreign_lines(saved: &str, chain: &str) -> String {
    saved
        .lines()
        .filter(|l| !l.contains(chain))
        .map(|l| format!("{l}\n"))
        .collect()
}

pub const POD_V4: &str = "10.244.1.2";
pub const POD_V6: &str = "fd00:244::2";
pub const NODE_V4: &str = "192.0.2.1";
pub const NODE_V6: &str = "2001:db8:1::1";
pub const V4_PORT: u16 = 9999;
pub const V6_PORT: u16 = 9998;

/// Destinations the remote namespace owns.
pub const REMOTE_DESTINATIONS: [&str; 8] = [
    "203.0.113.10",
    "10.99.0.10",
    "172.16.5.10",
    "192.168.5.10",
    "169.254.5.10",
    "100.64.0.10",
    "2001:db8:99::10",
    "fd00:99::10",
];

/// pod -> node -> remote, joined by veth; the agent runs in `node`.
pub struct Topology {
    pub pod: Netns,
    pub node: Netns,
    pub remote: Netns,
    remote_v4: UdpSocket,
    remote_v6: UdpSocket,
}

impl Topology {
    pub fn new() -> Topology {
        let pod = Netns::new("pod");
        let node = Netns::new("node");
        let remote = Netns::new("remote");
        let ip = |ns: &Netns, args: &[&str]| {
            let mut full = vec!["ip"];
            full.extend_from_slice(args);
            ns.sh(&full);
        };
        ip(
            &pod,
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", "pod0", "netns", &node.name,
            ],
        );
        ip(
            &node,
            &[
                "link",
                "add",
                "eth1",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &remote.name,
            ],
        );
        for (ns, dev) in [
            (&pod, "eth0"),
            (&node, "pod0"),
            (&node, "eth1"),
            (&remote, "eth0"),
        ] {
            ip(ns, &["link", "set", dev, "up"]);
        }
        ip(&pod, &["addr", "add", "10.244.1.2/24", "dev", "eth0"]);
        ip(
            &pod,
            &[
                "-6",
                "addr",
                "add",
                "fd00:244::2/64",
                "dev",
                "eth0",
                "nodad",
            ],
        );
        ip(&node, &["addr", "add", "10.244.1.1/24", "dev", "pod0"]);
        ip(
            &node,
            &[
                "-6",
                "addr",
                "add",
                "fd00:244::1/64",
                "dev",
                "pod0",
                "nodad",
            ],
        );
        ip(&node, &["addr", "add", "192.0.2.1/24", "dev", "eth1"]);
        ip(
            &node,
            &[
                "-6",
                "addr",
                "add",
                "2001:db8:1::1/64",
                "dev",
                "eth1",
                "nodad",
            ],
        );
        ip(&remote, &["addr", "add", "192.0.2.2/24", "dev", "eth0"]);
        ip(
            &remote,
            &[
                "-6",
                "addr",
                "add",
                "2001:db8:1::2/64",
                "dev",
                "eth0",
                "nodad",
            ],
        );
        for dest in REMOTE_DESTINATIONS {
            let prefix = if dest.contains(':') { "128" } else { "32" };
            ip(
                &remote,
                &["addr", "add", &format!("{dest}/{prefix}"), "dev", "lo"],
            );
        }
        ip(&pod, &["route", "add", "default", "via", "10.244.1.1"]);
        ip(
            &pod,
            &["-6", "route", "add", "default", "via", "fd00:244::1"],
        );
        ip(&node, &["route", "add", "default", "via", "192.0.2.2"]);
        ip(
            &node,
            &["-6", "route", "add", "default", "via", "2001:db8:1::2"],
        );
        ip(
            &remote,
            &["route", "add", "10.244.1.0/24", "via", "192.0.2.1"],
        );
        ip(
            &remote,
            &[
                "-6",
                "route",
                "add",
                "fd00:244::/64",
                "via",
                "2001:db8:1::1",
            ],
        );
        node.sh(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        node.sh(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]);
        let remote_v4 = remote.udp_socket(format!("0.0.0.0:{V4_PORT}").parse().unwrap());
        let remote_v6 = remote.udp_socket(format!("[::]:{V6_PORT}").parse().unwrap());
        for s in [&remote_v4, &remote_v6] {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
        }
        Topology {
            pod,
            node,
            remote,
            remote_v4,
            remote_v6,
        }
    }

    /// Sends UDP from the pod to `destination` (owned by the remote) from a fresh
    /// source port, so each probe is a new conntrack entry, and returns the source
    /// address the remote saw. Bounded: at most 10 sends over about 2 s.
    pub fn observed_source(&self, destination: &str) -> IpAddr {
        let dest: IpAddr = destination.parse().expect("destination address");
        let (bind, port, receiver): (SocketAddr, u16, &UdpSocket) = match dest {
            IpAddr::V4(_) => ("0.0.0.0:0".parse().unwrap(), V4_PORT, &self.remote_v4),
            IpAddr::V6(_) => ("[::]:0".parse().unwrap(), V6_PORT, &self.remote_v6),
        };
        let sender = self.pod.udp_socket(bind);
        let nonce = format!(
            "probe-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let mut buf = [0u8; 128];
        for _ in 0..10 {
            // The pod's neighbour entries may still be resolving on the first send.
            let _ = sender.send_to(nonce.as_bytes(), SocketAddr::new(dest, port));
            let until = Instant::now() + Duration::from_millis(200);
            while Instant::now() < until {
                if let Ok((n, from)) = receiver.recv_from(&mut buf)
                    && &buf[..n] == nonce.as_bytes()
                {
                    return from.ip();
                }
            }
        }
        panic!("probe to {destination} never reached the remote namespace");
    }

    pub fn is_masqueraded(&self, destination: &str) -> bool {
        let source = self.observed_source(destination);
        let (pod, node) = if destination.contains(':') {
            (POD_V6, NODE_V6)
        } else {
            (POD_V4, NODE_V4)
        };
        match source.to_string() {
            s if s == node => true,
            s if s == pod => false,
            other => panic!("remote saw unexpected source {other} for {destination}"),
        }
    }
}

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
        use std::os::unix::fs::PermissionsExt;
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

/// Runs the agent binary's `args` (a command such as `status` or `cleanup`) in `ns`.
pub fn agent_command(ns: &Netns, args: &[&str]) -> Output {
    ns.command(agent_binary())
        .args(args)
        .output()
        .expect("run the agent binary")
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

impl Netns {
    /// Runs `work` on a thread inside this namespace: sockets it creates stay there.
    pub fn run_inside<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let handle = self.handle();
        std::thread::spawn(move || {
            setns(&handle, CloneFlags::CLONE_NEWNET).expect("setns");
            work()
        })
        .join()
        .expect("thread inside the namespace")
    }

    /// A TCP listener bound inside this namespace, e.g. to hold a port.
    pub fn tcp_listener(&self, bind: SocketAddr) -> std::net::TcpListener {
        self.run_inside(move || std::net::TcpListener::bind(bind).expect("bind tcp"))
    }
}
