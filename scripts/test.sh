#!/usr/bin/env bash
# The test command: sets up, lints, runs the whole pytest suite (GPU tests skip without GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
$PY -m ruff check ncclep tests examples bench setup.py
$PY -m ruff format --check ncclep tests examples bench setup.py
exec $PY -m pytest tests "$@"
