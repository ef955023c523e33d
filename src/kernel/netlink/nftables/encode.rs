//! A [`Batch`] as the bytes of one nfnetlink batch, message by message as nft 1.0.6
//! writes them (attributes, user data, the anonymous sets of a rule declared just before
//! it), so that `nft list` prints the table as if nft had written it.

use ipnet::IpNet;

use super::super::Message;
use super::expr::{AnonymousSet, Expr, SetRef, TYPE_INET_PROTO};
use super::table::{
    Batch, Boundary, Chain, ELEMENT_INTERVAL_END, Op, SET_ANONYMOUS, SET_CONSTANT, SET_INTERVAL,
    Set, interval, key_bytes,
};
use super::{NFNL_SUBSYS_NFTABLES, NFPROTO_INET};
use crate::policy::Family;

const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_BATCH_GENID: u16 = 1;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
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
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;

/// nft's set user data (libnftnl's udata: type, length, value in host order):
/// `NFTNL_UDATA_SET_KEYBYTEORDER` = big endian (2) or host (1).
fn key_byteorder(order: u32) -> Vec<u8> {
    let mut data = vec![0, 4];
    data.extend_from_slice(&order.to_ne_bytes());
    data
}

/// `NFTNL_UDATA_SET_KEY_TYPEOF`: the set's key is `meta KEY` (nft's `EXPR_META` is 9).
fn typeof_meta(key: u32) -> Vec<u8> {
    let mut data = vec![3, 14, 0, 4];
    data.extend_from_slice(&9u32.to_ne_bytes());
    data.extend_from_slice(&[1, 6, 0, 4]);
    data.extend_from_slice(&key.to_ne_bytes());
    data
}

/// `NFTNL_UDATA_SET_ELEM_FLAGS` = `NFTNL_SET_ELEM_F_INTERVAL_OPEN`: an interval that runs
/// to the end of the address space, so nft lists it back as the prefix it was.
pub const INTERVAL_OPEN_USERDATA: [u8; 6] = [1, 4, 1, 0, 0, 0];

/// What one `NFTA_LIST_ELEM` of a prefix can take at most (an IPv6 start and end, the
/// open-interval user data), so a message's element list stays within the 64 KiB an
/// attribute can measure.
const MAX_PREFIX_BYTES: usize = 80;
const MAX_LIST_BYTES: usize = 60_000;
const PREFIXES_PER_MESSAGE: usize = MAX_LIST_BYTES / MAX_PREFIX_BYTES;

/// The bytes of a batch, and the sequence number of its last message, the one that asks
/// for an acknowledgement (the kernel reports every failing message anyway, before it).
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub last: Option<u32>,
}

struct Writer<'b> {
    batch: &'b Batch,
    messages: Vec<Message>,
    seq: u32,
    set_id: u32,
}

const REQUEST: u16 = libc::NLM_F_REQUEST as u16;
const CREATE: u16 = libc::NLM_F_CREATE as u16;
const APPEND: u16 = libc::NLM_F_APPEND as u16;
const ACK: u16 = libc::NLM_F_ACK as u16;

impl<'b> Writer<'b> {
    fn message(&mut self, kind: u16, flags: u16) -> Message {
        self.seq += 1;
        Message::new(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            REQUEST | flags,
            self.seq,
            NFPROTO_INET,
            0,
        )
    }

