#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and the root-only namespace
# tests (real iptables/nft in namespaces the tests create), for the agent and its test
# harness (crates/harness). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --workspace -- -D warnings
cargo test --all-targets --workspace
# No test may leave a namespace behind, even a failing one.
leftover=$(ip netns list 2>/dev/null | grep -cE '^ima-[0-9]+-' || true)
if [ "$leftover" -ne 0 ]; then
  echo "FAIL: $leftover test namespace(s) left behind:" >&2
  ip netns list >&2
  exit 1
fi
