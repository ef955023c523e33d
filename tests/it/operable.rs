//! The operator's view: the HTTP endpoint against a running agent, the commands, and
//! the deployment manifests.

use std::path::PathBuf;
use std::time::Duration;

use ima_harness::*;

use crate::AGENT;

const METRICS: &str = "127.0.0.1:9910";

/// The agent on iptables-nft with the HTTP endpoint at `METRICS`, not waiting for a sync.
fn start_with_endpoint(node: &Netns, volume: &ConfigMapVolume) -> AgentProcess {
    let path = volume.path();
    let metrics = format!("--metrics-address={METRICS}");
    AGENT.start(
        node,
        &[
            "--config",
            path.to_str().unwrap(),
            "--iptables-mode=nft",
            &metrics,
            // Liveness allows one sync's tool deadline beyond 3 x resyncInterval.
            "--tool-timeout=1s",
        ],
    )
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

root_test!(
    fn metrics_and_health_follow_syncs_that_succeed_then_keep_failing() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new("resyncInterval: 200ms\n");
        let mut agent = start_with_endpoint(&node, &volume);
        agent.wait_for_log("rules resynced", 2, Duration::from_secs(5));

        let (status, body) = node.http_get(METRICS, "/metrics");
        assert_eq!(status, 200);
        let successes = metric(&body, "ip_masq_agent_syncs_total{result=\"success\"}");
        assert!(successes >= 3.0, "{body}");
        assert_eq!(
            metric(
                &body,
                "ip_masq_agent_config_reloads_total{result=\"success\"}"
            ),
            successes
        );
        assert_eq!(
            metric(
                &body,
                "ip_masq_agent_prefixes{family=\"ipv4\",backend=\"iptables\"}"
            ),
            3.0,
            "{body}"
        );
        assert!(body.contains("ip_masq_agent_config{hash=\""), "{body}");
        assert!(
            metric(
                &body,
                "ip_masq_agent_last_successful_sync_timestamp_seconds"
            ) > 1.7e9,
            "{body}"
        );
        assert!(
            metric(&body, "ip_masq_agent_sync_duration_seconds_count") >= successes,
            "{body}"
        );
        assert_eq!(node.http_get(METRICS, "/healthz").0, 200);
        assert_eq!(node.http_get(METRICS, "/readyz").0, 200);
        assert_eq!(node.http_get(METRICS, "/nope").0, 404);

        // Drift is counted.
        node.sh(&["iptables-nft", "-t", "nat", "-F", "IP-MASQ-AGENT"]);
        assert!(eventually(Duration::from_secs(3), || {
            metric(
                &node.http_get(METRICS, "/metrics").1,
                "ip_masq_agent_drift_repairs_total",
            ) >= 1.0
        }));

        // Someone else takes the chain over (only their rules in it, written in one
        // transaction so no resync lands in between): the agent may not flush it, so every
        // sync fails.
        let mut restore = node
            .command("iptables-nft-restore")
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("iptables-nft-restore");
        std::io::Write::write_all(
            &mut restore.stdin.take().expect("stdin"),
            b"*nat\n:IP-MASQ-AGENT - [0:0]\n-A IP-MASQ-AGENT -s 10.9.9.9 -j ACCEPT\nCOMMIT\n",
        )
        .expect("write");
        assert!(restore.wait().expect("wait").success());
        agent.wait_for_log("refusing to flush it", 1, Duration::from_secs(3));
        assert!(eventually(Duration::from_secs(3), || {
            metric(
                &node.http_get(METRICS, "/metrics").1,
                "ip_masq_agent_syncs_total{result=\"failure\"}",
            ) >= 2.0
        }));
        // 3 x resyncInterval (600 ms) after the last success, liveness fails with the reason.
        assert!(eventually(Duration::from_secs(5), || node
            .http_get(METRICS, "/healthz")
            .0
            == 503));
        let (_, reason) = node.http_get(METRICS, "/healthz");
        assert!(
            reason.contains("holds only rules the agent did not write (1, e.g."),
            "{reason}"
        );
        assert_eq!(
            node.http_get(METRICS, "/readyz").0,
            200,
            "ready stays true after the first sync"
        );
        assert!(agent.is_running());

        // Giving the chain back brings health back.
        node.sh(&["iptables-nft", "-t", "nat", "-F", "IP-MASQ-AGENT"]);
        assert!(eventually(Duration::from_secs(5), || node
            .http_get(METRICS, "/healthz")
            .0
            == 200));
    }
);

