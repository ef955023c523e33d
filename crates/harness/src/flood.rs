//! A bounded UDP load generator in which every packet is a new connection.
//!
//! It writes whole IPv4/UDP packets to a raw socket (`IP_HDRINCL`) with `sendmmsg`, so
//! the sender costs almost nothing next to the forwarding path it measures. Packet `i`
//! uses source port `1024 + i % span` and destination port `dport_base + i / span`, so no
//! two packets of a run share a 5-tuple and each one makes the next hop create a
//! conntrack entry and run its whole NAT chain.
//!
//! Why not span = 64,512 (every source port before moving on): a node masquerades them
//! all to one address, and with `--random-fully` (the agent's default) each connection
//! needs a free random port for that destination; as 64,512 connections to one port
//! approach the 64,512 ports there are, the kernel retries more and more and finally
//! drops packets, which measures NAT port exhaustion instead of the rules. With span 4,096
//! a destination port is at most 6 % full.
//!
//! Bounds, whatever the caller asks: at most 200,000 packets and 3 s per run, and the
//! socket lives in the namespace given (whose routes lead only to other namespaces).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use nix::libc;

use crate::Netns;

pub const MAX_PACKETS: u64 = 200_000;
pub const MAX_DURATION: Duration = Duration::from_secs(3);
const SPORT_BASE: u32 = 1024;
const IP_HDR: usize = 20;
const UDP_HDR: usize = 8;
const PAYLOAD: usize = 18;
const BATCH: usize = 32;

/// One run of the generator.
#[derive(Clone, Copy, Debug)]
pub struct Flood {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub count: u64,
    pub duration: Duration,
    pub dport_base: u16,
    pub sport_span: u32,
}

/// What a run sent: packets handed to the kernel (minus those it refused) and how long.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub packets: u64,
    pub elapsed: Duration,
    pub errors: u64,
}

impl Flood {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> Flood {
        Flood {
            src,
            dst,
            count: MAX_PACKETS,
            duration: MAX_DURATION,
            dport_base: 10_000,
            sport_span: 4096,
        }
    }

    /// Sends from inside `ns` (the raw socket is made there), pinned to the machine's last
    /// CPU: every hop of a veth chain is processed in the sender's softirq, so the whole
    /// forwarding path stays on one CPU for the run instead of moving with the sender.
    pub fn run(self, ns: &Netns) -> Sent {
        ns.run_inside(move || {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let mut set = nix::sched::CpuSet::new();
            if set.set(cpus - 1).is_ok() {
                let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
            }
            self.send()
        })
    }

    fn ports(&self, i: u64) -> (u16, u16) {
        let span = u64::from(self.sport_span);
        let sport = u64::from(SPORT_BASE) + i % span;
        let dport = u64::from(self.dport_base) + i / span;
        (sport as u16, dport as u16)
    }

    fn template(&self) -> Vec<u8> {
        let total = IP_HDR + UDP_HDR + PAYLOAD;
        let mut p = vec![0u8; total];
        p[0] = 0x45; // version 4, IHL 5
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64; // TTL
        p[9] = libc::IPPROTO_UDP as u8;
        // Checksum and id left 0: with IP_HDRINCL the kernel fills both.
        p[12..16].copy_from_slice(&self.src.octets());
        p[16..20].copy_from_slice(&self.dst.octets());
        p[IP_HDR + 4..IP_HDR + 6].copy_from_slice(&((UDP_HDR + PAYLOAD) as u16).to_be_bytes());
        // UDP checksum 0 = none (allowed for IPv4); the payload is a fixed marker.
        for (k, b) in p[IP_HDR + UDP_HDR..].iter_mut().enumerate() {
            *b = b"ima-bench-udp-flood"[k % 19];
        }
        p
    }

    fn send(mut self) -> Sent {
        // The bounds are not negotiable: clamp rather than trust the caller.
        self.count = self.count.min(MAX_PACKETS);
        self.duration = self.duration.min(MAX_DURATION);
        self.sport_span = self.sport_span.clamp(1, 65536 - SPORT_BASE);
        assert!(
            u64::from(self.dport_base) + self.count / u64::from(self.sport_span) <= 65535,
            "dport_base too high for count"
        );
        let fd = raw_socket();
        let mut bufs: Vec<Vec<u8>> = vec![self.template(); BATCH];
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: sockaddr_in and mmsghdr are plain data; all-zero is valid for both.
        let mut dest: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        dest.sin_family = libc::AF_INET as libc::sa_family_t;
        dest.sin_addr.s_addr = u32::from_ne_bytes(self.dst.octets());
        let mut msgs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_name = (&mut dest as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let (mut sent, mut errors) = (0u64, 0u64);
        let started = Instant::now();
        let deadline = started + self.duration;
        // A batch starts only if one more of the last one's length still ends in time,
        // so a slow path (500 packets/s: 64 ms a batch) cannot overrun the bound either.
        let mut last_batch = Duration::ZERO;
        loop {
            let batch_start = Instant::now();
            if sent >= self.count || batch_start + last_batch >= deadline {
                break;
            }
            let n = ((self.count - sent) as usize).min(BATCH);
            for (k, buf) in bufs.iter_mut().take(n).enumerate() {
                let (sport, dport) = self.ports(sent + k as u64);
                buf[IP_HDR..IP_HDR + 2].copy_from_slice(&sport.to_be_bytes());
                buf[IP_HDR + 2..IP_HDR + 4].copy_from_slice(&dport.to_be_bytes());
            }
            // SAFETY: msgs[..n] point at live iovecs and buffers and at `dest`.
            let rc = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, 0) };
            if rc < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Skip the packet that could not be queued, so 5-tuples stay unique.
                    Some(libc::ENOBUFS | libc::EAGAIN) => {
                        errors += 1;
                        sent += 1;
                        continue;
                    }
                    _ => panic!("sendmmsg: {}", std::io::Error::last_os_error()),
                }
            }
            sent += rc as u64;
            last_batch = batch_start.elapsed();
        }
        let elapsed = started.elapsed();
        // SAFETY: fd is ours and closed once.
        unsafe { libc::close(fd) };
        Sent {
            packets: sent - errors,
            elapsed,
            errors,
        }
    }
}

fn raw_socket() -> i32 {
    let int_size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: plain socket/setsockopt calls with valid pointers and sizes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        let on = (&one as *const libc::c_int).cast();
        let rc = libc::setsockopt(fd, libc::IPPROTO_IP, libc::IP_HDRINCL, on, int_size);
        assert_eq!(rc, 0, "IP_HDRINCL: {}", std::io::Error::last_os_error());
        let sndbuf: libc::c_int = 4 << 20;
        let buf = (&sndbuf as *const libc::c_int).cast();
        let _ = libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, buf, int_size);
        fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_packet_of_a_run_has_its_own_ports() {
        let flood = Flood::new(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST);
        let mut seen = std::collections::HashSet::new();
        for i in 0..MAX_PACKETS {
            assert!(seen.insert(flood.ports(i)));
        }
        assert_eq!(flood.ports(4096), (1024, 10_001));
        let t = flood.template();
        assert_eq!((t.len(), t[0], t[9]), (46, 0x45, 17));
    }
}
