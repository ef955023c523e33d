//! After the first sync the nat table holds exactly upstream v2.12.6's layout, in the
//! iptables flavour kubelet uses; the other flavour is untouched.

use std::time::Duration;

use ima_harness::*;

use crate::AGENT;

const JUMP: &str = "-A POSTROUTING -m comment --comment \"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain\" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT";
const KEEP: &str =
    "-m comment --comment \"ip-masq-agent: local traffic is not subject to MASQUERADE\" -j RETURN";
const MASQ_COMMENT: &str = "-m comment --comment \"ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)\"";

fn keep(chain: &str, prefix: &str) -> String {
    format!("-A {chain} -d {prefix} {KEEP}")
}

fn masq(chain: &str, random_fully: bool) -> String {
    format!(
        "-A {chain} {MASQ_COMMENT} -j MASQUERADE{}",
        if random_fully { " --random-fully" } else { "" }
    )
}

/// Runs the agent once in a fresh namespace and returns the lines of `save_tool`'s
/// nat table that mention `chain`, after the first sync.
fn first_sync_lines(
    config: &str,
    args: &[&str],
    save_tool: &str,
    chain: &str,
    prepare: impl Fn(&Netns),
) -> (Netns, Vec<String>) {
    let node = Netns::new("node");
    prepare(&node);
    let volume = ConfigMapVolume::new(config);
    let path = volume.path();
    let mut full_args = vec!["--config", path.to_str().unwrap()];
    full_args.extend_from_slice(args);
    let mut agent = AGENT.start(&node, &full_args);
    agent.wait_for_log("rules applied", 1, Duration::from_secs(10));
    let lines = chain_lines(&node.save(save_tool), chain);
    agent.terminate();
    (node, lines)
}

fn expected(chain: &str, body: &[String]) -> Vec<String> {
    let mut lines = vec![
        format!(":{chain} - [0:0]"),
        JUMP.replace("IP-MASQ-AGENT", chain),
    ];
    lines.extend(body.iter().cloned());
    lines
}

/// The whole chain: a RETURN for each of `kept`, then the catch-all MASQUERADE.
fn layout(chain: &str, kept: &[&str], random_fully: bool) -> Vec<String> {
    let mut body: Vec<String> = kept.iter().map(|p| keep(chain, p)).collect();
    body.push(masq(chain, random_fully));
    expected(chain, &body)
}

root_test!(
    fn default_layout_on_iptables_nft_leaves_legacy_untouched() {
        let (node, lines) = first_sync_lines("", &[], "iptables-nft-save", "IP-MASQ-AGENT", |_| {});
        assert_eq!(
            lines,
            layout(
                "IP-MASQ-AGENT",
                &[
                    "169.254.0.0/16",
                    "10.0.0.0/8",
                    "172.16.0.0/12",
                    "192.168.0.0/16"
                ],
                true
            )
        );
        assert!(chain_lines(&node.save("iptables-legacy-save"), "IP-MASQ-AGENT").is_empty());
        assert!(
            !node.sh(&["nft", "list", "ruleset"]).contains("ip6 nat"),
            "IPv6 untouched without --enable-ipv6"
        );
    }
);

root_test!(
    fn default_layout_lands_in_legacy_when_kubelet_uses_legacy() {
        let (node, lines) =
            first_sync_lines("", &[], "iptables-legacy-save", "IP-MASQ-AGENT", |ns| {
                ns.sh(&[
                    "iptables-legacy",
                    "-t",
                    "mangle",
                    "-N",
                    "KUBE-IPTABLES-HINT",
                ]);
            });
        assert_eq!(lines.len(), 7, "{lines:#?}");
        assert_eq!(lines[1], JUMP);
        assert_eq!(lines[6], masq("IP-MASQ-AGENT", true));
        assert!(chain_lines(&node.save("iptables-nft-save"), "IP-MASQ-AGENT").is_empty());
    }
);

root_test!(
    fn kubelet_canary_in_nft_wins_over_busier_legacy() {
        let (node, lines) = first_sync_lines("", &[], "iptables-nft-save", "IP-MASQ-AGENT", |ns| {
            ns.sh(&["iptables-nft", "-t", "mangle", "-N", "KUBE-KUBELET-CANARY"]);
            ns.sh(&["iptables-legacy", "-A", "INPUT", "-j", "ACCEPT"]);
            ns.sh(&["iptables-legacy", "-A", "INPUT", "-j", "ACCEPT"]);
        });
        assert_eq!(lines.len(), 7, "{lines:#?}");
        assert!(chain_lines(&node.save("iptables-legacy-save"), "IP-MASQ-AGENT").is_empty());
    }
);

root_test!(
    fn iptables_mode_flag_overrides_detection() {
        let (node, lines) = first_sync_lines(
            "",
            &["--iptables-mode=legacy"],
            "iptables-legacy-save",
            "IP-MASQ-AGENT",
            |_| {},
        );
        assert_eq!(lines.len(), 7, "{lines:#?}");
        assert!(chain_lines(&node.save("iptables-nft-save"), "IP-MASQ-AGENT").is_empty());
    }
);

root_test!(
    fn custom_list_masq_link_local_and_no_random_fully() {
        let config = "nonMasqueradeCIDRs:\n  - 100.64.0.0/10\n  - 10.0.0.0/8\n  - 100.64.0.0/10\nmasqLinkLocal: yes\n";
        let (_node, lines) = first_sync_lines(
            config,
            &["--random-fully=false"],
            "iptables-nft-save",
            "IP-MASQ-AGENT",
            |_| {},
        );
        assert_eq!(
            lines,
            layout(
                "IP-MASQ-AGENT",
                &["100.64.0.0/10", "10.0.0.0/8", "100.64.0.0/10"],
                false
            )
        );
    }
);

