#!/usr/bin/env bash
# Builds the user documentation (docs/, Sphinx + MyST Markdown, autodoc of the Python API) into
# docs/_build/html. Warnings are errors. Sets itself up like test.sh (torch, ncclep), then installs
# the `docs` extra if Sphinx or myst-parser is missing. Extra arguments go to sphinx-build.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
if ! $PY -c "import sphinx, myst_parser" >/dev/null 2>&1; then
  echo "setup: pip install -e .[docs]" >&2
  $PY -m pip install -q -e ".[docs]"
fi
# python -m sphinx is sphinx-build, found without an activated virtual environment
exec $PY -m sphinx -W --keep-going -b html docs docs/_build/html "$@"
