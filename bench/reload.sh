#!/usr/bin/env bash
# Reload latency, idle cost and footprint of the agent, per backend. Prints a Markdown
# results section on stdout (progress on stderr). Parts (PARTS, default all four):
#
#   swap       ConfigMap swap -> first packet with the new behaviour. A pod -> node ->
#              remote topology; the agent (resyncInterval 60s, so only the directory watch
#              can explain a fast reaction) reads a kubelet-style ConfigMap volume that
#              examples/reload_latency.rs swaps SWAPS times, alternating between a config
#              that keeps 203.0.113.0/24 unmasqueraded and one that does not, while it
#              probes from the pod every ~1 ms from a fresh source port and the remote
#              timestamps the first packet with the new source address.
#   cpu        CPU time over CPU_SECONDS idle with resyncInterval 1s and 60s: utime + stime
#              of the agent plus cutime + cstime (the children it waited for) from
#              /proc/PID/stat, the delta over the window that starts 1 s after the first
#              sync; processes spawned from the agent's `processes=` log fields. Where
#              perf exists, also `perf stat -e task-clock -p PID` over the same window
#              (agent and children in ns; /proc's ticks are 10 ms).
#   writes     Kernel writes per idle resync: `nft monitor` in the node namespace during
#              IDLE_RESYNCS idle resyncs (resyncInterval 200ms), then a marker table (the
#              monitor was live), a config change (the monitor sees the agent's writes) and
#              a second marker. iptables-nft and the nftables backend (iptables-legacy
#              does not go through nf_tables, so nft monitor cannot see it).
#   footprint  Binary sizes (static shipped build, dynamic `cargo build --release`) and
#              VmRSS after FOOTPRINT_SECONDS idle, default config, with the /metrics
#              endpoint on (default) and off (--metrics-address=), then after one scrape.
#
# Usage (root, from the project root):  bench/reload.sh > reload.md
# Knobs: PARTS="swap cpu writes footprint" SWAPS=20 CPU_SECONDS=60 IDLE_RESYNCS=10
#        FOOTPRINT_SECONDS=30 SETUPS="iptables-nft iptables-legacy nftables" NO_BUILD=1
#
# Safety: every agent, firewall tool and packet lives in network namespaces named
# ima-bench3-<pid>-..., created here, joined only to each other by veth pairs and deleted
# on exit (also on failure or Ctrl-C); the host's firewall is never read or written;
# probes go only to 203.0.113.10, an address given to the remote namespace here; every
# loop is bounded in count and time; only processes started here are signalled, by PID.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."

PARTS=${PARTS:-"swap cpu writes footprint"}
SWAPS=${SWAPS:-20}
CPU_SECONDS=${CPU_SECONDS:-60}
IDLE_RESYNCS=${IDLE_RESYNCS:-10}
FOOTPRINT_SECONDS=${FOOTPRINT_SECONDS:-30}
SETUPS=${SETUPS:-"iptables-nft iptables-legacy nftables"}
TAG="ima-bench3-$$"
POD_IP=10.244.1.2
NODE_IP=192.0.2.1
DST=203.0.113.10
# Upstream (Go agent v2.12) references, given, not measured here.
UPSTREAM_CPU_1S_MS=370
UPSTREAM_CPU_60S_MS=10

say() { echo "[reload] $*" >&2; }
die() {
    say "ERROR: $*"
    exit 1
}

[ "$(id -u)" = 0 ] || die "run as root"
for tool in ip nft iptables-nft iptables-legacy conntrack sysctl stdbuf curl ss awk; do
    command -v "$tool" >/dev/null || die "missing $tool (apt-get install iptables nftables iproute2 conntrack procps curl)"
done

host=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p' || true)
host=${host:-x86_64-unknown-linux-gnu}
if [ -z "${NO_BUILD:-}" ]; then
    say "building: scripts/build-release.sh, cargo build --release (binary + example)..."
    scripts/build-release.sh >/dev/null
    cargo build --release --quiet --bin ip-masq-agent --example reload_latency >&2
