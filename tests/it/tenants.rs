//! The agent among the node's other tenants: local processes holding connections to its
//! endpoint, the filesystem under its config (a directory removed and made again, an
//! inotify queue that overflows, a writer that truncates before it writes), and signals.
//! Each test runs the real binary in namespaces it creates.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ima_harness::*;
use nix::sys::signal::Signal;

use crate::AGENT;

const METRICS: &str = "127.0.0.1:9910";
const CHAIN: &str = "IP-MASQ-AGENT";

/// The environment variable that turns [`idle_connection_holder`] into the holder.
const HOLDER_ENV: &str = "IMA_HOLD_IDLE_CONNECTIONS";

/// The agent on iptables-nft with the HTTP endpoint at `METRICS`, not waiting for a sync.
fn start_with_endpoint(node: &Netns, config: &Path) -> AgentProcess {
    let metrics = format!("--metrics-address={METRICS}");
    AGENT.start(
        node,
        &[
            "--config",
            config.to_str().unwrap(),
            "--iptables-mode=nft",
            &metrics,
            "--tool-timeout=1s",
        ],
    )
}

/// The agent syncing every second with its endpoint answering probes.
fn serving_agent(node: &Netns) -> (TempDir, AgentProcess) {
    let dir = TempDir::new("cfg");
    let config = dir.path.join("ip-masq-agent");
    std::fs::write(&config, "resyncInterval: 1s\n").unwrap();
    let mut agent = start_with_endpoint(node, &config);
    agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
    assert!(eventually(Duration::from_secs(5), || probe(node) == Some(200)));
    (dir, agent)
}

/// A kubelet-style probe: a new connection, `GET /healthz`, 1 s for the connect and 1 s
/// for the answer (kubelet's default `timeoutSeconds: 1`).
fn probe(node: &Netns) -> Option<u16> {
    node.try_http_get(METRICS, "/healthz", Duration::from_secs(1))
        .map(|(status, _)| status)
}

fn count(log: &str, text: &str) -> usize {
    log.lines().filter(|l| l.contains(text)).count()
}

fn our_lines(ns: &Netns) -> String {
    chain_lines(&ns.save("iptables-nft-save"), CHAIN).join("\n")
}

/// Another process (this test binary, run again as [`idle_connection_holder`]) that
/// opens `count` connections to `address` inside `ns`, never sends a byte on them, and
/// holds them until it is killed by PID on drop; with `reopen`, it opens again every
/// half second each one the agent closed.
struct IdleHolder {
    child: Child,
    held: usize,
}

impl IdleHolder {
    fn start(ns: &Netns, address: &str, count: usize, reopen: bool) -> IdleHolder {
        let exe = std::env::current_exe().expect("the test binary");
        let mut child = ns
            .command(exe)
            .args([
                "--exact",
                "tenants::idle_connection_holder",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HOLDER_ENV, format!("{address} {count} {reopen}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the holder");
        track_child(child.id());
        let stdout = child.stdout.take().expect("holder stdout");
        // The holder prints `holding N` (after libtest's `test NAME ... `) once it has
        // tried every connection: bounded, as each connect has a deadline and it gives up
        // after a few failures in a row.
        let held = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| line.split("holding ").nth(1)?.trim().parse().ok())
            .unwrap_or(0);
        IdleHolder { child, held }
    }
}

impl Drop for IdleHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        untrack_child(self.child.id());
    }
}

/// Not a test of its own: the body of [`IdleHolder`]'s child process. Without its
/// environment variable it does nothing.
#[test]
#[ignore = "the child process of the endpoint tests"]
fn idle_connection_holder() {
    let Ok(spec) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let words: Vec<&str> = spec.split(' ').collect();
    let [address, count, reopen] = words[..] else {
        panic!("{HOLDER_ENV}: ADDRESS COUNT REOPEN, not {spec:?}");
    };
    let address: SocketAddr = address.parse().expect("address");
    let count: usize = count.parse().expect("count");
    let reopen = reopen == "true";
    // Room for the connections whatever the inherited soft limit.
    let wanted = (count + 64) as libc::rlim_t;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let threads = 16;
    let mut held: Vec<TcpStream> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    'connections: for _ in (t..count).step_by(threads) {
                        // A connect can meet a full backlog (the SYN is dropped and sent
                        // again after 1 s): a few tries, then this thread gives up.
                        for _ in 0..3 {
                            if let Ok(stream) =
                                TcpStream::connect_timeout(&address, Duration::from_secs(3))
                            {
                                mine.push(stream);
                                continue 'connections;
                            }
                        }
                        break;
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    println!("holding {}", held.len());
    let _ = std::io::stdout().flush();
    // Killed by the test long before this; bounded all the same.
    for _ in 0..600 {
        std::thread::sleep(Duration::from_millis(500));
        if !reopen {
            continue;
        }
        for stream in held.iter_mut() {
            if closed_by_peer(stream)
                && let Ok(again) = TcpStream::connect_timeout(&address, Duration::from_secs(1))
            {
                *stream = again;
            }
        }
    }
}

