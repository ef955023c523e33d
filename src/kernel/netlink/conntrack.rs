//! Conntrack over netlink (ctnetlink), without conntrack-tools: a streamed dump of one
//! family's entries, decoded one at a time from one fixed buffer (whatever the size of
//! the table, nothing of it is held), and batched deletes by exact original tuple, zone
//! and id, many per datagram, every one acked.
//!
//! The dump asks the kernel to leave out what the agent never re-decides: other zones
//! (`CTA_ZONE`, kernel 5.x and later) and destination-NATed entries (`CTA_STATUS` with
//! `CTA_STATUS_MASK`, kernel 6.x). An older kernel ignores what it does not know, and
//! one that refuses a filter gets the plain dump again, so callers always check every
//! entry themselves.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::ControlFlow;
use std::time::Duration;

use super::{Attributes, Message, NLMSG_HEADER, Received, Socket};
use crate::policy::Family;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_STATUS_MASK: u16 = 26;

const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_TUPLE_ZONE: u16 = 3;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// The entry's destination was rewritten (a Service, a NodePort, a port forward).
pub const IPS_DST_NAT: u32 = 1 << 5;
/// The entry's source was rewritten.
pub const IPS_SRC_NAT: u32 = 1 << 4;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Delete requests per datagram: each is acked, and all acks of a datagram must fit the
/// receive buffer at once (about 1 KiB of buffer each, counted by the kernel).
pub const DELETES_PER_DATAGRAM: usize = 128;
/// The receive buffer asked for on the delete socket (acks) and the dump socket.
const RECEIVE_BUFFER_BYTES: usize = 1 << 20;

/// One direction of a flow. Ports are 0 for protocols without them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub source_port: u16,
    pub destination_port: u16,
}

/// One conntrack entry as the kernel dumps it: what deciding and deleting it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// IP protocol number (6 tcp, 17 udp, 132 sctp, ...).
    pub protocol: u8,
    pub original: Tuple,
    pub reply: Tuple,
    /// The conntrack zone: `CTA_ZONE`, or a direction's own zone; 0 is the default zone.
    pub zone: u16,
    /// `IPS_*` bits.
    pub status: u32,
    /// The kernel's id of the entry: a delete naming it cannot hit a newer entry that
    /// reuses the tuple.
    pub id: u32,
}

impl Entry {
    /// What deleting exactly this entry needs.
    pub fn key(&self) -> FlowKey {
        FlowKey {
            protocol: self.protocol,
            original: self.original,
            zone: self.zone,
            id: self.id,
        }
    }
}

/// Exactly one entry: its original tuple in its zone, and its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    pub protocol: u8,
    pub original: Tuple,
    pub zone: u16,
    pub id: u32,
}

/// What a dump did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DumpReport {
    /// Entries the kernel sent (after its own filtering).
    pub entries: u64,
    /// Dump requests sent (2 when the kernel refused the filters and the plain dump
    /// was asked for).
    pub requests: u32,
    /// Whether the kernel was asked to filter (it may still have ignored some of it).
    pub kernel_filtered: bool,
}

/// What the deletes did. Entries gone before their delete (ENOENT: expired, or a
/// newer entry with the same tuple) are not failures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteReport {
    pub deleted: u64,
    pub gone: u64,
    /// Deletes the kernel refused for another reason, and the first such reason.
    pub refused: u64,
    pub first_refusal: Option<String>,
    /// Datagrams sent (one netlink round trip each).
    pub datagrams: u64,
}

/// What the dump asks the kernel to leave out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DumpFilter {
    /// Only entries of this zone.
    pub zone: Option<u16>,
    /// Only entries with none of these `IPS_*` bits.
    pub without_status: u32,
}

fn kind(message: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | message
}

fn address_family(family: Family) -> u8 {
    match family {
        Family::V4 => libc::AF_INET as u8,
        Family::V6 => libc::AF_INET6 as u8,
    }
}

/// `IPCTNL_MSG_CT_GET` with `NLM_F_DUMP` for `family`, filtered by `filter`.
fn dump_request(family: Family, filter: Option<&DumpFilter>) -> Vec<u8> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    let mut message = Message::new(kind(IPCTNL_MSG_CT_GET), flags, 1, address_family(family), 0);
    if let Some(filter) = filter {
        if let Some(zone) = filter.zone {
            message.attribute(CTA_ZONE, &zone.to_be_bytes());
        }
        if filter.without_status != 0 {
            message.attribute(CTA_STATUS, &0u32.to_be_bytes());
            message.attribute(CTA_STATUS_MASK, &filter.without_status.to_be_bytes());
        }
    }
    message.finish()
}

