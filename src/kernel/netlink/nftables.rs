//! nf_tables over netlink. The ruleset generation: a counter the kernel bumps on every committed change
//! to any nf_tables table of this network namespace (nft, iptables-nft, kube-proxy...).
//! One netlink round trip, no process: an idle resync that finds it unchanged since the
//! rules were last verified has nothing to read, whatever the size of the rules.

use std::time::Duration;

use super::{Message, NFGENMSG, NLMSG_HEADER, Socket, messages};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;

/// The current generation, or None when nf_tables cannot be asked (no module, no
/// permission, a timeout): callers then read the rules as they would without it.
pub fn nftables_generation() -> Option<u64> {
    let socket = Socket::open(Duration::from_secs(1)).ok()?;
    socket.send(&request()).ok()?;
    let mut reply = [0u8; 512];
    let received = socket.receive(&mut reply).ok()?;
    parse_reply(reply.get(..received)?)
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
    let message = messages(reply).next()?;
    if message.kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
        return None;
    }
    let id = message.attributes().get(NFTA_GEN_ID)?;
    Some(u64::from(u32::from_be_bytes(
        id.get(0..4)?.try_into().ok()?,
    )))
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

const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
/// nft's element user data for an interval that runs to the end of the address space
/// (NFTNL_UDATA_SET_ELEM_FLAGS = NFTNL_SET_ELEM_F_INTERVAL_OPEN), so nft lists it back
/// as the prefix it was.
const INTERVAL_OPEN_USERDATA: [u8; 6] = [1, 4, 1, 0, 0, 0];

/// Elements to delete from and add to one interval set of an `inet` table.
pub struct SetChange<'a> {
    pub set: &'a str,
    pub delete: &'a [ipnet::IpNet],
    pub add: &'a [ipnet::IpNet],
}

/// The two elements of an interval set that stand for `prefix`: its start, and the end
/// (the address after it, flagged) unless it runs to the end of the address space.
fn elements_of(prefix: &ipnet::IpNet, message: &mut Message) {
    let (start, after) = match prefix {
        ipnet::IpNet::V4(net) => (
            net.network().octets().to_vec(),
            u32::from(net.broadcast())
                .checked_add(1)
                .map(|next| next.to_be_bytes().to_vec()),
        ),
        ipnet::IpNet::V6(net) => (
            net.network().octets().to_vec(),
            u128::from(net.broadcast())
                .checked_add(1)
                .map(|next| next.to_be_bytes().to_vec()),
        ),
    };
    message.nested(NFTA_LIST_ELEM, |element| {
        element.nested(NFTA_SET_ELEM_KEY, |key| {
            key.attribute(NFTA_DATA_VALUE, &start)
        });
        if after.is_none() {
            element.attribute(NFTA_SET_ELEM_USERDATA, &INTERVAL_OPEN_USERDATA);
        }
    });
    if let Some(after) = after {
        message.nested(NFTA_LIST_ELEM, |element| {
            element.nested(NFTA_SET_ELEM_KEY, |key| {
                key.attribute(NFTA_DATA_VALUE, &after)
            });
            element.attribute(
                NFTA_SET_ELEM_FLAGS,
                &NFT_SET_ELEM_INTERVAL_END.to_be_bytes(),
            );
        });
    }
}

