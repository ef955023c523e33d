//! Commands and the running agent against hostile files and output: `check` says what
//! the agent with the same flags would do, nothing from a file reaches the terminal or
//! the log unescaped, a closed output pipe ends a command quietly, a FIFO swapped in
//! under a running agent does not stop it, and `windows-cni` names the real cause of a
//! failed write. Each runs the real binary.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ima_harness::*;

use crate::AGENT;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(AGENT.path())
        .args(args)
        .output()
        .expect("run agent binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Issue 16 #5: `check DIR` said OK for a directory the agent rejects, and "the agent
/// would use the defaults" for one without ip-masq* files.
#[test]
fn regression_check_follows_the_agents_flags_for_a_directory() {
    let dir = TempDir::new("check-dir");
    // Without --config-dir the agent reads --config as one file: a directory is rejected.
    let (code, out, err) = run(&["check", arg(&dir.path)]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("is a directory, expected a YAML or JSON file"),
        "{err}"
    );
    assert!(err.contains("check --config-dir"), "{err}");
    let (code, _, err) = run(&["check", "--config", arg(&dir.path)]);
    assert_eq!(code, 1, "{err}");

    // With --config-dir, the directory is what the agent merges.
    let (code, out, err) = run(&["check", "--config-dir", arg(&dir.path)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("no ip-masq* file in the directory; the agent would use the defaults"),
        "{out}"
    );
    std::fs::write(
        dir.path.join("ip-masq-a"),
        "nonMasqueradeCIDRs: [10.0.0.0/8]\n",
    )
    .unwrap();
    let (code, out, err) = run(&["check", "--config-dir", arg(&dir.path)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("OK, 1 file(s) merged"), "{out}");
    // The positional path stands for --config-dir's directory.
    let (code, out, err) = run(&["check", "--config-dir", "/nonexistent", arg(&dir.path)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("OK, 1 file(s) merged"), "{out}");
    std::fs::write(
        dir.path.join("ip-masq-b"),
        "nonMasqueradeCIDRs: [10.0.0.1/8]\n",
    )
    .unwrap();
    let (code, _, err) = run(&["check", "--config-dir", arg(&dir.path)]);
    assert_eq!(code, 1, "one bad file rejects the set");
    assert!(
        err.contains("ip-masq-b:1:22: nonMasqueradeCIDRs[0]"),
        "{err}"
    );
    // A missing directory: the agent cannot list it and rejects it.
    let (code, _, err) = run(&["check", "--config-dir", arg(&dir.path.join("gone"))]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot list the config directory"), "{err}");
}

/// Issue 16 #6: `check` and `explain` printed ESC sequences and newlines from the file.
#[test]
fn regression_check_and_explain_print_no_escape_sequences() {
    let dir = TempDir::new("check-esc");
    let config = dir.path.join("config");
    std::fs::write(
        &config,
        "nonMasqueradeCIDRs: [\"10.0.0.0/8\\e[2J\\e]0;owned\\a\\n2026-12-02T00:00:00Z  INFO config changed\"]\n",
    )
    .unwrap();
    let (code, out, err) = run(&["check", arg(&config)]);
    assert_eq!(code, 1);
    let (ecode, eout, eerr) = run(&["explain", "--config", arg(&config), "8.8.8.8"]);
    assert_eq!(ecode, 1);
    for text in [&out, &err, &eout, &eerr] {
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        assert!(text.lines().count() <= 1, "{text:?}");
    }
    assert!(
        err.contains(r#"\x1b[2J\x1b]0;owned\a\n2026-12-02"#),
        "{err}"
    );

    // A file name holding a newline and an ESC sequence, in --config-dir.
    let names = TempDir::new("check-names");
    let name = "ip-masq-\u{1b}[31mred\nINFO rules applied";
    std::fs::write(names.path.join(name), "masqLinkLocal: 1\n").unwrap();
    let (code, out, err) = run(&["check", "--config-dir", arg(&names.path)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        !err.contains('\u{1b}') && err.lines().count() == 1,
        "{err:?}"
    );
    assert!(
        err.contains(r#"ip-masq-\x1b[31mred\nINFO rules applied""#),
        "{err}"
    );
}

/// Issue 16 #12: `explain` exited 0 for arguments that are not addresses.
#[test]
fn regression_explain_exits_1_for_arguments_that_are_not_addresses() {
    let dir = TempDir::new("explain-args");
    let config = dir.path.join("config");
    std::fs::write(&config, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
    let (code, out, err) = run(&[
        "explain",
        "--config",
        arg(&config),
        "10.1.2.3",
        "example.com",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.starts_with("10.1.2.3: not masqueraded"), "{out}");
    assert!(
        err.contains("error: \"example.com\" is not an IP address"),
        "{err}"
    );
    let (code, _, err) = run(&["explain", "--config", arg(&config), "\u{1b}[2J"]);
    assert_eq!(code, 1);
    assert!(err.contains(r#""\x1b[2J" is not an IP address"#), "{err:?}");
    let (code, _, _) = run(&["explain", "--config", arg(&config), "10.1.2.3", "::1"]);
    assert_eq!(code, 0);
}

/// Issue 15 #13: a source of the other family was ignored without a word.
#[test]
fn regression_explain_says_when_the_source_is_of_the_other_family() {
    let dir = TempDir::new("explain-family");
    let config = dir.path.join("config");
    std::fs::write(
        &config,
        "masqueradeSourceCIDRs: [10.244.0.0/16, 'fd00:244::/64']\n",
    )
    .unwrap();
    let c = format!("--config={}", config.display());
    let (code, out, err) = run(&[
        "explain",
        &c,
        "--enable-ipv6",
        "--from",
        "::ffff:10.244.1.2",
        "8.8.8.8",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("the source ::ffff:10.244.1.2 is IPv6 (an IPv4-mapped IPv6 address; for the IPv4 source write --from 10.244.1.2) and cannot send to the IPv4 8.8.8.8, so masqueradeSourceCIDRs is not checked"),
        "{out}"
    );
    let (_, out, _) = run(&[
        "explain",
        &c,
        "--enable-ipv6",
        "--from",
        "10.244.1.2",
        "2001:db8::1",
        "8.8.8.8",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].contains("the source 10.244.1.2 is IPv4 and cannot send to the IPv6 2001:db8::1"),
        "{out}"
    );
    assert!(
        lines[1].contains("source 10.244.1.2 is in masqueradeSourceCIDRs"),
        "{out}"
    );
}

/// Issue 15 #7: `check` warns when the source scope leaves a managed family out.
#[test]
fn regression_check_warns_about_a_one_family_source_scope() {
    let dir = TempDir::new("check-scope");
    let config = dir.path.join("config");
    std::fs::write(&config, "masqueradeSourceCIDRs: [10.244.0.0/16]\n").unwrap();
    let (code, out, _) = run(&["check", "--enable-ipv6", arg(&config)]);
    assert_eq!(code, 0);
    assert!(
        out.contains("warning: ")
            && out.contains(
                "masqueradeSourceCIDRs lists no IPv6 prefix, so no IPv6 source is masqueraded"
            ),
        "{out}"
    );
    let (_, out, _) = run(&["check", arg(&config)]);
    assert!(!out.contains("warning"), "IPv6 not managed: {out}");
}

/// Issue 15 #11: the same pair is an error whether the list is written or the default.
#[test]
fn regression_check_refuses_a_forced_prefix_of_the_default_list() {
    let dir = TempDir::new("check-force");
    let config = dir.path.join("config");
    std::fs::write(&config, "forceMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
    let (code, _, err) = run(&["check", arg(&config)]);
    assert_eq!(code, 1);
    assert!(
        err.contains("is also in the DEFAULT nonMasqueradeCIDRs list"),
        "{err}"
    );
}

/// Spawns `command` with its standard output a pipe whose reading end is already closed.
fn output_into_a_closed_pipe(mut command: Command) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let child = command
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // The command's own stdout end is closed in this process when `command` is dropped.
    drop(command);
    child.wait_with_output().expect("wait")
}

fn assert_quiet_exit(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(!stderr.contains("Broken pipe"), "{what}: {stderr}");
    assert_eq!(
        out.status.code(),
        Some(141),
        "{what}: {:?} {stderr}",
        out.status
    );
}

/// Issue 15 #12: `status | head -2` panicked on the broken pipe.
#[test]
fn regression_commands_exit_quietly_on_a_closed_pipe() {
    let dir = TempDir::new("epipe");
    let config = dir.path.join("config");
    std::fs::write(&config, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
    let conf = dir.path.join("10-l2bridge.conf");
    std::fs::write(
        &conf,
        std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/win-bridge-v1.conf"),
        )
        .unwrap(),
    )
    .unwrap();
    let c = arg(&config);
    for args in [
        vec!["render", "--config", c],
        vec!["render", "--backend=nftables", "--config", c],
        vec!["check", c],
        vec!["explain", "--config", c, "8.8.8.8"],
        vec!["version"],
        vec!["--version"],
        vec!["windows-cni", "--config", c, "--cni-conf", arg(&conf)],
    ] {
        let mut command = Command::new(AGENT.path());
        command.args(&args);
        assert_quiet_exit(&args.join(" "), &output_into_a_closed_pipe(command));
    }
}

root_test!(
    /// Issue 15 #12, the commands that read the kernel.
    fn regression_status_and_cleanup_exit_quietly_on_a_closed_pipe() {
        let node = Netns::new("epipe");
        let volume = ConfigMapVolume::new("nonMasqueradeCIDRs: [10.0.0.0/8]\n");
        let path = volume.path();
        let c = arg(&path);
        for args in [["status", "--config", c], ["cleanup", "--config", c]] {
            let mut command = AGENT.command(&node);
            command.args(args);
            assert_quiet_exit(&args.join(" "), &output_into_a_closed_pipe(command));
        }
    }
);

root_test!(
    /// Issue 16 #8: a FIFO swapped in between the agent's stat and open blocked the sync
    /// loop for good (the open waits for a writer). Here a thread swaps the config file
    /// and a FIFO back and forth for 3 s, each swap a watch event and so a read; then a
    /// new config must still be applied.
    fn regression_fifo_swapped_in_under_a_running_agent_does_not_block_syncing() {
        let node = Netns::new("fifo");
        let dir = TempDir::new("fifo-swap");
        let config = dir.path.join("ip-masq-agent");
        let good = "nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 100ms\n";
        std::fs::write(&config, good).unwrap();
        let mut agent = AGENT.start(&node, &["--config", arg(&config)]);
        agent.wait_for_log("rules applied", 1, Duration::from_secs(20));

        let fifo = dir.path.join(".fifo");
        let regular = dir.path.join(".regular");
        let until = Instant::now() + Duration::from_secs(3);
        let mut swaps = 0;
        while Instant::now() < until && swaps < 200_000 {
            nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
            std::fs::rename(&fifo, &config).unwrap();
            std::fs::write(&regular, good).unwrap();
            std::fs::rename(&regular, &config).unwrap();
            swaps += 1;
        }
        // The last word: a regular file with a new list.
        std::fs::write(
            &regular,
            "nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\nresyncInterval: 100ms\n",
        )
        .unwrap();
        std::fs::set_permissions(&regular, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::rename(&regular, &config).unwrap();
        let applied = eventually(Duration::from_secs(10), || {
            chain_lines(&node.save("iptables-nft-save"), "IP-MASQ-AGENT")
                .iter()
                .any(|line| line.contains("-d 203.0.113.0/24"))
        });
        let refused = agent.log_lines("is not a regular file").len();
        eprintln!("{swaps} swaps; the agent refused a FIFO {refused} time(s)");
        assert!(agent.is_running(), "the agent exited");
        assert!(applied, "the agent stopped syncing after {swaps} swaps");
    }
);

root_test!(
    /// Issue 16 #12: on a read-only filesystem `windows-cni` blamed a stale temporary
    /// file that did not exist.
    fn regression_windows_cni_on_a_read_only_filesystem_names_the_cause() {
        let dir = TempDir::new("cni-ro");
        let mount = dir.path.join("mnt");
        std::fs::create_dir(&mount).unwrap();
        let config = dir.path.join("config");
        std::fs::write(&config, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
        let sample =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/win-bridge-v1.conf");
        // A private mount namespace: the read-only tmpfs goes away with the process.
        let script = format!(
            "mount -t tmpfs -o size=1m tmpfs {m} && cp {s} {m}/10.conf && mount -o remount,ro {m} && exec {a} windows-cni --cni-conf {m}/10.conf --config {c}",
            m = arg(&mount),
            s = arg(&sample),
            a = AGENT.path_str(),
            c = arg(&config),
        );
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .output()
            .expect("unshare");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("Read-only file system"), "{err}");
        assert!(!err.contains("stale"), "{err}");
        assert!(err.contains("creating the temporary file"), "{err}");
    }
);

root_test!(
    /// Issue 15 #7: the agent warns at start-up, and again on a change, when the source
    /// scope names no prefix of a family it manages, naming the family.
    fn regression_one_family_source_scope_is_warned_at_start_and_on_change() {
        let node = Netns::new("scope");
        let mut volume = ConfigMapVolume::new("masqueradeSourceCIDRs: [10.244.0.0/16]\n");
        let path = volume.path();
        let mut agent = AGENT.start(&node, &["--config", arg(&path), "--enable-ipv6"]);
        agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
        let warning = agent.wait_for_line(
            "masqueradeSourceCIDRs lists no IPv6 prefix, so no IPv6 source is masqueraded",
            1,
            Duration::from_secs(5),
        );
        assert!(warning.contains("WARN"), "{warning}");
        volume.update("masqueradeSourceCIDRs: ['fd00:10:244::/56']\n");
        agent.wait_for_log(
            "masqueradeSourceCIDRs lists no IPv4 prefix, so no IPv4 source is masqueraded",
            1,
            Duration::from_secs(10),
        );
        volume.update("masqueradeSourceCIDRs: [10.244.0.0/16, 'fd00:10:244::/56']\n");
        agent.wait_for_log("rules applied", 3, Duration::from_secs(10));
        assert_eq!(
            agent.log_lines("lists no IPv6 prefix").len(),
            1,
            "{}",
            agent.log()
        );
        assert_eq!(
            agent.log_lines("lists no IPv4 prefix").len(),
            1,
            "{}",
            agent.log()
        );
    }
);
