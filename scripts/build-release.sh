#!/usr/bin/env bash
# The shipped build: release, statically linked; the container image (Containerfile,
# scripts/build-image.sh) carries exactly this binary. Static linking maps only the libc
# code the agent uses, which keeps its resident memory about 1.2 MB lower than a
# dynamically linked glibc build, and lets the binary run on any base image.
#
#   scripts/build-release.sh         for this machine's architecture (rustup's cargo on PATH)
#   scripts/build-release.sh arm64   for another one (amd64, arm64; scripts/arches.sh)
#
# Another architecture is built with Debian's compiler (rustc-web and cargo-web in /usr/bin,
# with libstd-rust-web-dev:ARCH; `ARCHES=amd64,arm64 scripts/install-deps.sh` installs them),
# because rustup cannot add targets here: /usr/bin comes first on that build's PATH, the
# directory of rustup's proxies is left out, and RUSTC names /usr/bin/rustc, so no rustup
# toolchain takes part; it links with the GNU cross gcc against the cross libc.a. Everything
# else (tests, clippy, the host's build) keeps rustup's toolchain.
# Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/arches.sh
host=$(host_arch)
arch=${1:-$host}
triple=$(arch_triple "$arch")
if [ "$arch" = "$host" ]; then
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --quiet --bin ip-masq-agent --target "$triple" >&2
else
  debian_cargo_env "$arch"
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --quiet --locked --bin ip-masq-agent --target "$triple" >&2
fi
echo "$PWD/target/$triple/release/ip-masq-agent"
