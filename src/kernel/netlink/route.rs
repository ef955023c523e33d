//! The node's local addresses, read from the kernel's `local` routing table over
//! rtnetlink: every route of type `local` there (each address of each interface, all of
//! 127.0.0.0/8, `::1`, and any AnyIP prefix someone added) is exactly what the agent's
//! jump excludes (`-m addrtype ! --dst-type LOCAL`, nft `fib daddr type local return`).
//! One streamed dump per family; only the local routes are kept.
//!
//! And the interface the routing table sends a destination to (`ip route get DST`), for
//! the conntrack pass while outputInterface is set.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;

use super::{Attributes, Message, Socket};
use crate::policy::Family;

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
/// `struct rtmsg`: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
const RTMSG: usize = 12;
const RTA_DST: u16 = 1;
const RTA_SRC: u16 = 2;
const RTA_IIF: u16 = 3;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RT_TABLE_LOCAL: u32 = 255;
const RTN_LOCAL: u8 = 2;

/// The prefixes of the `local` routes of `family` in this network namespace.
pub fn local_prefixes(family: Family, within: Duration) -> Result<Vec<IpNet>, String> {
    let address_family = match family {
        Family::V4 => libc::AF_INET as u8,
        Family::V6 => libc::AF_INET6 as u8,
    };
    let socket = Socket::open_protocol(libc::NETLINK_ROUTE, within)?;
    let mut header = [0u8; RTMSG];
    header[0] = address_family;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    socket.send(&Message::with_header(RTM_GETROUTE, flags, 1, &header).finish())?;
    let mut prefixes = Vec::new();
    socket.stream_dump(|message| {
        socket.renew(within);
        if message.kind == RTM_NEWROUTE
            && let Some(prefix) = local_route(message.payload, family)
        {
            prefixes.push(prefix);
        }
        Ok(())
    })?;
    Ok(prefixes)
}

/// The interface the kernel's routing sends a packet from `source` to `destination` out
/// of, as `ip route get DST from SRC iif IFACE` answers for a forwarded packet (the
/// interface the source is reached by stands for the one it came in on), or as `ip route
/// get DST from SRC` for the node's own source; so rules that route by source (policy
/// routing of pod traffic) are followed. Marks are not known and not followed. Without a
/// source, or when that lookup is refused (rp_filter, no route back), the destination
/// alone decides. None when there is no route (or no interface).
pub fn egress_interface(
    destination: IpAddr,
    source: Option<IpAddr>,
    within: Duration,
) -> Result<Option<String>, String> {
    let socket = Socket::open_protocol(libc::NETLINK_ROUTE, within)?;
    let mut seq = 0;
    let mut ask = |dst: IpAddr, src: Option<IpAddr>, iif: Option<u32>| {
        seq += 1;
        route_get(&socket, seq, dst, src, iif)
    };
    if let Some(source) = source
        && let Some((toward_source, kind)) = ask(source, None, None)?
    {
        let iif = (kind != RTN_LOCAL).then_some(toward_source);
        if let Some((oif, _)) = ask(destination, Some(source), iif)? {
            return Ok(interface_name(oif));
        }
    }
    Ok(ask(destination, None, None)?.and_then(|(oif, _)| interface_name(oif)))
}

