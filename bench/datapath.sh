#!/usr/bin/env bash
# New-connection rate through a node running the agent, for growing prefix lists, on three
# setups: iptables-nft rules, iptables-legacy rules, the native nftables backend.
#
#   pod (examples/udp_flood) --veth--> node (agent's rules, conntrack, NAT) --veth--> remote
#
# Every packet is a new UDP connection (unique source/destination port pair: 4096 source
# ports per destination port, see examples/udp_flood.rs for why) to 203.0.113.10,
# an address the remote namespace owns and no configured prefix contains, so every packet is
# conntracked, walks the whole nat chain (or one set lookup) and is masqueraded. The remote
# counts arrivals with an nft counter in its own netdev ingress hook (and drops them there).
# Rate = packets counted at the remote / send duration. Median of RUNS runs per point.
#
# Safety: everything happens in namespaces named ima-bench2-<pid>-..., created here, joined
# only to each other and deleted on exit (also on failure); the host's firewall is never
# touched; the generator only sends to the remote's own address and stops after 200,000
# packets or 3 s per run; only processes started here are killed, by PID.
#
# Usage (root, from the project root): bench/datapath.sh > datapath.md
# Knobs: SIZES="0 64 1000 10000 50000" SETUPS="iptables-nft iptables-legacy nftables" RUNS=3
#        NO_BUILD=1 (use the existing target/release binaries)
#        QUIET_MAX=15 QUIET_WAIT=60 (wait up to QUIET_WAIT s per run for CPUs <= QUIET_MAX % busy)
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-"0 64 1000 10000 50000"}
SETUPS=${SETUPS:-"iptables-nft iptables-legacy nftables"}
RUNS=${RUNS:-3}
PACKETS=200000 # per run; udp_flood clamps to 200,000 anyway
MILLIS=3000    # per run; udp_flood clamps to 3 s anyway
TAG="ima-bench2-$$"
POD_IP=10.244.1.2
NODE_IP=192.0.2.1
DST=203.0.113.10
DPORT_BASE=10000 # measured packets use ports 10000..10048 (udp_flood --sport-span 4096); warm-up 20000
AGENT=target/release/ip-masq-agent
FLOOD=target/release/examples/udp_flood

