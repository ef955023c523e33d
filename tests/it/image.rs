//! The shipped image, run the way the DaemonSet runs it. scripts/build-image.sh builds it
//! (tag: the manifest's `image:`); each test starts it with podman in the node namespace of
//! namespaces the test made (`--network ns:...`, never the host network), with the
//! manifest's securityContext, resource limit, mounts, command and args translated flag by
//! flag, and the config as a kubelet-style ConfigMap directory mounted read-only at
//! /etc/config. Packets from the pod namespace prove what it masquerades.
//!
//! Without podman or the image the tests are skipped with a note, except under CI=true,
//! where scripts/test.sh builds the image first and a missing one fails them.
//!
//! The image name is a manifest list with one image per architecture (scripts/build-image.sh,
//! ARCHES). The arm64 image runs here under qemu's user-mode emulation (binfmt_misc,
//! registered by scripts/install-deps.sh), picked from the list with `podman run --arch
//! arm64` as an arm64 node's runtime picks it. Under that emulation no arm64 process can
//! reach netfilter: qemu's socket(2) refuses AF_NETLINK with NETLINK_NETFILTER
//! (EPROTONOSUPPORT; it admits only NETLINK_ROUTE, NETLINK_KOBJECT_UEVENT and NETLINK_AUDIT),
//! which iptables-nft, nft and the agent's own netlink calls (nf_tables, conntrack) all need, and it does
//! not translate iptables-legacy's IPT_SO_GET_INFO getsockopt either.
//! `arm64_image_under_emulation_fails_exactly_at_netfilter` shows that; the packet tests run
//! the arm64 image's agent binary in the DaemonSet's container on the host's image of the
//! same list, whose iptables and nft are native, and check that it masquerades exactly
//! what the host's image does, with byte-identical rules, on iptables-nft. The nftables
//! backend writes only through the agent's own netfilter netlink socket, so under this
//! emulation the arm64 agent cannot program it at all:
//! `arm64_agent_on_the_nftables_backend_fails_exactly_at_its_netlink_socket` shows the
//! refused call and that nothing is written; its rules are proven byte-identical where
//! emulation allows (`arm64_binary_renders_byte_identical_rules_for_the_golden_configs`
//! renders the same nft table, and the arm64 unit tests check the netlink batch bytes).

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

/// Debian's (and OCI's) name for the architecture these tests run on.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The architectures whose images this run must have: ARCHES as scripts/build-image.sh
/// reads it (scripts/test.sh exports amd64,arm64), else both under CI=true, else the host's.
fn required_arches() -> Vec<String> {
    match std::env::var("ARCHES") {
        Ok(list) if !list.trim().is_empty() => list
            .split([',', ' '])
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
        _ if ci() => vec!["amd64".into(), "arm64".into()],
        _ => vec![host_arch().into()],
    }
}

/// Whether the kernel hands this architecture's ELF files to qemu, also inside a
/// container's root filesystem (the F flag).
fn binfmt_runs(arch: &str) -> bool {
    let qemu = match arch {
        "arm64" => "aarch64",
        "amd64" => "x86_64",
        other => other,
    };
    std::fs::read_to_string(format!("/proc/sys/fs/binfmt_misc/qemu-{qemu}")).is_ok_and(|entry| {
        entry.lines().next() == Some("enabled")
            && entry
                .lines()
                .any(|l| l.starts_with("flags:") && l.contains('F'))
    })
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
    if ci() {
        panic!("{message}");
    }
    eprintln!("SKIPPED: {message}");
    None
}

/// The DaemonSet's image name when its manifest list has an image for `arch` that this
/// machine can run. Missing: skipped with a note, unless `arch` is required (ARCHES, CI).
fn require_arch(arch: &str) -> Option<String> {
    let image = require_image()?;
    let missing = if !manifest_entries(&image)
        .iter()
        .any(|(listed, _)| listed == arch)
    {
        Some(format!(
            "an {arch} image in the manifest list {image} (ARCHES={},{arch} scripts/build-image.sh)",
            host_arch()
        ))
    } else if arch != host_arch() && !binfmt_runs(arch) {
        Some(format!(
            "qemu's binfmt_misc handler for {arch} (ARCHES={},{arch} scripts/install-deps.sh)",
            host_arch()
        ))
    } else {
        None
    };
    let Some(missing) = missing else {
        return Some(image);
    };
    let message = format!("needs {missing}");
    if required_arches().iter().any(|a| a == arch) {
        panic!("{message}");
    }
    eprintln!("SKIPPED: {message}");
    None
}

