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
            snat_to: None,
            family: Family::V4,
            link_local: None,
            non_masq: crate::policy::NonMasqPrefixes(prefixes),
            force: Vec::new(),
            sources: None,
            resolved: None,
        }],
        masquerade: Masquerade::default(),
        out_interfaces: None,
    };
    let t = render_transaction(&policy);
    assert_eq!(t.matches("/24,").count(), 50_000);
    assert_eq!(t.matches(" return\n").count(), 2);
}

#[test]
fn kube_proxy_tables_are_recognised() {
    let tables = "table ip filter\ntable ip kube-proxy\ntable inet ip-masq-agent\n";
    assert!(lists_kube_proxy_table(tables));
    assert!(!lists_kube_proxy_table("table ip6 nat\n"));
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

// --- The backend's decisions, against the fake kernel (kernel::fake) ----------------

use crate::kernel::SharedRunner;
use crate::kernel::fake::{FakeRunner, FakeSet, Fault, NETLINK};
use crate::kernel::nf_tables::table::SET_INTERVAL;

fn netlink_calls(runner: &FakeRunner) -> Vec<crate::kernel::fake::Call> {
    runner
        .take_calls()
        .into_iter()
        .filter(|c| c.command.starts_with(NETLINK))
        .collect()
}

/// The batches among `calls`, one line per operation.
fn batches(calls: &[crate::kernel::fake::Call]) -> Vec<String> {
    calls.iter().filter_map(|c| c.stdin.clone()).collect()
}

fn backend(runner: &std::sync::Arc<FakeRunner>) -> NftablesBackend {
    NftablesBackend::new(runner.clone() as SharedRunner).unwrap()
}

/// The fake kernel's table is exactly what `policy` asks for.
fn holds(runner: &FakeRunner, policy: &Policy) -> bool {
    let want = table_for(policy);
    let observed = crate::kernel::Runner::nft_observe(runner, &want).unwrap();
    observed.is_as_wanted(&want)
}

#[test]
fn the_first_sync_is_one_batch_and_idle_resyncs_read_nothing_while_the_generation_stands_still() {
    let runner = FakeRunner::new();
    let mut backend = backend(&runner);
    let policy = policy(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.7/32]\n",
        false,
        true,
        "",
    );
    let report = backend.sync(&policy).unwrap();
    assert!(report.wrote);
    assert_eq!(report.processes, 0, "no process on the nftables sync path");
    let calls = runner.take_calls();
    assert!(
        calls.iter().all(|c| c.command.starts_with(NETLINK)),
        "{calls:#?}"
    );
    assert_eq!(batches(&calls).len(), 1);
    assert!(holds(&runner, &policy));
    runner.take_calls();
    for _ in 0..3 {
        let report = backend.sync(&policy).unwrap();
        assert_eq!((report.wrote, report.processes), (false, 0));
    }
    assert_eq!(
        runner.take_calls(),
        vec![],
        "nothing read while the generation stands"
    );
    // Someone changed some nf_tables table: read again, find ours intact, write nothing.
    runner.bump_generation();
    assert!(!backend.sync(&policy).unwrap().wrote);
    let calls = runner.take_calls();
    assert_eq!(calls.len(), 1);
    assert!(!calls[0].writes(), "{calls:#?}");
    assert!(backend.diff(&policy).unwrap().is_empty());
}

#[test]
fn a_change_of_set_contents_alone_is_one_element_batch_on_the_known_generation() {
    let runner = FakeRunner::new();
    let mut backend = backend(&runner);
    let first = policy(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\n",
        false,
        true,
        "",
    );
    backend.sync(&first).unwrap();
    runner.take_calls();
    let changed = policy(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12]\n",
        false,
        true,
        "",
    );
    assert!(backend.sync(&changed).unwrap().wrote);
    let calls = netlink_calls(&runner);
    assert_eq!(
        batches(&calls),
        [
            "delete element non-masq-v4 { 192.168.0.0/16 }\nadd element non-masq-v4 { 172.16.0.0/12 }"
        ],
        "no read: the kernel was known to hold the old table at this generation"
    );
    assert!(holds(&runner, &changed));
    assert!(!backend.sync(&changed).unwrap().wrote);
    assert!(backend.diff(&changed).unwrap().is_empty());
}

