#!/usr/bin/env bash
# Builds the container image with podman and no registry at all: the static release binary
# (scripts/build-release.sh) on a Debian bookworm base made here from Debian packages with
# mmdebstrap (iptables in both flavours, nftables, their libraries; no shell, no apt; the agent
# reads and deletes conntrack entries over netlink itself, so conntrack-tools is not needed).
#
#   scripts/build-image.sh                     -> localhost/ip-masq-agent:v<Cargo.toml version>
#   ARCHES=amd64,arm64 scripts/build-image.sh  -> the same name for both architectures
#   IMAGE=registry.example.com/net/ip-masq-agent:v0.1.0 scripts/build-image.sh
#
# One image per architecture in ARCHES (scripts/arches.sh; default: this machine's), tagged
# IMAGE-ARCH (localhost/ip-masq-agent:v0.1.0-arm64), and IMAGE itself is a manifest list
# naming them all, the one name the DaemonSet uses: a node pulls its own architecture's
# image through it (`podman manifest inspect IMAGE` lists them; README, Deploying, says how
# to push it). A foreign architecture's binary is cross-compiled (scripts/build-release.sh
# ARCH, toolchain from `ARCHES=... scripts/install-deps.sh`) and its base is unpacked from
# that architecture's Debian packages (mmdebstrap --architectures, extract variant: no
# package script runs); the Containerfile has no RUN step, so no build step runs emulated.
#
# The mirror is the machine's own apt sources (IMAGE_APT_SOURCES names another file).
# Each base tarball is cached under target/image/ (keyed by the architecture, the mmdebstrap
# options and the sources), so a second run takes seconds; delete target/image/base-*.tar
# to pick up new Debian point releases. Podman's settings for this kind of machine live in
# one place, target/image/containers.conf, which this script writes and the image test
# reads (CONTAINERS_CONF=target/image/containers.conf podman run ... to use the same settings).
# Run as root on Debian 12 (apt-get install podman mmdebstrap runc).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/arches.sh
start=$(date +%s.%N)

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
IMAGE=${IMAGE:-localhost/ip-masq-agent:v$version}
case ${IMAGE##*/} in
  *@*)
    echo "build-image: IMAGE=$IMAGE: name a tag, not a digest" >&2
    exit 1
    ;;
  *:*) ;;
  *)
    echo "build-image: IMAGE=$IMAGE: name a tag (NAME:TAG); the per-architecture images are NAME:TAG-ARCH" >&2
    exit 1
    ;;
esac
arches=$(arch_list)
work=target/image
context=$work/context
mkdir -p "$context"
# The context holds ip-masq-agent-ARCH; a plain ip-masq-agent is an older layout's.
rm -f "$context/ip-masq-agent"

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
cat >"$work/containers.conf.tmp" <<CONF
# Written by scripts/build-image.sh; used by it and by tests/image.rs via CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=4096:4096"]

[engine]
runtime = "runc"
CONF
mv "$work/containers.conf.tmp" "$work/containers.conf"
export CONTAINERS_CONF="$PWD/$work/containers.conf"

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
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && ! git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null; then
  revision="$revision-dirty"
fi
source_url=$(git remote get-url origin 2>/dev/null || echo unknown)

size() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.1f MB", $1 / 1e6}'; }
since() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

built=()
bases=
for arch in $arches; do
  arch_start=$(date +%s.%N)

  # 1. The binary (fat LTO: minutes cold, nothing to do when it is up to date); the
  # Containerfile copies the one of the platform it builds for (TARGETARCH).
  binary=$(scripts/build-release.sh "$arch")
  install -m 0755 "$binary" "$context/ip-masq-agent-$arch.tmp"
  mv "$context/ip-masq-agent-$arch.tmp" "$context/ip-masq-agent-$arch"

  # 2. The base root filesystem: the architecture's Debian packages unpacked (the extract
  # variant runs no maintainer scripts, so nothing runs emulated), usr merged by
  # mmdebstrap's hook instead of the usrmerge package (which would pull in perl), without
  # documentation, translations and iconv modules.
  mmdebstrap_options=(
    --variant=extract
    --architectures="$arch"
    --include=libgcc-s1,iptables,nftables
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
  } | sha256sum | cut -c1-12)
  base_tar="$work/base-bookworm-$arch-$key.tar"
  if [ ! -s "$base_tar" ]; then
    echo "build-image: building the $arch base root filesystem from $sources" >&2
    rm -f "$work/base-bookworm-$arch-"*.tar
    if ! mmdebstrap --quiet "${mmdebstrap_options[@]}" bookworm "$work/base-$arch-tmp.tar" "$sources" \
      >"$work/mmdebstrap-$arch.log" 2>&1; then
      cat "$work/mmdebstrap-$arch.log" >&2
      exit 1
    fi
    mv "$work/base-$arch-tmp.tar" "$base_tar"
  fi
  base="localhost/ip-masq-agent-base:bookworm-$arch-$key"
  if ! podman image exists "$base"; then
    podman import --quiet --os linux --arch "$arch" \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --message "Debian bookworm $arch: libgcc-s1 iptables nftables (mmdebstrap extract)" \
      "$base_tar" "$base" >/dev/null
  fi
  bases="$bases $base"

  # 3. The image: COPY and metadata only, so the build runs no container.
  podman build --quiet --pull=never --platform "linux/$arch" \
    --build-arg "BASE=$base" \
    --build-arg "VERSION=v$version" \
    --build-arg "REVISION=$revision" \
    --build-arg "SOURCE=$source_url" \
    --tag "$IMAGE-$arch" \
    --file Containerfile \
    "$context" >/dev/null
  built+=("$IMAGE-$arch")
  echo "build-image: $IMAGE-$arch ($(size "$IMAGE-$arch"); binary $(stat -c %s "$binary" | awk '{printf "%.2f MB", $1 / 1e6}'); base $(size "$base")) in $(since "$arch_start")s" >&2
done

# 4. The name the DaemonSet uses: a manifest list of the images just built (made anew, so
# it never names an architecture this run did not build). An older build may have left a
# plain image under that name.
if podman manifest exists "$IMAGE"; then
  podman manifest rm "$IMAGE" >/dev/null
elif podman image exists "$IMAGE"; then
  podman untag "$IMAGE" "$IMAGE" >/dev/null
fi
podman manifest create "$IMAGE" >/dev/null
for image in "${built[@]}"; do
  podman manifest add "$IMAGE" "containers-storage:$image" >/dev/null
done

# Base images of earlier keys of the architectures just built, and of the layout before
# per-architecture bases (no architecture in the tag): untagged (podman keeps what an
# image still uses). Another architecture's current base stays.
for old in $(podman images --format '{{.Repository}}:{{.Tag}}' --filter reference=localhost/ip-masq-agent-base); do
  case " $bases " in *" $old "*) continue ;; esac
  old_arch=${old#*:bookworm-}
  old_arch=${old_arch%%-*}
  case " $(echo $arches) " in
    *" $old_arch "*) ;;
    *) arch_triple "$old_arch" >/dev/null 2>&1 && continue ;;
  esac
  podman rmi "$old" >/dev/null 2>&1 || true
done
echo "build-image: $IMAGE (manifest list: $(echo $arches)) in $(since "$start")s" >&2
echo "$IMAGE"
