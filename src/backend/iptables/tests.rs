use super::*;
use crate::config::{ParseOptions, parse};
use crate::kernel::fake::FakeRunner;
use crate::policy::{PolicySettings, ToPorts};
use std::path::Path;

const JUMP: &str = "-A POSTROUTING -m comment --comment \"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain\" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT";
const OLD_QUOTED_JUMP: &str = "-A POSTROUTING -m comment --comment \"\\\"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain\\\"\" -m addrtype ! --dst-type LOCAL -j IP-MASQ-AGENT";
const KEEP: &str =
    "-m comment --comment \"ip-masq-agent: local traffic is not subject to MASQUERADE\" -j RETURN";
const MASQ: &str = "-m comment --comment \"ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)\" -j MASQUERADE";

struct Case {
    yaml: &'static str,
    options: ParseOptions,
    settings: PolicySettings,
}

impl Case {
    fn new(yaml: &'static str) -> Case {
        Case {
            yaml,
            options: ParseOptions::default(),
            settings: PolicySettings {
                masquerade: Masquerade {
                    random_fully: true,
                    ..Masquerade::default()
                },
                ..PolicySettings::default()
            },
        }
    }

    fn ipv6(mut self) -> Case {
        self.options.enable_ipv6 = true;
        self.settings.enable_ipv6 = true;
        self
    }

    fn policy(&self) -> Policy {
        let config = parse(self.yaml, Path::new("test"), self.options)
            .unwrap()
            .config;
        Policy::new(&config, &self.settings)
    }

    fn rules(&self, family: Family) -> Vec<String> {
        let policy = self.policy();
        render_chain_rules(
            &ChainName::default(),
            policy.family(family).unwrap(),
            &policy.masquerade,
            policy.out_interfaces.as_deref(),
        )
    }
}

fn keep(prefix: &str) -> String {
    format!("-A IP-MASQ-AGENT -d {prefix} {KEEP}")
}

#[test]
fn default_payload_is_upstreams_layout() {
    let policy = Case::new("").policy();
    let expected = format!(
        "# iptables-restore --noflush (IPv4)\n*nat\n:IP-MASQ-AGENT - [0:0]\n{JUMP}\n{}\n{}\n{}\n{}\n-A IP-MASQ-AGENT {MASQ} --random-fully\nCOMMIT\n",
        keep("169.254.0.0/16"),
        keep("10.0.0.0/8"),
        keep("172.16.0.0/12"),
        keep("192.168.0.0/16"),
    );
    assert_eq!(render(&policy, &ChainName::default()), expected);
}

#[test]
fn custom_list_keeps_config_order_and_duplicates() {
    let rules = Case::new("nonMasqueradeCIDRs: [192.168.0.0/16, 10.0.0.0/8, 192.168.0.0/16]\n")
        .rules(Family::V4);
    assert_eq!(
        rules,
        vec![
            keep("169.254.0.0/16"),
            keep("192.168.0.0/16"),
            keep("10.0.0.0/8"),
            keep("192.168.0.0/16"),
            format!("-A IP-MASQ-AGENT {MASQ} --random-fully"),
        ]
    );
}

#[test]
fn empty_list_leaves_link_local_and_masquerade() {
    let rules = Case::new("nonMasqueradeCIDRs: []\n").rules(Family::V4);
    assert_eq!(
        rules,
        vec![
            keep("169.254.0.0/16"),
            format!("-A IP-MASQ-AGENT {MASQ} --random-fully")
        ]
    );
}

#[test]
fn masq_link_local_drops_the_link_local_return() {
    let rules =
        Case::new("masqLinkLocal: true\nnonMasqueradeCIDRs: [10.0.0.0/8]\n").rules(Family::V4);
    assert_eq!(
        rules,
        vec![
            keep("10.0.0.0/8"),
            format!("-A IP-MASQ-AGENT {MASQ} --random-fully")
        ]
    );
}