log() { echo "[datapath] $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

[ "$(id -u)" = 0 ] || die "run as root"
for tool in ip nft iptables-nft iptables-legacy conntrack sysctl; do
    command -v "$tool" >/dev/null || die "missing $tool (apt-get install iptables nftables iproute2 conntrack procps)"
done
if [ -z "${NO_BUILD:-}" ]; then
    cargo build --release --quiet --bin ip-masq-agent --example udp_flood >&2
fi
[ -x "$AGENT" ] && [ -x "$FLOOD" ] || die "build $AGENT and $FLOOD first"

WORK=$(mktemp -d "/tmp/$TAG.XXXXXX")
# Private copies: a concurrent cargo build must not swap the binaries mid-run.
cp "$AGENT" "$WORK/ip-masq-agent"
AGENT="$WORK/ip-masq-agent"
cp "$FLOOD" "$WORK/udp_flood"
FLOOD="$WORK/udp_flood"
CREATED_NS=()
declare -A HOLDER # namespace -> PID of the `sleep` that keeps it alive
AGENT_PID=""

cleanup() {
    local rc=$? ns pid
    if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID" 2>/dev/null || true
        wait "$AGENT_PID" 2>/dev/null || true
    fi
    for ns in "${CREATED_NS[@]}"; do
        ip netns delete "$ns" 2>/dev/null || true
    done
    for pid in "${HOLDER[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# The integration tests' start-up sweep (tests/common/mod.rs) deletes every "ima-*"
# namespace whose second field is not a live PID, and "bench2" never is, so a concurrent
# `cargo test` unnames our namespaces. Each namespace is held by a `sleep` started here,
# so it survives losing its name, and the name is put back before every use.
reattach() {
    local ns=$1
    if [ ! -e "/run/netns/$ns" ]; then
        ip netns attach "$ns" "${HOLDER[$ns]}" 2>/dev/null || true
        log "namespace $ns lost its name (concurrent test sweep?); re-attached"
    fi
}

in_ns() {
    local ns=$1 try rc=0
    shift
    for try in 1 2 3; do
        reattach "$ns"
        rc=0
        ip netns exec "$ns" "$@" && return 0 || rc=$?
        [ ! -e "/run/netns/$ns" ] || return "$rc"
    done
    return "$rc"
}

new_ns() {
    local ns=$1 try pid
    for try in 1 2 3 4 5; do
        ip netns add "$ns" 2>/dev/null || [ -e "/run/netns/$ns" ] || die "ip netns add $ns"
        CREATED_NS+=("$ns")
        ip netns exec "$ns" sleep 900 </dev/null >/dev/null 2>&1 &
        pid=$!
        # The holder counts once it runs `sleep`, i.e. after it entered the namespace.
        while kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != sleep ]; do
            sleep 0.01
        done
        if kill -0 "$pid" 2>/dev/null; then
            HOLDER[$ns]=$pid
            return 0
        fi
        wait "$pid" 2>/dev/null || true
        ip netns delete "$ns" 2>/dev/null || true
    done
    die "could not create namespace $ns"
}

# pod -> node -> remote, as in tests/common/mod.rs; names $TAG-<point>-{pod,node,remote}.
POD="" NODE="" REMOTE=""
make_topology() {
    local point=$1
    POD="$TAG-$point-pod" NODE="$TAG-$point-node" REMOTE="$TAG-$point-remote"
    for ns in "$POD" "$NODE" "$REMOTE"; do
        new_ns "$ns"
        in_ns "$ns" ip link set lo up
    done
    reattach "$NODE"
    in_ns "$POD" ip link add eth0 type veth peer name pod0 netns "$NODE"
    reattach "$REMOTE"
    in_ns "$NODE" ip link add eth1 type veth peer name eth0 netns "$REMOTE"
    in_ns "$POD" ip link set eth0 up
    in_ns "$NODE" ip link set pod0 up
    in_ns "$NODE" ip link set eth1 up
    in_ns "$REMOTE" ip link set eth0 up
    in_ns "$POD" ip addr add "$POD_IP/24" dev eth0
    in_ns "$NODE" ip addr add 10.244.1.1/24 dev pod0
    in_ns "$NODE" ip addr add "$NODE_IP/24" dev eth1
    in_ns "$REMOTE" ip addr add 192.0.2.2/24 dev eth0
    in_ns "$REMOTE" ip addr add "$DST/32" dev lo
    in_ns "$POD" ip route add default via 10.244.1.1
    in_ns "$NODE" ip route add default via 192.0.2.2
    in_ns "$REMOTE" ip route add 10.244.1.0/24 via "$NODE_IP"
    in_ns "$NODE" sysctl -q -w net.ipv4.ip_forward=1
    # The remote counts (and drops) the flood at its ingress: masqueraded vs not.
    cat >"$WORK/remote.nft" <<EOF
table netdev ima_bench {
    chain ingress {
        type filter hook ingress device "eth0" priority -500; policy accept;
        ip daddr $DST ip saddr $NODE_IP udp dport $DPORT_BASE-$((DPORT_BASE + 99)) counter drop comment "masq"
        ip daddr $DST udp dport $DPORT_BASE-$((DPORT_BASE + 99)) counter drop comment "other"
        ip daddr $DST udp dport 20000-20009 drop
    }
}
EOF
    in_ns "$REMOTE" nft -f "$WORK/remote.nft"
}

drop_topology() {
    local ns pid
    for ns in "$POD" "$NODE" "$REMOTE"; do
        ip netns delete "$ns" 2>/dev/null || true
        pid=${HOLDER[$ns]:-}
        if [ -n "$pid" ]; then
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            unset "HOLDER[$ns]"
        fi
    done
    local keep=()
    for ns in "${CREATED_NS[@]}"; do
        case "$ns" in "$POD" | "$NODE" | "$REMOTE") ;; *) keep+=("$ns") ;; esac
    done
    CREATED_NS=("${keep[@]}")
}

