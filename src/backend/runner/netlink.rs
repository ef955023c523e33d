//! The nf_tables ruleset generation: a counter the kernel bumps on every committed change
//! to any nf_tables table of this network namespace (nft, iptables-nft, kube-proxy...).
//! One netlink round trip, no process: an idle resync that finds it unchanged since the
//! rules were last verified has nothing to read, whatever the size of the rules.

use std::mem::{size_of, zeroed};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;
const NLMSG_HEADER: usize = 16;
const NFGENMSG: usize = 4;

/// Closes the socket however the query ends.
struct Socket(libc::c_int);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe {
            libc::close(self.0);
        }
    }
}

/// The current generation, or None when nf_tables cannot be asked (no module, no
/// permission, a timeout): callers then read the rules as they would without it.
pub fn nftables_generation() -> Option<u64> {
    // SAFETY: plain socket calls on a descriptor this function owns; every buffer passed
    // to the kernel is a live local of the stated length.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        );
        if fd < 0 {
            return None;
        }
        let socket = Socket(fd);
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        libc::setsockopt(
            socket.0,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        );
        let request = request();
        let mut kernel: libc::sockaddr_nl = zeroed();
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let sent = libc::sendto(
            socket.0,
            request.as_ptr().cast(),
            request.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        );
        if sent != request.len() as isize {
            return None;
        }
        let mut reply = [0u8; 512];
        let received = libc::recv(socket.0, reply.as_mut_ptr().cast(), reply.len(), 0);
        let received = usize::try_from(received).ok()?;
        parse_reply(reply.get(..received)?)
    }
}

/// `NFT_MSG_GETGEN`: a netlink header and an empty `nfgenmsg`.
fn request() -> [u8; NLMSG_HEADER + NFGENMSG] {
    let mut message = [0u8; NLMSG_HEADER + NFGENMSG];
    let length = (NLMSG_HEADER + NFGENMSG) as u32;
    message[0..4].copy_from_slice(&length.to_ne_bytes());
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN;
    message[4..6].copy_from_slice(&kind.to_ne_bytes());
    message[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    message[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, res_id 0: all zero.
    message
}

/// The generation id from an `NFT_MSG_NEWGEN` reply; None for anything else.
fn parse_reply(reply: &[u8]) -> Option<u64> {
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_ne_bytes(reply.get(at..at + 2)?.try_into().ok()?))
    };
    let length = u32::from_ne_bytes(reply.get(0..4)?.try_into().ok()?) as usize;
    if u16_at(4)? != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN || length > reply.len() {
        return None;
    }
    let mut at = NLMSG_HEADER + NFGENMSG;
    while at + 4 <= length {
        let attribute_length = usize::from(u16_at(at)?);
        let kind = u16_at(at + 2)? & 0x3fff;
        if attribute_length < 4 {
            return None;
        }
        if kind == NFTA_GEN_ID {
            let value = reply.get(at + 4..at + 8)?;
            return Some(u64::from(u32::from_be_bytes(value.try_into().ok()?)));
        }
        at += (attribute_length + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newgen_reply_gives_its_id_and_anything_else_none() {
        let mut reply = vec![0u8; 36];
        reply[0..4].copy_from_slice(&36u32.to_ne_bytes());
        reply[4..6].copy_from_slice(&((10u16 << 8) | 15).to_ne_bytes());
        // NFTA_GEN_ID, 8 bytes, big-endian 0x01020304; then NFTA_GEN_PROC_PID.
        reply[20..22].copy_from_slice(&8u16.to_ne_bytes());
        reply[22..24].copy_from_slice(&1u16.to_ne_bytes());
        reply[24..28].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        reply[28..30].copy_from_slice(&8u16.to_ne_bytes());
        reply[30..32].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(parse_reply(&reply), Some(0x0102_0304));
        // An error message, a truncated one, garbage.
        let mut error = reply.clone();
        error[4..6].copy_from_slice(&2u16.to_ne_bytes());
        assert_eq!(parse_reply(&error), None);
        assert_eq!(parse_reply(&reply[..10]), None);
        assert_eq!(parse_reply(&[0xff; 40]), None);
        assert_eq!(request().len(), 20);
    }
}