#[test]
fn reserved_ranges_flag_adds_them_in_order() {
    let mut case = Case::new("");
    case.options.nomasq_all_reserved_ranges = true;
    let rules = case.rules(Family::V4);
    let prefixes: Vec<&str> = rules
        .iter()
        .filter_map(|r| r.strip_prefix("-A IP-MASQ-AGENT -d "))
        .filter_map(|r| r.split(' ').next())
        .collect();
    assert_eq!(
        prefixes,
        vec![
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
        ]
    );
}

#[test]
fn ipv6_chain_holds_only_ipv6_prefixes() {
    let case =
        Case::new("nonMasqueradeCIDRs: [10.0.0.0/8, 'fd00::/8', '2001:db8:5::/48']\n").ipv6();
    assert_eq!(
        case.rules(Family::V6),
        vec![
            keep("fe80::/10"),
            keep("fd00::/8"),
            keep("2001:db8:5::/48"),
            format!("-A IP-MASQ-AGENT {MASQ} --random-fully"),
        ]
    );
    assert_eq!(
        case.rules(Family::V4),
        vec![
            keep("169.254.0.0/16"),
            keep("10.0.0.0/8"),
            format!("-A IP-MASQ-AGENT {MASQ} --random-fully")
        ]
    );
    let rendered = render(&case.policy(), &ChainName::default());
    assert!(
        rendered.contains("# ip6tables-restore --noflush (IPv6)\n*nat\n"),
        "{rendered}"
    );
}

#[test]
fn masq_link_local_ipv6_drops_fe80() {
    let case = Case::new("masqLinkLocalIPv6: true\nnonMasqueradeCIDRs: []\n").ipv6();
    assert_eq!(
        case.rules(Family::V6),
        vec![format!("-A IP-MASQ-AGENT {MASQ} --random-fully")]
    );
    assert_eq!(case.rules(Family::V4)[0], keep("169.254.0.0/16"));
}

#[test]
fn random_fully_off_or_unsupported_is_omitted() {
    let mut case = Case::new("nonMasqueradeCIDRs: []\n");
    case.settings.masquerade.random_fully = false;
    assert_eq!(
        case.rules(Family::V4)[1],
        format!("-A IP-MASQ-AGENT {MASQ}")
    );

    let runner = FakeRunner::new();
    runner.set_iptables_version("iptables-restore v1.4.21\n");
    let mut old_iptables = IptablesBackend::new(
        ChainName::default(),
        IptablesMode::Nft,
        false,
        runner.clone(),
    )
    .unwrap();
    old_iptables.sync(&Case::new("").policy()).unwrap();
    assert_eq!(old_iptables.random_fully_supported(), Some(false));
    let written = runner.nat("iptables-nft");
    assert!(written.contains("-j MASQUERADE"), "{written}");
    assert!(!written.contains("--random-fully"), "{written}");
}

#[test]
fn to_ports_split_by_protocol_and_weight() {
    let mut case = Case::new("nonMasqueradeCIDRs: []\n");
    case.settings.masquerade.to_ports = "1024-29999,32768-65535".parse::<ToPorts>().unwrap();
    let rules = case.rules(Family::V4);
    let comment = "-m comment --comment \"ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)\"";
    let mut expected = vec![keep("169.254.0.0/16")];
    for proto in ["tcp", "udp", "sctp"] {
        expected.push(format!("-A IP-MASQ-AGENT -p {proto} {comment} -m statistic --mode random --probability 0.469292562840114 -j MASQUERADE --to-ports 1024-29999 --random-fully"));
        expected.push(format!("-A IP-MASQ-AGENT -p {proto} {comment} -j MASQUERADE --to-ports 32768-65535 --random-fully"));
    }
    expected.push(format!("-A IP-MASQ-AGENT {MASQ} --random-fully"));
    assert_eq!(rules, expected);
}

#[test]
fn custom_chain_name_is_used_everywhere() {
    let chain: ChainName = "MY-MASQ".parse().unwrap();
    let rendered = render(&Case::new("nonMasqueradeCIDRs: []\n").policy(), &chain);
    assert!(rendered.contains(":MY-MASQ - [0:0]\n"));
    assert!(rendered.contains(
        "traffic to our custom MY-MASQ chain\" -m addrtype ! --dst-type LOCAL -j MY-MASQ\n"
    ));
    assert!(rendered.contains("-A MY-MASQ -d 169.254.0.0/16 "));
    assert!(!rendered.contains("IP-MASQ-AGENT"));
}

