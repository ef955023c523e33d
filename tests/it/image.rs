//! The shipped image, run the way the DaemonSet runs it. scripts/build-image.sh builds it
//! (tag: the manifest's `image:`); each test starts it with podman in the node namespace of
//! namespaces the test made (`--network ns:...`, never the host network), with the
//! manifest's securityContext, resource limit, mounts, command and args translated flag by
//! flag, and the config as a kubelet-style ConfigMap directory mounted read-only at
//! /etc/config. Packets from the pod namespace prove what it masquerades.
//!
//! Without podman or the image the tests are skipped with a note, except under CI=true,
//! where scripts/test.sh builds the image first and a missing one fails them.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ima_harness::*;
use serde_json::Value;

use crate::AGENT;

fn project() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifest(name: &str) -> Value {
    let text = std::fs::read_to_string(project().join("deploy").join(name)).expect("manifest");
    serde_saphyr::from_str(&text).expect("valid YAML")
}

/// The pod template of a DaemonSet under deploy/.
fn pod_spec(name: &str) -> Value {
    manifest(name)["spec"]["template"]["spec"].clone()
}

fn only_container(pod: &Value) -> &Value {
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// Podman's settings for this kind of machine (runc, ulimits), written by
/// scripts/build-image.sh: one place for the build and these tests.
fn containers_conf() -> PathBuf {
    project().join("target/image/containers.conf")
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .env("CONTAINERS_CONF", containers_conf())
        .args(args)
        .output()
        .expect("run podman")
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// The image deploy/daemonset.yaml names, when this machine can run it.
fn require_image() -> Option<String> {
    if !require_root() {
        return None;
    }
    let image = only_container(&pod_spec("daemonset.yaml"))["image"]
        .as_str()
        .expect("image")
        .to_string();
    let missing = if !on_path("podman") || !on_path("runc") {
        Some("podman and runc (apt-get install podman mmdebstrap runc)".to_string())
    } else if !containers_conf().is_file() {
        Some(format!(
            "{} (run scripts/build-image.sh)",
            containers_conf().display()
        ))
    } else if !podman(&["image", "exists", &image]).status.success() {
        Some(format!("the image {image} (run scripts/build-image.sh)"))
    } else {
        None
    };
    let Some(missing) = missing else {
        sweep_stale_containers();
        return Some(image);
    };
    let message = format!("needs {missing}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    eprintln!("SKIPPED: {message}");
    None
}

/// Removes containers left by an earlier test process that was killed outright: only
/// this harness's names (`ima-<pid>-...`) whose process is gone.
fn sweep_stale_containers() {
    let out = podman(&[
        "ps",
        "--all",
        "--filter",
        "name=^ima-",
        "--format",
        "{{.Names}}",
    ]);
    for name in String::from_utf8_lossy(&out.stdout).lines() {
        let pid = name
            .strip_prefix("ima-")
            .and_then(|rest| rest.split('-').next())
            .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if let Some(pid) = pid
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = podman(&["rm", "--force", "--time", "0", name]);
        }
    }
}

/// What the pod's volumes stand for in a test.
struct Volumes<'a> {
    /// The ConfigMap volume: a kubelet-style directory (`..data` swap).
    config: &'a ConfigMapVolume,
    /// Stands in for the host's /run/xtables.lock: a private file, so the test never
    /// contends with the host's own iptables users (the DaemonSet mounts the host's).
    xtables_lock: &'a Path,
}

/// `podman run` flags for the pod's container, translated from the manifest field by
/// field; a field without a translation here fails the test rather than being dropped.
fn podman_run_args(
    pod: &Value,
    node: &Netns,
    volumes: &Volumes,
    name: &str,
    extra_args: &[&str],
) -> Vec<String> {
    let mut run: Vec<String> = vec![
        "run".into(),
        "--detach".into(),
        "--name".into(),
        name.into(),
    ];
    // hostNetwork: the node's namespace, which this test made.
    assert_eq!(
        pod["hostNetwork"], true,
        "the agent needs the node's network"
    );
    run.push("--network".into());
    run.push(format!("ns:/run/netns/{}", node.name));
    let container = only_container(pod);
    for key in container.as_object().expect("container").keys() {
        assert!(
            [
                "name",
                "image",
                "imagePullPolicy",
                "command",
                "args",
                "securityContext",
                "resources",
                "livenessProbe",
                "readinessProbe",
                "volumeMounts",
            ]
            .contains(&key.as_str()),
            "container field {key} has no podman translation in this test"
        );
    }
    for (key, value) in container["securityContext"]
        .as_object()
        .into_iter()
        .flatten()
    {
        match (key.as_str(), value) {
            ("privileged", Value::Bool(false)) => {}
            ("allowPrivilegeEscalation", Value::Bool(false)) => {
                run.extend(["--security-opt".into(), "no-new-privileges".into()])
            }
            // Kubernetes mounts no tmpfs anywhere for a read-only root; podman would.
            ("readOnlyRootFilesystem", Value::Bool(true)) => {
                run.extend(["--read-only".into(), "--read-only-tmpfs=false".into()])
            }
            ("capabilities", caps) => {
                for (list, flag) in [("drop", "--cap-drop"), ("add", "--cap-add")] {
                    for cap in caps[list].as_array().into_iter().flatten() {
                        run.push(flag.into());
                        run.push(cap.as_str().expect("capability").into());
                    }
                }
            }
            other => panic!("securityContext {other:?} has no podman translation in this test"),
        }
    }
    for (key, value) in container["resources"]["limits"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let value = value.as_str().expect("quantity");
        match (key.as_str(), value.strip_suffix("Mi")) {
            ("memory", Some(mebibytes)) => run.push(format!("--memory={mebibytes}m")),
            other => panic!("limit {other:?} has no podman translation in this test"),
        }
    }
    let pod_volumes = pod["volumes"].as_array().expect("volumes");
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let volume = pod_volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("the mount's volume");
        let target = mount["mountPath"].as_str().expect("mountPath");
        let read_only = mount["readOnly"] == true;
        let source = if let Some(config_map) = volume.get("configMap") {
            for item in config_map["items"].as_array().into_iter().flatten() {
                assert_eq!(item["path"], CONFIG_KEY, "the config file's name");
            }
            // Kubelet mounts a ConfigMap volume read-only, readOnly or not.
            format!("{}:{target}:ro", volumes.config.dir.path.display())
        } else if volume["hostPath"]["path"] == "/run/xtables.lock" {
            let ro = if read_only { ":ro" } else { "" };
            format!("{}:{target}{ro}", volumes.xtables_lock.display())
        } else {
            panic!("volume {volume} has no stand-in in this test");
        };
        run.push("--volume".into());
        run.push(source);
    }
    if let Some(command) = container.get("command") {
        run.push(format!("--entrypoint={command}"));
    }
    run.push(container["image"].as_str().expect("image").into());
    for arg in container["args"].as_array().into_iter().flatten() {
        run.push(arg.as_str().expect("arg").into());
    }
    run.extend(extra_args.iter().map(|a| a.to_string()));
    run
}