# Aligned /24s from 11.0.0.0 upward, every other one (so none merge): 11.0.0.0, 11.0.2.0, ...
prefixes() {
    local count=$1 offset=$2
    awk -v n="$count" -v off="$offset" 'BEGIN {
        for (i = 0; i < n; i++) {
            j = 2 * i + off
            printf "  - %d.%d.%d.0/24\n", 11 + int(j / 65536), int(j / 256) % 256, j % 256
        }
    }'
}

# Written outside the config directory and renamed in (one event for the agent's watch).
write_config() {
    local file=$1 count=$2 offset=${3:-0}
    {
        echo "cidrLimit: 60000"
        echo "masqLinkLocal: true"
        echo "resyncInterval: 1h"
        if [ "$count" = 0 ]; then
            echo "nonMasqueradeCIDRs: []"
        else
            echo "nonMasqueradeCIDRs:"
            prefixes "$count" "$offset"
        fi
    } >"$WORK/staging.yaml"
    mv -f "$WORK/staging.yaml" "$file"
}

backend_flags() {
    case $1 in
    iptables-nft) echo "--backend=iptables --iptables-mode=nft" ;;
    iptables-legacy) echo "--backend=iptables --iptables-mode=legacy" ;;
    nftables) echo "--backend=nftables" ;;
    *) die "unknown setup $1" ;;
    esac
}

# Starts the agent in $NODE, waits for its first sync, then stops it (rules stay) so no
# resync runs during the measurement. Sets SYNC_MS to the first sync's elapsed_ms.
program_node() {
    local setup=$1 count=$2 point=$3
    # The config gets a directory of its own: the agent reloads on any change in the
    # directory of its config, so a log written there would keep it resyncing non-stop.
    mkdir -p "$WORK/cfg-$point"
    local cfg="$WORK/cfg-$point/ip-masq-agent" agent_log="$WORK/$point.log"
    write_config "$cfg" "$count"
    ns_alive || return 2
    # shellcheck disable=SC2046
    ip netns exec "$NODE" "$AGENT" --config "$cfg" $(backend_flags "$setup") --v=2 \
        </dev/null >"$agent_log" 2>&1 &
    AGENT_PID=$!
    local waited=0
    until grep -qs "rules applied" "$agent_log"; do
        if ! kill -0 "$AGENT_PID" 2>/dev/null; then
            wait "$AGENT_PID" 2>/dev/null || true
            AGENT_PID=""
            ns_alive || return 2
            cat "$agent_log" >&2
            die "agent exited early ($setup, $count prefixes)"
        fi
        [ "$waited" -lt 3000 ] || die "agent did not sync within 300 s ($setup, $count)"
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -TERM "$AGENT_PID"
    wait "$AGENT_PID" || true
    AGENT_PID=""
    if grep -Eq " (ERROR|WARN) " "$agent_log"; then
        log "agent log ($setup, $count) has warnings/errors:"
        grep -E " (ERROR|WARN) " "$agent_log" >&2 || true
    fi
    local line prefixes_seen
    line=$(grep -m1 "rules applied" "$agent_log")
    prefixes_seen=$(sed -n 's/.*prefixes=\([0-9]*\).*/\1/p' <<<"$line")
    [ "$prefixes_seen" = "$count" ] || die "agent applied $prefixes_seen prefixes, wanted $count: $line"
    SYNC_MS=$(sed -n 's/.*elapsed_ms="\{0,1\}\([0-9.]*\).*/\1/p' <<<"$line")
}

# Names put back if a sweep took them; false if a namespace is really gone.
ns_alive() {
    local ns
    for ns in "$POD" "$NODE" "$REMOTE"; do
        kill -0 "${HOLDER[$ns]}" 2>/dev/null || return 1
        reattach "$ns"
        [ -e "/run/netns/$ns" ] || return 1
    done
}