#[test]
fn chain_names_iptables_would_refuse_are_rejected() {
    assert!("IP-MASQ-AGENT".parse::<ChainName>().is_ok());
    assert!("A234567890123456789012345678".parse::<ChainName>().is_ok());
    for bad in [
        "",
        "A2345678901234567890123456789",
        "MY CHAIN",
        "MY\"CHAIN",
        "it's",
        "-X",
        "POSTROUTING",
        "RETURN",
        "TAB\tX",
    ] {
        assert!(bad.parse::<ChainName>().is_err(), "{bad:?}");
    }
}

#[test]
fn jump_is_appended_when_missing() {
    let saved = "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\nCOMMIT\n";
    assert_eq!(
        plan_jump_repairs(saved, &ChainName::default()),
        vec![JUMP.to_string()]
    );
}

#[test]
fn present_jump_needs_nothing() {
    let saved = format!("*nat\n:IP-MASQ-AGENT - [0:0]\n{JUMP}\nCOMMIT\n");
    assert!(plan_jump_repairs(&saved, &ChainName::default()).is_empty());
}

/// Regression: v2.10.0-v2.12.1 wrote the comment with literal quotes, and a newer
/// release's check missed it and added a second jump.
#[test]
fn regression_old_quoted_jump_is_replaced_not_duplicated() {
    let saved = format!("*nat\n{OLD_QUOTED_JUMP}\nCOMMIT\n");
    assert_eq!(
        plan_jump_repairs(&saved, &ChainName::default()),
        vec![OLD_QUOTED_JUMP.replacen("-A ", "-D ", 1), JUMP.to_string()]
    );
    let both = format!("*nat\n{OLD_QUOTED_JUMP}\n{JUMP}\nCOMMIT\n");
    assert_eq!(
        plan_jump_repairs(&both, &ChainName::default()),
        vec![OLD_QUOTED_JUMP.replacen("-A ", "-D ", 1)]
    );
}

#[test]
fn duplicate_jumps_are_reduced_to_one() {
    let saved = format!("*nat\n{JUMP}\n{JUMP}\nCOMMIT\n");
    assert_eq!(
        plan_jump_repairs(&saved, &ChainName::default()),
        vec![JUMP.replacen("-A ", "-D ", 1)]
    );
}

#[test]
fn foreign_jumps_into_the_chain_are_left_alone() {
    let saved = format!(
        "*nat\n-A POSTROUTING -j IP-MASQ-AGENT\n-A POSTROUTING -m comment --comment \"mine\" -j IP-MASQ-AGENT\n{JUMP}\nCOMMIT\n"
    );
    assert!(plan_jump_repairs(&saved, &ChainName::default()).is_empty());
}

/// Runs `detect_flavour_with` over canned outputs per (flavour, family); returns the
/// decision and the probes made, in order.
fn detect(outputs: &[(Flavour, Family, Option<&str>)]) -> (Flavour, Vec<(Flavour, Family)>) {
    let mut asked = Vec::new();
    let flavour = detect_flavour_with(|flavour, family| {
        asked.push((flavour, family));
        outputs
            .iter()
            .find(|(f, fam, _)| *f == flavour && *fam == family)
            .and_then(|(_, _, out)| out.map(str::to_string))
    });
    (flavour, asked)
}

