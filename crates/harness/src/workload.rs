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