#[test]
fn a_large_change_is_an_element_batch_too_and_a_disjoint_list_a_refill_of_the_set() {
    let list = |offset: u32, count: u32| -> String {
        let mut yaml = String::from("cidrLimit: 10000\nnonMasqueradeCIDRs:\n");
        for i in offset..offset + count {
            let base = 0x0B00_0000u32 + (i << 9);
            yaml.push_str(&format!("  - {}/24\n", Ipv4Addr::from(base)));
        }
        yaml
    };
    let runner = FakeRunner::new();
    let mut backend = backend(&runner);
    backend
        .sync(&policy(&list(0, 5000), false, true, ""))
        .unwrap();
    runner.take_calls();
    // 2,000 prefixes change of 5,000: deletions and additions, no table rewrite.
    let shifted = policy(&list(2000, 5000), false, true, "");
    backend.sync(&shifted).unwrap();
    let batch = batches(&netlink_calls(&runner)).join("\n");
    assert!(
        batch.starts_with("delete element non-masq-v4"),
        "{}",
        &batch[..80]
    );
    assert!(!batch.contains("rule") && !batch.contains("flush"));
    assert!(holds(&runner, &shifted));
    // A disjoint list: cheaper to empty the set and fill it again, still no rule touched.
    let disjoint = policy(&list(9000, 5000), false, true, "");
    backend.sync(&disjoint).unwrap();
    let batch = batches(&netlink_calls(&runner)).join("\n");
    assert!(
        batch.starts_with("flush set non-masq-v4\nadd element"),
        "{}",
        &batch[..80]
    );
    assert!(!batch.contains("rule"));
    assert!(holds(&runner, &disjoint));
}

#[test]
fn a_delta_after_someone_else_committed_is_computed_from_a_fresh_read() {
    // Issue 15 #10 on the fake kernel (the kernel test is
    // nftables::regression_an_element_delta_was_applied_on_top_of_unchecked_kernel_state).
    let runner = FakeRunner::new();
    let mut backend = backend(&runner);
    let first = policy(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]\n",
        false,
        true,
        "",
    );
    backend.sync(&first).unwrap();
    runner.edit_netlink_table(TABLE, |table| {
        table
            .set_mut("non-masq-v4")
            .unwrap()
            .remove_prefix(&"192.168.0.0/16".parse().unwrap());
    });
    runner.take_calls();
    let changed = policy(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 198.51.100.0/24]\n",
        false,
        true,
        "",
    );
    assert!(backend.sync(&changed).unwrap().wrote);
    let calls = netlink_calls(&runner);
    assert!(!calls[0].writes(), "read first: {calls:#?}");
    assert_eq!(
        batches(&calls),
        ["add element non-masq-v4 { 192.168.0.0/16, 198.51.100.0/24 }"]
    );
    assert!(
        holds(&runner, &changed),
        "right after the change, not a resync later"
    );
}

#[test]
fn a_batch_refused_because_someone_committed_in_between_is_computed_again() {
    let runner = FakeRunner::new();
    let mut backend = backend(&runner);
    let first = policy("nonMasqueradeCIDRs: [10.0.0.0/8]\n", false, true, "");
    backend.sync(&first).unwrap();
    runner.take_calls();
    // Between the generation the agent knows and its batch, another writer deletes an
    // element: the delta computed from the old state must not be applied on top.
    runner.race_next_commit(TABLE, |table| {
        table.set_mut("non-masq-v4").unwrap().elements.clear();
    });
    let changed = policy(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\n",
        false,
        true,
        "",
    );
    assert!(backend.sync(&changed).unwrap().wrote);
    let calls = netlink_calls(&runner);
    let kinds: Vec<&str> = calls
        .iter()
        .map(|c| if c.writes() { "batch" } else { "read" })
        .collect();
    assert_eq!(kinds, ["batch", "read", "batch"], "{calls:#?}");
    assert_eq!(
        batches(&calls)[1],
        "add element non-masq-v4 { 10.0.0.0/8, 192.0.2.0/24 }"
    );
    assert!(holds(&runner, &changed));
}

