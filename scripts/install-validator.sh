#!/usr/bin/env bash
# Installs kubernetes-validate (PyPI; it carries Kubernetes' JSON schemas and runs
# offline) into a virtualenv under target/, for tests/manifests.rs. Prints its path.
# Needs python3 with venv (Debian: apt-get install python3-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.37.0
venv=target/venv
tool="$PWD/$venv/bin/kubernetes-validate"
if [ ! -x "$tool" ] || ! "$venv/bin/pip" show kubernetes-validate 2>/dev/null | grep -qx "Version: $version"; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$version" >&2
fi
echo "$tool"
