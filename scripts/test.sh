#!/usr/bin/env bash
# The whole test suite: formatting, lints, the container image and the manifest validator,
# unit tests, and the root-only namespace tests (real iptables/nft in namespaces the tests
# create; tests/it/image.rs runs the image built here in such namespaces), for the agent and
# its test harness (crates/harness). Run as root.
#
# ARCHES (scripts/arches.sh): the image's architectures, amd64 and arm64 unless set. For
# arm64 on an amd64 machine it installs the cross toolchain and qemu (install-deps.sh),
# builds the arm64 image beside the amd64 one, runs the unit tests built for arm64 under
# qemu (test-emulated.sh) and the arm64 image tests (tests/it/image.rs). ARCHES=amd64 skips
# all of that (quicker; the arm64 image tests then skip with a note).
set -euo pipefail
cd "$(dirname "$0")/.."
export ARCHES=${ARCHES:-amd64,arm64}
# rustup's toolchain builds and lints everything here (Debian's cargo in /usr/bin, installed
# for the arm64 build, has no clippy or rustfmt): its directory first when it exists.
rustup_bin=${CARGO_HOME:-$HOME/.cargo}/bin
[ -x "$rustup_bin/rustup" ] && export PATH="$rustup_bin:$PATH"
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --workspace -- -D warnings
ci=false
[ "${CI:-}" = true ] && ci=true
# The image tests/it/image.rs runs (its tag is the DaemonSet's image line). Without podman
# the image tests skip with a note, except under CI=true, where the build must succeed.
if $ci || { command -v podman && command -v mmdebstrap && command -v runc; } >/dev/null 2>&1; then
  scripts/build-image.sh >/dev/null
else
  echo "NOTE: podman, mmdebstrap or runc missing: tests/it/image.rs will be skipped" >&2
fi
# kubernetes-validate for tests/it/manifests.rs (same rule: only outside CI may it be missing).
if ! scripts/install-validator.sh >/dev/null; then
  $ci && exit 1
  echo "NOTE: kubernetes-validate could not be installed: the schema check will be skipped" >&2
fi
cargo test --all-targets --workspace
scripts/test-emulated.sh
# No test may leave a namespace or a container behind, even a failing one.
# (Only those of processes that have exited: another suite running at the same time owns
# the namespaces of its live test process.)
leftover=0
for pid in $(ip netns list 2>/dev/null | sed -nE 's/^ima-([0-9]+)-.*/\1/p'); do
  [ -d "/proc/$pid" ] || leftover=$((leftover + 1))
done
if [ "$leftover" -ne 0 ]; then
  echo "FAIL: $leftover test namespace(s) left behind:" >&2
  ip netns list >&2
  exit 1
fi
if command -v podman >/dev/null 2>&1; then
  containers=$(podman ps --all --filter 'name=^ima-[0-9]+-' --format '{{.Names}}' 2>/dev/null || true)
  if [ -n "$containers" ]; then
    echo "FAIL: test container(s) left behind: $containers" >&2
    exit 1
  fi
fi
