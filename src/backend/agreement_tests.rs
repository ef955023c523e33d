//! Property: for any config and any (source, destination, egress interface), the
//! policy's decision, the rendered iptables rules, the rendered nftables transaction and
//! the Windows exception list agree with a straightforward reference implementation of
//! the rule written here: the source is in scope, the destination's longest-prefix
//! decision is "masquerade", and the egress interface is listed (outputInterface); then
//! MASQUERADE, or SNAT to outputAddress(IPv6) when set. The rendered text is evaluated by
//! small interpreters, so a rendering bug shows up as disagreement.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;

use super::ChainName;
use super::iptables::render_chain_rules;
use super::nftables::render_transaction;
use super::windows::exception_list;
use crate::config::Config;
use crate::config::egress::{AddressRange, InterfacePattern};
use crate::policy::{Family, LINK_LOCAL_V4, LINK_LOCAL_V6, Masquerade, Policy, PolicySettings};

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    Masquerade,
    /// SNAT to this address or range (as `AddressRange` prints it).
    Snat(String),
    Unmanaged,
}

fn from_policy(policy: &Policy, source: IpAddr, destination: IpAddr, out: &str) -> Verdict {
    let decision = policy
        .explain_via(Some(source), destination, Some(out))
        .decision;
    match decision {
        crate::policy::Decision::Unmanaged => Verdict::Unmanaged,
        d if d.masquerades() => {
            match policy
                .family(family_of(destination))
                .and_then(|f| f.snat_to.as_ref())
            {
                Some(to) => Verdict::Snat(to.to_string()),
                None => Verdict::Masquerade,
            }
        }
        _ => Verdict::Keep,
    }
}

