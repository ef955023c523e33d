//! The values of the multihomed-node keys (upstream PR #103's names, as the fork
//! mabels/ip-masq-agent ships them): `outputInterface` (interface names in iptables' `-o`
//! syntax, `+` a trailing wildcard) and `outputAddress`/`outputAddressIPv6` (one address
//! or a range `A-B`, as `SNAT --to-source` takes it). Parsed and checked here; the file's
//! position is added by the caller.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Linux's IFNAMSIZ is 16 with the terminating NUL.
const MAX_INTERFACE_NAME: usize = 15;

/// An egress interface name, or a name prefix ending in `+` (iptables' wildcard; nft
/// writes it `*`). `+` alone is every interface.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InterfacePattern(String);

impl InterfacePattern {
    /// As iptables' `-o` takes it: `eth0`, `bond+`.
    pub fn as_iptables(&self) -> &str {
        &self.0
    }

    /// As nft's `oifname` takes it: `"eth0"`, `"bond*"`.
    pub fn as_nft(&self) -> String {
        match self.0.strip_suffix('+') {
            Some(prefix) => format!("{prefix}*"),
            None => self.0.clone(),
        }
    }

    /// The name before the wildcard, and whether there is one.
    pub fn prefix(&self) -> (&str, bool) {
        match self.0.strip_suffix('+') {
            Some(prefix) => (prefix, true),
            None => (&self.0, false),
        }
    }

    /// Whether a packet leaving through `interface` matches, as the kernel compares.
    pub fn matches(&self, interface: &str) -> bool {
        match self.prefix() {
            (prefix, true) => interface.starts_with(prefix),
            (name, false) => interface == name,
        }
    }
}

impl fmt::Display for InterfacePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks an interface name as Linux (`dev_valid_name`) and iptables' `-o` take it, and
/// as every backend reads it the same way: `*` (nft's wildcard) and a leading `-` or `!`
/// (iptables options and negation) are refused rather than read differently.
pub fn parse_interface(text: &str) -> Result<InterfacePattern, String> {
    let (name, wildcard) = match text.strip_suffix('+') {
        Some(prefix) => (prefix, true),
        None => (text, false),
    };
    if text.is_empty() {
        return Err("an interface name cannot be empty".to_string());
    }
    // iptables counts the `+` too: the whole text must fit IFNAMSIZ with its NUL.
    if text.len() > MAX_INTERFACE_NAME {
        return Err(format!(
            "interface name {text:?} is {} bytes long; Linux (and iptables' -o, wildcard included) allows at most {MAX_INTERFACE_NAME}",
            text.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | ':' | '+' | '"' | '*'))
    {
        let why = match bad {
            '+' => "`+` is a wildcard only at the end (`bond+`)".to_string(),
            '*' => {
                "`*` is nft's wildcard, not iptables'; write `+` at the end (`bond+`)".to_string()
            }
            _ => format!("Linux refuses {bad:?} in interface names"),
        };
        return Err(format!("interface name {text:?} is not valid: {why}"));
    }
    if name.starts_with('-') || name.starts_with('!') {
        return Err(format!(
            "interface name {text:?} is not valid here: iptables reads a leading {:?} as an option or a negation",
            &name[..1]
        ));
    }
    if !wildcard && (name == "." || name == "..") {
        return Err(format!("interface name {text:?} is not valid on Linux"));
    }
    Ok(InterfacePattern(text.to_string()))
}

/// One address, or an inclusive range of addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddressRange {
    pub first: IpAddr,
    pub last: IpAddr,
}

