//! The prefix lists and config files the benchmarks feed the agent: many distinct /24s
//! that no backend can merge, and forceMasqueradeCIDRs nested inside them.

/// `count` aligned /24s, every other one from 11.0.0.0 upward (11.0.0.0/24, 11.0.2.0/24,
/// ...), so no two are adjacent and nothing merges; `offset` 1 gives the /24s in between,
/// a disjoint list of the same size. None contains 203.0.113.10.
pub fn spread_v4(count: usize, offset: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let j = 2 * i + offset;
            format!("{}.{}.{}.0/24", 11 + j / 65536, (j / 256) % 256, j % 256)
        })
        .collect()
}

/// `count` /26s, one inside every `stride`-th prefix of [`spread_v4`] (its .64/26), so
/// the flat answer "keep = non-masquerade minus force" splits each of those /24s in three.
pub fn nested_force_v4(count: usize, stride: usize) -> Vec<String> {
    spread_v4(count * stride, 0)
        .into_iter()
        .step_by(stride)
        .map(|prefix| prefix.replace(".0/24", ".64/26"))
        .collect()
}

/// `count` distinct aligned /24s from 10.0.0.0 (10.0.0.0/24, 10.0.1.0/24, ...), adjacent:
/// the start-up benchmark's list (upstream writes one rule per entry either way).
pub fn dense_v4(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect()
}

/// A YAML config: `nonMasqueradeCIDRs` and, when not empty, `forceMasqueradeCIDRs`,
/// with `cidrLimit` raised to fit and `extra` lines (e.g. `resyncInterval: 1h`) first.
pub fn yaml_config(non_masq: &[String], force: &[String], extra: &[&str]) -> String {
    let mut out = String::with_capacity(24 * (non_masq.len() + force.len()) + 200);
    out.push_str(&format!(
        "cidrLimit: {}\n",
        (non_masq.len() + force.len()).max(64)
    ));
    for line in extra {
        out.push_str(line);
        out.push('\n');
    }
    for (key, list) in [
        ("nonMasqueradeCIDRs", non_masq),
        ("forceMasqueradeCIDRs", force),
    ] {
        if list.is_empty() && key != "nonMasqueradeCIDRs" {
            continue;
        }
        if list.is_empty() {
            out.push_str(&format!("{key}: []\n"));
            continue;
        }
        out.push_str(&format!("{key}:\n"));
        for prefix in list {
            out.push_str(&format!("  - {prefix}\n"));
        }
    }
    out
}

/// The same config as JSON (what `kubectl create configmap --from-file` of a JSON file
/// holds).
pub fn json_config(non_masq: &[String], force: &[String]) -> String {
    let quoted = |list: &[String]| {
        list.iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "{{\"cidrLimit\":{},\"nonMasqueradeCIDRs\":[{}],\"forceMasqueradeCIDRs\":[{}]}}",
        (non_masq.len() + force.len()).max(64),
        quoted(non_masq),
        quoted(force)
    )
}

/// A nat table as kube-proxy (iptables mode) writes it for `services` Services of two
/// endpoints each, in iptables-restore form: KUBE-SERVICES, one KUBE-SVC and two KUBE-SEP
/// chains per Service, and KUBE-POSTROUTING's marked masquerade (about 1.3 kB a Service).
pub fn kube_proxy_nat(services: usize) -> String {
    let mut out = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    for i in 0..services {
        out.push_str(&format!(
            ":KUBE-SVC-{i:016X} - [0:0]\n:KUBE-SEP-{i:016X}A - [0:0]\n:KUBE-SEP-{i:016X}B - [0:0]\n"
        ));
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    out.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    out.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    out.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    out.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    for i in 0..services {
        let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
        let name = format!("namespace-{}/service-{i}:http", i % 100);
        let pod = |e: usize| format!("10.244.{}.{}", i % 200, i % 250 + e);
        out.push_str(&format!("-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport 80 -j KUBE-SVC-{i:016X}\n"));
        out.push_str(&format!("-A KUBE-SVC-{i:016X} ! -s 10.244.0.0/16 -d {ip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ\n"));
        out.push_str(&format!("-A KUBE-SVC-{i:016X} -m comment --comment \"{name} -> {}:8080\" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-{i:016X}A\n", pod(0)));
        out.push_str(&format!("-A KUBE-SVC-{i:016X} -m comment --comment \"{name} -> {}:8080\" -j KUBE-SEP-{i:016X}B\n", pod(1)));
        for (suffix, e) in [("A", 0), ("B", 1)] {
            out.push_str(&format!("-A KUBE-SEP-{i:016X}{suffix} -s {}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ\n", pod(e)));
            out.push_str(&format!("-A KUBE-SEP-{i:016X}{suffix} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {}:8080\n", pod(e)));
        }
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_distinct_and_nested_where_asked() {
        assert_eq!(
            spread_v4(3, 0),
            ["11.0.0.0/24", "11.0.2.0/24", "11.0.4.0/24"]
        );
        assert_eq!(spread_v4(2, 1), ["11.0.1.0/24", "11.0.3.0/24"]);
        assert_eq!(spread_v4(129, 0)[128], "11.1.0.0/24");
        assert_eq!(nested_force_v4(2, 10), ["11.0.0.64/26", "11.0.20.64/26"]);
        assert_eq!(dense_v4(257)[256], "10.1.0.0/24");
        let yaml = yaml_config(
            &spread_v4(1, 0),
            &nested_force_v4(1, 1),
            &["resyncInterval: 1h"],
        );
        assert_eq!(
            yaml,
            "cidrLimit: 64\nresyncInterval: 1h\nnonMasqueradeCIDRs:\n  - 11.0.0.0/24\nforceMasqueradeCIDRs:\n  - 11.0.0.64/26\n"
        );
        assert_eq!(
            yaml_config(&[], &[], &[]),
            "cidrLimit: 64\nnonMasqueradeCIDRs: []\n"
        );
        assert!(json_config(&spread_v4(1, 0), &[]).contains("[\"11.0.0.0/24\"]"));
    }
}
