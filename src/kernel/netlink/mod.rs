//! Talking to the kernel over netfilter netlink without a process: the socket (every
//! receive bounded by a deadline), messages and attributes as the kernel lays them out,
//! streamed dumps (one fixed buffer, whatever the size of what is dumped) and
//! transactions that wait for every ack. The subsystems build on it: nf_tables
//! ([`nftables`], [`lookup`]), conntrack ([`conntrack`]) and the local routing table
//! ([`route`]).

use std::cell::Cell;
use std::mem::{size_of, zeroed};
use std::time::{Duration, Instant};

pub mod conntrack;
pub mod lookup;
pub mod nftables;
pub mod route;

pub const NLMSG_HEADER: usize = 16;
/// The `nfgenmsg` every netfilter message carries after the netlink header.
pub const NFGENMSG: usize = 4;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
/// A netlink flag on a dump's messages: the dumped state changed while it was dumped.
pub const NLM_F_DUMP_INTR: u16 = 0x10;
/// What one receive may hold: the kernel fills a dump datagram up to 32 KiB.
const RECEIVE_BUFFER: usize = 64 * 1024;

/// A netfilter netlink socket, closed however its user ends.
pub struct Socket {
    fd: libc::c_int,
    /// Receives give up at this instant ([`Socket::renew`] moves it).
    deadline: Cell<Instant>,
}

impl Socket {
    /// Opens a netfilter netlink socket whose receives all end by `within` from now.
    pub fn open(within: Duration) -> Result<Socket, String> {
        Socket::open_protocol(libc::NETLINK_NETFILTER, within)
    }

