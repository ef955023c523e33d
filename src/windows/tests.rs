use super::*;
use crate::config::{ParseOptions, parse};
use crate::policy::PolicySettings;

const V1: &str = include_str!("../../tests/data/win-bridge-v1.conf");
const V2: &str = include_str!("../../tests/data/win-bridge-v2.conf");

fn list(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn exception_list_is_the_ipv4_keep_list() {
    let config = parse(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 'fd00::/8', 10.0.0.0/8]\n",
        Path::new("t"),
        ParseOptions {
            enable_ipv6: true,
            ..ParseOptions::default()
        },
    )
    .unwrap()
    .config;
    let policy = Policy::new(
        &config,
        &PolicySettings {
            enable_ipv6: true,
            ..PolicySettings::default()
        },
    );
    assert_eq!(
        exception_list(&policy),
        list(&["169.254.0.0/16", "10.0.0.0/8"])
    );
}

#[test]
fn v1_round_trip_changes_only_the_list() {
    let out = rewrite_exception_lists(
        V1,
        &list(&["169.254.0.0/16", "10.0.0.0/8", "192.168.0.0/16"]),
    )
    .unwrap();
    let old = "[\n                    \"10.244.0.0/16\",\n                    \"10.96.0.0/12\"\n                ]";
    let new = "[\n                    \"169.254.0.0/16\",\n                    \"10.0.0.0/8\",\n                    \"192.168.0.0/16\"\n                ]";
    assert!(V1.contains(old));
    assert_eq!(out, V1.replacen(old, new, 1));
    // Rewriting back restores the original bytes exactly.
    assert_eq!(
        rewrite_exception_lists(&out, &list(&["10.244.0.0/16", "10.96.0.0/12"])).unwrap(),
        V1
    );
}

#[test]
fn v2_round_trip_changes_only_the_list() {
    let out = rewrite_exception_lists(V2, &list(&["169.254.0.0/16", "10.0.0.0/8"])).unwrap();
    assert_eq!(
        out,
        V2.replacen(
            "[\"10.244.0.0/16\", \"10.96.0.0/12\"]",
            "[\"169.254.0.0/16\", \"10.0.0.0/8\"]",
            1
        )
    );
    assert_eq!(
        rewrite_exception_lists(&out, &list(&["10.244.0.0/16", "10.96.0.0/12"])).unwrap(),
        V2
    );
    let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        parsed["policies"][0]["value"]["Settings"]["Exceptions"][1],
        "10.0.0.0/8"
    );
}

#[test]
fn conflist_plugins_are_rewritten_and_empty_lists_work() {
    let conflist = r#"{"cniVersion":"0.3.0","name":"n","plugins":[{"type":"win-bridge","policies":[{"name":"EndpointPolicy","value":{"Type":"OutBoundNAT","ExceptionList":[]}}]}]}"#;
    let out = rewrite_exception_lists(conflist, &list(&["10.0.0.0/8"])).unwrap();
    assert_eq!(
        out,
        conflist.replace("\"ExceptionList\":[]", "\"ExceptionList\":[\"10.0.0.0/8\"]")
    );
    assert_eq!(rewrite_exception_lists(&out, &[]).unwrap(), conflist);
}

#[test]
fn a_config_without_outbound_nat_is_refused() {
    let e = rewrite_exception_lists(r#"{"type":"win-bridge","policies":[]}"#, &[]).unwrap_err();
    assert!(e.to_string().contains("no OutBoundNAT policy"), "{e}");
    assert!(rewrite_exception_lists("{not json", &[]).is_err());
    let missing = r#"{"policies":[{"name":"EndpointPolicy","value":{"Type":"OutBoundNAT"}}]}"#;
    assert!(
        rewrite_exception_lists(missing, &[])
            .unwrap_err()
            .to_string()
            .contains("ExceptionList")
    );
}

#[test]
fn file_rewrite_is_atomic_and_idempotent() {
    let dir = std::env::temp_dir().join(format!("ima-win-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("10-l2bridge.conf");
    std::fs::write(&path, V2).unwrap();
    assert!(rewrite_file(&path, &list(&["10.0.0.0/8"])).unwrap());
    assert!(
        !rewrite_file(&path, &list(&["10.0.0.0/8"])).unwrap(),
        "no change, no write"
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "no temporary file left"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
