#!/usr/bin/env bash
# Benchmarks ip-masq-agent on this machine and prints the results as a Markdown
# section on stdout (progress goes to stderr):
#
#   1. start-up: process start -> the agent's rules are in the kernel, for 3, 64 and
#      1,000 CIDRs, with iptables-nft and iptables-legacy;
#   2. memory (VmRSS, VmHWM) after IDLE_SECONDS idle with the default config;
#   3. processes spawned per resync, IPv4 only and with --enable-ipv6, counted three
#      ways: the agent's own log, wrapper scripts ahead on PATH, and strace.
#
# Usage, from the project root:  sudo bench/startup.sh > results.md
# Knobs (environment): RUNS=30 timed starts per case, IDLE_SECONDS=30, RESYNC_SECONDS=10.
#
# Safety: every agent and every iptables command runs inside network namespaces that
# this script creates (ima-bench-<pid>-<n>) and deletes again, also on failure or
# Ctrl-C, so the host's own firewall is never read or written. Only processes this
# script started are signalled, by PID. Every loop is bounded in count and time.
set -euo pipefail
export LC_ALL=C # EPOCHREALTIME, printf and sort must agree on '.' as the decimal point

RUNS=${RUNS:-30}
IDLE_SECONDS=${IDLE_SECONDS:-30}
RESYNC_SECONDS=${RESYNC_SECONDS:-10}
SIZES=(3 64 1000)
FLAVOURS=(nft legacy)
export CHAIN=IP-MASQ-AGENT
# Upstream Go agent on this kind of machine (given, not measured here): first log
# line -> rules present, in ms, by CIDR count; idle RSS; processes per resync per family.
declare -A UPSTREAM_START_MS=([3]=13 [64]=13 [1000]=53)
UPSTREAM_RSS_MB=10.6
UPSTREAM_PROCESSES_PER_FAMILY=3
RSS_TARGET_BYTES=4000000 # "under 4 MB", read strictly as 4,000,000 bytes

say() { printf '%s\n' "$*" >&2; }
die() {
	say "bench/startup.sh: $*"
	exit 1
}

[[ $EUID -eq 0 ]] || die "needs root for network namespaces and iptables (run: sudo bench/startup.sh)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for tool in ip iptables-nft-save iptables-legacy-save ip6tables-nft-save ip6tables-legacy-save awk grep sed sort date; do
	command -v "$tool" >/dev/null || die "$tool is not installed"
done

# ---------------------------------------------------------------------------------
# Clean-up: namespaces, agents and temp files, however the script ends.

WORK=$(mktemp -d /tmp/ima-bench.XXXXXX)
# Configs live apart from everything written while agents run: the agent watches its
# config file's directory and re-syncs on any change there, its own log included.
CONF=$WORK/conf OUT=$WORK/out EMPTY=$WORK/empty
mkdir "$CONF" "$OUT" "$EMPTY"
NS_PREFIX="ima-bench-$$-"
NS_COUNT=0
declare -A LIVE_PIDS=() # PIDs started here and not yet reaped (a reaped PID may be reused)
declare -A STRACE_PIDS=() # those of them that are strace, whose child is the agent