    /// Opens a netlink socket of `protocol` (`NETLINK_ROUTE`, ...) whose receives all end
    /// by `within` from now.
    pub fn open_protocol(protocol: libc::c_int, within: Duration) -> Result<Socket, String> {
        // SAFETY: socket(2) with constant arguments; the descriptor is owned by the
        // returned Socket and closed on drop.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(format!(
                "netlink socket: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Socket {
            fd,
            deadline: Cell::new(Instant::now() + within),
        })
    }

    /// Gives the receives from now on `within` more: a long dump that keeps making
    /// progress bounds each wait for the kernel, not the whole dump.
    pub fn renew(&self, within: Duration) {
        self.deadline.set(Instant::now() + within);
    }

    /// Asks for a receive buffer of `bytes` (beyond `rmem_max` where the process may,
    /// as the agent with CAP_NET_ADMIN can): a batch whose every message is acked needs
    /// room for all its acks at once. Best effort: the default stays otherwise.
    pub fn grow_receive_buffer(&self, bytes: usize) {
        self.set_buffer([libc::SO_RCVBUFFORCE, libc::SO_RCVBUF], bytes);
    }

    /// Sets a buffer size with the first of `options` (the FORCE one, then the plain
    /// one) the kernel takes; whether one did.
    fn set_buffer(&self, options: [libc::c_int; 2], bytes: usize) -> bool {
        let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        options.into_iter().any(|option| {
            // SAFETY: setsockopt reads a live c_int of the stated size.
            let done = unsafe {
                libc::setsockopt(
                    self.fd,
                    libc::SOL_SOCKET,
                    option,
                    (&size as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            done == 0
        })
    }

    /// Sends `bytes` (one message or a batch of them) to the kernel.
    pub fn send(&self, bytes: &[u8]) -> Result<(), String> {
        // SAFETY: the address is a zeroed sockaddr_nl naming the kernel; `bytes` is live
        // for its stated length.
        let sent = unsafe {
            let mut kernel: libc::sockaddr_nl = zeroed();
            kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                self.fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if usize::try_from(sent).ok() != Some(bytes.len()) {
            return Err(format!("netlink send: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// One datagram from the kernel into `buffer`, waiting at most until the deadline.
    pub fn receive(&self, buffer: &mut [u8]) -> Result<usize, String> {
        let left = self
            .deadline
            .get()
            .saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("netlink receive: no answer from the kernel in time".into());
        }
        let timeout = libc::timeval {
            tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(libc::time_t::MAX),
            // At least 1 µs: zero would mean "wait forever".
            // Below 1,000,000: fits every suseconds_t.
            tv_usec: left.subsec_micros().max(1) as libc::suseconds_t,
        };
        // SAFETY: setsockopt reads a live timeval of the stated size; recv writes at most
        // `buffer.len()` bytes into the live, writable `buffer`.
        let received = unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            );
            libc::recv(self.fd, buffer.as_mut_ptr().cast(), buffer.len(), 0)
        };
        usize::try_from(received).map_err(|_| {
            let error = std::io::Error::last_os_error();
            match error.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    "netlink receive: no answer from the kernel in time".to_string()
                }
                _ => format!("netlink receive: {error}"),
            }
        })
    }

    /// Streams the answer to a dump request already sent: `on_message` sees each
    /// message (kind, flags, payload after the netlink header) as it arrives, in one
    /// fixed buffer, until the kernel says done. An error message from the kernel ends
    /// it with that error.
    pub fn stream_dump(
        &self,
        mut on_message: impl FnMut(&Received) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut buffer = vec![0u8; RECEIVE_BUFFER];
        loop {
            let length = self.receive(&mut buffer)?;
            for message in messages(buffer.get(..length).unwrap_or_default()) {
                match message.kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => match message.error() {
                        Some(0) => {}
                        Some(code) => return Err(kernel_error(code)),
                        None => return Err("netlink: a truncated error message".into()),
                    },
                    _ => on_message(&message)?,
                }
            }
        }
    }

    /// Makes room for a datagram of `bytes` in the send buffer (the kernel refuses one
    /// larger than the buffer). As root (CAP_NET_ADMIN) past `wmem_max`, as nft does;
    /// otherwise as far as `wmem_max` allows.
    pub fn set_send_buffer(&self, bytes: usize) -> Result<(), String> {
        if self.set_buffer([libc::SO_SNDBUFFORCE, libc::SO_SNDBUF], bytes) {
            return Ok(());
        }
        Err(format!(
            "netlink send buffer of {bytes} bytes: {}",
            std::io::Error::last_os_error()
        ))
    }

    /// Asks the kernel not to copy a refused message back into its error (a batch's
    /// element messages are up to 64 KiB each).
    pub fn cap_acks(&self) {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads a live c_int of the stated size. Without it errors
        // are only larger; nothing depends on it succeeding.
        unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_NETLINK,
                libc::NETLINK_CAP_ACK,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }

    /// Like [`Socket::wait_for_acks`], but a refusal is the kernel's error code
    /// (`Some(-errno)`), for callers that tell one refusal from another.
    pub fn await_acks(&self, acked: &[u32]) -> Result<Option<i32>, String> {
        let mut waiting: Vec<u32> = acked.to_vec();
        let mut buffer = vec![0u8; RECEIVE_BUFFER];
        while !waiting.is_empty() {
            let length = self.receive(&mut buffer)?;
            for message in messages(buffer.get(..length).unwrap_or_default()) {
                if message.kind != NLMSG_ERROR {
                    continue;
                }
                match message.error() {
                    Some(0) => waiting.retain(|seq| *seq != message.seq),
                    Some(code) => return Ok(Some(code)),
                    None => return Err("netlink: a truncated error message".into()),
                }
            }
        }
        Ok(None)
    }

    /// Waits for the kernel's answer to each of `acked` (sequence numbers of messages
    /// sent with NLM_F_ACK): Ok once every one is acknowledged, the first refusal
    /// otherwise. Messages that are not acks (echoes) are skipped.
    pub fn wait_for_acks(&self, acked: &[u32]) -> Result<(), String> {
        match self.await_acks(acked)? {
            Some(code) => Err(kernel_error(code)),
            None => Ok(()),
        }
    }

    /// Waits for the kernel's answer to each of `acked` like [`Socket::wait_for_acks`],
    /// but hands every refusal (sequence number, negative errno) to `refused` instead of
    /// stopping at the first: in a batch of independent requests one refused (an entry
    /// already gone, say) says nothing about the others. `refused` may end the wait with
    /// an error of its own.
    pub fn collect_acks(
        &self,
        acked: &[u32],
        mut refused: impl FnMut(u32, i32) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut waiting: Vec<u32> = acked.to_vec();
        waiting.sort_unstable();
        let mut buffer = vec![0u8; RECEIVE_BUFFER];
        while !waiting.is_empty() {
            let length = self.receive(&mut buffer)?;
            for message in messages(buffer.get(..length).unwrap_or_default()) {
                if message.kind != NLMSG_ERROR {
                    continue;
                }
                let Ok(at) = waiting.binary_search(&message.seq) else {
                    continue;
                };
                waiting.remove(at);
                match message.error() {
                    Some(0) => {}
                    Some(code) => refused(message.seq, code)?,
                    None => return Err("netlink: a truncated error message".into()),
                }
            }
        }
        Ok(())
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe {
            libc::close(self.fd);
        }
    }
}

/// A kernel error code (negative errno in an NLMSG_ERROR) in words.
pub fn kernel_error(code: i32) -> String {
    format!(
        "the kernel refused it: {}",
        std::io::Error::from_raw_os_error(code.saturating_neg())
    )
}

/// One message of a datagram from the kernel.
#[derive(Clone, Copy, Debug)]
pub struct Received<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// Everything after the netlink header.
    pub payload: &'a [u8],
}