root_test!(
    fn readyz_waits_for_the_first_successful_sync() {
        let node = Netns::new("node");
        node.sh(&["iptables-nft", "-t", "nat", "-N", "IP-MASQ-AGENT"]);
        node.sh(&[
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "IP-MASQ-AGENT",
            "-j",
            "ACCEPT",
        ]);
        let volume = ConfigMapVolume::new("resyncInterval: 200ms\n");
        let mut agent = start_with_endpoint(&node, &volume);
        agent.wait_for_log("refusing to flush it", 1, Duration::from_secs(5));
        let (status, body) = node.http_get(METRICS, "/readyz");
        assert_eq!(status, 503, "{body}");
        node.sh(&["iptables-nft", "-t", "nat", "-F", "IP-MASQ-AGENT"]);
        assert!(eventually(Duration::from_secs(5), || node
            .http_get(METRICS, "/readyz")
            .0
            == 200));
    }
);

root_test!(
    fn json_logs_carry_level_time_message_and_fields() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new("");
        let path = volume.path();
        let mut agent = AGENT.start(
            &node,
            &[
                "--config",
                path.to_str().unwrap(),
                "--log-format=json",
                "--metrics-address=",
            ],
        );
        agent.wait_for_log("rules applied", 1, Duration::from_secs(5));
        let line = agent
            .log()
            .lines()
            .find(|l| l.contains("rules applied"))
            .unwrap_or_default()
            .to_string();
        let event: serde_json::Value =
            serde_json::from_str(&line).expect("one JSON object per line");
        assert_eq!(event["level"], "INFO");
        assert!(event["timestamp"].is_string());
        assert_eq!(event["message"], "rules applied");
        assert_eq!(event["prefixes"], 3);
    }
);