#[test]
fn regression_flavour_follows_todays_iptables_wrapper_exactly() {
    let hint = Some("*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n");
    let canary = Some("*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n");
    let busy =
        Some("*nat\n-A POSTROUTING -j A\n-A POSTROUTING -j B\n-A POSTROUTING -j C\nCOMMIT\n");
    use Family::{V4, V6};
    use Flavour::{Legacy, Nft};
    // The first probe that shows kubelet's chain decides, and nothing after it runs.
    assert_eq!(
        detect(&[(Nft, V4, hint), (Legacy, V4, canary)]),
        (Nft, vec![(Nft, V4)])
    );
    assert_eq!(
        detect(&[(Nft, V6, canary), (Legacy, V4, hint)]),
        (Nft, vec![(Nft, V4), (Nft, V6)])
    );
    assert_eq!(
        detect(&[(Nft, V4, busy), (Legacy, V4, canary)]),
        (Legacy, vec![(Nft, V4), (Nft, V6), (Legacy, V4)])
    );
    assert_eq!(
        detect(&[(Legacy, V6, hint)]),
        (
            Legacy,
            vec![(Nft, V4), (Nft, V6), (Legacy, V4), (Legacy, V6)]
        )
    );
    // No rule-count heuristic: many legacy rules and no hint anywhere is still nft.
    assert_eq!(detect(&[(Legacy, V4, busy), (Legacy, V6, busy)]).0, Nft);
    assert_eq!(detect(&[]).0, Nft);
    // kubelet's chain name is matched at the start of the line, as the wrapper's regexp does.
    assert_eq!(
        detect(&[(Legacy, V4, Some("*mangle\n:KUBE-IPTABLES-HINTS - [0:0]\n"))]).0,
        Legacy
    );
    assert_eq!(
        detect(&[(Legacy, V4, Some("*mangle\n# :KUBE-IPTABLES-HINT\n"))]).0,
        Nft
    );
}

#[test]
fn random_fully_needs_iptables_1_6_2() {
    assert!(supports_random_fully(
        "iptables-restore v1.8.9 (nf_tables)\n"
    ));
    assert!(supports_random_fully("iptables v1.6.2"));
    assert!(!supports_random_fully("iptables v1.6.1"));
    assert!(!supports_random_fully("iptables v1.4.21"));
    assert!(!supports_random_fully("garbage"));
}

#[test]
fn removal_deletes_every_agent_jump_then_the_chain() {
    let saved = format!(
        "*nat\n:POSTROUTING ACCEPT [0:0]\n:IP-MASQ-AGENT - [0:0]\n-A POSTROUTING -j KUBE-POSTROUTING\n{OLD_QUOTED_JUMP}\n{JUMP}\n-A IP-MASQ-AGENT {MASQ}\nCOMMIT\n"
    );
    assert_eq!(
        plan_removal(&saved, &ChainName::default()),
        vec![
            OLD_QUOTED_JUMP.replacen("-A ", "-D ", 1),
            JUMP.replacen("-A ", "-D ", 1),
            "-F IP-MASQ-AGENT".to_string(),
            "-X IP-MASQ-AGENT".to_string(),
        ]
    );
    assert!(
        plan_removal(
            "*nat\n-A POSTROUTING -j KUBE-POSTROUTING\nCOMMIT\n",
            &ChainName::default()
        )
        .is_empty()
    );
}

#[test]
fn removal_keeps_a_chain_that_a_foreign_rule_still_uses() {
    let saved = format!(
        "*nat\n:IP-MASQ-AGENT - [0:0]\n{JUMP}\n-A POSTROUTING -o eth9 -j IP-MASQ-AGENT\n-A IP-MASQ-AGENT {MASQ}\nCOMMIT\n"
    );
    assert_eq!(
        plan_removal(&saved, &ChainName::default()),
        vec![
            JUMP.replacen("-A ", "-D ", 1),
            "-F IP-MASQ-AGENT".to_string()
        ]
    );
}

#[test]
fn renamed_chain_and_its_jump_are_removed_but_the_current_one_kept() {
    let old = JUMP.replace("IP-MASQ-AGENT", "OLD-MASQ");
    let saved = format!(
        "*nat\n:OLD-MASQ - [0:0]\n:IP-MASQ-AGENT - [0:0]\n{old}\n{JUMP}\n-A OLD-MASQ {MASQ}\nCOMMIT\n"
    );
    assert_eq!(
        plan_stale_removal(&saved, Some(&ChainName::default())),
        vec![
            old.replacen("-A ", "-D ", 1),
            "-F OLD-MASQ".to_string(),
            "-X OLD-MASQ".to_string()
        ]
    );
    // Removing everything takes both.
    assert_eq!(plan_removal(&saved, &ChainName::default()).len(), 6);
    // A jump without the agent's comment is not the agent's.
    let foreign =
        "*nat\n:OTHER - [0:0]\n-A POSTROUTING -m comment --comment \"mine\" -j OTHER\nCOMMIT\n";
    assert!(plan_stale_removal(foreign, Some(&ChainName::default())).is_empty());
}

