#!/usr/bin/env bash
# Sync time of the agent for growing prefix lists, per backend: the first sync after start
# (`rules applied ... elapsed_ms=X`) and a changed-config sync (the config file rewritten
# with a different list of the same size, then SIGHUP; `config changed; rules applied ...
# elapsed_ms=X`). elapsed_ms is the agent's own measure of one sync (rendering, spawning
# iptables-save/iptables-restore or nft, the kernel commit).
#
# Each repetition uses a fresh namespace (so every first sync starts from an empty nat
# table) and then CHANGES changed-config syncs, alternating between two disjoint lists:
# every other /24 from 11.0.0.0 (11.0.0.0, 11.0.2.0, ...) and the /24s in between.
#
# Safety: the agent runs only in namespaces named ima-bench2-<pid>-..., created here and
# deleted on exit (also on failure); no packets are sent; the host's firewall is never
# touched; only the agents started here are signalled, by PID.
#
# Usage (root, from the project root): bench/sync_times.sh
# Knobs: SIZES="64 1000 10000 50000" SETUPS="nftables iptables-nft iptables-legacy"
#        REPS=3 (fresh namespaces = first-sync samples) CHANGES=3 (changed syncs per rep)
#        NO_BUILD=1; AGENT=path (another build of the agent, e.g. to compare commits;
#        AGENT=target/<host>/release/ip-masq-agent is the shipped static build of
#        scripts/build-release.sh, built and reported as this tree like the default)
#        QUIET_MAX=15 QUIET_WAIT=30 (wait up to QUIET_WAIT s per sync for CPUs <= QUIET_MAX % busy)
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=${SIZES:-"64 1000 10000 50000"}
SETUPS=${SETUPS:-"nftables iptables-nft iptables-legacy"}
REPS=${REPS:-3}
CHANGES=${CHANGES:-3}
TAG="ima-bench2-$$"
AGENT=${AGENT:-target/release/ip-masq-agent}

log() { echo "[sync] $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

[ "$(id -u)" = 0 ] || die "run as root"
for tool in ip nft iptables-nft iptables-legacy; do
    command -v "$tool" >/dev/null || die "missing $tool (apt-get install iptables nftables iproute2)"
done
if [ -z "${NO_BUILD:-}" ]; then
    case $AGENT in
    target/*-linux-*/release/ip-masq-agent) scripts/build-release.sh >/dev/null ;;
    *) cargo build --release --quiet --bin ip-masq-agent >&2 ;;
    esac
fi
[ -x "$AGENT" ] || die "build $AGENT first"

WORK=$(mktemp -d "/tmp/$TAG.XXXXXX")
# Private copies: a concurrent cargo build must not swap the binaries mid-run.
AGENT_GIVEN=$AGENT
cp "$AGENT" "$WORK/ip-masq-agent"
AGENT="$WORK/ip-masq-agent"
CREATED_NS=()
AGENT_PID=""

cleanup() {
    local rc=$?
    if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID" 2>/dev/null || true
        wait "$AGENT_PID" 2>/dev/null || true
    fi
    for ns in "${CREATED_NS[@]}"; do
        ip netns delete "$ns" 2>/dev/null || true
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

prefixes() {
    local count=$1 offset=$2
    awk -v n="$count" -v off="$offset" 'BEGIN {
        for (i = 0; i < n; i++) {
            j = 2 * i + off
            printf "  - %d.%d.%d.0/24\n", 11 + int(j / 65536), int(j / 256) % 256, j % 256
        }
    }'
}

