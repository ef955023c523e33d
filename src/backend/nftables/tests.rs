use super::*;
use crate::config::{ParseOptions, parse};
use crate::policy::{PolicySettings, ToPorts};
use std::net::Ipv4Addr;
use std::path::Path;

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn policy(yaml: &str, enable_ipv6: bool, random_fully: bool, to_ports: &str) -> Policy {
    let options = ParseOptions {
        enable_ipv6,
        ..ParseOptions::default()
    };
    let config = parse(yaml, Path::new("test"), options).unwrap().config;
    Policy::new(
        &config,
        &PolicySettings {
            enable_ipv6,
            masquerade: Masquerade {
                random_fully,
                to_ports: to_ports.parse::<ToPorts>().unwrap(),
            },
        },
    )
}

#[test]
fn default_transaction() {
    let expected = "\
table inet ip-masq-agent {}
add set inet ip-masq-agent non-masq-v4 { type ipv4_addr; flags interval; }
flush table inet ip-masq-agent
flush set inet ip-masq-agent non-masq-v4
add chain inet ip-masq-agent masq-v6
delete chain inet ip-masq-agent masq-v6
add set inet ip-masq-agent non-masq-v6 { type ipv6_addr; flags interval; }
delete set inet ip-masq-agent non-masq-v6
table inet ip-masq-agent {
\tset non-masq-v4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = {
\t\t\t10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16,
\t\t}
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat + 10; policy accept;
\t\tfib daddr type local return
\t\tmeta nfproto ipv4 jump masq-v4
\t}
\tchain masq-v4 {
\t\tip daddr 169.254.0.0/16 return
\t\tip daddr @non-masq-v4 return
\t\tmasquerade fully-random
\t}
}
";
    assert_eq!(render_transaction(&policy("", false, true, "")), expected);
}

#[test]
fn masq_link_local_and_empty_list() {
    let t = render_transaction(&policy(
        "masqLinkLocal: true\nnonMasqueradeCIDRs: []\n",
        false,
        true,
        "",
    ));
    assert!(!t.contains("169.254.0.0/16"), "{t}");
    assert!(!t.contains("elements"), "{t}");
    assert!(
        t.contains("\t\tip daddr @non-masq-v4 return\n\t\tmasquerade fully-random\n"),
        "{t}"
    );
}

#[test]
fn ipv6_gets_its_own_set_and_chain() {
    let t = render_transaction(&policy(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 'fd00::/8']\n",
        true,
        true,
        "",
    ));
    assert!(t.contains("\tset non-masq-v6 {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = {\n\t\t\tfd00::/8,\n"), "{t}");
    assert!(t.contains("\t\tmeta nfproto ipv6 jump masq-v6\n"), "{t}");
    assert!(t.contains("\tchain masq-v6 {\n\t\tip6 daddr fe80::/10 return\n\t\tip6 daddr @non-masq-v6 return\n\t\tmasquerade fully-random\n"), "{t}");
    let no_ll = render_transaction(&policy("masqLinkLocalIPv6: true\n", true, true, ""));
    assert!(!no_ll.contains("fe80::/10"), "{no_ll}");
    assert!(no_ll.contains("169.254.0.0/16"), "{no_ll}");
}

#[test]
fn ipv6_is_left_alone_without_enable_ipv6() {
    let t = render_transaction(&policy("", false, true, ""));
    let definition = &t[t.rfind("table inet").unwrap()..];
    assert!(
        !definition.contains("ipv6") && !definition.contains("ip6"),
        "{t}"
    );
    // Objects of a run with --enable-ipv6 are removed.
    assert!(
        t.contains("delete chain inet ip-masq-agent masq-v6\n"),
        "{t}"
    );
}

#[test]
fn random_fully_off() {
    let t = render_transaction(&policy("", false, false, ""));
    assert!(t.contains("\t\tmasquerade\n"), "{t}");
    assert!(!t.contains("fully-random"), "{t}");
}

#[test]
fn to_ports_are_weighted_exactly() {
    let statements = masquerade_statements(&Masquerade {
        random_fully: true,
        to_ports: "1024-29999,32768-65535".parse().unwrap(),
    });
    assert_eq!(
        statements,
        vec![
            "meta l4proto { tcp, udp, sctp } numgen random mod 61744 < 28976 masquerade to :1024-29999 fully-random",
            "meta l4proto { tcp, udp, sctp } masquerade to :32768-65535 fully-random",
            "masquerade fully-random",
        ]
    );
    let three = masquerade_statements(&Masquerade {
        random_fully: false,
        to_ports: "1000-1999,2000-2999,3000-3999".parse().unwrap(),
    });
    assert_eq!(
        three[0],
        "meta l4proto { tcp, udp, sctp } numgen random mod 3000 < 1000 masquerade to :1000-1999"
    );
    assert_eq!(
        three[1],
        "meta l4proto { tcp, udp, sctp } numgen random mod 2000 < 1000 masquerade to :2000-2999"
    );
    assert_eq!(
        three[2],
        "meta l4proto { tcp, udp, sctp } masquerade to :3000-3999"
    );
}

