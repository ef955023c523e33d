//! ConfigMap swap -> first packet with the new behaviour, for `bench/reload.sh`.
//!
//! The script builds a pod -> node -> remote topology of network namespaces, lays out a
//! kubelet-style ConfigMap volume (`ip-masq-agent -> ..data/ip-masq-agent`, `..data ->
//! ..<timestamp>`) holding config A and starts the agent in the node with `--config` on it.
//! This program then swaps the volume `--swaps` times, alternating B, A, B, ...:
//!
//! * A: `nonMasqueradeCIDRs` holds `--dst`'s /24, so the remote sees the pod's address;
//! * B: it does not, so the remote sees the node's address (masquerade).
//!
//! Each swap is done the way kubelet's atomic writer does it: a new `..<timestamp>`
//! directory with the file, a `..data_tmp` symlink to it, `rename(..data_tmp, ..data)`,
//! then the old directory removed. The clock starts just before the rename. From then on a
//! UDP probe leaves the pod every `--interval-us` from the next socket of a pool bound to
//! consecutive source ports, so each probe is a new 5-tuple and makes the node create a
//! new conntrack entry (and run the NAT rules afresh); before every swap the node's
//! conntrack table is flushed, so the pool can be reused. A thread in the remote namespace
//! timestamps every arrival. The latency of a swap is the arrival time of the first probe
//! with the new source address minus the rename time.
//!
//! Bounds, whatever the arguments: at most 100 swaps, at most 3,000 probes and 3 s of
//! probing per swap, probes only to `--dst` (an address the script gives the remote
//! namespace), 5 s at most waiting for any agent log line.
//!
//! Output (stdout): one `swap ...` line per swap and a final `summary ...` line, as
//! `key=value` fields for the script to format.
//!
//! Usage: `reload_latency --pod NS --node NS --remote NS --volume DIR --log AGENT_LOG
//!         [--swaps 20] [--dst 203.0.113.10] [--port 9999] [--pod-ip 10.244.1.2]
//!         [--node-ip 192.0.2.1] [--pool 3200] [--sport-base 20000] [--interval-us 1000]`

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::libc;
use nix::sched::{CloneFlags, setns};

const MAX_SWAPS: u32 = 100;
const MAX_PROBES_PER_SWAP: usize = 3000;
const MAX_PROBING: Duration = Duration::from_secs(3);
const LOG_WAIT: Duration = Duration::from_secs(5);
const CONFIG_KEY: &str = "ip-masq-agent";

struct Args {
    pod: String,
    node: String,
    remote: String,
    volume: PathBuf,
    log: PathBuf,
    swaps: u32,
    dst: Ipv4Addr,
    port: u16,
    pod_ip: Ipv4Addr,
    node_ip: Ipv4Addr,
    pool: usize,
    sport_base: u16,
    interval: Duration,
}

fn usage(message: &str) -> ! {
    eprintln!(
        "reload_latency: {message}\nusage: reload_latency --pod NS --node NS --remote NS --volume DIR --log FILE [--swaps N<=100] [--dst IP] [--port P] [--pod-ip IP] [--node-ip IP] [--pool N] [--sport-base P] [--interval-us US]"
    );
    std::process::exit(2);
}

fn parsed<T: std::str::FromStr>(flag: &str, value: &str) -> T {
    value
        .parse()
        .unwrap_or_else(|_| usage(&format!("bad value {value:?} for {flag}")))
}