# Written outside the config directory and renamed in: the agent watches that directory
# and reloads on every change in it, so it sees one complete file, never half of one.
write_config() {
    local file=$1 count=$2 offset=$3
    {
        echo "cidrLimit: 60000"
        echo "masqLinkLocal: true"
        echo "resyncInterval: 1h"
        echo "nonMasqueradeCIDRs:"
        prefixes "$count" "$offset"
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

# Waits until the log has `count` lines matching `pattern` (fixed string); 300 s at most.
wait_lines() {
    local file=$1 pattern=$2 count=$3 waited=0 seen
    while :; do
        seen=$(grep -cF -- "$pattern" "$file" 2>/dev/null || true)
        [ "${seen:-0}" -lt "$count" ] || break
        if ! kill -0 "$AGENT_PID" 2>/dev/null; then
            cat "$file" >&2
            die "agent exited early"
        fi
        [ "$waited" -lt 30000 ] || die "no '$pattern' x$count within 300 s"
        sleep 0.01
        waited=$((waited + 1))
    done
}

# The box may be shared: before each sync wait (up to QUIET_WAIT s) until the CPUs were at
# most QUIET_MAX % busy over a quarter of a second.
QUIET_MAX=${QUIET_MAX:-15}
QUIET_WAIT=${QUIET_WAIT:-30}
NOISY=0
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
    local waited=0 busy
    while :; do
        busy=$(cpu_busy_pct)
        [ "$busy" -gt "$QUIET_MAX" ] || return 0
        if [ "$waited" -ge "$QUIET_WAIT" ]; then
            log "WARNING: box still ${busy}% busy after ${waited} s; measuring anyway"
            NOISY=$((NOISY + 1))
            return 0
        fi
        [ "$waited" -gt 0 ] || log "box ${busy}% busy (other work); waiting for it to settle"
        sleep 1
        waited=$((waited + 1))
    done
}

# Starts the agent in a fresh namespace $1 with config $2, log $3. The integration tests'
# start-up sweep (tests/common/mod.rs) deletes every "ima-*" namespace whose second field
# is not a live PID ("bench2" never is); once the agent runs it holds its namespace, but a
# sweep between `ip netns add` and the agent's start makes it fail, so that is retried.
start_agent() {
    local ns=$1 cfg=$2 agent_log=$3 setup=$4 try
    for try in 1 2 3 4 5; do
        ip netns add "$ns" 2>/dev/null || [ -e "/run/netns/$ns" ] || die "ip netns add $ns"
        CREATED_NS+=("$ns")
        # shellcheck disable=SC2046
        ip netns exec "$ns" "$AGENT" --config "$cfg" $(backend_flags "$setup") --v=2 \
            </dev/null >"$agent_log" 2>&1 &
        AGENT_PID=$!
        while kill -0 "$AGENT_PID" 2>/dev/null && [ "$(cat "/proc/$AGENT_PID/comm" 2>/dev/null)" != ip-masq-agent ]; do
            sleep 0.005
        done
        if kill -0 "$AGENT_PID" 2>/dev/null; then
            return 0
        fi
        wait "$AGENT_PID" 2>/dev/null || true
        AGENT_PID=""
        log "agent could not start in $ns (namespace swept?); retrying"
        ip netns delete "$ns" 2>/dev/null || true
    done
    cat "$agent_log" >&2
    die "agent did not start"
}

elapsed_of() { sed -n 's/.*elapsed_ms="\{0,1\}\([0-9.]*\).*/\1/p'; }

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

fmt_ms() { awk -v v="$1" 'BEGIN { if (v >= 100) printf "%.0f", v; else if (v >= 10) printf "%.1f", v; else printf "%.2f", v }'; }

declare -A FIRST CHANGED FIRST_ALL CHANGED_ALL PROCS
ERRORS=""
started=$(date +%s)
REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
[ -z "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ] || REV+="+uncommitted changes in src/Cargo"
case $AGENT_GIVEN in
target/release/ip-masq-agent | target/*-linux-*/release/ip-masq-agent) ;;
*) REV="n/a (binary $AGENT_GIVEN)" ;;
esac
n=0
log "kernel $(uname -r), $(nproc) CPUs; setups: $SETUPS; sizes: $SIZES; $REPS reps x $CHANGES changes"
for setup in $SETUPS; do
    for size in $SIZES; do
        firsts=() changes=()
        for rep in $(seq "$REPS"); do
            n=$((n + 1))
            ns="$TAG-s$n-node"
            # The config gets a directory of its own: the agent reloads on any change in
            # the directory of its config, so a log written there would loop for ever.
            mkdir -p "$WORK/cfg-$n"
            cfg="$WORK/cfg-$n/ip-masq-agent" agent_log="$WORK/$n.log"
            write_config "$cfg" "$size" 0
            wait_quiet
            start_agent "$ns" "$cfg" "$agent_log" "$setup"
            wait_lines "$agent_log" "rules applied" 1
            line=$(grep -m1 -F "rules applied" "$agent_log")
            firsts+=("$(elapsed_of <<<"$line")")
            PROCS[$setup,first]=$(sed -n 's/.*processes=\([0-9]*\).*/\1/p' <<<"$line")
            for k in $(seq "$CHANGES"); do
                sleep 0.2
                wait_quiet
                write_config "$cfg" "$size" $((k % 2))
                kill -HUP "$AGENT_PID"
                wait_lines "$agent_log" "config changed; rules applied" "$k"
            done
            while read -r line; do
                changes+=("$(elapsed_of <<<"$line")")
                PROCS[$setup,changed]=$(sed -n 's/.*processes=\([0-9]*\).*/\1/p' <<<"$line")
            done < <(grep -F "config changed; rules applied" "$agent_log")
            if grep -Eq " (ERROR|WARN) " "$agent_log"; then
                ERRORS+="$setup $size rep $rep: $(grep -E " (ERROR|WARN) " "$agent_log" | head -3)"$'\n'
            fi
            kill -TERM "$AGENT_PID"
            wait "$AGENT_PID" || true
            AGENT_PID=""
            ip netns delete "$ns" 2>/dev/null || true
            CREATED_NS=("${CREATED_NS[@]/$ns/}")
        done
        FIRST[$setup,$size]=$(printf '%s\n' "${firsts[@]}" | median)
        CHANGED[$setup,$size]=$(printf '%s\n' "${changes[@]}" | median)
        FIRST_ALL[$setup,$size]="${firsts[*]}"
        CHANGED_ALL[$setup,$size]="${changes[*]}"
        log "$setup $size: first ${FIRST[$setup,$size]} ms (${firsts[*]}), changed ${CHANGED[$setup,$size]} ms (${changes[*]})"
    done