    fn table(&self) -> &'b str {
        &self.batch.table
    }

    fn next_set_id(&mut self) -> u32 {
        self.set_id += 1;
        self.set_id
    }

    fn op(&mut self, op: &Op) {
        match op {
            Op::NewTable => {
                let mut message = self.message(NFT_MSG_NEWTABLE, CREATE);
                message.string(NFTA_TABLE_NAME, self.table());
                message.attribute(NFTA_TABLE_FLAGS, &0u32.to_be_bytes());
                self.messages.push(message);
            }
            Op::DelTable => {
                let mut message = self.message(NFT_MSG_DELTABLE, 0);
                message.string(NFTA_TABLE_NAME, self.table());
                self.messages.push(message);
            }
            Op::FlushRules => {
                let mut message = self.message(NFT_MSG_DELRULE, 0);
                message.string(NFTA_RULE_TABLE, self.table());
                self.messages.push(message);
            }
            Op::NewChain(chain) => self.new_chain(chain),
            Op::DelChain(name) => {
                let mut message = self.message(NFT_MSG_DELCHAIN, 0);
                message.string(NFTA_CHAIN_TABLE, self.table());
                message.string(NFTA_CHAIN_NAME, name);
                self.messages.push(message);
            }
            Op::NewSet(set) => self.new_set(set),
            Op::DelSet(name) => {
                let mut message = self.message(NFT_MSG_DELSET, 0);
                message.string(NFTA_SET_TABLE, self.table());
                message.string(NFTA_SET_NAME, name);
                self.messages.push(message);
            }
            Op::FlushSet(name) => {
                let mut message = self.message(NFT_MSG_DELSETELEM, 0);
                message.string(NFTA_SET_ELEM_LIST_TABLE, self.table());
                message.string(NFTA_SET_ELEM_LIST_SET, name);
                self.messages.push(message);
            }
            Op::AddPrefixes { set, prefixes } => {
                self.prefixes(NFT_MSG_NEWSETELEM, CREATE, set, prefixes)
            }
            Op::DelPrefixes { set, prefixes } => {
                self.prefixes(NFT_MSG_DELSETELEM, 0, set, prefixes)
            }
            Op::DelElements {
                set,
                family,
                elements,
            } => {
                for chunk in elements.chunks(PREFIXES_PER_MESSAGE) {
                    let mut message = self.message(NFT_MSG_DELSETELEM, 0);
                    message.string(NFTA_SET_ELEM_LIST_TABLE, self.table());
                    message.string(NFTA_SET_ELEM_LIST_SET, set);
                    message.nested(NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
                        for element in chunk {
                            boundary(list, element, *family);
                        }
                    });
                    self.messages.push(message);
                }
            }
            Op::NewRule { chain, rule } => {
                let mut ids = Vec::new();
                for expr in &rule.exprs {
                    if let Expr::Lookup {
                        set: SetRef::Anonymous(set),
                        ..
                    } = expr
                    {
                        ids.push(self.anonymous_set(set));
                    }
                }
                let mut message = self.message(NFT_MSG_NEWRULE, CREATE | APPEND);
                message.string(NFTA_RULE_TABLE, self.table());
                message.string(NFTA_RULE_CHAIN, chain);
                let mut ids = ids.into_iter();
                message.nested(NFTA_RULE_EXPRESSIONS, |list| {
                    for expr in &rule.exprs {
                        let id = match expr {
                            Expr::Lookup {
                                set: SetRef::Anonymous(_),
                                ..
                            } => ids.next(),
                            _ => None,
                        };
                        expr.encode(list, id);
                    }
                });
                self.messages.push(message);
            }
        }
    }

    fn new_chain(&mut self, chain: &Chain) {
        let mut message = self.message(NFT_MSG_NEWCHAIN, CREATE);
        message.string(NFTA_CHAIN_TABLE, self.table());
        message.string(NFTA_CHAIN_NAME, &chain.name);
        if let Some(base) = &chain.base {
            message.string(NFTA_CHAIN_TYPE, &base.kind);
            message.attribute(NFTA_CHAIN_POLICY, &base.policy.to_be_bytes());
            message.nested(NFTA_CHAIN_HOOK, |hook| {
                hook.attribute(NFTA_HOOK_HOOKNUM, &base.hook.to_be_bytes());
                hook.attribute(NFTA_HOOK_PRIORITY, &base.priority.to_be_bytes());
            });
        }
        self.messages.push(message);
    }

    fn new_set(&mut self, set: &Set) {
        let id = self.next_set_id();
        let mut message = self.message(NFT_MSG_NEWSET, CREATE);
        message.string(NFTA_SET_TABLE, self.table());
        message.string(NFTA_SET_NAME, &set.name);
        message.attribute(NFTA_SET_FLAGS, &SET_INTERVAL.to_be_bytes());
        message.attribute(NFTA_SET_KEY_TYPE, &set.key_type().to_be_bytes());
        message.attribute(NFTA_SET_KEY_LEN, &set.key_len().to_be_bytes());
        message.attribute(NFTA_SET_ID, &id.to_be_bytes());
        message.attribute(NFTA_SET_USERDATA, &key_byteorder(2));
        self.messages.push(message);
    }

    /// Declares an anonymous constant set and its elements; its transaction id.
    fn anonymous_set(&mut self, set: &AnonymousSet) -> u32 {
        let id = self.next_set_id();
        let mut message = self.message(NFT_MSG_NEWSET, CREATE);
        message.string(NFTA_SET_TABLE, self.table());
        message.string(NFTA_SET_NAME, "__set%d");
        message.attribute(
            NFTA_SET_FLAGS,
            &(SET_ANONYMOUS | SET_CONSTANT).to_be_bytes(),
        );
        message.attribute(NFTA_SET_KEY_TYPE, &set.key_type.to_be_bytes());
        message.attribute(NFTA_SET_KEY_LEN, &set.key_len.to_be_bytes());
        message.attribute(NFTA_SET_ID, &id.to_be_bytes());
        let size = u32::try_from(set.elements.len()).unwrap_or(u32::MAX);
        message.nested(NFTA_SET_DESC, |desc| {
            desc.attribute(NFTA_SET_DESC_SIZE, &size.to_be_bytes())
        });
        // A protocol number is one byte: host order, as nft records it.
        let mut userdata = key_byteorder(if set.key_type == TYPE_INET_PROTO {
            1
        } else {
            2
        });
        if let Some(key) = set.typeof_meta {
            userdata.extend(typeof_meta(key));
        }
        message.attribute(NFTA_SET_USERDATA, &userdata);
        self.messages.push(message);
        let mut message = self.message(NFT_MSG_NEWSETELEM, CREATE);
        message.string(NFTA_SET_ELEM_LIST_TABLE, self.table());
        message.string(NFTA_SET_ELEM_LIST_SET, "__set%d");
        message.attribute(NFTA_SET_ELEM_LIST_SET_ID, &id.to_be_bytes());
        message.nested(NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
            for element in &set.elements {
                list.nested(NFTA_LIST_ELEM, |element_attrs| {
                    element_attrs.nested(NFTA_SET_ELEM_KEY, |key| {
                        key.attribute(NFTA_DATA_VALUE, element)
                    });
                });
            }
        });
        self.messages.push(message);
        id
    }

    fn prefixes(&mut self, kind: u16, flags: u16, set: &str, prefixes: &[IpNet]) {
        for chunk in prefixes.chunks(PREFIXES_PER_MESSAGE) {
            let mut message = self.message(kind, flags);
            message.string(NFTA_SET_ELEM_LIST_TABLE, self.table());
            message.string(NFTA_SET_ELEM_LIST_SET, set);
            message.nested(NFTA_SET_ELEM_LIST_ELEMENTS, |list| {
                for prefix in chunk {
                    prefix_elements(list, prefix);
                }
            });
            self.messages.push(message);
        }
    }
}

