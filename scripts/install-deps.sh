#!/usr/bin/env bash
# Installs the firewall and namespace tools the agent and its tests use, the container
# tools the image build and test use (podman, mmdebstrap, runc) and python3's venv (for
# kubernetes-validate), if missing.
set -euo pipefail
packages="iptables nftables iproute2 procps conntrack podman mmdebstrap runc python3-venv"
need=()
for tool in iptables-nft iptables-legacy nft ip sysctl conntrack podman mmdebstrap runc python3; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  need+=(python3-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing packages for: ${need[*]}"
  apt-get update
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y $packages
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install a Rust toolchain >= 1.89 (https://rustup.rs) and re-run as root" >&2
  exit 1
fi
