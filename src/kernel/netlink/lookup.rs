//! Single nf_tables lookups that need no listing: whether a table or a chain exists. The iptables
//! backend asks when iptables-nft cannot list a chain ("incompatible", which it also
//! says of a chain that does not exist), so it never declares (and thereby flushes) a
//! chain that exists with rules iptables cannot show.

use std::time::Duration;

use super::{Message, NLMSG_ERROR, Socket, messages};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const ENOENT: i32 = 2;

/// `NFT_MSG_GETCHAIN` for one chain of one table of `family` (an NFPROTO_* value).
fn chain_request(family: u8, table: &str, chain: &str) -> Vec<u8> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    let mut message = Message::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN,
        flags,
        1,
        family,
        0,
    );
    message.string(NFTA_CHAIN_TABLE, table);
    message.string(NFTA_CHAIN_NAME, chain);
    message.finish()
}

/// What the kernel's answer says: Some(true) for the chain, Some(false) for ENOENT (no
/// such table or chain), None while the answer is not complete.
fn answer(datagram: &[u8]) -> Result<Option<bool>, String> {
    let mut found = None;
    for message in messages(datagram) {
        if message.kind == NLMSG_ERROR {
            return match message.error() {
                Some(0) => Ok(Some(found.unwrap_or(false))),
                Some(code) if code == -ENOENT => Ok(Some(false)),
                Some(code) => Err(super::kernel_error(code)),
                None => Err("netlink: a truncated error message".into()),
            };
        }
        found = Some(true);
    }
    Ok(found)
}

/// Whether `family` (an NFPROTO_* value) has a table named `table`.
pub fn table_exists(family: u8, table: &str) -> Result<bool, String> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    let mut message = Message::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        flags,
        1,
        family,
        0,
    );
    message.string(NFTA_TABLE_NAME, table);
    ask(&message.finish())
}

/// Whether `table` of `family` holds a chain named `chain`.
pub fn chain_exists(family: u8, table: &str, chain: &str) -> Result<bool, String> {
    ask(&chain_request(family, table, chain))
}

/// Sends one GET request and reads whether the object exists.
fn ask(request: &[u8]) -> Result<bool, String> {
    let socket = Socket::open(Duration::from_secs(2))?;
    socket.send(request)?;
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let length = socket.receive(&mut buffer)?;
        if let Some(found) = answer(buffer.get(..length).unwrap_or_default())? {
            return Ok(found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_names_table_and_chain_and_answers_read_as_found_or_not() {
        let request = chain_request(2, "nat", "IP-MASQ-AGENT");
        let read = messages(&request).next().expect("one message");
        assert_eq!(read.kind, (10 << 8) | 4);
        let attributes: Vec<(u16, &[u8])> = read.attributes().collect();
        assert_eq!(
            attributes,
            [(1, &b"nat\0"[..]), (3, &b"IP-MASQ-AGENT\0"[..])]
        );
        let error = |code: i32| {
            let mut message = Message::new(NLMSG_ERROR, 0, 1, 0, 0).finish();
            message.truncate(16);
            message.extend_from_slice(&code.to_ne_bytes());
            message.extend_from_slice(&[0u8; 16]);
            let length = message.len() as u32;
            message[0..4].copy_from_slice(&length.to_ne_bytes());
            message
        };
        assert_eq!(answer(&error(-ENOENT)), Ok(Some(false)));
        assert!(answer(&error(-1)).is_err());
        let chain = Message::new((10 << 8) | 3, 0, 1, 2, 0).finish();
        assert_eq!(answer(&chain), Ok(Some(true)));
        let mut both = chain.clone();
        both.extend(error(0));
        assert_eq!(answer(&both), Ok(Some(true)));
    }
}