/// The manifest list's entries: (architecture, digest), in order; none when the name is
/// not a manifest list (an image from before the list).
fn manifest_entries(image: &str) -> Vec<(String, String)> {
    let out = podman(&["manifest", "inspect", image]);
    if !out.status.success() {
        return Vec::new();
    }
    let list: Value = serde_json::from_slice(&out.stdout).expect("manifest list JSON");
    list["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|entry| {
            assert_eq!(entry["platform"]["os"], "linux", "{entry}");
            (
                entry["platform"]["architecture"]
                    .as_str()
                    .expect("architecture")
                    .to_string(),
                entry["digest"].as_str().expect("digest").to_string(),
            )
        })
        .collect()
}

/// Where the image keeps the agent: its entrypoint, and upstream's path.
const AGENT_IN_IMAGE: &str = "/ip-masq-agent";

/// The agent binary of the list's `arch` image, copied out of it. (By its own tag:
/// podman 4.3's `create` ignores `--arch` for a manifest list, `run` does not;
/// `image_name_is_a_manifest_list_of_every_architecture_built` checks the tag is the
/// list's entry.)
fn binary_from_image(image: &str, arch: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new("binary");
    let name = unique_name("copy");
    let out = podman(&["create", "--name", &name, &format!("{image}-{arch}")]);
    assert!(
        out.status.success(),
        "podman create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dir.path.join(format!("ip-masq-agent-{arch}"));
    let copied = podman(&[
        "cp",
        &format!("{name}:{AGENT_IN_IMAGE}"),
        file.to_str().expect("utf-8"),
    ]);
    let _ = podman(&["rm", "--force", "--time", "0", &name]);
    assert!(
        copied.status.success(),
        "podman cp: {}",
        String::from_utf8_lossy(&copied.stderr)
    );
    assert_eq!(
        elf_machine(&file),
        elf_machine_of(arch),
        "{}",
        file.display()
    );
    (dir, file)
}

/// e_machine of an ELF file's header.
fn elf_machine(file: &Path) -> u16 {
    let header = std::fs::read(file).expect("read binary");
    assert_eq!(header.get(..4), Some(&b"\x7fELF"[..]), "{}", file.display());
    match header.get(18..20) {
        Some(&[low, high]) => u16::from_le_bytes([low, high]),
        _ => panic!("{}: no ELF header", file.display()),
    }
}

fn elf_machine_of(arch: &str) -> u16 {
    match arch {
        "amd64" => 62,  // EM_X86_64
        "arm64" => 183, // EM_AARCH64
        other => panic!("no ELF machine known for {other}"),
    }
}

/// What runs in the pod's container: the manifest list's image for `arch` (podman
/// `--arch`, as a node of that architecture pulls it), with `agent` bind-mounted read-only
/// over the image's own binary when set.
#[derive(Clone, Copy)]
struct Platform<'a> {
    arch: &'a str,
    agent: Option<&'a Path>,
}

impl Platform<'static> {
    /// The host's image as it is.
    fn host() -> Platform<'static> {
        Platform {
            arch: host_arch(),
            agent: None,
        }
    }
}

