use super::*;
use crate::config::{ParseOptions, parse};
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
        )
    }
}

fn keep(prefix: &str) -> String {
    format!("-A IP-MASQ-AGENT -d {prefix} {KEEP}")
}

#[test]
fn default_payload_is_upstreams_layout() {
    let backend = IptablesBackend::for_rendering(ChainName::default());
    let policy = Case::new("").policy();
    let expected = format!(
        "# iptables-restore --noflush (IPv4)\n*nat\n:IP-MASQ-AGENT - [0:0]\n{JUMP}\n{}\n{}\n{}\n{}\n-A IP-MASQ-AGENT {MASQ} --random-fully\nCOMMIT\n",
        keep("169.254.0.0/16"),
        keep("10.0.0.0/8"),
        keep("172.16.0.0/12"),
        keep("192.168.0.0/16"),
    );
    assert_eq!(backend.render(&policy), expected);
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
    let rendered = IptablesBackend::for_rendering(ChainName::default()).render(&case.policy());
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

    let mut old_iptables = IptablesBackend::for_rendering(ChainName::default());
    old_iptables.random_fully_supported = Some(false);
    let rendered = old_iptables.render(&Case::new("").policy());
    assert!(!rendered.contains("--random-fully"), "{rendered}");
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
    let backend = IptablesBackend::for_rendering(chain);
    let rendered = backend.render(&Case::new("nonMasqueradeCIDRs: []\n").policy());
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

#[test]
fn flavour_follows_the_iptables_wrapper_rule() {
    let hint = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
    let canary = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";
    let busy = "*nat\n-A POSTROUTING -j A\n-A POSTROUTING -j B\nCOMMIT\n";
    assert_eq!(choose_flavour(hint, busy), Flavour::Nft);
    assert_eq!(choose_flavour("", hint), Flavour::Legacy);
    assert_eq!(choose_flavour(busy, canary), Flavour::Legacy);
    assert_eq!(choose_flavour(hint, hint), Flavour::Nft);
    assert_eq!(choose_flavour("", busy), Flavour::Legacy);
    assert_eq!(choose_flavour(busy, busy), Flavour::Nft);
    assert_eq!(choose_flavour("", ""), Flavour::Nft);
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
        "*nat\n:POSTROUTING ACCEPT [0:0]\n:IP-MASQ-AGENT - [0:0]\n-A POSTROUTING -j KUBE-POSTROUTING\n{OLD_QUOTED_JUMP}\n{JUMP}\n-A IP-MASQ-AGENT -j MASQUERADE\nCOMMIT\n"
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
        "*nat\n:IP-MASQ-AGENT - [0:0]\n{JUMP}\n-A POSTROUTING -o eth9 -j IP-MASQ-AGENT\n-A IP-MASQ-AGENT -j MASQUERADE\nCOMMIT\n"
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
        "*nat\n:OLD-MASQ - [0:0]\n:IP-MASQ-AGENT - [0:0]\n{old}\n{JUMP}\n-A OLD-MASQ -j MASQUERADE\nCOMMIT\n"
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
fn saved_form_rounds_probabilities_like_iptables_save() {
    let rule = "-A IP-MASQ-AGENT -p tcp -m statistic --mode random --probability 0.469292562840114 -j MASQUERADE --to-ports 1024-29999";
    assert_eq!(
        as_saved(rule),
        "-A IP-MASQ-AGENT -p tcp -m statistic --mode random --probability 0.46929256284 -j MASQUERADE --to-ports 1024-29999"
    );
    assert_eq!(
        as_saved("-A X --probability 0.5"),
        "-A X --probability 0.50000000000"
    );
    assert_eq!(as_saved(JUMP), JUMP);
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
