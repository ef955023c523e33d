use super::*;

fn opts() -> ParseOptions {
    ParseOptions::default()
}

fn v6() -> ParseOptions {
    ParseOptions {
        enable_ipv6: true,
        ..ParseOptions::default()
    }
}

fn parse_ok(text: &str, options: ParseOptions) -> LoadedConfig {
    parse(text, Path::new("/etc/config/ip-masq-agent"), options)
        .unwrap_or_else(|e| panic!("{text:?} rejected: {e}"))
}

fn parse_err(text: &str, options: ParseOptions) -> String {
    parse(text, Path::new("/etc/config/ip-masq-agent"), options)
        .expect_err(text)
        .to_string()
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn defaults_match_upstream() {
    let c = Config::defaults(opts());
    assert_eq!(
        c.non_masquerade_cidrs,
        nets(&["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"])
    );
    assert_eq!(c.cidr_limit, 64);
    assert!(!c.masq_link_local);
    assert!(!c.masq_link_local_ipv6);
    assert_eq!(c.resync_interval, Duration::from_secs(60));
}

#[test]
fn reserved_ranges_follow_rfc1918_in_upstream_order() {
    let c = Config::defaults(ParseOptions {
        nomasq_all_reserved_ranges: true,
        ..opts()
    });
    assert_eq!(
        c.non_masquerade_cidrs,
        nets(&[
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
        ])
    );
}

#[test]
fn empty_file_means_defaults() {
    assert_eq!(parse_ok("", opts()).config, Config::defaults(opts()));
    assert_eq!(
        parse_ok("# only a comment\n", opts()).config,
        Config::defaults(opts())
    );
}

#[test]
fn yaml_keys_override_and_absent_keys_keep_defaults() {
    let c = parse_ok(
        "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 100.64.0.0/10\nmasqLinkLocal: true\nresyncInterval: 1m30s\n",
        opts(),
    )
    .config;
    assert_eq!(
        c.non_masquerade_cidrs,
        nets(&["10.0.0.0/8", "100.64.0.0/10"])
    );
    assert!(c.masq_link_local);
    assert!(!c.masq_link_local_ipv6);
    assert_eq!(c.cidr_limit, 64);
    assert_eq!(c.resync_interval, Duration::from_secs(90));
}

#[test]
fn json_config_is_read_like_upstream() {
    let c = parse_ok(
        r#"{"nonMasqueradeCIDRs": ["192.168.0.0/16"], "cidrLimit": 3, "masqLinkLocalIPv6": true, "resyncInterval": "500ms"}"#,
        opts(),
    )
    .config;
    assert_eq!(c.non_masquerade_cidrs, nets(&["192.168.0.0/16"]));
    assert_eq!(c.cidr_limit, 3);
    assert!(c.masq_link_local_ipv6);
    assert_eq!(c.resync_interval, Duration::from_millis(500));
}

#[test]
fn explicit_empty_list_means_no_cidrs() {
    assert!(
        parse_ok("nonMasqueradeCIDRs: []\n", opts())
            .config
            .non_masquerade_cidrs
            .is_empty()
    );
    // Go's encoding/json sets a slice to nil on null.
    assert!(
        parse_ok("nonMasqueradeCIDRs:\n", opts())
            .config
            .non_masquerade_cidrs
            .is_empty()
    );
    assert!(
        parse_ok(r#"{"nonMasqueradeCIDRs": []}"#, opts())
            .config
            .non_masquerade_cidrs
            .is_empty()
    );
}

#[test]
fn null_scalars_keep_defaults() {
    // resyncInterval is left out: upstream rejects a null duration (see
    // regression_null_resync_interval_is_rejected_like_upstream).
    let c = parse_ok("masqLinkLocal:\ncidrLimit: ~\n", opts()).config;
    assert_eq!(c, Config::defaults(opts()));
}

#[test]
fn keys_match_case_insensitively() {
    let c = parse_ok(
        "NonMasqueradeCidrs: [10.1.0.0/16]\nMASQLINKLOCAL: true\nResyncinterval: 5s\ncidrlimit: 2\n",
        opts(),
    )
    .config;
    assert_eq!(c.non_masquerade_cidrs, nets(&["10.1.0.0/16"]));
    assert!(c.masq_link_local);
    assert_eq!(c.resync_interval, Duration::from_secs(5));
    assert_eq!(c.cidr_limit, 2);
}

#[test]
fn later_duplicate_key_wins_like_go() {
    let c = parse_ok("masqLinkLocal: true\nmasqlinklocal: false\n", opts()).config;
    assert!(!c.masq_link_local);
}

#[test]
fn yaml_1_1_booleans_are_accepted() {
    for (text, want) in [
        ("yes", true),
        ("no", false),
        ("on", true),
        ("off", false),
        ("True", true),
    ] {
        let c = parse_ok(&format!("masqLinkLocal: {text}\n"), opts()).config;
        assert_eq!(c.masq_link_local, want, "{text}");
    }
}

#[test]
fn duplicate_cidrs_are_kept_in_order() {
    let c = parse_ok(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16, 10.0.0.0/8]\n",
        opts(),
    )
    .config;
    assert_eq!(
        c.non_masquerade_cidrs,
        nets(&["10.0.0.0/8", "192.168.0.0/16", "10.0.0.0/8"])
    );
}

#[test]
fn unknown_key_warns_with_the_closest_known_key() {
    let loaded = parse_ok("nonMasqueradeCIDR:\n  - 10.0.0.0/8\n", opts());
    assert_eq!(loaded.config, Config::defaults(opts()));
    assert_eq!(loaded.warnings.len(), 1);
    let w = &loaded.warnings[0];
    assert!(w.starts_with("/etc/config/ip-masq-agent:1:1: "), "{w}");
    assert!(w.contains("\"nonMasqueradeCIDR\""), "{w}");
    assert!(w.contains("did you mean \"nonMasqueradeCIDRs\"?"), "{w}");
    let w = &parse_ok("resync: 5s\n", opts()).warnings[0];
    assert!(w.contains("did you mean \"resyncInterval\"?"), "{w}");
}

#[test]
fn ipv6_cidrs_are_accepted_with_enable_ipv6() {
    let c = parse_ok("nonMasqueradeCIDRs: [10.0.0.0/8, 'fd00::/8']\n", v6()).config;
    assert_eq!(c.non_masquerade_cidrs, nets(&["10.0.0.0/8", "fd00::/8"]));
}

#[test]
fn rejects_unparsable_cidr_with_upstream_text_and_position() {
    let e = parse_err(
        "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 10.0.0.0/33\n",
        opts(),
    );
    assert_eq!(
        e,
        "/etc/config/ip-masq-agent:3:5: nonMasqueradeCIDRs[1]: CIDR \"10.0.0.0/33\" could not be parsed, invalid CIDR address: 10.0.0.0/33"
    );
    for bad in [
        "not-a-cidr",
        "10.0.0.0",
        " 10.0.0.0/8",
        "10.0.0.0/8 ",
        "010.0.0.0/8",
        "10.0.0.0/-1",
        "fe80::%eth0/64",
    ] {
        let e = parse_err(&format!("nonMasqueradeCIDRs: [{bad:?}]\n"), v6());
        assert!(
            e.contains("could not be parsed, invalid CIDR address"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn rejects_host_bits_with_upstream_text() {
    let e = parse_err("nonMasqueradeCIDRs: [10.0.0.1/8]\n", opts());
    assert_eq!(
        e,
        "/etc/config/ip-masq-agent:1:22: nonMasqueradeCIDRs[0]: CIDR \"10.0.0.1/8\" is not aligned to a CIDR block, ip: \"10.0.0.1\" network: \"10.0.0.0/8\""
    );
    let e = parse_err("nonMasqueradeCIDRs: ['fd00::1/8']\n", v6());
    assert!(e.ends_with("CIDR \"fd00::1/8\" is not aligned to a CIDR block, ip: \"fd00::1\" network: \"fd00::/8\""), "{e}");
}

#[test]
fn rejects_more_cidrs_than_the_limit() {
    let e = parse_err(
        "cidrLimit: 2\nnonMasqueradeCIDRs: [10.0.0.0/8, 10.1.0.0/16, 10.2.0.0/16]\n",
        opts(),
    );
    assert_eq!(
        e,
        "/etc/config/ip-masq-agent:2:21: nonMasqueradeCIDRs: the daemon can only accept up to 2 CIDRs (excluding link-local), but got 3 CIDRs (excluding link local)"
    );
    // The defaults count too when only the limit is lowered.
    let e = parse_err("cidrLimit: 1\n", opts());
    assert!(
        e.contains("up to 1 CIDRs (excluding link-local), but got 3"),
        "{e}"
    );
}

#[test]
fn rejects_ipv6_without_enable_ipv6() {
    let e = parse_err("nonMasqueradeCIDRs: ['fd00::/8']\n", opts());
    assert!(
        e.ends_with("ipv6 is not enabled, but ipv6 cidr fd00::/8 provided. Enable ipv6 using --enable-ipv6 agent flag"),
        "{e}"
    );
}

#[test]
fn rejects_ipv4_mapped_ipv6() {
    let e = parse_err("nonMasqueradeCIDRs: ['::ffff:10.0.0.0/104']\n", v6());
    assert!(e.contains("IPv4-mapped IPv6 prefix"), "{e}");
    assert!(e.contains("10.0.0.0/8"), "{e}");
}

#[test]
fn rejects_bad_resync_intervals() {
    for (text, want) in [
        ("0s", "must be a positive duration"),
        ("0", "must be a positive duration"),
        ("-5s", "must be a positive duration"),
        ("5", "time: missing unit in duration \"5\""),
        ("1d", "time: unknown unit \"d\" in duration \"1d\""),
    ] {
        let e = parse_err(&format!("resyncInterval: {text:?}\n"), opts());
        assert!(
            e.starts_with("/etc/config/ip-masq-agent:1:17: resyncInterval: "),
            "{e}"
        );
        assert!(e.contains(want), "{text}: {e}");
    }
    let e = parse_err("resyncInterval: 60\n", opts());
    assert!(e.contains("expected a duration string"), "{e}");
    assert!(e.contains("got number 60"), "{e}");
}

#[test]
fn rejects_wrong_types() {
    let cases = [
        (
            "nonMasqueradeCIDRs: 10.0.0.0/8\n",
            "nonMasqueradeCIDRs: expected a list of CIDR strings",
        ),
        (
            "nonMasqueradeCIDRs: [10]\n",
            "nonMasqueradeCIDRs[0]: expected a CIDR string",
        ),
        (
            "masqLinkLocal: maybe\n",
            "masqLinkLocal: expected a boolean",
        ),
        (
            "masqLinkLocalIPv6: 1\n",
            "masqLinkLocalIPv6: expected a boolean",
        ),
        ("cidrLimit: many\n", "cidrLimit: expected a whole number"),
        ("cidrLimit: 1.5\n", "cidrLimit: expected a whole number"),
        (
            "cidrLimit: -1\n",
            "cidrLimit: must be a whole number from 0 up",
        ),
        ("- 10.0.0.0/8\n", "expected a mapping of config keys"),
    ];
    for (text, want) in cases {
        let e = parse_err(text, opts());
        assert!(e.contains(want), "{text:?}: {e}");
        assert!(
            e.starts_with("/etc/config/ip-masq-agent:1:"),
            "{text:?}: {e}"
        );
    }
}

#[test]
fn rejects_syntax_errors_with_position() {
    let e = parse_err(
        "nonMasqueradeCIDRs: [10.0.0.0/8\nmasqLinkLocal: true\n",
        opts(),
    );
    assert!(e.contains("not valid YAML or JSON"), "{e}");
    assert!(e.starts_with("/etc/config/ip-masq-agent:"), "{e}");
    let e = parse_err("{\"masqLinkLocal\": true,}\n", opts());
    assert!(
        e.starts_with("/etc/config/ip-masq-agent:1:24: not valid YAML or JSON"),
        "{e}"
    );
    let e = parse_err("{\"masqLinkLocal\": true} extra\n", opts());
    assert!(e.contains("trailing characters"), "{e}");
}

#[test]
fn missing_file_means_defaults() {
    let dir = std::env::temp_dir().join(format!("ima-missing-{}", std::process::id()));
    let loaded = load(&dir.join("nope"), opts()).unwrap();
    assert_eq!(loaded.config, Config::defaults(opts()));
    assert!(matches!(loaded.source, ConfigSource::Missing(_)));
}

#[test]
fn directory_and_binary_files_are_rejected() {
    let dir = std::env::temp_dir().join(format!("ima-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = load(&dir, opts()).unwrap_err().to_string();
    assert!(e.contains("is a directory"), "{e}");
    let bin = dir.join("binary");
    std::fs::write(&bin, [0x7f, b'E', b'L', b'F', 0xff, 0xfe, 0]).unwrap();
    let e = load(&bin, opts()).unwrap_err().to_string();
    assert!(e.contains("not UTF-8"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Dir {
        let path = std::env::temp_dir().join(format!("ima-cfgdir-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Dir(path)
    }
    fn write(&self, name: &str, text: &str) -> &Dir {
        std::fs::write(self.0.join(name), text).unwrap();
        self
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn config_dir_merges_ip_masq_files_in_name_order() {
    let dir = Dir::new("merge");
    dir.write(
        "ip-masq-b",
        "nonMasqueradeCIDRs: [192.168.0.0/16, 10.0.0.0/8]\nresyncInterval: 30s\n",
    )
    .write(
        "ip-masq-agent",
        "nonMasqueradeCIDRs: [10.0.0.0/8, 100.64.0.0/10]\nmasqLinkLocal: true\n",
    )
    .write("other", "nonMasqueradeCIDRs: [1.0.0.0/8]\n")
    .write("ip-masq-c", "cidrLimit: 100\nresyncInterval: 1m\n");
    let loaded = load_dir(&dir.0, opts()).unwrap();
    assert_eq!(
        loaded.config.non_masquerade_cidrs,
        nets(&["10.0.0.0/8", "100.64.0.0/10", "192.168.0.0/16"])
    );
    assert!(loaded.config.masq_link_local);
    assert!(!loaded.config.masq_link_local_ipv6);
    assert_eq!(loaded.config.cidr_limit, 100);
    assert_eq!(loaded.config.resync_interval, Duration::from_secs(30));
    assert!(matches!(&loaded.source, ConfigSource::Dir(_, files) if files.len() == 3));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn config_dir_warns_about_conflicts_naming_both_files() {
    let dir = Dir::new("conflict");
    dir.write(
        "ip-masq-a",
        "nonMasqueradeCIDRs: [10.0.0.0/8]\nmasqLinkLocal: false\n",
    )
    .write(
        "ip-masq-b",
        "nonMasqueradeCIDRs: [10.1.0.0/16]\nmasqLinkLocal: true\n",
    );
    let loaded = load_dir(&dir.0, opts()).unwrap();
    assert!(loaded.config.masq_link_local, "booleans are OR-ed");
    let joined = loaded.warnings.join("\n");
    assert!(
        joined.contains("ip-masq-b lists 10.1.0.0/16, which is inside 10.0.0.0/8 from"),
        "{joined}"
    );
    assert!(joined.contains("masqLinkLocal is false in"), "{joined}");
    assert!(
        joined.contains("ip-masq-a") && joined.contains("ip-masq-b"),
        "{joined}"
    );
}

#[test]
fn config_dir_rejects_the_whole_set_for_one_bad_file() {
    let dir = Dir::new("bad");
    dir.write("ip-masq-a", "nonMasqueradeCIDRs: [10.0.0.0/8]\n")
        .write("ip-masq-b", "nonMasqueradeCIDRs: [10.0.0.1/8]\n");
    let e = load_dir(&dir.0, opts()).unwrap_err().to_string();
    assert!(e.contains("ip-masq-b:1:22: nonMasqueradeCIDRs[0]"), "{e}");
}

#[test]
fn config_dir_without_files_means_defaults() {
    let dir = Dir::new("empty");
    dir.write("unrelated", "x: 1\n");
    let loaded = load_dir(&dir.0, opts()).unwrap();
    assert_eq!(loaded.config, Config::defaults(opts()));
    assert!(matches!(loaded.source, ConfigSource::Missing(_)));
}

#[test]
fn config_dir_limit_applies_to_the_union() {
    let dir = Dir::new("limit");
    dir.write(
        "ip-masq-a",
        "cidrLimit: 2\nnonMasqueradeCIDRs: [10.0.0.0/8, 10.1.0.0/16]\n",
    )
    .write("ip-masq-b", "nonMasqueradeCIDRs: [192.168.0.0/16]\n");
    let e = load_dir(&dir.0, opts()).unwrap_err().to_string();
    assert!(
        e.contains("up to 2 CIDRs (excluding link-local), but got 3"),
        "{e}"
    );
}

#[test]
fn fifo_and_oversized_files_are_refused_without_blocking() {
    let dir = Dir::new("special");
    let fifo = dir.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let e = load(&fifo, opts()).unwrap_err().to_string();
    assert!(e.contains("is not a regular file"), "{e}");
    let big = dir.0.join("big");
    let file = std::fs::File::create(&big).unwrap();
    file.set_len(MAX_CONFIG_BYTES + 1).unwrap();
    let e = load(&big, opts()).unwrap_err().to_string();
    assert!(e.contains("larger than the 4194304 bytes"), "{e}");
    let looped = dir.0.join("loop");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    let e = load(&looped, opts()).unwrap_err().to_string();
    assert!(
        e.contains("cannot read config file") && e.contains("symbolic links"),
        "{e}"
    );
}

// Defect 9: memory bound on hostile YAML.

/// The nested-alias file of the report: nine levels, each a list of nine aliases of the
/// level below (9^9 values once expanded, from about 300 bytes).
fn billion_laughs() -> String {
    let mut text = format!("a: &a [{}]\n", ["x"; 9].join(","));
    let levels = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for pair in levels.windows(2) {
        let alias = format!("*{}", pair[0]);
        text.push_str(&format!(
            "{}: &{} [{}]\n",
            pair[1],
            pair[1],
            [alias.as_str(); 9].join(",")
        ));
    }
    text
}

fn assert_refused_for_memory(text: &str) {
    let e = parse_err(text, opts());
    assert!(
        e.starts_with("/etc/config/ip-masq-agent:") && e.contains("not valid YAML or JSON: "),
        "{e}"
    );
    assert!(
        e.contains("the agent refuses it to bound its memory"),
        "{e}"
    );
    let position = e
        .trim_start_matches("/etc/config/ip-masq-agent:")
        .split(": ")
        .next()
        .unwrap_or_default();
    assert!(
        position.split(':').all(|n| n.parse::<u64>().is_ok()) && position.contains(':'),
        "no line:column in {e}"
    );
}

#[test]
fn regression_alias_bombs_are_refused_before_they_grow() {
    assert_refused_for_memory(&billion_laughs());
    // Two levels, wide.
    let wide = format!(
        "a: &a [{}]\nb: &b [{}]\nc: [{}]\n",
        vec!["x"; 1000].join(","),
        vec!["*a"; 1000].join(","),
        vec!["*b"; 1000].join(",")
    );
    assert_refused_for_memory(&wide);
    // One long scalar replayed many times: bounded by the text budget.
    let long_scalar = format!(
        "a: &a {}\nb: [{}]\n",
        "x".repeat(64 * 1024),
        vec!["*a"; 1000].join(",")
    );
    let e = parse_err(&long_scalar, opts());
    assert!(
        e.contains("bytes of text (each alias expansion counted again)"),
        "{e}"
    );
    assert_refused_for_memory(&long_scalar);
    // Merge keys replaying a large mapping.
    let keys: Vec<String> = (0..1000).map(|i| format!("k{i}: v")).collect();
    let merges = format!(
        "a: &a {{{}}}\nb: [{}]\n",
        keys.join(","),
        vec!["{<<: *a}"; 1000].join(",")
    );
    assert_refused_for_memory(&merges);
    // Anchors nesting anchors: each level keeps a copy of the one below.
    let mut nested = format!("l0: &l0 [{}]\n", vec!["x"; 100].join(","));
    for level in 1..40 {
        let below = level - 1;
        nested.push_str(&format!("l{level}: &l{level} [*l{below}, *l{below}]\n"));
    }
    assert_refused_for_memory(&nested);
}

#[test]
fn regression_deep_nesting_is_refused_without_exhausting_the_stack() {
    let depth = 100_000;
    for text in [
        format!("{}{}\n", "[".repeat(depth), "]".repeat(depth)),
        format!("k: {}{}\n", "[".repeat(depth), "]".repeat(depth)),
        format!("{}1{}\n", "{\"a\":".repeat(depth), "}".repeat(depth)),
        format!("k: {}x{}\n", "{a: ".repeat(depth), "}".repeat(depth)),
        (0..2_000)
            .map(|i| format!("{}-\n", " ".repeat(i)))
            .collect(),
    ] {
        let e = parse_err(&text, opts());
        assert!(e.contains("not valid YAML or JSON"), "{e}");
        assert!(
            e.starts_with("/etc/config/ip-masq-agent:1:") || e.contains("nested more than 32 deep"),
            "{e}"
        );
    }
}

#[test]
fn regression_value_bound_refuses_huge_documents_and_keeps_large_configs() {
    let too_many = format!(
        "k: [{}]\n",
        vec!["x"; document::MAX_DOCUMENT_VALUES].join(",")
    );
    let e = parse_err(&too_many, opts());
    assert!(
        e.contains("the document holds more than 100000 values (lists, mappings and scalars, each alias expansion counted again); the agent refuses it to bound its memory"),
        "{e}"
    );
    assert!(e.starts_with("/etc/config/ip-masq-agent:1:"), "{e}");

    // The largest list in use (50,000 CIDRs) still loads.
    let mut large = String::from("cidrLimit: 50000\nnonMasqueradeCIDRs:\n");
    for i in 0..50_000u32 {
        let base = 0x0B00_0000u32 + (i << 9);
        large.push_str(&format!(
            "  - {}.{}.{}.0/24\n",
            base >> 24,
            (base >> 16) & 0xFF,
            (base >> 8) & 0xFF
        ));
    }
    assert_eq!(
        parse_ok(&large, opts()).config.non_masquerade_cidrs.len(),
        50_000
    );

    // Modest anchors and aliases are still fine.
    let c = parse_ok(
        "common: &common [10.0.0.0/8, 192.168.0.0/16]\nnonMasqueradeCIDRs: *common\n",
        opts(),
    )
    .config;
    assert_eq!(
        c.non_masquerade_cidrs,
        nets(&["10.0.0.0/8", "192.168.0.0/16"])
    );
}

// Defect 10: upstream parity.

#[test]
fn regression_only_the_first_document_is_read() {
    // A trailing `---` is an empty second document: upstream never reads it.
    let c = parse_ok("masqLinkLocal: true\n---\n", opts()).config;
    assert!(c.masq_link_local);
    // A second document, even a broken one, is not looked at.
    let c = parse_ok(
        "masqLinkLocal: true\n---\nmasqLinkLocal: false\ncidrLimit: [\n",
        opts(),
    )
    .config;
    assert!(c.masq_link_local);
    assert_eq!(c.cidr_limit, 64);
    // A leading `---` (and a directive before it) still starts the first document.
    assert!(
        parse_ok("---\nmasqLinkLocal: true\n", opts())
            .config
            .masq_link_local
    );
    assert!(
        parse_ok("%YAML 1.1\n---\nmasqLinkLocal: true\n...\n", opts())
            .config
            .masq_link_local
    );
    // An empty first document means the defaults, as upstream.
    assert_eq!(
        parse_ok("---\n---\nmasqLinkLocal: true\n", opts()).config,
        Config::defaults(opts())
    );
    // A syntax error inside the first document is still one.
    let e = parse_err("masqLinkLocal: true\n]\n---\n", opts());
    assert!(
        e.starts_with("/etc/config/ip-masq-agent:2:1: not valid YAML or JSON"),
        "{e}"
    );
}

#[test]
fn regression_cidr_limit_integers_follow_yaml_1_1() {
    for (text, want) in [
        ("010", 8),
        ("+010", 8),
        ("0o10", 8),
        ("0x10", 16),
        ("0X1f", 31),
        ("0b1010", 10),
        ("1_000", 1000),
        ("0x_10", 16),
        ("10", 10),
        // go-yaml v2 reads these as floats (08 is no octal number); JSON carries them as
        // whole numbers into upstream's int.
        ("08", 8),
        ("019", 19),
        ("1e3", 1000),
        ("100.0", 100),
    ] {
        let c = parse_ok(
            &format!("cidrLimit: {text}\nnonMasqueradeCIDRs: []\n"),
            opts(),
        )
        .config;
        assert_eq!(c.cidr_limit, want, "cidrLimit: {text}");
    }
    // A quoted number is a string, which upstream's int refuses.
    let e = parse_err("cidrLimit: '010'\n", opts());
    assert!(
        e.contains("cidrLimit: expected a whole number, got string \"010\""),
        "{e}"
    );
    // Spellings go-yaml would strip to a number are refused, never read as something else.
    for text in ["1__0", "1_"] {
        let e = parse_err(&format!("cidrLimit: {text}\n"), opts());
        assert!(
            e.contains("cidrLimit: expected a whole number, got string"),
            "{text}: {e}"
        );
    }
    let e = parse_err("cidrLimit: 0x8000000000000000\n", opts());
    assert!(e.contains("must be at most 9223372036854775807"), "{e}");
    // YAML 1.1 booleans are unaffected.
    for (text, want) in [("yes", true), ("y", true), ("off", false), ("N", false)] {
        let c = parse_ok(&format!("masqLinkLocal: {text}\n"), opts()).config;
        assert_eq!(c.masq_link_local, want, "{text}");
    }
}

#[test]
fn regression_null_resync_interval_is_rejected_like_upstream() {
    for text in [
        "resyncInterval:\n",
        "resyncInterval: ~\n",
        "resyncInterval: null\n",
        "{\"resyncInterval\": null}",
    ] {
        let e = parse_err(text, opts());
        assert!(
            e.starts_with("/etc/config/ip-masq-agent:1:"),
            "{text:?}: {e}"
        );
        assert!(
            e.contains(
                "resyncInterval: expected a duration string such as \"60s\" or \"1m30s\", got null"
            ),
            "{text:?}: {e}"
        );
    }
}

#[test]
fn regression_resync_interval_below_100ms_is_raised_with_a_warning() {
    for text in ["1ns", "99ms", "0.05s"] {
        let loaded = parse_ok(&format!("resyncInterval: {text}\n"), opts());
        assert_eq!(
            loaded.config.resync_interval,
            Duration::from_millis(100),
            "{text}"
        );
        assert_eq!(loaded.warnings.len(), 1, "{text}");
        let w = &loaded.warnings[0];
        assert!(
            w.starts_with(&format!(
                "/etc/config/ip-masq-agent:1:17: resyncInterval \"{text}\" is shorter than 100ms; using 100ms"
            )),
            "{w}"
        );
    }
    let loaded = parse_ok("resyncInterval: 100ms\n", opts());
    assert_eq!(loaded.config.resync_interval, Duration::from_millis(100));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    // Zero and negative stay errors.
    for text in ["0s", "-1ns"] {
        let e = parse_err(&format!("resyncInterval: {text}\n"), opts());
        assert!(e.contains("must be a positive duration"), "{e}");
    }
    // --config-dir takes the shortest interval, which is never below the floor either.
    let dir = Dir::new("floor");
    dir.write("ip-masq-a", "resyncInterval: 1ns\n")
        .write("ip-masq-b", "resyncInterval: 30s\n");
    let loaded = load_dir(&dir.0, opts()).unwrap();
    assert_eq!(loaded.config.resync_interval, Duration::from_millis(100));
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("ip-masq-a:1:17: resyncInterval")),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn force_and_source_keys_parse_like_the_other_lists() {
    let loaded = parse_ok(
        "NONMASQUERADECIDRS: [10.0.0.0/8]\nforcemasqueradecidrs: [10.3.0.0/16, 'fd00:3::/32']\nmasqueradeSourceCIDRs: [10.244.0.0/16]\n",
        v6(),
    );
    assert_eq!(
        loaded.config.force_masquerade_cidrs,
        nets(&["10.3.0.0/16", "fd00:3::/32"])
    );
    assert_eq!(
        loaded.config.masquerade_source_cidrs,
        Some(nets(&["10.244.0.0/16"]))
    );
    // Absent keys: today's behaviour exactly.
    let plain = parse_ok("nonMasqueradeCIDRs: [10.0.0.0/8]\n", opts()).config;
    assert!(plain.force_masquerade_cidrs.is_empty());
    assert_eq!(plain.masquerade_source_cidrs, None);
    // The same validation as nonMasqueradeCIDRs.
    let err = parse_err("forceMasqueradeCIDRs: ['fd00::/8']\n", opts());
    assert!(
        err.contains("forceMasqueradeCIDRs[0]: ipv6 is not enabled"),
        "{err}"
    );
    let err = parse_err("masqueradeSourceCIDRs: ['::ffff:10.0.0.0/104']\n", v6());
    assert!(err.contains("IPv4-mapped"), "{err}");
    let err = parse_err("forceMasqueradeCIDRs: [10.0.0.1/8]\n", opts());
    assert!(
        err.contains("1:24: forceMasqueradeCIDRs[0]: CIDR \"10.0.0.1/8\" is not aligned"),
        "{err}"
    );
    let err = parse_err("masqueradeSourceCIDRs: 10.0.0.0/8\n", opts());
    assert!(err.contains("expected a list of CIDR strings"), "{err}");
}

#[test]
fn the_same_prefix_kept_and_forced_is_an_error_naming_both_positions() {
    let err = parse_err(
        "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 10.3.0.0/16\nforceMasqueradeCIDRs:\n  - 10.3.0.0/16\n",
        opts(),
    );
    assert!(
        err.contains("5:5: forceMasqueradeCIDRs[0]: CIDR \"10.3.0.0/16\" is also in nonMasqueradeCIDRs[1] at 3:5"),
        "{err}"
    );
    // Nested prefixes are fine: the longest match decides.
    parse_ok(
        "nonMasqueradeCIDRs: [10.0.0.0/8]\nforceMasqueradeCIDRs: [10.3.0.0/16]\n",
        opts(),
    );
}

#[test]
fn cidr_limit_counts_both_destination_lists_but_not_sources() {
    let err = parse_err(
        "cidrLimit: 2\nnonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\nforceMasqueradeCIDRs: [10.3.0.0/16]\n",
        opts(),
    );
    assert!(
        err.contains(
            "the daemon can only accept up to 2 CIDRs (excluding link-local), but got 3 CIDRs"
        ),
        "{err}"
    );
    parse_ok(
        "cidrLimit: 2\nnonMasqueradeCIDRs: [10.0.0.0/8]\nforceMasqueradeCIDRs: [10.3.0.0/16]\nmasqueradeSourceCIDRs: [10.244.0.0/16, 10.245.0.0/16]\n",
        opts(),
    );
    // With the default list (3 prefixes) and a limit of 3, one force prefix is too many.
    let err = parse_err(
        "cidrLimit: 3\nforceMasqueradeCIDRs: [10.3.0.0/16]\n",
        opts(),
    );
    assert!(err.contains("but got 4 CIDRs"), "{err}");
}

#[test]
fn an_empty_source_scope_is_a_warning() {
    let loaded = parse_ok("masqueradeSourceCIDRs: []\n", opts());
    assert_eq!(loaded.config.masquerade_source_cidrs, Some(Vec::new()));
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("no source is masqueraded")),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn config_dir_joins_force_and_source_lists_and_refuses_a_prefix_kept_in_another_file() {
    let dir = Dir::new("force");
    dir.write(
        "ip-masq-a",
        "forceMasqueradeCIDRs: [10.3.0.0/16]\nmasqueradeSourceCIDRs: [10.244.0.0/16]\n",
    )
    .write(
        "ip-masq-b",
        "forceMasqueradeCIDRs: [10.3.0.0/16, 10.4.0.0/16]\nmasqueradeSourceCIDRs: [10.245.0.0/16]\n",
    );
    let loaded = load_dir(&dir.0, opts()).unwrap();
    assert_eq!(
        loaded.config.force_masquerade_cidrs,
        nets(&["10.3.0.0/16", "10.4.0.0/16"])
    );
    assert_eq!(
        loaded.config.masquerade_source_cidrs,
        Some(nets(&["10.244.0.0/16", "10.245.0.0/16"]))
    );
    dir.write("ip-masq-c", "nonMasqueradeCIDRs: [10.4.0.0/16]\n");
    let err = load_dir(&dir.0, opts()).unwrap_err().to_string();
    assert!(
        err.contains(
            "ip-masq-b: forceMasqueradeCIDRs: CIDR \"10.4.0.0/16\" is also in nonMasqueradeCIDRs of"
        ) && err.contains("ip-masq-c"),
        "{err}"
    );
}

#[test]
fn an_unchanged_file_is_not_parsed_again_and_a_changed_one_is() {
    let dir = Dir::new("cache");
    let path = dir.0.join("ip-masq-agent");
    std::fs::write(&path, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
    let mut cache = ParseCache::default();
    let first = load_cached(&path, opts(), &mut cache).unwrap();
    assert_eq!(load_cached(&path, opts(), &mut cache).unwrap(), first);
    std::fs::write(&path, "nonMasqueradeCIDRs: [10.0.0.1/8]\n").unwrap();
    let err = load_cached(&path, opts(), &mut cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not aligned"), "{err}");
    // Other options are another parse (IPv6 validity depends on them).
    std::fs::write(&path, "nonMasqueradeCIDRs: ['fd00::/8']\n").unwrap();
    assert!(load_cached(&path, opts(), &mut cache).is_err());
    assert!(load_cached(&path, v6(), &mut cache).is_ok());
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        load_cached(&path, opts(), &mut cache).unwrap().source,
        ConfigSource::Missing(_)
    ));
}

// Issue 16 #6: values and file names must not inject lines into text logs.

/// No character in `message` can end a log line, move the cursor or start an escape
/// sequence.
fn assert_one_safe_line(message: &str) {
    assert!(
        message.chars().all(quote::is_printable),
        "unprintable character in {message:?}"
    );
}

#[test]
fn regression_config_values_cannot_forge_log_lines() {
    let forged = "2026-12-02T04:00:00.000000Z  INFO config changed; rules applied prefixes=3";
    // A CIDR: upstream prints it quoted and then raw; the raw copy must not carry the line.
    let e = parse_err(
        &format!("nonMasqueradeCIDRs: [\"10.0.0.0/8\\n{forged}\"]\n"),
        opts(),
    );
    assert_one_safe_line(&e);
    assert!(
        e.contains(&format!("CIDR \"10.0.0.0/8\\n{forged}\" could not be parsed, invalid CIDR address: \"10.0.0.0/8\\n{forged}\"")),
        "{e}"
    );
    // resyncInterval: Go's time.quote escapes control bytes as \xNN.
    let e = parse_err(&format!("resyncInterval: \"1\\n{forged}\"\n"), opts());
    assert_one_safe_line(&e);
    assert!(
        e.contains("resyncInterval: time: unknown unit \"\\x0a\" in duration \"1\\x0a2026-"),
        "{e}"
    );
    // ESC sequences and Unicode line separators, in keys, values and type errors.
    let loaded = parse_ok("\"nonMasq\\e[2J\\u2028x\": 1\n", opts());
    let warning = loaded.warnings.join("");
    assert_one_safe_line(&warning);
    assert!(
        warning.contains(r#"unknown key "nonMasq\x1b[2J\u2028x""#),
        "{warning}"
    );
    let e = parse_err("cidrLimit: \"\\e]0;pwned\\a\"\n", opts());
    assert_one_safe_line(&e);
    assert!(e.contains(r#"got string "\x1b]0;pwned\a""#), "{e}");
    let e = parse_err("resyncInterval: \"-1s\\r\"\n", opts());
    assert_one_safe_line(&e);
    // Ordinary values read exactly as upstream's messages.
    let e = parse_err("nonMasqueradeCIDRs: [' 10.0.0.0/8']\n", opts());
    assert!(
        e.ends_with(r#"CIDR " 10.0.0.0/8" could not be parsed, invalid CIDR address:  10.0.0.0/8"#),
        "{e}"
    );
}

#[test]
fn regression_a_huge_value_makes_a_short_message() {
    let huge = "1".repeat(2 * 1024 * 1024);
    for text in [
        format!("nonMasqueradeCIDRs: ['{huge}']\n"),
        format!("resyncInterval: '{huge}s'\n"),
        format!("{huge}: 1\nnonMasqueradeCIDRs: ['1{huge}']\n"),
        format!("cidrLimit: '{huge}'\n"),
    ] {
        let message = match parse(&text, Path::new("f"), opts()) {
            Ok(loaded) => loaded.warnings.join("\n"),
            Err(e) => e.to_string(),
        };
        assert!(message.len() < 2048, "{} bytes", message.len());
        assert!(message.contains("bytes in all)"), "{message}");
    }
}

#[test]
fn regression_config_dir_file_names_cannot_forge_log_lines() {
    let dir = Dir::new("names");
    let name = "ip-masq-x\n2026-12-02T04:00:00Z  INFO config changed; rules applied";
    dir.write(name, "nonMasqueradeCIDRs: [10.0.0.1/8]\n");
    let e = load_dir(&dir.0, opts()).unwrap_err().to_string();
    assert_one_safe_line(&e);
    assert!(e.contains("ip-masq-x\\n2026-12-02"), "{e}");
    // Warnings that name two files quote both.
    std::fs::remove_file(dir.0.join(name)).unwrap();
    dir.write(
        name,
        "nonMasqueradeCIDRs: [10.0.0.0/8]\nmasqLinkLocal: true\n",
    )
    .write(
        "ip-masq-\u{1b}[31m",
        "nonMasqueradeCIDRs: [10.1.0.0/16]\nmasqLinkLocal: false\n",
    );
    let loaded = load_dir(&dir.0, opts()).unwrap();
    assert_eq!(loaded.warnings.len(), 2, "{:?}", loaded.warnings);
    for warning in &loaded.warnings {
        assert_one_safe_line(warning);
    }
}

#[test]
fn regression_non_utf8_config_dir_file_name_is_read() {
    use std::os::unix::ffi::OsStrExt;
    let dir = Dir::new("nonutf8");
    let name = std::ffi::OsStr::from_bytes(b"ip-masq-\xff");
    std::fs::write(dir.0.join(name), "nonMasqueradeCIDRs: [10.1.0.0/16]\n").unwrap();
    let loaded = load_dir(&dir.0, opts()).unwrap();
    assert_eq!(loaded.config.non_masquerade_cidrs, nets(&["10.1.0.0/16"]));
    // And named, quoted, when it is wrong.
    std::fs::write(dir.0.join(name), "nonMasqueradeCIDRs: [10.1.0.1/16]\n").unwrap();
    let e = load_dir(&dir.0, opts()).unwrap_err().to_string();
    assert!(e.contains(r#"ip-masq-\xff""#), "{e}");
}

// Issue 16 #7, #8: the file at a path can change between the check and the open.

#[test]
fn regression_config_dir_file_vanishing_between_stat_and_open_is_as_if_absent() {
    let dir = Dir::new("vanish");
    dir.write("ip-masq-a", "nonMasqueradeCIDRs: [10.1.0.0/16]\n");
    let path = dir.0.join("ip-masq-a");
    let read = read_config_text_checked(&path, &|| std::fs::remove_file(&path).unwrap());
    assert_eq!(read, Ok(None));
}

#[test]
fn regression_fifo_swapped_in_between_stat_and_open_does_not_block() {
    let dir = Dir::new("fifo-swap");
    dir.write("ip-masq-agent", "nonMasqueradeCIDRs: [10.1.0.0/16]\n");
    let path = dir.0.join("ip-masq-agent");
    let fifo = dir.0.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let (done, result) = std::sync::mpsc::channel();
    let (swap_path, swap_fifo) = (path.clone(), fifo.clone());
    // In a thread: before the fix the open blocks for as long as no writer comes.
    std::thread::spawn(move || {
        let read = read_config_text_checked(&swap_path, &|| {
            std::fs::rename(&swap_fifo, &swap_path).unwrap();
        });
        let _ = done.send(read);
    });
    let read = result.recv_timeout(Duration::from_secs(5));
    if read.is_err() {
        // Unblock the reader so the test process can end.
        let _ = std::fs::OpenOptions::new().write(true).open(&path);
    }
    let e = read
        .expect("the read returns at once")
        .expect_err("a FIFO is refused");
    assert!(e.to_string().contains("is not a regular file"), "{e}");
}

// Issue 15 #7: a one-family source scope turns the other family's masquerading off.

#[test]
fn regression_one_family_source_scope_warns_per_family() {
    let warnings = |text: &str, options: ParseOptions| parse_ok(text, options).warnings;
    let v4_only = "masqueradeSourceCIDRs: [10.244.0.0/16]\n";
    let w = warnings(v4_only, v6());
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with("/etc/config/ip-masq-agent:1:24: masqueradeSourceCIDRs lists no IPv6 prefix, so no IPv6 source is masqueraded (--enable-ipv6 is set)"),
        "{w:?}"
    );
    assert!(warnings(v4_only, opts()).is_empty(), "IPv6 not managed");
    let w = warnings("masqueradeSourceCIDRs: ['fd00:10:244::/56']\n", v6());
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("lists no IPv4 prefix, so no IPv4 source is masqueraded"),
        "{w:?}"
    );
    let both = "masqueradeSourceCIDRs: [10.244.0.0/16, 'fd00:10:244::/56']\n";
    assert!(warnings(both, v6()).is_empty());
    // Across --config-dir files: the merged scope counts.
    let dir = Dir::new("scope");
    dir.write("ip-masq-a", v4_only);
    let w = load_dir(&dir.0, v6()).unwrap().warnings;
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("lists no IPv6 prefix"), "{w:?}");
    dir.write("ip-masq-b", "masqueradeSourceCIDRs: ['fd00:10:244::/56']\n");
    assert!(load_dir(&dir.0, v6()).unwrap().warnings.is_empty());
}

// Issue 15 #11: a forced prefix equal to one of the DEFAULT list is the same conflict.

#[test]
fn regression_forced_prefix_in_the_default_list_is_an_error() {
    let e = parse_err("forceMasqueradeCIDRs: [10.3.0.0/16, 10.0.0.0/8]\n", opts());
    assert_eq!(
        e,
        "/etc/config/ip-masq-agent:1:37: forceMasqueradeCIDRs[1]: CIDR \"10.0.0.0/8\" is also in the DEFAULT nonMasqueradeCIDRs list (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16), which applies because nonMasqueradeCIDRs is not set; a prefix can be in only one of the two lists (the longest matching prefix decides, and these are equally long); set nonMasqueradeCIDRs explicitly without it"
    );
    let reserved = ParseOptions {
        nomasq_all_reserved_ranges: true,
        ..opts()
    };
    let e = parse_err("forceMasqueradeCIDRs: [100.64.0.0/10]\n", reserved);
    assert!(e.contains("DEFAULT nonMasqueradeCIDRs list (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10"), "{e}");
    // Inside a default prefix is the point of the key; an explicit list is checked as before.
    parse_ok("forceMasqueradeCIDRs: [10.3.0.0/16]\n", opts());
    parse_ok("forceMasqueradeCIDRs: [100.64.0.0/10]\n", opts());
    parse_ok(
        "nonMasqueradeCIDRs: [192.168.0.0/16]\nforceMasqueradeCIDRs: [10.0.0.0/8]\n",
        opts(),
    );
    // --config-dir: no file sets the list.
    let dir = Dir::new("force-default");
    dir.write("ip-masq-a", "forceMasqueradeCIDRs: [192.168.0.0/16]\n");
    let e = load_dir(&dir.0, opts()).unwrap_err().to_string();
    assert!(
        e.contains(
            "ip-masq-a: forceMasqueradeCIDRs[0]: CIDR \"192.168.0.0/16\" is also in the DEFAULT"
        ),
        "{e}"
    );
    dir.write("ip-masq-b", "nonMasqueradeCIDRs: [10.0.0.0/8]\n");
    load_dir(&dir.0, opts()).unwrap();
}

// Issue 18: the fast path for the common shape agrees with the general path.

mod fast_path_agreement {
    use proptest::prelude::*;

    use super::*;

    /// CIDR-like list items: valid and invalid prefixes of both families, and scalars
    /// YAML 1.1 reads as something else.
    fn item_text() -> impl Strategy<Value = String> {
        prop_oneof![
            60 => (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, len)| {
                ipnet::Ipv4Net::new(a.into(), len).unwrap().trunc().to_string()
            }),
            20 => (any::<[u16; 8]>(), 0u8..=128).prop_map(|(a, len)| {
                ipnet::Ipv6Net::new(a.into(), len).unwrap().trunc().to_string()
            }),
            3 => (any::<[u8; 4]>(), 0u8..=40).prop_map(|(a, len)| format!("{}/{len}", std::net::Ipv4Addr::from(a))),
            4 => prop::sample::select(vec![
                "10.0.0.0/8", "fd00::/8", "::/0", "::1/128", "::ffff:10.0.0.0/104", "10.0.0.1/8",
                "1.2.3.4", "a/b", "1:30", "yes", "y", "No", "~", "null", "-1", "010", "1e3", "0x10",
                "1_000", "64", "0", "true", "False", " 10.0.0.0/8", "10.0.0.0/8 x", "10.0.0.0/8#x",
                "10.0.0.0/8,", "x: y", "é/8", "10.0.0.0/8\u{2028}", "", "-", "60s", ".inf", "0b101",
            ]).prop_map(str::to_string),
        ]
    }

    /// An item as YAML writes it: plain, single- or double-quoted.
    fn yaml_item() -> impl Strategy<Value = String> {
        (item_text(), 0..4u8).prop_map(|(text, style)| match style {
            0 | 1 => text,
            2 => format!("'{text}'"),
            _ => format!("\"{text}\""),
        })
    }

    fn key_text(name: &'static str) -> impl Strategy<Value = String> {
        prop_oneof![
            6 => Just(name.to_string()),
            1 => Just(name.to_ascii_lowercase()),
            1 => Just(name.to_ascii_uppercase()),
            1 => Just(format!("{name}X")),
        ]
    }

    fn list_key() -> impl Strategy<Value = String> {
        prop::sample::select(vec![NON_MASQ_KEY, FORCE_KEY, SOURCE_KEY]).prop_flat_map(key_text)
    }

    fn scalar_entry() -> impl Strategy<Value = (String, String)> {
        let key = prop::sample::select(vec![
            "cidrLimit",
            "masqLinkLocal",
            "masqLinkLocalIPv6",
            "resyncInterval",
            "nonMasqueradeCIDR",
        ])
        .prop_flat_map(key_text);
        let common = prop::sample::select(vec![
            "true", "false", "64", "0", "100000", "60s", "1m30s", "500ms", "1ns", "0s", "'60s'",
            "\"64\"",
        ]);
        let odd = prop::sample::select(vec![
            "true",
            "false",
            "yes",
            "On",
            "y",
            "n",
            "TRUE",
            "64",
            "1",
            "0",
            "010",
            "0x10",
            "1_000",
            "1e3",
            "-1",
            "+1",
            "60s",
            "1m30s",
            "500ms",
            "1ns",
            "1.5h",
            "0s",
            "-1s",
            "1d",
            "~",
            "null",
            "'60s'",
            "\"64\"",
            "[]",
            "[60s]",
            "x y",
            "60s # c",
            "60s#c",
            "1:30",
            "100000",
            "99999999999999999999",
            "18446744073709551616",
        ]);
        let value = prop_oneof![4 => common, 1 => odd];
        (key, value.prop_map(str::to_string))
    }

    /// A YAML list value: after `key:`, on the same line or on the next ones.
    fn yaml_list() -> impl Strategy<Value = String> {
        let items = prop::collection::vec(yaml_item(), 0..12);
        (items, 0..6u8, 0..3usize, any::<bool>()).prop_map(|(items, style, indent, comments)| {
            let pad = " ".repeat(indent * 2);
            match style {
                // Block list.
                0..=2 if !items.is_empty() => {
                    let mut out = if comments {
                        String::from(" # list\n")
                    } else {
                        String::from("\n")
                    };
                    for (i, item) in items.iter().enumerate() {
                        if comments && i % 3 == 1 {
                            out.push_str(&format!("{pad}# note {i}\n"));
                        }
                        if comments && i % 4 == 2 {
                            out.push('\n');
                        }
                        let tail = if comments && i % 2 == 0 { " # c" } else { "" };
                        out.push_str(&format!("{pad}- {item}{tail}\n"));
                    }
                    out
                }
                // Flow list over several lines.
                3 => format!(
                    " [\n{pad}  {}\n{pad}]\n",
                    items.join(&format!(",\n{pad}  "))
                ),
                // Flow list with odd spacing.
                4 => format!(" [ {} ]  \n", items.join(" ,  ")),
                _ => format!(
                    " [{}]{}\n",
                    items.join(", "),
                    if comments { " # c" } else { "" }
                ),
            }
        })
    }

    fn yaml_document() -> impl Strategy<Value = String> {
        let entry = prop_oneof![
            3 => (list_key(), yaml_list()).prop_map(|(k, v)| format!("{k}:{v}")),
            2 => scalar_entry().prop_map(|(k, v)| format!("{k}: {v}\n")),
            1 => list_key().prop_map(|k| format!("{k}:\n")),
            1 => Just("# a comment\n\n".to_string()),
        ];
        prop::collection::vec(entry, 1..6).prop_map(|entries| entries.concat())
    }

    fn json_document() -> impl Strategy<Value = String> {
        let item = item_text().prop_map(|t| serde_json::to_string(&t).unwrap());
        let list = prop::collection::vec(item, 0..12);
        let value = prop_oneof![
            4 => list.prop_map(|items| format!("[{}]", items.join(","))),
            1 => prop::sample::select(vec!["true", "false", "null", "64", "0", "1.5", "-1", "\"60s\"", "\"x\"", "{}", "[1]"]).prop_map(str::to_string),
        ];
        let key = prop_oneof![list_key(), scalar_entry().prop_map(|(k, _)| k)];
        let entries = prop::collection::vec((key, value), 0..5);
        (entries, any::<bool>()).prop_map(|(entries, pretty)| {
            let members: Vec<String> = entries
                .iter()
                .map(|(k, v)| {
                    if pretty {
                        format!("  \"{k}\": {}", v.replace(',', ",\n    "))
                    } else {
                        format!("\"{k}\":{v}")
                    }
                })
                .collect();
            if pretty {
                format!("{{\n{}\n}}\n", members.join(",\n"))
            } else {
                format!("{{{}}}", members.join(","))
            }
        })
    }

    /// Near-common and hostile variants: one edit of the kind that moves a document out
    /// of the common shape, or into another reading of it.
    fn mutated(document: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
        let edit = prop::sample::select(vec![
            "\t",
            "\r",
            "#",
            ":",
            ": ",
            "-",
            " ",
            "  ",
            "'",
            "\"",
            "[",
            "]",
            ",",
            "{",
            "}",
            "&a ",
            "*a",
            "!!str ",
            "|",
            ">",
            "\n",
            "\n---\n",
            "\n...\n",
            "%YAML 1.1\n",
            "é",
            "\u{2028}",
            "\u{85}",
            "\\",
            "''",
            "? ",
            "@",
            "`",
            "\u{feff}",
            "0",
            "/",
            "\n  ",
            "\n- x\n",
        ]);
        (
            document,
            prop::option::weighted(0.7, (any::<prop::sample::Index>(), edit, 0..3u8)),
        )
            .prop_map(|(text, edit)| {
                let Some((at, insert, kind)) = edit else {
                    return text;
                };
                let mut at = at.index(text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                match kind {
                    0 => format!("{}{insert}{}", &text[..at], &text[at..]),
                    // Delete one character.
                    1 => {
                        let mut out = text.clone();
                        if at < text.len() {
                            out.remove(at);
                        }
                        out
                    }
                    // Replace one character.
                    _ => {
                        let mut out = text.clone();
                        if at < text.len() {
                            out.remove(at);
                        }
                        out.insert_str(at.min(out.len()), insert);
                        out
                    }
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn yaml_documents_read_the_same_on_both_paths(text in mutated(yaml_document())) {
            if let Err(difference) = agreement::check(&text) {
                prop_assert!(false, "{}", difference);
            }
        }

        #[test]
        fn json_documents_read_the_same_on_both_paths(text in mutated(json_document())) {
            if let Err(difference) = agreement::check(&text) {
                prop_assert!(false, "{}", difference);
            }
        }
    }

    /// The property is not vacuous: the common shapes do take the fast path.
    #[test]
    fn the_common_shapes_take_the_fast_path() {
        for text in [
            "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 'fd00::/8'\n  - \"192.168.0.0/16\"\nmasqLinkLocal: true\nresyncInterval: 60s\ncidrLimit: 100\n",
            "# header\n\nnonMasqueradeCIDRs: # kept\n- 10.0.0.0/8 # ten\n\n- 172.16.0.0/12\nforceMasqueradeCIDRs: [10.3.0.0/16, '10.4.0.0/16']\n",
            "nonMasqueradeCIDRs: [\n    10.0.0.0/8,\n    192.168.0.0/16\n]\nmasqueradeSourceCIDRs: []\n",
            "{\"nonMasqueradeCIDRs\":[\"10.0.0.0/8\"],\"masqLinkLocal\":false,\"cidrLimit\":64,\"resyncInterval\":\"1m30s\"}",
            "{\n  \"nonMasqueradeCIDRs\": [\n    \"10.0.0.0/8\"\n  ],\n  \"masqLinkLocal\": null\n}\n",
            // The fuzz target's seeds of the common shape.
            include_str!("../../fuzz/seeds/config/yaml_common"),
            include_str!("../../fuzz/seeds/config/json_pretty"),
        ] {
            assert!(agreement::fast_path_reads(text), "{text:?}");
            agreement::check(text).unwrap();
        }
    }

    /// The bounds: the fast path leaves every document near the value bound to the
    /// general path, so a refusal for size always comes from there, with its message and
    /// position (tested in `regression_value_bound_refuses_huge_documents_and_keeps_large_configs`).
    #[test]
    fn documents_near_the_value_bound_are_left_to_the_general_path() {
        let block = |n: usize| {
            let mut text = String::from("nonMasqueradeCIDRs:\n");
            for i in 0..n {
                text.push_str(&format!("  - 10.{}.{}.0/24\n", i / 256 % 256, i % 256));
            }
            text
        };
        // Each item but the first follows a newline or a comma: the fast path counts them
        // before it builds anything, and stays below the bound (the map, the key and the
        // list are values too).
        let most = super::fast_path::MOST_SEPARATORS;
        assert!(most < MAX_DOCUMENT_VALUES - 64 - 3);
        assert!(agreement::fast_path_reads(&block(most - 1)));
        assert!(!agreement::fast_path_reads(&block(most)));
        let flow = |n: usize| {
            format!(
                "nonMasqueradeCIDRs: [{}]\n",
                vec!["10.0.0.0/8"; n].join(",")
            )
        };
        assert!(agreement::fast_path_reads(&flow(most)));
        assert!(!agreement::fast_path_reads(&flow(most + 1)));
        // Many keys are not the common shape either.
        let keys: String = (0..100).map(|i| format!("unknownKey{i}: 1\n")).collect();
        assert!(!agreement::fast_path_reads(&keys));
        agreement::check(&keys).unwrap();
        // A large list read both ways.
        agreement::check(&block(20_000)).unwrap();
        agreement::check(&flow(20_000)).unwrap();
        // And the common shape at the size the agent is made for is read fast.
        let mut text = String::from("cidrLimit: 50000\nnonMasqueradeCIDRs:\n");
        for i in 0..50_000 {
            text.push_str(&format!("  - 10.{}.{}.0/24\n", i / 256 % 256, i % 256));
        }
        assert!(agreement::fast_path_reads(&text));
    }
}

/// Issue 17: PR #103's keys as its fork writes them (one name), or a list of names.
#[test]
fn output_interface_and_address_keys_are_read_as_pr_103_writes_them() {
    let one = parse_ok("outputInterface: eth0\noutputAddress: 192.0.2.10\n", opts()).config;
    assert_eq!(
        one.output_interfaces
            .as_deref()
            .map(|l| l.iter().map(ToString::to_string).collect::<Vec<_>>()),
        Some(vec!["eth0".to_string()])
    );
    assert_eq!(
        one.output_address.map(|a| a.to_string()).as_deref(),
        Some("192.0.2.10")
    );
    let many = parse_ok(
        "OutputInterface: [eth0, 'bond+', eth0]\noutputAddressIPv6: '2001:db8::10-2001:db8::20'\n",
        v6(),
    );
    let listed: Vec<String> = many
        .config
        .output_interfaces
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(listed, ["eth0", "bond+"], "duplicates dropped, order kept");
    assert_eq!(
        many.config.output_address_ipv6.unwrap().to_string(),
        "2001:db8::10-2001:db8::20"
    );
    // Unset as in the fork: absent, null or an empty string.
    for unset in [
        "",
        "outputInterface: \n",
        "outputInterface: ''\noutputAddress: ''\n",
    ] {
        let c = parse_ok(unset, opts()).config;
        assert!(
            c.output_interfaces.is_none() && c.output_address.is_none(),
            "{unset:?}"
        );
    }
    // An empty list: nothing is masqueraded, with a warning.
    let empty = parse_ok("outputInterface: []\n", opts());
    assert_eq!(empty.config.output_interfaces, Some(Vec::new()));
    assert!(
        empty.warnings[0].contains("outputInterface is empty: no packet is masqueraded"),
        "{:?}",
        empty.warnings
    );
}

/// Issue 17, bad input: file, line, column, key and what is wrong.
#[test]
fn bad_output_interfaces_and_addresses_name_file_line_and_column() {
    for (text, options, expected) in [
        (
            "outputInterface: [eth0, 'bo+nd']\n",
            opts(),
            "/etc/config/ip-masq-agent:1:25: outputInterface[1]: interface name \"bo+nd\" is not valid: `+` is a wildcard only at the end (`bond+`)",
        ),
        (
            "outputInterface: averyveryverylongname\n",
            opts(),
            "/etc/config/ip-masq-agent:1:18: outputInterface: interface name \"averyveryverylongname\" is 21 bytes long; Linux (and iptables' -o, wildcard included) allows at most 15",
        ),
        (
            "outputInterface: 'eth 0'\n",
            opts(),
            "/etc/config/ip-masq-agent:1:18: outputInterface: interface name \"eth 0\" is not valid: Linux refuses ' ' in interface names",
        ),
        (
            "outputInterface: [eth0/1]\n",
            opts(),
            "/etc/config/ip-masq-agent:1:19: outputInterface[0]: interface name \"eth0/1\" is not valid: Linux refuses '/' in interface names",
        ),
        (
            "outputInterface: 7\n",
            opts(),
            "/etc/config/ip-masq-agent:1:18: outputInterface: expected an interface name such as \"eth0\" or \"bond+\", or a list of them, got number 7",
        ),
        (
            "outputAddress: 2001:db8::1\n",
            opts(),
            "/etc/config/ip-masq-agent:1:16: outputAddress: \"2001:db8::1\" is not an IPv4 address (it is an IPv6 address)",
        ),
        (
            "outputAddress: 192.0.2.20-192.0.2.10\n",
            opts(),
            "/etc/config/ip-masq-agent:1:16: outputAddress: range \"192.0.2.20-192.0.2.10\" starts above its end; write the lower address first",
        ),
        (
            "outputAddress: 192.0.2.0/24\n",
            opts(),
            "/etc/config/ip-masq-agent:1:16: outputAddress: \"192.0.2.0/24\" is not an IPv4 address (a prefix; write one address or a range A-B)",
        ),
        (
            "outputAddressIPv6: '2001:db8::1'\n",
            opts(),
            "/etc/config/ip-masq-agent:1:20: outputAddressIPv6: ipv6 is not enabled, but outputAddressIPv6 \"2001:db8::1\" is set. Enable ipv6 using --enable-ipv6 agent flag",
        ),
        (
            "outputAddressIPv6: 192.0.2.1\n",
            v6(),
            "/etc/config/ip-masq-agent:1:20: outputAddressIPv6: \"192.0.2.1\" is not an IPv6 address (it is an IPv4 address)",
        ),
    ] {
        assert_eq!(parse_err(text, options), expected, "{text:?}");
    }
}

/// `--config-dir`: interface lists are joined; two files that name different SNAT
/// addresses are refused.
#[test]
fn config_dir_joins_interfaces_and_refuses_two_output_addresses() {
    let dir = std::env::temp_dir().join(format!("ima-egress-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("ip-masq-a"),
        "outputInterface: eth0\noutputAddress: 192.0.2.10\n",
    )
    .unwrap();
    std::fs::write(dir.join("ip-masq-b"), "outputInterface: [bond+]\n").unwrap();
    let loaded = load_dir(&dir, opts()).unwrap();
    let listed: Vec<String> = loaded
        .config
        .output_interfaces
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(listed, ["eth0", "bond+"]);
    std::fs::write(dir.join("ip-masq-c"), "outputAddress: 192.0.2.11\n").unwrap();
    let err = load_dir(&dir, opts()).unwrap_err().to_string();
    assert!(
        err.contains("outputAddress is 192.0.2.11 here but 192.0.2.10 in"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Found by the hostile review: of two spellings of one key, upstream keeps the byte-wise
/// greater (its YAML -> JSON step sorts the keys, encoding/json applies them in order and
/// matches case-insensitively), wherever each stands in the file; an empty outputInterface
/// or outputAddress written later unsets the earlier value, as a Go "" does.
#[test]
fn regression_keys_spelled_twice_are_read_in_upstreams_order() {
    let c = parse_ok(
        "nonmasqueradecidrs: [10.0.0.0/8]\nnonMasqueradeCIDRs: [192.168.0.0/16]\n",
        opts(),
    )
    .config;
    assert_eq!(c.non_masquerade_cidrs, nets(&["10.0.0.0/8"]));
    let c = parse_ok("masqlinklocal: false\nmasqLinkLocal: true\n", opts()).config;
    assert!(!c.masq_link_local);
    // The same spelling twice: the last one (a YAML map keeps the last).
    let c = parse_ok("masqLinkLocal: true\nmasqLinkLocal: false\n", opts()).config;
    assert!(!c.masq_link_local);
    let c = parse_ok(
        "outputInterface: eth0\noutputinterface: ''\noutputAddress: 192.0.2.1\noutputaddress: ''\n",
        opts(),
    )
    .config;
    assert!(c.output_interfaces.is_none() && c.output_address.is_none());
}
