#!/usr/bin/env bash
# The main job: the LL and HT benchmark (docs/benchmarking.md), every available backend side by side.
# On a host without GPUs it runs the reference backend on CPU processes at small sizes and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec $PY -m ncclep.bench --plot "$@"