impl<'a> Received<'a> {
    /// The error code of an NLMSG_ERROR message (0: an ack).
    pub fn error(&self) -> Option<i32> {
        Some(i32::from_ne_bytes(self.payload.get(0..4)?.try_into().ok()?))
    }

    /// The attributes after a netfilter message's `nfgenmsg`.
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes(self.payload.get(NFGENMSG..).unwrap_or_default())
    }
}

/// The messages of a datagram; a malformed length ends the walk.
pub fn messages(datagram: &[u8]) -> impl Iterator<Item = Received<'_>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = datagram.get(at..at + NLMSG_HEADER)?;
        let length = u32::from_ne_bytes(header.get(0..4)?.try_into().ok()?) as usize;
        if length < NLMSG_HEADER {
            return None;
        }
        let message = datagram.get(at..at + length)?;
        at += align(length);
        Some(Received {
            kind: u16::from_ne_bytes(header.get(4..6)?.try_into().ok()?),
            flags: u16::from_ne_bytes(header.get(6..8)?.try_into().ok()?),
            seq: u32::from_ne_bytes(header.get(8..12)?.try_into().ok()?),
            payload: message.get(NLMSG_HEADER..)?,
        })
    })
}

fn align(length: usize) -> usize {
    (length + 3) & !3
}

/// The attributes of a message or of a nested attribute, as (type, payload); the
/// nested flag is masked off the type. A malformed length ends the walk.
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a>(pub &'a [u8]);

impl<'a> Iterator for Attributes<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let bytes = self.0;
        let length = usize::from(u16::from_ne_bytes(bytes.get(0..2)?.try_into().ok()?));
        let kind = u16::from_ne_bytes(bytes.get(2..4)?.try_into().ok()?) & NLA_TYPE_MASK;
        if length < 4 {
            self.0 = &[];
            return None;
        }
        let Some(payload) = bytes.get(4..length) else {
            self.0 = &[];
            return None;
        };
        self.0 = bytes.get(align(length)..).unwrap_or_default();
        Some((kind, payload))
    }
}