cleanup() {
	local pid ns
	for pid in "${!LIVE_PIDS[@]}"; do
		# strace does not pass SIGTERM on to the agent it runs, so stop that child first.
		[[ -n ${STRACE_PIDS[$pid]:-} ]] && { kill -TERM $(pgrep -P "$pid") 2>/dev/null || true; }
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${!LIVE_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
	# Only names with this run's prefix; `ip netns list` is short, so this is bounded.
	for ns in $(ip netns list | awk -v p="$NS_PREFIX" 'index($1, p) == 1 { print $1 }'); do
		ip netns del "$ns" 2>/dev/null || true
	done
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM # exit runs the EXIT trap

# Creates a fresh namespace and stores its name in NS (no subshell, so the counter sticks).
# Loopback goes up as on a real node, where the agent can bind its local endpoints.
new_ns() {
	NS_COUNT=$((NS_COUNT + 1))
	NS="$NS_PREFIX$NS_COUNT"
	ip netns add "$NS"
	ip -n "$NS" link set lo up
}

# Stops an agent (or strace) started here: SIGTERM, then reap it.
stop_pid() {
	local pid=$1
	kill -TERM "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	unset "LIVE_PIDS[$pid]"
}

# Sleeps in the background so a SIGTERM/Ctrl-C to this script is handled at once.
pause() {
	sleep "$1" &
	wait $!
}

# ---------------------------------------------------------------------------------
# The binary.

# The shipped build (scripts/build-release.sh: release, statically linked), built
# whenever cargo can be found (a no-op when current), so the numbers belong to this
# checkout; sudo usually hides the user's cargo.
host=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p' || true)
AGENT=$PWD/target/${host:-x86_64-unknown-linux-gnu}/release/ip-masq-agent
cargo=$(command -v cargo || true)
if [[ -z $cargo && -n ${SUDO_USER:-} ]]; then
	cargo=$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo/bin/cargo
fi
if [[ -x $cargo ]]; then
	say "scripts/build-release.sh..."
	if [[ -n ${SUDO_USER:-} && $SUDO_USER != root ]]; then
		# As the invoking user, so target/ does not end up owned by root.
		AGENT=$(sudo -u "$SUDO_USER" -H env "PATH=$(dirname "$cargo"):$PATH" scripts/build-release.sh)
	else
		AGENT=$(PATH="$(dirname "$cargo"):$PATH" scripts/build-release.sh)
	fi
elif [[ -x $AGENT && -n $(find src Cargo.toml Cargo.lock -newer "$AGENT" -print -quit) ]]; then
	say "warning: cargo not found and $AGENT is older than the source; measuring it anyway"
fi
[[ -x $AGENT ]] || die "no $AGENT; run scripts/build-release.sh first"

# ---------------------------------------------------------------------------------
# Small helpers.

# A config with n distinct, aligned /24s: 10.0.0.0/24, 10.0.1.0/24, ... 10.3.231.0/24.
write_config() {
	local file=$1 n=$2 i
	{
		printf 'cidrLimit: %d\n' "$n"
		printf 'nonMasqueradeCIDRs:\n'
		for ((i = 0; i < n; i++)); do printf '  - 10.%d.%d.0/24\n' $((i / 256)) $((i % 256)); done
	} >"$file"
}

# Reads numbers, one per line; prints "median [min–max]".
summary() {
	sort -g | awk '
		{ v[NR] = $1 }
		END {
			if (NR == 0) { print "n/a"; exit }
			m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
			printf "%.1f [%.1f–%.1f]\n", m, v[1], v[NR]
		}'
}

# Reads numbers, one per line; prints "a" if all equal, else "min–max".
range() {
	sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { if (NR == 0) print "n/a"; else if (lo == hi) print lo; else print lo "–" hi }'
}

# A log line's RFC 3339 timestamp (first word) as microseconds since the epoch.
log_time_us() { date -u -d "${1%% *}" +%s%6N; }

# A key=value (or key="value") field of a log line.
log_field() { sed -n "s/.* $2=\"\{0,1\}\([0-9.]*\).*/\1/p" <<<"$1"; }

# Reads "<epoch seconds> <program> <args...>" lines in time order and prints how many
# calls each sync made: calls closer than 0.3 s belong to the same sync (syncs are 1 s
# apart and take a few ms).
calls_per_sync() {
	awk 'NR > 1 && $1 - last > 0.3 { print n; n = 0 } { n++; last = $1 } END { if (NR) print n }'
}

# How many resyncs a per-sync count file holds (its first line is start-up).
resyncs_in() { awk 'END { print NR ? NR - 1 : "n/a" }' "$1"; }

# The commands of the second sync (the first resync), joined with "; ".
second_sync_commands() {
	awk 'NR > 1 && $1 - last > 0.3 { sync++ } { last = $1 } sync == 1 { $1 = ""; sub(/^ /, ""); printf "%s%s", sep, $0; sep = "; " }'
}

# ---------------------------------------------------------------------------------
# 1. Start-up time.

# Runs inside a fresh namespace (exported for `ip netns exec ... bash -c`): starts the
# agent, polls until its chain holds the MASQUERADE rule and all RETURN rules, stops
# the agent and prints "<spawn µs> <seen µs> <polls>". Polling runs back to back: each
# poll is itself a fork+exec of iptables-save, so a sleep would only add latency.
measure_start() {
	set -euo pipefail
	local agent=$1 flavour=$2 config=$3 want_returns=$4 log=$5
	local t0 t1 deadline out polls=0 pid
	t0=${EPOCHREALTIME/./}
	"$agent" --config "$config" --iptables-mode="$flavour" 2>"$log" &
	pid=$!
	trap 'kill -TERM "$pid" 2>/dev/null || true' EXIT
	deadline=$((t0 + 10000000)) # 10 s
	while :; do
		# The whole ruleset, not "-t nat": naming the nat table would make legacy
		# iptables create it, doing part of the agent's work before the agent does.
		out=$("iptables-$flavour-save")
		t1=${EPOCHREALTIME/./}
		polls=$((polls + 1))
		if [[ $out == *"-A $CHAIN "*"-j MASQUERADE"* ]] &&
			(($(grep -c -- "^-A $CHAIN .*-j RETURN\$" <<<"$out") == want_returns)); then
			break
		fi
		if ((t1 > deadline || polls >= 20000)); then
			echo "rules did not appear within 10 s" >&2
			return 1
		fi
	done
	kill -TERM "$pid"
	wait "$pid" || true
	trap - EXIT
	echo "$t0 $t1 $polls"
}
export -f measure_start

# One timed start in a fresh namespace, like a new node; appends a row to $STARTS:
# flavour cidrs polled_ms spawn_to_log_ms firstlog_to_log_ms since_start_ms elapsed_ms poll_ms
time_one_start() {
	local flavour=$1 n=$2 config=$3 record=$4 log=$OUT/start.log result t0 t1 polls applied first attempt
	# Up to 3 attempts: another program on this machine may delete "ima-*" namespaces
	# it thinks are stale (this repository's own test harness does); `ip netns exec`
	# then fails cleanly, never falling back to the host's namespace.
	for attempt in 1 2 3; do
		new_ns
		# Expected RETURN rules: the n CIDRs plus link-local 169.254.0.0/16 (masqLinkLocal is false).
		result=$(ip netns exec "$NS" bash -c 'measure_start "$@"' _ "$AGENT" "$flavour" "$config" $((n + 1)) "$log") && break
		say "start-up run failed (iptables-$flavour, $n CIDRs, attempt $attempt): $(tail -n3 "$log" 2>/dev/null)"
		ip netns del "$NS" 2>/dev/null || true
		((attempt < 3)) || die "giving up"
	done
	ip netns del "$NS" 2>/dev/null || true # already gone if someone else deleted it
	read -r t0 t1 polls <<<"$result"
	applied=$(grep -m1 'rules applied' "$log") || die "no 'rules applied' line: $(cat "$log")"
	first=$(head -n1 "$log")
	[[ $record == yes ]] || return 0
	awk -v f="$flavour" -v n="$n" -v t0="$t0" -v t1="$t1" -v polls="$polls" \
		-v ta="$(log_time_us "$applied")" -v tf="$(log_time_us "$first")" \
		-v since="$(log_field "$applied" since_start_ms)" -v el="$(log_field "$applied" elapsed_ms)" \
		'BEGIN { printf "%s %d %.3f %.3f %.3f %s %s %.3f\n", f, n, (t1 - t0) / 1e3, (ta - t0) / 1e3, (ta - tf) / 1e3, since, el, (t1 - t0) / 1e3 / polls }' \
		>>"$STARTS"
}

# Every config is written before any agent starts (see CONF above).
for n in "${SIZES[@]}"; do write_config "$CONF/cidrs-$n.yaml" "$n"; done
# For the process counts: the default CIDRs, resynced every second; with IPv6 one IPv6 CIDR more.
printf 'nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]\nresyncInterval: 1s\n' >"$CONF/resync-v4.yaml"
printf 'nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, "fd00::/8"]\nresyncInterval: 1s\n' >"$CONF/resync-v6.yaml"

STARTS=$OUT/starts.txt
: >"$STARTS"
# Other work on the machine skews the timings. To show how much there was: CPU time
# the whole machine used (/proc/stat) minus what this script and everything it ran used
# (this shell's own and its reaped children's times in /proc/self/stat), same tick unit.
machine_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
own_ticks() { awk '{ print $14 + $15 + $16 + $17 }' "/proc/$$/stat"; }
read -r BUSY_BEFORE TOTAL_BEFORE < <(machine_ticks)
OWN_BEFORE=$(own_ticks)
for flavour in "${FLAVOURS[@]}"; do
	for n in "${SIZES[@]}"; do
		config=$CONF/cidrs-$n.yaml
		say "start-up: iptables-$flavour, $n CIDRs, 1 warm-up + $RUNS runs..."
		time_one_start "$flavour" "$n" "$config" no # page cache, module loading
		for ((run = 0; run < RUNS; run++)); do
			time_one_start "$flavour" "$n" "$config" yes
		done
	done
done

read -r BUSY_AFTER TOTAL_AFTER < <(machine_ticks)
OWN_AFTER=$(own_ticks)
OTHERS_PERCENT=$(awk -v b=$((BUSY_AFTER - BUSY_BEFORE)) -v o=$((OWN_AFTER - OWN_BEFORE)) -v t=$((TOTAL_AFTER - TOTAL_BEFORE)) \
	'BEGIN { p = t ? 100 * (b - o) / t : 0; printf "%.0f", p < 0 ? 0 : p }')

# ---------------------------------------------------------------------------------
# 2 and 3 run side by side: idle agents for memory, busy ones (1 s resync) for
# process counts. An idle agent's memory does not depend on what else runs.

# Starts an agent in a fresh namespace; stores its PID in PID. Extra environment
# (e.g. PATH with the wrappers) goes before `ip`, which passes it on; `ip netns exec`
# execs in place, so $! is the agent itself (or strace, when asked for).
start_agent() {
	local log=$1 wrapper=$2
	shift 2
	new_ns
	if [[ $wrapper == strace ]]; then
		ip netns exec "$NS" strace -f -qq -ttt -e trace=execve -e signal=none -o "$log.strace" "$AGENT" "$@" 2>"$log" &
	elif [[ $wrapper == wrappers ]]; then
		PATH="$WRAPPERS:$PATH" IMA_BENCH_EXEC_LOG="$log.exec" ip netns exec "$NS" "$AGENT" "$@" 2>"$log" &
	else
		ip netns exec "$NS" "$AGENT" "$@" 2>"$log" &
	fi
	PID=$!
	LIVE_PIDS[$PID]=1
	[[ $wrapper == strace ]] && STRACE_PIDS[$PID]=1
	return 0
}

# Waits (at most 10 s) for a log line; fails with the log if it never comes.
wait_for_log() {
	local log=$1 pattern=$2 i
	for ((i = 0; i < 200; i++)); do
		grep -q "$pattern" "$log" 2>/dev/null && return 0
		pause 0.05
	done
	cat "$log" >&2
	die "no '$pattern' in $log within 10 s"
}

# Wrapper scripts named like the tools: note the call, then become the real tool
# (exec keeps it one process). They catch every firewall tool the agent can look up
# on PATH; strace (below) would also catch anything else.
WRAPPERS=$WORK/wrappers
mkdir "$WRAPPERS"
for name in {iptables,ip6tables}-{nft-,legacy-,}{save,restore} xtables-{nft,legacy}-multi nft; do
	real=$(command -v "$name") || continue
	cat >"$WRAPPERS/$name" <<-EOF
		#!/bin/bash
		printf '%s %s %s\\n' "\$EPOCHREALTIME" "\${0##*/}" "\$*" >>"\${IMA_BENCH_EXEC_LOG:-/dev/null}"
		exec $real "\$@"
	EOF
	chmod +x "$WRAPPERS/$name"
done
HAVE_STRACE=no
command -v strace >/dev/null && command -v pgrep >/dev/null && HAVE_STRACE=yes

say "memory: ${IDLE_SECONDS} s idle with the default config; processes: ${RESYNC_SECONDS} s with resyncInterval 1s..."
IDLE_STARTED=$SECONDS
declare -A IDLE_PIDS=()
IDLE_CASES=(nft legacy nft-1000)
# Builds that serve /metrics by default get one more row: the same agent with the
# endpoint off, to show what it costs.
if grep -q -- '--metrics-address' <<<"$("$AGENT" --help)"; then IDLE_CASES+=(nft-no-metrics); fi
for name in "${IDLE_CASES[@]}"; do
	case $name in
	nft-no-metrics) start_agent "$OUT/idle-$name.log" plain --config "$EMPTY/ip-masq-agent" --iptables-mode=nft --v=2 --metrics-address= ;;
	# --v=2 only so that a resync during the idle time would show in the log.
	nft-1000) start_agent "$OUT/idle-$name.log" plain --config "$CONF/cidrs-1000.yaml" --iptables-mode=nft --v=2 ;;
	# A missing file means the default config, as upstream; its directory exists.
	*) start_agent "$OUT/idle-$name.log" plain --config "$EMPTY/ip-masq-agent" --iptables-mode="$name" --v=2 ;;
	esac
	IDLE_PIDS[$name]=$PID