root_test!(
    /// Issue 16 #2: the 64-connection cap took its permit before accept(), so any local
    /// process holding 64 or more idle connections filled the backlog and kubelet's
    /// probes (1 s timeout) failed: the agent would be restarted forever.
    fn regression_idle_connections_of_another_process_starve_healthz() {
        let node = Netns::new("node");
        let (_dir, mut agent) = serving_agent(&node);

        let holder = IdleHolder::start(&node, METRICS, 1000, false);
        eprintln!("another process holds {} idle connections", holder.held);
        let resyncs = count(&agent.log(), "rules resynced");
        let probes = |rounds: usize| {
            let mut failed = Vec::new();
            for attempt in 0..rounds {
                match probe(&node) {
                    Some(200) => {}
                    other => failed.push((attempt, other)),
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            failed
        };
        let failed = probes(25);
        assert!(
            failed.is_empty(),
            "probes unanswered within 1 s while {} idle connections were held: {failed:?}\n{}",
            holder.held,
            agent.log()
        );
        assert!(
            holder.held >= 1000,
            "the holder could connect only {} times",
            holder.held
        );
        drop(holder);
        // Harder: the other process opens again every connection the agent closes.
        let holder = IdleHolder::start(&node, METRICS, 1000, true);
        let failed = probes(15);
        assert!(
            failed.is_empty(),
            "probes unanswered within 1 s while {} connections were held and reopened: {failed:?}\n{}",
            holder.held,
            agent.log()
        );
        assert!(
            count(&agent.log(), "rules resynced") >= resyncs + 3,
            "syncing stopped:\n{}",
            agent.log()
        );
        assert!(agent.is_running());
    }
);

root_test!(
    /// Hostile review of issue 16: a request head that never ends was buffered up to
    /// hyper's default (~400 KB per connection): 64 local connections doing so held 48 MB
    /// of a pod limited to 64 MiB. A head is a GET line and a few headers: past 16 KiB the
    /// connection is refused, and the endpoint keeps answering.
    fn regression_a_request_head_over_16_kib_is_refused() {
        let node = Netns::new("node");
        let (_dir, mut agent) = serving_agent(&node);
        let mut stream = idle_connections(&node, 1).pop().expect("a connection");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: ".to_vec();
        head.resize(head.len() + 20 * 1024, b'a');
        // The agent may close while the rest is still being sent.
        let _ = stream.write_all(&head);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 431"),
            "a 20 KiB head was answered {answer:?}"
        );
        assert_eq!(probe(&node), Some(200));
        assert!(agent.is_running());
    }
);

/// `count` connections to `METRICS` from this process that never send a byte.
fn idle_connections(node: &Netns, count: usize) -> Vec<TcpStream> {
    node.idle_tcp_connections(METRICS.parse().expect("address"), count)
}

/// Whether the agent closed `stream` (EOF or reset), without waiting.
fn closed_by_peer(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    let closed = match (&*stream).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).expect("blocking");
    closed
}

/// Sets the soft limit on descriptors of `pid` (the hard one stays: raising it again
/// would need CAP_SYS_RESOURCE).
fn set_fd_limit(pid: u32, limit: usize) {
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}:")])
        .status()
        .expect("run prlimit");
    assert!(status.success());
}