fn family_of(prefix: &IpNet) -> Family {
    Family::of(prefix)
}

/// The elements of an interval set that stand for `prefix`: its start, and the address
/// after it (flagged as an interval end) unless it runs to the end of the address space,
/// when the start carries nft's open-interval mark instead.
fn prefix_elements(list: &mut Message, prefix: &IpNet) {
    let family = family_of(prefix);
    let (start, after) = interval(prefix);
    list.nested(NFTA_LIST_ELEM, |element| {
        element.nested(NFTA_SET_ELEM_KEY, |key| {
            key.attribute(NFTA_DATA_VALUE, &key_bytes(start, family))
        });
        if after.is_none() {
            element.attribute(NFTA_SET_ELEM_USERDATA, &INTERVAL_OPEN_USERDATA);
        }
    });
    if let Some(after) = after {
        boundary(
            list,
            &Boundary {
                key: after,
                end: true,
            },
            family,
        );
    }
}

fn boundary(list: &mut Message, element: &Boundary, family: Family) {
    list.nested(NFTA_LIST_ELEM, |attributes| {
        if element.end {
            attributes.attribute(NFTA_SET_ELEM_FLAGS, &ELEMENT_INTERVAL_END.to_be_bytes());
        }
        attributes.nested(NFTA_SET_ELEM_KEY, |key| {
            key.attribute(NFTA_DATA_VALUE, &key_bytes(element.key, family))
        });
    });
}

/// The batch as bytes: begin (with the generation it was computed at, if any), the
/// operations, end.
pub fn encode(batch: &Batch) -> Encoded {
    let mut writer = Writer {
        batch,
        messages: Vec::new(),
        seq: 0,
        set_id: 0,
    };
    for op in &batch.ops {
        writer.op(op);
    }
    let operations = writer.messages.len();
    let mut begin = Message::new(NFNL_MSG_BATCH_BEGIN, REQUEST, 0, 0, NFNL_SUBSYS_NFTABLES);
    if let Some(generation) = batch.generation {
        begin.attribute(NFNL_BATCH_GENID, &generation.to_be_bytes());
    }
    let mut end_seq = writer.seq + 1;
    let mut bytes = begin.finish();
    let mut last = None;
    for (i, message) in writer.messages.into_iter().enumerate() {
        let mut encoded = message.finish();
        if i + 1 == operations {
            let flags = u16::from_ne_bytes([encoded[6], encoded[7]]) | ACK;
            encoded[6..8].copy_from_slice(&flags.to_ne_bytes());
            last = Some(u32::from_ne_bytes([
                encoded[8],
                encoded[9],
                encoded[10],
                encoded[11],
            ]));
        }
        bytes.extend(encoded);
    }
    if operations == 0 {
        end_seq = 1;
    }
    bytes.extend(
        Message::new(
            NFNL_MSG_BATCH_END,
            REQUEST,
            end_seq,
            0,
            NFNL_SUBSYS_NFTABLES,
        )
        .finish(),
    );
    Encoded { bytes, last }
}