#[test]
fn a_batch_the_kernel_refuses_is_retried_once_as_a_rewrite_of_every_rule_and_element() {
    let runner = FakeRunner::new();
    let mut backend = backend(&runner);
    let first = policy("nonMasqueradeCIDRs: [10.0.0.0/8]\n", false, true, "");
    backend.sync(&first).unwrap();
    runner.take_calls();
    runner.inject("netlink nf_tables batch", Fault::Fails("EEXIST"), Some(1));
    let changed = policy(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\n",
        false,
        true,
        "",
    );
    assert!(backend.sync(&changed).unwrap().wrote);
    let batches = batches(&netlink_calls(&runner));
    assert_eq!(batches.len(), 2);
    assert!(batches[1].contains("flush rules") && batches[1].contains("flush set non-masq-v4"));
    assert!(holds(&runner, &changed));
    // Refused again: the sync fails (and is retried by the agent), nothing half-written.
    runner.inject("netlink nf_tables batch", Fault::Fails("EPERM"), Some(2));
    let err = backend.sync(&first).unwrap_err();
    assert_eq!(err.kind(), super::super::SyncErrorKind::ToolFailed, "{err}");
    assert!(holds(&runner, &changed));
    assert!(backend.sync(&first).unwrap().wrote);
    assert!(holds(&runner, &first));
}

#[test]
fn others_committing_all_the_time_fail_the_sync_after_a_bounded_number_of_attempts() {
    let runner = FakeRunner::new();
    let mut backend = backend(&runner);
    let policy = policy("", false, true, "");
    runner.race_commits(ATTEMPTS as u32);
    let err = backend.sync(&policy).unwrap_err();
    assert!(
        err.to_string().contains("retried at the next sync"),
        "{err}"
    );
    let calls = netlink_calls(&runner);
    assert_eq!(
        batches(&calls).len(),
        ATTEMPTS,
        "each computed from a fresh read"
    );
    assert!(runner.netlink_table(TABLE).is_none(), "nothing applied");
    assert!(backend.sync(&policy).unwrap().wrote);
    assert!(holds(&runner, &policy));
}

