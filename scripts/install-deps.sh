#!/usr/bin/env bash
# Installs the firewall and namespace tools the agent and its tests use, if missing.
set -euo pipefail
need=()
for tool in iptables-nft iptables-legacy nft ip sysctl; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing packages for: ${need[*]}"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y iptables nftables iproute2 procps
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install a Rust toolchain >= 1.89 (https://rustup.rs) and re-run as root" >&2
  exit 1
fi
