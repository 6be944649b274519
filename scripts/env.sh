#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv with everything installed.
# Sourced by scripts/demo.sh and scripts/test.sh; needs only Python >= 3.10 and a package index.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
venv="$root/.venv"
# torch 2.13.0 is the CPU build kept on the development machines; override for another build.
torch_requirement="${AUGSERVE_TORCH:-torch==2.13.0}"
stamp="$venv/.augserve-installed"
wanted="$(cat "$root/pyproject.toml" "$root/scripts/env.sh" | sha256sum | cut -d' ' -f1) $torch_requirement"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "$torch_requirement"
  "$venv/bin/python" -m pip install --quiet -e "$root[server,dali,train,test,bench]"
  echo "$wanted" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
