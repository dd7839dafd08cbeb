# Sourced by the scripts in this folder: installs what ncclep needs on a fresh machine.
# torch is pinned first: an unpinned 'torch' would pull the newest CUDA build (several GB).
PY=${PYTHON:-python3}
if ! $PY -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0" >&2
  $PY -m pip install -q "torch==2.13.0"
fi
if ! $PY -c "import ncclep, pytest, matplotlib, ruff" >/dev/null 2>&1 \
   || [ "$($PY -c 'import ncclep, os; print(os.path.dirname(ncclep.__path__[0]))' 2>/dev/null)" != "$(pwd)" ]; then
  echo "setup: pip install -e .[test]" >&2
  $PY -m pip install -q -e ".[test]"
fi