/// Every kind of drift is repaired by one batch of exactly what differs, and the
/// repaired table is what the config asks for.
#[test]
fn drift_of_every_kind_is_repaired_by_what_differs() {
    let runner = FakeRunner::new();
    let mut backend = backend(&runner);
    let policy = policy(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16, 'fd00::/8']\nmasqueradeSourceCIDRs: [10.244.0.0/16, 'fd00:244::/64']\n",
        true,
        true,
        "1024-29999,32768-65535",
    );
    backend.sync(&policy).unwrap();
    // Sets in any order: the kernel keeps them in creation order, which means nothing.
    let normalized = |runner: &FakeRunner| {
        let mut table = runner.netlink_table(TABLE).unwrap();
        table.sets.sort_by(|a, b| a.name.cmp(&b.name));
        table
    };
    let good = normalized(&runner);
    type Drift = (&'static str, fn(&FakeRunner), &'static [&'static str]);
    let drifts: [Drift; 8] = [
        (
            "an element deleted by hand",
            |r| {
                r.edit_netlink_table(TABLE, |t| {
                    t.set_mut("non-masq-v4")
                        .unwrap()
                        .remove_prefix(&"192.168.0.0/16".parse().unwrap())
                })
            },
            &["add element non-masq-v4 { 192.168.0.0/16 }"],
        ),
        (
            "an element added by hand",
            |r| {
                r.edit_netlink_table(TABLE, |t| {
                    let set = t.set_mut("masq-src-v4").unwrap();
                    set.elements.insert(crate::kernel::nf_tables::Boundary {
                        key: 0x0A00_0000,
                        end: false,
                    });
                })
            },
            &["delete 1 single element(s) of masq-src-v4"],
        ),
        (
            "the table flushed",
            |r| {
                r.edit_netlink_table(TABLE, |t| {
                    t.chains.iter_mut().for_each(|c| c.rules.clear());
                    t.sets.iter_mut().for_each(|s| s.elements.clear());
                })
            },
            &[
                "flush rules",
                "add element non-masq-v6 { fd00::/8, fe80::/10 }",
            ],
        ),
        (
            "a chain deleted",
            |r| {
                r.edit_netlink_table(TABLE, |t| {
                    t.chains.iter_mut().for_each(|c| c.rules.clear());
                    t.chains.retain(|c| c.name != "masq-v6");
                })
            },
            &[
                "flush rules",
                "add chain masq-v6",
                "add rule masq-v6 masquerade fully-random",
            ],
        ),
        (
            "a set replaced by another process's",
            |r| {
                r.edit_netlink_table(TABLE, |t| {
                    t.chains.iter_mut().for_each(|c| c.rules.clear());
                    t.sets.retain(|s| s.name != "non-masq-v4");
                    t.sets.push(FakeSet {
                        name: "non-masq-v4".into(),
                        family: Family::V4,
                        flags: SET_INTERVAL | 0x10,
                        elements: Default::default(),
                    });
                })
            },
            &[
                "flush rules",
                "delete set non-masq-v4",
                "add set non-masq-v4",
            ],
        ),
        (
            "a chain of someone else's in the table",
            |r| {
                r.edit_netlink_table(TABLE, |t| {
                    t.chains.push(crate::kernel::nf_tables::Chain {
                        name: "intruder".into(),
                        base: None,
                        rules: Vec::new(),
                    })
                })
            },
            &["flush rules", "delete chain intruder"],
        ),
        (
            "the table made dormant",
            |r| r.edit_netlink_table(TABLE, |t| t.flags = 1),
            &["add table"],
        ),
        (
            "the table deleted",
            |r| r.delete_netlink_table(TABLE),
            &[
                "add table",
                "add set non-masq-v4",
                "add rule postrouting fib daddr type local return",
            ],
        ),
    ];
    for (what, drift, expected) in drifts {
        runner.take_calls();
        drift(&runner);
        assert!(!backend.diff(&policy).unwrap().is_empty(), "{what}: diff");
        runner.take_calls();
        assert!(backend.sync(&policy).unwrap().wrote, "{what}");
        let batch = batches(&netlink_calls(&runner)).join("\n");
        for line in expected {
            assert!(
                batch.lines().any(|l| l == *line),
                "{what}: no `{line}` in\n{batch}"
            );
        }
        assert_eq!(normalized(&runner), good, "{what}");
        assert!(backend.diff(&policy).unwrap().is_empty(), "{what}");
        assert!(!backend.sync(&policy).unwrap().wrote, "{what}: then quiet");
    }
    // Others committing elsewhere: read, nothing written.
    runner.bump_generation();
    runner.take_calls();
    assert!(!backend.sync(&policy).unwrap().wrote);
    assert!(batches(&runner.take_calls()).is_empty());
}

#[test]
fn two_agents_on_one_kernel_write_once_and_agree() {
    // Issue 16 #1 on the fake kernel: a rolling update with maxSurge runs two agents
    // with the same config side by side (the kernel test is two_agents::nftables).
    let runner = FakeRunner::new();
    let (mut old, mut new) = (backend(&runner), backend(&runner));
    let first = policy(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\n",
        false,
        true,
        "",
    );
    assert!(old.sync(&first).unwrap().wrote);
    assert!(
        !new.sync(&first).unwrap().wrote,
        "the second finds the table as it wants it"
    );
    let changed = policy(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12]\n",
        false,
        true,
        "",
    );
    // Both see the change; the second computes its delta from what it knew, but the
    // generation moved: it reads, finds the change made, writes nothing.
    assert!(new.sync(&changed).unwrap().wrote);
    runner.take_calls();
    assert!(!old.sync(&changed).unwrap().wrote);
    assert!(batches(&runner.take_calls()).is_empty());
    // Racing: each one's batch meets the other's commit; one wins, the other re-reads.
    runner.race_next_commit(TABLE, |_| {});
    assert!(!old.sync(&first).unwrap().wrote || holds(&runner, &first));
    assert!(holds(&runner, &first));
    assert!(!new.sync(&first).unwrap().wrote);
    assert!(old.diff(&first).unwrap().is_empty() && new.diff(&first).unwrap().is_empty());
}