impl<'a> Platform<'a> {
    /// The host's image (native iptables and nft) running another architecture's agent
    /// binary under emulation: what the arm64 image's agent does with a kernel interface
    /// that works (see the module's doc).
    fn agent_on_host_image(agent: &'a Path) -> Platform<'a> {
        Platform {
            arch: host_arch(),
            agent: Some(agent),
        }
    }

    /// Whether the agent runs under user-mode emulation.
    fn emulated(&self) -> bool {
        match self.agent {
            Some(binary) => elf_machine(binary) != elf_machine_of(host_arch()),
            None => self.arch != host_arch(),
        }
    }
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
    platform: Platform,
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
    if let Some(agent) = platform.agent {
        run.push("--volume".into());
        run.push(format!("{}:{AGENT_IN_IMAGE}:ro", agent.display()));
    }
    if platform.arch != host_arch() {
        run.push(format!("--arch={}", platform.arch));
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
    fn start(
        pod: &Value,
        platform: Platform,
        node: &Netns,
        volumes: &Volumes,
        extra_args: &[&str],
    ) -> Container {
        let name = unique_name("agent");
        let args = podman_run_args(pod, platform, node, volumes, &name, extra_args);
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

fn deploy(pod: &Value, platform: Platform, topology: &Topology, extra_args: &[&str]) -> Deployed {
    let config = ConfigMapVolume::new(&example_config());
    let (lock_dir, lock) = xtables_lock();
    let volumes = Volumes {
        config: &config,
        xtables_lock: &lock,
    };
    let agent = Container::start(pod, platform, &topology.node, &volumes, extra_args);
    agent.wait_ready(&topology.node, pod);
    assert_probes_answer(&topology.node, pod);
    assert_sources(topology, &EXAMPLE_CASES);
    Deployed {
        config,
        agent,
        _lock_dir: lock_dir,
    }
}

/// The DaemonSet's container on iptables-nft: the example config's packets, then a
/// ConfigMap swap's, then `podman stop`.
fn masquerades_on_iptables_nft_and_follows_a_configmap_swap(platform: Platform) {
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
    } = deploy(&pod, platform, &topology, &[]);
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

image_test!(
    fn daemonset_container_masquerades_on_iptables_nft_and_follows_a_configmap_swap() {
        masquerades_on_iptables_nft_and_follows_a_configmap_swap(Platform::host());
    }
);

#[test]
fn arm64_agent_masquerades_as_the_host_image_does_on_iptables_nft() {
    let Some(image) = require_arch("arm64") else {
        return;
    };
    let (_dir, arm64) = binary_from_image(&image, "arm64");
    masquerades_on_iptables_nft_and_follows_a_configmap_swap(Platform::agent_on_host_image(&arm64));
}

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
        } = deploy(&pod, Platform::host(), &topology, &[]);
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

/// The DaemonSet's container with `--backend=nftables`: the example config's packets, a
/// swap that changes only the sets' elements (the agent sends those over its own netlink
/// socket), then `podman stop`.
fn masquerades_with_the_nftables_backend(platform: Platform) {
    let pod = pod_spec("daemonset.yaml");
    let topology = Topology::new();
    let node = &topology.node;
    let Deployed {
        mut config,
        agent,
        _lock_dir,
    } = deploy(&pod, platform, &topology, &["--backend=nftables"]);
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

image_test!(
    fn daemonset_container_masquerades_with_the_nftables_backend() {
        masquerades_with_the_nftables_backend(Platform::host());
    }
);

/// Under qemu's user-mode emulation the arm64 agent's nftables backend cannot open its
/// netfilter netlink socket (the backend writes only through it, no nft process): it says
/// exactly which call was refused and stops at start-up (as without nf_tables), having
/// written nothing; it is never ready.
#[test]
fn arm64_agent_on_the_nftables_backend_fails_exactly_at_its_netlink_socket() {
    let Some(image) = require_arch("arm64") else {
        return;
    };
    let (_dir, arm64) = binary_from_image(&image, "arm64");
    let platform = Platform::agent_on_host_image(&arm64);
    assert!(platform.emulated());
    let pod = pod_spec("daemonset.yaml");
    let topology = Topology::new();
    let config = ConfigMapVolume::new(&example_config());
    let (_lock_dir, lock) = xtables_lock();
    let volumes = Volumes {
        config: &config,
        xtables_lock: &lock,
    };
    let agent = Container::start(
        &pod,
        platform,
        &topology.node,
        &volumes,
        &["--backend=nftables"],
    );
    let refused = || {
        agent.logs().lines().any(|line| {
            line.contains("the nftables backend needs nf_tables")
                && line.contains("netlink socket: Protocol not supported (os error 93)")
        })
    };
    assert!(
        eventually(Duration::from_secs(30), refused),
        "the refused socket(2) is not in the log:\n{}",
        agent.logs()
    );
    let ruleset = topology.node.sh(&["nft", "list", "ruleset"]);
    assert!(
        !ruleset.contains("ip-masq-agent") && !ruleset.contains("IP-MASQ-AGENT"),
        "written under emulation:\n{ruleset}"
    );
    let (address, path) = probe_address(&pod, "readinessProbe");
    assert!(
        http_get(&topology.node, &address, &path).is_none_or(|(status, _)| status != 200),
        "ready though nothing was written"
    );
    assert!(!topology.is_masqueraded("203.0.113.10"));
}

image_test!(
    /// deploy/from-upstream/daemonset.yaml: upstream's DaemonSet with only the image swapped
    /// (and probes added) runs as it is, `command: ["/ip-masq-agent"]` and klog flags included.
    fn switched_upstream_daemonset_runs_unchanged() {
        let pod = pod_spec("from-upstream/daemonset.yaml");
        assert_eq!(only_container(&pod)["command"][0], "/ip-masq-agent");
        let topology = Topology::new();
        deploy(&pod, Platform::host(), &topology, &[]);
    }
);

/// The list's image for `arch` (run with `--arch`, as that architecture's node pulls it):
/// the agent at upstream's path, built for that architecture, as root, without a shell.
fn assert_image_shape(image: &str, arch: &str) {
    let tagged = format!("{image}-{arch}");
    let field = |format: &str| {
        let out = podman(&["image", "inspect", "--format", format, &tagged]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(field("{{.Os}}/{{.Architecture}}"), format!("linux/{arch}"));
    assert_eq!(
        field("{{json .Config.Entrypoint}}"),
        format!(r#"["{AGENT_IN_IMAGE}"]"#)
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
            "--arch",
            arch,
            "--entrypoint",
            entrypoint,
            image,
        ];
        full.extend_from_slice(args);
        let out = podman(&full);
        let _ = podman(&["rm", "--force", "--time", "0", &name]);
        out
    };
    let version = run(AGENT_IN_IMAGE, &["--version=raw"]);
    assert!(
        version.status.success(),
        "{}",
        String::from_utf8_lossy(&version.stderr)
    );
    let machine = match arch {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        other => other,
    };
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.contains(&format!("v{} ", env!("CARGO_PKG_VERSION")))
            && version.contains(&format!("linux {machine})")),
        "{version}"
    );
    for shell in ["/bin/sh", "/bin/bash", "/bin/dash", "/bin/busybox"] {
        assert!(
            !run(shell, &["-c", "true"]).status.success(),
            "{shell} in the image"
        );
    }
}

#[test]
fn image_runs_the_binary_at_upstreams_path_as_root_without_a_shell() {
    let Some(image) = require_arch(host_arch()) else {
        return;
    };
    assert_image_shape(&image, host_arch());
}

#[test]
fn arm64_image_runs_the_arm64_binary_at_upstreams_path_as_root_without_a_shell() {
    let Some(image) = require_arch("arm64") else {
        return;
    };
    assert_image_shape(&image, "arm64");
}

/// `podman manifest inspect` on the DaemonSet's image name: one entry per architecture
/// built, each the very image scripts/build-image.sh tagged NAME:TAG-ARCH.
#[test]
fn image_name_is_a_manifest_list_of_every_architecture_built() {
    let Some(image) = require_image() else {
        return;
    };
    let out = podman(&["manifest", "inspect", &image]);
    assert!(
        out.status.success(),
        "podman manifest inspect {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut listed = Vec::new();
    // The entry's digest names a manifest; an image can have several (one per format it was
    // pushed in), so the check is that both names reach the same image.
    let (repository, _tag) = image.rsplit_once(':').expect("NAME:TAG");
    let id = |name: &str| {
        let out = podman(&["image", "inspect", "--format", "{{.ID}}", name]);
        assert!(
            out.status.success(),
            "podman image inspect {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for (arch, digest) in manifest_entries(&image) {
        assert_eq!(
            id(&format!("{repository}@{digest}")),
            id(&format!("{image}-{arch}")),
            "the {arch} entry ({digest}) is {image}-{arch}"
        );
        listed.push(arch);
    }
    let mut unique = listed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        listed.len(),
        "one entry per architecture: {listed:?}"
    );
    for arch in required_arches() {
        assert!(
            listed.contains(&arch),
            "{image} lists {listed:?}, not {arch} (ARCHES={} scripts/build-image.sh)",
            required_arches().join(",")
        );
    }
}

/// The configs of the rendering goldens (src/backend/iptables/tests.rs and
/// src/backend/nftables/tests.rs), with the flags those tests set, plus exceptions and a
/// long list that the nftables backend merges.
fn golden_configs() -> Vec<(String, Vec<&'static str>)> {
    let mut long = String::from("cidrLimit: 5000\nnonMasqueradeCIDRs: [");
    for i in 0..2000u32 {
        // Every third /24 of 10.0.0.0/8 and some /25s inside kept ones: merging work.
        let (b, c) = ((i * 3) / 256, (i * 3) % 256);
        long.push_str(&format!("10.{b}.{c}.0/24, 10.{b}.{c}.128/25, "));
    }
    long.push_str("'fd00::/8']\n");
    let cases: Vec<(&str, Vec<&'static str>)> = vec![
        ("", vec![]),
        ("", vec!["--nomasq-all-reserved-ranges"]),
        ("", vec!["--random-fully=false"]),
        (
            "nonMasqueradeCIDRs: [192.168.0.0/16, 10.0.0.0/8, 192.168.0.0/16]\n",
            vec![],
        ),
        ("nonMasqueradeCIDRs: []\n", vec![]),
        ("nonMasqueradeCIDRs: []\n", vec!["--masq-chain=MY-MASQ"]),
        (
            "nonMasqueradeCIDRs: []\n",
            vec!["--to-ports=1024-29999,32768-65535"],
        ),
        (
            "masqLinkLocal: true\nnonMasqueradeCIDRs: [10.0.0.0/8]\n",
            vec![],
        ),
        (
            "nonMasqueradeCIDRs: [10.0.0.0/8, 'fd00::/8', '2001:db8:5::/48']\n",
            vec!["--enable-ipv6"],
        ),
        (
            "masqLinkLocalIPv6: true\nnonMasqueradeCIDRs: []\n",
            vec!["--enable-ipv6"],
        ),
        (
            "nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.7/32, 'fd00::1/128', '2001:db8::/32']\n",
            vec!["--enable-ipv6", "--to-ports=1024-29999,32768-65535"],
        ),
        (
            "nonMasqueradeCIDRs: [10.0.0.0/8]\nforceMasqueradeCIDRs: [10.3.0.0/16, 'fd00:3::/32']\nmasqueradeSourceCIDRs: [10.244.0.0/16]\n",
            vec!["--enable-ipv6"],
        ),
        (IDENTICAL_CONFIG, vec!["--enable-ipv6"]),
        (&long, vec!["--enable-ipv6"]),
    ];
    cases
        .into_iter()
        .map(|(config, flags)| (config.to_string(), flags))
        .collect()
}

/// `render` of every golden config on both backends by the arm64 image's binary (under
/// emulation) is byte for byte what the host image's binary and the tests' build print.
#[test]
fn arm64_binary_renders_byte_identical_rules_for_the_golden_configs() {
    let Some(image) = require_arch("arm64") else {
        return;
    };
    let (_host_dir, host) = binary_from_image(&image, host_arch());
    let (_arm64_dir, arm64) = binary_from_image(&image, "arm64");
    let dir = TempDir::new("golden");
    let mut compared = 0;
    for (i, (config, flags)) in golden_configs().iter().enumerate() {
        let file = dir.path.join(format!("config-{i}"));
        std::fs::write(&file, config).expect("write config");
        for backend in ["--backend=iptables", "--backend=nftables"] {
            let mut args = vec!["render", "--config", file.to_str().expect("utf-8"), backend];
            args.extend_from_slice(flags);
            let render = |binary: &Path| {
                let out = Command::new(binary).args(&args).output().expect("render");
                assert!(
                    out.status.success(),
                    "{} {}: {}",
                    binary.display(),
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
                (out.stdout, out.stderr)
            };
            let expected = render(AGENT.path());
            assert!(!expected.0.is_empty());
            assert_eq!(
                render(&host),
                expected,
                "the {} image's binary differs from the tests' build for {args:?} (an image \
                 older than the source? run scripts/build-image.sh)",
                host_arch()
            );
            assert_eq!(
                render(&arm64),
                expected,
                "the arm64 image's binary differs for {args:?}:\n{config}"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 2 * golden_configs().len());
}

/// What fails when the arm64 image runs under qemu's user-mode emulation, exactly: every
/// netfilter call of its own tools, in a namespace where the host image's same tools
/// work; and the agent run as the DaemonSet runs it says so, stays unready and writes
/// nothing.
#[test]
fn arm64_image_under_emulation_fails_exactly_at_netfilter() {
    let Some(image) = require_arch("arm64") else {
        return;
    };
    let node = Netns::new("emulated");
    let tool = |arch: &str, tool: &str, args: &[&str]| {
        let name = unique_name("tool");
        let network = format!("ns:/run/netns/{}", node.name);
        let mut full = vec![
            "run",
            "--rm",
            "--name",
            &name,
            "--network",
            &network,
            "--cap-drop",
            "ALL",
            "--cap-add",
            "NET_ADMIN",
            "--cap-add",
            "NET_RAW",
            "--arch",
            arch,
            "--entrypoint",
            tool,
            &image,
        ];
        full.extend_from_slice(args);
        let out = podman(&full);
        let _ = podman(&["rm", "--force", "--time", "0", &name]);
        out
    };
    // (tool, arguments, what the arm64 build prints under emulation, and why)
    let cases: [(&str, &[&str], &str); 4] = [
        // socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER) = -EPROTONOSUPPORT (qemu's do_socket)
        (
            "/usr/sbin/iptables-nft",
            &["-t", "nat", "-S"],
            "Failed to initialize nft: Protocol not supported",
        ),
        (
            "/usr/sbin/nft",
            &["list", "ruleset"],
            "Unable to initialize Netlink socket: Protocol not supported",
        ),
        // getsockopt(SOL_IP, IPT_SO_GET_INFO): qemu translates no iptables sockopt.
        (
            "/usr/sbin/iptables-legacy",
            &["-t", "nat", "-S"],
            "can't initialize iptables table `nat'",
        ),
        (
            "/usr/sbin/ip6tables-nft",
            &["-t", "nat", "-S"],
            "Failed to initialize nft: Protocol not supported",
        ),
    ];
    for (path, args, refusal) in cases {
        let native = tool(host_arch(), path, args);
        assert!(
            native.status.success(),
            "{path} {args:?} in the {} image: {}",
            host_arch(),
            String::from_utf8_lossy(&native.stderr)
        );
        let emulated = tool("arm64", path, args);
        let stderr = String::from_utf8_lossy(&emulated.stderr);
        assert!(
            !emulated.status.success() && stderr.contains(refusal),
            "{path} {args:?} in the arm64 image under emulation: {:?} {stderr} (if this works \
             now, the packet tests can run the arm64 image whole)",
            emulated.status
        );
    }

    // The agent, as the DaemonSet runs it: the flavour it detects, then the sync, hits it.
    let pod = pod_spec("daemonset.yaml");
    let config = ConfigMapVolume::new(&example_config());
    let (_lock_dir, lock) = xtables_lock();
    let volumes = Volumes {
        config: &config,
        xtables_lock: &lock,
    };
    let platform = Platform {
        arch: "arm64",
        agent: None,
    };
    let agent = Container::start(&pod, platform, &node, &volumes, &[]);
    assert!(
        eventually(Duration::from_secs(20), || agent
            .logs()
            .contains("Failed to initialize nft: Protocol not supported")),
        "no netlink refusal in the log:\n{}",
        agent.logs()
    );
    let (address, path) = probe_address(&pod, "readinessProbe");
    assert_ne!(
        http_get(&node, &address, &path).map(|(status, _)| status),
        Some(200),
        "ready without rules:\n{}",
        agent.logs()
    );
    assert!(
        !node.save("iptables-nft-save").contains("IP-MASQ-AGENT")
            && !node
                .sh(&["nft", "list", "ruleset"])
                .contains("ip-masq-agent"),
        "rules written:\n{}",
        agent.logs()
    );
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
fn rules_match_the_bare_binary(
    platform: Platform,
    prepare: impl Fn(&Netns),
    extra: &[&str],
    dumps: &[&[&str]],
) {
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
    let boxed = Container::start(&pod, platform, &boxed_ns, &volumes, &boxed_extra);
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
            Platform::host(),
            |_| {},
            IPTABLES_NFT_FLAGS,
            IPTABLES_NFT_DUMPS,
        );
    }
);

const IPTABLES_NFT_FLAGS: &[&str] = &[
    "--enable-ipv6",
    "--nomasq-all-reserved-ranges",
    "--to-ports=1024-29999,32768-65535",
];
const IPTABLES_NFT_DUMPS: &[&[&str]] = &[
    &["iptables-nft-save", "-t", "nat"],
    &["ip6tables-nft-save", "-t", "nat"],
    &["nft", "list", "ruleset"],
];
const NFTABLES_FLAGS: &[&str] = &[
    "--enable-ipv6",
    "--backend=nftables",
    "--to-ports=1024-29999,32768-65535",
];
const NFTABLES_DUMPS: &[&[&str]] = &[&["nft", "list", "ruleset"]];

#[test]
fn arm64_container_rules_are_byte_identical_to_the_bare_binary_on_iptables_nft() {
    let Some(image) = require_arch("arm64") else {
        return;
    };
    let (_dir, arm64) = binary_from_image(&image, "arm64");
    rules_match_the_bare_binary(
        Platform::agent_on_host_image(&arm64),
        |_| {},
        IPTABLES_NFT_FLAGS,
        IPTABLES_NFT_DUMPS,
    );
}

image_test!(
    fn container_rules_are_byte_identical_to_the_bare_binary_on_iptables_legacy() {
        rules_match_the_bare_binary(
            Platform::host(),
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
        rules_match_the_bare_binary(Platform::host(), |_| {}, NFTABLES_FLAGS, NFTABLES_DUMPS);
    }
);