# Packets counted by the remote's ingress rules: "masq other".
remote_counts() {
    in_ns "$REMOTE" nft list chain netdev ima_bench ingress |
        awk '/comment "masq"/ { for (i = 1; i <= NF; i++) if ($i == "packets") m = $(i + 1) }
             /comment "other"/ { for (i = 1; i <= NF; i++) if ($i == "packets") o = $(i + 1) }
             END { print m + 0, o + 0 }'
}

# The box may be shared: before each run wait (up to QUIET_WAIT s) until the CPUs were at
# most QUIET_MAX % busy over half a second, so other work does not eat the forwarding core.
QUIET_MAX=${QUIET_MAX:-15}
QUIET_WAIT=${QUIET_WAIT:-60}
cpu_busy_pct() {
    local a b
    a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat)
    sleep 0.5
    b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        busy = y[1] - x[1]; idle = y[2] - x[2];
        printf "%d", (busy + idle) ? 100 * busy / (busy + idle) : 0 }'
}
wait_quiet() {
    local waited=0 busy
    while :; do
        busy=$(cpu_busy_pct)
        [ "$busy" -gt "$QUIET_MAX" ] || return 0
        if [ "$waited" -ge "$QUIET_WAIT" ]; then
            log "WARNING: box still ${busy}% busy after ${waited} s; measuring anyway"
            echo x >>"$WORK/noisy"
            return 0
        fi
        [ "$waited" -gt 0 ] || log "box ${busy}% busy (other work); waiting for it to settle"
        sleep 1.5
        waited=$((waited + 2))
    done
}