impl AddressRange {
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.first, self.last, address) {
            (IpAddr::V4(a), IpAddr::V4(b), IpAddr::V4(x)) => a <= x && x <= b,
            (IpAddr::V6(a), IpAddr::V6(b), IpAddr::V6(x)) => a <= x && x <= b,
            _ => false,
        }
    }

    pub fn is_single(&self) -> bool {
        self.first == self.last
    }

    pub fn is_ipv6(&self) -> bool {
        self.first.is_ipv6()
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// `A` or `A-B`, both of `family` (`ipv6` true: IPv6); the start not above the end.
pub fn parse_address_range(text: &str, ipv6: bool) -> Result<AddressRange, String> {
    let family = if ipv6 { "IPv6" } else { "IPv4" };
    let one = |part: &str| -> Result<IpAddr, String> {
        let parsed: IpAddr = if ipv6 {
            part.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            part.parse::<Ipv4Addr>().map(IpAddr::V4)
        }
        .map_err(|_| {
            let other = if ipv6 { "IPv4" } else { "IPv6" };
            let hint = if part.parse::<IpAddr>().is_ok() {
                format!(" (it is an {other} address)")
            } else if part.contains('/') {
                " (a prefix; write one address or a range A-B)".to_string()
            } else if part.contains(':') && !ipv6 {
                " (ports come from --to-ports)".to_string()
            } else {
                String::new()
            };
            format!("{part:?} is not an {family} address{hint}")
        })?;
        if let IpAddr::V6(v6) = parsed
            && v6.to_ipv4_mapped().is_some()
        {
            return Err(format!(
                "{part:?} is an IPv4-mapped IPv6 address; write the IPv4 address under outputAddress"
            ));
        }
        Ok(parsed)
    };
    let range = match text.split_once('-') {
        Some((first, last)) => AddressRange {
            first: one(first)?,
            last: one(last)?,
        },
        None => {
            let address = one(text)?;
            AddressRange {
                first: address,
                last: address,
            }
        }
    };
    let ordered = match (range.first, range.last) {
        (IpAddr::V4(a), IpAddr::V4(b)) => a <= b,
        (IpAddr::V6(a), IpAddr::V6(b)) => a <= b,
        _ => false,
    };
    if !ordered {
        return Err(format!(
            "range {text:?} starts above its end; write the lower address first"
        ));
    }
    for address in [range.first, range.last] {
        if let Some(why) = not_a_source(address) {
            return Err(format!(
                "{text:?} cannot be the source of routed traffic: {why}"
            ));
        }
    }
    Ok(range)
}

/// Why an address cannot be a masqueraded packet's source on the wire.
fn not_a_source(address: IpAddr) -> Option<&'static str> {
    match address {
        _ if address.is_unspecified() => Some("it is the unspecified address"),
        _ if address.is_multicast() => Some("it is a multicast address"),
        _ if address.is_loopback() => {
            Some("it is a loopback address (replies never leave the node)")
        }
        IpAddr::V4(v4) if v4.is_broadcast() => Some("it is the broadcast address"),
        IpAddr::V4(v4) if v4.is_link_local() => {
            Some("it is a link-local address (169.254.0.0/16), not routed beyond its link")
        }
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {
            Some("it is a link-local address (fe80::/10), not routed beyond its link")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the hostile review: names the backends read differently, names iptables
    /// refuses, and addresses that blackhole the uplink were accepted.
    #[test]
    fn regression_names_and_addresses_every_backend_reads_alike_or_refuses() {
        assert!(parse_interface("a2345678901234+").is_ok());
        for (bad, why) in [
            ("a23456789012345+", "16 bytes"),
            ("eth*", "nft's wildcard"),
            ("*", "nft's wildcard"),
            ("-j", "leading \"-\""),
            ("!eth0", "leading \"!\""),
        ] {
            let err = parse_interface(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        for (text, ipv6, why) in [
            ("127.0.0.1", false, "loopback"),
            ("::1", true, "loopback"),
            ("fe80::1", true, "link-local"),
            ("169.254.0.5", false, "link-local"),
            ("255.255.255.255", false, "broadcast"),
        ] {
            let err = parse_address_range(text, ipv6).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn interface_names_follow_linux_and_iptables() {
        for good in [
            "eth0",
            "bond+",
            "+",
            "vlan.100",
            "wg-partner",
            "a23456789012345",
        ] {
            assert!(parse_interface(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("a234567890123456", "16 bytes"),
            ("eth/0", "'/'"),
            ("eth 0", "' '"),
            ("eth:0", "':'"),
            ("bo+nd", "wildcard only at the end"),
            ("eth0++", "wildcard only at the end"),
            (".", "not valid"),
            ("..", "not valid"),
            ("eth\n0", "'\\n'"),
        ] {
            let err = parse_interface(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let bond = parse_interface("bond+").unwrap();
        assert!(bond.matches("bond0") && bond.matches("bond") && !bond.matches("bon"));
        assert_eq!(
            (bond.as_iptables(), bond.as_nft()),
            ("bond+", "bond*".to_string())
        );
        let eth = parse_interface("eth0").unwrap();
        assert!(eth.matches("eth0") && !eth.matches("eth01"));
        assert!(parse_interface("+").unwrap().matches("anything"));
    }

    #[test]
    fn addresses_and_ranges_are_of_their_family_and_ordered() {
        let range = parse_address_range("192.0.2.10-192.0.2.20", false).unwrap();
        assert_eq!(range.to_string(), "192.0.2.10-192.0.2.20");
        assert!(range.contains("192.0.2.15".parse().unwrap()));
        assert!(!range.contains("192.0.2.21".parse().unwrap()));
        assert_eq!(
            parse_address_range("2001:db8::1", true)
                .unwrap()
                .to_string(),
            "2001:db8::1"
        );
        for (text, ipv6, why) in [
            ("2001:db8::1", false, "it is an IPv6 address"),
            ("192.0.2.1", true, "it is an IPv4 address"),
            ("192.0.2.0/24", false, "a prefix"),
            ("192.0.2.1:1024", false, "ports come from --to-ports"),
            ("192.0.2.20-192.0.2.10", false, "starts above its end"),
            ("0.0.0.0", false, "cannot be the source"),
            ("::ffff:192.0.2.1", true, "IPv4-mapped"),
            ("node", false, "not an IPv4 address"),
            ("192.0.2.1-2001:db8::1", false, "it is an IPv6 address"),
        ] {
            let err = parse_address_range(text, ipv6).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