root_test!(
    fn reserved_ranges_and_custom_chain() {
        let (_node, lines) = first_sync_lines(
            "",
            &["--nomasq-all-reserved-ranges", "-masq-chain=MY-MASQ"],
            "iptables-nft-save",
            "MY-MASQ",
            |_| {},
        );
        let kept = [
            "169.254.0.0/16",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "192.0.0.0/24",
            "192.0.2.0/24",
            "192.88.99.0/24",
            "198.18.0.0/15",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "240.0.0.0/4",
        ];
        assert_eq!(lines, layout("MY-MASQ", &kept, true));
    }
);

root_test!(
    fn ipv6_layout_in_ip6tables() {
        let config = "{\"nonMasqueradeCIDRs\": [\"10.0.0.0/8\", \"fd00::/8\"]}";
        let (node, lines) = first_sync_lines(
            config,
            &["--enable-ipv6"],
            "ip6tables-nft-save",
            "IP-MASQ-AGENT",
            |_| {},
        );
        assert_eq!(
            lines,
            layout("IP-MASQ-AGENT", &["fe80::/10", "fd00::/8"], true)
        );
        let v4 = chain_lines(&node.save("iptables-nft-save"), "IP-MASQ-AGENT");
        assert_eq!(
            v4[2..4],
            [
                keep("IP-MASQ-AGENT", "169.254.0.0/16"),
                keep("IP-MASQ-AGENT", "10.0.0.0/8")
            ]
        );
    }
);

root_test!(
    fn to_ports_rules_precede_the_catch_all() {
        let (_node, lines) = first_sync_lines(
            "nonMasqueradeCIDRs: []\n",
            &["--to-ports=1024-29999,32768-65535"],
            "iptables-nft-save",
            "IP-MASQ-AGENT",
            |_| {},
        );
        let mut body = vec![keep("IP-MASQ-AGENT", "169.254.0.0/16")];
        for proto in ["tcp", "udp", "sctp"] {
            // iptables-save prints the probability rounded to 11 places.
            body.push(format!("-A IP-MASQ-AGENT -p {proto} {MASQ_COMMENT} -m statistic --mode random --probability 0.46929256292 -j MASQUERADE --to-ports 1024-29999 --random-fully"));
            body.push(format!("-A IP-MASQ-AGENT -p {proto} {MASQ_COMMENT} -j MASQUERADE --to-ports 32768-65535 --random-fully"));
        }
        body.push(masq("IP-MASQ-AGENT", true));
        assert_eq!(lines, expected("IP-MASQ-AGENT", &body));
    }
);

root_test!(
    /// Regression: v2.10.0-v2.12.1 wrote the jump comment with literal quotes; a newer
    /// release then added a second jump instead of replacing it.
    fn regression_old_quoted_jump_is_replaced_by_exactly_one_jump() {
        for flavour in ["nft", "legacy"] {
            let tool = format!("iptables-{flavour}");
            let (node, lines) = first_sync_lines(
                "",
                &[&format!("--iptables-mode={flavour}")],
                &format!("{tool}-save"),
                "IP-MASQ-AGENT",
                |ns| {
                    ns.sh(&[&tool, "-t", "nat", "-N", "IP-MASQ-AGENT"]);
                    ns.sh(&[&tool, "-t", "nat", "-A", "POSTROUTING", "-m", "comment", "--comment",
                    "\"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain\"",
                    "-m", "addrtype", "!", "--dst-type", "LOCAL", "-j", "IP-MASQ-AGENT"]);
                },
            );
            let jumps: Vec<&String> = lines
                .iter()
                .filter(|l| l.starts_with("-A POSTROUTING"))
                .collect();
            assert_eq!(jumps, vec![JUMP], "{flavour}");
            drop(node);
        }
    }
);

root_test!(
    fn foreign_nat_rules_are_byte_identical_after_sync() {
        for flavour in ["nft", "legacy"] {
            let tool = format!("iptables-{flavour}");
            let node = Netns::new("node");
            for rule in [
                "-t nat -N KUBE-POSTROUTING",
                "-t nat -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
                "-t nat -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
                "-t nat -A KUBE-POSTROUTING -j MASQUERADE --random-fully",
                "-t nat -N DOCKER",
                "-t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
                "-t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
            ] {
                node.sh_line(&format!("{tool} {rule}"));
            }
            let save = format!("{tool}-save");
            let before = node.save(&save);
            let volume = ConfigMapVolume::new("resyncInterval: 200ms\n");
            let path = volume.path();
            let mut agent = AGENT.start(
                &node,
                &[
                    "--config",
                    path.to_str().unwrap(),
                    &format!("--iptables-mode={flavour}"),
                ],
            );
            agent.wait_for_log("rules resynced", 3, Duration::from_secs(10));
            let after = node.save(&save);
            assert_eq!(foreign_lines(&after, "IP-MASQ-AGENT"), before, "{flavour}");
            assert_eq!(
                chain_lines(&after, "IP-MASQ-AGENT").len(),
                7,
                "{flavour}: {after}"
            );
            let status = agent.terminate();
            assert!(status.success(), "{status}");
            // SIGTERM leaves the rules in place.
            assert_eq!(node.save(&save), after);
        }
    }
);
