//! Property: for any config and any (source, destination), the policy's decision, the
//! rendered iptables rules, the rendered nftables transaction and the Windows exception
//! list agree with a straightforward reference implementation of longest-prefix match
//! written here. The rendered text is evaluated by small interpreters, so a rendering
//! bug shows up as disagreement.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;

use super::ChainName;
use super::iptables::render_chain_rules;
use super::nftables::render_transaction;
use super::windows::exception_list;
use crate::config::Config;
use crate::policy::{Family, LINK_LOCAL_V4, LINK_LOCAL_V6, Masquerade, Policy, PolicySettings};

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    Masquerade,
    Unmanaged,
}

fn from_policy(policy: &Policy, source: IpAddr, destination: IpAddr) -> Verdict {
    let decision = policy.explain(Some(source), destination).decision;
    match decision {
        crate::policy::Decision::Unmanaged => Verdict::Unmanaged,
        d if d.masquerades() => Verdict::Masquerade,
        _ => Verdict::Keep,
    }
}

/// The rule in its plainest form: of every listed prefix containing the destination the
/// longest decides (force beats the link-local default at equal length); none means
/// masquerade; a source outside a given scope is never masqueraded.
fn reference(config: &Config, enable_ipv6: bool, source: IpAddr, destination: IpAddr) -> Verdict {
    let family = family_of(destination);
    if family == Family::V6 && !enable_ipv6 {
        return Verdict::Unmanaged;
    }
    let link_local = match family {
        Family::V4 if !config.masq_link_local => LINK_LOCAL_V4.parse::<IpNet>().ok(),
        Family::V6 if !config.masq_link_local_ipv6 => LINK_LOCAL_V6.parse::<IpNet>().ok(),
        _ => None,
    };
    // (prefix length, 1 for force so it wins a tie, keeps?)
    let mut best: Option<(u8, u8, bool)> = None;
    let mut consider = |net: &IpNet, force: bool| {
        if net.contains(&destination) {
            let candidate = (net.prefix_len(), u8::from(force), !force);
            if best.is_none_or(|b| (candidate.0, candidate.1) > (b.0, b.1)) {
                best = Some(candidate);
            }
        }
    };
    link_local.iter().for_each(|n| consider(n, false));
    config
        .non_masquerade_cidrs
        .iter()
        .for_each(|n| consider(n, false));
    config
        .force_masquerade_cidrs
        .iter()
        .for_each(|n| consider(n, true));
    let keeps = best.is_some_and(|(_, _, keep)| keep);
    let in_scope = config
        .masquerade_source_cidrs
        .as_ref()
        .is_none_or(|scope| scope.iter().any(|n| n.contains(&source)));
    if keeps || !in_scope {
        Verdict::Keep
    } else {
        Verdict::Masquerade
    }
}

fn family_of(ip: IpAddr) -> Family {
    if ip.is_ipv4() { Family::V4 } else { Family::V6 }
}