#[test]
fn nat_section_is_cut_from_a_whole_dump() {
    let dump = "*mangle\n:A - [0:0]\nCOMMIT\n*nat\n:IP-MASQ-AGENT - [0:0]\nCOMMIT\n*filter\n:B - [0:0]\nCOMMIT\n";
    assert_eq!(nat_section(dump), "*nat\n:IP-MASQ-AGENT - [0:0]\nCOMMIT\n");
}

#[test]
fn regression_to_ports_probability_compares_as_the_kernel_stores_it() {
    // We pass 0.469292562840114; the kernel keeps round(p * 2^31) and iptables-save
    // prints that over 2^31: 0.46929256292, not the 11-decimal rounding of p.
    let rendered = "-A IP-MASQ-AGENT -p tcp -m statistic --mode random --probability 0.469292562840114 -j MASQUERADE --to-ports 1024-29999";
    let saved = "-A IP-MASQ-AGENT -p tcp -m statistic --mode random --probability 0.46929256292 -j MASQUERADE --to-ports 1024-29999";
    assert_eq!(normalize_rule(rendered), normalize_rule(saved));
    assert_ne!(
        normalize_rule(rendered),
        normalize_rule(&saved.replace("0.46929256292", "0.46929256339"))
    );
    assert_eq!(
        normalize_rule("-A X --probability 0.5"),
        "-A X --probability 0.50000000000"
    );
    assert_eq!(normalize_rule(JUMP), JUMP);
    assert_eq!(normalize_rule(OLD_QUOTED_JUMP), OLD_QUOTED_JUMP);
}

#[test]
fn regression_default_routes_compare_as_iptables_save_prints_them() {
    // iptables-save leaves out `-d 0.0.0.0/0` and `-d ::/0`.
    let keep_all_v4 = keep("0.0.0.0/0");
    let printed_v4 = keep_all_v4.replace("-d 0.0.0.0/0 ", "");
    assert_eq!(normalize_rule(&keep_all_v4), normalize_rule(&printed_v4));
    let keep_all_v6 = keep("::/0");
    let printed_v6 = keep_all_v6.replace("-d ::/0 ", "");
    assert_eq!(normalize_rule(&keep_all_v6), normalize_rule(&printed_v6));
    // Other spellings of one address compare equal too.
    assert_eq!(
        normalize_rule(&keep("2001:db8::/32")),
        normalize_rule(&keep("2001:0db8:0:0::/32"))
    );
    assert_eq!(
        normalize_rule(&keep("::102:304/128")),
        normalize_rule(&keep("::1.2.3.4/128"))
    );
    assert_ne!(
        normalize_rule(&keep("10.0.0.0/8")),
        normalize_rule(&keep("10.0.0.0/9"))
    );
}

#[test]
fn chain_matches_only_the_exact_saved_rules() {
    let chain = ChainName::default();
    let rules = vec![
        keep("169.254.0.0/16"),
        format!("-A IP-MASQ-AGENT {MASQ} --random-fully"),
    ];
    let saved = format!(
        "*nat\n:IP-MASQ-AGENT - [0:0]\n{JUMP}\n{}\n{}\nCOMMIT\n",
        rules[0], rules[1]
    );
    assert!(chain_matches(&saved, &chain, &rules));
    // Flushed, edited, extended, or never declared: all differ.
    assert!(!chain_matches(
        &format!("*nat\n:IP-MASQ-AGENT - [0:0]\n{JUMP}\nCOMMIT\n"),
        &chain,
        &rules
    ));
    assert!(!chain_matches(
        &saved.replace("169.254.0.0/16", "169.254.0.0/17"),
        &chain,
        &rules
    ));
    assert!(!chain_matches(
        &saved.replace("COMMIT", "-A IP-MASQ-AGENT -j RETURN\nCOMMIT"),
        &chain,
        &rules
    ));
    assert!(!chain_matches(
        &saved.replace(":IP-MASQ-AGENT - [0:0]\n", ""),
        &chain,
        &rules
    ));
    // Another chain whose name starts like ours does not count.
    assert!(chain_matches(
        &saved.replace("COMMIT", "-A IP-MASQ-AGENT2 -j RETURN\nCOMMIT"),
        &chain,
        &rules
    ));
}