root_test!(
    /// Issue 16, suspected and confirmed: after one EMFILE the connection cap dropped to
    /// the connections open at that moment, for the rest of the process's life.
    fn regression_connection_cap_stays_low_after_one_emfile() {
        let node = Netns::new("node");
        let (_dir, mut agent) = serving_agent(&node);

        // Eight descriptors left: the connections take them and accept() fails.
        let pid = agent.pid();
        let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .count();
        set_fd_limit(pid, open + 8);
        let clients = idle_connections(&node, 40);
        agent.wait_for_log("out of file descriptors", 1, Duration::from_secs(10));
        // The descriptors come back (the limit is raised, the clients go).
        drop(clients);
        set_fd_limit(pid, 4096);
        // Whatever the endpoint does to recover takes at most this long.
        eventually(Duration::from_secs(40), || {
            agent.log().contains("serving up to 64 connections again")
        });
        let held = idle_connections(&node, 30);
        std::thread::sleep(Duration::from_millis(500));
        let answered = (0..5).filter(|_| probe(&node) == Some(200)).count();
        let dropped = held.iter().filter(|s| closed_by_peer(s)).count();
        assert_eq!(
            (answered, dropped),
            (5, 0),
            "(probes answered of 5, idle connections closed of 30) long after the descriptors came back\n{}",
            agent.log()
        );
    }
);

root_test!(
    /// Issue 16 #3: when the config's directory was removed and made again (a volume
    /// remount), the watch was gone for good: changes waited for the resync (60 s).
    fn regression_config_watch_is_lost_when_its_directory_is_made_again() {
        let node = Netns::new("node");
        let dir = TempDir::new("cfg");
        let config_dir = dir.path.join("config");
        let config = config_dir.join("ip-masq-agent");
        let write = |prefix: &str| {
            std::fs::write(
                &config,
                format!("nonMasqueradeCIDRs: [10.0.0.0/8, {prefix}]\n"),
            )
            .unwrap()
        };
        std::fs::create_dir(&config_dir).unwrap();
        write("10.1.0.0/16");
        let mut agent = AGENT.start(
            &node,
            &["--config", config.to_str().unwrap(), "--iptables-mode=nft"],
        );
        agent.wait_for_log("rules applied", 1, Duration::from_secs(20));

        std::fs::remove_dir_all(&config_dir).unwrap();
        std::fs::create_dir(&config_dir).unwrap();
        write("10.2.0.0/16");
        // With the default 60 s resync only the watch can explain these.
        agent.wait_for_log("config changed; rules applied", 1, Duration::from_secs(10));
        assert!(our_lines(&node).contains("10.2.0.0/16"), "{}", agent.log());
        for (n, prefix) in [(2, "10.3.0.0/16"), (3, "10.4.0.0/16")] {
            write(prefix);
            agent.wait_for_log("config changed; rules applied", n, Duration::from_secs(10));
            assert!(our_lines(&node).contains(prefix), "{}", agent.log());
        }
        assert!(
            agent.log().contains("watching the config directory again"),
            "the re-armed watch is not logged:\n{}",
            agent.log()
        );
    }
);

