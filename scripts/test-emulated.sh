#!/usr/bin/env bash
# The unit tests (`cargo test --lib`) for each architecture in ARCHES that is not this
# machine's: built with Debian's compiler for that target (scripts/arches.sh,
# debian_cargo_env; `ARCHES=amd64,arm64 scripts/install-deps.sh` installs it) and run under
# qemu-user as cargo's runner (CARGO_TARGET_<TRIPLE>_RUNNER=qemu-<arch>-static), with the
# target's shared libraries from dpkg's multiarch (libc6:ARCH). Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/arches.sh
host=$(host_arch)
for arch in $(arch_list); do
  [ "$arch" = "$host" ] && continue
  triple=$(arch_triple "$arch")
  echo "unit tests for $arch ($triple, under qemu-$(arch_qemu "$arch")-static)" >&2
  (
    debian_cargo_env "$arch"
    cargo test --lib --locked --target "$triple"
  )
done
