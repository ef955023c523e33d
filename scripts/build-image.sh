#!/usr/bin/env bash
# Builds the container image with podman and no registry at all: the static release binary
# (scripts/build-release.sh) on a Debian bookworm base made here from Debian packages with
# mmdebstrap (iptables in both flavours, nftables, conntrack-tools, their libraries; no shell, no apt).
#
#   scripts/build-image.sh            -> localhost/ip-masq-agent:v<Cargo.toml version>
#   IMAGE=registry.example.com/net/ip-masq-agent:v0.1.0 scripts/build-image.sh
#
# The mirror is the machine's own apt sources (IMAGE_APT_SOURCES names another file).
# The base tarball is cached under target/image/ (keyed by the mmdebstrap options and the
# sources), so a second run takes seconds; delete target/image/base-*.tar to pick up new
# Debian point releases. Podman's settings for this kind of machine live in one place,
# target/image/containers.conf, which this script writes and the image test reads
# (CONTAINERS_CONF=target/image/containers.conf podman run ... to use the same settings).
# Run as root on Debian 12 (apt-get install podman mmdebstrap runc).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s.%N)

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
IMAGE=${IMAGE:-localhost/ip-masq-agent:v$version}
work=target/image
mkdir -p "$work/context"

for tool in podman mmdebstrap runc; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "build-image: $tool not found (apt-get install -y podman mmdebstrap runc)" >&2
    exit 1
  fi
done

# Podman on this kind of machine: its default OCI runtime (crun) refuses the VM's hybrid
# cgroup layout, so runc; root lacks CAP_SYS_RESOURCE, so the default ulimits must not
# exceed the hard limits podman itself runs with.
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
cat >"$work/containers.conf.tmp" <<EOF
# Written by scripts/build-image.sh; used by it and by tests/image.rs via CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=4096:4096"]

[engine]
runtime = "runc"
EOF
mv "$work/containers.conf.tmp" "$work/containers.conf"
export CONTAINERS_CONF="$PWD/$work/containers.conf"

# 1. The binary (fat LTO: minutes cold, nothing to do when it is up to date).
binary=$(scripts/build-release.sh)
install -m 0755 "$binary" "$work/context/ip-masq-agent.tmp"
mv "$work/context/ip-masq-agent.tmp" "$work/context/ip-masq-agent"

# 2. The base root filesystem: Debian packages unpacked (the extract variant runs no
# maintainer scripts), usr merged by mmdebstrap's hook instead of the usrmerge package
# (which would pull in perl), without documentation, translations and iconv modules.
if [ -n "${IMAGE_APT_SOURCES:-}" ]; then
  sources=$IMAGE_APT_SOURCES
elif [ -s /etc/apt/sources.list.d/debian.sources ]; then
  sources=/etc/apt/sources.list.d/debian.sources
elif [ -s /etc/apt/sources.list ]; then
  sources=/etc/apt/sources.list
else
  echo "build-image: no apt sources found; set IMAGE_APT_SOURCES to a sources file" >&2
  exit 1
fi
mmdebstrap_options=(
  --variant=extract
  --include=libgcc-s1,iptables,nftables,conntrack
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/lintian/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/lib/*/gconv/*'
)
key=$({
  printf '%s\n' "${mmdebstrap_options[@]}"
  cat "$sources"
  dpkg --print-architecture
} | sha256sum | cut -c1-12)
base_tar="$work/base-bookworm-$key.tar"
if [ ! -s "$base_tar" ]; then
  echo "build-image: building the base root filesystem from $sources" >&2
  rm -f "$work"/base-bookworm-*.tar
  if ! mmdebstrap --quiet "${mmdebstrap_options[@]}" bookworm "$work/base-tmp.tar" "$sources" \
    >"$work/mmdebstrap.log" 2>&1; then
    cat "$work/mmdebstrap.log" >&2
    exit 1
  fi
  mv "$work/base-tmp.tar" "$base_tar"
fi
base="localhost/ip-masq-agent-base:bookworm-$key"
if ! podman image exists "$base"; then
  podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --message "Debian bookworm: libgcc-s1 iptables nftables conntrack (mmdebstrap extract)" \
    "$base_tar" "$base" >/dev/null
fi

# 3. The image: COPY and metadata only, so the build runs no container.
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && ! git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null; then
  revision="$revision-dirty"
fi
source_url=$(git remote get-url origin 2>/dev/null || echo unknown)
podman build --quiet --pull=never \
  --build-arg "BASE=$base" \
  --build-arg "VERSION=v$version" \
  --build-arg "REVISION=$revision" \
  --build-arg "SOURCE=$source_url" \
  --tag "$IMAGE" \
  --file Containerfile \
  "$work/context" >/dev/null

# Base images of earlier keys: untagged (podman keeps what an image still uses).
for old in $(podman images --format '{{.Repository}}:{{.Tag}}' --filter reference=localhost/ip-masq-agent-base); do
  [ "$old" = "$base" ] || podman rmi "$old" >/dev/null 2>&1 || true
done

size() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.1f MB", $1 / 1e6}'; }
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
echo "build-image: $IMAGE ($(size "$IMAGE"); base $base, $(size "$base")) in ${elapsed}s" >&2
echo "$IMAGE"