/// Runs `script` in the mount namespace of `agent` (started as a container: nothing is
/// mounted on the host) with `content` on its standard input.
fn in_agent_mounts(agent: &AgentProcess, script: &str, content: &str) {
    let mut child = std::process::Command::new("nsenter")
        .args([
            "-t",
            &agent.agent_pid().to_string(),
            "-m",
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nsenter");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(content.as_bytes())
        .expect("write the config");
    assert!(child.wait().expect("nsenter").success(), "{script}");
}

/// Mounts a tmpfs over `dir` holding `content` as the config file.
fn remount_config_dir(agent: &AgentProcess, dir: &Path, content: &str) {
    let dir = dir.to_str().expect("utf-8 path");
    in_agent_mounts(
        agent,
        &format!("mount -t tmpfs ima-remount {dir} && cat > {dir}/ip-masq-agent"),
        content,
    );
}

/// A config file in a directory of its own, and the agent on it, started as a container.
fn agent_on_a_plain_dir(node: &Netns, content: &str) -> (TempDir, PathBuf, AgentProcess) {
    let dir = TempDir::new("cfg");
    let config = dir.path.join("ip-masq-agent");
    std::fs::write(&config, content).unwrap();
    let mut agent = AGENT.start_as_container(
        node,
        &["--config", config.to_str().unwrap(), "--iptables-mode=nft"],
    );
    agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
    (dir, config, agent)
}

root_test!(
    /// Issue 16 #3 as a volume remount: a new filesystem mounted over the config's
    /// directory makes no inotify event at all. The agent finds the directory at the path
    /// is another one, re-arms the watch and logs it; later changes are seen at once.
    fn regression_config_watch_is_lost_when_its_directory_is_remounted() {
        let node = Netns::new("node");
        let with = |prefix: &str| {
            format!("nonMasqueradeCIDRs: [10.0.0.0/8, {prefix}]\nresyncInterval: 3s\n")
        };
        let (dir, config, mut agent) = agent_on_a_plain_dir(
            &node,
            "nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 3s\n",
        );
        remount_config_dir(&agent, &dir.path, &with("10.1.0.0/16"));
        agent.wait_for_log(
            "watching the config directory again",
            1,
            Duration::from_secs(10),
        );
        agent.wait_for_log("config changed; rules applied", 1, Duration::from_secs(10));
        assert!(our_lines(&node).contains("10.1.0.0/16"), "{}", agent.log());
        // The watch is on the new filesystem: the next change is an event, not a resync.
        let seen = count(&agent.log(), "config directory changed: reloading");
        in_agent_mounts(
            &agent,
            &format!("cat > {}", config.to_str().expect("utf-8 path")),
            &with("10.2.0.0/16"),
        );
        agent.wait_for_log("config changed; rules applied", 2, Duration::from_secs(10));
        assert!(our_lines(&node).contains("10.2.0.0/16"), "{}", agent.log());
        assert!(
            count(&agent.log(), "config directory changed: reloading") > seen,
            "the watch did not see the change:\n{}",
            agent.log()
        );
    }
);

root_test!(
    /// Hostile review of issue 16: a remount of the config's directory makes no inotify
    /// event, so with the default resync (or a long one) a new config waited for minutes.
    /// A second's look at the directory's identity notices it.
    fn regression_a_remount_is_noticed_within_seconds_not_at_the_resync() {
        let node = Netns::new("node");
        let (dir, _config, mut agent) = agent_on_a_plain_dir(
            &node,
            "nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 10m\n",
        );
        remount_config_dir(
            &agent,
            &dir.path,
            "nonMasqueradeCIDRs: [10.0.0.0/8, 10.1.0.0/16]\nresyncInterval: 10m\n",
        );
        agent.wait_for_log("config changed; rules applied", 1, Duration::from_secs(10));
        assert!(our_lines(&node).contains("10.1.0.0/16"), "{}", agent.log());
        assert!(
            agent
                .log()
                .contains("the config directory was remounted or replaced"),
            "{}",
            agent.log()
        );
    }
);

root_test!(
    /// Hostile review of issue 16: removing the volume's entries (`rm -rf` of the
    /// directory's contents, a volume torn down and set up again) removes `..data`,
    /// which the agent took for a committed update: it read "no file" at once and
    /// applied the defaults node-wide without the grace a missing file gets.
    fn regression_a_removed_volume_is_no_committed_update() {
        let node = Netns::new("node");
        let content = "nonMasqueradeCIDRs: [10.0.0.0/8]\n";
        let mut volume = ConfigMapVolume::new(content);
        let mut agent = AGENT.start_synced(&node, &volume, &["--iptables-mode=nft"]);
        let monitor = NftMonitor::start(&node);
        for entry in ["..data", CONFIG_KEY] {
            std::fs::remove_file(volume.dir.path.join(entry)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        volume.update(content);
        std::os::unix::fs::symlink(
            format!("..data/{CONFIG_KEY}"),
            volume.dir.path.join(CONFIG_KEY),
        )
        .unwrap();
        // Past the grace period: nothing came.
        std::thread::sleep(Duration::from_millis(1500));
        let defaults = lines_mentioning(&monitor, &DEFAULT_ONLY);
        assert!(
            defaults.is_empty(),
            "the defaults reached the kernel: {defaults:?}\n{}",
            agent.log()
        );
        assert_eq!(count(&agent.log(), "config changed; rules applied"), 0);
        assert!(agent.is_running());
    }
);

root_test!(
    /// Issue 16 #3, the other shape: `--config` inside kubelet's `..data` watches a
    /// directory that every ConfigMap update removes.
    fn regression_config_watch_inside_data_is_lost_after_one_update() {
        let node = Netns::new("node");
        let mut volume = ConfigMapVolume::new("nonMasqueradeCIDRs: [10.0.0.0/8]\n");
        let inside = volume.dir.path.join("..data").join(CONFIG_KEY);
        let mut agent = AGENT.start(
            &node,
            &["--config", inside.to_str().unwrap(), "--iptables-mode=nft"],
        );
        agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
        for (n, prefix) in [(1, "10.1.0.0/16"), (2, "10.2.0.0/16"), (3, "10.3.0.0/16")] {
            volume.update(&format!("nonMasqueradeCIDRs: [10.0.0.0/8, {prefix}]\n"));
            agent.wait_for_log("config changed; rules applied", n, Duration::from_secs(10));
            assert!(our_lines(&node).contains(prefix), "{}", agent.log());
        }
    }
);

root_test!(
    /// Issue 16 #4: an inotify queue overflow (notify's event with the Rescan flag and
    /// no paths) was dropped, so the update lost in it waited for the resync.
    fn regression_inotify_queue_overflow_is_dropped() {
        let node = Netns::new("node");
        let mut volume = ConfigMapVolume::new("nonMasqueradeCIDRs: [10.0.0.0/8]\n");
        let mut agent = AGENT.start_synced(&node, &volume, &["--iptables-mode=nft"]);
        let queue: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(16384);
        // While the agent is stopped its queue fills with events on a file nobody reads
        // (open, modify, close: three each) ...
        agent.signal(Signal::SIGSTOP);
        let noise = volume.dir.path.join("noise");
        for _ in 0..queue / 3 + 1000 {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&noise)
                .unwrap();
            file.write_all(b"x").unwrap();
        }
        // ... so the events of this update are lost to the overflow.
        volume.update("nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n");
        agent.signal(Signal::SIGCONT);
        agent.wait_for_log("config changed; rules applied", 1, Duration::from_secs(10));
        assert!(our_lines(&node).contains("203.0.113.0/24"));
        assert!(
            agent.log().contains("overflow"),
            "the overflow is not logged:\n{}",
            agent.log()
        );
    }
);

root_test!(
    /// Issue 16 #9: with --cleanup-on-exit a second SIGTERM (kubelet, or an impatient
    /// operator) killed the clean-up's tools and left every rule; the log said the rules
    /// were left in place and then removed them.
    fn regression_second_sigterm_aborts_the_cleanup() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new("");
        let shims = Shims::new();
        // The clean-up's write takes a while, so the second signal lands during it.
        shims.add("iptables-nft-restore", "sleep 1");
        let path = shims.path();
        let config = volume.path();
        let mut agent = AGENT.start_with(
            &node,
            &[
                "--config",
                config.to_str().unwrap(),
                "--cleanup-on-exit",
                "--iptables-mode=nft",
            ],
            &[],
            &[("PATH", &path)],
        );
        agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
        assert!(!our_lines(&node).is_empty());
        shims.fault_on("iptables-nft-restore");
        agent.signal(Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(300));
        agent.signal(Signal::SIGTERM);
        assert!(
            eventually(Duration::from_secs(15), || !agent.is_running()),
            "the agent did not exit"
        );
        let log = agent.log();
        assert_eq!(our_lines(&node), "", "rules left behind:\n{log}");
        assert!(
            !log.contains("leaving the rules in place"),
            "the log says the rules stay:\n{log}"
        );
        assert!(
            log.contains("clean-up is under way"),
            "the second signal is not explained:\n{log}"
        );
    }
);

/// Everything `monitor` saw mention one of `prefixes`.
fn lines_mentioning(monitor: &NftMonitor, prefixes: &[&str]) -> Vec<String> {
    monitor
        .text()
        .lines()
        .filter(|line| prefixes.iter().any(|p| line.contains(p)))
        .map(str::to_owned)
        .collect()
}

/// A plain config file (no kubelet volume) for `rewrite` tests.
struct PlainConfig {
    _dir: TempDir,
    file: PathBuf,
}

impl PlainConfig {
    fn new(text: &str) -> PlainConfig {
        let dir = TempDir::new("cfg");
        let file = dir.path.join("ip-masq-agent");
        std::fs::write(&file, text).unwrap();
        PlainConfig { _dir: dir, file }
    }
}

const DEFAULT_ONLY: [&str; 2] = ["172.16.0.0/12", "192.168.0.0/16"];

on_both_backends!(regression_a_non_atomic_write_applies_the_defaults);

/// Issue 15 #8: truncate the file, write it 50 ms later: the defaults were applied
/// node-wide in between (every decision flipped twice, conntrack deletions queued).
fn regression_a_non_atomic_write_applies_the_defaults(backend: &str) {
    let node = Netns::new("node");
    let config = PlainConfig::new("nonMasqueradeCIDRs: [10.0.0.0/8]\n");
    let mut agent = AGENT.start(
        &node,
        &[
            "--config",
            config.file.to_str().unwrap(),
            backend,
            "--iptables-mode=nft",
        ],
    );
    agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
    // Every write to nf_tables (nft's and iptables-nft's) from here on.
    let monitor = NftMonitor::start(&node);
    for round in 0..3 {
        drop(std::fs::File::create(&config.file).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        let prefix = format!("203.0.113.{}/32", round);
        std::fs::write(
            &config.file,
            format!("nonMasqueradeCIDRs: [10.0.0.0/8, {prefix}]\n"),
        )
        .unwrap();
        agent.wait_for_log(
            "config changed; rules applied",
            round + 1,
            Duration::from_secs(10),
        );
    }
    // Past the grace period: nothing more comes.
    std::thread::sleep(Duration::from_millis(1500));
    let defaults = lines_mentioning(&monitor, &DEFAULT_ONLY);
    assert!(
        defaults.is_empty(),
        "the defaults reached the kernel: {defaults:?}\n{}",
        agent.log()
    );
    assert_eq!(
        count(&agent.log(), "config changed; rules applied"),
        3,
        "{}",
        agent.log()
    );
}

root_test!(
    /// The grace period delays, never drops: a config file that is removed and stays
    /// removed still brings the defaults (as upstream does), and says so.
    fn a_removed_config_file_still_brings_the_defaults() {
        let node = Netns::new("node");
        let config = PlainConfig::new("nonMasqueradeCIDRs: [10.0.0.0/8]\n");
        let mut agent = AGENT.start(
            &node,
            &[
                "--config",
                config.file.to_str().unwrap(),
                "--iptables-mode=nft",
            ],
        );
        agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
        let removed = Instant::now();
        std::fs::remove_file(&config.file).unwrap();
        agent.wait_for_log("config changed; rules applied", 1, Duration::from_secs(10));
        eprintln!("defaults applied {:?} after the removal", removed.elapsed());
        let rules = our_lines(&node);
        assert!(DEFAULT_ONLY.iter().all(|p| rules.contains(p)), "{rules}");
        assert!(
            agent
                .log()
                .contains("config file removed; reverting to the default values"),
            "{}",
            agent.log()
        );
    }
);

root_test!(
    /// The idle resync skips reading an unchanged file, but never a changed one: an edit
    /// in place behind kubelet's symlinks, of the same size, which the directory watch
    /// cannot see, is read at the next resync because the file's identity moved.
    fn an_edit_the_watch_cannot_see_is_read_at_the_next_resync() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new(
            "nonMasqueradeCIDRs: [10.0.0.0/8, 10.1.0.0/16]\nresyncInterval: 500ms\n",
        );
        let mut agent = AGENT.start_synced(&node, &volume, &["--iptables-mode=nft"]);
        // Two seconds after the write the file's stamps prove it; then resyncs skip it.
        agent.wait_for_log("config_read=false", 3, Duration::from_secs(10));
        let behind_links = volume.dir.path.join("..data").join(CONFIG_KEY);
        std::fs::write(
            &behind_links,
            "nonMasqueradeCIDRs: [10.0.0.0/8, 10.2.0.0/16]\nresyncInterval: 500ms\n",
        )
        .unwrap();
        agent.wait_for_log("config changed; rules applied", 1, Duration::from_secs(10));
        let rules = our_lines(&node);
        assert!(
            rules.contains("10.2.0.0/16") && !rules.contains("10.1.0.0/16"),
            "{rules}"
        );
    }
);
