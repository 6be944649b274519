#!/usr/bin/env bash
# The main job: set up .venv, then run augserve on the built-in demo dataset.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
exec python -m augserve preview "$@"
