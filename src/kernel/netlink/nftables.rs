//! nf_tables over netlink, without nft: the ruleset generation, whole transactions
//! ([`commit`]: a [`Batch`] of tables, sets, elements, chains and rules, all or nothing)
//! and reading a table back ([`observe`]).
//!
//! The generation is a counter the kernel bumps on every committed change to any
//! nf_tables table of the network namespace (nft, iptables-nft, kube-proxy...). One
//! round trip: an idle resync that finds it unchanged since the rules were last verified
//! has nothing to read, whatever the size of the rules. A batch can carry the generation
//! it was computed at; the kernel then refuses it whole if anyone committed since, which
//! makes read-decide-write atomic against every other writer.
//!
//! The pieces: [`expr`] (expressions and the statements rules are built from),
//! [`table`] (the wanted table, the batch operations, the comparison), `encode` (a batch
//! as nft 1.0.6 would write it) and `read` (streamed dumps into the comparison).

use std::time::Duration;

use super::{Message, Socket, kernel_error, messages};

pub mod expr;
pub mod table;

mod encode;
mod read;

pub use expr::{Expr, Rule, Stmt};
pub use table::{
    BaseChain, Batch, Boundary, Chain, Commit, Elements, Found, Observed, Op, Set, Table,
};

pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFPROTO_INET: u8 = 1;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;

/// How long one read or one commit may take in all.
const DEADLINE: Duration = Duration::from_secs(10);

/// The current generation, or None when nf_tables cannot be asked (no module, no
/// permission, a timeout): callers then read the rules as they would without it.
pub fn nftables_generation() -> Option<u64> {
    generation_or_why().ok()
}

/// The current generation, or why it cannot be had (the refused call, in words).
pub fn generation_or_why() -> Result<u64, String> {
    let socket = Socket::open(Duration::from_secs(1))?;
    generation_on(&socket, 1).map(u64::from)
}

/// Asks for the generation on an open socket.
fn generation_on(socket: &Socket, seq: u32) -> Result<u32, String> {
    socket.send(&request(seq))?;
    let mut reply = [0u8; 512];
    loop {
        let received = socket.receive(&mut reply)?;
        let datagram = reply.get(..received).unwrap_or_default();
        if let Some(first) = messages(datagram).next()
            && first.seq != seq
        {
            // An answer to something earlier on this socket (a late ack): not ours.
            continue;
        }
        return parse_reply(datagram)
            .ok_or_else(|| "netlink: no nf_tables generation in the answer".to_string());
    }
}

/// `NFT_MSG_GETGEN`: a netlink header and an empty `nfgenmsg`.
fn request(seq: u32) -> Vec<u8> {
    Message::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
        libc::NLM_F_REQUEST as u16,
        seq,
        0,
        0,
    )
    .finish()
}

/// The generation id from an `NFT_MSG_NEWGEN` reply; None for anything else.
fn parse_reply(reply: &[u8]) -> Option<u32> {
    let message = messages(reply).next()?;
    if message.kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
        return None;
    }
    let id = message.attributes().get(NFTA_GEN_ID)?;
    Some(u32::from_be_bytes(id.get(0..4)?.try_into().ok()?))
}

/// Reads the `inet` table `want.name` and compares it with `want` (see [`Observed`]).
pub fn observe(want: &Table) -> Result<Observed, String> {
    let socket = Socket::open(DEADLINE)?;
    read::observe(&socket, want)
}

/// Commits `batch` as one nf_tables transaction: every operation or none. Refused as a
/// whole when it carries a generation and someone committed since
/// ([`Commit::GenerationMoved`]); any other refusal is an error naming the kernel's.
pub fn commit(batch: &Batch) -> Result<Commit, String> {
    if batch.ops.is_empty() {
        return Ok(Commit::Done);
    }
    let encoded = encode::encode(batch);
    let socket = Socket::open(DEADLINE)?;
    // The kernel takes a batch in one datagram, which the send buffer must hold: a table
    // of 50,000 prefixes is about 2 MB.
    socket.set_send_buffer(encoded.bytes.len() + 4096)?;
    socket.cap_acks();
    socket.send(&encoded.bytes)?;
    let Some(last) = encoded.last else {
        return Ok(Commit::Done);
    };
    match socket.await_acks(&[last])? {
        None => Ok(Commit::Done),
        Some(code) if code == -libc::ERESTART => Ok(Commit::GenerationMoved),
        Some(code) => Err(kernel_error(code)),
    }
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
        assert_eq!(request(1).len(), 20);
    }
}
