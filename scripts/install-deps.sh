#!/usr/bin/env bash
# Installs the firewall and namespace tools the agent and its tests use, the container
# tools the image build and test use (podman, mmdebstrap, runc) and python3's venv (for
# kubernetes-validate), if missing.
#
# ARCHES=amd64,arm64 (scripts/arches.sh) also installs, for each architecture that is not
# the host's, what building and running the agent for it takes here: Debian's Rust
# compiler (rustc-web, cargo-web: rustup cannot add targets on a machine that reaches only
# package registries) with that architecture's standard library (libstd-rust-web-dev:ARCH,
# exactly the compiler's version, through dpkg's multiarch), the cross C toolchain and
# static libc (gcc-GNUTYPE, libc6-dev-ARCH-cross), the target's shared libc (libc6:ARCH,
# for the unit tests run under emulation) and qemu-user-static, registered with
# the kernel's binfmt_misc so that the architecture's binaries (the agent, and iptables and
# nft inside its image) run under emulation. rustup's toolchain stays the default cargo on
# PATH; scripts/build-release.sh uses Debian's only for the foreign architecture.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/arches.sh
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y "$@"
}
packages="iptables nftables iproute2 procps conntrack podman mmdebstrap runc python3-venv"
need=()
for tool in iptables-nft iptables-legacy nft ip sysctl conntrack podman mmdebstrap runc python3; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  need+=(python3-venv)
fi
updated=false
if [ ${#need[@]} -gt 0 ]; then
  echo "installing packages for: ${need[*]}"
  apt-get update
  updated=true
  # shellcheck disable=SC2086
  apt_install $packages
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install a Rust toolchain >= 1.89 (https://rustup.rs) and re-run as root" >&2
  exit 1
fi

# Foreign architectures.
arches=$(arch_list)
host=$(host_arch)
installed() { # package[:arch] -> its installed version, or nothing
  { dpkg-query -W -f='${db:Status-Abbrev}${Version}\n' "$1" 2>/dev/null || true; } | sed -n 's/^ii *//p'
}
for arch in $arches; do
  [ "$arch" = "$host" ] && continue
  gnu=$(arch_gnu_type "$arch")
  qemu=$(arch_qemu "$arch")
  rust=$(installed rustc-web)
  if [ -z "$rust" ] || [ "$rust" != "$(installed "libstd-rust-web-dev:$arch")" ] ||
    [ -z "$(installed cargo-web)" ] || [ -z "$(installed "libc6:$arch")" ] || [ ! -x "/usr/bin/$gnu-gcc" ] ||
    [ ! -f "/usr/$gnu/lib/libc.a" ] || [ ! -x "/usr/bin/qemu-$qemu-static" ]; then
    echo "installing the $arch toolchain (Debian's rustc-web with libstd-rust-web-dev:$arch, $gnu-gcc, qemu-user-static)"
    if ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
      dpkg --add-architecture "$arch"
      updated=false
    fi
    $updated || apt-get update
    updated=true
    # The compiler and the target's standard library must be the very same version.
    version=$(apt-cache policy rustc-web | sed -n 's/^ *Candidate: //p')
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
      echo "install-deps: no rustc-web in the apt sources (Debian 12: bookworm-security has it)" >&2
      exit 1
    fi
    apt_install "rustc-web=$version" "cargo-web=$version" "libstd-rust-web-dev:$arch=$version" \
      "gcc-${gnu//_/-}" "libc6-dev-$arch-cross" "libc6:$arch" qemu-user-static
  fi
  # The agent needs Rust >= 1.89 (bookworm's own 1.85 is too old; bookworm-security's is not).
  rust_version=$(/usr/bin/rustc -V | sed -n 's/^rustc \([0-9]*\.[0-9]*\).*/\1/p')
  if [ "$(printf '%s\n' 1.89 "$rust_version" | sort -V | head -n 1)" != 1.89 ]; then
    echo "install-deps: Debian's rustc is $rust_version, the agent needs >= 1.89 (add bookworm-security to the apt sources)" >&2
    exit 1
  fi

  # binfmt_misc: the kernel hands the architecture's ELF files to qemu. The F flag (Debian's
  # entry has it) opens the interpreter now, so it works inside containers' own root
  # filesystems too. systemd-binfmt does this at boot where systemd runs; here, do it.
  binfmt=/proc/sys/fs/binfmt_misc
  if [ ! -e "$binfmt/register" ]; then
    mount -t binfmt_misc binfmt_misc "$binfmt"
  fi
  if [ ! -e "$binfmt/qemu-$qemu" ]; then
    grep -v '^#' "/usr/lib/binfmt.d/qemu-$qemu.conf" | head -n 1 | tr -d '\n' >"$binfmt/register"
    echo "registered $binfmt/qemu-$qemu"
  fi
  if ! grep -qx enabled "$binfmt/qemu-$qemu" || ! grep -q '^flags:.*F' "$binfmt/qemu-$qemu"; then
    echo "install-deps: $binfmt/qemu-$qemu is disabled or lacks the F flag: $arch containers cannot run" >&2
    cat "$binfmt/qemu-$qemu" >&2
    exit 1
  fi
done