#[test]
fn removal_and_the_backend_itself_need_no_nft_binary() {
    let runner = FakeRunner::new();
    runner.uninstall("nft");
    let mut backend = backend(&runner);
    let policy = policy("", false, true, "");
    backend.sync(&policy).unwrap();
    // Without nft, status names the differences from the netlink read.
    runner.edit_netlink_table(TABLE, |t| {
        t.set_mut("non-masq-v4")
            .unwrap()
            .remove_prefix(&"10.0.0.0/8".parse().unwrap())
    });
    assert_eq!(
        backend.diff(&policy).unwrap(),
        ["- set non-masq-v4: element 10.0.0.0/8"]
    );
    let shared: SharedRunner = runner.clone();
    assert!(remove_table(&shared).unwrap());
    assert!(runner.netlink_table(TABLE).is_none());
    assert!(!remove_table(&shared).unwrap(), "nothing left to remove");
    assert!(
        runner
            .calls()
            .iter()
            .all(|c| c.command.starts_with(NETLINK)),
        "{:#?}",
        runner.calls()
    );
}

#[test]
fn regression_status_compared_the_sets_of_a_dual_stack_source_scope_in_one_order() {
    // The kernel lists sets in creation order (both destination sets, then both source
    // sets after a scope is added at run time); the render interleaves them per family.
    let policy = policy(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 'fd00::/8']\nmasqueradeSourceCIDRs: [10.244.0.0/16, 'fd00:244::/64']\n",
        true,
        true,
        "",
    );
    let rendered = render_transaction(&policy);
    let definition = &rendered[rendered.rfind("table inet").unwrap()..];
    let set_block = |name: &str| {
        let start = definition.find(&format!("\tset {name} {{")).unwrap();
        let end = start + definition[start..].find("\n\t}\n").unwrap() + 4;
        definition[start..end].to_string()
    };
    let listed = format!(
        "table inet ip-masq-agent {{\n{}{}{}{}{}",
        set_block("non-masq-v4"),
        set_block("non-masq-v6"),
        set_block("masq-src-v4"),
        set_block("masq-src-v6"),
        &definition[definition.find("\tchain postrouting").unwrap()..]
    );
    assert_ne!(listed, definition);
    assert_eq!(normalized_table(&listed), normalized_table(definition));
    let expected = normalized_table(&rendered);
    assert_eq!(
        super::super::line_diff(&expected, &normalized_table(&listed)),
        Vec::<String>::new()
    );
    // A rule out of order is still a difference: a chain's order is its meaning.
    let swapped = listed.replace(
        "\t\tip saddr != @masq-src-v4 return\n\t\tip daddr @non-masq-v4 return\n",
        "\t\tip daddr @non-masq-v4 return\n\t\tip saddr != @masq-src-v4 return\n",
    );
    assert_ne!(swapped, listed);
    assert_ne!(normalized_table(&swapped), expected);
}

