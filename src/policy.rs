//! The resolved decision per address family: which destination prefixes keep the
//! pod's source address and how everything else is masqueraded. Backends render this;
//! `decide` answers the same question for one address, for `explain` and for tests.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::config::Config;

pub const LINK_LOCAL_V4: &str = "169.254.0.0/16";
pub const LINK_LOCAL_V6: &str = "fe80::/10";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The lower-case name nft (`meta nfproto`) and metrics labels use.
    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// An inclusive port range for `--to-ports`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn port_count(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// The `--to-ports` list, e.g. `1024-29999,32768-65535`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToPorts(pub Vec<PortRange>);

impl FromStr for ToPorts {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Ok(ToPorts::default());
        }
        let port = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{p:?} is not a port number from 1 to 65535")),
            }
        };
        let mut ranges = Vec::new();
        for part in text.split(',') {
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (port(a)?, port(b)?),
                None => (port(part)?, port(part)?),
            };
            if first > last {
                return Err(format!("port range {part:?} ends before it starts"));
            }
            ranges.push(PortRange { first, last });
        }
        Ok(ToPorts(ranges))
    }
}

impl fmt::Display for ToPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join(","))
    }
}

/// One `--to-ports` range with the share of the remaining traffic it takes; the last
/// range of a protocol has no probability because it takes whatever is left.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WeightedRange {
    pub range: PortRange,
    pub probability: Option<f64>,
}

impl ToPorts {
    /// Splits new connections across the ranges in proportion to their sizes.
    pub fn weighted(&self) -> Vec<WeightedRange> {
        let mut remaining: u32 = self.0.iter().map(PortRange::port_count).sum();
        let count = self.0.len();
        self.0
            .iter()
            .enumerate()
            .map(|(i, range)| {
                let probability =
                    (i + 1 < count).then(|| f64::from(range.port_count()) / f64::from(remaining));
                remaining -= range.port_count();
                WeightedRange {
                    range: *range,
                    probability,
                }
            })
            .collect()
    }
}

/// Protocols whose source ports `--to-ports` rewrites.
pub const PORT_PROTOCOLS: [&str; 3] = ["tcp", "udp", "sctp"];

/// How traffic that is not kept is masqueraded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Masquerade {
    pub random_fully: bool,
    pub to_ports: ToPorts,
}

/// Destination prefixes of one family that keep the pod's address, in config order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NonMasqPrefixes(pub Vec<IpNet>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyPolicy {
    pub family: Family,
    /// The link-local prefix, kept unless masqLinkLocal(IPv6) is set; checked first.
    pub link_local: Option<IpNet>,
    pub non_masq: NonMasqPrefixes,
}

/// Everything a backend needs to program one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub families: Vec<FamilyPolicy>,
    pub masquerade: Masquerade,
}

/// Flag-derived settings that shape the policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySettings {
    pub enable_ipv6: bool,
    pub masquerade: Masquerade,
}

/// Why an address keeps the pod's source address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepReason {
    LinkLocal,
    NonMasqueradeCidr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Leaves with the pod's address because of this prefix.
    Keep { prefix: IpNet, reason: KeepReason },
    /// Leaves with the node's address.
    Masquerade,
    /// The agent manages no rules for this family (IPv6 without --enable-ipv6).
    Unmanaged,
}

impl Policy {
    pub fn new(config: &Config, settings: &PolicySettings) -> Policy {
        let family_policy =
            |family: Family, link_local: &str, masq_link_local: bool| FamilyPolicy {
                family,
                link_local: (!masq_link_local)
                    .then(|| link_local.parse().ok())
                    .flatten(),
                non_masq: NonMasqPrefixes(
                    config
                        .non_masquerade_cidrs
                        .iter()
                        .filter(|net| Family::of(net) == family)
                        .copied()
                        .collect(),
                ),
            };
        let mut families = vec![family_policy(
            Family::V4,
            LINK_LOCAL_V4,
            config.masq_link_local,
        )];
        if settings.enable_ipv6 {
            families.push(family_policy(
                Family::V6,
                LINK_LOCAL_V6,
                config.masq_link_local_ipv6,
            ));
        }
        Policy {
            families,
            masquerade: settings.masquerade.clone(),
        }
    }

