#!/usr/bin/env bash
# Creates (once) and updates the project's virtual environment in .venv.
# torch 2.13.0 is installed first, so that requirements.txt keeps it; VIDARTRAIN_TORCH_INDEX_URL picks
# its build (e.g. https://download.pytorch.org/whl/cpu where the default index serves the CUDA one).
# Idempotent: a second run does nothing unless requirements.txt or pyproject.toml changed.
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
log="$venv/install.log"
echo "installing the environment into $venv (log: $log)"
pip_install() {
  if ! "$py" -m pip install "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "pip install $* failed; full log in $log" >&2
    exit 1
  fi
}
pip_install --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  pip_install "torch==${VIDARTRAIN_TORCH_VERSION:-2.13.0}" ${VIDARTRAIN_TORCH_INDEX_URL:+--index-url "$VIDARTRAIN_TORCH_INDEX_URL"}
fi
pip_install -r "$root/requirements.txt"
pip_install --no-deps -e "$root"
echo "$want" > "$stamp"