impl<'a> Attributes<'a> {
    /// The payload of the first attribute of type `kind`.
    pub fn get(mut self, kind: u16) -> Option<&'a [u8]> {
        Iterator::find(&mut self, |(found, _)| *found == kind).map(|(_, payload)| payload)
    }
}

/// A netfilter netlink message under construction: header, `nfgenmsg`, attributes.
pub struct Message(Vec<u8>);

impl Message {
    /// `kind` is the whole netlink type (subsystem << 8 | message); `family` and
    /// `res_id` fill the `nfgenmsg`.
    pub fn new(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Message {
        let mut bytes = vec![0u8; NLMSG_HEADER];
        bytes[4..6].copy_from_slice(&kind.to_ne_bytes());
        bytes[6..8].copy_from_slice(&flags.to_ne_bytes());
        bytes[8..12].copy_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&[family, 0]);
        bytes.extend_from_slice(&res_id.to_be_bytes());
        Message(bytes)
    }

    /// A message whose family header is `header` instead of an `nfgenmsg` (rtnetlink's
    /// `rtmsg`, say).
    pub fn with_header(kind: u16, flags: u16, seq: u32, header: &[u8]) -> Message {
        let mut message = Message::new(kind, flags, seq, 0, 0);
        message.0.truncate(NLMSG_HEADER);
        message.0.extend_from_slice(header);
        message.pad();
        message
    }

    pub fn attribute(&mut self, kind: u16, payload: &[u8]) {
        let length = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&length.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        self.pad();
    }

    /// A NUL-terminated string attribute (names of tables, sets, chains).
    pub fn string(&mut self, kind: u16, text: &str) {
        let mut bytes = Vec::with_capacity(text.len() + 1);
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(0);
        self.attribute(kind, &bytes);
    }

    /// A nested attribute whose contents `fill` writes.
    pub fn nested(&mut self, kind: u16, fill: impl FnOnce(&mut Message)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        fill(self);
        let length = u16::try_from(self.0.len() - start).unwrap_or(u16::MAX);
        self.0[start..start + 2].copy_from_slice(&length.to_ne_bytes());
    }

    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        let length = u32::try_from(self.0.len()).unwrap_or(u32::MAX);
        self.0[0..4].copy_from_slice(&length.to_ne_bytes());
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_attributes_read_back_what_was_built() {
        let mut message = Message::new(0x0a0c, 1, 7, 1, 0);
        message.string(1, "ip-masq-agent");
        message.nested(3, |list| {
            list.attribute(1, &[10, 0, 0, 0]);
            list.attribute(3, &1u32.to_be_bytes());
        });
        let mut datagram = message.finish();
        datagram.extend(Message::new(NLMSG_DONE, 0, 8, 0, 0).finish());
        let read: Vec<Received> = messages(&datagram).collect();
        assert_eq!(read.len(), 2);
        assert_eq!((read[0].kind, read[0].flags, read[0].seq), (0x0a0c, 1, 7));
        let attributes: Vec<(u16, &[u8])> = read[0].attributes().collect();
        assert_eq!(attributes[0], (1, &b"ip-masq-agent\0"[..]));
        assert_eq!(attributes[1].0, 3, "the nested flag is masked off");
        let nested: Vec<(u16, &[u8])> = Attributes(attributes[1].1).collect();
        assert_eq!(
            nested,
            [(1, &[10u8, 0, 0, 0][..]), (3, &[0u8, 0, 0, 1][..])]
        );
        assert_eq!(read[1].kind, NLMSG_DONE);
    }

    #[test]
    fn malformed_lengths_end_the_walk_instead_of_reading_past_the_end() {
        assert_eq!(messages(&[0xff; 40]).count(), 0);
        assert_eq!(messages(&[0u8; 8]).count(), 0);
        // An attribute claiming more than there is, then one shorter than its header.
        assert_eq!(Attributes(&[200, 0, 1, 0, 1, 2]).count(), 0);
        assert_eq!(Attributes(&[2, 0, 1, 0]).count(), 0);
    }
}
