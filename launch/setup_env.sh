#!/usr/bin/env bash
# Creates (once) and updates the project's virtual environment in .venv.
# CPU machines get the CPU build of torch 2.13.0 first, so that nothing pulls a CUDA build.
# Idempotent: a second run only checks that requirements are satisfied.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VIDARTRAIN_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.vidartrain-installed"
want="$(cat "$root/requirements.txt" "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$py" -m pip install -q --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==${VIDARTRAIN_TORCH_VERSION:-2.13.0}"
fi
"$py" -m pip install -q -r "$root/requirements.txt"
"$py" -m pip install -q --no-deps -e "$root"
echo "$want" > "$stamp"