#[cfg(test)]
mod tests {
    use super::super::super::{Attributes, messages};
    use super::super::expr::{self, Rule};
    use super::super::table::{BaseChain, HOOK_POSTROUTING, POLICY_ACCEPT, Table};
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn a_batch_is_begin_operations_end_and_only_the_last_operation_is_acked() {
        let set = Set {
            name: "non-masq-v4".into(),
            family: Family::V4,
            prefixes: nets(&["10.0.0.0/8", "255.255.255.0/24"]),
        };
        let chain = Chain {
            name: "postrouting".into(),
            base: Some(BaseChain {
                kind: "nat".into(),
                hook: HOOK_POSTROUTING,
                priority: 110,
                policy: POLICY_ACCEPT,
            }),
            rules: Vec::new(),
        };
        let batch = Batch {
            table: "ip-masq-agent".into(),
            generation: Some(7),
            ops: vec![
                Op::NewTable,
                Op::NewSet(set.clone()),
                Op::AddPrefixes {
                    set: set.name.clone(),
                    prefixes: set.prefixes.clone(),
                },
                Op::NewChain(chain),
                Op::NewRule {
                    chain: "postrouting".into(),
                    rule: Rule::of([
                        expr::l4proto_in(&[6, 17, 132]),
                        expr::masquerade(None, true),
                    ]),
                },
            ],
        };
        let encoded = encode(&batch);
        let read: Vec<_> = messages(&encoded.bytes).collect();
        let kinds: Vec<u16> = read.iter().map(|m| m.kind).collect();
        // Begin, table, set, elements, chain, the anonymous set and its elements, the rule, end.
        assert_eq!(
            kinds,
            [
                0x10, 0x0a00, 0x0a09, 0x0a0c, 0x0a03, 0x0a09, 0x0a0c, 0x0a06, 0x11
            ]
        );
        // The generation rides on the begin message.
        assert_eq!(
            Attributes(&read[0].payload[4..]).get(NFNL_BATCH_GENID),
            Some(&7u32.to_be_bytes()[..])
        );
        let acked: Vec<u32> = read
            .iter()
            .filter(|m| m.flags & ACK != 0)
            .map(|m| m.seq)
            .collect();
        assert_eq!(acked, [read[7].seq]);
        assert_eq!(encoded.last, Some(read[7].seq));
        let contains = |needle: &[u8]| encoded.bytes.windows(needle.len()).any(|w| w == needle);
        assert!(contains(&[10, 0, 0, 0]) && contains(&[11, 0, 0, 0]));
        assert!(contains(&[255, 255, 255, 0]) && contains(&INTERVAL_OPEN_USERDATA));
        assert!(contains(b"__set%d\0"));
    }

    #[test]
    fn large_element_lists_are_split_across_messages_that_fit_an_attribute() {
        let prefixes: Vec<IpNet> = (0..5000u32)
            .map(|i| IpNet::new(std::net::Ipv6Addr::from(u128::from(i) << 64).into(), 64).unwrap())
            .collect();
        let batch = Batch {
            table: "t".into(),
            generation: None,
            ops: vec![Op::AddPrefixes {
                set: "s".into(),
                prefixes,
            }],
        };
        let encoded = encode(&batch);
        let read: Vec<_> = messages(&encoded.bytes).collect();
        assert_eq!(read.len(), 2 + 5000usize.div_ceil(PREFIXES_PER_MESSAGE));
        for message in &read[1..read.len() - 1] {
            let list = Attributes(&message.payload[4..])
                .get(NFTA_SET_ELEM_LIST_ELEMENTS)
                .unwrap();
            assert!(list.len() < 65_535);
        }
        // An empty batch is begin and end only.
        let empty = encode(&Batch {
            table: "t".into(),
            generation: None,
            ops: Vec::new(),
        });
        assert_eq!(messages(&empty.bytes).count(), 2);
        assert_eq!(empty.last, None);
        let _ = Table::empty("t");
    }
}