fn run(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(AGENT.path())
        .args(args)
        .output()
        .expect("run agent binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reports_warnings_and_errors_with_exit_codes() {
    let dir = TempDir::new("check");
    let good = dir.path.join("good");
    std::fs::write(&good, "nonMasqueradeCIDR: [10.0.0.0/8]\n").unwrap();
    let (code, out, _) = run(&["check", good.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(
        out.contains("did you mean \"nonMasqueradeCIDRs\"?"),
        "{out}"
    );
    let bad = dir.path.join("bad");
    std::fs::write(&bad, "nonMasqueradeCIDRs:\n  - 10.0.0.1/8\n").unwrap();
    let (code, _, err) = run(&["check", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "{}:2:5: nonMasqueradeCIDRs[0]: CIDR \"10.0.0.1/8\" is not aligned",
            bad.display()
        )),
        "{err}"
    );
    let (code, out, _) = run(&["check", dir.path.join("missing").to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("the agent would use the defaults"), "{out}");
}

#[test]
fn render_prints_each_backends_payload() {
    let dir = TempDir::new("render");
    let config = dir.path.join("config");
    std::fs::write(&config, "nonMasqueradeCIDRs: [10.0.0.0/8, 10.1.0.0/16]\n").unwrap();
    let c = format!("--config={}", config.display());
    let (code, iptables, _) = run(&["render", &c]);
    assert_eq!(code, 0);
    assert!(
        iptables.contains("*nat\n:IP-MASQ-AGENT - [0:0]\n"),
        "{iptables}"
    );
    assert!(
        iptables.contains("-A IP-MASQ-AGENT -d 10.1.0.0/16 "),
        "{iptables}"
    );
    let (_, nft, _) = run(&["render", "--backend=nftables", &c]);
    assert!(nft.contains("\t\t\t10.0.0.0/8,\n"), "overlap merged: {nft}");
    assert!(!nft.contains("10.1.0.0/16"), "{nft}");
    let (_, windows, _) = run(&["render", "--backend", "windows", &c]);
    let list: Vec<String> = serde_json::from_str(&windows).expect("a JSON list");
    assert_eq!(list, ["169.254.0.0/16", "10.0.0.0/8", "10.1.0.0/16"]);
}

#[test]
fn windows_cni_round_trip_changes_only_the_list() {
    let dir = TempDir::new("cni");
    let config = dir.path.join("config");
    std::fs::write(
        &config,
        "nonMasqueradeCIDRs: [10.0.0.0/8]\nmasqLinkLocal: true\n",
    )
    .unwrap();
    for sample in ["win-bridge-v1.conf", "win-bridge-v2.conf"] {
        let original = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data")
                .join(sample),
        )
        .unwrap();
        let conf = dir.path.join(sample);
        std::fs::write(&conf, &original).unwrap();
        let (code, out, err) = run(&[
            "windows-cni",
            "--cni-conf",
            conf.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("exception list set to 10.0.0.0/8"), "{out}");
        let rewritten = std::fs::read_to_string(&conf).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&rewritten).unwrap();
        let policy = &parsed["policies"][0]["value"];
        let list = if sample.contains("v2") {
            &policy["Settings"]["Exceptions"]
        } else {
            &policy["ExceptionList"]
        };
        assert_eq!(list, &serde_json::json!(["10.0.0.0/8"]));
        // Outside the list the file is byte-identical: splice the old list back in.
        let start = original
            .find(if sample.contains("v2") {
                "\"Exceptions\": ["
            } else {
                "\"ExceptionList\": ["
            })
            .unwrap();
        let old_end = original[start..].find(']').unwrap() + start + 1;
        let new_end = rewritten[start..].find(']').unwrap() + start + 1;
        assert_eq!(&rewritten[..start], &original[..start], "{sample}");
        assert_eq!(&rewritten[new_end..], &original[old_end..], "{sample}");
        let (_, again, _) = run(&[
            "windows-cni",
            "--cni-conf",
            conf.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ]);
        assert!(again.contains("already up to date"), "{again}");
    }
}

root_test!(
    fn explain_agrees_with_packets() {
        let topology = Topology::new();
        let config = "nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16, 'fd00:99::/32']\nmasqLinkLocal: true\n";
        let volume = ConfigMapVolume::new(config);
        let path = volume.path();
        let mut agent = AGENT.start(
            &topology.node,
            &["--config", path.to_str().unwrap(), "--enable-ipv6"],
        );
        agent.wait_for_log("rules applied", 1, Duration::from_secs(10));
        let mut args = vec![
            "explain",
            "--enable-ipv6",
            "--config",
            path.to_str().unwrap(),
        ];
        args.extend(REMOTE_DESTINATIONS);
        let (code, out, err) = run(&args);
        assert_eq!(code, 0, "{err}");
        for (destination, line) in REMOTE_DESTINATIONS.iter().zip(out.lines()) {
            assert!(line.starts_with(&format!("{destination}: ")), "{line}");
            let says_masqueraded = line.contains(": MASQUERADED");
            assert_eq!(
                topology.is_masqueraded(destination),
                says_masqueraded,
                "explain said: {line}"
            );
        }
    }
);

root_test!(
    fn status_reports_sync_and_drift() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new("resyncInterval: 1h\n");
        let path = volume.path();
        for backend in ["--backend=iptables", "--backend=nftables"] {
            let mut agent = AGENT.start(
                &node,
                &[
                    "--config",
                    path.to_str().unwrap(),
                    backend,
                    "--iptables-mode=nft",
                ],
            );
            agent.wait_for_log("rules applied", 1, Duration::from_secs(10));
            agent.terminate();
            let status = |ns: &Netns| {
                ns.output(&[
                    AGENT.path_str(),
                    "status",
                    "--config",
                    path.to_str().unwrap(),
                    backend,
                    "--iptables-mode=nft",
                ])
            };
            let out = status(&node);
            assert!(
                out.status.success(),
                "{backend}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            if backend.ends_with("nftables") {
                node.sh(&[
                    "nft",
                    "add element inet ip-masq-agent non-masq-v4 { 198.51.100.0/24 }",
                ]);
            } else {
                node.sh(&["iptables-nft", "-t", "nat", "-D", "IP-MASQ-AGENT", "2"]);
            }
            let out = status(&node);
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(1), "{backend}: {text}");
            assert!(text.contains("out of sync"), "{text}");
            assert!(
                text.contains("198.51.100.0/24")
                    || text.contains("- -A IP-MASQ-AGENT -d 10.0.0.0/8"),
                "{backend}: {text}"
            );
        }
    }
);