/// One RTM_GETROUTE: the route's output interface index and type; None when the kernel
/// has no route (or refuses the lookup).
fn route_get(
    socket: &Socket,
    seq: u32,
    destination: IpAddr,
    source: Option<IpAddr>,
    iif: Option<u32>,
) -> Result<Option<(u32, u8)>, String> {
    let bytes = |address: IpAddr| match address {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let (family, bits) = match destination {
        IpAddr::V4(_) => (libc::AF_INET as u8, 32u8),
        IpAddr::V6(_) => (libc::AF_INET6 as u8, 128u8),
    };
    let mut header = [0u8; RTMSG];
    header[0] = family;
    header[1] = bits;
    if source.is_some() {
        header[2] = bits;
    }
    let mut request = Message::with_header(
        RTM_GETROUTE,
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        seq,
        &header,
    );
    request.attribute(RTA_DST, &bytes(destination));
    if let Some(source) = source {
        request.attribute(RTA_SRC, &bytes(source));
    }
    if let Some(iif) = iif {
        request.attribute(RTA_IIF, &iif.to_ne_bytes());
    }
    socket.send(&request.finish())?;
    let mut buffer = vec![0u8; 8192];
    loop {
        let length = socket.receive(&mut buffer)?;
        for message in super::messages(buffer.get(..length).unwrap_or_default()) {
            if message.seq != seq {
                continue;
            }
            match message.kind {
                RTM_NEWROUTE => {
                    let kind = message.payload.get(7).copied().unwrap_or_default();
                    let attributes = Attributes(message.payload.get(RTMSG..).unwrap_or_default());
                    let oif = attributes
                        .get(RTA_OIF)
                        .and_then(|i| Some(u32::from_ne_bytes(i.get(..4)?.try_into().ok()?)));
                    return Ok(oif.map(|oif| (oif, kind)));
                }
                // An ack ends an answer that had no route; an error (ENETUNREACH,
                // EHOSTUNREACH, EINVAL from rp_filter...) means no route here.
                super::NLMSG_ERROR => {
                    return match message.error() {
                        Some(_) => Ok(None),
                        None => Err("netlink: a truncated error message".into()),
                    };
                }
                _ => {}
            }
        }
    }
}

/// The name of the interface with index `index`.
fn interface_name(index: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes, NUL included, into `name`.
    let found = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if found.is_null() {
        return None;
    }
    // SAFETY: on success `name` holds a NUL-terminated string.
    let text = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(text.to_string_lossy().into_owned())
}

/// The prefix of a `local` route of the `local` table; None for any other route.
fn local_route(payload: &[u8], family: Family) -> Option<IpNet> {
    let header = payload.get(..RTMSG)?;
    let (dst_len, table, kind) = (header[1], header[4], header[7]);
    if kind != RTN_LOCAL {
        return None;
    }
    let attributes = Attributes(payload.get(RTMSG..).unwrap_or_default());
    let table = attributes
        .get(RTA_TABLE)
        .and_then(|t| Some(u32::from_ne_bytes(t.get(..4)?.try_into().ok()?)))
        .unwrap_or(u32::from(table));
    if table != RT_TABLE_LOCAL {
        return None;
    }
    let address = match (family, attributes.get(RTA_DST)) {
        (Family::V4, Some(bytes)) => {
            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes.get(..4)?).ok()?))
        }
        (Family::V6, Some(bytes)) => {
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes.get(..16)?).ok()?))
        }
        // No destination: a local default route (AnyIP for every address).
        (Family::V4, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (Family::V6, None) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    IpNet::new(address, dst_len).ok().map(|net| net.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(table: u8, kind: u8, dst: &[u8], len: u8, table_attribute: Option<u32>) -> Vec<u8> {
        let mut header = [0u8; RTMSG];
        header[0] = if dst.len() == 4 { 2 } else { 10 };
        header[1] = len;
        header[4] = table;
        header[7] = kind;
        let mut message = Message::with_header(RTM_NEWROUTE, 0, 1, &header);
        if let Some(table) = table_attribute {
            message.attribute(RTA_TABLE, &table.to_ne_bytes());
        }
        message.attribute(RTA_DST, dst);
        message.finish()
    }

    fn payload(datagram: &[u8]) -> Vec<u8> {
        super::super::messages(datagram)
            .next()
            .unwrap()
            .payload
            .to_vec()
    }

    #[test]
    fn only_local_routes_of_the_local_table_are_kept() {
        let loopback = route(255, RTN_LOCAL, &[127, 0, 0, 0], 8, Some(255));
        assert_eq!(
            local_route(&payload(&loopback), Family::V4),
            Some("127.0.0.0/8".parse().unwrap())
        );
        // A broadcast route of the local table, a unicast route of main.
        let broadcast = route(255, 3, &[192, 0, 2, 255], 32, None);
        assert_eq!(local_route(&payload(&broadcast), Family::V4), None);
        let main = route(254, 1, &[10, 0, 0, 0], 8, Some(254));
        assert_eq!(local_route(&payload(&main), Family::V4), None);
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        let one = route(255, RTN_LOCAL, &v6, 128, None);
        assert_eq!(
            local_route(&payload(&one), Family::V6),
            Some("::1/128".parse().unwrap())
        );
        assert_eq!(local_route(&[1, 2, 3], Family::V4), None);
    }
}