fn parse_args() -> Args {
    let mut args = Args {
        pod: String::new(),
        node: String::new(),
        remote: String::new(),
        volume: PathBuf::new(),
        log: PathBuf::new(),
        swaps: 20,
        dst: Ipv4Addr::new(203, 0, 113, 10),
        port: 9999,
        pod_ip: Ipv4Addr::new(10, 244, 1, 2),
        node_ip: Ipv4Addr::new(192, 0, 2, 1),
        pool: 3200,
        sport_base: 20000,
        interval: Duration::from_micros(1000),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--pod" => args.pod = value,
            "--node" => args.node = value,
            "--remote" => args.remote = value,
            "--volume" => args.volume = PathBuf::from(value),
            "--log" => args.log = PathBuf::from(value),
            "--swaps" => args.swaps = parsed(&flag, &value),
            "--dst" => args.dst = parsed(&flag, &value),
            "--port" => args.port = parsed(&flag, &value),
            "--pod-ip" => args.pod_ip = parsed(&flag, &value),
            "--node-ip" => args.node_ip = parsed(&flag, &value),
            "--pool" => args.pool = parsed(&flag, &value),
            "--sport-base" => args.sport_base = parsed(&flag, &value),
            "--interval-us" => args.interval = Duration::from_micros(parsed(&flag, &value)),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if args.pod.is_empty() || args.node.is_empty() || args.remote.is_empty() {
        usage("--pod, --node and --remote are required");
    }
    if args.volume.as_os_str().is_empty() || args.log.as_os_str().is_empty() {
        usage("--volume and --log are required");
    }
    if args.swaps == 0 || args.swaps > MAX_SWAPS {
        usage(&format!("--swaps must be 1..={MAX_SWAPS}"));
    }
    if args.pool < 100 || args.pool > 10_000 {
        usage("--pool must be 100..=10000");
    }
    if usize::from(args.sport_base) + args.pool > 65_535 || args.sport_base < 1024 {
        usage("--sport-base + --pool must fit in 1024..65535");
    }
    if args.interval < Duration::from_micros(100) || args.interval > Duration::from_millis(50) {
        usage("--interval-us must be 100..=50000");
    }
    args
}

/// The two configs. A keeps the destination's /24 unmasqueraded, B does not.
fn config(keep_pod_address: bool, dst: Ipv4Addr) -> String {
    let o = dst.octets();
    let extra = if keep_pod_address {
        format!("  - {}.{}.{}.0/24\n", o[0], o[1], o[2])
    } else {
        String::new()
    };
    format!("nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n{extra}resyncInterval: 60s\n")
}

/// Runs `f` on a thread that has joined network namespace `name` (the sockets it makes
/// stay in that namespace).
fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let handle = File::open(Path::new("/run/netns").join(name))
        .unwrap_or_else(|e| panic!("open /run/netns/{name}: {e}"));
    std::thread::spawn(move || {
        setns(&handle, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("namespace thread")
}

/// Raises the open-file limit to its hard maximum (the socket pool needs a few thousand).
fn raise_nofile() {
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// One arrival at the remote: when, from which address, and the probe's (swap, index).
struct Arrival {
    at: Instant,
    source: IpAddr,
    swap: u32,
    index: u32,
}

fn start_receiver(
    remote: &str,
    port: u16,
    stop: Arc<AtomicBool>,
) -> (Receiver<Arrival>, std::thread::JoinHandle<()>) {
    let socket = in_netns(remote, move || {
        UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))).expect("bind receiver")
    });
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .expect("read timeout");
    let (tx, rx) = channel();
    let handle = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let at = Instant::now();
                if n == 8 {
                    let swap = u32::from_be_bytes(buf[0..4].try_into().unwrap());
                    let index = u32::from_be_bytes(buf[4..8].try_into().unwrap());
                    let arrival = Arrival {
                        at,
                        source: from.ip(),
                        swap,
                        index,
                    };
                    if tx.send(arrival).is_err() {
                        return;
                    }
                }
            }
        }
    });
    (rx, handle)
}

fn payload(swap: u32, index: usize) -> [u8; 8] {
    let mut p = [0u8; 8];
    p[0..4].copy_from_slice(&swap.to_be_bytes());
    p[4..8].copy_from_slice(&(index as u32).to_be_bytes());
    p
}

/// The agent's log lines that contain `text`.
fn log_lines(log: &Path, text: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(text))
        .map(str::to_owned)
        .collect()
}

