#!/usr/bin/env bash
# The test command: set up .venv, then run the whole suite (AUGSERVE_LONG=1 adds the long mode).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
exec python -m pytest "$@"
