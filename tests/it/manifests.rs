//! The deployment manifests keep the security-relevant promises.

use std::path::PathBuf;

fn load(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("manifest");
    serde_saphyr::from_str(&text).expect("valid YAML")
}

#[test]
fn daemonset_is_least_privilege_and_probes_the_real_port() {
    let ds = load("daemonset.yaml");
    assert_eq!(ds["kind"], "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let security = &c["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let mut added: Vec<&str> = security["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    added.sort_unstable();
    assert_eq!(added, ["NET_ADMIN", "NET_RAW"]);
    assert!(
        c["resources"]["requests"]["cpu"].is_string()
            && c["resources"]["requests"]["memory"].is_string()
    );

    // The probes hit the address the agent is told to listen on.
    let address = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .find_map(|a| a.strip_prefix("--metrics-address="))
        .expect("--metrics-address");
    let (host, port) = address.rsplit_once(':').unwrap();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            get["port"].as_u64().map(|p| p.to_string()).as_deref(),
            Some(port),
            "{probe}"
        );
        assert_eq!(
            get["host"], host,
            "{probe}: a loopback endpoint needs host: {host}"
        );
    }

    // The ConfigMap arrives as a directory volume (never subPath), optional, and the
    // xtables lock is shared with the host.
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert!(
        mounts.iter().all(|m| m.get("subPath").is_none()),
        "no subPath: it never receives updates"
    );
    let volumes = pod["volumes"].as_array().unwrap();
    let config = volumes
        .iter()
        .find(|v| v.get("configMap").is_some())
        .expect("config volume");
    assert_eq!(config["configMap"]["optional"], true);
    assert!(
        mounts
            .iter()
            .any(|m| m["name"] == config["name"] && m["mountPath"] == "/etc/config")
    );
    let lock = volumes
        .iter()
        .find(|v| v["hostPath"]["path"] == "/run/xtables.lock")
        .expect("xtables lock");
    assert!(
        mounts
            .iter()
            .any(|m| m["name"] == lock["name"] && m["mountPath"] == "/run/xtables.lock")
    );
}

#[test]
fn example_configmap_is_a_valid_config() {
    let cm = load("configmap.yaml");
    let text = cm["data"]["config"].as_str().expect("data.config");
    let loaded =
        ip_masq_agent::config::parse(text, std::path::Path::new("configmap"), Default::default())
            .expect("valid");
    assert_eq!(loaded.config.non_masquerade_cidrs.len(), 3);
    assert!(loaded.warnings.is_empty());
}

/// Every manifest under deploy/, for the schema check.
fn manifests() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("deploy/") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The Kubernetes versions the manifests support: every one whose schemas
/// kubernetes-validate 1.37.0 ships.
const KUBERNETES_VERSIONS: std::ops::RangeInclusive<u32> = 25..=37;

/// kubernetes-validate from the venv scripts/install-validator.sh makes (scripts/test.sh
/// runs it); outside CI a missing one skips the check with a note.
fn validator() -> Option<PathBuf> {
    let tool = std::env::var_os("KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/kubernetes-validate")
        });
    if tool.is_file() {
        return Some(tool);
    }
    let message = format!(
        "needs {} (run scripts/install-validator.sh)",
        tool.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    eprintln!("SKIPPED: {message}");
    None
}

fn validate(tool: &std::path::Path, version: u32, files: &[PathBuf]) -> std::process::Output {
    std::process::Command::new(tool)
        .args(["--strict", "--quiet", "-k", &format!("1.{version}.0")])
        .args(files)
        .output()
        .expect("run kubernetes-validate")
}

#[test]
fn manifests_validate_strictly_against_kubernetes_1_25_to_1_37_schemas() {
    let Some(tool) = validator() else {
        return;
    };
    let files = manifests();
    assert!(files.len() >= 4, "{files:?}");
    for version in KUBERNETES_VERSIONS {
        let out = validate(&tool, version, &files);
        assert!(
            out.status.success(),
            "Kubernetes 1.{version}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The check has teeth: a misspelt field fails it.
    let bad = std::env::temp_dir().join(format!("ima-{}-misspelt.yaml", std::process::id()));
    let daemonset = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/daemonset.yaml"),
    )
    .expect("read");
    std::fs::write(
        &bad,
        daemonset.replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:"),
    )
    .expect("write");
    let out = validate(
        &tool,
        *KUBERNETES_VERSIONS.end(),
        std::slice::from_ref(&bad),
    );
    let _ = std::fs::remove_file(&bad);
    assert!(!out.status.success(), "a misspelt field passed --strict");
}

#[test]
fn daemonset_image_is_fully_qualified_and_what_build_image_tags() {
    let expected = format!("localhost/ip-masq-agent:v{}", env!("CARGO_PKG_VERSION"));
    for name in ["daemonset.yaml", "from-upstream/daemonset.yaml"] {
        let ds = load(name);
        let image = &ds["spec"]["template"]["spec"]["containers"][0]["image"];
        assert_eq!(image, expected.as_str(), "{name}");
    }
    // scripts/build-image.sh tags localhost/ip-masq-agent:v<Cargo.toml version>.
    let script = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/build-image.sh"),
    )
    .expect("build-image.sh");
    assert!(script.contains("IMAGE=${IMAGE:-localhost/ip-masq-agent:v$version}"));
}

/// deploy/from-upstream: the switch is the image line, plus optional probes.
#[test]
fn switching_from_upstream_changes_only_the_image_and_adds_probes() {
    let before = load("from-upstream/upstream.yaml");
    let mut after = load("from-upstream/daemonset.yaml");
    let old_image = before["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    assert!(
        old_image
            .as_str()
            .is_some_and(|i| i.starts_with("registry.k8s.io/networking/ip-masq-agent:v2.12."))
    );
    let container = after["spec"]["template"]["spec"]["containers"][0]
        .as_object_mut()
        .expect("container");
    container.insert("image".into(), old_image);
    container.remove("livenessProbe");
    container.remove("readinessProbe");
    assert_eq!(
        after, before,
        "only the image line and the probes may differ"
    );

    // README shows that diff.
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .expect("README.md");
    for line in [
        "-          image: registry.k8s.io/networking/ip-masq-agent:v2.12.6",
        &format!(
            "+          image: localhost/ip-masq-agent:v{}",
            env!("CARGO_PKG_VERSION")
        ),
        "+          readinessProbe:",
    ] {
        assert!(readme.contains(line), "README lacks {line:?}");
    }
}