/// Waits (bounded) until the log holds `count` lines with `text`; returns them.
fn wait_log(log: &Path, text: &str, count: usize) -> Vec<String> {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let lines = log_lines(log, text);
        if lines.len() >= count {
            return lines;
        }
        if Instant::now() > deadline {
            eprintln!(
                "reload_latency: no {text:?} x{count} in the agent log within {LOG_WAIT:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A `key=value` or `key="value"` field of a log line.
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = line[start..].trim_start_matches('"');
    let end = rest.find(['"', ' ']).unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

/// The log line's leading RFC 3339 UTC timestamp (`2026-11-23T06:05:00.123456Z`) as
/// seconds since the epoch.
fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

fn wall_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn flush_conntrack(node: &str) {
    let status = Command::new("ip")
        .args(["netns", "exec", node, "conntrack", "-F"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run conntrack");
    assert!(status.success(), "conntrack -F in {node} failed");
}

/// The volume's current `..data` target (a directory name inside the volume).
fn current_data_dir(volume: &Path) -> String {
    std::fs::read_link(volume.join("..data"))
        .expect("..data symlink")
        .to_string_lossy()
        .into_owned()
}

/// Kubelet's atomic writer, up to the rename: the new directory and `..data_tmp`.
fn prepare_swap(volume: &Path, generation: u32, content: &str) -> String {
    let name = format!("..2026_11_23_bench.{generation:09}");
    let dir = volume.join(&name);
    std::fs::create_dir(&dir).expect("mkdir new data dir");
    let mut file = File::create(dir.join(CONFIG_KEY)).expect("create config");
    file.write_all(content.as_bytes()).expect("write config");
    drop(file);
    name
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    // Nearest rank: the smallest value with at least p % of the samples at or below it.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn main() {
    let args = parse_args();
    raise_nofile();

    // The pod's socket pool: one socket per source port, bound before any swap.
    let (pool, base) = (args.pool, args.sport_base);
    let pod_ip = args.pod_ip;
    let sockets: Vec<UdpSocket> = in_netns(&args.pod, move || {
        (0..pool)
            .map(|i| {
                UdpSocket::bind(SocketAddr::from((pod_ip, base + i as u16)))
                    .unwrap_or_else(|e| panic!("bind pod port {}: {e}", base as usize + i))
            })
            .collect()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let (arrivals, receiver) = start_receiver(&args.remote, args.port, stop.clone());
    let destination = SocketAddr::from((args.dst, args.port));
    let expected = |keep_pod_address: bool| -> IpAddr {
        if keep_pod_address {
            IpAddr::V4(args.pod_ip)
        } else {
            IpAddr::V4(args.node_ip)
        }
    };

    let changed_before = log_lines(&args.log, "config changed; rules applied").len();
    let resynced_before = log_lines(&args.log, "rules resynced").len();
    let mut latencies = Vec::new();
    let mut by_direction: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut total_probes = 0usize;
    let mut late_old = 0usize;
    let mut mismatched_checks = 0usize;
    // Config A is in force at the start; swap 1 writes B.
    let mut keep_now = true;
    for swap in 1..=args.swaps {
        let keep_next = !keep_now;
        flush_conntrack(&args.node);
        std::thread::sleep(Duration::from_millis(50));
        while arrivals.try_recv().is_ok() {}

        // Check that the old behaviour is in force (and warm the neighbour caches).
        let mut next = 0usize;
        let mut old_source = None;
        for _ in 0..10 {
            let _ = sockets[next].send_to(&payload(swap, next), destination);
            next += 1;
            let until = Instant::now() + Duration::from_millis(200);
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                if let Ok(a) = arrivals.recv_timeout(left)
                    && a.swap == swap
                {
                    old_source = Some(a.source);
                    break;
                }
            }
            if old_source.is_some() {
                break;
            }
        }
        let old_source = old_source.unwrap_or_else(|| {
            eprintln!("reload_latency: no probe reached the remote before swap {swap}");
            std::process::exit(1);
        });
        if old_source != expected(keep_now) {
            mismatched_checks += 1;
            eprintln!(
                "reload_latency: before swap {swap} the remote saw {old_source}, expected {}",
                expected(keep_now)
            );
        }

        // The swap, timed from just before the rename.
        let old_dir = current_data_dir(&args.volume);
        let new_dir = prepare_swap(&args.volume, swap, &config(keep_next, args.dst));
        let tmp = args.volume.join("..data_tmp");
        symlink(&new_dir, &tmp).expect("..data_tmp symlink");
        let wall0 = wall_now();
        let t0 = Instant::now();
        std::fs::rename(&tmp, args.volume.join("..data")).expect("rename ..data_tmp");
        std::fs::remove_dir_all(args.volume.join(&old_dir)).expect("remove old data dir");

        let first_probe = next;
        let mut first_new: Option<(f64, usize)> = None;
        let mut last_old_index: Option<usize> = None;
        let mut k = 0usize;
        while first_new.is_none()
            && k < MAX_PROBES_PER_SWAP
            && next < sockets.len()
            && t0.elapsed() < MAX_PROBING
        {
            let _ = sockets[next].send_to(&payload(swap, next), destination);
            next += 1;
            k += 1;
            let due = t0 + args.interval * k as u32;
            loop {
                while let Ok(a) = arrivals.try_recv() {
                    if a.swap != swap || (a.index as usize) < first_probe {
                        continue;
                    }
                    if a.source == expected(keep_next) {
                        if first_new.is_none() {
                            first_new = Some((
                                a.at.duration_since(t0).as_secs_f64() * 1e3,
                                a.index as usize,
                            ));
                        }
                    } else {
                        last_old_index = Some(
                            last_old_index.map_or(a.index as usize, |i| i.max(a.index as usize)),
                        );
                    }
                }
                let now = Instant::now();
                if first_new.is_some() || now >= due {
                    break;
                }
                std::thread::sleep((due - now).min(Duration::from_micros(200)));
            }
        }
        let Some((latency_ms, first_new_index)) = first_new else {
            eprintln!(
                "reload_latency: swap {swap}: no probe with the new source {} within {k} probes / {:?}",
                expected(keep_next),
                t0.elapsed()
            );
            std::process::exit(1);
        };
        total_probes += k;
        // Stragglers: probes sent after the first new-behaviour one must all be new too.
        std::thread::sleep(Duration::from_millis(30));
        while let Ok(a) = arrivals.try_recv() {
            if a.swap == swap && a.source != expected(keep_next) {
                last_old_index =
                    Some(last_old_index.map_or(a.index as usize, |i| i.max(a.index as usize)));
            }
        }
        if let Some(i) = last_old_index
            && i > first_new_index
        {
            late_old += 1;
        }

        let lines = wait_log(
            &args.log,
            "config changed; rules applied",
            changed_before + swap as usize,
        );
        let line = &lines[changed_before + swap as usize - 1];
        let logged_ms = log_time(line).map_or(f64::NAN, |t| (t - wall0) * 1e3);
        let elapsed_ms = field(line, "elapsed_ms").unwrap_or_default();
        let processes = field(line, "processes").unwrap_or_default();
        println!(
            "swap n={swap} to={} latency_ms={latency_ms:.3} probes={} logged_ms={logged_ms:.3} sync_elapsed_ms={elapsed_ms} processes={processes} last_old_probe={} first_new_probe={}",
            if keep_next {
                "pod-address"
            } else {
                "masquerade"
            },
            first_new_index - first_probe + 1,
            last_old_index.map_or("none".to_string(), |i| (i as isize - first_probe as isize
                + 1)
            .to_string()),
            first_new_index - first_probe + 1,
        );
        latencies.push(latency_ms);
        by_direction[usize::from(keep_next)].push(latency_ms);
        keep_now = keep_next;
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = receiver.join();

    let changed = log_lines(&args.log, "config changed; rules applied").len() - changed_before;
    let resynced = log_lines(&args.log, "rules resynced").len() - resynced_before;
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    let median = |v: &mut Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let med = median(&mut sorted.clone());
    let [mut to_masq, mut to_pod] = by_direction;
    println!(
        "summary swaps={} median_ms={med:.3} p99_ms={:.3} min_ms={:.3} max_ms={:.3} median_to_masquerade_ms={:.3} median_to_pod_address_ms={:.3} probes={total_probes} changed_syncs={changed} other_syncs={resynced} late_old={late_old} bad_checks={mismatched_checks}",
        sorted.len(),
        percentile(&sorted, 99.0),
        sorted[0],
        sorted[sorted.len() - 1],
        median(&mut to_masq),
        median(&mut to_pod),
    );
}