done

declare -A BUSY_PIDS=()
counters=(plain wrappers)
[[ $HAVE_STRACE == yes ]] && counters+=(strace)
for counter in "${counters[@]}"; do
	for flavour in "${FLAVOURS[@]}"; do
		for fam in v4 v6; do
			args=(--config "$CONF/resync-$fam.yaml" --iptables-mode="$flavour" --v=2)
			[[ $fam == v6 ]] && args+=(--enable-ipv6)
			start_agent "$OUT/busy-$counter-$flavour-$fam.log" "$counter" "${args[@]}"
			BUSY_PIDS[$counter-$flavour-$fam]=$PID
		done
	done
done

pause "$RESYNC_SECONDS"
# SIGTERM lets an agent finish a sync in progress, so no sync is cut short.
for key in "${!BUSY_PIDS[@]}"; do
	pid=${BUSY_PIDS[$key]}
	if [[ -n ${STRACE_PIDS[$pid]:-} ]]; then
		# strace keeps a SIGTERM to itself, so stop its child, the agent; strace then
		# exits on its own (given 5 s before it is stopped too).
		kill -TERM $(pgrep -P "$pid") 2>/dev/null || true
		for ((i = 0; i < 100; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			pause 0.05
		done
	fi
	stop_pid "$pid"
done

for name in "${!IDLE_PIDS[@]}"; do
	wait_for_log "$OUT/idle-$name.log" 'rules applied'
	[[ $(readlink "/proc/${IDLE_PIDS[$name]}/exe") == "$AGENT" ]] || die "PID ${IDLE_PIDS[$name]} is not the agent"
done
left=$((IDLE_SECONDS - (SECONDS - IDLE_STARTED)))
((left > 0)) && pause "$left"
declare -A STATUS=()
for name in "${!IDLE_PIDS[@]}"; do
	STATUS[$name]=$(cat "/proc/${IDLE_PIDS[$name]}/status")
	# Where the resident pages are, for the default case: binary, libraries, heap.
	if [[ $name == nft ]]; then
		RSS_BY_MAPPING=$(awk '/^[0-9a-f]+-[0-9a-f]+ / { name = ($6 == "") ? "anonymous" : $6 }
			/^Rss:/ { rss[name] += $2 }
			END { for (n in rss) if (rss[n] > 0) print rss[n], n }' "/proc/${IDLE_PIDS[$name]}/smaps" | sort -rn)
	fi
	idle_for=$((SECONDS - IDLE_STARTED))
	stop_pid "${IDLE_PIDS[$name]}"
done

# ---------------------------------------------------------------------------------
# The report.

kb() { awk -v k="$2" '$1 == k ":" { print $2 }' <<<"${STATUS[$1]}"; }
mb() { awk -v kb="$1" 'BEGIN { printf "%.2f MB", kb * 1024 / 1e6 }'; }

iptables_nft=$(iptables-nft --version)
iptables_legacy=$(iptables-legacy --version)
commit=$(git -c safe.directory="$PWD" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -c safe.directory="$PWD" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
	commit="$commit (with uncommitted changes in src/ or Cargo.*)"
fi

cat <<EOF
## Results

- Run: $(date -u +'%Y-%m-%d %H:%M UTC'), \`$("$AGENT" --version)\`, commit $commit
- Machine: $(nproc) CPUs, kernel $(uname -r), $iptables_nft, $iptables_legacy
- Binary: $(stat -c %s "$AGENT") bytes; RUNS=$RUNS, IDLE_SECONDS=$IDLE_SECONDS, RESYNC_SECONDS=$RESYNC_SECONDS

### 1. Start-up: process start to rules in the kernel

Milliseconds, median [min–max] over $RUNS runs per row (after one discarded warm-up run), each in a fresh namespace.
Other processes on the machine used ${OTHERS_PERCENT}% of its CPU time while these runs went on (0% is a quiet machine).

| iptables | CIDRs | spawn → rules seen by polling | spawn → \`rules applied\` logged | first log line → \`rules applied\` | agent \`since_start_ms\` | agent \`elapsed_ms\` (the sync) | one poll takes | upstream, first log line → rules | faster than upstream? |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---|
EOF
# Summary of column c of $STARTS for one flavour and size.
start_col() { awk -v f="$1" -v n="$2" -v c="$3" '$1 == f && $2 == n { print $c }' "$STARTS" | summary; }
for flavour in "${FLAVOURS[@]}"; do
	for n in "${SIZES[@]}"; do
		col() { start_col "$flavour" "$n" "$1"; }
		firstlog_median=$(col 5 | cut -d' ' -f1)
		verdict=$(awk -v a="$firstlog_median" -v b="${UPSTREAM_START_MS[$n]}" 'BEGIN { print (a < b) ? "yes" : "no" }')
		printf '| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$flavour" "$n" \
			"$(col 3)" "$(col 4)" "$(col 5)" "$(col 6)" "$(col 7)" "$(col 8)" "${UPSTREAM_START_MS[$n]}" "$verdict"
	done
done

cat <<EOF

### 2. Memory after ${idle_for} s idle (default resyncInterval 60s)

| iptables | config | VmRSS | VmHWM | RssAnon | RssFile | threads | syncs while idle | under 4 MB? | upstream VmRSS |
|---|---|---:|---:|---:|---:|---:|---:|---|---:|
EOF
for name in "${IDLE_CASES[@]}"; do
	rss=$(kb "$name" VmRSS)
	case $name in
	nft-1000) label="nft | 1,000 CIDRs (not a target, for scale)" ;;
	nft-no-metrics) label="nft | default, \`--metrics-address=\` (endpoint off)" ;;
	*) label="$name | default (no config file)" ;;
	esac
	verdict=$(awk -v kb="$rss" -v t="$RSS_TARGET_BYTES" 'BEGIN { print (kb * 1024 < t) ? "yes" : "no" }')
	# Syncs after the first: none are due within 60 s, so anything here is a surprise.
	idle_syncs=$(grep -c -e 'rules resynced' -e 'rewritten' -e 'rules applied' "$OUT/idle-$name.log" || true)
	printf '| %s | %s kB (%s) | %s kB (%s) | %s kB | %s kB | %s | %s | %s | %s MB |\n' "$label" \
		"$rss" "$(mb "$rss")" "$(kb "$name" VmHWM)" "$(mb "$(kb "$name" VmHWM)")" \
		"$(kb "$name" RssAnon)" "$(kb "$name" RssFile)" "$(kb "$name" Threads)" \
		"$((idle_syncs - 1))" "$verdict" "$UPSTREAM_RSS_MB"
done

echo
echo "Resident pages of the default nft agent by mapping (kB; RssFile is the binary and shared libraries, RssAnon heap and stacks):"
echo
awk '{ printf "%s%s %s", sep, $1, $2; sep = ", " } END { print "" }' <<<"$RSS_BY_MAPPING"

cat <<EOF

### 3. Processes per resync (resyncInterval 1s, ${RESYNC_SECONDS} s)

"agent log" is \`processes=\` from the \`rules resynced\` lines; "wrappers" counts calls
through logging wrapper scripts ahead on PATH; "strace" counts every successful execve
in the agent's process tree (\`strace -f\`), so it would also see grandchildren.
Calls are grouped into syncs by time (syncs are 1 s apart). "start-up" is the first
sync plus the one-off probes before it.

| iptables | families | agent log, per resync | wrappers, per resync | strace, per resync | resyncs (log / wrappers / strace) | start-up (wrappers / strace) | upstream | no more than upstream? |
|---|---|---:|---:|---:|---:|---:|---:|---|
EOF
for flavour in "${FLAVOURS[@]}"; do
	for fam in v4 v6; do
		families=1 label=IPv4
		[[ $fam == v6 ]] && families=2 label="IPv4 + IPv6"
		base=$OUT/busy
		# One line per sync: the number of processes it started.
		grep 'rules resynced' "$base-plain-$flavour-$fam.log" | sed -n 's/.* processes=\([0-9]*\).*/\1/p' >"$base.log-counts"
		calls_per_sync <"$base-wrappers-$flavour-$fam.log.exec" >"$base.wrapper-counts"
		: >"$base.strace-counts"
		if [[ $HAVE_STRACE == yes ]]; then
			# Successful execve calls as "<time> <path>", minus the agent's own exec.
			awk '/execve\(/ { split($0, q, "\""); path[$1] = q[2] }
				/ = 0$/ && (/execve\(/ || /execve resumed/) { print $2, path[$1] }' \
				"$base-strace-$flavour-$fam.log.strace" | tail -n +2 | calls_per_sync >"$base.strace-counts"
		fi
		upstream=$((UPSTREAM_PROCESSES_PER_FAMILY * families))
		# The worst resync seen by any of the three counts (the first wrapper/strace sync is start-up).
		worst=$({ cat "$base.log-counts"; tail -n +2 "$base.wrapper-counts"; tail -n +2 "$base.strace-counts"; } | sort -g | tail -n1)
		printf '| %s | %s | %s | %s | %s | %s / %s / %s | %s / %s | %s | %s |\n' "$flavour" "$label" \
			"$(range <"$base.log-counts")" \
			"$(tail -n +2 "$base.wrapper-counts" | range)" \
			"$(tail -n +2 "$base.strace-counts" | range)" \
			"$(wc -l <"$base.log-counts")" \
			"$(resyncs_in "$base.wrapper-counts")" \
			"$(resyncs_in "$base.strace-counts")" \
			"$(head -n1 "$base.wrapper-counts")" \
			"$(head -n1 "$base.strace-counts" | range)" \
			"$upstream" "$( ((worst <= upstream)) && echo yes || echo "no ($worst)")"
	done
done

echo
echo "What one resync runs (from the wrapper logs):"
echo
for flavour in "${FLAVOURS[@]}"; do
	for fam in v4 v6; do
		printf -- '- %s, %s: `%s`\n' "$flavour" "$fam" "$(second_sync_commands <"$OUT/busy-wrappers-$flavour-$fam.log.exec")"
	done
done
echo
resync_elapsed=$(grep -h 'rules resynced' "$OUT"/busy-plain-*-v4.log | sed -n 's/.* elapsed_ms="\{0,1\}\([0-9.]*\).*/\1/p' | summary)
echo "Resync \`elapsed_ms\` (IPv4, uninstrumented agents, both flavours; $((${#counters[@]} * 4)) agents resynced every second side by side on $(nproc) CPUs): $resync_elapsed ms."

say "done; namespaces and temp files are removed on exit."
