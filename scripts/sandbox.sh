#!/usr/bin/env bash
# Builds the agent and shows it masquerading in throwaway network namespaces. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --bin ip-masq-agent --example sandbox
exec target/release/examples/sandbox
