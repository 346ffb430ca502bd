#!/usr/bin/env bash
# Installs the environment (once) and runs the test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup_env.sh"
cd "$root"
exec "${VIDARTRAIN_VENV:-$root/.venv}/bin/python" -m pytest -q "$@" tests