/// One batch (one transaction: all or nothing) deleting and adding interval-set elements
/// of the `inet` table `table`; the sequence numbers of the messages that must be acked.
fn element_batch(table: &str, changes: &[SetChange]) -> (Vec<u8>, Vec<u32>) {
    let subsystem = |message: u16| (NFNL_SUBSYS_NFTABLES << 8) | message;
    let request = libc::NLM_F_REQUEST as u16;
    let ack = libc::NLM_F_ACK as u16;
    let mut batch =
        Message::new(NFNL_MSG_BATCH_BEGIN, request, 1, 0, NFNL_SUBSYS_NFTABLES).finish();
    let mut acked = Vec::new();
    let mut seq = 2;
    let terminated = |name: &str| {
        let mut bytes = name.as_bytes().to_vec();
        bytes.push(0);
        bytes
    };
    for (kind, flags, deleting) in [
        (NFT_MSG_DELSETELEM, request | ack, true),
        (
            NFT_MSG_NEWSETELEM,
            request | ack | libc::NLM_F_CREATE as u16,
            false,
        ),
    ] {
        for change in changes {
            let prefixes = if deleting { change.delete } else { change.add };
            if prefixes.is_empty() {
                continue;
            }
            let mut message = Message::new(subsystem(kind), flags, seq, NFPROTO_INET, 0);
            message.attribute(NFTA_SET_ELEM_LIST_TABLE, &terminated(table));
            message.attribute(NFTA_SET_ELEM_LIST_SET, &terminated(change.set));
            message.nested(NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
                for prefix in prefixes {
                    elements_of(prefix, list);
                }
            });
            batch.extend(message.finish());
            acked.push(seq);
            seq += 1;
        }
    }
    batch.extend(Message::new(NFNL_MSG_BATCH_END, request, seq, 0, NFNL_SUBSYS_NFTABLES).finish());
    (batch, acked)
}

/// Applies `changes` to the interval sets of `table` in one nf_tables transaction, straight
/// over netlink: nft 1.0.x loads every element of every set before any command (about a
/// third of a second at 50,000 prefixes), which a change of one prefix should not cost.
pub fn change_set_elements(table: &str, changes: &[SetChange]) -> Result<(), String> {
    let (batch, waiting) = element_batch(table, changes);
    if waiting.is_empty() {
        return Ok(());
    }
    let socket = Socket::open(Duration::from_secs(5))?;
    socket.send(&batch)?;
    socket
        .wait_for_acks(&waiting)
        .map_err(|refused| format!("element change: {refused}"))
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    #[test]
    fn a_prefix_is_a_start_and_a_flagged_end_and_the_last_one_is_open() {
        let delete: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let add: Vec<ipnet::IpNet> = vec!["255.255.255.0/24".parse().unwrap()];
        let (batch, acked) = element_batch(
            "ip-masq-agent",
            &[SetChange {
                set: "non-masq-v4",
                delete: &delete,
                add: &add,
            }],
        );
        assert_eq!(acked, [2, 3]);
        let contains = |needle: &[u8]| batch.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"ip-masq-agent\0"));
        assert!(contains(b"non-masq-v4\0"));
        // 10.0.0.0 and the end 11.0.0.0; 255.255.255.0 with the open-interval user data.
        assert!(contains(&[10, 0, 0, 0]) && contains(&[11, 0, 0, 0]));
        assert!(contains(&[255, 255, 255, 0]) && contains(&INTERVAL_OPEN_USERDATA));
        // Every message's length is where the next one starts.
        let mut at = 0;
        let mut messages = 0;
        while at < batch.len() {
            let length = u32::from_ne_bytes(batch[at..at + 4].try_into().unwrap()) as usize;
            assert!(length >= NLMSG_HEADER + NFGENMSG);
            at += length;
            messages += 1;
        }
        assert_eq!((at, messages), (batch.len(), 4));
    }

    #[test]
    fn acks_and_errors_are_read_from_a_datagram() {
        let mut datagram = Vec::new();
        for (seq, error) in [(2u32, 0i32), (3, -17)] {
            let mut message = vec![0u8; 36];
            message[0..4].copy_from_slice(&36u32.to_ne_bytes());
            message[4..6].copy_from_slice(&super::super::NLMSG_ERROR.to_ne_bytes());
            message[8..12].copy_from_slice(&seq.to_ne_bytes());
            message[16..20].copy_from_slice(&error.to_ne_bytes());
            datagram.extend(message);
        }
        let read: Vec<(u32, Option<i32>)> =
            messages(&datagram).map(|m| (m.seq, m.error())).collect();
        assert_eq!(read, [(2, Some(0)), (3, Some(-17))]);
    }
}