#[test]
fn a_chain_is_foreign_only_when_no_rule_is_the_agents() {
    let chain = ChainName::default();
    let ours = format!(
        "*nat\n:IP-MASQ-AGENT - [0:0]\n{}\n-A IP-MASQ-AGENT -j ACCEPT\nCOMMIT\n",
        keep("10.0.0.0/8")
    );
    assert!(
        foreign_rules(&ours, &chain).is_empty(),
        "an inserted rule is drift"
    );
    assert!(foreign_rules("*nat\n:IP-MASQ-AGENT - [0:0]\nCOMMIT\n", &chain).is_empty());
    let theirs =
        "*nat\n:IP-MASQ-AGENT - [0:0]\n-A IP-MASQ-AGENT -s 10.9.9.9/32 -j ACCEPT\nCOMMIT\n";
    assert_eq!(
        foreign_rules(theirs, &chain),
        vec!["-A IP-MASQ-AGENT -s 10.9.9.9/32 -j ACCEPT"]
    );
}

/// Neighbours that look like the agent's but are not exactly what a release writes.
const HOSTILE_NEIGHBOURS: &str = "*nat
:POSTROUTING ACCEPT [0:0]
:KUBE-POSTROUTING - [0:0]
:IP-MASQ-AGENT-2 - [0:0]
:USER-CHAIN - [0:0]
-A POSTROUTING -m comment --comment \"ip-masq-agent: also run kube rules\" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment \"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT chain\" -m addrtype ! --dst-type LOCAL -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment \"see: ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom USER-CHAIN chain\" -m addrtype ! --dst-type LOCAL -j USER-CHAIN
-A POSTROUTING -m comment --comment \"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ-AGENT-2 chain\" -m addrtype ! --dst-type LOCAL -o eth0 -j IP-MASQ-AGENT-2
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A IP-MASQ-AGENT-2 -m comment --comment \"ip-masq-agent: local traffic is not subject to MASQUERADE\" -j ACCEPT
-A USER-CHAIN -m comment --comment \"ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain) and more\" -j MASQUERADE
COMMIT
";

#[test]
fn regression_ownership_is_exact_a_comment_prefix_is_not_ours() {
    let chain = ChainName::default();
    // Reproduced: this neighbour made one sync flush KUBE-POSTROUTING.
    assert!(
        plan_stale_removal(HOSTILE_NEIGHBOURS, Some(&chain)).is_empty(),
        "{:#?}",
        plan_stale_removal(HOSTILE_NEIGHBOURS, Some(&chain))
    );
    assert!(plan_stale_removal(HOSTILE_NEIGHBOURS, None).is_empty());
    // Cleanup finds none of the agent's objects in it.
    assert!(plan_removal(HOSTILE_NEIGHBOURS, &chain).is_empty());
    // A sync only adds its own jump; no neighbour is deleted.
    assert_eq!(
        plan_jump_repairs(HOSTILE_NEIGHBOURS, &chain),
        vec![JUMP.to_string()]
    );
    for chain in ["KUBE-POSTROUTING", "IP-MASQ-AGENT-2", "USER-CHAIN"] {
        let chain: ChainName = chain.parse().unwrap();
        assert!(
            plan_removal(HOSTILE_NEIGHBOURS, &chain).is_empty(),
            "{chain}"
        );
    }
}