/// The address the manifest's readiness probe uses (host network: the node's).
fn probe_address(pod: &Value, probe: &str) -> (String, String) {
    let get = &only_container(pod)[probe]["httpGet"];
    let host = get["host"].as_str().expect("probe host");
    let port = get["port"].as_u64().expect("probe port");
    (
        format!("{host}:{port}"),
        get["path"].as_str().expect("path").into(),
    )
}

/// A plain HTTP GET from inside `ns`; None while nothing listens.
fn http_get(ns: &Netns, address: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let address: SocketAddr = address.parse().expect("address");
    let path = path.to_string();
    ns.run_inside(move || {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split(' ').nth(1)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    })
}

/// A container started by the test; removed (by its id) on drop, also on failure.
struct Container {
    id: String,
}

impl Container {
    fn start(pod: &Value, node: &Netns, volumes: &Volumes, extra_args: &[&str]) -> Container {
        let name = unique_name("agent");
        let args = podman_run_args(pod, node, volumes, &name, extra_args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = podman(&args);
        assert!(
            out.status.success(),
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Container {
            id: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        }
    }

    fn logs(&self) -> String {
        let out = podman(&["logs", &self.id]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn inspect(&self, format: &str) -> String {
        let out = podman(&["inspect", "--format", format, &self.id]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits until the manifest's readiness probe passes: the first sync succeeded.
    fn wait_ready(&self, node: &Netns, pod: &Value) {
        let (address, path) = probe_address(pod, "readinessProbe");
        let ready = eventually(Duration::from_secs(20), || {
            http_get(node, &address, &path).is_some_and(|(status, _)| status == 200)
        });
        assert!(
            ready,
            "{path} on {address} never answered 200 (state {}):\n{}",
            self.inspect("{{.State.Status}} {{.State.ExitCode}}"),
            self.logs()
        );
    }

    /// `podman stop` as kubelet stops a pod: SIGTERM, then SIGKILL after the grace
    /// period (30 s, Kubernetes' default). Returns how long the agent took to exit.
    fn stop(&self) -> Duration {
        let started = Instant::now();
        let out = podman(&["stop", "--time", "30", &self.id]);
        assert!(
            out.status.success(),
            "podman stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- container log ---\n{}", self.logs());
        }
        let _ = podman(&["rm", "--force", "--time", "0", &self.id]);
    }
}

/// A private stand-in for the host's xtables lock file.
fn xtables_lock() -> (TempDir, PathBuf) {
    let dir = TempDir::new("lock");
    let file = dir.path.join("xtables.lock");
    std::fs::write(&file, "").expect("lock file");
    (dir, file)
}

fn example_config() -> String {
    manifest("configmap.yaml")["data"]["config"]
        .as_str()
        .expect("data.config")
        .to_string()
}

fn assert_sources(topology: &Topology, cases: &[(&str, bool)]) {
    for (destination, masqueraded) in cases {
        assert_eq!(
            topology.is_masqueraded(destination),
            *masqueraded,
            "{destination} should {}be masqueraded",
            if *masqueraded { "" } else { "not " }
        );
    }
}

/// deploy/configmap.yaml's config: RFC 1918 keeps the pod address, link-local too.
const EXAMPLE_CASES: [(&str, bool); 6] = [
    ("203.0.113.10", true),
    ("100.64.0.10", true),
    ("10.99.0.10", false),
    ("172.16.5.10", false),
    ("192.168.5.10", false),
    ("169.254.5.10", false),
];

fn assert_probes_answer(node: &Netns, pod: &Value) {
    for probe in ["livenessProbe", "readinessProbe"] {
        let (address, path) = probe_address(pod, probe);
        let answer = http_get(node, &address, &path);
        assert!(
            answer.as_ref().is_some_and(|(status, _)| *status == 200),
            "{probe}: GET {path} on {address}: {answer:?}"
        );
    }
}

/// `podman stop`: the agent exits promptly on SIGTERM (not killed after the grace
/// period), and the rules it wrote, and so the datapath, stay as they were.
fn assert_stop_keeps_the_rules(
    container: &Container,
    topology: &Topology,
    dump: impl Fn() -> String,
    cases: &[(&str, bool)],
) {
    let before = dump();
    let took = container.stop();
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
    assert_eq!(container.inspect("{{.State.Status}}"), "exited");
    let code = container.inspect("{{.State.ExitCode}}");
    assert!(code == "0" || code == "143", "exit code {code}");
    assert_eq!(dump(), before, "rules changed on stop");
    assert_sources(topology, cases);
}

/// A test that runs the image: skipped (with a note) when it or podman is missing, except
/// under CI=true, where `require_image` fails it.
macro_rules! image_test {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            if require_image().is_none() {
                return;
            }
            $body
        }
    };
}

/// The example config in a kubelet-style volume and a private xtables lock, with the
/// DaemonSet's container started on them: ready, answering its probes, and masquerading
/// as the example config says.
struct Deployed {
    config: ConfigMapVolume,
    agent: Container,
    _lock_dir: TempDir,
}

fn deploy(pod: &Value, topology: &Topology, extra_args: &[&str]) -> Deployed {
    let config = ConfigMapVolume::new(&example_config());
    let (lock_dir, lock) = xtables_lock();
    let volumes = Volumes {
        config: &config,
        xtables_lock: &lock,
    };
    let agent = Container::start(pod, &topology.node, &volumes, extra_args);
    agent.wait_ready(&topology.node, pod);
    assert_probes_answer(&topology.node, pod);
    assert_sources(topology, &EXAMPLE_CASES);
    Deployed {
        config,
        agent,
        _lock_dir: lock_dir,
    }
}

image_test!(
    fn daemonset_container_masquerades_on_iptables_nft_and_follows_a_configmap_swap() {
        let pod = pod_spec("daemonset.yaml");
        let topology = Topology::new();
        assert!(
            !topology.is_masqueraded("203.0.113.10"),
            "nothing masquerades before the agent runs"
        );
        let Deployed {
            mut config,
            agent,
            _lock_dir,
        } = deploy(&pod, &topology, &[]);
        let node = &topology.node;
        assert!(
            node.save("iptables-nft-save")
                .contains(":IP-MASQ-AGENT - [0:0]")
        );
        assert!(
            !node.sh(&["iptables-legacy-save"]).contains("IP-MASQ-AGENT"),
            "kubelet's flavour (none here: nft) is used"
        );

        // resyncInterval is 60s: the swap is seen through the read-only directory mount.
        config.update("nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 60s\n");
        let swapped = Instant::now();
        assert!(
            eventually(Duration::from_secs(5), || topology
                .is_masqueraded("192.168.5.10")),
            "ConfigMap swap not in force {:?} later",
            swapped.elapsed()
        );
        let after_swap = [
            ("172.16.5.10", true),
            ("10.99.0.10", false),
            ("169.254.5.10", false),
        ];
        assert_sources(&topology, &after_swap);
        assert_probes_answer(&topology.node, &pod);

        assert_stop_keeps_the_rules(
            &agent,
            &topology,
            || normalised(&node.save("iptables-nft-save")),
            &after_swap,
        );
    }
);

image_test!(
    fn daemonset_container_masquerades_on_iptables_legacy_when_kubelet_uses_it() {
        let pod = pod_spec("daemonset.yaml");
        let topology = Topology::new();
        let node = &topology.node;
        node.sh(&[
            "iptables-legacy",
            "-t",
            "mangle",
            "-N",
            "KUBE-KUBELET-CANARY",
        ]);
        let Deployed {
            agent, _lock_dir, ..
        } = deploy(&pod, &topology, &[]);
        assert!(
            node.save("iptables-legacy-save")
                .contains(":IP-MASQ-AGENT - [0:0]")
        );
        assert!(
            !node
                .sh(&["nft", "list", "ruleset"])
                .contains("IP-MASQ-AGENT"),
            "nothing in nft when kubelet uses legacy"
        );
        assert_stop_keeps_the_rules(
            &agent,
            &topology,
            || normalised(&node.save("iptables-legacy-save")),
            &EXAMPLE_CASES,
        );
    }
);

image_test!(
    fn daemonset_container_masquerades_with_the_nftables_backend() {
        let pod = pod_spec("daemonset.yaml");
        let topology = Topology::new();
        let node = &topology.node;
        let Deployed {
            mut config,
            agent,
            _lock_dir,
        } = deploy(&pod, &topology, &["--backend=nftables"]);
        let table = || node.sh(&["nft", "list", "table", "inet", "ip-masq-agent"]);
        assert!(table().contains("set non-masq-v4"));
        assert!(
            !node
                .sh(&["nft", "list", "ruleset"])
                .contains("IP-MASQ-AGENT")
        );

        config.update("nonMasqueradeCIDRs: [172.16.0.0/12]\nresyncInterval: 60s\n");
        assert!(
            eventually(Duration::from_secs(5), || topology
                .is_masqueraded("10.99.0.10")),
            "ConfigMap swap not in force"
        );
        let after_swap = [
            ("10.99.0.10", true),
            ("192.168.5.10", true),
            ("172.16.5.10", false),
        ];
        assert_sources(&topology, &after_swap);
        assert_stop_keeps_the_rules(&agent, &topology, || normalised(&table()), &after_swap);
    }
);

image_test!(
    /// deploy/from-upstream/daemonset.yaml: upstream's DaemonSet with only the image swapped
    /// (and probes added) runs as it is, `command: ["/ip-masq-agent"]` and klog flags included.
    fn switched_upstream_daemonset_runs_unchanged() {
        let pod = pod_spec("from-upstream/daemonset.yaml");
        assert_eq!(only_container(&pod)["command"][0], "/ip-masq-agent");
        let topology = Topology::new();
        deploy(&pod, &topology, &[]);
    }
);

#[test]
fn image_runs_the_binary_at_upstreams_path_as_root_without_a_shell() {
    let Some(image) = require_image() else {
        return;
    };
    let field = |format: &str| {
        let out = podman(&["image", "inspect", "--format", format, &image]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        field("{{json .Config.Entrypoint}}"),
        r#"["/ip-masq-agent"]"#
    );
    assert_eq!(field("{{.Config.User}}"), "0:0");
    assert_eq!(
        field(r#"{{index .Config.Labels "org.opencontainers.image.version"}}"#),
        format!("v{}", env!("CARGO_PKG_VERSION"))
    );
    assert!(!field(r#"{{index .Config.Labels "org.opencontainers.image.source"}}"#).is_empty());

    let run = |entrypoint: &str, args: &[&str]| {
        let name = unique_name("oneshot");
        let mut full = vec![
            "run",
            "--rm",
            "--name",
            &name,
            "--network",
            "none",
            "--entrypoint",
            entrypoint,
            &image,
        ];
        full.extend_from_slice(args);
        let out = podman(&full);
        let _ = podman(&["rm", "--force", "--time", "0", &name]);
        out
    };
    let version = run("/ip-masq-agent", &["version"]);
    assert!(
        version.status.success(),
        "{}",
        String::from_utf8_lossy(&version.stderr)
    );
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
    for shell in ["/bin/sh", "/bin/bash", "/bin/dash", "/bin/busybox"] {
        assert!(
            !run(shell, &["-c", "true"]).status.success(),
            "{shell} in the image"
        );
    }
}

/// Chain counters and nft counters zeroed, comment lines (timestamps) dropped.
fn normalised(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let line = match line.rfind(" [") {
            Some(at) if line.starts_with(':') && line.ends_with(']') => {
                format!("{} [0:0]", &line[..at])
            }
            _ => line.to_string(),
        };
        let mut words: Vec<&str> = line.split(' ').collect();
        for i in 1..words.len() {
            if matches!(words[i - 1], "packets" | "bytes") && words[i].parse::<u64>().is_ok() {
                words[i] = "0";
            }
        }
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}

const IDENTICAL_CONFIG: &str = "nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16, 100.64.0.0/10, 'fd00::/8']\nmasqLinkLocal: true\nresyncInterval: 60s\n";

/// The bare binary in one namespace, the container in another, the same config and flags:
/// every dump of the kernel's rules is the same, byte for byte (less counters/comments).
fn rules_match_the_bare_binary(prepare: impl Fn(&Netns), extra: &[&str], dumps: &[&[&str]]) {
    let pod = pod_spec("daemonset.yaml");
    let bare_ns = Netns::new("bare");
    let boxed_ns = Netns::new("boxed");
    prepare(&bare_ns);
    prepare(&boxed_ns);

    let bare_config = ConfigMapVolume::new(IDENTICAL_CONFIG);
    let config_path = bare_config.path();
    let mut bare_args = vec!["--config", config_path.to_str().expect("utf-8")];
    let manifest_args: Vec<&str> = only_container(&pod)["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    bare_args.extend_from_slice(&manifest_args);
    bare_args.extend_from_slice(extra);
    let mut bare = AGENT.start(&bare_ns, &bare_args);
    bare.wait_for_log("rules applied", 1, Duration::from_secs(20));

    let boxed_config = ConfigMapVolume::new(IDENTICAL_CONFIG);
    let (_lock_dir, lock) = xtables_lock();
    let volumes = Volumes {
        config: &boxed_config,
        xtables_lock: &lock,
    };
    // AgentProcess adds --v=2; so does this (verbosity changes no rule).
    let mut boxed_extra = extra.to_vec();
    boxed_extra.push("--v=2");
    let boxed = Container::start(&pod, &boxed_ns, &volumes, &boxed_extra);
    boxed.wait_ready(&boxed_ns, &pod);

    let mut everything = String::new();
    for dump in dumps {
        let bare_rules = normalised(&bare_ns.sh(dump));
        let boxed_rules = normalised(&boxed_ns.sh(dump));
        assert_eq!(
            boxed_rules,
            bare_rules,
            "`{}` differs between the container and the bare binary (an image older than \
             the source? run scripts/build-image.sh)",
            dump.join(" ")
        );
        everything.push_str(&bare_rules);
    }
    assert!(
        everything.to_lowercase().contains("ip-masq-agent"),
        "the dumps hold the agent's rules:\n{everything}"
    );
    assert!(bare.is_running());
}

image_test!(
    fn container_rules_are_byte_identical_to_the_bare_binary_on_iptables_nft() {
        rules_match_the_bare_binary(
            |_| {},
            &[
                "--enable-ipv6",
                "--nomasq-all-reserved-ranges",
                "--to-ports=1024-29999,32768-65535",
            ],
            &[
                &["iptables-nft-save", "-t", "nat"],
                &["ip6tables-nft-save", "-t", "nat"],
                &["nft", "list", "ruleset"],
            ],
        );
    }
);

image_test!(
    fn container_rules_are_byte_identical_to_the_bare_binary_on_iptables_legacy() {
        rules_match_the_bare_binary(
            |ns| {
                ns.sh(&[
                    "iptables-legacy",
                    "-t",
                    "mangle",
                    "-N",
                    "KUBE-KUBELET-CANARY",
                ]);
            },
            &["--enable-ipv6", "--nomasq-all-reserved-ranges"],
            &[
                &["iptables-legacy-save", "-t", "nat"],
                &["ip6tables-legacy-save", "-t", "nat"],
                &["nft", "list", "ruleset"],
            ],
        );
    }
);

image_test!(
    fn container_rules_are_byte_identical_to_the_bare_binary_with_nftables() {
        rules_match_the_bare_binary(
            |_| {},
            &[
                "--enable-ipv6",
                "--backend=nftables",
                "--to-ports=1024-29999,32768-65535",
            ],
            &[&["nft", "list", "ruleset"]],
        );
    }
);