    pub fn family(&self, family: Family) -> Option<&FamilyPolicy> {
        self.families.iter().find(|f| f.family == family)
    }

    /// What happens to a packet from a pod to `destination` (a non-local address).
    pub fn decide(&self, destination: IpAddr) -> Decision {
        let family = match destination {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        };
        let Some(policy) = self.family(family) else {
            return Decision::Unmanaged;
        };
        if let Some(prefix) = policy.link_local.filter(|p| p.contains(&destination)) {
            return Decision::Keep {
                prefix,
                reason: KeepReason::LinkLocal,
            };
        }
        match policy.non_masq.0.iter().find(|p| p.contains(&destination)) {
            Some(prefix) => Decision::Keep {
                prefix: *prefix,
                reason: KeepReason::NonMasqueradeCidr,
            },
            None => Decision::Masquerade,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ParseOptions, parse};
    use std::path::Path;

    fn policy(yaml: &str, enable_ipv6: bool) -> Policy {
        let options = ParseOptions {
            enable_ipv6,
            ..ParseOptions::default()
        };
        let config = parse(yaml, Path::new("test"), options).unwrap().config;
        Policy::new(
            &config,
            &PolicySettings {
                enable_ipv6,
                ..PolicySettings::default()
            },
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn decides_like_the_chain_reads() {
        let p = policy("nonMasqueradeCIDRs: [10.0.0.0/8, 'fd00::/8']\n", true);
        assert_eq!(p.decide(ip("8.8.8.8")), Decision::Masquerade);
        assert_eq!(
            p.decide(ip("10.1.2.3")),
            Decision::Keep {
                prefix: "10.0.0.0/8".parse().unwrap(),
                reason: KeepReason::NonMasqueradeCidr
            }
        );
        assert_eq!(
            p.decide(ip("169.254.169.254")),
            Decision::Keep {
                prefix: LINK_LOCAL_V4.parse().unwrap(),
                reason: KeepReason::LinkLocal
            }
        );
        assert_eq!(p.decide(ip("192.168.1.1")), Decision::Masquerade);
        assert!(matches!(p.decide(ip("fd00::1")), Decision::Keep { .. }));
        assert!(matches!(
            p.decide(ip("fe80::1")),
            Decision::Keep {
                reason: KeepReason::LinkLocal,
                ..
            }
        ));
        assert_eq!(p.decide(ip("2001:db8::1")), Decision::Masquerade);
    }

    #[test]
    fn masq_link_local_drops_the_link_local_exception() {
        let p = policy("masqLinkLocal: true\nmasqLinkLocalIPv6: true\n", true);
        assert_eq!(p.decide(ip("169.254.1.1")), Decision::Masquerade);
        assert_eq!(p.decide(ip("fe80::1")), Decision::Masquerade);
    }

    #[test]
    fn ipv6_is_unmanaged_without_enable_ipv6() {
        let p = policy("", false);
        assert_eq!(p.families.len(), 1);
        assert_eq!(p.decide(ip("2001:db8::1")), Decision::Unmanaged);
    }

    #[test]
    fn to_ports_parse_and_weights() {
        let ports: ToPorts = "1024-29999,32768-65535".parse().unwrap();
        let weighted = ports.weighted();
        assert_eq!(
            weighted[0].probability.map(|p| p.to_string()).as_deref(),
            Some("0.469292562840114")
        );
        assert_eq!(weighted[1].probability, None);
        let three: ToPorts = "1000-1999,2000-2999,3000-3999".parse().unwrap();
        let w: Vec<Option<f64>> = three.weighted().iter().map(|w| w.probability).collect();
        assert_eq!(w, vec![Some(1.0 / 3.0), Some(0.5), None]);
        assert_eq!("80".parse::<ToPorts>().unwrap().to_string(), "80");
        for bad in ["0-10", "10-5", "a-b", "1-70000", "1024-", ","] {
            assert!(bad.parse::<ToPorts>().is_err(), "{bad}");
        }
    }
}
