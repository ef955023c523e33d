//! Property: for any config and any destination, the policy's decision, the rendered
//! iptables rules and the rendered nftables transaction agree. The rendered text is
//! evaluated by small interpreters here, so a rendering bug shows up as disagreement.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;

use super::ChainName;
use super::iptables::render_chain_rules;
use super::nftables::render_transaction;
use crate::config::Config;
use crate::policy::{Decision, Family, Masquerade, Policy, PolicySettings};

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    Masquerade,
    Unmanaged,
}

fn from_policy(decision: Decision) -> Verdict {
    match decision {
        Decision::Keep { .. } => Verdict::Keep,
        Decision::Masquerade => Verdict::Masquerade,
        Decision::Unmanaged => Verdict::Unmanaged,
    }
}

fn family_of(ip: IpAddr) -> Family {
    if ip.is_ipv4() { Family::V4 } else { Family::V6 }
}

/// Walks the iptables chain the way the kernel does: first matching rule decides.
fn iptables_verdict(policy: &Policy, ip: IpAddr) -> Verdict {
    let Some(family) = policy.family(family_of(ip)) else {
        return Verdict::Unmanaged;
    };
    for rule in render_chain_rules(&ChainName::default(), family, &policy.masquerade) {
        let words: Vec<&str> = rule.split(' ').collect();
        let destination = words
            .windows(2)
            .find(|w| w[0] == "-d")
            .and_then(|w| w[1].parse::<IpNet>().ok());
        let matches = destination.is_none_or(|net| net.contains(&ip));
        if !matches {
            continue;
        }
        if rule.ends_with("-j RETURN") {
            return Verdict::Keep;
        }
        if rule.contains("-j MASQUERADE") {
            return Verdict::Masquerade;
        }
    }
    Verdict::Keep
}

/// Reads the nft transaction back: the set's elements and the family chain's rules.
fn nft_verdict(policy: &Policy, ip: IpAddr) -> Verdict {
    let text = render_transaction(policy);
    let definition = &text[text.rfind("table inet").unwrap_or(0)..];
    let (nfproto, set, chain, keyword) = match family_of(ip) {
        Family::V4 => ("ipv4", "non-masq-v4", "masq-v4", "ip"),
        Family::V6 => ("ipv6", "non-masq-v6", "masq-v6", "ip6"),
    };
    if !definition.contains(&format!("meta nfproto {nfproto} jump {chain}")) {
        return Verdict::Unmanaged;
    }
    let block = |header: &str| -> Vec<String> {
        definition
            .split(&format!("\t{header} {{\n"))
            .nth(1)
            .map(|rest| rest.split("\n\t}").next().unwrap_or_default())
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().to_string())
            .collect()
    };
    let elements: Vec<IpNet> = block(&format!("set {set}"))
        .iter()
        .skip_while(|l| !l.starts_with("elements"))
        .flat_map(|l| {
            l.split([',', ' ', '{', '}'])
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter_map(|w| w.parse().ok())
        .collect();
    for rule in block(&format!("chain {chain}")) {
        if let Some(rest) = rule.strip_prefix(&format!("{keyword} daddr ")) {
            let target = rest.trim_end_matches(" return");
            let hit = match target.strip_prefix('@') {
                Some(_) => elements.iter().any(|n| n.contains(&ip)),
                None => target.parse::<IpNet>().is_ok_and(|n| n.contains(&ip)),
            };
            if hit {
                return Verdict::Keep;
            }
        } else if rule.contains("masquerade") {
            return Verdict::Masquerade;
        }
    }
    Verdict::Keep
}

fn prefix_strategy() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        // Clustered IPv4 so overlaps and adjacency are common.
        (0u32..0x1_0000, 8u8..=32).prop_map(|(low, len)| {
            IpNet::new(
                IpAddr::V4(Ipv4Addr::from(0x0A00_0000 | low << 8 | low >> 8)),
                len,
            )
            .map(|n| n.trunc())
            .unwrap_or_default()
        }),
        (any::<u32>(), 0u8..=32).prop_map(|(a, len)| IpNet::new(
            IpAddr::V4(Ipv4Addr::from(a)),
            len
        )
        .map(|n| n.trunc())
        .unwrap_or_default()),
        (0u16..0x100, 8u8..=64).prop_map(|(x, len)| {
            IpNet::new(
                IpAddr::V6(Ipv6Addr::new(0xfd00 | (x >> 4), x, 0, 0, 0, 0, 0, 0)),
                len,
            )
            .map(|n| n.trunc())
            .unwrap_or_default()
        }),
    ]
}

fn address_strategy() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u32..0x100_0000).prop_map(|low| IpAddr::V4(Ipv4Addr::from(0x0A00_0000 | low))),
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        (0u16..0x4_00).prop_map(|x| IpAddr::V4(Ipv4Addr::new(169, 254, (x >> 8) as u8, x as u8))),
        (0u16..0x100, any::<u16>()).prop_map(|(x, y)| IpAddr::V6(Ipv6Addr::new(
            0xfd00 | (x >> 4),
            x,
            y,
            0,
            0,
            0,
            0,
            1
        ))),
        any::<u16>().prop_map(|y| IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, y, 1))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn policy_iptables_and_nftables_agree(
        prefixes in proptest::collection::vec(prefix_strategy(), 0..24),
        masq_link_local in any::<bool>(),
        masq_link_local_ipv6 in any::<bool>(),
        enable_ipv6 in any::<bool>(),
        random_fully in any::<bool>(),
        addresses in proptest::collection::vec(address_strategy(), 1..32),
    ) {
        let config = Config {
            non_masquerade_cidrs: prefixes,
            cidr_limit: 64,
            masq_link_local,
            masq_link_local_ipv6,
            resync_interval: std::time::Duration::from_secs(60),
        };
        let settings = PolicySettings {
            enable_ipv6,
            masquerade: Masquerade { random_fully, to_ports: Default::default() },
        };
        let policy = Policy::new(&config, &settings);
        for ip in addresses {
            let expected = from_policy(policy.decide(ip));
            prop_assert_eq!(&iptables_verdict(&policy, ip), &expected, "iptables, {}", ip);
            prop_assert_eq!(&nft_verdict(&policy, ip), &expected, "nftables, {}", ip);
        }
    }
}