#[test]
fn merging_removes_duplicates_overlaps_and_adjacency() {
    assert_eq!(
        merge_prefixes(&nets(&[
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.0.0.0/8",
            "192.168.0.0/16"
        ])),
        nets(&["10.0.0.0/8", "192.168.0.0/16"])
    );
    assert_eq!(
        merge_prefixes(&nets(&["10.128.0.0/9", "10.0.0.0/9"])),
        nets(&["10.0.0.0/8"])
    );
    assert_eq!(
        merge_prefixes(&nets(&["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24"])),
        nets(&["10.0.0.0/23", "10.0.2.0/24"])
    );
    assert_eq!(
        merge_prefixes(&nets(&["0.0.0.0/0", "10.0.0.0/8"])),
        nets(&["0.0.0.0/0"])
    );
    assert_eq!(
        merge_prefixes(&nets(&["::/0", "fd00::/8"])),
        nets(&["::/0"])
    );
    assert_eq!(
        merge_prefixes(&nets(&["255.255.255.255/32", "255.255.255.254/32"])),
        nets(&["255.255.255.254/31"])
    );
    assert_eq!(
        merge_prefixes(&nets(&["fd00::/8", "10.0.0.0/8", "fc00::/8"])),
        nets(&["10.0.0.0/8", "fc00::/7"])
    );
    assert!(merge_prefixes(&[]).is_empty());
}

/// A small deterministic generator, so the property check needs no extra crate.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
}

#[test]
fn merging_covers_exactly_the_same_addresses() {
    let mut rng = Lcg(7);
    for _ in 0..200 {
        let prefixes: Vec<IpNet> = (0..(rng.next() % 40))
            .map(|_| {
                // Cluster addresses in 10.0.0.0/16 so overlaps and adjacency are common.
                let addr = Ipv4Addr::from(0x0A00_0000 | (rng.next() as u32 & 0xFFFF));
                let len = 16 + (rng.next() % 17) as u8;
                IpNet::new(IpAddr::V4(addr), len).unwrap().trunc()
            })
            .collect();
        let merged = merge_prefixes(&prefixes);
        for pair in merged.windows(2) {
            assert!(
                pair[0].broadcast() < pair[1].network(),
                "overlap or unsorted: {merged:?}"
            );
        }
        for _ in 0..200 {
            let probe = IpAddr::V4(Ipv4Addr::from(0x0A00_0000 | (rng.next() as u32 & 0x1FFFF)));
            assert_eq!(
                prefixes.iter().any(|p| p.contains(&probe)),
                merged.iter().any(|p| p.contains(&probe)),
                "{probe} in {prefixes:?} vs {merged:?}"
            );
        }
    }
}

#[test]
fn fifty_thousand_prefixes_render_as_one_set() {
    let prefixes: Vec<IpNet> = (0..50_000u32)
        .map(|i| IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0B00_0000 + (i << 9))), 24).unwrap())
        .collect();
    let merged = merge_prefixes(&prefixes);
    assert_eq!(merged.len(), 50_000);
    let policy = Policy {
        families: vec![FamilyPolicy {
            family: Family::V4,
            link_local: None,
            non_masq: crate::policy::NonMasqPrefixes(prefixes),
            force: Vec::new(),
            sources: None,
            resolved: None,
        }],
        masquerade: Masquerade::default(),
    };
    let t = render_transaction(&policy);
    assert_eq!(t.matches("/24,").count(), 50_000);
    assert_eq!(t.matches(" return\n").count(), 2);
}

#[test]
fn kube_proxy_and_agent_tables_are_recognised() {
    let tables = "table ip filter\ntable ip kube-proxy\ntable inet ip-masq-agent\n";
    assert!(lists_kube_proxy_table(tables));
    assert!(lists_agent_table(tables));
    assert!(!lists_kube_proxy_table("table ip6 nat\n"));
    assert!(!lists_agent_table("table ip ip-masq-agent-other\n"));
    assert_eq!(
        render_removal(),
        "table inet ip-masq-agent {}\ndelete table inet ip-masq-agent\n"
    );
}

#[test]
fn regression_host_prefixes_compare_as_nft_lists_them() {
    // nft lists a /32 or /128 set element without its length, and prints addresses its
    // own way: without normalising both sides every resync looked like drift.
    let rendered = render_transaction(&policy(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.7/32, 'fd00::1/128', '2001:db8::/32']\n",
        true,
        true,
        "",
    ));
    let listed = rendered
        .replace("198.51.100.7/32", "198.51.100.7")
        .replace("fd00::1/128", "fd00::1")
        .replace("2001:db8::/32", "2001:0db8::/32");
    assert_ne!(rendered, listed);
    assert_eq!(normalized_table(&rendered), normalized_table(&listed));
    let other = listed.replace("198.51.100.7,", "198.51.100.8,");
    assert_ne!(normalized_table(&rendered), normalized_table(&other));
}