/// A GET of `path` on `METRICS` that reports a down or busy endpoint as None instead of
/// panicking; `timeout` bounds the connect and each read.
fn try_get(node: &Netns, path: &str, timeout: Duration) -> Option<(u16, String)> {
    node.try_http_get(METRICS, path, timeout)
}

fn healthz_answers(node: &Netns) -> bool {
    try_get(node, "/healthz", Duration::from_secs(1)).is_some_and(|(status, _)| status == 200)
}

/// `count` connections to `METRICS` that never send a byte, held until dropped.
fn idle_connections(node: &Netns, count: usize) -> Vec<std::net::TcpStream> {
    let held = node.idle_tcp_connections(METRICS.parse().expect("address"), count);
    assert_eq!(
        held.len(),
        count,
        "the kernel completes a connect even before accept"
    );
    held
}

fn lines_containing(log: &str, text: &str) -> usize {
    log.lines().filter(|l| l.contains(text)).count()
}

/// User plus system CPU time of the whole process (all threads), from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the parenthesised command name start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let after_name = stat.rsplit_once(')').expect("comm").1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    let per_second = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(100.0);
    ticks / per_second
}

root_test!(
    /// Defect 5 of "Never break a node": a taken --metrics-address made the agent exit 1
    /// before its first sync, a crash loop with pods unmasqueraded.
    fn regression_metrics_port_taken_does_not_stop_syncing() {
        let node = Netns::new("node");
        let squatter = node.tcp_listener(METRICS.parse().unwrap());
        let volume = ConfigMapVolume::new("resyncInterval: 1s\n");
        let mut agent = start_with_endpoint(&node, &volume);
        agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
        let rules = chain_lines(&node.save("iptables-nft-save"), "IP-MASQ-AGENT");
        assert!(
            rules.iter().any(|l| l.starts_with("-A POSTROUTING")) && rules.len() >= 3,
            "{rules:?}"
        );
        agent.wait_for_log(
            "cannot serve /metrics, /healthz and /readyz on 127.0.0.1:9910",
            1,
            Duration::from_secs(5),
        );
        // A retry fails too, and syncing goes on meanwhile.
        agent.wait_for_log(
            "binding 127.0.0.1:9910 failed again",
            1,
            Duration::from_secs(5),
        );
        agent.wait_for_log("rules resynced", 1, Duration::from_secs(5));
        assert!(agent.is_running());
        assert_eq!(
            lines_containing(&agent.log(), "cannot serve /metrics"),
            1,
            "the taken port is warned about once:\n{}",
            agent.log()
        );

        drop(squatter);
        assert!(
            eventually(Duration::from_secs(15), || healthz_answers(&node)),
            "the endpoint never bound after the port was freed:\n{}",
            agent.log()
        );
        let (_, health) = try_get(&node, "/healthz", Duration::from_secs(2)).expect("/healthz");
        assert!(health.starts_with("ok: "), "{health}");
        assert!(
            health.contains("this endpoint was bound") && health.contains("failed attempt(s)"),
            "{health}"
        );
        let (status, metrics) =
            try_get(&node, "/metrics", Duration::from_secs(2)).expect("/metrics");
        assert_eq!(status, 200);
        assert_eq!(
            metric(&metrics, "ip_masq_agent_http_endpoint_bound"),
            1.0,
            "{metrics}"
        );
        assert!(
            metric(&metrics, "ip_masq_agent_http_bind_failures_total") >= 2.0,
            "{metrics}"
        );
        assert!(
            metric(&metrics, "ip_masq_agent_syncs_total{result=\"success\"}") >= 2.0,
            "{metrics}"
        );
        let log = agent.log();
        let applied = log.find("rules applied").expect("applied");
        let bound = log
            .find("serving /metrics, /healthz and /readyz on http://127.0.0.1:9910 (bound after")
            .expect("the late bind is logged");
        assert!(applied < bound, "rules came first:\n{log}");
        assert!(agent.is_running());
    }
);

