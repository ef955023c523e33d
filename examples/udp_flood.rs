//! Bounded UDP load generator for `bench/datapath.sh`: every packet is a new connection.
//!
//! It writes whole IPv4/UDP packets to a raw socket (`IP_HDRINCL`) with `sendmmsg`, so the
//! sender costs almost nothing next to the forwarding path it measures. Packet `i` uses
//! source port `1024 + i % S` and destination port `dport_base + i / S` (S = `--sport-span`,
//! default 4096, at most 64512), so no two packets of a run share a 5-tuple and each one
//! makes the node create a conntrack entry and run its whole NAT chain.
//!
//! Why not S = 64512 (every source port before moving to the next destination port): the
//! node masquerades all of them to one address, and with `--random-fully` (the agent's
//! default) each connection gets a random port that must be free for that destination; as
//! 64,512 connections to one destination port approach the 64,512 ports there are, the
//! kernel retries more and more and finally drops packets, which measures NAT port
//! exhaustion instead of the rules. With S = 4096 a destination port is at most 6 % full.
//!
//! Safety bounds, enforced here whatever the arguments: at most 200,000 packets and at most
//! 3 seconds per run. Run it inside a network namespace (`ip netns exec POD ...`) whose
//! routes lead only to other namespaces; it sends only to the one `--dst` address given.
//!
//! Usage: `udp_flood --src A.B.C.D --dst A.B.C.D [--count N] [--millis MS]
//!         [--dport-base P] [--sport-span S] [--batch B] [--payload BYTES]`
//! Prints one line: `sent=N elapsed_ns=T rate_pps=R errors=E`.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use nix::libc;

const MAX_PACKETS: u64 = 200_000;
const MAX_DURATION: Duration = Duration::from_secs(3);
const SPORT_BASE: u32 = 1024;
const MAX_SPORT_SPAN: u32 = 65536 - SPORT_BASE;
const IP_HDR: usize = 20;
const UDP_HDR: usize = 8;

struct Args {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    count: u64,
    duration: Duration,
    dport_base: u16,
    batch: usize,
    payload: usize,
    sport_span: u32,
}

fn usage(message: &str) -> ! {
    eprintln!(
        "udp_flood: {message}\nusage: udp_flood --src IP --dst IP [--count N<=200000] [--millis MS<=3000] [--dport-base P] [--sport-span S<=64512] [--batch B] [--payload BYTES]"
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
        src: Ipv4Addr::UNSPECIFIED,
        dst: Ipv4Addr::UNSPECIFIED,
        count: MAX_PACKETS,
        duration: MAX_DURATION,
        dport_base: 10_000,
        batch: 32,
        payload: 18,
        sport_span: 4096,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--src" => args.src = parsed(&flag, &value),
            "--dst" => args.dst = parsed(&flag, &value),
            "--count" => args.count = parsed(&flag, &value),
            "--millis" => args.duration = Duration::from_millis(parsed(&flag, &value)),
            "--dport-base" => args.dport_base = parsed(&flag, &value),
            "--batch" => args.batch = parsed(&flag, &value),
            "--payload" => args.payload = parsed(&flag, &value),
            "--sport-span" => args.sport_span = parsed(&flag, &value),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if args.src.is_unspecified() || args.dst.is_unspecified() {
        usage("--src and --dst are required");
    }
    // The bounds are not negotiable: clamp rather than trust the caller.
    args.count = args.count.min(MAX_PACKETS);
    args.duration = args.duration.min(MAX_DURATION);
    args.batch = args.batch.clamp(1, 1024);
    args.payload = args.payload.min(1400);
    args.sport_span = args.sport_span.clamp(1, MAX_SPORT_SPAN);
    let max_dport = u64::from(args.dport_base) + args.count / u64::from(args.sport_span);
    if max_dport > 65535 {
        usage("--dport-base too high for --count");
    }
    args
}

/// Ports of packet `i`: unique for every i < 200,000 given a fixed destination.
fn ports(i: u64, dport_base: u16, span: u32) -> (u16, u16) {
    let sport = SPORT_BASE + (i % u64::from(span)) as u32;
    let dport = u64::from(dport_base) + i / u64::from(span);
    (sport as u16, dport as u16)
}

fn build_template(args: &Args) -> Vec<u8> {
    let total = IP_HDR + UDP_HDR + args.payload;
    let mut p = vec![0u8; total];
    p[0] = 0x45; // version 4, IHL 5
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes()); // the kernel rewrites it anyway
    p[6] = 0x40; // DF
    p[8] = 64; // TTL
    p[9] = libc::IPPROTO_UDP as u8;
    // Checksum (10..12) and id (4..6) left 0: with IP_HDRINCL the kernel fills both.
    p[12..16].copy_from_slice(&args.src.octets());
    p[16..20].copy_from_slice(&args.dst.octets());
    p[IP_HDR + 4..IP_HDR + 6].copy_from_slice(&((UDP_HDR + args.payload) as u16).to_be_bytes());
    // UDP checksum 0 = none (allowed for IPv4); the payload is a fixed marker.
    for (k, b) in p[IP_HDR + UDP_HDR..].iter_mut().enumerate() {
        *b = b"ima-bench-udp-flood"[k % 19];
    }
    p
}