fi
STATIC_SRC=target/$host/release/ip-masq-agent
DYNAMIC_SRC=target/release/ip-masq-agent
EXAMPLE_SRC=target/release/examples/reload_latency
for f in "$STATIC_SRC" "$DYNAMIC_SRC" "$EXAMPLE_SRC"; do
    [ -x "$f" ] || die "missing $f (run without NO_BUILD)"
done

WORK=$(mktemp -d "/tmp/$TAG.XXXXXX")
# Private copies: a concurrent build must not swap the binaries mid-run.
cp "$STATIC_SRC" "$WORK/agent-static"
cp "$DYNAMIC_SRC" "$WORK/agent-dynamic"
cp "$EXAMPLE_SRC" "$WORK/reload_latency"
AGENT=$WORK/agent-static
declare -A PIDS=() # started here and not yet reaped

cleanup() {
    local rc=$? pid ns
    for pid in "${!PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${!PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in $(ip netns list | awk -v p="$TAG-" 'index($1, p) == 1 { print $1 }'); do
        ip netns delete "$ns" 2>/dev/null || true
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# Sleeps in the background so a signal to this script is handled at once.
pause() {
    sleep "$1" &
    wait $!
}

stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PIDS[$pid]"
}

new_ns() {
    ip netns add "$1"
    ip -n "$1" link set lo up
}

backend_flags() {
    case $1 in
    iptables-nft) echo "--backend=iptables --iptables-mode=nft" ;;
    iptables-legacy) echo "--backend=iptables --iptables-mode=legacy" ;;
    nftables) echo "--backend=nftables" ;;
    *) die "unknown setup $1" ;;
    esac
}

# start_agent NS LOG BINARY ARGS...: the agent in NS (ip netns exec execs in place, so $!
# is the agent); its PID goes to PID.
start_agent() {
    local ns=$1 log=$2 binary=$3
    shift 3
    ip netns exec "$ns" "$binary" "$@" </dev/null >"$log" 2>&1 &
    PID=$!
    PIDS[$PID]=1
}

# wait_log FILE PATTERN COUNT PID: until FILE has COUNT lines with PATTERN; 10 s at most.
wait_log() {
    local file=$1 pattern=$2 count=$3 pid=$4 i seen
    for ((i = 0; i < 1000; i++)); do
        seen=$(grep -cF -- "$pattern" "$file" 2>/dev/null || true)
        [ "${seen:-0}" -lt "$count" ] || return 0
        kill -0 "$pid" 2>/dev/null || {
            cat "$file" >&2
            die "agent $pid exited early"
        }
        sleep 0.01
    done
    cat "$file" >&2
    die "no '$pattern' x$count in $file within 10 s"
}

