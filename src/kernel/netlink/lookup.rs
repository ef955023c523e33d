//! Single nf_tables lookups that need no listing: whether a table or a chain exists. The iptables
//! backend asks when iptables-nft cannot list a chain ("incompatible", which it also
//! says of a chain that does not exist), so it never declares (and thereby flushes) a
//! chain that exists with rules iptables cannot show.

use std::time::Duration;

use super::{Message, NLM_F_DUMP_INTR, NLMSG_ERROR, Received, Socket, messages};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const ENOENT: i32 = 2;
const EINTR: i32 = 4;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NF_INET_POST_ROUTING: u32 = 4;
/// Dumps interrupted by a concurrent commit are asked again at most this often.
const DUMP_ATTEMPTS: usize = 3;

/// One nf_tables base chain of type nat on the postrouting hook (srcnat).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatPostroutingChain {
    /// `ip`, `ip6` or `inet`, as nft names the family.
    pub family: &'static str,
    pub table: String,
    pub chain: String,
    pub priority: i32,
}

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

/// Every base chain of type nat on the postrouting hook, in every table of the ip, ip6
/// and inet families: one streamed chain dump (no process, nothing held but the chains
/// kept), asked again when a concurrent commit interrupts it.
pub fn nat_postrouting_chains(within: Duration) -> Result<Vec<NatPostroutingChain>, String> {
    let mut last = String::new();
    for _ in 0..DUMP_ATTEMPTS {
        match dump_nat_postrouting_chains(within) {
            Ok(Some(chains)) => return Ok(chains),
            Ok(None) => last = "the chain dump was interrupted by commits".into(),
            Err(error) => return Err(error),
        }
    }
    Err(last)
}

/// Whether `table` of `family` (an NFPROTO_* value) holds a chain whose name starts
/// with one of `prefixes`: one streamed chain dump (the kernel leaves out other tables
/// where it can; the rest are skipped here), nothing held but the answer.
pub fn has_chain_prefixed(
    family: u8,
    table: &str,
    prefixes: &[&str],
    within: Duration,
) -> Result<bool, String> {
    let socket = Socket::open(within)?;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    let mut request = Message::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN,
        flags,
        1,
        family,
        0,
    );
    request.string(NFTA_CHAIN_TABLE, table);
    socket.send(&request.finish())?;
    let mut found = false;
    socket.stream_dump(|message| {
        if found || message.kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN {
            return Ok(());
        }
        let attributes = message.attributes();
        let text = |kind| {
            attributes
                .get(kind)
                .map(|bytes| bytes.strip_suffix(b"\0").unwrap_or(bytes))
        };
        let in_table = text(NFTA_CHAIN_TABLE) == Some(table.as_bytes());
        if in_table && let Some(name) = text(NFTA_CHAIN_NAME) {
            found = prefixes
                .iter()
                .any(|prefix| name.starts_with(prefix.as_bytes()));
        }
        Ok(())
    })?;
    Ok(found)
}

/// None when the kernel flagged the dump as interrupted.
fn dump_nat_postrouting_chains(
    within: Duration,
) -> Result<Option<Vec<NatPostroutingChain>>, String> {
    let socket = Socket::open(within)?;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    let request = Message::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN,
        flags,
        1,
        libc::NFPROTO_UNSPEC as u8,
        0,
    );
    socket.send(&request.finish())?;
    let mut chains = Vec::new();
    let mut interrupted = false;
    let result = socket.stream_dump(|message| {
        interrupted |= message.flags & NLM_F_DUMP_INTR != 0;
        if let Some(chain) = decode_nat_postrouting(message) {
            chains.push(chain);
        }
        Ok(())
    });
    match result {
        Err(error) if error.contains(&std::io::Error::from_raw_os_error(EINTR).to_string()) => {
            Ok(None)
        }
        Err(error) => Err(error),
        Ok(()) if interrupted => Ok(None),
        Ok(()) => Ok(Some(chains)),
    }
}

/// The chain of a NEWCHAIN dump message, when it is a nat base chain on postrouting.
fn decode_nat_postrouting(message: &Received) -> Option<NatPostroutingChain> {
    if message.kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN {
        return None;
    }
    let family = match i32::from(*message.payload.first()?) {
        libc::NFPROTO_IPV4 => "ip",
        libc::NFPROTO_IPV6 => "ip6",
        libc::NFPROTO_INET => "inet",
        _ => return None,
    };
    let attributes = message.attributes();
    if attributes.get(NFTA_CHAIN_TYPE)? != b"nat\0" {
        return None;
    }
    let hook = super::Attributes(attributes.get(NFTA_CHAIN_HOOK)?);
    let hook_number = u32::from_be_bytes(hook.get(NFTA_HOOK_HOOKNUM)?.try_into().ok()?);
    if hook_number != NF_INET_POST_ROUTING {
        return None;
    }
    let priority = i32::from_be_bytes(hook.get(NFTA_HOOK_PRIORITY)?.try_into().ok()?);
    let text = |kind| {
        let bytes = attributes.get(kind)?;
        let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
        String::from_utf8(bytes.to_vec()).ok()
    };
    Some(NatPostroutingChain {
        family,
        table: text(NFTA_CHAIN_TABLE)?,
        chain: text(NFTA_CHAIN_NAME)?,
        priority,
    })
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

    #[test]
    fn a_chain_dump_message_is_kept_only_for_a_nat_base_chain_on_postrouting() {
        let chain = |family: u8, kind: &str, hook: u32| {
            let mut message = Message::new((10 << 8) | NFT_MSG_NEWCHAIN, 0, 1, family, 0);
            message.string(NFTA_CHAIN_TABLE, "kube-proxy");
            message.string(NFTA_CHAIN_NAME, "nat-postrouting");
            message.nested(NFTA_CHAIN_HOOK, |hook_attributes| {
                hook_attributes.attribute(NFTA_HOOK_HOOKNUM, &hook.to_be_bytes());
                hook_attributes.attribute(NFTA_HOOK_PRIORITY, &100i32.to_be_bytes());
            });
            message.string(NFTA_CHAIN_TYPE, kind);
            message.finish()
        };
        let decoded = |bytes: Vec<u8>| {
            let message = messages(&bytes).next().expect("one message");
            decode_nat_postrouting(&message)
        };
        assert_eq!(
            decoded(chain(2, "nat", 4)),
            Some(NatPostroutingChain {
                family: "ip",
                table: "kube-proxy".into(),
                chain: "nat-postrouting".into(),
                priority: 100,
            })
        );
        assert_eq!(decoded(chain(1, "nat", 4)).map(|c| c.family), Some("inet"));
        assert_eq!(decoded(chain(2, "filter", 4)), None);
        assert_eq!(decoded(chain(2, "nat", 0)), None);
        assert_eq!(decoded(chain(7, "nat", 4)), None, "bridge");
    }
}