/// An iptables `-o` pattern (`bond+`) or an nft `oifname` one (`bond*`) against a name.
fn interface_matches(pattern: &str, name: &str) -> bool {
    match pattern
        .strip_suffix('+')
        .or_else(|| pattern.strip_suffix('*'))
    {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// `192.0.2.5:1024-2000`, `[2001:db8::1-2001:db8::2]:1024-2000`, `[2001:db8::1]-[2001:db8::2]:1-2`
/// without brackets and ports: the addresses alone.
fn without_ports(target: &str) -> String {
    if target.contains('[') {
        let before_ports = target.rsplit_once("]:").map_or(target, |(a, _)| a);
        return before_ports.replace(['[', ']'], "");
    }
    if target.contains('.') {
        return target.split(':').next().unwrap_or_default().to_string();
    }
    target.to_string()
}

/// The rule in its plainest form: of every listed prefix containing the destination the
/// longest decides (force beats the link-local default at equal length); none means
/// masquerade; a source outside a given scope is never masqueraded.
fn reference(
    config: &Config,
    enable_ipv6: bool,
    source: IpAddr,
    destination: IpAddr,
    out: &str,
) -> Verdict {
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
    let listed = config.output_interfaces.as_ref().is_none_or(|list| {
        list.iter()
            .any(|pattern| interface_matches(pattern.as_iptables(), out))
    });
    if keeps || !in_scope || !listed {
        return Verdict::Keep;
    }
    let snat = match family {
        Family::V4 => config.output_address,
        Family::V6 => config.output_address_ipv6,
    };
    match snat {
        Some(to) => Verdict::Snat(to.to_string()),
        None => Verdict::Masquerade,
    }
}

fn family_of(ip: IpAddr) -> Family {
    if ip.is_ipv4() { Family::V4 } else { Family::V6 }
}

/// Walks the iptables chain the way the kernel does: first matching rule decides.
fn iptables_verdict(policy: &Policy, source: IpAddr, ip: IpAddr, out: &str) -> Verdict {
    let Some(family) = policy.family(family_of(ip)) else {
        return Verdict::Unmanaged;
    };
    for rule in render_chain_rules(
        &ChainName::default(),
        family,
        &policy.masquerade,
        policy.out_interfaces.as_deref(),
    ) {
        let words: Vec<&str> = rule.split(' ').collect();
        let net_after = |flag: &str| {
            words
                .windows(2)
                .find(|w| w[0] == flag)
                .and_then(|w| w[1].parse::<IpNet>().ok())
        };
        let word_after = |flag: &str| words.windows(2).find(|w| w[0] == flag).map(|w| w[1]);
        let matches = net_after("-d").is_none_or(|net| net.contains(&ip))
            && net_after("-s").is_none_or(|net| net.contains(&source))
            && word_after("-o").is_none_or(|pattern| interface_matches(pattern, out));
        if !matches {
            continue;
        }
        if rule.ends_with("-j RETURN") {
            return Verdict::Keep;
        }
        if rule.contains("-j MASQUERADE") {
            return Verdict::Masquerade;
        }
        if let Some(target) = word_after("--to-source") {
            return Verdict::Snat(without_ports(target));
        }
    }
    Verdict::Keep
}

/// Reads the nft transaction back: the sets' elements and the family chain's rules.
fn nft_verdict(policy: &Policy, source: IpAddr, ip: IpAddr, out: &str) -> Verdict {
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
        } else if rule.starts_with("oifname != ") {
            let patterns: Vec<&str> = rule
                .split("oifname != ")
                .filter_map(|part| part.split('"').nth(1))
                .collect();
            if !patterns.iter().any(|p| interface_matches(p, out)) {
                return Verdict::Keep;
            }
        } else if let Some((_, target)) = rule.split_once(" to ").filter(|_| rule.contains("snat "))
        {
            let target = target.split(' ').next().unwrap_or_default();
            return Verdict::Snat(without_ports(target));
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

/// Windows cannot express a source scope, an interface or a SNAT address: it answers
/// for the destination alone.
fn windows_reference(config: &Config, ip: IpAddr) -> Verdict {
    let everyone = Config {
        masquerade_source_cidrs: None,
        output_interfaces: None,
        output_address: None,
        output_address_ipv6: None,
        ..config.clone()
    };
    reference(&everyone, false, ip, ip, "eth0")
}

/// outputInterface lists drawn from names a node has, with iptables' wildcard.
fn interfaces_strategy() -> impl Strategy<Value = Option<Vec<InterfacePattern>>> {
    const NAMES: [&str; 6] = ["eth0", "eth1", "bond+", "vlan+", "wg0", "+"];
    proptest::option::weighted(
        0.6,
        proptest::collection::vec(proptest::sample::select(NAMES.to_vec()), 0..4).prop_map(
            |names| {
                names
                    .into_iter()
                    .filter_map(|n| crate::config::egress::parse_interface(n).ok())
                    .collect()
            },
        ),
    )
}

/// Interfaces a packet may leave by: listed, matching a wildcard, or neither.
fn out_strategy() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec![
        "eth0", "eth1", "bond0", "bond12", "vlan7", "wg0", "ens5",
    ])
}

fn snat_strategy(ipv6: bool) -> impl Strategy<Value = Option<AddressRange>> {
    proptest::option::weighted(
        0.5,
        (any::<u16>(), 0u16..8).prop_map(move |(base, span)| {
            let text = if ipv6 {
                let first = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, base.max(1));
                let last = Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    0,
                    0,
                    0,
                    0,
                    0,
                    base.max(1).saturating_add(span),
                );
                format!("{first}-{last}")
            } else {
                let first = Ipv4Addr::from(0xC633_6400u32 | u32::from(base.max(1) & 0xf0));
                let last = Ipv4Addr::from(u32::from(first) + u32::from(span));
                format!("{first}-{last}")
            };
            crate::config::egress::parse_address_range(&text, ipv6).expect("a valid range")
        }),
    )
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
        pairs in proptest::collection::vec((address_strategy(), address_strategy(), out_strategy()), 1..32),
        output_interfaces in interfaces_strategy(),
        output_address in snat_strategy(false),
        output_address_ipv6 in snat_strategy(true),
        to_ports in proptest::sample::select(vec!["", "1024-29999", "1024-29999,32768-65535"]),
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
            output_interfaces,
            output_address,
            output_address_ipv6: output_address_ipv6.filter(|_| enable_ipv6),
        };
        let settings = PolicySettings {
            enable_ipv6,
            masquerade: Masquerade { random_fully, to_ports: to_ports.parse().expect("ports") },
        };
        let policy = Policy::new(&config, &settings);
        for (source, destination, out) in pairs {
            // A packet's source is of its destination's family.
            let source = if source.is_ipv4() == destination.is_ipv4() { source } else { destination };
            let expected = reference(&config, enable_ipv6, source, destination, out);
            prop_assert_eq!(&from_policy(&policy, source, destination, out), &expected, "policy, {} -> {} via {}", source, destination, out);
            prop_assert_eq!(&iptables_verdict(&policy, source, destination, out), &expected, "iptables, {} -> {} via {}", source, destination, out);
            prop_assert_eq!(&nft_verdict(&policy, source, destination, out), &expected, "nftables, {} -> {} via {}", source, destination, out);
            if let Some(windows) = windows_verdict(&policy, destination) {
                prop_assert_eq!(windows, windows_reference(&config, destination), "windows, {}", destination);
            }
        }
    }
}
