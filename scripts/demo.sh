#!/usr/bin/env bash
# The main job: set up .venv, start a server on the built-in demo dataset, run a sweep of four
# trainers through it, print the leaderboard and where the plots are, stop everything.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
exec python -m trainer.sweep --config configs/demo_sweep.yaml --serve-demo "$@"