fn open_raw_socket() -> i32 {
    // SAFETY: plain socket/setsockopt calls with valid pointers and sizes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        if fd < 0 {
            eprintln!("udp_flood: socket: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        let one: libc::c_int = 1;
        let rc = libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_HDRINCL,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        if rc != 0 {
            eprintln!("udp_flood: IP_HDRINCL: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        let sndbuf: libc::c_int = 4 << 20;
        let _ = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&sndbuf as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        fd
    }
}

fn main() {
    let args = parse_args();
    let fd = open_raw_socket();
    let template = build_template(&args);
    let batch = args.batch;
    let mut bufs: Vec<Vec<u8>> = vec![template.clone(); batch];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut dest: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    dest.sin_family = libc::AF_INET as libc::sa_family_t;
    dest.sin_addr.s_addr = u32::from_ne_bytes(args.dst.octets());
    // SAFETY: mmsghdr is plain data; all-zero is a valid value, fields are set below.
    let mut msgs: Vec<libc::mmsghdr> = (0..batch).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_name = (&mut dest as *mut libc::sockaddr_in).cast();
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }

    let mut sent: u64 = 0;
    let mut errors: u64 = 0;
    let started = Instant::now();
    let deadline = started + args.duration;
    // A batch is only started if one more of the last batch's length still ends in time,
    // so a slow path (500 packets/s: 64 ms a batch) cannot overrun the time bound either.
    let mut last_batch = Duration::ZERO;
    loop {
        let batch_start = Instant::now();
        if sent >= args.count || batch_start + last_batch >= deadline {
            break;
        }
        let n = ((args.count - sent) as usize).min(batch);
        for (k, buf) in bufs.iter_mut().take(n).enumerate() {
            let (sport, dport) = ports(sent + k as u64, args.dport_base, args.sport_span);
            buf[IP_HDR..IP_HDR + 2].copy_from_slice(&sport.to_be_bytes());
            buf[IP_HDR + 2..IP_HDR + 4].copy_from_slice(&dport.to_be_bytes());
        }
        // SAFETY: msgs[..n] point at live iovecs/buffers and at `dest`, all outliving the call.
        let rc = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, 0) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) => {
                    // Skip the packet that could not be queued so 5-tuples stay unique.
                    errors += 1;
                    sent += 1;
                    continue;
                }
                _ => {
                    eprintln!("udp_flood: sendmmsg: {err}");
                    std::process::exit(1);
                }
            }
        }
        sent += rc as u64;
        last_batch = batch_start.elapsed();
    }
    let elapsed = started.elapsed();
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    let ns = elapsed.as_nanos().max(1);
    println!(
        "sent={} elapsed_ns={} rate_pps={:.0} errors={}",
        sent - errors,
        ns,
        (sent - errors) as f64 * 1e9 / ns as f64,
        errors
    );
}