/// Streams the entries of `family` to `visit`, one at a time, from one fixed buffer;
/// `visit` may break the dump off. Each wait for the kernel is bounded by `within`;
/// `stopping` is asked every 256 entries.
pub fn dump(
    family: Family,
    filter: &DumpFilter,
    within: Duration,
    stopping: &dyn Fn() -> bool,
    visit: &mut dyn FnMut(&Entry) -> ControlFlow<()>,
) -> Result<DumpReport, String> {
    let mut report = DumpReport {
        kernel_filtered: *filter != DumpFilter::default(),
        ..DumpReport::default()
    };
    let first = dump_once(family, Some(filter), within, stopping, visit, &mut report);
    match first {
        // A kernel that refuses a filter (no zone support, say) refuses before it sends
        // anything: ask again without.
        Err(refused) if report.entries == 0 && report.kernel_filtered => {
            tracing::debug!(
                "conntrack: the kernel refused the filtered dump ({refused}); dumping without kernel filters"
            );
            report.kernel_filtered = false;
            dump_once(family, None, within, stopping, visit, &mut report)?;
        }
        other => other?,
    }
    Ok(report)
}

fn dump_once(
    family: Family,
    filter: Option<&DumpFilter>,
    within: Duration,
    stopping: &dyn Fn() -> bool,
    visit: &mut dyn FnMut(&Entry) -> ControlFlow<()>,
    report: &mut DumpReport,
) -> Result<(), String> {
    let socket = Socket::open(within)?;
    socket.grow_receive_buffer(RECEIVE_BUFFER_BYTES);
    socket.send(&dump_request(family, filter))?;
    report.requests += 1;
    let mut broken_off = false;
    if stopping() {
        return Err("conntrack dump interrupted: the agent is stopping".into());
    }
    let result = socket.stream_dump(|message: &Received| {
        if broken_off || message.kind != kind(IPCTNL_MSG_CT_NEW) {
            return Ok(());
        }
        if let Some(entry) = decode(message) {
            report.entries += 1;
            if visit(&entry).is_break() {
                broken_off = true;
                return Err(String::new());
            }
            if report.entries.is_multiple_of(256) && stopping() {
                return Err("conntrack dump interrupted: the agent is stopping".into());
            }
        }
        // What `visit` did (deletes, say) is not the kernel's delay: the wait for the
        // next datagram starts now.
        socket.renew(within);
        Ok(())
    });
    match result {
        Err(_) if broken_off => Ok(()),
        other => other,
    }
}

/// An entry from a dump message; None when it lacks a tuple.
pub fn decode(message: &Received) -> Option<Entry> {
    let attributes = message.attributes();
    let (original, protocol, original_zone) = tuple(attributes.get(CTA_TUPLE_ORIG)?)?;
    let (reply, _, reply_zone) = tuple(attributes.get(CTA_TUPLE_REPLY)?)?;
    let be32 = |bytes: &[u8]| Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?));
    let zone = attributes
        .get(CTA_ZONE)
        .and_then(|z| Some(u16::from_be_bytes(z.get(..2)?.try_into().ok()?)))
        .unwrap_or(0);
    Some(Entry {
        protocol,
        original,
        reply,
        zone: [zone, original_zone, reply_zone]
            .into_iter()
            .find(|z| *z != 0)
            .unwrap_or(0),
        status: attributes.get(CTA_STATUS).and_then(be32).unwrap_or(0),
        id: attributes.get(CTA_ID).and_then(be32).unwrap_or(0),
    })
}

/// A `CTA_TUPLE_*` nest: the tuple, its protocol and the direction's zone (0: none).
fn tuple(nest: &[u8]) -> Option<(Tuple, u8, u16)> {
    let attributes = Attributes(nest);
    let ip = Attributes(attributes.get(CTA_TUPLE_IP)?);
    let v4 = |kind: u16| {
        let bytes: [u8; 4] = ip.get(kind)?.get(..4)?.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(bytes)))
    };
    let v6 = |kind: u16| {
        let bytes: [u8; 16] = ip.get(kind)?.get(..16)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(bytes)))
    };
    let (source, destination) = match (v4(CTA_IP_V4_SRC), v4(CTA_IP_V4_DST)) {
        (Some(s), Some(d)) => (s, d),
        _ => (v6(CTA_IP_V6_SRC)?, v6(CTA_IP_V6_DST)?),
    };
    let proto = Attributes(attributes.get(CTA_TUPLE_PROTO)?);
    let protocol = *proto.get(CTA_PROTO_NUM)?.first()?;
    let port = |kind: u16| {
        proto
            .get(kind)
            .and_then(|p| Some(u16::from_be_bytes(p.get(..2)?.try_into().ok()?)))
            .unwrap_or(0)
    };
    let zone = attributes
        .get(CTA_TUPLE_ZONE)
        .and_then(|z| Some(u16::from_be_bytes(z.get(..2)?.try_into().ok()?)))
        .unwrap_or(0);
    let tuple = Tuple {
        source,
        destination,
        source_port: port(CTA_PROTO_SRC_PORT),
        destination_port: port(CTA_PROTO_DST_PORT),
    };
    Some((tuple, protocol, zone))
}

