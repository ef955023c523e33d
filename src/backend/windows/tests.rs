use super::*;
use crate::config::{ParseOptions, parse};
use crate::policy::PolicySettings;

const V1: &str = include_str!("../../../tests/data/win-bridge-v1.conf");
const V2: &str = include_str!("../../../tests/data/win-bridge-v2.conf");

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

/// A fresh directory for one test (the tests run in parallel).
fn scratch_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ima-win-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn regression_symlinked_conf_stays_a_symlink() {
    use std::os::unix::fs::symlink;
    // kubelet's layout: conf -> ..data/conf, ..data -> ..2024_01_01, across directories.
    let dir = scratch_dir("symlink");
    let real_dir = dir.join("..2024_01_01");
    std::fs::create_dir(&real_dir).unwrap();
    std::fs::write(real_dir.join("10-l2bridge.conf"), V2).unwrap();
    symlink("..2024_01_01", dir.join("..data")).unwrap();
    symlink("..data/10-l2bridge.conf", dir.join("link")).unwrap();
    symlink("link", dir.join("10-l2bridge.conf")).unwrap();

    assert!(rewrite_file(&dir.join("10-l2bridge.conf"), &list(&["10.0.0.0/8"])).unwrap());

    for (link, points_to) in [
        ("10-l2bridge.conf", "link"),
        ("link", "..data/10-l2bridge.conf"),
        ("..data", "..2024_01_01"),
    ] {
        let path = dir.join(link);
        assert!(
            std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink(),
            "{link} is still a symlink"
        );
        assert_eq!(std::fs::read_link(&path).unwrap(), Path::new(points_to));
    }
    let rewritten = std::fs::read_to_string(real_dir.join("10-l2bridge.conf")).unwrap();
    assert!(
        rewritten.contains("\"Exceptions\": [\"10.0.0.0/8\"]"),
        "{rewritten}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("10-l2bridge.conf")).unwrap(),
        rewritten
    );
    // The temporary file went beside the target and is gone.
    assert_eq!(names_in(&real_dir), ["10-l2bridge.conf"]);
    assert_eq!(
        names_in(&dir),
        ["..2024_01_01", "..data", "10-l2bridge.conf", "link"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn regression_rewrite_keeps_mode_and_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch_dir("owner");
    let path = dir.join("10-l2bridge.conf");
    std::fs::write(&path, V1).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    // Only root may give a file away; elsewhere the mode is still checked.
    let as_root = nix::unistd::geteuid().is_root();
    if as_root {
        std::os::unix::fs::chown(&path, Some(12345), Some(12345)).unwrap();
    }
    let before = std::fs::metadata(&path).unwrap();

    assert!(rewrite_file(&path, &list(&["10.0.0.0/8"])).unwrap());

    let after = std::fs::metadata(&path).unwrap();
    assert_ne!(after.ino(), before.ino(), "replaced by a rename");
    assert_eq!(after.permissions().mode() & 0o7777, 0o640);
    assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
    if as_root {
        assert_eq!((after.uid(), after.gid()), (12345, 12345));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn regression_duplicate_policies_key_is_refused_and_file_unchanged() {
    let outbound_nat = r#"[{"name":"EndpointPolicy","value":{"Type":"OutBoundNAT","ExceptionList":["10.244.0.0/16"]}}]"#;
    let cases = [
        (
            format!("{{\n\"type\":\"win-bridge\",\n\"policies\":{outbound_nat},\n\"policies\":[]\n}}"),
            r#"duplicate key "policies" in the top-level object at line 4, column 1"#,
        ),
        (
            r#"{"policies":[{"name":"EndpointPolicy","value":{"Type":"OutBoundNAT","ExceptionList":["10.244.0.0/16"],"exceptionList":[]}}]}"#.to_string(),
            r#"duplicate key "exceptionList" in policies[0].value at line 1, column 103 (byte 102), first at line 1, column 69 (byte 68) (as "ExceptionList")"#,
        ),
        (
            r#"{"apiVersion":2,"policies":[{"name":"EndpointPolicy","value":{"Type":"OutBoundNAT","Settings":{"Exceptions":[]},"Settings":{"Exceptions":["10.0.0.0/8"]}}}]}"#.to_string(),
            r#"duplicate key "Settings" in policies[0].value"#,
        ),
        (
            r#"{"apiVersion":2,"policies":[{"name":"EndpointPolicy","value":{"Type":"OutBoundNAT","Settings":{"Exceptions":[],"Exceptions":[]}}}]}"#.to_string(),
            r#"duplicate key "Exceptions" in policies[0].value.Settings"#,
        ),
        (
            r#"{"policies":[{"name":"EndpointPolicy","value":{"Type":"ROUTE"},"value":{"Type":"OutBoundNAT","ExceptionList":[]}}]}"#.to_string(),
            r#"duplicate key "value" in policies[0]"#,
        ),
        (
            format!(r#"{{"plugins":[{{"type":"win-bridge","policies":{outbound_nat},"Policies":[]}}]}}"#),
            r#"duplicate key "Policies" in plugins[0]"#,
        ),
    ];
    let dir = scratch_dir("duplicate");
    let path = dir.join("10-l2bridge.conf");
    for (conf, message) in &cases {
        std::fs::write(&path, conf).unwrap();
        let e = format!(
            "{:#}",
            rewrite_file(&path, &list(&["10.0.0.0/8"])).unwrap_err()
        );
        assert!(e.contains(message), "{e}\nwanted: {message}");
        assert!(e.contains("left unchanged"), "{e}");
        assert_eq!(&std::fs::read_to_string(&path).unwrap(), conf);
        assert_eq!(names_in(&dir), ["10-l2bridge.conf"]);
    }
    // Duplicates the rewrite never reads are not its business.
    let elsewhere =
        format!(r#"{{"ipam":{{"subnet":"a","subnet":"b"}},"policies":{outbound_nat}}}"#);
    assert!(rewrite_exception_lists(&elsewhere, &list(&["10.0.0.0/8"])).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn regression_rewrite_is_durable_temp_file_removed_on_failure() {
    let dir = scratch_dir("durable");
    let path = dir.join("10-l2bridge.conf");
    std::fs::write(&path, V1).unwrap();
    // A stale temporary file from a crashed run does not get in the way.
    std::fs::write(dir.join(".10-l2bridge.conf.ip-masq-agent.tmp"), "stale").unwrap();

    // Fails just before the rename, after checking the temporary file is complete.
    let fail = |temporary: &Path| {
        assert_eq!(
            temporary.parent(),
            Some(std::fs::canonicalize(&dir).unwrap().as_path())
        );
        let written = std::fs::read_to_string(temporary).unwrap();
        assert!(written.contains("\"10.0.0.0/8\""), "{written}");
        Err(std::io::Error::other("injected failure"))
    };
    let e = rewrite_file_checked(&path, &list(&["10.0.0.0/8"]), &fail).unwrap_err();
    assert!(format!("{e:#}").contains("injected failure"), "{e:#}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        V1,
        "file unchanged"
    );
    assert_eq!(
        names_in(&dir),
        ["10-l2bridge.conf"],
        "temporary file removed"
    );

    assert!(rewrite_file(&path, &list(&["10.0.0.0/8"])).unwrap());
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("\"10.0.0.0/8\"")
    );
    assert_eq!(
        names_in(&dir),
        ["10-l2bridge.conf"],
        "no temporary file left"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
