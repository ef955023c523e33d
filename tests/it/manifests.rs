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
