//! Reading one `inet` table back from the kernel: its flags, sets, the elements of the
//! sets that matter, chains and rules, each a streamed dump fed straight into a
//! [`Comparison`] (one fixed receive buffer; nothing the kernel holds is kept beyond
//! what the comparison needs). The reads are bracketed by the ruleset generation: a read
//! during which someone committed is taken again, so what it found is the table as it
//! was at one generation.

use super::super::{Attributes, Message, NLM_F_DUMP_INTR, Received, Socket};
use super::expr::{decode_list, read_be32, read_string};
use super::table::{BaseChain, Comparison, Found, Observed, Table};
use super::{NFNL_SUBSYS_NFTABLES, NFPROTO_INET, generation_on};

const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_GETSETELEM: u16 = 13;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_CHAIN_FLAGS: u16 = 10;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;

/// Reads taken again at most this often when someone keeps committing during them.
const READ_ATTEMPTS: usize = 5;

/// Why one read did not give an answer.
enum ReadError {
    /// The dumped state changed under the read (the kernel flagged a dump).
    Changed,
    Failed(String),
}

impl From<String> for ReadError {
    fn from(message: String) -> Self {
        ReadError::Failed(message)
    }
}

struct Reader<'s> {
    socket: &'s Socket,
    seq: u32,
}

impl<'s> Reader<'s> {
    /// Sends a dump request and streams the answer's messages into `on_message`.
    fn dump(
        &mut self,
        kind: u16,
        fill: impl FnOnce(&mut Message),
        mut on_message: impl FnMut(&Received) -> Result<(), String>,
    ) -> Result<(), ReadError> {
        self.seq += 1;
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        let mut request = Message::new(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            flags,
            self.seq,
            NFPROTO_INET,
            0,
        );
        fill(&mut request);
        self.socket.send(&request.finish())?;
        let mut interrupted = false;
        self.socket.stream_dump(|message| {
            if message.flags & NLM_F_DUMP_INTR != 0 {
                interrupted = true;
            }
            on_message(message)
        })?;
        if interrupted {
            return Err(ReadError::Changed);
        }
        Ok(())
    }

    /// The table's flags, or None when the family has no table of that name.
    fn table_flags(&mut self, name: &str) -> Result<Option<u32>, ReadError> {
        let mut flags = None;
        self.dump(
            NFT_MSG_GETTABLE,
            |_| {},
            |message| {
                let attributes = message.attributes();
                if attributes.get(NFTA_TABLE_NAME).map(read_string).as_deref() == Some(name) {
                    flags = Some(
                        attributes
                            .get(NFTA_TABLE_FLAGS)
                            .and_then(read_be32)
                            .unwrap_or(0),
                    );
                }
                Ok(())
            },
        )?;
        Ok(flags)
    }

    /// Streams the keys and flags of the elements of `set` into `on_element`.
    fn elements(
        &mut self,
        table: &str,
        set: &str,
        mut on_element: impl FnMut(&[u8], u32),
    ) -> Result<(), ReadError> {
        self.dump(
            NFT_MSG_GETSETELEM,
            |request| {
                request.string(NFTA_SET_ELEM_LIST_TABLE, table);
                request.string(NFTA_SET_ELEM_LIST_SET, set);
            },
            |message| {
                let Some(list) = message.attributes().get(NFTA_SET_ELEM_LIST_ELEMENTS) else {
                    return Ok(());
                };
                for (_, element) in Attributes(list) {
                    let element = Attributes(element);
                    let key = element
                        .get(NFTA_SET_ELEM_KEY)
                        .and_then(|key| Attributes(key).get(NFTA_DATA_VALUE))
                        .unwrap_or_default();
                    let flags = element
                        .get(NFTA_SET_ELEM_FLAGS)
                        .and_then(read_be32)
                        .unwrap_or(0);
                    on_element(key, flags);
                }
                Ok(())
            },
        )
    }