/// Issue 17 golden: a packet leaving by none of the listed interfaces returns before
/// the masquerade statements (one rule), and outputAddress(IPv6) is `snat ip[6] to`.
#[test]
fn output_interfaces_and_addresses_render_as_nft_lists_them() {
    let t = render_transaction(&policy(
        "nonMasqueradeCIDRs: []\noutputInterface: [eth0, 'bond+']\noutputAddress: 192.0.2.10-192.0.2.12\noutputAddressIPv6: '2001:db8::10'\n",
        true,
        true,
        "1024-29999",
    ));
    let v4 = "\tchain masq-v4 {\n\t\tip daddr 169.254.0.0/16 return\n\t\tip daddr @non-masq-v4 return\n\t\toifname != \"eth0\" oifname != \"bond*\" return\n\t\tmeta l4proto { tcp, udp, sctp } snat ip to 192.0.2.10-192.0.2.12:1024-29999 fully-random\n\t\tsnat ip to 192.0.2.10-192.0.2.12 fully-random\n\t}\n";
    assert!(t.contains(v4), "{t}");
    let v6 = "\t\tmeta l4proto { tcp, udp, sctp } snat ip6 to [2001:db8::10]:1024-29999 fully-random\n\t\tsnat ip6 to 2001:db8::10 fully-random\n";
    assert!(t.contains(v6), "{t}");
    // An empty list: no masquerade statement at all.
    let none = render_transaction(&policy("outputInterface: []\n", false, true, ""));
    assert!(
        none.contains("\t\tip daddr @non-masq-v4 return\n\t}\n") && !none.contains("masquerade"),
        "{none}"
    );
    // Without the keys, nothing of them.
    let plain = render_transaction(&policy("", true, true, "1024-29999"));
    assert!(
        !plain.contains("oifname") && !plain.contains("snat"),
        "{plain}"
    );
}

/// rv1 (live-traffic review) #7: a read keeps at most 256 chains and sets that are not
/// the agent's; a repair from it deleted those, then took the table for right until
/// someone else committed, so a foreign base chain among the rest kept masquerading.
/// Now each partial repair reads again until the table is the agent's alone.
#[test]
fn regression_more_than_256_foreign_chains_are_all_removed_in_one_sync() {
    let runner = FakeRunner::new();
    let mut backend = backend(&runner);
    let policy = policy("nonMasqueradeCIDRs: [10.0.0.0/8]\n", false, true, "");
    backend.sync(&policy).unwrap();
    runner.edit_netlink_table(TABLE, |table| {
        for i in 0..600 {
            table.chains.push(crate::kernel::nf_tables::Chain {
                name: format!("junk{i}"),
                base: None,
                rules: Vec::new(),
            });
        }
    });
    assert!(backend.sync(&policy).unwrap().wrote);
    assert!(
        holds(&runner, &policy),
        "{:#?}",
        runner.netlink_table(TABLE)
    );
    // Verified now: an idle resync neither reads nor writes.
    runner.take_calls();
    assert!(!backend.sync(&policy).unwrap().wrote);
    assert!(runner.take_calls().is_empty());
}

/// rv1 (live-traffic review) #11: `status` showed a dormant table as `+ ` and
/// `+ : flags dormant`, naming nothing.
#[test]
fn regression_a_table_flag_is_named_after_the_table_in_a_diff() {
    let listing =
        format!("table inet {TABLE} {{\n\tflags dormant\n\tchain postrouting {{\n\t}}\n}}\n");
    let lines = normalized_table(&listing);
    assert!(
        lines.contains(&format!("table inet {TABLE}: flags dormant")),
        "{lines:?}"
    );
    assert!(
        !lines
            .iter()
            .any(|line| line.is_empty() || line.starts_with(": ")),
        "{lines:?}"
    );
}