/// Writes `tuple` of `protocol` as a `CTA_TUPLE_*` nest's contents.
fn write_tuple(message: &mut Message, protocol: u8, tuple: &Tuple) {
    message.nested(CTA_TUPLE_IP, |ip| match (tuple.source, tuple.destination) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            ip.attribute(CTA_IP_V4_SRC, &s.octets());
            ip.attribute(CTA_IP_V4_DST, &d.octets());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            ip.attribute(CTA_IP_V6_SRC, &v6(s));
            ip.attribute(CTA_IP_V6_DST, &v6(d));
        }
    });
    message.nested(CTA_TUPLE_PROTO, |proto| {
        proto.attribute(CTA_PROTO_NUM, &[protocol]);
        if matches!(protocol, IPPROTO_TCP | IPPROTO_UDP | 132 | 33 | 136) {
            proto.attribute(CTA_PROTO_SRC_PORT, &tuple.source_port.to_be_bytes());
            proto.attribute(CTA_PROTO_DST_PORT, &tuple.destination_port.to_be_bytes());
        }
    });
}

/// `IPCTNL_MSG_CT_DELETE` of exactly `key`: the original tuple (never omitted: a delete
/// without a tuple would flush the table), the zone (none: the default zone) and the id;
/// acked.
fn delete_request(key: &FlowKey, seq: u32) -> Vec<u8> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    let family = match key.original.source {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    };
    let mut message = Message::new(
        kind(IPCTNL_MSG_CT_DELETE),
        flags,
        seq,
        address_family(family),
        0,
    );
    message.nested(CTA_TUPLE_ORIG, |tuple| {
        write_tuple(tuple, key.protocol, &key.original)
    });
    // No CTA_ZONE is the default zone, exactly; naming zone 0 would be refused by a
    // kernel built without zones.
    if key.zone != 0 {
        message.attribute(CTA_ZONE, &key.zone.to_be_bytes());
    }
    message.attribute(CTA_ID, &key.id.to_be_bytes());
    message.finish()
}

/// Deletes exactly the entries `keys` name, [`DELETES_PER_DATAGRAM`] per datagram on
/// one socket, each wait for acks bounded by `within`.
pub fn delete(keys: &[FlowKey], within: Duration) -> Result<DeleteReport, String> {
    let mut report = DeleteReport::default();
    if keys.is_empty() {
        return Ok(report);
    }
    let socket = Socket::open(within)?;
    socket.grow_receive_buffer(RECEIVE_BUFFER_BYTES);
    let mut seq: u32 = 1;
    let mut datagram = Vec::with_capacity(DELETES_PER_DATAGRAM * 96);
    let mut acked = Vec::with_capacity(DELETES_PER_DATAGRAM);
    for chunk in keys.chunks(DELETES_PER_DATAGRAM) {
        datagram.clear();
        acked.clear();
        for key in chunk {
            datagram.extend(delete_request(key, seq));
            acked.push(seq);
            seq = seq.wrapping_add(1).max(1);
        }
        socket.renew(within);
        socket.send(&datagram)?;
        report.datagrams += 1;
        let mut refusals = 0u64;
        let mut gone = 0u64;
        let mut first = None;
        socket.collect_acks(&acked, |_, code| {
            if code == -libc::ENOENT {
                gone += 1;
            } else {
                refusals += 1;
                first.get_or_insert_with(|| super::kernel_error(code));
            }
            Ok(())
        })?;
        report.gone += gone;
        report.refused += refusals;
        report.deleted += chunk.len() as u64 - gone - refusals;
        if report.first_refusal.is_none() {
            report.first_refusal = first;
        }
    }
    Ok(report)
}

/// The length of one delete request (for tests and sizing).
pub fn delete_request_len(key: &FlowKey) -> usize {
    delete_request(key, 1).len() - NLMSG_HEADER
}

#[cfg(test)]
mod tests {
    use super::super::messages;
    use super::*;

