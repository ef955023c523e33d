# Sourced by the build, install and test scripts: the architectures the image is built for,
# by their Debian / OCI names (amd64, arm64), and what each needs to build and to run here.
#
#   ARCHES=amd64,arm64   the list (commas or spaces); unset or empty: the host's architecture

# The machine's architecture, Debian's name for it.
host_arch() {
  if command -v dpkg >/dev/null 2>&1; then
    dpkg --print-architecture
  else
    case $(uname -m) in
      x86_64) echo amd64 ;;
      aarch64) echo arm64 ;;
      *) uname -m ;;
    esac
  fi
}

# ARCHES checked and without repeats, one a line (the host's architecture when unset).
arch_list() {
  local list=${ARCHES:-$(host_arch)} seen=" " arch
  for arch in ${list//,/ }; do
    arch_triple "$arch" >/dev/null || return 1
    case $seen in *" $arch "*) continue ;; esac
    seen="$seen$arch "
    echo "$arch"
  done
}

# Rust's target triple for an architecture.
arch_triple() {
  case $1 in
    amd64) echo x86_64-unknown-linux-gnu ;;
    arm64) echo aarch64-unknown-linux-gnu ;;
    *)
      echo "unknown architecture '$1' (known: amd64, arm64)" >&2
      return 1
      ;;
  esac
}

# The GNU triple: the cross compiler's prefix and /usr/<triple> of libc6-dev-<arch>-cross.
arch_gnu_type() {
  case $1 in
    amd64) echo x86_64-linux-gnu ;;
    arm64) echo aarch64-linux-gnu ;;
    *) arch_triple "$1" ;;
  esac
}

# qemu's name for it: qemu-<name>-static runs its binaries, binfmt_misc's qemu-<name> entry
# runs them on exec.
arch_qemu() {
  case $1 in
    amd64) echo x86_64 ;;
    arm64) echo aarch64 ;;
    *) arch_triple "$1" ;;
  esac
}

# Cargo's environment-variable spelling of a triple (CARGO_TARGET_<THIS>_LINKER).
triple_env() {
  local t=${1^^}
  echo "${t//-/_}"
}

# Switches this shell to Debian's Rust compiler for building for a foreign architecture:
# /usr/bin first on PATH and the directories of rustup's proxies (rustc, cargo) dropped, so
# neither cargo nor a build script reaches a rustup toolchain; the cross linker; qemu as the
# runner of test binaries. Fails with the install command when the toolchain is missing.
debian_cargo_env() {
  local arch=$1 triple gnu qemu dir path=/usr/bin
  triple=$(arch_triple "$arch")
  gnu=$(arch_gnu_type "$arch")
  qemu=$(arch_qemu "$arch")
  if [ ! -x /usr/bin/cargo ] || [ ! -x /usr/bin/rustc ] || [ ! -x "/usr/bin/$gnu-gcc" ] ||
    [ ! -d "/usr/lib/rustlib/$triple/lib" ] || [ ! -x "/usr/bin/qemu-$qemu-static" ]; then
    echo "no $arch toolchain: run ARCHES=$(host_arch),$arch scripts/install-deps.sh (as root)" >&2
    return 1
  fi
  IFS=: read -ra dirs <<<"$PATH"
  for dir in "${dirs[@]}"; do
    [ "$dir" = /usr/bin ] && continue
    [ -e "$dir/rustup" ] && continue
    path="$path:$dir"
  done
  export PATH=$path
  unset RUSTUP_TOOLCHAIN RUSTC_WRAPPER CARGO
  export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
  local t
  t=$(triple_env "$triple")
  export "CARGO_TARGET_${t}_LINKER=$gnu-gcc"
  # Without -L: the test binaries then load ld.so and libc both from libc6:ARCH. (-L
  # /usr/GNUTYPE took ld.so from libc6-ARCH-cross, a different glibc build than the
  # multiarch libc.so.6 it then found, and every test thread hung in pthread_create.)
  export "CARGO_TARGET_${t}_RUNNER=qemu-$qemu-static"
}