#[test]
fn regression_a_chain_is_removed_only_when_every_rule_is_the_agents() {
    let old = JUMP.replace("IP-MASQ-AGENT", "OLD-MASQ");
    let mixed = format!(
        "*nat\n:OLD-MASQ - [0:0]\n{old}\n-A OLD-MASQ -d 10.0.0.0/8 {KEEP}\n-A OLD-MASQ -j ACCEPT\nCOMMIT\n"
    );
    // The jump is the agent's and goes; the chain holds a foreign rule and stays whole.
    assert_eq!(
        plan_stale_removal(&mixed, Some(&ChainName::default())),
        vec![old.replacen("-A ", "-D ", 1)]
    );
    let ours = format!(
        "*nat\n:OLD-MASQ - [0:0]\n{old}\n-A OLD-MASQ -d 10.0.0.0/8 {KEEP}\n-A OLD-MASQ {MASQ}\nCOMMIT\n"
    );
    assert_eq!(
        plan_stale_removal(&ours, Some(&ChainName::default())),
        vec![
            old.replacen("-A ", "-D ", 1),
            "-F OLD-MASQ".to_string(),
            "-X OLD-MASQ".to_string()
        ]
    );
    // Our comment on a rule with another target is not a rule the agent writes.
    let retargeted = ours.replace(" -j MASQUERADE", " -j ACCEPT");
    assert_eq!(
        plan_stale_removal(&retargeted, Some(&ChainName::default())),
        vec![old.replacen("-A ", "-D ", 1)]
    );
}

#[test]
fn agent_rules_are_recognised_exactly() {
    assert!(is_agent_chain_rule(&keep("10.0.0.0/8")));
    assert!(is_agent_chain_rule(&format!(
        "-A IP-MASQ-AGENT {MASQ} --random-fully"
    )));
    assert!(!is_agent_chain_rule("-A IP-MASQ-AGENT -j RETURN"));
    assert!(!is_agent_chain_rule(&format!(
        "-A IP-MASQ-AGENT -m comment --comment \"x\" {KEEP}"
    )));
    assert!(!is_agent_chain_rule(
        "-A IP-MASQ-AGENT -m comment --comment \"ip-masq-agent: local traffic\" -j RETURN"
    ));
    assert_eq!(
        saved_words("-A X -m comment --comment \"\\\"a b\\\"\" -j Y"),
        vec![
            "-A",
            "X",
            "-m",
            "comment",
            "--comment",
            "\"a b\"",
            "-j",
            "Y"
        ]
    );
}

const SNAT: &str = "-m comment --comment \"ip-masq-agent: outbound traffic is subject to SNAT (must be last in chain)\" -j SNAT --to-source";

/// Issue 17 golden: outputInterface repeats the masquerade rules per interface with
/// `-o`, as iptables-save prints them; nothing else of upstream's layout changes.
#[test]
fn output_interfaces_render_one_masquerade_block_per_interface() {
    let mut case =
        Case::new("nonMasqueradeCIDRs: [10.0.0.0/8]\noutputInterface: [eth0, 'bond+']\n");
    case.settings.masquerade.to_ports = "1024-29999,32768-65535".parse::<ToPorts>().unwrap();
    let p = "-m statistic --mode random --probability 0.469292562840114";
    let block = |out: &str| {
        let mut rules = Vec::new();
        for protocol in ["tcp", "udp", "sctp"] {
            rules.push(format!(
                "-A IP-MASQ-AGENT -o {out} -p {protocol} {} {p} -j MASQUERADE --to-ports 1024-29999 --random-fully",
                MASQ.trim_end_matches(" -j MASQUERADE")
            ));
            rules.push(format!(
                "-A IP-MASQ-AGENT -o {out} -p {protocol} {} -j MASQUERADE --to-ports 32768-65535 --random-fully",
                MASQ.trim_end_matches(" -j MASQUERADE")
            ));
        }
        rules.push(format!("-A IP-MASQ-AGENT -o {out} {MASQ} --random-fully"));
        rules
    };
    let mut expected = vec![keep("169.254.0.0/16"), keep("10.0.0.0/8")];
    expected.extend(block("eth0"));
    expected.extend(block("bond+"));
    assert_eq!(case.rules(Family::V4), expected);
    // An empty list: the kept ranges return, and nothing is masqueraded.
    let none = Case::new("nonMasqueradeCIDRs: [10.0.0.0/8]\noutputInterface: []\n");
    assert_eq!(
        none.rules(Family::V4),
        vec![keep("169.254.0.0/16"), keep("10.0.0.0/8")]
    );
}