# One measured run; echoes "rate delivered sent elapsed_ns masq other". Returns 2 if the
# namespaces vanished (runs in a command substitution, so errors are checked by hand).
run_once() {
    ns_alive || return 2
    # Warm neighbour caches on every hop (ports outside the counted range), then start clean.
    in_ns "$POD" "$FLOOD" --src "$POD_IP" --dst "$DST" --count 200 --millis 500 \
        --dport-base 20000 >/dev/null 2>&1 || return 2
    in_ns "$NODE" conntrack -F >/dev/null 2>&1 || true
    wait_quiet >&2
    local before after out
    before=$(remote_counts) || return 2
    in_ns "$POD" "$FLOOD" --src "$POD_IP" --dst "$DST" --count "$PACKETS" --millis "$MILLIS" \
        --dport-base "$DPORT_BASE" --sport-span 4096 >"$WORK/flood.out" || return 2
    out=$(cat "$WORK/flood.out")
    sleep 0.3 # let queued packets land
    after=$(remote_counts) || return 2
    ns_alive || return 2
    local sent elapsed
    sent=$(sed -n 's/.*sent=\([0-9]*\).*/\1/p' <<<"$out")
    elapsed=$(sed -n 's/.*elapsed_ns=\([0-9]*\).*/\1/p' <<<"$out")
    read -r bm bo <<<"$before"
    read -r am ao <<<"$after"
    local masq=$((am - bm)) other=$((ao - bo))
    local delivered=$((masq + other))
    local rate=$((delivered * 1000000000 / elapsed))
    echo "$rate $delivered $sent $elapsed $masq $other"
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print int((v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

kpps() { awk -v r="$1" 'BEGIN { if (r >= 10000) printf "%.0fk", r / 1000; else if (r >= 1000) printf "%.1fk", r / 1000; else printf "%d", r }'; }

# Programs a fresh topology for one (setup, size) and measures it RUNS times.
# Returns 2 if the namespaces vanished meanwhile.
measure_point() {
    local setup=$1 size=$2 r res rate delivered sent elapsed masq other rc
    point=$((point + 1))
    make_topology "$point"
    log "$setup $size prefixes: load average $(cut -d' ' -f1-3 /proc/loadavg)"
    rc=0
    program_node "$setup" "$size" "$point" || rc=$?
    [ "$rc" = 0 ] || return "$rc"
    SYNC[$setup,$size]=$SYNC_MS
    local rates=()
    for r in $(seq "$RUNS"); do
        res=$(run_once) || return 2
        read -r rate delivered sent elapsed masq other <<<"$res"
        log "$setup $size prefixes run $r: rate=$rate delivered=$delivered sent=$sent elapsed_ns=$elapsed masqueraded=$masq not_masqueraded=$other"
        [ "$other" = 0 ] || log "WARNING: $other packets reached the remote without masquerade"
        rates+=("$rate")
    done
    RESULT[$setup,$size]=$(printf '%s\n' "${rates[@]}" | median)
    RUNLIST[$setup,$size]="${rates[*]}"
    log "$setup $size prefixes: median ${RESULT[$setup,$size]} pps (runs: ${rates[*]})"
    drop_topology
}

declare -A RESULT SYNC RUNLIST
point=0
started=$(date +%s)
REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
[ -z "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ] || REV+="+uncommitted changes in src/Cargo"
log "kernel $(uname -r), $(nproc) CPUs; setups: $SETUPS; sizes: $SIZES; $RUNS runs each"

# The generator alone: pod -> node with no rules at all (no conntrack in the node), to show
# the sender is not the bottleneck.
make_topology base
rates=()
for r in $(seq "$RUNS"); do
    res=$(run_once) || die "baseline run failed"
    rates+=("${res%% *}")
    log "no rules (no conntrack) run $r: rate delivered sent elapsed_ns masq other = $res"
done
BASE_RATE=$(printf '%s\n' "${rates[@]}" | median)
drop_topology

for setup in $SETUPS; do
    for size in $SIZES; do
        for attempt in 1 2 3; do
            if measure_point "$setup" "$size"; then
                break
            fi
            log "our namespaces went away under us; redoing $setup $size"
            drop_topology
            [ "$attempt" -lt 3 ] || die "namespaces deleted three times; giving up"
        done
    done
done
finished=$(date +%s)

# Markdown report.
echo "### New-connection rate through the node (packets/s, median of $RUNS runs)"
echo
echo "Agent $("$AGENT" --version 2>&1 | head -1), tree $REV. Kernel $(uname -r), $(nproc) CPUs. Every packet is a new UDP connection; \"0\" has no prefix at all"
echo "(\`masqLinkLocal: true\`), only conntrack + MASQUERADE. Generator alone, node without any rules"
echo "(no conntrack): $(kpps "$BASE_RATE")/s."
echo
header="| setup |"
sep="|---|"
for size in $SIZES; do
    header+=" $size |"
    sep+="---:|"
done
echo "$header"
echo "$sep"
for setup in $SETUPS; do
    row="| $setup |"
    for size in $SIZES; do row+=" $(kpps "${RESULT[$setup,$size]}") |"; done
    echo "$row"
done
echo
first_size=${SIZES%% *}
last_size=${SIZES##* }
if [[ " $SETUPS " == *" nftables "* ]]; then
    r0=${RESULT[nftables,$first_size]}
    rl=${RESULT[nftables,$last_size]}
    pct=$(awk -v a="$rl" -v b="$r0" 'BEGIN { printf "%.1f", 100 * a / b }')
    met=$(awk -v p="$pct" 'BEGIN { print (p >= 90) ? "met" : "NOT met" }')
    echo "nftables at $last_size prefixes: $(kpps "$rl")/s = $pct % of its rate at $first_size prefixes ($(kpps "$r0")/s); target >= 90 %: **$met**."
    echo
fi
echo "Every run (packets/s; median first):"
echo
echo '```'
for setup in $SETUPS; do
    for size in $SIZES; do
        printf '%-16s %6s prefixes: %8s   runs: %s\n' "$setup" "$size" "${RESULT[$setup,$size]}" "${RUNLIST[$setup,$size]}"
    done
done
echo '```'
echo
echo "First-sync time of the agent while programming each point (ms, one sample each):"
echo
echo "$header"
echo "$sep"
for setup in $SETUPS; do
    row="| $setup |"
    for size in $SIZES; do row+=" ${SYNC[$setup,$size]} |"; done
    echo "$row"
done
echo
noisy=0
[ ! -f "$WORK/noisy" ] || noisy=$(wc -l <"$WORK/noisy")
echo "Whole run: $((finished - started)) s; $noisy run(s) measured while other work kept the CPUs over $QUIET_MAX % busy."