/// Walks the iptables chain the way the kernel does: first matching rule decides.
fn iptables_verdict(policy: &Policy, source: IpAddr, ip: IpAddr) -> Verdict {
    let Some(family) = policy.family(family_of(ip)) else {
        return Verdict::Unmanaged;
    };
    for rule in render_chain_rules(&ChainName::default(), family, &policy.masquerade) {
        let words: Vec<&str> = rule.split(' ').collect();
        let net_after = |flag: &str| {
            words
                .windows(2)
                .find(|w| w[0] == flag)
                .and_then(|w| w[1].parse::<IpNet>().ok())
        };
        let matches = net_after("-d").is_none_or(|net| net.contains(&ip))
            && net_after("-s").is_none_or(|net| net.contains(&source));
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

/// Reads the nft transaction back: the sets' elements and the family chain's rules.
fn nft_verdict(policy: &Policy, source: IpAddr, ip: IpAddr) -> Verdict {
    let text = render_transaction(policy);
    let definition = &text[text.rfind("table inet").unwrap_or(0)..];
    let (nfproto, chain, keyword) = match family_of(ip) {
        Family::V4 => ("ipv4", "masq-v4", "ip"),
        Family::V6 => ("ipv6", "masq-v6", "ip6"),
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
    let elements = |set: &str| -> Vec<IpNet> {
        block(&format!("set {set}"))
            .iter()
            .skip_while(|l| !l.starts_with("elements"))
            .flat_map(|l| {
                l.split([',', ' ', '{', '}'])
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    let in_target = |target: &str, address: IpAddr| match target.strip_prefix('@') {
        Some(set) => elements(set).iter().any(|n| n.contains(&address)),
        None => target.parse::<IpNet>().is_ok_and(|n| n.contains(&address)),
    };
    for rule in block(&format!("chain {chain}")) {
        if let Some(rest) = rule.strip_prefix(&format!("{keyword} daddr ")) {
            if in_target(rest.trim_end_matches(" return"), ip) {
                return Verdict::Keep;
            }
        } else if let Some(rest) = rule.strip_prefix(&format!("{keyword} saddr != ")) {
            if !in_target(rest.trim_end_matches(" return"), source) {
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

/// The Windows exception list: IPv4 destinations in it keep the pod address. It cannot
/// express a source scope, so it answers for the destination alone.
fn windows_verdict(policy: &Policy, ip: IpAddr) -> Option<Verdict> {
    if !ip.is_ipv4() {
        return None;
    }
    let kept = exception_list(policy)
        .iter()
        .filter_map(|text| text.parse::<IpNet>().ok())
        .any(|net| net.contains(&ip));
    Some(if kept {
        Verdict::Keep
    } else {
        Verdict::Masquerade
    })
}

fn windows_reference(config: &Config, ip: IpAddr) -> Verdict {
    let everyone = Config {
        masquerade_source_cidrs: None,
        ..config.clone()
    };
    reference(&everyone, false, ip, ip)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn policy_backends_and_windows_agree_with_longest_prefix_match(
        prefixes in proptest::collection::vec(prefix_strategy(), 0..24),
        forced in proptest::collection::vec(prefix_strategy(), 0..12),
        sources in proptest::option::of(proptest::collection::vec(prefix_strategy(), 0..6)),
        masq_link_local in any::<bool>(),
        masq_link_local_ipv6 in any::<bool>(),
        enable_ipv6 in any::<bool>(),
        random_fully in any::<bool>(),
        pairs in proptest::collection::vec((address_strategy(), address_strategy()), 1..32),
    ) {
        let keep_family = |nets: Vec<IpNet>| -> Vec<IpNet> {
            nets.into_iter().filter(|n| enable_ipv6 || matches!(n, IpNet::V4(_))).collect()
        };
        let non_masquerade_cidrs = keep_family(prefixes);
        // The same prefix in both lists is a config error; the validator rejects it.
        let force_masquerade_cidrs: Vec<IpNet> = keep_family(forced)
            .into_iter()
            .filter(|f| !non_masquerade_cidrs.contains(f))
            .collect();
        let config = Config {
            non_masquerade_cidrs,
            force_masquerade_cidrs,
            masquerade_source_cidrs: sources.map(keep_family),
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
        for (source, destination) in pairs {
            // A packet's source is of its destination's family.
            let source = if source.is_ipv4() == destination.is_ipv4() { source } else { destination };
            let expected = reference(&config, enable_ipv6, source, destination);
            prop_assert_eq!(&from_policy(&policy, source, destination), &expected, "policy, {} -> {}", source, destination);
            prop_assert_eq!(&iptables_verdict(&policy, source, destination), &expected, "iptables, {} -> {}", source, destination);
            prop_assert_eq!(&nft_verdict(&policy, source, destination), &expected, "nftables, {} -> {}", source, destination);
            if let Some(windows) = windows_verdict(&policy, destination) {
                prop_assert_eq!(windows, windows_reference(&config, destination), "windows, {}", destination);
            }
        }
    }
}