    fn flow(source: &str, destination: &str, reply_destination: &str) -> Entry {
        let (s, d, r): (IpAddr, IpAddr, IpAddr) = (
            source.parse().unwrap(),
            destination.parse().unwrap(),
            reply_destination.parse().unwrap(),
        );
        Entry {
            protocol: IPPROTO_UDP,
            original: Tuple {
                source: s,
                destination: d,
                source_port: 40000,
                destination_port: 53,
            },
            reply: Tuple {
                source: d,
                destination: r,
                source_port: 53,
                destination_port: 40000,
            },
            zone: 0,
            status: IPS_SRC_NAT,
            id: 0xdead_beef,
        }
    }

    /// A dump message the kernel would send for `entry`.
    fn dumped(entry: &Entry, zone_attribute: Option<u16>, tuple_zone: Option<u16>) -> Vec<u8> {
        let mut message = Message::new(kind(IPCTNL_MSG_CT_NEW), 2, 1, 2, 0);
        message.nested(CTA_TUPLE_ORIG, |t| {
            write_tuple(t, entry.protocol, &entry.original);
            if let Some(zone) = tuple_zone {
                t.attribute(CTA_TUPLE_ZONE, &zone.to_be_bytes());
            }
        });
        message.nested(CTA_TUPLE_REPLY, |t| {
            write_tuple(t, entry.protocol, &entry.reply)
        });
        if let Some(zone) = zone_attribute {
            message.attribute(CTA_ZONE, &zone.to_be_bytes());
        }
        message.attribute(CTA_ID, &entry.id.to_be_bytes());
        message.attribute(CTA_STATUS, &entry.status.to_be_bytes());
        message.finish()
    }

    #[test]
    fn dumped_entries_decode_with_their_zone_status_and_id() {
        let entry = flow("10.244.1.2", "203.0.113.10", "192.0.2.1");
        let bytes = dumped(&entry, None, None);
        let message = messages(&bytes).next().unwrap();
        assert_eq!(decode(&message), Some(entry));
        let in_zone = dumped(&entry, Some(5), None);
        assert_eq!(decode(&messages(&in_zone).next().unwrap()).unwrap().zone, 5);
        // A zone of one direction only (`--orig-zone`) is another zone too.
        let directional = dumped(&entry, None, Some(7));
        assert_eq!(
            decode(&messages(&directional).next().unwrap())
                .unwrap()
                .zone,
            7
        );
        let v6 = flow("fd00:244::2", "2001:db8:99::10", "2001:db8:1::1");
        let bytes = dumped(&v6, None, None);
        assert_eq!(decode(&messages(&bytes).next().unwrap()), Some(v6));
    }

    #[test]
    fn a_delete_always_names_the_tuple_zone_and_id() {
        let key = flow("10.244.1.2", "203.0.113.10", "192.0.2.1").key();
        let bytes = delete_request(&key, 9);
        let message = messages(&bytes).next().unwrap();
        assert_eq!(message.kind, 0x102);
        assert_eq!(
            message.flags,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16
        );
        assert_eq!(message.seq, 9);
        assert_eq!(message.payload[0], libc::AF_INET as u8);
        let attributes = message.attributes();
        let (original, protocol, zone) = tuple(attributes.get(CTA_TUPLE_ORIG).unwrap()).unwrap();
        assert_eq!((original, protocol, zone), (key.original, IPPROTO_UDP, 0));
        assert_eq!(attributes.get(CTA_ZONE), None, "the default zone");
        assert_eq!(
            attributes.get(CTA_ID),
            Some(&0xdead_beefu32.to_be_bytes()[..])
        );
        let zoned = FlowKey { zone: 5, ..key };
        let bytes = delete_request(&zoned, 10);
        let message = messages(&bytes).next().unwrap();
        assert_eq!(message.attributes().get(CTA_ZONE), Some(&[0u8, 5][..]));
        // Small enough that a datagram of them stays far below the socket's limits.
        assert!(delete_request_len(&key) * DELETES_PER_DATAGRAM < 16 * 1024);
    }

    #[test]
    fn the_dump_request_asks_for_the_filters() {
        let filter = DumpFilter {
            zone: Some(0),
            without_status: IPS_DST_NAT,
        };
        let bytes = dump_request(Family::V6, Some(&filter));
        let message = messages(&bytes).next().unwrap();
        assert_eq!(message.kind, 0x101);
        assert_eq!(message.payload[0], libc::AF_INET6 as u8);
        let attributes = message.attributes();
        assert_eq!(attributes.get(CTA_ZONE), Some(&[0u8, 0][..]));
        assert_eq!(attributes.get(CTA_STATUS), Some(&[0u8, 0, 0, 0][..]));
        assert_eq!(
            attributes.get(CTA_STATUS_MASK),
            Some(&IPS_DST_NAT.to_be_bytes()[..])
        );
        let plain = dump_request(Family::V4, None);
        assert_eq!(messages(&plain).next().unwrap().attributes().count(), 0);
    }
}
