//! ConfigMap swap -> first packet with the new behaviour, on a [`Topology`].
//!
//! The clock starts just before kubelet's rename of `..data_tmp` over `..data`
//! ([`ConfigMapVolume::update`]). From then on a UDP probe leaves the pod every
//! `interval` from the next socket of a pool bound in advance to consecutive source
//! ports, so each probe is a new 5-tuple and makes the node create a new conntrack entry
//! (running the NAT rules afresh); the node's conntrack table is flushed before every
//! swap, so the pool can be reused. A thread in the remote namespace timestamps every
//! arrival. The latency is the arrival time of the first probe with the new source
//! address minus the rename time.
//!
//! Bounds, whatever the caller asks: at most 3,000 probes and 15 s of probing per swap,
//! probes only to [`DESTINATION`] (an address the remote namespace owns).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::libc;

use crate::{ConfigMapVolume, POD_V4, Topology};

pub const DESTINATION: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const PORT: u16 = 9997;
const SPORT_BASE: u16 = 20_000;
const POOL: usize = 3200;
const MAX_PROBES: usize = 3000;
const MAX_PROBING: Duration = Duration::from_secs(15);

/// One swap: the latency, probes sent, and whether any probe sent after the first
/// new-behaviour one still arrived with the old source.
#[derive(Clone, Copy, Debug)]
pub struct SwapSample {
    pub latency: Duration,
    pub probes: usize,
    pub old_after_new: bool,
    /// Wall-clock time (epoch seconds) of the rename, to compare with log timestamps.
    pub renamed_at: f64,
}

struct Arrival {
    at: Instant,
    source: IpAddr,
    round: u32,
    index: u32,
}

/// The pod's socket pool and the remote's timestamping receiver.
pub struct SwapProbe {
    sockets: Vec<UdpSocket>,
    arrivals: Receiver<Arrival>,
    stop: Arc<AtomicBool>,
    receiver: Option<JoinHandle<()>>,
    round: u32,
}

impl SwapProbe {
    pub fn new(topology: &Topology) -> SwapProbe {
        raise_nofile();
        let pod_ip: Ipv4Addr = POD_V4.parse().expect("pod address");
        let sockets = topology.pod.run_inside(move || {
            (0..POOL)
                .map(|i| {
                    let port = SPORT_BASE + i as u16;
                    UdpSocket::bind(SocketAddr::from((pod_ip, port)))
                        .unwrap_or_else(|e| panic!("bind pod port {port}: {e}"))
                })
                .collect::<Vec<_>>()
        });
        let socket = topology
            .remote
            .udp_socket(SocketAddr::from(([0, 0, 0, 0], PORT)));
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, arrivals) = channel();
        let stopped = stop.clone();
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((8, from)) = socket.recv_from(&mut buf) {
                    let arrival = Arrival {
                        at: Instant::now(),
                        source: from.ip(),
                        round: u32::from_be_bytes(buf[0..4].try_into().expect("4 bytes")),
                        index: u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes")),
                    };
                    if tx.send(arrival).is_err() {
                        return;
                    }
                }
            }
        });
        SwapProbe {
            sockets,
            arrivals,
            stop,
            receiver: Some(receiver),
            round: 0,
        }
    }

    fn send(&self, index: usize) {
        let mut payload = [0u8; 8];
        payload[0..4].copy_from_slice(&self.round.to_be_bytes());
        payload[4..8].copy_from_slice(&(index as u32).to_be_bytes());
        let _ = self.sockets[index].send_to(&payload, SocketAddr::from((DESTINATION, PORT)));
    }

    /// The source the remote sees now (from a fresh conntrack table); bounded to 10
    /// probes over 2 s. Returns the source and the number of probes used.
    fn current_source(&mut self, topology: &Topology) -> (IpAddr, usize) {
        topology.node.sh(&["conntrack", "-F"]);
        std::thread::sleep(Duration::from_millis(50));
        self.round += 1;
        while self.arrivals.try_recv().is_ok() {}
        for index in 0..10 {
            self.send(index);
            let until = Instant::now() + Duration::from_millis(200);
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                if let Ok(a) = self.arrivals.recv_timeout(left)
                    && a.round == self.round
                {
                    return (a.source, index + 1);
                }
            }
        }
        panic!("no probe reached the remote namespace");
    }

    /// Checks that the remote sees `before`, swaps `volume` to `content` and probes every
    /// `interval` until a probe arrives from `after` (at most `max_wait`).
    pub fn swap(
        &mut self,
        topology: &Topology,
        volume: &mut ConfigMapVolume,
        content: &str,
        (before, after): (IpAddr, IpAddr),
        interval: Duration,
        max_wait: Duration,
    ) -> SwapSample {
        let (seen, mut next) = self.current_source(topology);
        assert_eq!(
            seen, before,
            "the old behaviour is not in force before the swap"
        );
        let max_wait = max_wait.min(MAX_PROBING);
        let first_probe = next;
        let renamed_at = crate::wall_now();
        let t0 = volume.update(content);
        let mut first_new: Option<(Duration, usize)> = None;
        let mut last_old: Option<usize> = None;
        let mut note = |a: Arrival, first_new: &mut Option<(Duration, usize)>| {
            if a.round != self.round || (a.index as usize) < first_probe {
                return;
            }
            if a.source == after {
                first_new.get_or_insert((a.at.duration_since(t0), a.index as usize));
            } else {
                last_old = last_old.max(Some(a.index as usize));
            }
        };
        let mut k = 0;
        while first_new.is_none() && k < MAX_PROBES && next < POOL && t0.elapsed() < max_wait {
            self.send(next);
            next += 1;
            k += 1;
            let due = t0 + interval * k as u32;
            loop {
                while let Ok(a) = self.arrivals.try_recv() {
                    note(a, &mut first_new);
                }
                let now = Instant::now();
                if first_new.is_some() || now >= due {
                    break;
                }
                std::thread::sleep((due - now).min(Duration::from_micros(200)));
            }
        }
        let (latency, first_index) = first_new.unwrap_or_else(|| {
            panic!(
                "no probe from {after} within {k} probes / {:?}",
                t0.elapsed()
            )
        });
        // Stragglers: probes sent after the first new-behaviour one must all be new too.
        std::thread::sleep(Duration::from_millis(30));
        while let Ok(a) = self.arrivals.try_recv() {
            note(a, &mut first_new);
        }
        SwapSample {
            latency,
            probes: first_index - first_probe + 1,
            old_after_new: last_old.is_some_and(|i| i > first_index),
            renamed_at,
        }
    }
}

impl Drop for SwapProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(receiver) = self.receiver.take() {
            let _ = receiver.join();
        }
    }
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
