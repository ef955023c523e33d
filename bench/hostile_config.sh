#!/usr/bin/env bash
# Peak memory of `ip-masq-agent check FILE` for hostile config files that the file-size
# limit admits: alias bombs of several shapes, deep nesting, huge flat documents, many keys
# or anchors, long strings. Prints one Markdown table row per input: name, size in bytes,
# peak RSS (`/usr/bin/time` %M, kB), wall time and the start of what the agent printed.
#
# Needs python3 (to write the inputs) and GNU time (`apt-get install -y time`); no root.
# Nothing outside OUT is written; only the agent processes started here run.
#
# Usage (from the project root): bench/hostile_config.sh
# Knobs: AGENT=path (default target/release/ip-masq-agent, e.g. an older build to compare)
#        LIMIT=bytes (largest input to write; default 4194304, the agent's MAX_CONFIG_BYTES)
#        OUT=dir (default a fresh temporary directory, removed on exit)
set -euo pipefail
cd "$(dirname "$0")/.."

AGENT=${AGENT:-target/release/ip-masq-agent}
LIMIT=${LIMIT:-4194304}
if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d)
    trap 'rm -rf "$OUT"' EXIT
fi
[ -x /usr/bin/time ] || { echo "needs GNU time: apt-get install -y time" >&2; exit 1; }
[ -x "$AGENT" ] || { echo "no agent at $AGENT (cargo build --release)" >&2; exit 1; }

python3 - "$LIMIT" "$OUT" <<'EOF'
import os, sys
limit, out = int(sys.argv[1]), sys.argv[2]

def write(name, text):
    data = text.encode()
    assert len(data) <= limit, (name, len(data))
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)

def cidr_lines(count):
    for i in range(count):
        base = 0x0B000000 + (i << 8)
        yield f"  - {base >> 24}.{(base >> 16) & 255}.{(base >> 8) & 255}.0/24"

# The report's "billion laughs": 9 levels, each a list of 9 aliases of the level below.
lines, below = ["a: &a [" + ",".join(["x"] * 9) + "]"], "a"
for name in "bcdefghi":
    lines.append(f"{name}: &{name} [" + ",".join([f"*{below}"] * 9) + "]")
    below = name
write("alias_laughs_9x9", "\n".join(lines) + "\n")
# Wide and shallow: 1,000 scalars, 1,000 aliases of that, 1,000 aliases of that.
write("alias_wide_3x1000", "a: &a [" + ",".join(["x"] * 1000) + "]\nb: &b ["
      + ",".join(["*a"] * 1000) + "]\nc: [" + ",".join(["*b"] * 1000) + "]\n")
# One anchored list just under the anchor bound, replayed three times.
write("alias_list_49k_x3", "a: &a [" + ",".join(["x"] * 49000) + "]\nb: [*a, *a, *a]\n")
# A long anchored scalar replayed many times.
write("alias_scalar_half_limit", "a: &a " + "x" * (limit // 2) + "\nb: ["
      + ",".join(["*a"] * 100000) + "]\n")
write("alias_scalar_64k_x500k", "a: &a " + "y" * 65536 + "\nb: ["
      + ",".join(["*a"] * 500000) + "]\n")
# Anchors of anchors: 40 levels, each a list of two aliases of the level below.
lines = ["l0: &l0 [" + ",".join(["x"] * 100) + "]"]
lines += [f"l{i}: &l{i} [*l{i-1}, *l{i-1}]" for i in range(1, 40)]
write("alias_nested_anchors", "\n".join(lines) + "\n")
# Merge keys replaying a 1,000-key mapping 10,000 times.
keys = ",".join(f"k{i}: v" for i in range(1000))
write("merge_keys_1000x10000", "a: &a {" + keys + "}\nb: [" + ",".join(["{<<: *a}"] * 10000) + "]\n")
# Deep nesting.
write("deep_flow_lists_100k", "[" * 100000 + "]" * 100000 + "\n")
write("deep_flow_maps_100k", "{a: " * 100000 + "}" * 100000 + "\n")
write("deep_json_100k", '{"a":' * 100000 + "1" + "}" * 100000 + "\n")
write("deep_block_lists_2800", "".join(" " * i + "-\n" for i in range(2800)))
# Flat and large.
write("flow_list_of_x", "nonMasqueradeCIDRs: [" + ",".join(["x"] * ((limit - 40) // 2)) + "]\n")
write("block_list_of_x", "nonMasqueradeCIDRs:\n" + "- x\n" * ((limit - 40) // 4))
write("cidrs_200k", "cidrLimit: 300000\nnonMasqueradeCIDRs:\n" + "\n".join(cidr_lines(limit // 20)) + "\n")
write("cidrs_50k_accepted", "cidrLimit: 50000\nnonMasqueradeCIDRs:\n" + "\n".join(cidr_lines(50000)) + "\n")
write("long_items_100k", "k:\n" + ("- " + "s" * (limit // 100000 - 4) + "\n") * 99990)
write("one_item_lists", "k: [" + ",".join(["[a]"] * 60000) + "]\n")
write("one_key_maps", "k: [" + ",".join(["{a: b}"] * 40000) + "]\n")
write("many_keys", "".join(f"k{i:07d}: 1\n" for i in range(limit // 12)))
write("many_anchors", "a:\n" + "".join(f"- &a{i:07d} x\n" for i in range(limit // 16)))
write("many_documents", "---\n" * (limit // 4))
write("comments_only", ("#" + "c" * 78 + "\n") * (limit // 80))
# One long string, in each style that the scanner has to build a copy of.
write("long_plain_scalar", "resyncInterval: " + "x" * (limit - 20) + "\n")
write("long_escaped_scalar", 'resyncInterval: "' + "\\t" * ((limit - 24) // 2) + '"\n')
write("long_folded_scalar", "resyncInterval: >\n"
      + "  abcdefghijklmnopqrstuvwxyz0123456789\n" * ((limit - 40) // 39))
write("long_key", "? " + "k" * (limit - 20) + "\n: 1\n")
EOF

echo "| input | bytes | peak RSS (kB) | seconds | agent says |"
echo "|---|---:|---:|---:|---|"
for input in "$OUT"/*; do
    name=$(basename "$input")
    /usr/bin/time -o "$OUT/.time" -f "%M %e" "$AGENT" check "$input" >"$OUT/.said" 2>&1 || true
    read -r rss seconds < <(grep -v '^Command' "$OUT/.time")
    said=$(head -c 300 "$OUT/.said" | tr '\n\t|' '   ' | sed "s|$OUT/||g" | cut -c1-110)
    echo "| $name | $(stat -c %s "$input") | $rss | $seconds | \`$said\` |"
done