/// Issue 17 golden: outputAddress(IPv6) turns MASQUERADE into SNAT to it, with
/// `--to-ports` as the port range and `--random-fully` as for MASQUERADE; IPv6 with ports
/// is bracketed as iptables-save prints it.
#[test]
fn output_addresses_render_snat_as_iptables_save_prints_it() {
    let mut case = Case::new(
        "nonMasqueradeCIDRs: []\noutputInterface: eth1\noutputAddress: 192.0.2.10-192.0.2.12\noutputAddressIPv6: '2001:db8::10'\n",
    )
    .ipv6();
    assert_eq!(
        case.rules(Family::V4),
        vec![
            keep("169.254.0.0/16"),
            format!("-A IP-MASQ-AGENT -o eth1 {SNAT} 192.0.2.10-192.0.2.12 --random-fully"),
        ]
    );
    case.settings.masquerade.to_ports = "1024-29999".parse::<ToPorts>().unwrap();
    case.settings.masquerade.random_fully = false;
    let v6 = case.rules(Family::V6);
    assert_eq!(
        v6[1],
        format!(
            "-A IP-MASQ-AGENT -o eth1 -p tcp {} -j SNAT --to-source [2001:db8::10]:1024-29999",
            SNAT.trim_end_matches(" -j SNAT --to-source")
        )
    );
    assert_eq!(
        v6[4],
        format!("-A IP-MASQ-AGENT -o eth1 {SNAT} 2001:db8::10")
    );
    // The SNAT rules are the agent's own: a chain of them is removed, never refused.
    assert!(v6.iter().all(|rule| is_agent_chain_rule(rule)), "{v6:#?}");
}

/// Without the new keys, the layout is upstream's byte for byte (the goldens above
/// render no `-o` and no SNAT).
#[test]
fn without_the_egress_keys_no_rule_names_an_interface_or_snat() {
    for yaml in [
        "",
        "nonMasqueradeCIDRs: [10.0.0.0/8]\n",
        "outputInterface: ''\n",
    ] {
        for rule in Case::new(yaml).ipv6().rules(Family::V4) {
            assert!(!rule.contains(" -o ") && !rule.contains("SNAT"), "{rule}");
        }
    }
}

/// What a sync replaced is read back only from the plain shape every release writes.
#[test]
fn replaced_decisions_are_read_back_from_the_plain_shape_only() {
    let chain = ChainName::default();
    let jump = format!("-A POSTROUTING {}", jump_spec_for(&chain));
    let keep = "-A IP-MASQ-AGENT -d 10.0.0.0/8 -m comment --comment \"ip-masq-agent: local traffic is not subject to MASQUERADE\" -j RETURN";
    let masq = "-A IP-MASQ-AGENT -m comment --comment \"ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)\" -j MASQUERADE";
    let table = |rules: &[&str]| {
        let mut text = String::from("*nat\n:POSTROUTING ACCEPT [0:0]\n:IP-MASQ-AGENT - [0:0]\n");
        for rule in rules {
            text.push_str(rule);
            text.push('\n');
        }
        text.push_str("COMMIT\n");
        text
    };
    assert_eq!(
        replaced_decisions(&table(&[&jump, keep, masq]), &chain),
        Some(ReplacedDecisions {
            keep: vec!["10.0.0.0/8".parse().unwrap()],
            masquerades: true,
        })
    );
    // No jump: the chain decided nothing; nothing was masqueraded.
    assert_eq!(
        replaced_decisions(&table(&[keep, masq]), &chain),
        Some(ReplacedDecisions::default())
    );
    // A source scope or anything after the MASQUERADE: not guessed.
    let scoped = "-A IP-MASQ-AGENT ! -s 10.244.0.0/16 -m comment --comment \"ip-masq-agent: traffic from outside masqueradeSourceCIDRs is not subject to MASQUERADE\" -j RETURN";
    assert_eq!(
        replaced_decisions(&table(&[&jump, scoped, keep, masq]), &chain),
        None
    );
    assert_eq!(
        replaced_decisions(&table(&[&jump, masq, keep]), &chain),
        None
    );
}