    fn read(&mut self, want: &Table) -> Result<Option<Found>, ReadError> {
        let name = want.name.as_str();
        let Some(flags) = self.table_flags(name)? else {
            return Ok(None);
        };
        let mut comparison = Comparison::new(want, flags);
        let mut wanted_sets = Vec::new();
        self.dump(
            NFT_MSG_GETSET,
            |request| request.string(NFTA_SET_TABLE, name),
            |message| {
                let attributes = message.attributes();
                if attributes.get(NFTA_SET_TABLE).map(read_string).as_deref() != Some(name) {
                    return Ok(());
                }
                let set = attributes
                    .get(NFTA_SET_NAME)
                    .map(read_string)
                    .unwrap_or_default();
                let number = |kind| attributes.get(kind).and_then(read_be32).unwrap_or(0);
                if comparison.set(
                    &set,
                    number(NFTA_SET_FLAGS),
                    number(NFTA_SET_KEY_TYPE),
                    number(NFTA_SET_KEY_LEN),
                ) {
                    wanted_sets.push(set);
                }
                Ok(())
            },
        )?;
        for set in wanted_sets {
            if let Some(mut check) = comparison.elements(&set) {
                self.elements(name, &set, |key, flags| check.element(key, flags))?;
                comparison.elements_read(check);
            }
        }
        for set in comparison.anonymous_sets() {
            self.elements(name, &set, |key, _| comparison.anonymous_element(&set, key))?;
        }
        self.dump(
            NFT_MSG_GETCHAIN,
            |_| {},
            |message| {
                let attributes = message.attributes();
                if attributes.get(NFTA_CHAIN_TABLE).map(read_string).as_deref() != Some(name) {
                    return Ok(());
                }
                let chain = attributes
                    .get(NFTA_CHAIN_NAME)
                    .map(read_string)
                    .unwrap_or_default();
                let base = attributes.get(NFTA_CHAIN_HOOK).map(|hook| {
                    let hook = Attributes(hook);
                    BaseChain {
                        kind: attributes
                            .get(NFTA_CHAIN_TYPE)
                            .map(read_string)
                            .unwrap_or_default(),
                        hook: hook
                            .get(NFTA_HOOK_HOOKNUM)
                            .and_then(read_be32)
                            .unwrap_or(u32::MAX),
                        priority: hook
                            .get(NFTA_HOOK_PRIORITY)
                            .and_then(read_be32)
                            .map_or(i32::MIN, |p| p as i32),
                        policy: attributes
                            .get(NFTA_CHAIN_POLICY)
                            .and_then(read_be32)
                            .unwrap_or(u32::MAX),
                    }
                });
                let flags = attributes
                    .get(NFTA_CHAIN_FLAGS)
                    .and_then(read_be32)
                    .unwrap_or(0);
                comparison.chain(&chain, base, flags);
                Ok(())
            },
        )?;
        self.dump(
            NFT_MSG_GETRULE,
            |request| request.string(NFTA_RULE_TABLE, name),
            |message| {
                let attributes = message.attributes();
                if attributes.get(NFTA_RULE_TABLE).map(read_string).as_deref() != Some(name) {
                    return Ok(());
                }
                let chain = attributes
                    .get(NFTA_RULE_CHAIN)
                    .map(read_string)
                    .unwrap_or_default();
                let exprs = decode_list(
                    attributes.get(NFTA_RULE_EXPRESSIONS).unwrap_or_default(),
                    &|set: &str| comparison.anonymous(set),
                );
                comparison.rule(&chain, exprs.as_deref());
                Ok(())
            },
        )?;
        Ok(Some(comparison.finish()))
    }
}

/// Reads the `inet` table `want.name` and compares it with `want`, as it was at one
/// ruleset generation.
pub fn observe(socket: &Socket, want: &Table) -> Result<Observed, String> {
    let mut reader = Reader { socket, seq: 0 };
    let mut last_error = None;
    for _ in 0..READ_ATTEMPTS {
        reader.seq += 1;
        let before = generation_on(socket, reader.seq)?;
        let result = reader.read(want);
        reader.seq += 1;
        let after = generation_on(socket, reader.seq)?;
        match result {
            Ok(table) if before == after => {
                return Ok(Observed {
                    generation: before,
                    table,
                });
            }
            Err(ReadError::Failed(message)) if before == after => return Err(message),
            Err(ReadError::Failed(message)) => last_error = Some(message),
            _ => {}
        }
    }
    Err(format!(
        "the nf_tables ruleset changed during each of {READ_ATTEMPTS} reads{}",
        last_error
            .map(|e| format!(" (last: {e})"))
            .unwrap_or_default()
    ))
}