# The box may be shared: wait (up to 60 s) until it is at most 15 % busy.
cpu_busy_pct() {
    local a b
    a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat)
    sleep 0.25
    b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        busy = y[1] - x[1]; idle = y[2] - x[2];
        printf "%d", (busy + idle) ? 100 * busy / (busy + idle) : 0 }'
}
wait_quiet() {
    local i busy
    for ((i = 0; i < 60; i++)); do
        busy=$(cpu_busy_pct)
        [ "$busy" -gt 15 ] || return 0
        [ "$i" -gt 0 ] || say "box ${busy}% busy (other work); waiting for it to settle"
        sleep 0.75
    done
    say "WARNING: box still busy; measuring anyway"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

COMMIT=$(git -c safe.directory="$PWD" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -c safe.directory="$PWD" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
    COMMIT+=" (with uncommitted changes in src/ or Cargo.*)"
fi
echo "## Reload, idle cost and footprint"
echo
echo "- Run: $(date -u +'%Y-%m-%d %H:%M UTC'), \`$("$AGENT" --version)\`, commit $COMMIT"
echo "- Machine: $(nproc) CPUs, kernel $(uname -r), $(iptables-nft --version), $(iptables-legacy --version), $(nft --version)"
echo "- Agent: the static build of scripts/build-release.sh ($(stat -c %s "$AGENT") bytes) unless a row says otherwise"
echo

# ---------------------------------------------------------------------------------
# swap

# pod -> node -> remote as in tests/common/mod.rs (IPv4 only); names $TAG-<n>-{pod,node,remote}.
make_topology() {
    local n=$1
    POD="$TAG-$n-pod" NODE="$TAG-$n-node" REMOTE="$TAG-$n-remote"
    new_ns "$POD"
    new_ns "$NODE"
    new_ns "$REMOTE"
    ip -n "$POD" link add eth0 type veth peer name pod0 netns "$NODE"
    ip -n "$NODE" link add eth1 type veth peer name eth0 netns "$REMOTE"
    ip -n "$POD" link set eth0 up
    ip -n "$NODE" link set pod0 up
    ip -n "$NODE" link set eth1 up
    ip -n "$REMOTE" link set eth0 up
    ip -n "$POD" addr add "$POD_IP/24" dev eth0
    ip -n "$NODE" addr add 10.244.1.1/24 dev pod0
    ip -n "$NODE" addr add "$NODE_IP/24" dev eth1
    ip -n "$REMOTE" addr add 192.0.2.2/24 dev eth0
    ip -n "$REMOTE" addr add "$DST/32" dev lo
    ip -n "$POD" route add default via 10.244.1.1
    ip -n "$NODE" route add default via 192.0.2.2
    ip -n "$REMOTE" route add 10.244.1.0/24 via "$NODE_IP"
    ip netns exec "$NODE" sysctl -q -w net.ipv4.ip_forward=1
}

drop_namespaces() {
    local ns
    for ns in "$@"; do ip netns delete "$ns" 2>/dev/null || true; done
}

# The summary line's field $2 of the example's output file $1.
sfield() { sed -n "s/^summary .*\b$2=\([^ ]*\).*/\1/p" "$1"; }

declare -A SWAP_FILE=()
NS_N=0
if [[ " $PARTS " == *" swap "* ]]; then
    for setup in $SETUPS; do
        NS_N=$((NS_N + 1))
        make_topology "$NS_N"
        # A kubelet ConfigMap volume holding config A (203.0.113.0/24 keeps the pod address).
        vol=$WORK/vol-$setup
        mkdir -p "$vol/..2026_11_23_bench.000000000"
        printf 'nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 203.0.113.0/24\nresyncInterval: 60s\n' \
            >"$vol/..2026_11_23_bench.000000000/ip-masq-agent"
        ln -s ..2026_11_23_bench.000000000 "$vol/..data"
        ln -s ..data/ip-masq-agent "$vol/ip-masq-agent"
        log=$WORK/swap-$setup.log
        # shellcheck disable=SC2046
        start_agent "$NODE" "$log" "$AGENT" --config "$vol/ip-masq-agent" $(backend_flags "$setup") --v=2
        agent_pid=$PID
        wait_log "$log" "rules applied" 1 "$agent_pid"
        wait_quiet
        say "swap: $setup, $SWAPS swaps..."
        "$WORK/reload_latency" --pod "$POD" --node "$NODE" --remote "$REMOTE" --volume "$vol" \
            --log "$log" --swaps "$SWAPS" --dst "$DST" --pod-ip "$POD_IP" --node-ip "$NODE_IP" \
            >"$WORK/swap-$setup.txt" &
        PIDS[$!]=1
        ex=$!
        wait "$ex" || die "reload_latency failed for $setup"
        unset "PIDS[$ex]"
        say "$(tail -n1 "$WORK/swap-$setup.txt")"
        stop_pid "$agent_pid"
        grep -E " (ERROR|WARN) " "$log" >&2 || true
        SWAP_FILE[$setup]=$WORK/swap-$setup.txt
        cp "$log" "$WORK/swap-$setup.agent.log"
        drop_namespaces "$POD" "$NODE" "$REMOTE"
    done

    cat <<EOF
### ConfigMap swap → first packet with the new behaviour

$SWAPS kubelet-style swaps per backend (\`..data_tmp\` renamed over \`..data\`, old directory
removed), alternating between masquerading 203.0.113.10 and keeping the pod address;
resyncInterval 60s. Latency = rename → first probe the remote receives with the new
source address. Probes every 1 ms from the pod, each from a fresh source port (a new
conntrack entry). p99 is the nearest-rank 99th percentile, which for $SWAPS samples is the
maximum. "log" = rename → the agent's \`config changed; rules applied\` timestamp;
"sync" = that line's \`elapsed_ms\` (the backend's write alone).

| backend | median | p99 (max) | min | median, → masquerade | median, → pod address | median log | median sync | processes per change | syncs per swap | old source after new | target < 100 ms |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|
EOF
    for setup in $SETUPS; do
        f=${SWAP_FILE[$setup]}
        med=$(sfield "$f" median_ms) p99=$(sfield "$f" p99_ms)
        logged=$(sed -n 's/^swap .* logged_ms=\([^ ]*\).*/\1/p' "$f" | median)
        synced=$(sed -n 's/^swap .* sync_elapsed_ms=\([^ ]*\).*/\1/p' "$f" | median)
        procs=$(sed -n 's/^swap .* processes=\([^ ]*\).*/\1/p' "$f" | sort -u | paste -sd/)
        changed=$(sfield "$f" changed_syncs) other=$(sfield "$f" other_syncs)
        verdict=$(awk -v m="$med" -v p="$p99" 'BEGIN { print (m < 100 && p < 100) ? "met" : "NOT met" }')
        printf '| %s | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %s | %s | %s | %s |\n' \
            "$(backend_flags "$setup")" "$med" "$p99" "$(sfield "$f" min_ms)" \
            "$(sfield "$f" median_to_masquerade_ms)" "$(sfield "$f" median_to_pod_address_ms)" \
            "$logged" "$synced" "$procs" \
            "$(awk -v c="$changed" -v o="$other" -v n="$SWAPS" 'BEGIN { printf "%g", (c + o) / n }')" \
            "$(sfield "$f" late_old)" "$verdict"
    done
    echo
    echo "Every swap (ms, rename → first new-source packet):"
    echo
    echo '```'
    for setup in $SETUPS; do
        printf '%-16s %s\n' "$setup" "$(sed -n 's/^swap .* latency_ms=\([^ ]*\).*/\1/p' "${SWAP_FILE[$setup]}" | awk '{ printf "%.1f ", $1 }')"
    done
    echo '```'
    echo
fi

# ---------------------------------------------------------------------------------
# cpu

# "utime stime cutime cstime" (ticks) of PID; the comm field is skipped by its ") ".
stat_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12, $13, $14, $15 }'; }
# Nanoseconds on CPU of all of PID's threads (schedstat), the agent's own time precisely.
sched_ns() { cat /proc/"$1"/task/*/schedstat | awk '{ s += $1 } END { print s }'; }

if [[ " $PARTS " == *" cpu "* ]]; then
    say "cpu: $CPU_SECONDS s idle, resyncInterval 1s and 60s, setups: $SETUPS..."
    declare -A CPU_PID=() CPU_LOG=() T0=() S0=() L0=()
    for setup in $SETUPS; do
        for interval in 1s 60s; do
            key=$setup/$interval
            NS_N=$((NS_N + 1))
            ns="$TAG-$NS_N-cpu"
            new_ns "$ns"
            mkdir -p "$WORK/cpu-$NS_N"
            printf 'nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]\nresyncInterval: %s\n' \
                "$interval" >"$WORK/cpu-$NS_N/ip-masq-agent"
            # shellcheck disable=SC2046
            start_agent "$ns" "$WORK/cpu-$NS_N.log" "$AGENT" --config "$WORK/cpu-$NS_N/ip-masq-agent" \
                $(backend_flags "$setup") --v=2
            CPU_PID[$key]=$PID
            CPU_LOG[$key]=$WORK/cpu-$NS_N.log
        done
    done
    for key in "${!CPU_PID[@]}"; do wait_log "${CPU_LOG[$key]}" "rules applied" 1 "${CPU_PID[$key]}"; done
    pause 1
    # A second, finer measure where perf exists: task-clock of the agent and every process
    # it starts during the window (counters opened with -p are inherited by new children),
    # in ns instead of /proc's 10 ms ticks.
    declare -A PERF_PID=() PERF_OUT=()
    if command -v perf >/dev/null; then
        for key in "${!CPU_PID[@]}"; do
            PERF_OUT[$key]=$WORK/perf-${key//\//-}.csv
            perf stat -e task-clock -x, -o "${PERF_OUT[$key]}" -p "${CPU_PID[$key]}" -- sleep "$CPU_SECONDS" 2>/dev/null &
            PERF_PID[$key]=$!
            PIDS[$!]=1
        done
    fi
    for key in "${!CPU_PID[@]}"; do
        pid=${CPU_PID[$key]}
        [ "$(readlink "/proc/$pid/exe")" = "$AGENT" ] || die "PID $pid is not the agent"
        T0[$key]=$(stat_ticks "$pid") S0[$key]=$(sched_ns "$pid") L0[$key]=$(wc -l <"${CPU_LOG[$key]}")
    done
    pause "$CPU_SECONDS"
    declare -A T1=() S1=() L1=()
    for key in "${!CPU_PID[@]}"; do
        pid=${CPU_PID[$key]}
        T1[$key]=$(stat_ticks "$pid") S1[$key]=$(sched_ns "$pid") L1[$key]=$(wc -l <"${CPU_LOG[$key]}")
    done
    for key in "${!PERF_PID[@]}"; do
        wait "${PERF_PID[$key]}" 2>/dev/null || true
        unset "PIDS[${PERF_PID[$key]}]"
    done
    for key in "${!CPU_PID[@]}"; do stop_pid "${CPU_PID[$key]}"; done
    hz=$(getconf CLK_TCK)

    cat <<EOF
### CPU time over $CPU_SECONDS s idle

Default CIDR list, \`--v=2\`, endpoint on (default). Window: from 1 s after the first sync,
$CPU_SECONDS s. Agent = utime + stime; children = cutime + cstime (the tools it ran and
waited for), from /proc/PID/stat in ticks of $((1000 / hz)) ms; "agent, schedstat" is
the agent's own threads from /proc/PID/task/*/schedstat (ns); "perf" is \`perf stat -e
task-clock -p PID\` over the same window (agent and children, ns; n/a without perf).
Processes and resyncs from the log lines written in the window. All agents ran side by side.

| backend | resyncInterval | agent (ticks) | children (ticks) | total | agent, schedstat | agent + children, perf | resyncs | processes | per resync | upstream | better than upstream? |
|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|
EOF
    for setup in $SETUPS; do
        for interval in 1s 60s; do
            key=$setup/$interval
            read -r u0 s0 cu0 cs0 <<<"${T0[$key]}"
            read -r u1 s1 cu1 cs1 <<<"${T1[$key]}"
            window=$(sed -n "$((L0[$key] + 1)),${L1[$key]}p" "${CPU_LOG[$key]}")
            resyncs=$(grep -c -e 'rules resynced' -e 'rewritten' -e 'rules applied' <<<"$window" || true)
            procs=$(sed -n 's/.* processes=\([0-9]*\).*/\1/p' <<<"$window" | awk '{ s += $1 } END { print s + 0 }')
            upstream=$UPSTREAM_CPU_1S_MS
            [ "$interval" = 60s ] && upstream=$UPSTREAM_CPU_60S_MS
            agent_ms=$((((u1 - u0) + (s1 - s0)) * 1000 / hz))
            child_ms=$((((cu1 - cu0) + (cs1 - cs0)) * 1000 / hz))
            total=$((agent_ms + child_ms))
            sched_ms=$(awk -v a="${S0[$key]}" -v b="${S1[$key]}" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')
            per=$(awk -v p="$procs" -v r="$resyncs" 'BEGIN { if (r) printf "%g", p / r; else print "n/a" }')
            perf_ms=n/a
            if [ -n "${PERF_OUT[$key]:-}" ]; then
                # "<not counted>": the process never ran during the window.
                perf_ms=$(awk -F, '$3 == "task-clock" { if ($1 ~ /not counted/) print "0.0 ms"; else if ($1 + 0 == $1) printf "%.1f ms", $1 }' "${PERF_OUT[$key]}" 2>/dev/null)
                perf_ms=${perf_ms:-n/a}
            fi
            # The verdict uses perf's ns figure when there is one, else the ticks (whose
            # 10 ms resolution cannot separate "under 10 ms" from "10 ms").
            measure=$total
            [ "$perf_ms" = n/a ] || measure=${perf_ms% ms}
            if [ "$interval" = 60s ]; then
                up="< $upstream ms"
                verdict=$(awk -v t="$measure" -v u="$upstream" 'BEGIN { print (t < u) ? "yes" : "no" }')
                [ "$perf_ms" != n/a ] || verdict+=" (10 ms ticks)"
            else
                up="$upstream ms"
                verdict=$(awk -v t="$measure" -v u="$upstream" 'BEGIN { print (t < u) ? "yes" : "no" }')
            fi
            printf '| %s | %s | %d ms | %d ms | **%d ms** | %s ms | %s | %s | %s | %s | %s | %s |\n' \
                "$(backend_flags "$setup")" "$interval" "$agent_ms" "$child_ms" "$total" "$sched_ms" "$perf_ms" \
                "$resyncs" "$procs" "$per" "$up" "$verdict"
        done
    done
    echo
fi

# ---------------------------------------------------------------------------------
# writes

if [[ " $PARTS " == *" writes "* ]]; then
    echo "### Kernel writes per idle resync (nft monitor)"
    echo
    echo "resyncInterval 200ms, default CIDR list. \`nft monitor\` runs in the node namespace from"
    echo "0.5 s after the first sync for $IDLE_RESYNCS idle resyncs; then marker table 1, a config change"
    echo "(one CIDR added), marker table 2. Idle events = every monitor line before marker 1 (a rule,"
    echo 'set element, chain or table change, or a `# new generation` line); for the change, events'
    echo "and generations between the markers, not counting marker 1's own generation line."
    echo
    echo "| backend | idle resyncs watched | events during them | per resync | marker 1 seen | events for one config change | marker 2 seen | target 0 |"
    echo "|---|---:|---:|---:|---|---:|---|---|"
    for setup in $SETUPS; do
        [ "$setup" = iptables-legacy ] && continue
        NS_N=$((NS_N + 1))
        ns="$TAG-$NS_N-writes"
        new_ns "$ns"
        dir=$WORK/writes-$NS_N
        mkdir -p "$dir"
        printf 'nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]\nresyncInterval: 200ms\n' >"$dir/ip-masq-agent"
        log=$WORK/writes-$NS_N.log
        # shellcheck disable=SC2046
        start_agent "$ns" "$log" "$AGENT" --config "$dir/ip-masq-agent" $(backend_flags "$setup") --v=2
        agent_pid=$PID
        wait_log "$log" "rules applied" 1 "$agent_pid"
        mon=$WORK/monitor-$NS_N.txt
        ip netns exec "$ns" stdbuf -oL nft monitor >"$mon" 2>/dev/null &
        mon_pid=$!
        PIDS[$mon_pid]=1
        pause 0.5
        before=$(grep -c 'rules resynced' "$log" || true)
        wait_log "$log" "rules resynced" $((before + IDLE_RESYNCS)) "$agent_pid"
        after=$(grep -c 'rules resynced' "$log" || true)
        ip netns exec "$ns" nft add table inet ima_bench3_marker_1
        m1=no
        for ((i = 0; i < 300; i++)); do grep -q ima_bench3_marker_1 "$mon" && {
            m1=yes
            break
        }; sleep 0.01; done
        printf 'nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10]\nresyncInterval: 200ms\n' >"$WORK/staging"
        mv -f "$WORK/staging" "$dir/ip-masq-agent"
        wait_log "$log" "config changed; rules applied" 1 "$agent_pid"
        pause 0.3
        ip netns exec "$ns" nft add table inet ima_bench3_marker_2
        m2=no
        for ((i = 0; i < 300; i++)); do grep -q ima_bench3_marker_2 "$mon" && {
            m2=yes
            break
        }; sleep 0.01; done
        stop_pid "$mon_pid"
        stop_pid "$agent_pid"
        # nft monitor prints a batch's events, then "# new generation N by process P (comm)".
        # Idle: every line before marker 1 (events and generation lines alike). Change:
        # events and generations between the markers, minus marker 1's own generation line.
        idle_events=$(awk '/ima_bench3_marker_1/ { exit } NF { n++ } END { print n + 0 }' "$mon")
        change_events=$(awk '/ima_bench3_marker_1/ { on = 1; next } /ima_bench3_marker_2/ { exit }
            on && /^# new generation/ { if (skipped++) g++; next } on && NF { n++ } END { printf "%d in %d generation(s)", n, g }' "$mon")
        cp "$mon" "$WORK/monitor-$setup.txt"
        resyncs=$((after - before))
        printf '| %s | %d | %d | %s | %s | %s | %s | %s |\n' "$(backend_flags "$setup")" "$resyncs" "$idle_events" \
            "$(awk -v e="$idle_events" -v r="$resyncs" 'BEGIN { printf "%g", r ? e / r : 0 }')" "$m1" "$change_events" "$m2" \
            "$([ "$idle_events" = 0 ] && [ "$m1" = yes ] && echo met || echo "NOT met")"
        drop_namespaces "$ns"
    done
    echo
    for setup in $SETUPS; do
        [ -f "$WORK/monitor-$setup.txt" ] || continue
        echo "What the monitor printed for the config change ($setup; the lines between the markers, at most 40):"
        echo
        echo '```'
        awk '/ima_bench3_marker_1/ { on = 1; next } /ima_bench3_marker_2/ { exit } on && NF' "$WORK/monitor-$setup.txt" | head -n 40
        echo '```'
        echo
    done
fi

# ---------------------------------------------------------------------------------
# footprint

status_kb() { awk -v k="$2" '$1 == k ":" { print $2 }' <<<"$1"; }
mb() { awk -v kb="$1" 'BEGIN { printf "%.2f MB", kb * 1024 / 1e6 }'; }

if [[ " $PARTS " == *" footprint "* ]]; then
    say "footprint: $FOOTPRINT_SECONDS s idle..."
    CASES="static/iptables-nft/on static/iptables-nft/off static/nftables/on static/nftables/off dynamic/iptables-nft/on dynamic/iptables-nft/off"
    declare -A FP_PID=() FP_NS=() FP_LOG=()
    mkdir -p "$WORK/empty"
    started=$SECONDS
    for c in $CASES; do
        IFS=/ read -r build setup endpoint <<<"$c"
        NS_N=$((NS_N + 1))
        ns="$TAG-$NS_N-fp"
        new_ns "$ns"
        extra=()
        [ "$endpoint" = off ] && extra=(--metrics-address=)
        # shellcheck disable=SC2046
        start_agent "$ns" "$WORK/fp-$NS_N.log" "$WORK/agent-$build" --config "$WORK/empty/ip-masq-agent" \
            $(backend_flags "$setup") "${extra[@]}"
        FP_PID[$c]=$PID FP_NS[$c]=$ns FP_LOG[$c]=$WORK/fp-$NS_N.log
    done
    for c in $CASES; do wait_log "${FP_LOG[$c]}" "rules applied" 1 "${FP_PID[$c]}"; done
    left=$((FOOTPRINT_SECONDS - (SECONDS - started)))
    [ "$left" -le 0 ] || pause "$left"
    declare -A ST=() ST2=() LISTEN=() SCRAPE=()
    for c in $CASES; do
        pid=${FP_PID[$c]}
        [ "$(readlink "/proc/$pid/exe")" = "$WORK/agent-${c%%/*}" ] || die "PID $pid is not the agent"
        ST[$c]=$(cat "/proc/$pid/status")
        [ "$c" = static/iptables-nft/on ] && SMAPS=$(awk '/^[0-9a-f]+-[0-9a-f]+ / { name = ($6 == "") ? "anonymous" : $6 }
            /^Rss:/ { rss[name] += $2 } END { for (n in rss) if (rss[n] > 0) print rss[n], n }' "/proc/$pid/smaps" | sort -rn)
        LISTEN[$c]=$(ip netns exec "${FP_NS[$c]}" ss -Hltn 'sport = :9910' | wc -l)
    done
    idle_for=$((SECONDS - started))
    # One scrape of each endpoint, then RSS again.
    for c in $CASES; do
        [ "${c##*/}" = on ] || continue
        SCRAPE[$c]=$(ip netns exec "${FP_NS[$c]}" sh -c 'printf "%s/%s/%s" \
            "$(curl -s -m 2 -o /dev/null -w "%{http_code}" http://127.0.0.1:9910/healthz)" \
            "$(curl -s -m 2 -o /dev/null -w "%{http_code}" http://127.0.0.1:9910/readyz)" \
            "$(curl -s -m 2 -o /dev/null -w "%{http_code} %{size_download}B" http://127.0.0.1:9910/metrics)"')
    done
    pause 1
    for c in $CASES; do ST2[$c]=$(cat "/proc/${FP_PID[$c]}/status"); done
    for c in $CASES; do stop_pid "${FP_PID[$c]}"; done

    cat <<EOF
### Footprint

| binary | bytes | MiB |
|---|---:|---:|
| static (\`scripts/build-release.sh\`, shipped) | $(stat -c %s "$WORK/agent-static") | $(awk -v b="$(stat -c %s "$WORK/agent-static")" 'BEGIN { printf "%.2f", b / 1048576 }') |
| dynamic (\`cargo build --release\`, glibc) | $(stat -c %s "$WORK/agent-dynamic") | $(awk -v b="$(stat -c %s "$WORK/agent-dynamic")" 'BEGIN { printf "%.2f", b / 1048576 }') |

Default config (no config file), default verbosity, resyncInterval 60s, $idle_for s idle; all
agents side by side, each in its own namespace. "listening" = sockets on :9910 in the
agent's namespace (\`ss\`). Scrape = HTTP status of /healthz, /readyz, /metrics (and the
/metrics body size). MB = 10^6 bytes.

| build | backend | endpoint | VmRSS | VmHWM | RssAnon | RssFile | threads | listening | under 6 MB (with endpoint)? | under 4 MB? | scrape | VmRSS after scrape |
|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|---:|
EOF
    for c in $CASES; do
        IFS=/ read -r build setup endpoint <<<"$c"
        rss=$(status_kb "${ST[$c]}" VmRSS)
        printf '| %s | %s | %s | %s kB (%s) | %s kB | %s kB | %s kB | %s | %s | %s | %s | %s | %s |\n' \
            "$build" "$(backend_flags "$setup")" "$([ "$endpoint" = on ] && echo "on (default)" || echo "off (\`--metrics-address=\`)")" \
            "$rss" "$(mb "$rss")" "$(status_kb "${ST[$c]}" VmHWM)" "$(status_kb "${ST[$c]}" RssAnon)" \
            "$(status_kb "${ST[$c]}" RssFile)" "$(status_kb "${ST[$c]}" Threads)" "${LISTEN[$c]}" \
            "$(awk -v kb="$rss" 'BEGIN { print (kb * 1024 < 6e6) ? "yes" : "no" }')" \
            "$(awk -v kb="$rss" 'BEGIN { print (kb * 1024 < 4e6) ? "yes" : "no" }')" \
            "${SCRAPE[$c]:-–}" "$(status_kb "${ST2[$c]}" VmRSS) kB"
    done
    echo
    echo "Resident pages of the static iptables-nft agent with the endpoint on, by mapping (kB):"
    echo
    awk '{ printf "%s%s %s", sep, $1, $2; sep = ", " } END { print "" }' <<<"$SMAPS"
    echo
fi

say "done; namespaces and temp files are removed on exit."