root_test!(
    /// accept() failing with EMFILE used to be retried at once: a core spun and the log
    /// filled, and the connections took the descriptors the sync needs for its pipes.
    fn regression_accept_errors_back_off() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new("resyncInterval: 1s\n");
        let mut agent = start_with_endpoint(&node, &volume);
        agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
        assert!(eventually(Duration::from_secs(5), || healthz_answers(
            &node
        )));

        // Leave the agent 8 free descriptor numbers (a limit counts numbers, and those in
        // use above it stay open): connections take them, then accept() fails with EMFILE
        // while more connections wait in the backlog.
        let pid = agent.pid();
        let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fd dir")
            .count();
        let limit = open + 8;
        let prlimit = std::process::Command::new("prlimit")
            .args([
                "--pid",
                &pid.to_string(),
                &format!("--nofile={limit}:{limit}"),
            ])
            .status()
            .expect("run prlimit");
        assert!(prlimit.success());
        let clients = idle_connections(&node, 40);
        agent.wait_for_log(
            "accepting an HTTP connection failed",
            1,
            Duration::from_secs(5),
        );

        let resyncs_before = lines_containing(&agent.log(), "rules resynced");
        let cpu_before = cpu_seconds(pid);
        std::thread::sleep(Duration::from_millis(2500));
        let cpu = cpu_seconds(pid) - cpu_before;
        assert!(cpu < 0.5, "{cpu:.2} s of CPU in 2.5 s:\n{}", agent.log());
        let log = agent.log();
        let accept_lines = lines_containing(&log, "accept");
        assert!(
            accept_lines < 20,
            "{accept_lines} lines about accept:\n{log}"
        );
        assert!(
            lines_containing(&log, "rules resynced") >= resyncs_before + 2,
            "syncing stopped while accept() failed:\n{log}"
        );
        assert!(agent.is_running());

        drop(clients);
        assert!(
            eventually(Duration::from_secs(10), || healthz_answers(&node)),
            "{}",
            agent.log()
        );
        let (_, metrics) = try_get(&node, "/metrics", Duration::from_secs(2)).expect("/metrics");
        assert!(
            metric(&metrics, "ip_masq_agent_http_accept_errors_total") >= 1.0,
            "{metrics}"
        );
        let resyncs = lines_containing(&agent.log(), "rules resynced");
        agent.wait_for_log("rules resynced", resyncs + 1, Duration::from_secs(5));
    }
);

root_test!(
    /// More idle connections than the cap (64) must neither stop syncing nor keep the
    /// endpoint away: past the cap the longest idle connections are closed, and a probe
    /// is answered at once (tests/it/tenants.rs holds 1,000 from another process).
    fn regression_connection_cap_keeps_health_reachable() {
        let node = Netns::new("node");
        let volume = ConfigMapVolume::new("resyncInterval: 1s\n");
        let mut agent = start_with_endpoint(&node, &volume);
        agent.wait_for_log("rules applied", 1, Duration::from_secs(20));
        assert!(eventually(Duration::from_secs(5), || healthz_answers(
            &node
        )));

        let clients = idle_connections(&node, 80);
        let resyncs_before = lines_containing(&agent.log(), "rules resynced");
        for _ in 0..5 {
            assert!(healthz_answers(&node), "{}", agent.log());
        }
        agent.wait_for_log(
            "rules resynced",
            resyncs_before + 3,
            Duration::from_secs(10),
        );
        let (_, metrics) = try_get(&node, "/metrics", Duration::from_secs(1)).expect("/metrics");
        // 80 idle and 6 served, at most 64 open at once.
        assert!(
            metric(&metrics, "ip_masq_agent_http_connections_closed_total") >= 16.0,
            "{metrics}"
        );
        assert!(agent.is_running());
        drop(clients);
    }
);