done
finished=$(date +%s)

echo "### Sync time (ms, agent's elapsed_ms; median)"
echo
echo "Agent $("$AGENT" --version 2>&1 | head -1) (\`$AGENT_GIVEN\`, $(stat -c %s "$AGENT") bytes), tree $REV. Kernel $(uname -r), $(nproc) CPUs. First sync: median of $REPS fresh starts. Changed config:"
echo "median of $((REPS * CHANGES)) syncs (file rewritten with a disjoint list of the same size + SIGHUP)."
echo
header="| setup | sync |"
sep="|---|---|"
for size in $SIZES; do
    header+=" $size |"
    sep+="---:|"
done
echo "$header"
echo "$sep"
for setup in $SETUPS; do
    for kind in first changed; do
        row="| $setup | $kind |"
        for size in $SIZES; do
            if [ "$kind" = first ]; then v=${FIRST[$setup,$size]}; else v=${CHANGED[$setup,$size]}; fi
            row+=" $(fmt_ms "$v") |"
        done
        echo "$row"
    done
done
echo
echo "Processes spawned per sync (first / changed): $(for s in $SETUPS; do printf '%s %s / %s; ' "$s" "${PROCS[$s,first]}" "${PROCS[$s,changed]}"; done)"
echo
if [[ " $SETUPS " == *" nftables "* ]] && [[ " $SIZES " == *" 10000 "* ]]; then
    f=${FIRST[nftables,10000]} c=${CHANGED[nftables,10000]}
    met=$(awk -v f="$f" -v c="$c" 'BEGIN { print (f < 150 && c < 150) ? "met" : "NOT met" }')
    echo "nftables at 10,000 prefixes: first $(fmt_ms "$f") ms, changed $(fmt_ms "$c") ms; target < 150 ms: **$met**."
    echo
fi
echo "Every sample (ms):"
echo
echo '```'
for setup in $SETUPS; do
    for size in $SIZES; do
        printf '%-16s %6s first:   %s\n' "$setup" "$size" "${FIRST_ALL[$setup,$size]}"
        printf '%-16s %6s changed: %s\n' "$setup" "$size" "${CHANGED_ALL[$setup,$size]}"
    done
done
echo '```'
echo
if [ -n "$ERRORS" ]; then
    echo "Warnings/errors in the agent's log:"
    echo
    echo '```'
    printf '%s' "$ERRORS"
    echo '```'
    echo
fi
echo "Whole run: $((finished - started)) s; $NOISY sync(s) measured while other work kept the CPUs over $QUIET_MAX % busy."
